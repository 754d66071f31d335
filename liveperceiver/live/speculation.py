"""A call's answer sampled ahead of the silence threshold, and how it is taken back (engine thread).

The run controller (runs.py) captures the stream before it writes the silence and samples the answer;
if the player plays before the threshold, nothing of it has sounded and `restore` puts the stream back
exactly as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from liveperceiver.core.stream import StreamEncoder


@dataclass
class Speculation:
    """A call's answer sampled during the player's silence, before the threshold passes.

    Why: sampling the opening of an answer (velocity, note-ons, the time shift that releases them)
    takes several engine steps; started `lookahead_ms` early, the answer's first note is ready when
    the silence threshold passes instead of tens of milliseconds after it. If the player plays first,
    nothing of it has sounded and the stream goes back exactly to `length` tokens and this encoder.
    Owned by the engine thread (the run controller); the snapshot reads only whether there is one."""

    start_at: float  # monotonic time the silence threshold passes; no note of it plays before
    length: int  # the engine's length before the silence was written into it
    encoder: StreamEncoder  # the encoder before the silence was written into it
    encoder_time: float  # the latest encoder time then (RunController._rel never goes below it)

    @classmethod
    def capture(cls, start_at: float, engine, encoder: StreamEncoder, encoder_time: float) -> Speculation:
        """Remember the stream as it is before the silence and the answer are written into it."""
        return cls(start_at, len(engine), copy.deepcopy(encoder), encoder_time)

    def restore(self, engine) -> tuple[StreamEncoder, float]:
        """Put the engine back to `length` tokens; returns the encoder and encoder time to go on with."""
        engine.truncate(self.length)
        return self.encoder, self.encoder_time
