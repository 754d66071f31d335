"""The 389-token performance vocabulary of the Perceiver AR symbolic audio model.

| ids     | event                                                    |
|---------|----------------------------------------------------------|
| 0-127   | note-on, pitch = id                                      |
| 128-255 | note-off, pitch = id - 128                               |
| 256-355 | time-shift of (id - 255) x 10 ms                         |
| 356-387 | velocity bin (id - 356), decodes to bin x 4              |
| 388     | pad                                                      |
"""

from __future__ import annotations

NOTE_ON = 0
NOTE_OFF = 128
TIME_SHIFT = 256
VELOCITY = 356
PAD = 388
VOCAB_SIZE = 389

NUM_TIME_SHIFTS = 100
NUM_VELOCITY_BINS = 32
TIME_STEP_S = 0.01

EVENT_TYPES = ("note_on", "note_off", "time_shift", "velocity", "pad")


def event_type(token: int) -> str:
    """The event type name of a token id (used for per-type statistics and logit masks)."""
    if token < NOTE_OFF:
        return "note_on"
    if token < TIME_SHIFT:
        return "note_off"
    if token < VELOCITY:
        return "time_shift"
    if token < PAD:
        return "velocity"
    return "pad"


def is_event(token: int) -> bool:
    """A note-on, note-off, time-shift or velocity: everything but pad, which fills a batch and is
    no event (nothing predicts it, and the session's adaptation learns nothing from it)."""
    return token < PAD


def note_on(pitch: int) -> int:
    return NOTE_ON + pitch


def note_off(pitch: int) -> int:
    return NOTE_OFF + pitch


def velocity_token(velocity: int) -> int:
    """The velocity-bin token for a MIDI velocity 0-127 (bin = velocity // 4)."""
    return VELOCITY + velocity // 4


def time_shift_steps(token: int) -> int:
    """Number of 10 ms steps a time-shift token advances (1..100)."""
    return token - TIME_SHIFT + 1


def check_tokens(tokens, source: str = "tokens") -> list[int]:
    """Validate a token list; raise ValueError naming the first bad id and the allowed range."""
    checked = []
    for index, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, int):
            raise ValueError(f"{source}: token {index} is {token!r}, not an integer id")
        if not 0 <= token < VOCAB_SIZE:
            raise ValueError(f"{source}: token {index} is {token}, outside 0..{VOCAB_SIZE - 1}")
        checked.append(token)
    return checked
