"""A live session: ports -> stream encoder -> engine thread -> scheduler -> ports, plus the recorder.

One object, driven the same way by `play --headless` and by the UI. Public surface:

    session = Session(settings, model=..., api="auto", in_port=None, out_port=None, session_dir=...)
    session.start()
    session.set_mode("duet"); session.update(temperature=1.1); session.update(model="other")
    session.apply_preset("duet")   # a preset's settings, live (the model only if the preset names one)
    session.update(link=True)      # join the Ableton Link session (link_quantum, link_start_stop, answer_on)
    session.panic()
    session.pause(True); session.reset(); session.save(path)
    snap = session.snapshot()      # thread-safe, cheap: for a UI at <= 30 Hz
    session.close()                # stop sampling, all notes off, save; JACK ports left to the exit (< 1 s)

Threads and who owns what (GUIDE.md section 3):

- backend callback (ports.MidiInput): stamps and queues raw bytes.
- input thread: filters (channel, feedback of our own notes), MIDI clock, journals the player,
  barge-in (`scheduler.silence()` at once, before the engine hears of it), thru; hands note and
  pedal events to the engine thread. Never waits on the model or the disk.
- engine thread: owns the Engine, the StreamEncoder and the mode logic. Absorbs the player's
  tokens, samples ahead of playback by `lookahead_ms`, decodes to timed notes, schedules them,
  commits the played part of what it sampled and rolls back (engine.truncate) what was not played.
- scheduler thread: the only writer to the output; every note-on gets its note-off.
- recorder thread: journal flushes.
- link thread (only with Link on, link.LinkClock): owns the aalink.Link; publishes its beat grid as
  an immutable LinkTimeline; a peer's start/stop silences the scheduler and queues a transport
  command, as a MIDI Stop/Start does.

The timeline: the encoder works in seconds since `self.t0` (reset by `reset()`); the scheduler in
`time.monotonic()` seconds. Sampled tokens are speculative until the scheduler has sent their
events; only then are they merged into the encoder (`absorb_model_tokens`).
"""

from __future__ import annotations

import copy
import datetime
import queue
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError
from liveperceiver.core.stream import StreamDecoder, StreamEncoder, TimedEvent
from liveperceiver.core.tokenizer import time_shift_tokens
from liveperceiver.live.clock import GRID_BEATS, ClockTracker
from liveperceiver.live.link import (
    DEFAULT_BPM,
    FREE,
    LINK,
    LinkClock,
    LinkStatus,
    LinkTimeline,
    check_tempo,
    clock_source,
    describe_source,
    require_aalink,
)
from liveperceiver.live.ports import feedback_loop, open_ports, resolve_api
from liveperceiver.live.recorder import MODEL, PLAYER, Recorder
from liveperceiver.live.scheduler import OutNote, Scheduler
from liveperceiver.live.settings import Settings
from liveperceiver.runtime import exit_now, freeze_heap, thaw_heap
from liveperceiver.stats import percentiles

# A call's answer begins with sound: until its first note-on only velocity tokens and note-ons the
# output plays (pitch range) may be sampled (a random model otherwise opened with time shifts and
# answered 1.9 s after the threshold), and after a velocity only such a note-on.
OPENING_FORBID = range(vocab.NOTE_OFF, vocab.VELOCITY)  # note-offs and time shifts (pad is never sampled)
AFTER_VELOCITY_FORBID = range(vocab.NOTE_OFF, vocab.PAD + 1)  # everything but note-ons

FEEDBACK_WINDOW_S = 0.030  # an input note matching one we sent this recently is our own echo
PORT_CHECK_S = 0.5
DELIVERY_WAIT_S = 0.1  # close(): time the backend gets to deliver the final note-offs
IDLE_WAIT_S = 0.005  # the engine thread's poll while waiting for silence or look-ahead room
SWITCH_INTERVAL_S = 0.0005  # GIL hand-over interval while a session runs (Python's default: 5 ms)
ROLL_SECONDS = 10.0
LOG_LINES = 200
SAMPLE_BATCH = 4  # tokens sampled between looks at the command queue


def default_session_dir() -> Path:
    import platformdirs

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(platformdirs.user_data_dir("liveperceiver")) / "sessions" / stamp


class EchoMemory:
    """The notes we sent in the last FEEDBACK_WINDOW_S, to recognise their routed-back copies.

    Threads: the scheduler thread calls `sent`, the input thread calls `is_echo`; `self.lock` guards
    the deque (iterating it while the other thread appends raised "deque mutated during iteration")."""

    def __init__(self, window_s: float = FEEDBACK_WINDOW_S, size: int = 256) -> None:
        self.window_s = window_s
        self.lock = threading.Lock()
        self.recent: deque[tuple[float, bool, int, int]] = deque(maxlen=size)  # (time, is_on, pitch, velocity)

    def sent(self, when: float, is_on: bool, pitch: int, velocity: int) -> None:
        with self.lock:
            self.recent.append((when, is_on, pitch, velocity))

    def is_echo(self, when: float, is_on: bool, pitch: int, velocity: int) -> bool:
        """A routed-back copy of a note we sent: same pitch and kind within the window, and for a
        note-on the same velocity (a player striking that key right then almost never matches it).
        Each note sent explains one echo at most."""
        with self.lock:
            for index, (sent, sent_on, sent_pitch, sent_velocity) in enumerate(self.recent):
                same_velocity = sent_velocity == velocity or not is_on
                if sent_pitch == pitch and sent_on == is_on and same_velocity and 0 <= when - sent <= self.window_s:
                    del self.recent[index]
                    return True
        return False


