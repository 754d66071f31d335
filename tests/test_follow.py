"""Dynamics follow and density follow (sampling.py): the model's velocities lean toward the
player's, its note rate toward density_ratio times the player's; each keeps the total probability
of its event type, follows rollbacks exactly, and is off at strength 0."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from liveperceiver.core import vocab
from liveperceiver.inference.engine import Engine
from liveperceiver.inference.sampling import (
    Constraints,
    SamplingSettings,
    StreamState,
    constraint_mask,
    density_factor,
    density_follow_bias,
    dynamics_follow_bias,
)


def phrase(notes: int, velocity_bin: int, gap_steps: int, seed: int = 4) -> list[int]:
    """A player's phrase: velocity, note-on, a time shift of `gap_steps` x 10 ms, note-off per note."""
    rng = random.Random(seed)
    tokens = []
    for _ in range(notes):
        pitch = rng.randrange(48, 84)
        tokens += [vocab.VELOCITY + velocity_bin, pitch, vocab.TIME_SHIFT + gap_steps - 1, vocab.note_off(pitch)]
    return tokens


def replayed(tokens: list[int], flags) -> StreamState:
    state = StreamState()
    for token, flag in zip(tokens, flags, strict=True):
        state.push(token, sampled=bool(flag))
    return state


def sampled_tokens(model, player: list[int], count: int, seed: int = 7, **follow) -> list[int]:
    engine = Engine(
        model, sampling=SamplingSettings(temperature=1.0, seed=seed), constraints=Constraints(**follow), device="cpu"
    )
    engine.append(player)
    return engine.sample(count)


def onsets_per_second(tokens: list[int]) -> float:
    steps = sum(vocab.time_shift_steps(t) for t in tokens if vocab.TIME_SHIFT <= t < vocab.VELOCITY)
    return sum(t < vocab.NOTE_OFF for t in tokens) / (steps / 100)


def model_rate(model, player: list[int], **follow) -> float:
    """The model's note-ons per second over 1,000 sampled tokens, averaged over two seeds (the
    random tiny model's own rate varies from seed to seed)."""
    return float(np.mean([onsets_per_second(sampled_tokens(model, player, 1000, seed, **follow)) for seed in (7, 8)]))


# --------------------------------------------------------------------------- each effect, real forward passes


def test_dynamics_follow_a_loud_player_makes_the_model_louder(tiny_model):
    def velocity_bins(strength: float) -> np.ndarray:
        tokens = sampled_tokens(tiny_model, phrase(48, 29, 25), 800, dynamics_follow=strength)
        bins = np.array([t - vocab.VELOCITY for t in tokens if vocab.VELOCITY <= t < vocab.PAD])
        assert len(bins) > 40
        return bins

    alone, following = velocity_bins(0.0), velocity_bins(2.0)
    assert following.mean() > alone.mean() + 6  # the random tiny model plays every bin: mean about 15.5
    assert (following >= 27).mean() > (alone >= 27).mean() + 0.3  # the player's 29 pulls 27..31


def test_dynamics_follow_a_quiet_player_makes_the_model_quieter(tiny_model):
    tokens = sampled_tokens(tiny_model, phrase(48, 3, 25), 800, dynamics_follow=2.0)
    alone = sampled_tokens(tiny_model, phrase(48, 3, 25), 800)
    mean = lambda ts: np.mean([t - vocab.VELOCITY for t in ts if vocab.VELOCITY <= t < vocab.PAD])  # noqa: E731
    assert mean(tokens) < mean(alone) - 6


def test_density_follow_a_busy_player_makes_the_model_busier(tiny_model):
    busy = phrase(64, 20, 8)  # 12.5 notes per second; the tiny model alone plays about 2.5
    assert model_rate(tiny_model, busy, density_follow=2.0) > 1.3 * model_rate(tiny_model, busy)


def test_density_follow_a_slow_player_makes_the_model_sparser(tiny_model):
    slow = phrase(24, 20, 100)  # one note a second
    assert model_rate(tiny_model, slow, density_follow=2.0) < model_rate(tiny_model, slow) / 1.2


