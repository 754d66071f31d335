"""Parts of the live session tested without ports: the echo memory and the input filter (input and
scheduler threads, a real scheduler on a list for a port) and the rollback of an answer sampled ahead
of the silence threshold (engine thread), with the tiny model."""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
import time

import pytest
import torch

from liveperceiver.core import vocab
from liveperceiver.core.stream import StreamEncoder
from liveperceiver.inference.engine import Engine
from liveperceiver.inference.sampling import SamplingSettings
from liveperceiver.live.clock import ClockTracker
from liveperceiver.live.input_filter import FEEDBACK_WINDOW_S, EchoMemory, InputFilter
from liveperceiver.live.recorder import Recorder
from liveperceiver.live.scheduler import Scheduler
from liveperceiver.live.settings import Settings
from liveperceiver.live.shared import SharedState, Timekeeper
from liveperceiver.live.speculation import Speculation


def test_an_echo_of_a_sent_note_is_recognised_once_within_the_window():
    echoes = EchoMemory()
    echoes.sent(10.0, True, 0, 60, 80)
    echoes.sent(10.0, False, 0, 62, 0)
    assert not echoes.is_echo(10.010, True, 0, 60, 81)  # another velocity: the player struck that key
    assert not echoes.is_echo(10.010, False, 0, 60, 0)  # a note-off does not echo a note-on
    assert not echoes.is_echo(9.990, True, 0, 60, 80)  # heard before it was sent
    assert not echoes.is_echo(10.010, True, 1, 60, 80)  # another channel: the player's own note
    assert echoes.is_echo(10.010, True, 0, 60, 80)
    assert not echoes.is_echo(10.011, True, 0, 60, 80)  # one echo per note sent
    assert not echoes.is_echo(10.020, False, 1, 62, 0)  # the player's key released on their channel
    assert echoes.is_echo(10.020, False, 0, 62, 64)  # a note-off's release velocity does not matter


def test_a_note_sent_longer_ago_than_the_window_is_not_an_echo():
    echoes = EchoMemory()
    echoes.sent(5.0, True, 0, 64, 90)
    assert not echoes.is_echo(5.0 + FEEDBACK_WINDOW_S + 0.001, True, 0, 64, 90)
    echoes.sent(6.0, True, 0, 64, 90)
    assert echoes.is_echo(6.0 + FEEDBACK_WINDOW_S - 0.001, True, 0, 64, 90)


class InputRig:
    """An InputFilter in front of a running Scheduler whose port is a list; `settings` can be replaced
    as Session.update replaces them."""

    def __init__(self, tmp_path, **settings) -> None:
        self.settings = Settings(**settings)
        self.sent: list[list[int]] = []
        self.lock = threading.Lock()
        self.scheduler = Scheduler(self._send, self.settings, log=lambda line: None)
        self.shared = SharedState()
        self.recorder = Recorder(tmp_path / "session", origin=0.0)
        timekeeper = Timekeeper(ClockTracker(), lambda: self.settings)
        self.inputs = InputFilter(
            lambda: self.settings, self.scheduler, self.recorder, self.shared, timekeeper, queue.SimpleQueue()
        )
        self.scheduler.start()

    def _send(self, message: list[int]) -> bool:
        with self.lock:
            self.sent.append(list(message))
        return True

    def update(self, **changes) -> None:
        self.settings = dataclasses.replace(self.settings, **changes)

    def wire(self, count: int) -> list[list[int]]:
        """What went out once `count` messages have (or after 5 s), and nothing more a moment later."""
        deadline = time.monotonic() + 5
        while len(self.sent) < count and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.05)
        with self.lock:
            return list(self.sent)

    def held(self) -> set:
        with self.shared.lock:
            return set(self.shared.held)

    def close(self) -> None:
        self.scheduler.close()
        self.recorder.close()


@pytest.fixture
def input_rig(tmp_path):
    rigs: list[InputRig] = []

    def make(**settings) -> InputRig:
        rigs.append(InputRig(tmp_path / str(len(rigs)), **settings))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def test_keys_and_pedal_down_when_thru_is_turned_off_are_still_let_up_thru(input_rig):
    """A preset without `thru` (most of them) loaded while the player holds a key and the pedal: their
    releases must still go out, else the synth holds them until the session closes."""
    rig = input_rig(thru=True, mode="listen")
    rig.inputs.hear(1.0, [0xB0, 64, 127])
    rig.inputs.hear(1.0, [0x90, 60, 90])
    rig.update(thru=False)
    rig.inputs.hear(1.4, [0x90, 62, 90])  # struck after thru went off: not passed, nor its release
    rig.inputs.hear(1.5, [0x80, 60, 0])
    rig.inputs.hear(1.5, [0x80, 62, 0])
    rig.inputs.hear(1.6, [0xB0, 64, 0])
    assert rig.wire(4) == [[0xB0, 64, 127], [0x90, 60, 90], [0x80, 60, 0], [0xB0, 64, 0]]
    assert rig.held() == set()


