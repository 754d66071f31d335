"""A live session: ports -> input filter -> engine thread -> scheduler -> ports, plus the recorder.

One object, driven the same way by `play --headless` and by the UI (live/play.py builds it). Public surface:

    session = Session(settings, model=..., api="auto", in_port=None, out_port=None, session_dir=...)
    session.start()
    session.set_mode("duet"); session.update(temperature=1.1); session.update(model="other")
    session.apply_preset("duet")   # a preset's settings, live (the model only if the preset names one)
    session.update(link=True)      # join the Ableton Link session (link_quantum, link_start_stop, answer_on)
    session.panic()
    session.pause(True); session.reset(); session.save(path)
    snap = session.snapshot()      # thread-safe, cheap: for a UI at <= 30 Hz
    session.close()                # stop sampling, all notes off, save; JACK ports left to the exit (< 1 s)

Process-wide settings (torch's threads, the GIL switch interval, the heap freeze, signals, the exit)
belong to the entry point (play.py, runtime.py), never to the session.

Threads and the part each one runs:

- reader thread (input_reader.InputReader, one per input port): polls the port, stamps and queues raw bytes.
- input thread (input_filter.InputFilter): filters (channel, echoes of our own notes), MIDI clock,
  journals the player, barge-in (`scheduler.silence()` at once, before the engine hears of it), thru;
  hands the player's notes and pedal to the engine thread. Never waits on the model or the disk.
- engine thread (runs.RunController): owns the Engine, the StreamEncoder and the mode logic; absorbs
  the player's tokens, samples ahead of playback by `lookahead_ms`, schedules the decoded notes,
  commits the played part of what it sampled and rolls back (engine.truncate) what was not played.
- scheduler thread (scheduler.Scheduler): the only writer to the output; every note-on gets its
  note-off. Its callback `_on_sent` journals the model's notes, feeds the echo memory and the roll.
- recorder thread: journal flushes.
- libjack's thread of the JACK server watch (on JACK only, jack_server.JackServerWatch): marks the
  server gone when it stops or dies; the output sends nothing from then on, and the input thread
  logs it once, ends the model's notes in the take and pauses the model (`midi_gone()`).
- link thread (only with Link on, link.LinkClock): owns the aalink.Link; publishes its beat grid as
  an immutable LinkTimeline; a peer's start/stop silences the scheduler and queues a Transport
  command, as a MIDI Stop/Start does.
- the caller's thread (the UI or play's main thread): the commands below and `snapshot()`
  (snapshot.SnapshotBuilder).

Other threads reach the engine thread only through typed commands (commands.py) on `commands`.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import queue
import threading
import time
from pathlib import Path

from liveperceiver.core.errors import UserError
from liveperceiver.live.clock import ClockTracker
from liveperceiver.live.commands import ApplySettings, Command, LinkReleased, Pause, Reset, Rollback, Stop, Transport
from liveperceiver.live.engine_options import EngineOptions, resolve_model
from liveperceiver.live.input_filter import InputFilter
from liveperceiver.live.jack_server import JackServerWatch
from liveperceiver.live.link import DEFAULT_BPM, LINK, LinkClock, check_tempo, require_aalink
from liveperceiver.live.ports import feedback_loop, open_ports, resolve_api
from liveperceiver.live.recorder import MODEL, Recorder
from liveperceiver.live.runs import RunController
from liveperceiver.live.scheduler import Scheduler
from liveperceiver.live.settings import Settings
from liveperceiver.live.shared import SharedState, Timekeeper
from liveperceiver.live.snapshot import Snapshot, SnapshotBuilder

DELIVERY_WAIT_S = 0.1  # close(): time the backend gets to deliver the final note-offs
JOIN_WAIT_S = 0.5  # close(): time the input and engine threads get to finish


def default_session_dir() -> Path:
    """A new directory for a session, named by when it starts (-2, -3, ... for another started in
    the same second), made here so that no other session takes it."""
    import platformdirs

    sessions = Path(platformdirs.user_data_dir("liveperceiver")) / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for number in itertools.count(1):
        directory = sessions / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            directory.mkdir()
            return directory
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


class Session:
    """See the module docstring. Construct, `start()`, drive, `close()`. Threads: the commands and
    `snapshot()` run on the caller's thread (the UI's, or play's main thread); the parts run their own.

    Who owns which state (every attribute more than one thread touches has one owner or one lock):

    - `shared` (SharedState) guards under its `lock` (also `Session.lock`) the player's keys and pedal
      (`held`, `pedal_down`: changed by the input thread, cleared by `panic()` from the UI, read by
      the engine thread and the snapshot), the counters (`notes_in`, `notes_out`, `suppressed`,
      `errors`), the statistics and piano roll (`step_times`, `reactions`, `sample_seconds`,
      `music_seconds`, `roll`, `answer_starts`, `pending_answer_start`) and the log (`log_lines`,
      `log_count`: any thread logs).
    - `input_filter.echoes` (EchoMemory) has a lock of its own: the scheduler thread writes, the
      input thread reads.
    - The input thread owns `input_filter` (its port check, tempo log and clock-source state) and
      writes its `last_activity` (a float the engine thread only reads). `timekeeper.clock` is fed
      by it and read by the others (ClockTracker's reads copy its state once; its docstring says
      why that suffices).
    - `link` (`timekeeper.link`, a LinkClock, None until Link is first turned on) is set once, by
      `__init__` or by `update()` under `link_lock`, and never replaced; its Link object belongs to
      its own thread, and the others read its `timeline`, an immutable value swapped whole.
    - The engine thread owns `runs` (RunController: the engine, the encoder, the decoder, the run
      state `speculation`, `carry`, `committed`, ..., `grid`, `stopped_by`, `t0`) and publishes
      `runs.context`, the (tokens, window), whole for the snapshot, which reads `runs.decoder`,
      `runs.speculation`, `runs.paused` and `runs.transport_stopped` as plain references.
    - `settings` is an immutable Settings replaced whole by the caller of `update()` (the UI); the
      parts read the reference (each holds a getter of it) and the engine thread hears of a change
      through `commands` (ApplySettings).
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
        self.shared = SharedState()  # the state under one lock (the class docstring)
        self.api = resolve_api(api)
        # JACK's server can stop or die under a session, and its ports never tell (jack_server.JackServerWatch)
        self.jack_server = JackServerWatch() if self.api == "jack" else None
        if self.jack_server is not None and not self.jack_server.watching:
            self.warn(
                "the JACK server is not watched (libjack would not open a client): if it stops, nothing will say so"
            )
        # ports first: a wrong port name is reported before a slow model load
        try:
            self.midi_in, self.midi_out = open_ports(
                self.api, in_port, out_port, log=self.warn, server=self.jack_server
            )
        except BaseException:
            self._close_jack_server()
            raise
        loop = feedback_loop(self.midi_in, self.midi_out)
        if loop is not None and loop[1]:
            self._close_ports()
            raise UserError(loop[0])
        if loop is not None:
            self.warn(loop[0])
        engine_options = EngineOptions(device=device, weights=weights, dtype=dtype)
        try:
            self.midi_out.ensure_delivery()
            loaded = resolve_model(model if model is not None else settings.model)
            engine = engine_options.build(loaded, settings)
        except BaseException:
            self._close_ports()
            raise
        measured = " (measured the faster here)" if weights == "auto" and engine.device.type == "cpu" else ""
        self.info(f"engine: {engine.device.type}, {engine.precision}{measured}")
        t0 = time.monotonic()
        try:
            self.recorder = Recorder(session_dir or default_session_dir(), origin=t0, warn=self.warn)
        except OSError as error:
            self._close_ports()
            where = session_dir or "the default session directory"
            raise UserError(f"{where}: cannot write the session journal ({error.strerror or error})") from None
        except UserError:  # the directory is another session's
            self._close_ports()
            raise
        self.record_path = Path(record_path) if record_path else None
        self.scheduler = Scheduler(
            self.midi_out.send, settings, on_sent=self._on_sent, log=self.warn, on_wake=self.midi_out.catch_up
        )
        self.timekeeper = Timekeeper(ClockTracker(), self._current_settings)
        self.commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.closed = False
        self.saved_path: Path | None = None  # the take's MIDI file, once close() saved it
        self.close_warnings: list[str] = []  # what close() could not do (a file not written)
        self.input_filter = InputFilter(
            self._current_settings,
            self.scheduler,
            self.recorder,
            self.shared,
            self.timekeeper,
            self.commands,
            jack_server=self.jack_server,
        )
        self.runs = RunController(
            loaded,
            engine,
            engine_options,
            output=self.scheduler,
            settings=self._current_settings,
            shared=self.shared,
            timekeeper=self.timekeeper,
            last_activity=self._last_activity,
            commands=self.commands,
            stopping=self.stopping,
            t0=t0,
        )
        self.snapshots = SnapshotBuilder(
            self._current_settings,
            self.shared,
            self.runs,
            self.scheduler,
            self.timekeeper,
            self.recorder,
            (self.midi_in, self.midi_out),
            self.api,
        )
        self.threads = [
            threading.Thread(
                target=self.input_filter.listen,
                args=(self.midi_in, self.midi_out, self.stopping),
                name="lp-input",
                daemon=True,
            ),
            threading.Thread(target=self.runs.run, name="lp-engine", daemon=True),
        ]
        # Ableton Link (see the class docstring for who owns what)
        self.link_lock = threading.Lock()  # creating the LinkClock (update() may run on two threads)
        self.link_tempo = link_tempo
        if settings.link:
            try:
                self.timekeeper.link = self._new_link(settings)
            except BaseException:
                with contextlib.suppress(OSError):  # the link's error is the one to tell
                    self.recorder.close()
                self._close_ports()
                raise

    # ------------------------------------------------------------------ the parts, for tests and the bench

    @property
    def lock(self) -> threading.Lock:
        """The shared state's lock (SharedState.lock)."""
        return self.shared.lock

    @property
    def roll(self):
        """The piano roll's events (SharedState.roll): read under `lock`."""
        return self.shared.roll

    @property
    def link(self) -> LinkClock | None:
        return self.timekeeper.link

    @property
    def engine(self):
        """The engine thread's engine (replaced when the model changes): read, never drive, elsewhere."""
        return self.runs.engine

    @property
    def model(self):
        return self.runs.model

    def _current_settings(self) -> Settings:
        return self.settings

    def _last_activity(self) -> float:
        return self.input_filter.last_activity

    # ------------------------------------------------------------------ public commands

    def start(self) -> None:
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
                if self.timekeeper.link is None:  # join now, before anything changes: a failure leaves all as it was
                    try:
                        self.timekeeper.link, joined = self._new_link(new), True
                    except UserError as error:
                        raise ValueError(str(error)) from None
        self.settings = new
        self.scheduler.settings = new
        changed = tuple(name for name in changes if getattr(old, name) != getattr(new, name))
        if {"link", "link_quantum", "link_start_stop"} & set(changed) and not joined:
            self._apply_link(old, new)
        self.commands.put(ApplySettings(new, changed))
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
        link = self.timekeeper.link
        if link is None:
            return
        if (old.link_quantum, old.link_start_stop) != (new.link_quantum, new.link_start_stop):
            link.configure(new.link_quantum, new.link_start_stop)
        if old.link != new.link:
            link.set_enabled(new.link)
            self.info("link: on" if new.link else "link: off")
        if not (new.link and new.link_start_stop):
            self.commands.put(LinkReleased())  # a stop that came from Link no longer holds

    def _link_transport(self, playing: bool, when: float) -> None:
        """The Link thread: a peer started or stopped the session's transport (start/stop sync)."""
        settings = self.settings
        if not (settings.link and settings.link_start_stop):
            return
        if not playing:
            self.scheduler.silence()  # every model note off now, as a MIDI Stop does
        self.commands.put(Transport(running=playing, when=when, source=LINK))

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
        with self.shared.lock:
            self.shared.held.clear()
            self.shared.pedal_down = False
        self.scheduler.panic()
        self.commands.put(Rollback(cut_at=time.monotonic(), tag=None, keep_sounding=False))

    def pause(self, paused: bool = True) -> None:
        self.commands.put(Pause(paused))

    def reset(self) -> None:
        """Forget the context (the recording goes on)."""
        self.commands.put(Reset())

    def save(self, path: str | Path | None = None) -> Path:
        """Write the session's MIDI file now (the journal keeps growing)."""
        return self.recorder.save(path)

    def close(self, release_ports: bool = False) -> Path | None:
        """Stop sampling, all notes off, save, stop using the ports. Safe to call twice.

        By default JACK ports are left to the process's exit, which must follow (see play.run_play):
        unregistering a JACK port can crash the process (ports._Port.close). Only a process that
        runs more sessions after this one (the tests, `bench --live`) passes `release_ports=True`."""
        if self.closed:
            return self.saved_path
        self.closed = True
        self.stopping.set()
        self.commands.put(Stop())
        deadline = time.monotonic() + JOIN_WAIT_S
        for thread in self.threads:
            if thread is not threading.current_thread() and thread.ident is not None:  # started
                thread.join(max(0.0, deadline - time.monotonic()))
        self.scheduler.close()
        if self.timekeeper.link is not None:
            self.timekeeper.link.close()  # leave the Link session (its peers see one peer fewer)
        last_sent = time.monotonic()
        saved = None
        try:
            # session.mid first, beside the journal; then --record's file, whose failure keeps neither
            # from being written (each failure a warning in the log, which play prints after this)
            written, failures = self.recorder.save_all([None, self.record_path] if self.record_path else [None])
            for failure in failures:
                self._close_warning(failure)
            if written:
                saved = self.saved_path = written[-1]  # --record's file when it was written
        finally:
            # the last note-offs must leave before the port goes: JACK sends them in its next process
            # cycle, which a starved machine can delay by tens of milliseconds (saving overlaps this)
            time.sleep(max(0.0, last_sent + DELIVERY_WAIT_S - time.monotonic()))
            try:
                self.recorder.close()
            except OSError as error:
                self._close_warning(
                    f"{self.recorder.path}: the journal could not be finished ({error.strerror or error})"
                )
            finally:
                self._close_ports(release_ports)
        return saved

    def _close_warning(self, line: str) -> None:
        """A warning while closing (a file not written): in the log, and in `close_warnings` for the
        entry point to print once the UI is gone."""
        self.close_warnings.append(line)
        self.warn(line)

    def _close_ports(self, release_ports: bool = True) -> None:
        """Stop using the ports, then the watch of their JACK server. JACK ports and the watch are
        left to the process's exit when `release_ports` is False (close and
        JackServerWatch.leave_to_exit say why); a session that fails while it is built releases
        them, as a port's own close does by default."""
        try:
            self.midi_in.close(release_ports)
            self.midi_out.close(release_ports)
        finally:
            self._close_jack_server(release_ports)

    def _close_jack_server(self, release: bool = True) -> None:
        if self.jack_server is None:
            return
        if release:
            self.jack_server.close()
        else:
            self.jack_server.leave_to_exit()

    def midi_gone(self) -> str | None:
        """The log line that said the session's MIDI system went away (the JACK server stopped or
        died), once the input thread has logged it; None while it is there. Headless play then
        saves and exits; the UI keeps the line in its log."""
        return self.input_filter.midi_gone

    def snapshot(self) -> Snapshot:
        return self.snapshots.build()

    # ------------------------------------------------------------------ logging

    def info(self, message: str) -> None:
        self.shared.info(message)

    def warn(self, message: str) -> None:
        self.shared.warn(message)

    def log_since(self, shown: int) -> tuple[list[str], int]:
        """The log lines added since `shown` lines were logged (those still kept), and the new count."""
        return self.shared.log_since(shown)

    # ------------------------------------------------------------------ scheduler callback

    def _on_sent(self, when: float, message: list[int], model: bool) -> None:
        """Runs on the scheduler thread for every message sent: journal, echo memory, roll."""
        status = message[0] & 0xF0
        is_note = status in (0x80, 0x90) and len(message) == 3
        is_on = is_note and status == 0x90 and message[2] > 0
        if is_note:
            self.input_filter.echoes.sent(when, is_on, message[0] & 0x0F, message[1], message[2])
        if not model:
            return  # thru: the player's own notes, already journaled as the player's
        self.recorder.record(MODEL, when, message)
        if is_note:
            self.shared.model_sent(when, is_on, message[1])
