"""The engine thread's commands: small frozen values that the other threads put on `Session.commands`
and the run controller (runs.py) takes off it between engine steps.

Why values and not calls: the engine thread owns the engine, the encoder and the run state, so other
threads never touch them; they describe what happened (the player's note, a barge-in's silence, a new
setting) and the engine thread acts on it in order. Each field has a name, where a tuple's position
once said what it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from liveperceiver.live.settings import Settings


@dataclass(frozen=True)
class PlayerNoteOn:
    """The player struck a key (input thread): it joins the context at its true time `when`."""

    when: float  # monotonic seconds, stamped by the input port
    pitch: int
    channel: int  # 0-15: the encoder's voice
    velocity: int


@dataclass(frozen=True)
class PlayerNoteOff:
    """The player let a key go (input thread; also each held key on the player's all-notes-off)."""

    when: float
    pitch: int
    channel: int


@dataclass(frozen=True)
class PlayerPedal:
    """The player's sustain pedal (CC64) moved (input thread)."""

    when: float
    value: int  # 0-127; >= 64 is down
    channel: int


PlayerEvent = PlayerNoteOn | PlayerNoteOff | PlayerPedal


@dataclass(frozen=True)
class Rollback:
    """End the run now and drop what was not played: a barge-in, the player's all-notes-off, panic.

    The sender has already called `scheduler.silence()` (at once, before the engine hears of it);
    `tag` is the highest tag it reported sent (None: panic, which did not ask). With `keep_sounding`
    (duet) the notes already sounding ring on until the model's own note-offs come."""

    cut_at: float  # monotonic seconds: where the model's cut notes end in the context
    tag: int | None
    keep_sounding: bool


@dataclass(frozen=True)
class ApplySettings:
    """`Session.update` replaced the settings: `changed` names the fields whose value changed."""

    settings: Settings
    changed: tuple[str, ...]


@dataclass(frozen=True)
class Pause:
    """Stop (or resume) sampling; the context keeps listening."""

    paused: bool


@dataclass(frozen=True)
class Transport:
    """A MIDI Start/Continue/Stop (input thread) or a Link peer's start/stop (Link thread).

    A stop has already silenced the scheduler; the engine thread ends the run and waits for a start."""

    running: bool
    when: float
    source: str  # link.MIDI_CLOCK or link.LINK: a stop from Link is released when Link stops being followed


@dataclass(frozen=True)
class LinkReleased:
    """Link or its start/stop sync was turned off: a stop that came from Link no longer holds."""


@dataclass(frozen=True)
class Reset:
    """Forget the context (the recording goes on)."""


@dataclass(frozen=True)
class Stop:
    """The session is closing: all notes off, no new run."""


Command = PlayerEvent | Rollback | ApplySettings | Pause | Transport | LinkReleased | Reset | Stop