def test_density_ratio_asks_for_sparser_or_busier(tiny_model):
    player = phrase(64, 20, 36)  # about the tiny model's own rate
    like = model_rate(tiny_model, player, density_follow=4.0)
    assert model_rate(tiny_model, player, density_follow=4.0, density_ratio=0.5) < like / 1.15
    assert model_rate(tiny_model, player, density_follow=4.0, density_ratio=2.0) > like * 1.3


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_each_follow_keeps_its_event_types_total(temperature):
    """At the sampling temperature, dynamics follow keeps the velocity tokens' total probability,
    density follow the time-shifts'; nothing else moves."""
    state = replayed(phrase(40, 28, 8), [0] * 160)
    state.push(vocab.VELOCITY + 5, sampled=True)  # the model's own quiet note, so the shares differ
    logits = torch.randn(vocab.VOCAB_SIZE, generator=torch.Generator().manual_seed(1))
    for bias, ids in (
        (lambda lg: dynamics_follow_bias(2.0, state, lg, temperature), slice(vocab.VELOCITY, vocab.PAD)),
        (lambda lg: density_follow_bias(2.0, 0.5, state, lg, temperature), slice(vocab.TIME_SHIFT, vocab.VELOCITY)),
    ):
        changed = logits.clone()
        bias(changed)
        before, after = torch.softmax(logits / temperature, 0), torch.softmax(changed / temperature, 0)
        assert after[ids].sum().item() == pytest.approx(before[ids].sum().item(), abs=1e-5)
        outside = torch.ones(vocab.VOCAB_SIZE, dtype=torch.bool)
        outside[ids] = False
        assert torch.equal(changed[outside], logits[outside])
        assert not torch.allclose(changed[ids], logits[ids])


def test_with_dynamics_follow_a_velocity_token_is_followed_by_its_note(tiny_model):
    """Pushed toward a level, the model sometimes emitted the velocity token and then waited, and
    the level was lost; in the data a velocity token is always followed by a note-on."""

    def after_velocity(tokens: list[int]) -> set[str]:
        return {
            vocab.event_type(b) for a, b in zip(tokens, tokens[1:], strict=False) if vocab.VELOCITY <= a < vocab.PAD
        }

    player = phrase(48, 29, 25)
    assert after_velocity(sampled_tokens(tiny_model, player, 800)) > {"note_on"}  # the random model alone
    assert after_velocity(sampled_tokens(tiny_model, player, 800, dynamics_follow=2.0)) == {"note_on"}


def test_dynamics_follow_pulls_the_neighbouring_bins():
    state = replayed(phrase(30, 20, 25), [0] * 120)
    flat = torch.zeros(vocab.VOCAB_SIZE)
    dynamics_follow_bias(1.0, state, flat)
    bias = flat[vocab.VELOCITY : vocab.PAD]
    assert bias[20] == bias.max()
    assert all(bias[b] > 1.0 for b in (18, 19, 21, 22))  # the neighbours gain too
    assert bias[19] > bias[18] and bias[21] > bias[22]
    assert all(bias[b] < 0 for b in (10, 16, 24, 31))  # the rest loses: its total is kept


def test_density_factor_is_clamped_and_lifts_a_silent_model():
    state = replayed(phrase(40, 20, 5), [0] * 160)  # 20 notes a second
    assert density_factor(1.0, 1.0, state) == pytest.approx(1.0)  # the model has not played: its rate is the player's
    assert density_factor(1.0, 0.5, state) == pytest.approx(0.5)
    assert density_factor(4.0, 0.25, state) == pytest.approx(0.25)  # (1/4)^4 clamped to 1/4
    for token in phrase(20, 20, 5, seed=5):  # the model at the player's rate
        state.push(token, sampled=True)
    at_rate = density_factor(1.0, 1.0, state)
    assert at_rate == pytest.approx(1.0, abs=0.15)
    state.push(vocab.TIME_SHIFT + 99, sampled=True)  # then a second of the model's silence
    assert density_factor(1.0, 1.0, state) > 1.5 * at_rate
    assert density_factor(4.0, 4.0, state) == 4.0


