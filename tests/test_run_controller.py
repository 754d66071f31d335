"""The engine thread's run controller (live/runs.py) without ports or threads: the tiny model's real
forward passes, the real input filter hearing the player, a clock the test moves in 10 ms steps, and
the scheduler's bookkeeping as a list (`Output`) whose notes are sent when the test's clock passes them.

What the controller promises: call mode answers at the silence threshold with a note-on first; a
player who goes on before it hears nothing of an answer sampled ahead, and the context is as if it
had never been sampled; a barge-in keeps what was played and closes the model's cut notes in the
context; in duet the look-ahead goes and the sounding notes ring on until the model ends them.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import pytest
import torch

from liveperceiver.core import vocab
from liveperceiver.core.stream import StreamEncoder
from liveperceiver.live.clock import ClockTracker
from liveperceiver.live.commands import Pause, PlayerNoteOff, PlayerNoteOn, Reset
from liveperceiver.live.engine_options import EngineOptions, resolve_model
from liveperceiver.live.input_filter import InputFilter
from liveperceiver.live.recorder import Recorder
from liveperceiver.live.runs import RunController
from liveperceiver.live.scheduler import OutNote
from liveperceiver.live.settings import Settings
from liveperceiver.live.shared import SharedState, Timekeeper

STEP_S = 0.01  # the test clock's step between engine passes (the stream's time resolution)
OPTIONS = EngineOptions(device="cpu", weights="float32", dtype="float32")


class Clock:
    """Monotonic seconds that move only when the test moves them."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Output:
    """The scheduler's contract (scheduler.Scheduler) without its thread or a port: notes queue in an
    epoch, `silence` drops them and starts a new epoch, and `play_until` sends what is due by the
    test's clock, in time order, raising the played tag as the scheduler thread does."""

    def __init__(self) -> None:
        self.epoch = 0
        self.pending: list[OutNote] = []
        self.sent: list[OutNote] = []
        self.sounding: set[int] = set()  # model pitches whose note-on was sent and not ended
        self.last_tag = -1
        self.silences: list[bool] = []  # notes_off of every silence(), in order
        self.raw: list[list[int]] = []

    def schedule(self, notes: list[OutNote], epoch: int | None = None) -> bool:
        if epoch is not None and epoch != self.epoch:
            return False
        self.pending.extend(notes)
        return True

    def silence(self, reset_tags: bool = False, notes_off: bool = True) -> tuple[int, list[OutNote]]:
        dropped = sorted(self.pending, key=lambda note: note.time)
        self.pending.clear()
        self.epoch += 1
        self.silences.append(notes_off)
        if notes_off:
            self.sounding.clear()
        tag = self.last_tag
        if reset_tags:
            self.last_tag = -1
        return tag, dropped

    def played_tag(self) -> int:
        return self.last_tag

    def pending_count(self) -> int:
        return len(self.pending)

    def send_raw(self, message: list[int]) -> None:
        self.raw.append(message)

    def play_until(self, now: float) -> None:
        due = sorted((note for note in self.pending if note.time <= now), key=lambda note: note.time)
        self.pending = [note for note in self.pending if note.time > now]
        for note in due:
            self.sent.append(note)
            self.last_tag = max(self.last_tag, note.tag)
            (self.sounding.add if note.on else self.sounding.discard)(note.pitch)