@dataclass
class Speculation:
    """A call's answer sampled during the player's silence, before the threshold passes.

    Why: sampling the opening of an answer (velocity, note-ons, the time shift that releases them)
    takes several engine steps; started `lookahead_ms` early, the answer's first note is ready when
    the silence threshold passes instead of tens of milliseconds after it. If the player plays first,
    nothing of it has sounded and the stream goes back exactly to `length` tokens and this encoder."""

    start_at: float  # monotonic time the silence threshold passes; no note of it plays before
    length: int  # the engine's length before the silence was written into it
    encoder: StreamEncoder  # the encoder before the silence was written into it
    encoder_time: float  # the session's latest encoder time then (Session._rel never goes below it)

    @classmethod
    def capture(cls, start_at: float, engine, encoder: StreamEncoder, encoder_time: float) -> Speculation:
        """Remember the stream as it is before the silence and the answer are written into it."""
        return cls(start_at, len(engine), copy.deepcopy(encoder), encoder_time)

    def restore(self, engine) -> tuple[StreamEncoder, float]:
        """Put the engine back to `length` tokens; returns the encoder and encoder time to go on with."""
        engine.truncate(self.length)
        return self.encoder, self.encoder_time


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
    in_connected: bool = True  # False while a named port is gone (it reconnects when it returns)
    out_connected: bool = True
    api: str = ""
    session_dir: str = ""
    suppressed: int = 0  # input notes recognised as our own echo
    errors: int = 0  # engine/input exceptions survived (details in log)
    clock_source: str = FREE  # what times the session: "link", "midi clock" or "free" (link.clock_source)
    link: LinkStatus | None = None  # Link's peers, tempo and beat in the bar; None while Link is off


