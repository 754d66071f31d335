"""The output layer learns the session (inference/dynamic.py): the engine's correction follows the
documented step exactly, the player's tokens teach it at a step or from the window's rows alike,
the model's own tokens never do, a rollback undoes it, and on a real piece it lowers the NLL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liveperceiver.inference import engine as engine_module
from liveperceiver.inference.dynamic import RATE
from liveperceiver.inference.engine import Engine
from liveperceiver.training.nll import stream_token_nll


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def test_the_correction_is_the_documented_step_on_each_players_token(tiny_model, chorale_tokens):
    """An independent float64 replay of the step: logits + D h, then after token y
    D -= rate / (h . h) (p - onehot(y)) h^T, with p the adjusted distribution."""
    engine = Engine(tiny_model, num_latents="4:8", device="cpu", adapt=0.8)
    engine.append(chorale_tokens[:1])
    delta = np.zeros(tuple(engine.dynamic.delta.shape))
    rate = 0.8 * RATE
    with torch.inference_mode():
        for target in chorale_tokens[1:120]:
            learnt = engine.next_logits()  # projected by the session's copy of the output layer
            logits = engine.head.model_logits()[-1].double().numpy()  # by the model's own
            hidden = engine.head.hidden[-1].double().numpy()
            adjusted = logits + delta @ hidden
            np.testing.assert_allclose(learnt.numpy(), adjusted, atol=1e-4)
            engine.played_logits(learnt, temperature=1.0)  # as play and eval: remembered for the token
            p = softmax(adjusted)
            p[target] -= 1.0
            delta -= rate / hidden.dot(hidden) * np.outer(p, hidden)
            engine.append([target])
    assert engine.dynamic.learnt == 119
    assert np.abs(delta).max() > 1e-3  # it moved
    np.testing.assert_allclose(engine.dynamic.delta.numpy(), delta, atol=1e-5)


def test_rows_teach_as_steps_do_and_own_tokens_never(tiny_model, chorale_tokens):
    """Play's way (the player's tokens arrive while the engine waits; their rows run when idle)
    teaches the same correction as eval's (a step predicts every token); the model's own tokens
    leave it as it is; a rollback past the player's tokens undoes what they taught."""
    stepped = Engine(tiny_model, num_latents="4:8", device="cpu", adapt=1.0)
    stepped.append(chorale_tokens[:1])
    for target in chorale_tokens[1:200]:
        stepped.played_logits(stepped.next_logits(), temperature=1.0)
        stepped.append([target])
    waiting = Engine(tiny_model, num_latents="4:8", device="cpu", adapt=1.0)
    for token in chorale_tokens[:200]:
        waiting.append([token])
        waiting.prepare()
    assert waiting.dynamic.learnt == stepped.dynamic.learnt
    np.testing.assert_allclose(waiting.dynamic.delta.numpy(), stepped.dynamic.delta.numpy(), atol=1e-5)

    taught = waiting.dynamic.delta.clone()
    waiting.sample(12)  # the model plays on: nothing learnt
    assert torch.equal(waiting.dynamic.delta, taught)
    waiting.truncate(200)
    waiting.sample(2)  # a shorter look-ahead, its window anchored before the player's entry
    waiting.truncate(200)  # the player comes in where the look-ahead began
    waiting.append(chorale_tokens[200:206])  # the first learnt from the step there, the rest from rows
    assert waiting.dynamic.learnt == stepped.dynamic.learnt + 1
    waiting.sample(1)  # the window re-anchors at 202: the rows after it teach (those before have none)
    assert waiting.dynamic.learnt == stepped.dynamic.learnt + 4
    assert not torch.equal(waiting.dynamic.delta, taught)
    waiting.truncate(200)
    np.testing.assert_allclose(waiting.dynamic.delta.numpy(), taught.numpy(), atol=1e-6)
    waiting.truncate(0)
    assert not waiting.dynamic.delta.any() and waiting.dynamic.learnt == 0