@dataclass
class Rig:
    """One controller and what surrounds it in a session, driven pass by pass."""

    clock: Clock
    output: Output
    inputs: InputFilter
    runs: RunController
    commands: queue.SimpleQueue
    settings: Settings
    heard: list[tuple[float, str, int, int]] = field(default_factory=list)  # (time, kind, pitch, velocity)

    def tick(self) -> None:
        """One engine pass, then the output sends what is due."""
        self.runs.tick()
        self.output.play_until(self.clock.now)

    def run_until(self, until: float) -> None:
        while self.clock.now < until - 1e-9:
            self.clock.now = min(until, self.clock.now + STEP_S)
            self.tick()

    def run_for(self, seconds: float) -> None:
        self.run_until(self.clock.now + seconds)

    def key(self, pitch: int, on: bool = True, velocity: int = 80, sample: bool = True) -> None:
        """The player's key, heard now by the input filter; then an engine pass, or (`sample` False)
        only the commands it queued, to see the state before a new run samples."""
        self.heard.append((self.clock.now, "on" if on else "off", pitch, velocity))
        self.inputs.hear(self.clock.now, [0x90, pitch, velocity] if on else [0x80, pitch, 0])
        if sample:
            self.tick()
            return
        while not self.commands.empty():
            self.runs.handle(self.commands.get_nowait())

    def phrase(self, pitches: list[int], step: float = 0.25, length: float = 0.2) -> float:
        """Legato-free notes; returns the time of the last note-off."""
        for pitch in pitches:
            self.key(pitch)
            self.run_for(length)
            self.key(pitch, on=False)
            if pitch != pitches[-1]:
                self.run_for(step - length)
        return self.clock.now

    def players_tokens(self) -> list[int]:
        """The player's notes alone, through a fresh encoder: the context a model that never sampled
        would have."""
        encoder, tokens = StreamEncoder(), []
        for when, kind, pitch, velocity in self.heard:
            t = when - self.runs.t0
            tokens += encoder.note_on(t, pitch, velocity) if kind == "on" else encoder.note_off(t, pitch)
        return tokens

    def answer(self) -> list[int]:
        """The first run of sampled tokens in the context."""
        tokens, sampled = self.runs.engine.tokens, self.runs.engine.sampled
        start = sampled.index(1)
        end = sampled.index(0, start) if 0 in sampled[start:] else len(tokens)
        return tokens[start:end]


@pytest.fixture
def rig(tiny_model, tmp_path):
    recorders: list[Recorder] = []

    def make(**changes) -> Rig:
        settings = Settings(**{"seed": 7, "silence_ms": 300, "lookahead_ms": 200, "response_seconds": 2.0, **changes})
        clock, output, shared, commands = Clock(), Output(), SharedState(), queue.SimpleQueue()
        timekeeper = Timekeeper(ClockTracker(), lambda: settings)
        recorder = Recorder(tmp_path / f"session{len(recorders)}", origin=clock.now)
        recorders.append(recorder)
        inputs = InputFilter(lambda: settings, output, recorder, shared, timekeeper, commands)
        model = resolve_model(tiny_model)
        runs = RunController(
            model,
            OPTIONS.build(model, settings),
            OPTIONS,
            output=output,
            settings=lambda: settings,
            shared=shared,
            timekeeper=timekeeper,
            last_activity=lambda: inputs.last_activity,
            commands=commands,
            stopping=threading.Event(),
            t0=clock.now,
            clock=clock,
        )
        return Rig(clock, output, inputs, runs, commands, settings)

    yield make
    for recorder in recorders:
        recorder.close()


def test_call_mode_answers_at_the_silence_threshold_with_a_note_on_first(rig):
    r = rig(mode="call", silence_ms=305)  # the threshold falls between two of the stream's 10 ms steps
    last_off = r.phrase([60, 64, 67])
    threshold = last_off + 0.305
    early = 0.1525  # the answer is sampled ahead by the look-ahead, but not from the silence's first half
    r.run_until(threshold - early - 0.02)
    assert r.runs.decoder is None and not any(r.runs.engine.sampled)  # a short gap starts nothing
    r.run_until(threshold - 0.02)
    assert r.runs.speculation is not None and any(r.runs.engine.sampled)  # sampled ahead: "preparing"
    assert r.runs.shared.pending_answer_start == pytest.approx(threshold)
    assert r.output.pending and all(note.time >= threshold for note in r.output.pending)
    assert not r.output.sent  # nothing sounds before the threshold
    r.run_until(threshold + 1.0)
    assert r.runs.speculation is None  # due: a real answer now
    first = r.output.sent[0]
    assert first.on and first.time == pytest.approx(threshold)  # its first note is on the threshold
    answer = r.answer()
    first_on = next(i for i, token in enumerate(answer) if vocab.event_type(token) == "note_on")
    assert {vocab.event_type(token) for token in answer[:first_on]} <= {"velocity"}, answer[: first_on + 1]