class Session:
    """See the module docstring. Construct, `start()`, drive, `close()`.

    Who owns which state (every attribute more than one thread touches has one owner or one lock):

    - `self.lock` guards the player's keys and pedal (`held`, `pedal_down`: changed by the input
      thread, cleared by `panic()` from the UI, read by the engine thread and `snapshot()`), the
      counters (`notes_in`, `notes_out`, `suppressed`, `errors`), the statistics and piano roll
      (`step_times`, `reactions`, `sample_seconds`, `music_seconds`, `roll`, `answer_starts`,
      `pending_answer_start`) and the log (`log_lines`, `log_count`: any thread logs).
    - `echoes` (EchoMemory) has a lock of its own: the scheduler thread writes, the input thread reads.
    - The input thread owns `last_port_check`, `last_tempo_log`, `clock_source_shown` and writes
      `last_activity` (a float the engine thread only reads). `clock` is fed by it and read by the
      others (ClockTracker's reads copy its state once; its docstring says why that suffices).
    - `link` (a LinkClock, None until Link is first turned on) is set once, by `__init__` or by
      `update()` under `link_lock`, and never replaced; its Link object belongs to its own thread,
      and the others read its `timeline`, an immutable value swapped whole.
    - The engine thread owns the engine, the encoder, the decoder, the run state (`speculation`,
      `carry`, `committed`, ...), `grid` (the Link timeline its plans are made on), `stopped_by`,
      and `context`, the (tokens, window) it publishes for `snapshot()`.
      `snapshot()` reads `decoder`, `speculation`, `paused`, `transport_stopped` as plain references.
    - `settings` is an immutable Settings replaced whole by the caller of `update()` (the UI); the
      other threads read the reference and the engine thread hears of it through `commands`.
    - scheduler, recorder and ports are thread-safe on their own.
    """

    def __init__(
        self,
        settings: Settings,
        model=None,
        api: str = "auto",
        in_port: str | None = None,
        out_port: str | None = None,
        session_dir: str | Path | None = None,
        record_path: str | Path | None = None,
        device: str = "auto",
        weights: str = "auto",
        dtype: str = "float32",
        link_tempo: float | None = None,
    ):
        settings.validate()
        if settings.link:
            require_aalink()  # before the ports and the model: a missing package is one line at once
        if link_tempo is not None:
            check_tempo(link_tempo)
            if not settings.link:
                raise UserError("--link-tempo proposes a tempo to the Link session: it needs --link")
        self.settings = settings
        self.device = device  # the engine's: cuda, then mps, then cpu
        self.weights = weights  # how the engine stores Linear weights (resolve_weights)
        self.dtype = dtype  # the engine's compute dtype: float32, or bfloat16/float16 on a GPU
        self.lock = threading.Lock()  # guards the state shared between threads (class docstring)
        self.log_lines: deque[str] = deque(maxlen=LOG_LINES)
        self.log_count = 0  # lines ever logged (the deque keeps the last LOG_LINES)
        self.api = resolve_api(api)
        # ports first: a wrong port name is reported before a slow model load
        self.midi_in, self.midi_out = open_ports(self.api, in_port, out_port, log=self.warn)
        loop = feedback_loop(self.midi_in, self.midi_out)
        if loop is not None and loop[1]:
            self.midi_in.close(release_port=True)
            self.midi_out.close(release_port=True)
            raise UserError(loop[0])
        if loop is not None:
            self.warn(loop[0])
        try:
            self.midi_out.ensure_delivery()
            self.model = self._load_model(model if model is not None else settings.model)
            self.engine = self._new_engine(self.model, settings)
        except BaseException:
            self.midi_in.close()
            self.midi_out.close()
            raise
        measured = " (measured the faster here)" if weights == "auto" and self.engine.device.type == "cpu" else ""
        self.info(f"engine: {self.engine.device.type}, {self.engine.precision}{measured}")
        self.t0 = time.monotonic()
        try:
            self.recorder = Recorder(session_dir or default_session_dir(), origin=self.t0)
        except OSError as error:
            self.midi_in.close()
            self.midi_out.close()
            raise UserError(f"{session_dir}: cannot write the session journal ({error.strerror or error})") from None
        self.record_path = Path(record_path) if record_path else None
        self.scheduler = Scheduler(self.midi_out.send, settings, on_sent=self._on_sent, log=self.warn)
        self.clock = ClockTracker()
        self.commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.closed = False
        self.saved_path: Path | None = None  # the take's MIDI file, once close() saved it
        # input-thread state
        self.echoes = EchoMemory()  # what we sent: an input note matching one is our own echo
        self.held: set[tuple[int, int]] = set()
        self.pedal_down = False
        self.last_activity = 0.0
        self.suppressed = 0
        self.last_port_check = 0.0
        self.last_tempo_log = 0.0
        # engine-thread state (see _engine_loop)
        self.encoder = StreamEncoder()
        self.encoder_time = 0.0  # the latest time given to the encoder (its inputs must not go back)
        self.committed = len(self.engine)
        start, _, end = self.engine.window()
        self.context = (len(self.engine), end - start)  # (tokens, window), published by the engine thread
        self.decoder: StreamDecoder | None = None
        self.run_tokens_start = 0
        self.answer_end: float | None = None
        self.call_pending = False
        self.paused = False
        self.transport_stopped = False
        self.quant_shift: dict[int, float] = {}
        self.epoch = 0  # the scheduler epoch this run plans in (a barge-in makes it stale)
        self.run_steps = 0
        self.answer_sounded = False  # a note-on was released in this run
        self.starting: set[int] = set()  # note-ons sampled, waiting for the time shift that releases them
        self.carry: set[int] = set()  # duet: model notes ringing on past a rollback (their off was dropped)
        self.schedule_refused_at: float | None = None
        self.speculation: Speculation | None = None  # a call's answer sampled before the threshold
        # statistics and the piano roll (guarded by self.lock)
        self.notes_in = 0
        self.notes_out = 0
        self.step_times: deque[float] = deque(maxlen=2048)
        self.reactions: deque[float] = deque(maxlen=2048)
        self.sample_seconds = 0.0
        self.music_seconds = 0.0
        self.roll: deque[tuple[float, bool, int, str]] = deque(maxlen=4096)
        self.answer_starts: deque[tuple[float, float]] = deque(maxlen=256)  # (silence threshold time, first note)
        self.pending_answer_start: float | None = None
        self.errors = 0
        self.rolled_back = 0  # sampled tokens dropped unplayed (barge-ins, switches)
        self.threads = [
            threading.Thread(target=self._input_loop, name="lp-input", daemon=True),
            threading.Thread(target=self._engine_loop, name="lp-engine", daemon=True),
        ]
        # Ableton Link (see the class docstring for who owns what)
        self.clock_source_shown = FREE  # input thread: the clock source last logged
        self.grid: LinkTimeline | None = None  # engine thread: the Link grid planned notes are on
        self.stopped_by: str | None = None  # engine thread: what stopped the transport ("link", "midi clock")
        self.link_lock = threading.Lock()  # creating the LinkClock (update() may run on two threads)
        self.link_tempo = link_tempo
        self.link: LinkClock | None = None
        if settings.link:
            try:
                self.link = self._new_link(settings)
            except BaseException:
                self.recorder.close()
                self.midi_in.close()
                self.midi_out.close()
                raise

    # ------------------------------------------------------------------ public commands

    def start(self) -> None:
        # The scheduler and input threads wait for the GIL behind the engine thread; Python's default
        # 5 ms switch interval would then delay each note by up to 5 ms, so hand the GIL over sooner.
        self.previous_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self.previous_switch_interval, SWITCH_INTERVAL_S))
        freeze_heap()
        self.recorder.start()
        self.scheduler.start()
        for thread in self.threads:
            thread.start()
        self.info(
            f"session started: {self.api}, in {self.midi_in.name!r}, out {self.midi_out.name!r}, "
            f"mode {self.settings.mode}, journal {self.recorder.path}"
        )
        priority = self.scheduler.priority
        (self.info if priority.startswith(("real-time", "raised")) else self.warn)(f"output thread: {priority}")

    def set_mode(self, mode: str) -> None:
        self.update(mode=mode)

    def update(self, **changes) -> Settings:
        """Change settings live (mode, sampling, timing, output, model, Link); invalid values raise
        ValueError (turning Link on without the aalink package too)."""
        old = self.settings
        new = old.updated(**changes)
        joined = False
        if new.link:
            with self.link_lock:
                if self.link is None:  # join now, before anything changes: a failure leaves all as it was
                    try:
                        self.link, joined = self._new_link(new), True
                    except UserError as error:
                        raise ValueError(str(error)) from None
        self.settings = new
        self.scheduler.settings = new
        changed = tuple(name for name in changes if getattr(old, name) != getattr(new, name))
        if {"link", "link_quantum", "link_start_stop"} & set(changed) and not joined:
            self._apply_link(old, new)
        self.commands.put(("settings", new, changed))
        return new

    def _new_link(self, settings: Settings) -> LinkClock:
        """Join the Link session; with `link_tempo` (play --link-tempo), propose that tempo to it."""
        link = LinkClock(
            quantum=settings.link_quantum,
            start_stop=settings.link_start_stop,
            bpm=self.link_tempo or DEFAULT_BPM,
            on_transport=self._link_transport,
            log=self.info,
        )
        if self.link_tempo is not None:
            link.propose_tempo(self.link_tempo)
        ignored = "" if settings.link_start_stop else ", start/stop ignored"
        self.info(f"link: on, {settings.link_quantum} beats per bar{ignored}")
        return link

    def _apply_link(self, old: Settings, new: Settings) -> None:
        """Link turned on or off, or its quantum or start/stop sync changed (the caller's thread)."""
        if self.link is None:
            return
        if (old.link_quantum, old.link_start_stop) != (new.link_quantum, new.link_start_stop):
            self.link.configure(new.link_quantum, new.link_start_stop)
        if old.link != new.link:
            self.link.set_enabled(new.link)
            self.info("link: on" if new.link else "link: off")
        if not (new.link and new.link_start_stop):
            self.commands.put(("link released",))  # a stop that came from Link no longer holds

    def _link_transport(self, playing: bool, when: float) -> None:
        """The Link thread: a peer started or stopped the session's transport (start/stop sync)."""
        settings = self.settings
        if not (settings.link and settings.link_start_stop):
            return
        if not playing:
            self.scheduler.silence()  # every model note off now, as a MIDI Stop does
        self.commands.put(("transport", playing, when, LINK))

    def apply_preset(self, name_or_path: str) -> Settings:
        """Switch to a preset's settings live (the model is reloaded only if the preset names another)."""
        from liveperceiver.live.presets import load_preset

        current = self.settings.model if isinstance(self.settings.model, str) else None
        preset = load_preset(name_or_path, default_model=current).to_dict()  # its num_latents fits this model
        if preset.get("model") is None:
            preset.pop("model")  # the preset does not choose: keep the current model
        if not preset["link"]:
            preset.pop("link")  # a preset turns Link on, never off (leaving the session is update(link=False))
        return self.update(**preset)

    def panic(self) -> None:
        """All model notes off, CC123, the current answer dropped, and the player's keys and pedal
        taken as up (a note-off lost on the way would otherwise keep call mode waiting forever)."""
        with self.lock:
            self.held.clear()
            self.pedal_down = False
        self.scheduler.panic()
        self.commands.put(("rollback", time.monotonic(), None, False))

    def pause(self, paused: bool = True) -> None:
        self.commands.put(("pause", paused))

    def reset(self) -> None:
        """Forget the context (the recording goes on)."""
        self.commands.put(("reset",))

    def save(self, path: str | Path | None = None) -> Path:
        """Write the session's MIDI file now (the journal keeps growing)."""
        return self.recorder.save(path)

    def close(self, release_ports: bool = False) -> Path | None:
        """Stop sampling, all notes off, save, stop using the ports. Safe to call twice.

        By default JACK ports are left to the process's exit, which must follow (see `run_play`):
        unregistering a JACK port can crash the process (ports._Port.close). Only a process that
        runs more sessions after this one (the tests, `bench --live`) passes `release_ports=True`."""
        if self.closed:
            return self.saved_path
        self.closed = True
        self.stopping.set()
        self.commands.put(("stop",))
        deadline = time.monotonic() + 0.5
        for thread in self.threads:
            if thread is not threading.current_thread() and thread.ident is not None:  # started
                thread.join(max(0.0, deadline - time.monotonic()))
        self.scheduler.close()
        if self.link is not None:
            self.link.close()  # leave the Link session (its peers see one peer fewer)
        last_sent = time.monotonic()
        saved = None
        try:
            saved = self.saved_path = self.recorder.save(self.record_path)
            if self.record_path is not None:
                self.recorder.save()
        except UserError as error:
            self.warn(str(error))
        finally:
            # the last note-offs must leave before the port goes: JACK sends them in its next process
            # cycle, which a starved machine can delay by tens of milliseconds (saving overlaps this)
            time.sleep(max(0.0, last_sent + DELIVERY_WAIT_S - time.monotonic()))
            self.recorder.close()
            self.midi_in.close(release_ports)
            self.midi_out.close(release_ports)
            if hasattr(self, "previous_switch_interval"):
                sys.setswitchinterval(self.previous_switch_interval)
                thaw_heap()
        return saved

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        with self.lock:
            roll_events = list(self.roll)
            steps = list(self.step_times)
            reactions = list(self.reactions)
            notes_in, notes_out = self.notes_in, self.notes_out
            held = sorted(pitch for _, pitch in self.held)
            pedal_down, suppressed, errors = self.pedal_down, self.suppressed, self.errors
            log = list(self.log_lines)[-50:]
            rtf = (
                self.music_seconds / self.sample_seconds
                if self.music_seconds > 0.5 and self.sample_seconds > 0
                else None
            )
        roll = _roll(roll_events, now)
        for note in self.scheduler.pending_notes():
            if note.on and note.time - now < 5:
                roll.append((now - note.time, None, note.pitch + self.settings.transpose, "ahead"))
        jitter = [j * 1000 for j in self.scheduler.jitter()]
        context_tokens, context_window = self.context
        source, timeline, midi_bpm = self._time_source(now)
        linked = source == LINK
        return Snapshot(
            mode=self.settings.mode,
            state=self._state(),
            settings=self.settings,
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
            transport_running=not self.transport_stopped if linked else self.clock.running,
            context_tokens=context_tokens,
            context_window=context_window,
            recording=str(self.recorder.path),
            recorded=sum(self.recorder.counts.values()),
            in_port=self.midi_in.name,
            out_port=self.midi_out.name,
            log=log,
            step_p99_ms=None if not steps else percentiles(steps, (99,))[0] * 1000,
            pedal_down=pedal_down,
            in_connected=self.midi_in.connected_name is not None,
            out_connected=self.midi_out.connected_name is not None,
            api=self.api,
            session_dir=str(self.recorder.dir),
            suppressed=suppressed,
            errors=errors,
            clock_source=source,
            link=timeline.status(now) if timeline is not None else None,
        )

    def _time_source(self, now: float) -> tuple[str, LinkTimeline | None, float | None]:
        """(clock source, Link's timeline while Link is on, the MIDI clock's tempo): any thread."""
        link = self.link
        timeline = link.timeline if link is not None and self.settings.link else None
        midi_bpm = self.clock.bpm(now)
        return clock_source(timeline, midi_bpm), timeline, midi_bpm

    # ------------------------------------------------------------------ logging

    def info(self, message: str) -> None:
        self._log(message)

    def warn(self, message: str) -> None:
        self._log(f"warning: {message}")

    def _log(self, line: str) -> None:
        """Any thread logs (the scheduler, the ports, the engine and input threads, the UI)."""
        with self.lock:
            self.log_lines.append(f"{time.strftime('%H:%M:%S')} {line}")
            self.log_count += 1

    def log_since(self, shown: int) -> tuple[list[str], int]:
        """The log lines added since `shown` lines were logged (those still kept), and the new count."""
        with self.lock:
            lines, total = list(self.log_lines), self.log_count
        return lines[max(0, len(lines) - (total - shown)) :], total

    def _count_error(self) -> None:
        with self.lock:
            self.errors += 1

    def _state(self) -> str:
        if self.transport_stopped:
            return "stopped (transport)"
        if self.paused:
            return "paused"
        mode = self.settings.mode
        if mode == "listen":
            return "listening"
        if mode == "duet":
            return "playing"
        if self.decoder is None:
            return "waiting"
        return "preparing" if self.speculation is not None else "answering"  # preparing: sampled, not yet due

    # ------------------------------------------------------------------ model and engine

    def _load_model(self, spec):
        """A PerceiverAR, a LoadedModel, or a spec for checkpoint.load_model."""
        if spec is None or isinstance(spec, str | Path):
            from liveperceiver.core.checkpoint import load_model

            return load_model(None if spec is None else str(spec)).model
        return getattr(spec, "model", spec)

    def _new_engine(self, model, settings: Settings):
        from liveperceiver.inference.engine import DTYPES, Engine, pick_device, resolve_weights

        max_latents = model.config.max_latents
        if settings.num_latents > max_latents:
            raise UserError(f"num_latents {settings.num_latents} is more than the model's max_latents {max_latents}")
        cap = settings.prefix_cap or None
        if cap is not None:
            cap = min(cap, model.config.max_prefix_len)
        device = pick_device(self.device)
        # 16-bit compute (--dtype) stores its own weights: `auto` then measures nothing
        weights = "float32" if self.dtype != "float32" and self.weights == "auto" else self.weights
        try:
            return Engine(
                model,
                num_latents=settings.num_latents,
                prefix_cap=cap,
                sampling=settings.sampling_settings(),
                constraints=settings.engine_constraints(),
                adapt=settings.adapt,
                device=device,
                dtype=DTYPES[self.dtype],
                quantize=resolve_weights(weights, device, model),
            )
        except ValueError as error:  # e.g. int8 weights on a GPU
            raise UserError(f"cannot build the engine: {error}") from None

    # ------------------------------------------------------------------ scheduler callback

    def _on_sent(self, when: float, message: list[int], model: bool) -> None:
        """Runs on the scheduler thread for every message sent: journal, echo memory, roll."""
        status = message[0] & 0xF0
        if status in (0x80, 0x90) and len(message) == 3:
            self.echoes.sent(when, status == 0x90 and message[2] > 0, message[1], message[2])
        if not model:
            return  # thru: the player's own notes, already journaled as the player's
        self.recorder.record(MODEL, when, message)
        if status in (0x80, 0x90) and len(message) == 3:
            is_on = status == 0x90 and message[2] > 0
            with self.lock:
                self.roll.append((when, is_on, message[1], "model"))
                if is_on:
                    self.notes_out += 1
                    if self.pending_answer_start is not None:
                        self.answer_starts.append((self.pending_answer_start, when))
                        self.pending_answer_start = None

    # ------------------------------------------------------------------ input thread

    def _input_loop(self) -> None:
        while not self.stopping.is_set():
            item = self.midi_in.get(timeout=0.05)
            now = time.monotonic()
            if now - self.last_port_check > PORT_CHECK_S:
                self.last_port_check = now
                for port in (self.midi_in, self.midi_out):
                    try:
                        line = port.check()
                    except Exception as error:  # a backend hiccup must not end input
                        line = f"port check failed: {error}"
                    if line:
                        self.warn(line)
                source, timeline, midi_bpm = self._time_source(now)
                if source != self.clock_source_shown:
                    self.clock_source_shown = source
                    self.info(describe_source(source, timeline, midi_bpm, now))
                bpm = timeline.bpm if source == LINK else midi_bpm
                if bpm is not None and now - self.last_tempo_log > 2.0:
                    self.last_tempo_log = now
                    self.recorder.record_tempo(now, bpm)
            if item is None:
                continue
            try:
                self._hear(*item)
            except Exception:
                self._count_error()
                self.warn("input error: " + traceback.format_exc(limit=2).strip().splitlines()[-1])

    def _hear(self, when: float, message: list[int]) -> None:
        """One incoming message: classify, filter, and pass on. Anything unknown is ignored."""
        if not message:
            return
        status = message[0]
        if status >= 0xF0:
            change = self.clock.feed(status, message[1:], when)
            if change == "stop":
                self.scheduler.silence()
                self.commands.put(("transport", False, when, "midi clock"))
            elif change in ("start", "continue"):
                self.commands.put(("transport", True, when, "midi clock"))
            return
        kind, channel = status & 0xF0, status & 0x0F
        if len(message) < 3 or kind not in (0x80, 0x90, 0xB0) or any(b > 127 for b in message[1:3]):
            return
        settings = self.settings
        if settings.in_channel and channel != settings.in_channel - 1:
            return
        number, value = message[1], message[2]
        if kind == 0xB0:
            if number == 64:
                self._player(when, message, ("pedal", when, value, channel))
                with self.lock:
                    self.pedal_down = value >= 64
            elif number in (120, 123):  # all sound/notes off from the player's side
                tag, _ = self.scheduler.silence()
                self.commands.put(("rollback", when, tag, False))
                with self.lock:
                    released = sorted(self.held)
                    self.held.clear()
                for ch, pitch in released:
                    self._player(when, [0x80 | ch, pitch, 0], ("note_off", when, pitch, ch))
            return
        is_on = kind == 0x90 and value > 0
        if self.echoes.is_echo(when, is_on, number, value):
            with self.lock:
                self.suppressed += 1
            return
        if is_on:
            if settings.mode == "call":  # barge-in: the answer stops at once
                tag, _ = self.scheduler.silence()
                self.commands.put(("rollback", when, tag, False))
            elif settings.mode == "duet":  # the look-ahead goes; what sounds rings on
                tag, _ = self.scheduler.silence(notes_off=False)
                self.commands.put(("rollback", when, tag, True))
            with self.lock:
                self.held.add((channel, number))
            self._player(when, message, ("note_on", when, number, channel, value))
        else:
            with self.lock:
                self.held.discard((channel, number))
            self._player(when, message, ("note_off", when, number, channel))

    def _player(self, when: float, message: list[int], event: tuple) -> None:
        self.last_activity = when
        self.recorder.record(PLAYER, when, message)
        if self.settings.thru:
            self.scheduler.send_raw(list(message))
        if event[0] != "pedal":
            with self.lock:
                is_on = event[0] == "note_on"
                self.roll.append((when, is_on, event[2], "player"))
                self.notes_in += is_on
        self.commands.put(("player", event))

    # ------------------------------------------------------------------ engine thread

    def _rel(self, when: float) -> float:
        """Monotonic seconds -> encoder seconds (never before the encoder's latest time)."""
        self.encoder_time = max(when - self.t0, self.encoder_time)
        return self.encoder_time

    def _engine_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._engine_tick()
            except Exception:
                self._count_error()
                self.warn("engine error, notes off and answer dropped: " + traceback.format_exc(limit=3))
                self.scheduler.silence()
                try:
                    self._end_run(rollback=True)
                except Exception:
                    self.decoder = None
                time.sleep(0.05)

    def _engine_tick(self) -> None:
        try:
            self._engine_work()
        finally:
            start, _, end = self.engine.window()
            self.context = (len(self.engine), end - start)  # one reference: snapshot() reads it whole

    def _engine_work(self) -> None:
        wait = IDLE_WAIT_S if self.settings.mode != "listen" else 0.05
        try:
            command = self.commands.get(timeout=wait)
        except queue.Empty:
            command = None
        while command is not None:
            self._command(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                command = None
        if self.stopping.is_set():
            return
        self._commit_played()
        self._follow_grid(time.monotonic())
        if self.paused or self.transport_stopped:
            return
        now = time.monotonic()
        mode = self.settings.mode
        if self.speculation is not None and now >= self.speculation.start_at:
            self.speculation = None  # the threshold passed: a real answer now
        if self.decoder is None:
            with self.lock:
                keys_up = not self.held and not self.pedal_down
            silent_for = now - self.last_activity
            threshold = self.settings.silence_ms / 1000
            # an answer is sampled this far ahead, as any run, but not from the first half of a silence:
            # with a look-ahead longer than that, every short gap between notes would start one
            early = min(self.settings.lookahead_ms, self.settings.silence_ms / 2) / 1000
            if mode == "duet" and len(self.engine) > 0:
                self._start_run(now, None)
            elif mode == "call" and self.call_pending and keys_up and silent_for >= threshold - early:
                due = self._answer_due(self.last_activity + threshold)  # the threshold, or Link's next beat/bar
                start_at = max(now, due)
                with self.lock:
                    self.pending_answer_start = due
                early_start = start_at > now
                if early_start:
                    ahead = Speculation.capture(start_at, self.engine, self.encoder, self.encoder_time)
                self._start_run(start_at, start_at + self.settings.response_seconds)
                if early_start and self.decoder is not None:
                    self.speculation = ahead
        if self.decoder is not None and self.schedule_refused_at is not None:
            # a silence() with no rollback command behind it: do not sample into the void
            if now - self.schedule_refused_at > 0.05:
                self._end_run(rollback=True, keep_sounding=mode == "duet")
            return
        if self.decoder is not None:
            self._sample_ahead(now)

    def _command(self, command: tuple) -> None:
        name = command[0]
        if name == "player":
            self._absorb_player(command[1])
        elif name == "rollback":
            self._end_run(rollback=True, cut_at=command[1], tag=command[2], keep_sounding=command[3], keep_call=True)
        elif name == "settings":
            self._apply_settings(command[1], command[2])
        elif name == "pause":
            self.paused = command[1]
            if self.paused:
                self.scheduler.silence()
                self._end_run(rollback=True)
        elif name == "transport":
            running, source = command[1], command[3]
            self.transport_stopped = not running
            self.stopped_by = None if running else source
            if self.transport_stopped:
                self._end_run(rollback=True)
            self.info("transport " + ("start" if running else "stop") + (" (link)" if source == LINK else ""))
        elif name == "link released":
            if self.transport_stopped and self.stopped_by == LINK:
                self.transport_stopped, self.stopped_by = False, None
                self.info("transport start (link no longer followed)")
        elif name == "reset":
            self.scheduler.silence(reset_tags=True)
            self.speculation = None
            self.decoder = None
            self.carry = set()
            self.engine.reset()
            self.encoder = StreamEncoder()
            self.encoder_time = 0.0
            self.t0 = time.monotonic()
            self.committed = 0
            self.call_pending = False
            self.info("context reset")
        elif name == "stop":
            self.scheduler.silence()
            self.decoder = None

    def _absorb_player(self, event: tuple) -> None:
        kind, when = event[0], event[1]
        if self.decoder is not None or len(self.engine) > self.committed:
            # the player's tokens go in at their true time: unplayed look-ahead must go first
            duet = self.settings.mode == "duet"
            tag, _ = self.scheduler.silence(notes_off=not duet)
            self._end_run(rollback=True, cut_at=when, tag=tag, keep_sounding=duet, keep_call=True)
        t = self._rel(when)
        if kind == "pedal":
            tokens = self.encoder.pedal(t, event[2], voice=event[3])
        elif kind == "note_on":
            tokens = self.encoder.note_on(t, event[2], event[4], voice=event[3])
            self.call_pending = True
        else:
            tokens = self.encoder.note_off(t, event[2], voice=event[3])
        self.engine.append(tokens)
        self.committed = len(self.engine)
        with self.lock:
            self.reactions.append(time.monotonic() - when)

    def _apply_settings(self, settings: Settings, changed: tuple) -> None:
        if "mode" in changed or "model" in changed:
            self.scheduler.silence()
            self._end_run(rollback=True)
        if "model" in changed and settings.model is not None:
            old = self.engine
            self.model = self._load_model(settings.model)
            self.engine = self._new_engine(self.model, settings)
            keep = self.model.config.max_prefix_len
            self.engine.append(old.tokens[-keep:], sampled=old.sampled[-keep:])  # whose notes they were
            self.committed = len(self.engine)
            self.scheduler.silence(reset_tags=True)
            self.info(f"model {settings.model} loaded")
            return
        cap = settings.prefix_cap or self.model.config.max_prefix_len
        try:
            self.engine.configure(
                num_latents=settings.num_latents,
                prefix_cap=min(cap, self.model.config.max_prefix_len),
                sampling=settings.sampling_settings(),
                constraints=settings.engine_constraints(),
                adapt=settings.adapt,
            )
        except ValueError as error:
            self.warn(f"settings not applied to the engine: {error}")

    # ------------------------------------------------------------------ runs: sampling, commit, rollback

    def _start_run(self, now: float, end: float | None) -> None:
        """Begin sampling: the stream is completed with the silence up to now."""
        self.engine.append(self.encoder.advance(self._rel(now)))
        self.committed = len(self.engine)
        if len(self.engine) == 0:
            return
        self.decoder = StreamDecoder()
        self.decoder.time = self.encoder.clock
        self.decoder.velocity = _stream_velocity(self.engine.tokens)
        self.run_tokens_start = self.committed
        self.answer_end = None if end is None else end - self.t0
        self.call_pending = False
        self.run_steps = 0
        self.answer_sounded = False
        self.starting: set[int] = set()
        self.quant_shift.clear()
        self.epoch = self.scheduler.epoch
        self.schedule_refused_at = None

    def _sample_ahead(self, now: float) -> None:
        settings = self.settings
        horizon = now - self.t0 + settings.lookahead_ms / 1000
        for _ in range(SAMPLE_BATCH):
            decoder = self.decoder
            if decoder is None or decoder.time >= horizon:
                return
            if self.answer_end is not None and decoder.time >= self.answer_end:
                self._finish_answer()
                return
            if self.stopping.is_set() or not self.commands.empty():
                return
            started = time.perf_counter()
            token = self.engine.step(forbid=self._opening_forbid(settings))
            self.run_steps += 1
            elapsed = time.perf_counter() - started
            before = decoder.time
            events = decoder.feed(token)
            self._follow_starting(token)
            if self.carry:
                events = self._carry_off(token, events, decoder.time)
            with self.lock:
                self.step_times.append(elapsed)
                self.sample_seconds += elapsed
                self.music_seconds += decoder.time - before
            if events:
                self.answer_sounded = self.answer_sounded or any(e.kind == "note_on" for e in events)
                # a note-on is released by the time shift after it: it belongs before that token
                tag = len(self.engine) - (1 if vocab.event_type(token) == "time_shift" else 0)
                if not self._schedule(events, tag):
                    return

    def _opening_forbid(self, settings: Settings) -> tuple[range, ...]:
        """What a call's answer may not sample yet: it opens with a note that sounds (OPENING_FORBID)."""
        if self.answer_end is None or self.answer_sounded or self.starting:
            return ()
        last = self.engine.tokens[-1] if self.run_steps else None
        after_velocity = last is not None and vocab.event_type(last) == "velocity"
        low = min(127, max(0, settings.pitch_low - settings.transpose))
        high = max(-1, min(127, settings.pitch_high - settings.transpose))
        silent_pitches = (range(0, low), range(high + 1, vocab.NOTE_OFF)) if low <= high else ()
        return (AFTER_VELOCITY_FORBID if after_velocity else OPENING_FORBID, *silent_pitches)

    def _follow_starting(self, token: int) -> None:
        """Note-ons sampled but not yet released by a time shift (the decoder holds them until then)."""
        kind = vocab.event_type(token)
        if kind == "note_on":
            self.starting.add(token)
        elif kind == "note_off":
            self.starting.discard(token - vocab.NOTE_OFF)
        elif kind == "time_shift":
            self.starting.clear()

    def _carry_off(self, token: int, events: list, now: float) -> list:
        """A note ringing on from before the rollback ends when the model plays its note-off."""
        if vocab.event_type(token) == "note_on":
            self.carry.discard(token)  # a new note of that pitch replaces it (the scheduler retriggers)
        elif vocab.event_type(token) == "note_off" and token - vocab.NOTE_OFF in self.carry:
            pitch = token - vocab.NOTE_OFF
            self.carry.discard(pitch)
            if not any(event.pitch == pitch for event in events):
                events = [*events, TimedEvent("note_off", now, pitch, 0)]
        return events

    def _schedule(self, events, tag: int) -> bool:
        settings = self.settings
        now = time.monotonic()
        notes = []
        # an answer sampled ahead plays nothing before the threshold (the stream's clock moves in 10 ms steps)
        not_before = self.speculation.start_at if self.speculation is not None else 0.0
        for event in events:
            when = max(self.t0 + event.time, not_before)
            if event.kind == "note_on":
                shifted = self._quantize(when, settings.quantize, max(now, not_before))
                self.quant_shift[event.pitch] = shifted - when
                when = shifted
            else:
                when += self.quant_shift.pop(event.pitch, 0.0)
            notes.append(OutNote(when, on=event.kind == "note_on", pitch=event.pitch, velocity=event.velocity, tag=tag))
        if not self.scheduler.schedule(notes, self.epoch):
            self.schedule_refused_at = time.monotonic()  # a barge-in came first: its rollback is queued
            return False
        return True

    def _quantize(self, when: float, grid: str, not_before: float) -> float:
        """A note-on's time on the quantise grid of the clock source (Link's, the MIDI clock's or free)."""
        if grid in GRID_BEATS and self.grid is not None and self._time_source(not_before)[0] == LINK:
            return self.grid.quantize(when, GRID_BEATS[grid], not_before)
        return self.clock.quantize(when, grid, not_before, self.t0)

    def _answer_due(self, threshold_at: float) -> float:
        """Call mode: when the answer starts. At the silence threshold, or with Link timing the session
        and `answer_on` beat or bar, on the first beat or bar line of the shared grid from then on."""
        settings = self.settings
        every = {"beat": 1, "bar": settings.link_quantum}.get(settings.answer_on)
        if every is None or self.grid is None or self._time_source(threshold_at)[0] != LINK:
            return threshold_at
        return self.grid.next_boundary(threshold_at, every)

    def _follow_grid(self, now: float) -> None:
        """Take Link's latest grid; if a peer moved it (a new tempo, a forced beat), what is planned on
        the old grid (the look-ahead, an answer waiting for its beat) moves to the same beats on the
        new one, so a tempo change takes effect at once instead of after the look-ahead."""
        link = self.link
        new = link.timeline if link is not None and self.settings.link else None
        old, self.grid = self.grid, new
        if old is None or new is None or new is old or not _grid_moved(old, new, now):
            return
        if self.speculation is not None and self.settings.answer_on != "threshold":
            self.speculation.start_at = max(now, new.time_at(old.beat_at(self.speculation.start_at)))
            with self.lock:
                self.pending_answer_start = self.speculation.start_at
        if self.scheduler.epoch != self.epoch or not self.scheduler.pending_count():
            return  # nothing planned, or a barge-in's silence() came first: its rollback decides
        _, planned = self.scheduler.silence(notes_off=False)
        if self.scheduler.epoch != self.epoch + 1:
            return  # another silence() came in between: it wins, the notes stay dropped
        self.epoch = self.scheduler.epoch
        for note in planned:
            note.time = max(now, new.time_at(old.beat_at(note.time)))
        self.scheduler.schedule(planned, self.epoch)

    def _finish_answer(self) -> None:
        """Call mode: the answer is long enough; close its open notes and stop sampling."""
        decoder = self.decoder
        closing = decoder.close()
        closing += [TimedEvent("note_off", decoder.time, pitch, 0) for pitch in sorted(self.carry)]
        self.carry = set()
        tokens = [vocab.note_off(e.pitch) for e in closing]
        self.engine.append(tokens)
        self._schedule(closing, len(self.engine))
        self.decoder = None

    def _commit_played(self) -> None:
        """Merge the sampled tokens whose events were sent into the encoder's stream state."""
        tag = min(self.scheduler.played_tag(), len(self.engine))
        if tag > self.committed:
            self.encoder.absorb_model_tokens(self.engine.tokens[self.committed : tag])
            self.committed = tag

    def _end_run(
        self,
        rollback: bool,
        cut_at: float | None = None,
        tag: int | None = None,
        keep_sounding: bool = False,
        keep_call: bool = False,
    ) -> None:
        """Stop sampling: keep what was played, drop the rest (rollback), and either close the model's
        cut notes in the context at `cut_at` (their sound was stopped by scheduler.silence()) or, with
        `keep_sounding` (duet), let them ring on as `carry` until the model's own note-off comes.
        `keep_call`: the player's input ended it, so an answer sampled ahead is still owed (see
        Speculation); a pause, panic, mode switch or engine error drops it."""
        if self.speculation is not None:
            tag, _ = self.scheduler.silence()
            if tag <= self.run_tokens_start:  # nothing of it sounded: as if it had never been sampled
                self._abandon_speculation(keep_call)
                return
            self.speculation = None  # its first notes went out as the player came in: cut it as usual
        if rollback:
            # again here, in the engine thread: events planned after the barge-in's silence() (in its
            # new epoch, before its command arrived) must not play; the tag is the highest one sent
            tag, _ = self.scheduler.silence(notes_off=not keep_sounding)
        elif tag is None:
            tag = self.scheduler.played_tag()
        keep = max(self.committed, min(tag, len(self.engine)))
        if keep > self.committed:
            self.encoder.absorb_model_tokens(self.engine.tokens[self.committed : keep])
        if rollback and keep < len(self.engine):
            self.rolled_back += len(self.engine) - keep
            self.engine.truncate(keep)
        self.committed = len(self.engine)
        # model notes that sounded in the kept part but whose note-off was dropped
        run = slice(self.run_tokens_start, self.committed)
        open_notes = _open_model_notes(self.engine.tokens[run], self.engine.sampled[run], self.carry)
        self.carry = set(open_notes) if keep_sounding else set()
        if open_notes and not keep_sounding:
            at = self._rel(cut_at if cut_at is not None else time.monotonic())
            tokens = time_shift_tokens(max(0.0, at - self.encoder.clock))
            tokens += [vocab.note_off(pitch) for pitch in open_notes]
            self.engine.append(tokens)
            self.encoder.absorb_model_tokens(tokens)
            self.committed = len(self.engine)
        self.decoder = None
        self.schedule_refused_at = None
        self.run_tokens_start = self.committed

    def _abandon_speculation(self, keep_call: bool) -> None:
        """Drop an answer sampled ahead, and the silence written for it, before any of it sounded."""
        speculation, self.speculation = self.speculation, None
        self.rolled_back += len(self.engine) - self.run_tokens_start  # sampled tokens only
        self.encoder, self.encoder_time = speculation.restore(self.engine)
        self.committed = self.run_tokens_start = speculation.length
        self.decoder = None
        self.schedule_refused_at = None
        self.carry = set()
        self.call_pending = keep_call
        with self.lock:
            self.pending_answer_start = None


def _grid_moved(old: LinkTimeline, new: LinkTimeline, now: float) -> bool:
    """The new Link timeline puts the beats elsewhere (tempo, or phase by over a millisecond)."""
    return abs(new.bpm - old.bpm) > 1e-6 or abs(new.beat_at(now) - old.beat_at(now)) * 60.0 / new.bpm > 0.001


def _stream_velocity(tokens: list[int]) -> int:
    """The velocity a note-on gets at the end of `tokens`: that of the latest velocity token, as the
    reference decoder carries it over the whole stream (a run's decoder starting at 0 played the
    model's opening note-ons at velocity 1 when it sampled no velocity token first)."""
    for token in reversed(tokens):
        if vocab.event_type(token) == "velocity":
            return (token - vocab.VELOCITY) * 4
    return 0


def _open_model_notes(tokens: list[int], sampled: bytes | list[int], already_open=()) -> list[int]:
    """Model pitches sounding after `tokens`: `already_open` ones and sampled note-ons, less those
    turned off. Only sampled note-ons count: a player's note-on in the range (a barge-in comes with
    every note-on in call mode) is the player's, and closing it here wrote a second note-off of the
    player's note into the context."""
    sounding: dict[int, bool] = dict.fromkeys(already_open, True)
    for token, flag in zip(tokens, sampled, strict=True):
        if token < vocab.NOTE_OFF:
            if flag:
                sounding[token] = True
        elif token < vocab.TIME_SHIFT:
            sounding.pop(token - vocab.NOTE_OFF, None)
    return list(sounding)


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


# --------------------------------------------------------------------------- `liveperceiver play`


def settings_from_args(args) -> Settings:
    """The preset (or the defaults) with the command-line flags that were given on top."""
    from liveperceiver.live import presets

    settings = presets.load_preset(args.preset, default_model=args.model) if args.preset else Settings()
    in_channel = None
    if args.in_channel is not None:
        in_channel = 0 if args.in_channel == "all" else _int_flag("--in-channel", args.in_channel)
    flags = dict(
        mode=args.mode,
        model=args.model,
        silence_ms=args.silence_ms,
        response_seconds=args.response_seconds,
        temperature=args.temperature,
        top_p=args.top_p,
        num_latents=args.num_latents,
        key_follow=args.key_follow,
        adapt=getattr(args, "adapt", None),
        dynamics_follow=getattr(args, "dynamics_follow", None),
        density_follow=getattr(args, "density_follow", None),
        density_ratio=getattr(args, "density_ratio", None),
        in_channel=in_channel,
        out_channel=args.out_channel,
        link=True if getattr(args, "link", False) else None,
        link_quantum=getattr(args, "link_quantum", None),
    )
    return presets.apply_overrides(settings, **flags)


def _int_flag(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} {text!r} must be a number or 'all'") from None


def _print_new_log_lines(session: Session, shown: int) -> int:
    """Print the log lines added since `shown` lines were printed; returns the new count."""
    lines, total = session.log_since(shown)
    for line in lines:
        print(line, flush=True)
    return total


def run_play(args) -> NoReturn:
    """Open the ports and play until the UI quits or, headless, until SIGINT/SIGTERM; then the one
    way out of a live session: close it (notes off, take saved, JACK ports left open) and exit 0."""
    import signal

    settings = settings_from_args(args)
    session = Session(
        settings,
        model=settings.model,
        api=args.midi_api,
        in_port=args.in_port,
        out_port=args.out_port,
        session_dir=args.session_dir,
        record_path=args.record,
        device=args.device,
        weights=args.weights,
        dtype=args.dtype,
        link_tempo=getattr(args, "link_tempo", None),
    )
    try:
        if args.headless:
            done = threading.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: done.set())
            session.start()
            print(
                f"LivePerceiver {settings.mode}: in {session.midi_in.name!r}, out {session.midi_out.name!r}", flush=True
            )
            print(f"journal: {session.recorder.path}  (Ctrl-C to stop and save)", flush=True)
            shown = 0  # headless, the session's log goes to stdout (port lost, model errors, ...)
            while not done.wait(0.05):
                shown = _print_new_log_lines(session, shown)
        else:
            from liveperceiver.ui import run_ui  # the Textual UI drives this same session

            session.start()
            run_ui(session)  # its quit closes the session the same way (Session.close's default)
    finally:
        saved = session.close()
    if saved:
        print(f"saved {saved}", flush=True)
    exit_now()