def test_follows_hear_only_the_player():
    player = phrase(30, 28, 8)
    model_part = phrase(30, 4, 50, seed=9)
    tokens = player + model_part
    state = replayed(tokens, [0] * len(player) + [1] * len(model_part))
    alone = replayed(player, [0] * len(player))
    assert state.player_velocities == alone.player_velocities
    assert state.note_rate(model=False) == alone.note_rate(model=False)
    assert state.model_velocities[4] > 0 and alone.player_velocities[4] == 0.0


def test_exact_rewind_after_truncate(tiny_model):
    """An engine rolled back (the live path: look-ahead dropped when the player plays) holds the
    same velocity histograms and note rates as one that never sampled past the cut, to the bit."""
    follow = Constraints(dynamics_follow=2.0, density_follow=2.0, density_ratio=0.5)
    engine = Engine(tiny_model, sampling=SamplingSettings(seed=3), constraints=follow, device="cpu")
    engine.append(phrase(70, 26, 12))  # 280 tokens: past a snapshot boundary
    engine.sample(300)
    before = (list(engine.state.model_velocities), [list(side) for side in engine.state.rates])
    cut = 280 + 150  # into the model's part, past another snapshot
    engine.truncate(cut)
    fresh = replayed(engine.tokens, engine.sampled)
    assert engine.state.player_velocities == fresh.player_velocities
    assert engine.state.model_velocities == fresh.model_velocities
    assert engine.state.rates == fresh.rates and engine.state.clock_ms == fresh.clock_ms
    assert (engine.state.model_velocities, engine.state.rates) != before

    def biased(state: StreamState) -> torch.Tensor:
        logits = torch.zeros(vocab.VOCAB_SIZE)
        constraint_mask(follow, state, logits)
        return logits

    assert torch.equal(biased(engine.state), biased(fresh))
    engine.append(phrase(3, 10, 30, seed=2))  # the player plays on from the cut
    follow_on = replayed(engine.tokens, engine.sampled)
    assert torch.equal(biased(engine.state), biased(follow_on))


def test_strength_zero_leaves_logits_bit_identical(tiny_model):
    state = replayed(phrase(40, 28, 8), [0] * 160)
    logits = torch.randn(vocab.VOCAB_SIZE, generator=torch.Generator().manual_seed(2))
    for off in (Constraints(), Constraints(dynamics_follow=0.0, density_follow=0.0, density_ratio=0.5)):
        changed = logits.clone()
        constraint_mask(off, state, changed, 0.8)
        assert torch.equal(changed, logits)
    player = phrase(40, 28, 8)
    assert sampled_tokens(tiny_model, player, 120) == sampled_tokens(
        tiny_model, player, 120, dynamics_follow=0.0, density_follow=0.0, density_ratio=2.0
    )