def test_an_answer_whose_only_sounding_note_was_dropped_still_opens_with_one(rig):
    """The decoder drops a note whose note-off comes before any time shift, and the output drops
    notes outside the pitch range. An answer that sampled note-on 60, note-on 115 (above the piano's
    108) and note-off 60 has nothing that will sound yet: it must still not sample a time shift or a
    note-off (seen over JACK: the random tiny model then answered with silence, 3 calls in 20). The
    engine never samples 115 itself: the pitch range is one of its constraints."""
    from liveperceiver.live.runs import OPENING_FORBID

    r = rig(mode="call")
    last_off = r.phrase([60, 64])
    r.run_until(last_off + 0.3 - 0.1)  # sampling ahead of the threshold: the answer has begun
    runs, settings = r.runs, r.settings
    assert runs.answer_end is not None
    assert runs.engine.constraints.pitch_range == (21, 108)
    runs.answer_sounded, runs.starting = False, set()
    for token in (vocab.note_on(60), vocab.note_on(115), vocab.note_off(60)):
        runs._follow_starting(token, settings)
    assert runs._opening_forbid() == (OPENING_FORBID,)
    runs._follow_starting(vocab.note_on(62), settings)
    assert runs._opening_forbid() == ()  # a note that will sound: the answer may go on


def test_the_player_going_on_first_takes_the_answer_back_as_if_it_was_never_sampled(rig, tiny_model):
    r = rig(mode="call", silence_ms=400, lookahead_ms=300)
    last_off = r.phrase([60, 62, 64])
    threshold = last_off + 0.400
    r.run_until(threshold - 0.03)
    # sampled ahead: at least the answer's opening velocity and note, and what fills the look-ahead after
    assert r.runs.speculation is not None and sum(r.runs.engine.sampled) >= 3
    assert not r.output.sent
    rolled = r.runs.rolled_back
    r.key(65)  # the player goes on before the threshold
    assert r.runs.speculation is None and r.runs.decoder is None
    assert r.runs.rolled_back > rolled
    assert not r.output.pending and not r.output.sent  # the barge-in dropped it: nothing of it sounded
    engine = r.runs.engine
    assert not any(engine.sampled)
    assert list(engine.tokens) == r.players_tokens()  # the true gap, not the silence written for the answer
    fresh = OPTIONS.build(resolve_model(tiny_model), r.settings)
    fresh.append(engine.tokens)
    torch.testing.assert_close(engine.next_logits(), fresh.next_logits(), atol=1e-5, rtol=0)
    # the answer is still owed: the next silence is answered, from the new note's release
    r.run_for(0.2)
    r.key(65, on=False)
    release = r.clock.now
    r.run_until(release + 0.4 + 0.5)
    assert r.output.sent and r.output.sent[0].on and r.output.sent[0].time == pytest.approx(release + 0.4)


def test_a_barge_in_keeps_what_was_played_and_closes_the_cut_notes_in_the_context(rig):
    r = rig(mode="call", response_seconds=4.0)
    last_off = r.phrase([60, 64, 67])
    r.run_until(last_off + 0.5)
    for _ in range(300):  # until a model note sounds with more of the answer planned
        if r.output.sounding and r.output.pending:
            break
        r.run_for(STEP_S)
    sounding, played = set(r.output.sounding), r.output.played_tag()
    assert sounding and played > 0
    engine = r.runs.engine
    kept, length, rolled = list(engine.tokens[:played]), len(engine), r.runs.rolled_back
    assert r.runs.committed == played  # what was played is merged into the stream state
    r.key(48)  # barge in
    assert r.output.silences[-1] is True  # the model's sounding notes end at once
    assert r.runs.decoder is None
    assert list(engine.tokens[:played]) == kept
    assert r.runs.rolled_back - rolled == length - played  # the unplayed look-ahead, no more
    tail = engine.tokens[played:]
    assert not any(engine.sampled[played:])
    closed = {token - vocab.NOTE_OFF for token in tail if vocab.event_type(token) == "note_off"}
    assert closed == sounding  # the cut notes end in the context where their sound was cut
    assert r.runs.carry == set() and r.runs.committed == len(engine)


def duet_playing_along(rig) -> Rig:
    """A duet caught as the model's notes of this run sound with more planned. The random tiny model
    often samples second-long time shifts, so a few seeds are tried (one is usually enough)."""
    for seed in (5, 4, 10, 11, 1, 2):
        r = rig(mode="duet", lookahead_ms=300, seed=seed)
        r.phrase([60, 64, 67])
        for _ in range(200):
            r.run_for(STEP_S)
            if r.output.sounding and r.output.pending and r.output.played_tag() > r.runs.committed:
                return r
    pytest.fail("the tiny model never played along in duet")