def test_a_key_held_when_the_input_channel_changes_still_ends(input_rig):
    """Its release, on the channel now filtered out, must still end it: call mode waits for every key up."""
    rig = input_rig(thru=True, mode="listen")
    rig.inputs.hear(1.0, [0x91, 62, 90])
    rig.inputs.hear(1.0, [0xB1, 64, 127])
    rig.update(in_channel=1)  # channel 1 only: index 0
    assert rig.held() == {(1, 62)}
    rig.inputs.hear(1.2, [0x91, 65, 90])  # a new note there is filtered out now
    rig.inputs.hear(1.5, [0x81, 62, 0])
    rig.inputs.hear(1.5, [0xB1, 64, 0])
    assert rig.held() == set()
    assert rig.wire(4) == [[0x91, 62, 90], [0xB1, 64, 127], [0x81, 62, 0], [0xB1, 64, 0]]


def test_the_release_of_a_held_key_is_never_taken_for_an_echo(input_rig):
    """The model's note-off of the same pitch a moment before (a barge-in cuts it) must not swallow
    the player's own release of that key, on the model's channel or another."""
    rig = input_rig(thru=True, mode="listen")
    for channel in (0, 1):
        rig.inputs.hear(1.0, [0x90 | channel, 60, 100])
        rig.inputs.echoes.sent(1.01, False, 0, 60, 0)  # the scheduler's off of the model's 60, channel 1
        rig.inputs.hear(1.02, [0x80 | channel, 60, 0])  # the player's own release, within the window
        assert rig.held() == set()
    with rig.shared.lock:
        assert rig.shared.suppressed == 0
    rig.inputs.echoes.sent(2.0, False, 0, 60, 0)
    rig.inputs.hear(2.01, [0x80, 60, 0])  # no key held: that one is our echo
    with rig.shared.lock:
        assert rig.shared.suppressed == 1
    assert rig.wire(4) == [[0x90, 60, 100], [0x80, 60, 0], [0x91, 60, 100], [0x81, 60, 0]]


def phrase(encoder: StreamEncoder, engine: Engine) -> None:
    for index, pitch in enumerate([60, 64, 67, 72]):
        engine.append(encoder.note_on(0.25 * index, pitch, 90))
        engine.append(encoder.note_off(0.25 * index + 0.2, pitch))


def test_an_answer_sampled_ahead_goes_back_exactly_when_the_player_goes_on(tiny_model):
    """Speculation.capture before the silence is written, an answer sampled, then restore: the
    stream, the encoder and the next logits are as if the answer had never been sampled."""
    engine = Engine(tiny_model, num_latents=4, sampling=SamplingSettings(seed=5))
    encoder = StreamEncoder()
    phrase(encoder, engine)
    before = list(engine.tokens)
    untouched = copy.deepcopy(encoder)

    ahead = Speculation.capture(start_at=2.0, engine=engine, encoder=encoder, encoder_time=0.8)
    engine.append(encoder.advance(1.5))  # the silence up to the answer's start
    for _ in range(12):
        engine.step()
    assert len(engine) > len(before) and any(engine.sampled)

    encoder, encoder_time = ahead.restore(engine)
    assert list(engine.tokens) == before and not any(engine.sampled)
    assert encoder_time == 0.8
    going_on = encoder.note_on(1.2, 65, 70) + encoder.note_off(1.4, 65)  # the player went on first
    assert going_on == untouched.note_on(1.2, 65, 70) + untouched.note_off(1.4, 65)  # the true gap
    engine.append(going_on)

    fresh = Engine(tiny_model, num_latents=4, sampling=SamplingSettings(seed=5))
    fresh.append(engine.tokens)
    torch.testing.assert_close(engine.next_logits(), fresh.next_logits(), atol=1e-5, rtol=0)
    assert vocab.note_on(65) in engine.tokens
