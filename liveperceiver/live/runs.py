"""The engine thread: the run controller, a state machine over the engine's one token stream.

A run is one stretch of sampling: a call's answer (once the player has been silent for `silence_ms`)
or the model playing along (duet). The controller absorbs the player's tokens, samples ahead of
playback by `lookahead_ms` and schedules the decoded notes. Sampled tokens are speculative until the
scheduler has sent their events: only then are they committed (merged into the encoder's stream
state); when a run ends (barge-in, pause, mode switch) the rest is rolled back (`engine.truncate`)
and the model's cut notes are closed in the context, or in duet left ringing (`carry`).

The timeline: the encoder works in seconds since `t0` (reset by a Reset command); the scheduler in
monotonic seconds (`clock`). Other threads reach the controller only through typed commands
(commands.py) on its queue.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from liveperceiver.core import vocab
from liveperceiver.core.stream import StreamDecoder, StreamEncoder, TimedEvent
from liveperceiver.core.tokenizer import time_shift_tokens
from liveperceiver.live.clock import GRID_BEATS
from liveperceiver.live.commands import (
    ApplySettings,
    Command,
    LinkReleased,
    Pause,
    PlayerEvent,
    PlayerNoteOff,
    PlayerNoteOn,
    PlayerPedal,
    Reset,
    Rollback,
    Stop,
    Transport,
)
from liveperceiver.live.engine_options import EngineOptions, resolve_model
from liveperceiver.live.link import LINK, LinkTimeline
from liveperceiver.live.scheduler import OutNote
from liveperceiver.live.settings import Settings
from liveperceiver.live.shared import SharedState, Timekeeper
from liveperceiver.live.speculation import Speculation

if TYPE_CHECKING:
    from liveperceiver.core.model import PerceiverAR
    from liveperceiver.inference.engine import Engine

# A call's answer begins with sound: until its first note-on only velocity tokens and note-ons the
# output plays (pitch range) may be sampled (a random model otherwise opened with time shifts and
# answered 1.9 s after the threshold), and after a velocity only such a note-on.
OPENING_FORBID = range(vocab.NOTE_OFF, vocab.VELOCITY)  # note-offs and time shifts (pad is never sampled)
AFTER_VELOCITY_FORBID = range(vocab.NOTE_OFF, vocab.PAD + 1)  # everything but note-ons

IDLE_WAIT_S = 0.005  # the engine thread's poll while waiting for silence or look-ahead room
LISTEN_WAIT_S = 0.05  # its poll in listen mode (nothing to sample)
ERROR_PAUSE_S = 0.05  # after an engine error, before the next try
REFUSED_GRACE_S = 0.05  # a refused schedule() with no rollback command behind it ends the run after this
SAMPLE_BATCH = 4  # tokens sampled between looks at the command queue


class Output(Protocol):
    """What the run controller asks of the scheduler (scheduler.Scheduler; its docstrings say more)."""

    epoch: int

    def schedule(self, notes: list[OutNote], epoch: int | None = None) -> bool: ...

    def silence(self, reset_tags: bool = False, notes_off: bool = True) -> tuple[int, list[OutNote]]: ...

    def played_tag(self) -> int: ...

    def pending_count(self) -> int: ...


class RunController:
    """The engine thread's state machine: `run` is the thread's loop, `tick` one pass of it.

    Threads: owned by the engine thread. It alone touches the engine, the encoder, the decoder, the
    run state (`speculation`, `carry`, `committed`, ...), `grid` (the Link timeline its plans are
    made on), `stopped_by` and `t0`. Other threads reach it through `commands` only, and read as
    plain references: `context`, the (tokens, window) it publishes whole after every pass, and
    `decoder`, `speculation`, `paused`, `transport_stopped` (the snapshot's state line). Statistics
    go to `shared` under its lock."""

    def __init__(
        self,
        model: PerceiverAR,
        engine: Engine,
        engine_options: EngineOptions,
        output: Output,
        settings: Callable[[], Settings],
        shared: SharedState,
        timekeeper: Timekeeper,
        last_activity: Callable[[], float],
        commands: queue.SimpleQueue[Command],
        stopping: threading.Event,
        t0: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.engine = engine
        self.engine_options = engine_options
        self.output = output
        self._settings = settings  # the session's current settings (replaced whole by Session.update)
        self.shared = shared
        self.timekeeper = timekeeper
        self.last_activity = last_activity  # when the player last played (written by the input thread)
        self.commands = commands
        self.stopping = stopping
        self.clock = clock  # monotonic seconds, the scheduler's timeline
        self.t0 = t0  # the encoder's time 0 on that timeline
        self.encoder = StreamEncoder()
        self.encoder_time = 0.0  # the latest time given to the encoder (its inputs must not go back)
        self.committed = len(engine)
        start, _, end = engine.window()
        self.context = (len(engine), end - start)  # (tokens, window), published whole for the snapshot
        self.cache_weight: float | None = None  # the session cache's learnt weight now (None: adaptation off)
        self.decoder: StreamDecoder | None = None  # not None while a run samples
        self.run_tokens_start = 0
        self.answer_end: float | None = None  # call mode: the answer's end in encoder seconds
        self.call_pending = False  # the player played since the last answer: the next silence is answered
        self.paused = False
        self.transport_stopped = False
        self.stopped_by: str | None = None  # what stopped the transport ("link", "midi clock")
        self.quant_shift: dict[int, float] = {}  # pitch -> how far its note-on moved onto the grid
        self.epoch = 0  # the scheduler epoch this run plans in (a barge-in makes it stale)
        self.run_steps = 0
        self.answer_sounded = False  # a note-on was released in this run
        self.starting: set[int] = set()  # note-ons sampled, waiting for the time shift that releases them
        self.carry: set[int] = set()  # duet: model notes ringing on past a rollback (their off was dropped)
        # the carry as this run began: a rollback recounts from it, since the carry loses a pitch when its
        # note-off is SAMPLED, and a rollback can take that note-off back before it plays
        self.run_carry: frozenset[int] = frozenset()
        self.schedule_refused_at: float | None = None
        self.speculation: Speculation | None = None  # a call's answer sampled before the threshold
        self.rolled_back = 0  # sampled tokens dropped unplayed (barge-ins, switches)
        self.grid: LinkTimeline | None = None  # the Link grid planned notes are on

    @property
    def settings(self) -> Settings:
        return self._settings()

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """The engine thread until the session stops; an error costs the answer, never the thread."""
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:
                self.shared.count_error()
                self.shared.warn("engine error, notes off and answer dropped: " + traceback.format_exc(limit=3))
                self.output.silence()
                try:
                    self._end_run(rollback=True)
                except Exception:
                    self.decoder = None
                time.sleep(ERROR_PAUSE_S)

    def tick(self) -> None:
        """One pass: the queued commands, the commit of what was played, then start or go on sampling."""
        try:
            self._work()
        finally:
            engine = self.engine
            start, _, end = engine.window()
            self.context = (len(engine), end - start)  # one reference: the snapshot reads it whole
            self.cache_weight = engine.adapt * engine.cache_weight.fraction if engine.adapt else None

    def _work(self) -> None:
        wait = IDLE_WAIT_S if self.settings.mode != "listen" else LISTEN_WAIT_S
        try:
            command = self.commands.get(timeout=wait)
        except queue.Empty:
            command = None
        while command is not None:
            self.handle(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                command = None
        if self.stopping.is_set():
            return
        self._commit_played()
        self._follow_grid(self.clock())
        if self.paused or self.transport_stopped:
            return
        now = self.clock()
        mode = self.settings.mode
        if self.speculation is not None and now >= self.speculation.start_at:
            self.speculation = None  # the threshold passed: a real answer now
        if self.decoder is None:
            self._maybe_start(now, mode)
        if self.decoder is not None and self.schedule_refused_at is not None:
            # a silence() with no rollback command behind it: do not sample into the void
            if now - self.schedule_refused_at > REFUSED_GRACE_S:
                self._end_run(rollback=True, keep_sounding=mode == "duet")
            return
        if self.decoder is not None:
            self._sample_ahead(now)
        if self.commands.empty() and (mode != "listen" or self.engine.cache_weight.deferred):
            # nothing due: a latent window's re-anchoring runs now, not when a token is; listening, the
            # rows run only to judge the cache's weight by what the player plays (adapt.CacheWeight)
            self.engine.prepare()

    def _maybe_start(self, now: float, mode: str) -> None:
        """Duet: a run whenever there is a context. Call: an answer once the player has been silent
        (keys and pedal up) for the threshold, sampled up to `lookahead_ms` before it (Speculation)."""
        if mode == "duet" and len(self.engine) > 0:
            self._start_run(now, None)
            return
        if mode != "call" or not self.call_pending or not self.shared.keys_up():
            return
        settings = self.settings
        last_activity = self.last_activity()
        threshold = settings.silence_ms / 1000
        # an answer is sampled this far ahead, as any run, but not from the first half of a silence:
        # with a look-ahead longer than that, every short gap between notes would start one
        early = min(settings.lookahead_ms, settings.silence_ms / 2) / 1000
        if now - last_activity < threshold - early:
            return
        due = self._answer_due(last_activity + threshold)  # the threshold, or Link's next beat/bar
        start_at = max(now, due)
        with self.shared.lock:
            self.shared.pending_answer_start = due
        early_start = start_at > now
        if early_start:
            ahead = Speculation.capture(start_at, self.engine, self.encoder, self.encoder_time)
        self._start_run(start_at, start_at + settings.response_seconds)
        if early_start and self.decoder is not None:
            self.speculation = ahead

    # ------------------------------------------------------------------ commands

    def handle(self, command: Command) -> None:
        """One command from another thread (commands.py)."""
        match command:
            case PlayerNoteOn() | PlayerNoteOff() | PlayerPedal():
                self._absorb_player(command)
            case Rollback(cut_at=cut_at, tag=tag, keep_sounding=keep_sounding):
                self._end_run(rollback=True, cut_at=cut_at, tag=tag, keep_sounding=keep_sounding, keep_call=True)
            case ApplySettings(settings=settings, changed=changed):
                self._apply_settings(settings, changed)
            case Pause(paused=paused):
                self.paused = paused
                if paused:
                    self.output.silence()
                    self._end_run(rollback=True)
            case Transport(running=running, source=source):
                self.transport_stopped = not running
                self.stopped_by = None if running else source
                if self.transport_stopped:
                    self._end_run(rollback=True)
                where = " (link)" if source == LINK else ""
                self.shared.info(f"transport {'start' if running else 'stop'}{where}")
            case LinkReleased():
                if self.transport_stopped and self.stopped_by == LINK:
                    self.transport_stopped, self.stopped_by = False, None
                    self.shared.info("transport start (link no longer followed)")
            case Reset():
                self._reset()
            case Stop():
                self.output.silence()
                self.decoder = None
            case _:
                raise TypeError(f"not an engine command: {command!r}")

    def _reset(self) -> None:
        self.output.silence(reset_tags=True)
        self.speculation = None
        self.decoder = None
        self._set_carry(())
        self.engine.reset()
        self.encoder = StreamEncoder()
        self.encoder_time = 0.0
        self.t0 = self.clock()
        self.committed = 0
        self.call_pending = False
        self.shared.info("context reset")

    def _absorb_player(self, event: PlayerEvent) -> None:
        when = event.when
        if self.decoder is not None or len(self.engine) > self.committed:
            # the player's tokens go in at their true time: unplayed look-ahead must go first
            duet = self.settings.mode == "duet"
            tag, _ = self.output.silence(notes_off=not duet)
            self._end_run(rollback=True, cut_at=when, tag=tag, keep_sounding=duet, keep_call=True)
        t = self._rel(when)
        if isinstance(event, PlayerPedal):
            tokens = self.encoder.pedal(t, event.value, voice=event.channel)
        elif isinstance(event, PlayerNoteOn):
            tokens = self.encoder.note_on(t, event.pitch, event.velocity, voice=event.channel)
            self.call_pending = True
        else:
            tokens = self.encoder.note_off(t, event.pitch, voice=event.channel)
        self.engine.append(tokens)
        self.committed = len(self.engine)
        with self.shared.lock:
            self.shared.reactions.append(self.clock() - when)

    def _apply_settings(self, settings: Settings, changed: tuple[str, ...]) -> None:
        if "mode" in changed or "model" in changed:
            self.output.silence()
            self._end_run(rollback=True)
        if "model" in changed and settings.model is not None:
            old = self.engine
            self.model = resolve_model(settings.model)
            self.engine = self.engine_options.build(self.model, settings)
            keep = self.model.config.max_prefix_len
            self.engine.append(old.tokens[-keep:], sampled=old.sampled[-keep:])  # whose notes they were
            self.committed = len(self.engine)
            self.output.silence(reset_tags=True)
            self.shared.info(f"model {settings.model} loaded")
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
            self.shared.warn(f"settings not applied to the engine: {error}")

    # ------------------------------------------------------------------ runs: sampling, commit, rollback

    def _rel(self, when: float) -> float:
        """Monotonic seconds -> encoder seconds (never before the encoder's latest time)."""
        self.encoder_time = max(when - self.t0, self.encoder_time)
        return self.encoder_time

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
        self.starting = set()
        self.quant_shift.clear()
        self.epoch = self.output.epoch
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
            token = self.engine.step(forbid=self._opening_forbid())
            self.run_steps += 1
            elapsed = time.perf_counter() - started
            before = decoder.time
            events = decoder.feed(token)
            self._follow_starting(token, settings)
            if self.carry:
                events = self._carry_off(token, events, decoder.time)
            with self.shared.lock:
                self.shared.step_times.append(elapsed)
                self.shared.sample_seconds += elapsed
                self.shared.music_seconds += decoder.time - before
            if events:
                self.answer_sounded = self.answer_sounded or any(e.kind == "note_on" for e in events)
                # a note-on is released by the time shift after it: it belongs before that token
                tag = len(self.engine) - (1 if vocab.event_type(token) == "time_shift" else 0)
                if not self._schedule(events, tag):
                    return

    def _opening_forbid(self) -> tuple[range, ...]:
        """What a call's answer may not sample yet: it opens with a note that sounds (OPENING_FORBID;
        the engine's pitch range keeps it to the pitches the output plays)."""
        if self.answer_end is None or self.answer_sounded or self.starting:
            return ()
        last = self.engine.tokens[-1] if self.run_steps else None
        after_velocity = last is not None and vocab.event_type(last) == "velocity"
        return (AFTER_VELOCITY_FORBID if after_velocity else OPENING_FORBID,)

    def _follow_starting(self, token: int, settings: Settings) -> None:
        """Note-ons the output plays, sampled but not yet released by a time shift (the decoder holds
        them until then, and drops one whose note-off comes first). A note outside the pitch range
        never sounds: an answer that had only such notes besides a dropped one was silent."""
        kind = vocab.event_type(token)
        if kind == "note_on":
            if token in settings.played_pitches:
                self.starting.add(token)
        elif kind == "note_off":
            self.starting.discard(token - vocab.NOTE_OFF)
        elif kind == "time_shift":
            self.starting.clear()

    def _set_carry(self, pitches) -> None:
        """The notes ringing on into the next run, and the same set kept as `run_carry` for a rollback."""
        self.carry = set(pitches)
        self.run_carry = frozenset(self.carry)

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
        now = self.clock()
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
        if not self.output.schedule(notes, self.epoch):
            self.schedule_refused_at = self.clock()  # a barge-in came first: its rollback is queued
            return False
        return True

    def _quantize(self, when: float, grid: str, not_before: float) -> float:
        """A note-on's time on the quantise grid of the clock source (Link's, the MIDI clock's or free)."""
        if grid in GRID_BEATS and self.grid is not None and self.timekeeper.source(not_before)[0] == LINK:
            return self.grid.quantize(when, GRID_BEATS[grid], not_before)
        return self.timekeeper.clock.quantize(when, grid, not_before, self.t0)

    def _answer_due(self, threshold_at: float) -> float:
        """Call mode: when the answer starts. At the silence threshold, or with Link timing the session
        and `answer_on` beat or bar, on the first beat or bar line of the shared grid from then on."""
        settings = self.settings
        every = {"beat": 1, "bar": settings.link_quantum}.get(settings.answer_on)
        if every is None or self.grid is None or self.timekeeper.source(threshold_at)[0] != LINK:
            return threshold_at
        return self.grid.next_boundary(threshold_at, every)

    def _follow_grid(self, now: float) -> None:
        """Take Link's latest grid; if a peer moved it (a new tempo, a forced beat), what is planned on
        the old grid (the look-ahead, an answer waiting for its beat) moves to the same beats on the
        new one, so a tempo change takes effect at once instead of after the look-ahead."""
        new = self.timekeeper.link_timeline()
        old, self.grid = self.grid, new
        if old is None or new is None or new is old or not _grid_moved(old, new, now):
            return
        if self.speculation is not None and self.settings.answer_on != "threshold":
            self.speculation.start_at = max(now, new.time_at(old.beat_at(self.speculation.start_at)))
            with self.shared.lock:
                self.shared.pending_answer_start = self.speculation.start_at
        output = self.output
        if output.epoch != self.epoch or not output.pending_count():
            return  # nothing planned, or a barge-in's silence() came first: its rollback decides
        _, planned = output.silence(notes_off=False)
        if output.epoch != self.epoch + 1:
            return  # another silence() came in between: it wins, the notes stay dropped
        self.epoch = output.epoch
        for note in planned:
            note.time = max(now, new.time_at(old.beat_at(note.time)))
        output.schedule(planned, self.epoch)

    def _finish_answer(self) -> None:
        """Call mode: the answer is long enough; close its open notes and stop sampling."""
        decoder = self.decoder
        closing = decoder.close()
        closing += [TimedEvent("note_off", decoder.time, pitch, 0) for pitch in sorted(self.carry)]
        self._set_carry(())
        tokens = [vocab.note_off(e.pitch) for e in closing]
        self.engine.append(tokens, judged=False)  # the model's notes closed: nothing the player did
        self._schedule(closing, len(self.engine))
        self.decoder = None

    def _commit_played(self) -> None:
        """Merge the sampled tokens whose events were sent into the encoder's stream state."""
        tag = min(self.output.played_tag(), len(self.engine))
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
        Speculation); a pause, mode switch or engine error drops it."""
        if self.speculation is not None:
            tag, _ = self.output.silence()
            if tag <= self.run_tokens_start:  # nothing of it sounded: as if it had never been sampled
                self._abandon_speculation(keep_call)
                return
            self.speculation = None  # its first notes went out as the player came in: cut it as usual
        if rollback:
            # again here, in the engine thread: events planned after the barge-in's silence() (in its
            # new epoch, before its command arrived) must not play; the tag is the highest one sent
            tag, _ = self.output.silence(notes_off=not keep_sounding)
        elif tag is None:
            tag = self.output.played_tag()
        keep = max(self.committed, min(tag, len(self.engine)))
        if keep > self.committed:
            self.encoder.absorb_model_tokens(self.engine.tokens[self.committed : keep])
        if rollback and keep < len(self.engine):
            self.rolled_back += len(self.engine) - keep
            self.engine.truncate(keep)
        self.committed = len(self.engine)
        # model notes that sounded in the kept part but whose note-off was dropped
        run = slice(self.run_tokens_start, self.committed)
        open_notes = _open_model_notes(self.engine.tokens[run], self.engine.sampled[run], self.run_carry)
        self._set_carry(open_notes if keep_sounding else ())
        if open_notes and not keep_sounding:
            at = self._rel(cut_at if cut_at is not None else self.clock())
            tokens = time_shift_tokens(max(0.0, at - self.encoder.clock))
            tokens += [vocab.note_off(pitch) for pitch in open_notes]
            self.engine.append(tokens, judged=False)  # the model's cut notes closed: nothing the player did
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
        self._set_carry(())
        self.call_pending = keep_call
        with self.shared.lock:
            self.shared.pending_answer_start = None


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
