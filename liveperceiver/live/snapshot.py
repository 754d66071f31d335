"""What a front end sees of a live session: the `Snapshot` it draws, the `LiveSession` surface it
drives, and the `SnapshotBuilder` that makes snapshots from copies of the session's shared state.

A front end (the Textual UI) imports this module, never session.py: it receives the session object,
typed by `LiveSession`, from the entry point (live/play.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from liveperceiver.live.link import FREE, LINK, LinkStatus
from liveperceiver.live.settings import Settings
from liveperceiver.stats import percentiles

if TYPE_CHECKING:
    from liveperceiver.live.ports import MidiInput, MidiOutput
    from liveperceiver.live.recorder import Recorder
    from liveperceiver.live.runs import RunController
    from liveperceiver.live.scheduler import Scheduler
    from liveperceiver.live.shared import SharedState, Timekeeper

ROLL_SECONDS = 10.0
LOG_SHOWN = 50  # log lines in a snapshot
AHEAD_SHOWN_S = 5.0  # planned model notes shown on the roll up to this far ahead


@dataclass
class Snapshot:
    """What a UI shows; built under a lock from copies, so it never blocks the real-time threads."""

    mode: str
    state: str  # "listening", "waiting", "preparing", "answering", "playing", "paused", "stopped (transport)"
    settings: Settings
    notes_in: int
    notes_out: int
    held: list[int]  # player keys down
    sounding: list[int]  # model notes sounding (as sent)
    roll: list[tuple[float, float | None, int, str]]  # (start, end, pitch, "player"|"model"|"ahead"), seconds ago
    step_ms: float | None
    reaction_ms: tuple[float | None, float | None]  # p50, p99
    jitter_ms: tuple[float | None, float | None]
    realtime_factor: float | None  # seconds of music sampled per second of sampling (> 1: faster than real time)
    bpm: float | None
    transport_running: bool
    context_tokens: int
    context_window: int
    recording: str  # journal path
    recorded: int
    in_port: str
    out_port: str
    log: list[str] = field(default_factory=list)
    step_p99_ms: float | None = None
    pedal_down: bool = False
    in_connected: bool = True  # False while a named port is gone (it reconnects when it returns), or JACK is
    out_connected: bool = True
    api: str = ""
    session_dir: str = ""
    suppressed: int = 0  # input notes recognised as our own echo
    errors: int = 0  # engine/input exceptions survived (details in log)
    clock_source: str = FREE  # what times the session: "link", "midi clock" or "free" (link.clock_source)
    link: LinkStatus | None = None  # Link's peers, tempo and beat in the bar; None while Link is off
    cache_weight: float | None = None  # the session cache's weight as learnt now, up to `adapt` (None: off)


class LiveSession(Protocol):
    """What a front end drives (session.Session has it): the current settings, snapshots, commands.

    Threads: the front end's (the UI thread, and its workers for save and close). A front end may
    also read `model` and `engine`, where present, once, for the facts it shows."""

    settings: Settings

    def snapshot(self) -> Snapshot: ...

    def update(self, **changes) -> Settings: ...

    def pause(self, paused: bool = True) -> None: ...

    def panic(self) -> None: ...

    def reset(self) -> None: ...

    def save(self, path: str | Path | None = None) -> Path: ...

    def close(self) -> Path | None: ...


class SnapshotBuilder:
    """Builds a Snapshot from the session's parts: copies taken under `shared.lock`, the rest read as
    plain references (the run controller's `context`, `decoder`, `speculation`, `paused`,
    `transport_stopped`) or from thread-safe parts (scheduler, recorder, ports, timekeeper).

    Threads: any caller, typically the UI thread at <= 30 Hz; it holds the lock only to copy."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        shared: SharedState,
        runs: RunController,
        scheduler: Scheduler,
        timekeeper: Timekeeper,
        recorder: Recorder,
        ports: tuple[MidiInput, MidiOutput],
        api: str,
    ) -> None:
        self._settings = settings
        self.shared = shared
        self.runs = runs
        self.scheduler = scheduler
        self.timekeeper = timekeeper
        self.recorder = recorder
        self.midi_in, self.midi_out = ports
        self.api = api

    def build(self) -> Snapshot:
        now = time.monotonic()
        settings = self._settings()
        shared = self.shared
        with shared.lock:
            roll_events = list(shared.roll)
            steps = list(shared.step_times)
            reactions = list(shared.reactions)
            notes_in, notes_out = shared.notes_in, shared.notes_out
            held = sorted(pitch for _, pitch in shared.held)
            pedal_down, suppressed, errors = shared.pedal_down, shared.suppressed, shared.errors
            log = list(shared.log_lines)[-LOG_SHOWN:]
            rtf = (
                shared.music_seconds / shared.sample_seconds
                if shared.music_seconds > 0.5 and shared.sample_seconds > 0
                else None
            )
        roll = _roll(roll_events, now)
        for note in self.scheduler.pending_notes():
            if note.on and note.time - now < AHEAD_SHOWN_S:
                roll.append((now - note.time, None, note.pitch + settings.transpose, "ahead"))
        jitter = [j * 1000 for j in self.scheduler.jitter()]
        context_tokens, context_window = self.runs.context
        source, timeline, midi_bpm = self.timekeeper.source(now)
        linked = source == LINK
        return Snapshot(
            mode=settings.mode,
            state=self._state(settings),
            settings=settings,
            notes_in=notes_in,
            notes_out=notes_out,
            held=held,
            sounding=self.scheduler.sounding_pitches(),
            roll=roll,
            step_ms=statistics.median(steps) * 1000 if steps else None,
            reaction_ms=tuple(None if v is None else v * 1000 for v in percentiles(reactions)),
            jitter_ms=percentiles(jitter),
            realtime_factor=rtf,
            bpm=timeline.bpm if linked else midi_bpm,
            transport_running=not self.runs.transport_stopped if linked else self.timekeeper.clock.running,
            context_tokens=context_tokens,
            context_window=context_window,
            cache_weight=self.runs.cache_weight,
            recording=str(self.recorder.path),
            recorded=sum(self.recorder.counts.values()),
            in_port=self.midi_in.name,
            out_port=self.midi_out.name,
            log=log,
            step_p99_ms=None if not steps else percentiles(steps, (99,))[0] * 1000,
            pedal_down=pedal_down,
            in_connected=self.midi_in.connected,
            out_connected=self.midi_out.connected,
            api=self.api,
            session_dir=str(self.recorder.dir),
            suppressed=suppressed,
            errors=errors,
            clock_source=source,
            link=timeline.status(now) if timeline is not None else None,
        )

    def _state(self, settings: Settings) -> str:
        runs = self.runs
        if runs.transport_stopped:
            return "stopped (transport)"
        if runs.paused:
            return "paused"
        if settings.mode == "listen":
            return "listening"
        if settings.mode == "duet":
            return "playing"
        if runs.decoder is None:
            return "waiting"
        return "preparing" if runs.speculation is not None else "answering"  # preparing: sampled, not yet due


def _roll(events: list[tuple[float, bool, int, str]], now: float) -> list[tuple[float, float | None, int, str]]:
    """Note intervals of the last ROLL_SECONDS as (start, end) seconds ago; end None while sounding."""
    open_notes: dict[tuple[str, int], float] = {}
    notes = []
    for when, is_on, pitch, who in events:
        if now - when > ROLL_SECONDS * 2:
            continue
        key = (who, pitch)
        if is_on:
            if key in open_notes:
                notes.append((now - open_notes[key], now - when, pitch, who))
            open_notes[key] = when
        elif key in open_notes:
            notes.append((now - open_notes.pop(key), now - when, pitch, who))
    notes += [(now - start, None, pitch, who) for (who, pitch), start in open_notes.items()]
    return [n for n in notes if n[1] is None or n[1] <= ROLL_SECONDS]
