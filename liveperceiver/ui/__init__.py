"""The live Textual UI over a live session (snapshot.LiveSession): `LivePerceiverApp` and `run_ui`, the
front end that `play` passes to live/play.py. It imports the snapshot module, never the session module."""

from liveperceiver.ui.app import LivePerceiverApp, run_ui

__all__ = ["LivePerceiverApp", "run_ui"]
