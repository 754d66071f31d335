"""The live Textual UI over a `Session`: `LivePerceiverApp` and the `run_ui` entry point."""

from liveperceiver.ui.app import LivePerceiverApp, run_ui

__all__ = ["LivePerceiverApp", "run_ui"]