def test_duet_drops_the_look_ahead_and_lets_the_sounding_notes_ring_until_the_model_ends_them(rig):
    r = duet_playing_along(rig)
    sounding, played = set(r.output.sounding), r.output.played_tag()
    assert sounding and played > r.runs.committed
    r.runs.tick()  # one pass without sending: it commits what was played
    assert r.runs.committed == played
    engine = r.runs.engine
    length, sent, rolled = len(engine), len(r.output.sent), r.runs.rolled_back
    r.key(72, sample=False)  # the player comes in mid-look-ahead
    assert r.output.silences[-1] is False  # the look-ahead goes; what sounds rings on
    assert r.runs.rolled_back - rolled == length - played
    assert r.runs.carry == sounding
    assert not any(token == vocab.note_off(p) for token in engine.tokens[played:] for p in sounding)
    r.run_for(4.5)  # past the model's own limit on a note's length (max_note_seconds - 1 s)
    assert not r.runs.carry
    ended = {note.pitch for note in r.output.sent[sent:]}  # each carried note was ended or struck again
    assert sounding <= ended


def test_a_carried_notes_note_off_taken_back_by_a_rollback_leaves_it_carried(rig):
    """In duet, the carry loses a pitch when the model samples its note-off; if the player comes in
    before that note-off plays, the rollback takes it back and the note still sounds: it must still be
    carried (it was lost, and the context no longer knew the note sounded until the watchdog cut it)."""
    r = duet_playing_along(rig)
    r.runs.tick()
    r.key(72, sample=False)  # the first rollback: the sounding notes are carried
    carried = set(r.runs.carry)
    assert carried
    sent = len(r.output.sent)
    for _ in range(400):  # sample on (nothing is sent: the test clock moves, no note is played)
        r.clock.now += STEP_S
        r.runs.tick()
        if r.runs.carry != carried:
            break
    else:
        pytest.fail("the tiny model never ended a carried note within 4 s")
    assert len(r.output.sent) == sent  # nothing of it sounded
    ended = carried - r.runs.carry
    r.key(74, sample=False)  # the player again, before any of it played
    assert ended <= r.runs.carry  # their note-offs were taken back: they still ring, still carried


def test_pause_stops_sampling_reset_forgets_and_commands_are_typed(rig):
    r = rig(mode="duet")
    r.phrase([60, 62])
    r.run_for(0.3)
    assert r.runs.decoder is not None
    r.commands.put(Pause(True))
    r.tick()
    assert r.runs.decoder is None and not r.output.pending and r.output.silences[-1] is True
    length = len(r.runs.engine)
    r.run_for(0.3)
    assert len(r.runs.engine) == length  # nothing sampled while paused
    r.commands.put(Pause(False))
    r.run_for(0.3)
    assert len(r.runs.engine) > length
    r.commands.put(Reset())
    r.tick()
    assert len(r.runs.engine) == 0 and r.runs.t0 == r.clock.now and r.runs.decoder is None
    r.runs.handle(PlayerNoteOn(when=r.clock.now, pitch=60, channel=0, velocity=90))
    r.runs.handle(PlayerNoteOff(when=r.clock.now + 0.1, pitch=60, channel=0))
    assert vocab.note_on(60) in r.runs.engine.tokens and r.runs.call_pending  # a new context, from t0
    with pytest.raises(TypeError):
        r.runs.handle(("player", ("note_on", r.clock.now, 60, 0, 90)))  # the old positional tuple


def test_listening_teaches_the_cache_weight_and_closing_notes_do_not(rig):
    """In listen mode the engine samples nothing, yet runs the latent rows of what the player plays
    when idle, so the session cache's weight (adapt.CacheWeight) learns from the player before the
    model ever answers; the note-offs a session writes to close the model's own notes are not the
    player's and teach it nothing."""
    from liveperceiver.inference.adapt import PRIOR_FRACTION

    r = rig(mode="listen")
    r.phrase([60, 64, 67, 64] * 4)
    r.run_for(0.2)
    engine = r.runs.engine
    assert not engine.cache_weight.deferred  # every player's token judged, none left waiting
    assert engine.cache_weight.fraction != pytest.approx(PRIOR_FRACTION)
    learnt = engine.cache_weight.fraction
    engine.append([vocab.TIME_SHIFT + 9, vocab.note_off(72)], judged=False)
    engine.prepare()
    assert engine.cache_weight.fraction == learnt and not engine.cache_weight.deferred