def test_follow_settings_are_checked():
    for bad in (
        dict(dynamics_follow=-0.1),
        dict(dynamics_follow=16.5),
        dict(density_follow=-1.0),
        dict(density_ratio=0.1),
        dict(density_ratio=5.0),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Constraints(**bad).validate()


def test_every_control_is_shown_when_selected_in_a_small_panel():
    """The follows add controls: where the panel has fewer lines than rows, the rows scroll with
    the selection (the UI's 80x24 layout has 7 lines for 9 rows)."""
    from types import SimpleNamespace

    from liveperceiver.live.settings import Settings
    from liveperceiver.ui.widgets import CONTROLS, controls_text

    snapshot = SimpleNamespace(settings=Settings())
    for index, (label, _, _) in enumerate(CONTROLS):
        lines = controls_text(snapshot, index, height=7).plain.splitlines()
        assert len(lines) == 7
        assert any("▸" + label in line for line in lines), label
    assert len(controls_text(snapshot, 0).plain.splitlines()) == -(-len(CONTROLS) // 2)  # no height: all rows


def test_follow_flags_and_preset_keys(tmp_path, capsys):
    """play, continue and eval take the follows as flags, presets as [sampling] keys; a value out of
    range is one line naming the flag and the allowed values, before any model is loaded."""
    from liveperceiver.cli import build_parser, main
    from liveperceiver.core.errors import UserError
    from liveperceiver.live.play import settings_from_args
    from liveperceiver.live.presets import load_preset

    preset = tmp_path / "mine.toml"
    preset.write_text("[sampling]\ndynamics_follow = 0\ndensity_follow = 2\ndensity_ratio = 0.5\n")
    loaded = load_preset(preset)
    assert (loaded.dynamics_follow, loaded.density_follow, loaded.density_ratio) == (0.0, 2.0, 0.5)
    assert loaded.engine_constraints().density_ratio == 0.5
    played = settings_from_args(build_parser().parse_args(["play", "--density-ratio", "2", "--dynamics-follow", "0"]))
    assert (played.density_ratio, played.dynamics_follow) == (2.0, 0.0)
    with pytest.raises(UserError, match=r"^--density-ratio = 5\.0 is outside the allowed values"):
        settings_from_args(build_parser().parse_args(["play", "--density-ratio", "5"]))
    assert main(["eval", "x.mid", "--dynamics-follow", "17"]) == 2
    assert capsys.readouterr().err == (
        "liveperceiver: error: --dynamics-follow 17 is outside the allowed values (0 (off) .. 16)\n"
    )
    assert main(["continue", "x.mid", "-o", str(tmp_path / "o.mid"), "--density-ratio", "0.1"]) == 2
    assert capsys.readouterr().err == (
        "liveperceiver: error: --density-ratio 0.1 is outside the allowed values (0.25 .. 4 times the player's note rate)\n"
    )


def test_continuation_statistics_of_known_notes():
    """eval's velocity overlap (32 token bins) and notes per second (every note-on, a pitch struck
    again while it sounds included) on tokens written by hand."""
    from liveperceiver.training.continuations import note_stats, rate_ratio, velocity_overlap

    ts = vocab.TIME_SHIFT + 49  # 0.5 s
    # bins 20, 20, 10, 10 against 20, 10, 10, 5: min(2/4, 1/4) + min(2/4, 2/4) = 0.75
    a = [376, 60, ts, 188, 376, 62, ts, 190, 366, 64, ts, 192, 366, 65, ts, 193]
    b = [376, 60, ts, 188, 366, 62, ts, 190, 366, 64, ts, 192, 361, 65, ts, 193]
    assert velocity_overlap(note_stats(a), note_stats(b)) == pytest.approx(0.75)
    assert velocity_overlap(note_stats(a), note_stats(a)) == pytest.approx(1.0)
    assert note_stats(a)["density"] == pytest.approx(2.0)  # 4 notes in 2 s
    restruck = [376, 60, ts, 376, 60, ts, 188, ts, ts]  # C4 struck twice before its note-off: two notes heard
    assert note_stats(restruck)["density"] == pytest.approx(1.0)  # 2 note-ons in 2 s (both heard)
    assert rate_ratio(1.5, 2.0) == 0.75 and rate_ratio(1.0, 0.0) is None
    assert note_stats(a)["longest_rest"] == pytest.approx(0.5)  # a note-on every 0.5 s, the last 0.5 s before the end
    wait = [vocab.TIME_SHIFT + 99] * 3  # 3 s
    assert note_stats([*wait, 376, 60, ts, 188])["longest_rest"] == pytest.approx(3.0)  # from the start
    assert note_stats([376, 60, ts, 188, *wait, ts])["longest_rest"] == pytest.approx(4.0)  # to the end
    assert note_stats(wait)["longest_rest"] == pytest.approx(3.0)  # no note at all: all of it


def test_eval_continuations_report_the_follow_statistics(tiny_model):
    from liveperceiver.training.continuations import continuation_stats

    pieces = [phrase(40, 28, 12, seed=s) for s in range(3)]
    follow = Constraints(no_orphan_note_off=True, dynamics_follow=4.0, density_follow=1.0, density_ratio=0.5)
    report = continuation_stats(
        tiny_model, pieces, 3, prompt_len=64, length=64, constraints=follow, num_latents=1, device="cpu"
    )
    assert report["count"] == 3 and 0.0 <= report["velocity_overlap"] <= 1.0
    assert report["prompt_velocity_overlap"] == pytest.approx(1.0)  # one level throughout: the prompt's own matches
    for key in ("notes_per_second_ratio", "polyphony_ratio"):
        assert report[key]["prompts"] == 3 and 0.0 <= report[key]["within_25_percent"] <= 1.0
    assert "density_ratio=0.5" in report["constraints"] and "dynamics_follow=4.0" in report["constraints"]
