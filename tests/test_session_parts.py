"""Parts of the live session tested without ports: the echo memory (input/scheduler threads) and the
rollback of an answer sampled ahead of the silence threshold (engine thread), with the tiny model."""

from __future__ import annotations

import copy

import torch

from liveperceiver.core import vocab
from liveperceiver.core.stream import StreamEncoder
from liveperceiver.inference.engine import Engine
from liveperceiver.inference.sampling import SamplingSettings
from liveperceiver.live.input_filter import FEEDBACK_WINDOW_S, EchoMemory
from liveperceiver.live.speculation import Speculation


def test_an_echo_of_a_sent_note_is_recognised_once_within_the_window():
    echoes = EchoMemory()
    echoes.sent(10.0, True, 60, 80)
    echoes.sent(10.0, False, 62, 0)
    assert not echoes.is_echo(10.010, True, 60, 81)  # another velocity: the player struck that key
    assert not echoes.is_echo(10.010, False, 60, 0)  # a note-off does not echo a note-on
    assert not echoes.is_echo(9.990, True, 60, 80)  # heard before it was sent
    assert echoes.is_echo(10.010, True, 60, 80)
    assert not echoes.is_echo(10.011, True, 60, 80)  # one echo per note sent
    assert echoes.is_echo(10.020, False, 62, 64)  # a note-off's release velocity does not matter


def test_a_note_sent_longer_ago_than_the_window_is_not_an_echo():
    echoes = EchoMemory()
    echoes.sent(5.0, True, 64, 90)
    assert not echoes.is_echo(5.0 + FEEDBACK_WINDOW_S + 0.001, True, 64, 90)
    echoes.sent(6.0, True, 64, 90)
    assert echoes.is_echo(6.0 + FEEDBACK_WINDOW_S - 0.001, True, 64, 90)


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