def test_tokens_the_player_did_not_play_teach_nothing(tiny_model, chorale_tokens):
    engine = Engine(tiny_model, num_latents=1, device="cpu", adapt=1.0)
    engine.append(chorale_tokens[:50])
    engine.played_logits(engine.next_logits(), temperature=1.0)
    engine.append(chorale_tokens[50:51], judged=False)  # a closing note-off the session wrote
    assert not engine.dynamic.delta.any()
    engine.played_logits(engine.next_logits(), temperature=1.0)
    engine.append(chorale_tokens[51:52])
    assert engine.dynamic.delta.any()


def test_learning_the_output_layer_lowers_the_nll_of_a_real_piece(tiny_model, chorale_tokens, monkeypatch):
    piece = [chorale_tokens[:600]]
    learning, alone = stream_token_nll(tiny_model, piece, "4:8", None, 1.0, None, "cpu", False)
    monkeypatch.setattr(engine_module, "DYNAMIC_RATE", 0.0)
    still, alone_still = stream_token_nll(tiny_model, piece, "4:8", None, 1.0, None, "cpu", False)
    np.testing.assert_allclose(alone, alone_still)  # the model alone does not learn
    assert learning.mean() < still.mean() - 0.02, (learning.mean(), still.mean())
    assert learning[300:].mean() < still[300:].mean()
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(learning, still, atol=1e-3)


def test_waiting_updates_fold_in_unchanged_and_adapt_zero_is_the_model_alone(tiny_model, chorale_tokens):
    """On the CPU the last updates wait as rank-one terms: folding them into the copy (as the idle
    engine does) leaves the logits as they were; a rollback of waiting ones is exact. With
    adaptation off the engine projects by the model's own embedding; turned on again, by what it
    learnt."""
    engine = Engine(tiny_model, num_latents="4:8", device="cpu", adapt=1.0)
    engine.append(chorale_tokens[:1])
    for target in chorale_tokens[1:40]:
        engine.played_logits(engine.next_logits(), temperature=1.0)
        engine.append([target])
    assert 0 < engine.dynamic.pending < 39  # some folded in already, some waiting
    waiting = engine.dynamic.pending
    learnt = engine.next_logits()
    hidden = engine.head.hidden[-1]
    weight = engine.dynamic.weight.clone()
    engine.truncate(38)  # the last two updates were waiting: dropped exactly
    assert engine.dynamic.pending == waiting - 2 and torch.equal(engine.dynamic.weight, weight)
    before = engine.dynamic.logits(hidden)
    engine.dynamic.flush()  # as the idle engine does
    assert engine.dynamic.pending == 0 and not torch.equal(engine.dynamic.weight, weight)
    torch.testing.assert_close(engine.dynamic.logits(hidden), before, atol=1e-5, rtol=0)
    count = engine.dynamic.learnt
    engine.append(chorale_tokens[38:40])  # no step predicted these: learnt from the window's rows when idle
    engine.prepare()
    assert engine.dynamic.learnt == count + 2 and engine.dynamic.pending == 0
    learnt = engine.next_logits()
    engine.configure(adapt=0.0)
    alone = engine.next_logits()
    torch.testing.assert_close(alone, engine.head.model_logits()[-1].float(), atol=0, rtol=0)
    assert (alone - learnt).abs().max() > 1e-3
    engine.configure(adapt=1.0)
    assert (engine.next_logits() - learnt).abs().max() < 1e-4


def test_an_engine_built_in_inference_mode_learns_outside_it(tiny_model, chorale_tokens):
    with torch.inference_mode():
        engine = Engine(tiny_model, num_latents="4:8", device="cpu", adapt=1.0)
    engine.append(chorale_tokens[:1])
    for target in chorale_tokens[1:40]:  # more than the updates that wait: some are folded in
        engine.played_logits(engine.next_logits(), temperature=1.0)
        engine.append([target])
    engine.truncate(10)  # undoes folded updates in place
    assert engine.dynamic.learnt == 9
