"""In-session adaptation (liveperceiver/inference/adapt.py): the session cache is exactly a Kneser-Ney n-gram of
the stream however it was pushed and rolled back, its mix with the model is a distribution that
lowers the NLL of a repetitive real piece, the engine keeps it in step and leaves the model alone at
weight 0, and `eval`, the settings and the flags carry it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError
from liveperceiver.inference.adapt import (
    PRIOR_FRACTION,
    CacheWeight,
    loop_rate,
    mix_logits,
    mixed_probability,
)
from liveperceiver.inference.engine import Engine
from liveperceiver.inference.sampling import Constraints, SamplingSettings
from liveperceiver.inference.session_cache import SIZE, SessionCache
from liveperceiver.live.settings import Settings
from liveperceiver.training.ngram import KneserNey
from liveperceiver.training.nll import adapted_nll, model_nll, stream_nll


def reference(tokens: list[int], order: int, window: int) -> np.ndarray:
    """eval's Kneser-Ney n-gram fitted from scratch on the last `window` tokens, over the real events."""
    kept = tokens[-window:]
    ngram = KneserNey(order, vocab_size=SIZE).fit([kept])
    return ngram.distribution(tuple(kept[len(kept) - order + 1 :]) if order > 1 else ())


@pytest.mark.parametrize("order, window", [(4, 10**6), (5, 40), (2, 3), (1, 10)])
def test_cache_is_kneser_ney_of_the_stream_after_pushes_and_rollbacks(chorale_tokens, order, window):
    tokens = chorale_tokens[:600]
    rng = np.random.default_rng(order)
    cache = SessionCache(order=order, window=window)
    length = 0
    for _ in range(40):  # push a stretch, roll part of it back, as a live session does with its look-ahead
        push = int(rng.integers(1, 40))
        for token in tokens[length : length + push]:
            cache.push(token)
        back = int(rng.integers(0, push + 1))
        cache.truncate(length + push - back)
        length = len(cache)
        assert cache.tokens == tokens[:length]
        if length:
            got = cache.distribution()
            assert got.sum() == pytest.approx(1.0, abs=1e-12)
            np.testing.assert_allclose(got, reference(tokens[:length], order, window), rtol=0, atol=1e-12)
    assert length > 200


def test_the_garbage_collector_never_scans_the_cache(chorale_tokens):
    """Everything the cache counts is in dictionaries of integers, which CPython leaves out of the
    garbage collector's lists: with its records as lists, a full collection over a full window's
    80,000 of them took 8-13 ms holding the GIL, stalling a live session's scheduler (now 1-2 ms)."""
    import gc

    cache = SessionCache(order=8, window=500)
    cache.extend(chorale_tokens[:900])
    cache.truncate(700)
    cache.extend(chorale_tokens[700:800])
    gc.collect()  # as the collector would have by now: tuples of integers leave its lists
    assert len(cache.histories) > 1000 and len(cache.grams) > 1000
    assert not gc.is_tracked(cache.grams)  # the histories' dict itself is one object to scan, its records none
    assert not any(gc.is_tracked(record) for record in cache.histories.values())


def test_an_adapting_engine_leaves_no_growing_heap_for_the_garbage_collector(tiny_model, chorale_tokens):
    """What adaptation and the stream's state keep per token (the cache's counts, the learnt weight's
    history, the steps, the output layer's updates, the state's snapshots) is bounded or out of the
    collector's lists: a full collection, which holds the GIL, then costs the same after a long
    session as after a short one."""
    import gc

    engine = Engine(tiny_model, num_latents="4:8", sampling=SamplingSettings(seed=1), device="cpu", adapt=1.0)
    played = (chorale_tokens * 16)[:7000]

    def duet(tokens: list[int]) -> None:  # the player's tokens come, the model answers ahead and is rolled back
        for start in range(0, len(tokens), 4):
            engine.append(tokens[start : start + 4])
            engine.sample(6)
            engine.truncate(len(engine) - 6)

    duet(played[:3000])
    gc.collect()
    before = len(gc.get_objects())
    duet(played[3000:7000])  # 4,000 more tokens, 6,000 sampled and rolled back
    gc.collect()
    assert len(gc.get_objects()) - before < 150  # 8,000 more with the learnt weight's history as lists


@pytest.mark.parametrize("own_weight", [0.0, 0.5, 1.0])
def test_rollback_restores_the_counts_exactly_with_own_tokens(chorale_tokens, own_weight):
    """The model's own tokens count `own_weight`: after any pushes and truncates the counts are the
    ones a fresh cache gets from the kept stream, to the unit (no float drift)."""
    tokens = chorale_tokens[:400]
    sampled = np.random.default_rng(1).integers(0, 2, len(tokens)).tolist()
    cache = SessionCache(order=6, window=100, own_weight=own_weight)
    for keep in (350, 120, 99, 5):
        cache.truncate(0) if keep == 350 else None
        cache.extend(tokens[len(cache) : 400], sampled[len(cache) : 400])
        cache.truncate(keep)
        fresh = SessionCache(order=6, window=100, own_weight=own_weight)
        fresh.extend(tokens[:keep], sampled[:keep])
        assert cache.histories == fresh.histories and cache.grams == fresh.grams
        assert np.array_equal(cache.distribution(), fresh.distribution())
        assert cache.distribution().sum() == pytest.approx(1.0, abs=1e-12)
    at_once = SessionCache(order=6, window=100, own_weight=own_weight)  # as an engine turned on late builds it
    at_once.extend(tokens, sampled)
    one_by_one = SessionCache(order=6, window=100, own_weight=own_weight)
    for token, flag in zip(tokens, sampled, strict=True):
        one_by_one.push(token, flag)
    assert at_once.histories == one_by_one.histories and at_once.grams == one_by_one.grams
    at_once.truncate(250)
    one_by_one.truncate(250)
    assert at_once.histories == one_by_one.histories and at_once.grams == one_by_one.grams
    if own_weight < 1.0:  # an own token counts less than the player's
        player, own = SessionCache(order=2), SessionCache(order=2, own_weight=own_weight)
        player.extend([60, 61, 60, 61, 60])
        own.extend([60, 61, 60, 61, 60], [0, 1, 0, 1, 0])
        assert own.distribution()[61] < player.distribution()[61]


def test_mix_is_a_distribution_and_the_engine_samples_from_it(tiny_model, chorale_tokens):
    cache = SessionCache()
    cache.extend(chorale_tokens[:300])
    logits = torch.randn(vocab.VOCAB_SIZE) * 3
    mixed = mix_logits(logits, cache, 0.6)
    p_model = torch.softmax(logits.double(), -1).numpy()
    a, b = cache.terms()
    w = 0.6 * PRIOR_FRACTION  # no learnt weight given: the prior's mean fraction of adapt
    expected = (1 - w) * p_model + w * (np.append(a, 0.0) + b * p_model)
    assert float(mixed.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(mixed.exp().double().numpy(), expected, rtol=1e-5, atol=1e-9)
    assert 0 < b < 1 and a.sum() > 0.1  # the cache has an opinion here
    token = chorale_tokens[300]
    assert mixed_probability(p_model[token], a[token], b, w) == pytest.approx(expected[token])
    empty = SessionCache()
    assert mix_logits(logits, empty, 0.6) is logits  # nothing heard: the model alone


def test_adaptation_lowers_the_nll_of_a_repetitive_real_piece(tiny_model, chorale_tokens):
    pieces = [chorale_tokens[:1200]]
    alone, targets = model_nll(tiny_model, pieces)
    adapted = adapted_nll(alone, pieces, 0.6)
    assert adapted.mean() < alone.mean() - 1.0, (adapted.mean(), alone.mean())
    assert adapted_nll(alone, pieces, 0.0) is alone
    # the engine's own cache, as play mixes it: the same gain at the live window
    live = stream_nll(tiny_model, pieces, 1, 400, progress=False, adapt=0.6)
    assert live["nll"] < live["nll_model"] - 1.0
    assert loop_rate(pieces[0]) > 0.3  # it is repetitive: 40% of its 16-token stretches came before


def test_the_engine_mixes_as_eval_scores(tiny_model, chorale_tokens, monkeypatch):
    """The engine's mix of full distributions (adapt.mix_logits, what `play` samples from) and
    eval's mix of the true tokens' probabilities (adapted_nll, the cache alone) agree token by token
    on note-ons and time-shifts: on pieces shorter than the model's latent window both see every
    earlier token as a latent, and the session experts move probability only within the velocities
    and within the note-offs, keeping each type's total. On those two types the experts change it.
    (The output layer's learning, dynamic.py, is held still here: tests/test_dynamic.py.)"""
    from liveperceiver.inference import engine as engine_module
    from liveperceiver.training.nll import stream_token_nll

    monkeypatch.setattr(engine_module, "DYNAMIC_RATE", 0.0)

    pieces = [chorale_tokens[i : i + 30] for i in (0, 300, 600)]
    alone, targets = model_nll(tiny_model, pieces)
    system, live_alone = stream_token_nll(
        tiny_model, pieces, tiny_model.config.max_latents, None, 0.7, None, "cpu", False
    )
    assert len(system) == len(alone) == 87
    np.testing.assert_allclose(live_alone, alone, atol=1e-5)
    cache_only = adapted_nll(alone, pieces, 0.7)
    untouched = targets < vocab.NOTE_OFF
    untouched |= (targets >= vocab.TIME_SHIFT) & (targets < vocab.VELOCITY)
    leaned = ~untouched
    assert untouched.sum() > 30 and leaned.sum() > 30
    np.testing.assert_allclose(system[untouched], cache_only[untouched], atol=1e-5)
    # all but a piece's first velocity (no player's velocity yet to lean on)
    assert (np.abs(system[leaned] - cache_only[leaned]) > 1e-4).sum() >= leaned.sum() - len(pieces)
    assert system.mean() < alone.mean() - 0.05


def test_engine_keeps_the_cache_in_step_and_weight_zero_is_the_model_alone(tiny_model, chorale_tokens):
    def engine(adapt: float) -> Engine:
        return Engine(
            tiny_model,
            num_latents=1,
            sampling=SamplingSettings(temperature=1.0, seed=3),
            constraints=Constraints(no_orphan_note_off=True),
            device="cpu",
            adapt=adapt,
        )

    plain = engine(0.0)
    assert plain.cache is None  # off from the start: no cache, no cost
    toggled = engine(0.6)
    toggled.configure(adapt=0.0)  # on, then off: the cache follows the stream, the logits are the model's
    adapted = engine(0.6)
    runs = []
    for e in (plain, toggled, adapted):
        e.append(chorale_tokens[:200])
        first = e.sample(30)
        e.truncate(210)  # a rollback of unplayed look-ahead
        e.append(chorale_tokens[200:230])
        runs.append(first + e.sample(30))
    assert runs[0] == runs[1]
    assert runs[2] != runs[0]
    for e in (toggled, adapted):
        fresh = SessionCache()
        fresh.extend(e.tokens, e.sampled)
        assert e.cache.histories == fresh.histories and e.cache.grams == fresh.grams
    with pytest.raises(ValueError, match="adapt 1.5 outside 0..1"):
        adapted.configure(adapt=1.5, num_latents=2)
    assert adapted.adapt == 0.6 and adapted.num_latents == 1  # nothing changed
    late = engine(0.0)
    late.append(chorale_tokens[:100], sampled=[1] * 100)
    late.configure(adapt=0.3)  # turned on mid-session: built from the stream so far, whose tokens they were
    fresh = SessionCache()
    fresh.extend(chorale_tokens[:100], [1] * 100)
    assert late.cache.histories == fresh.histories and late.adapt == 0.3


def test_eval_reports_nll_with_and_without_adaptation(tmp_path, chorale_tokens):
    from conftest import MODEL_GOLDEN

    from liveperceiver.cli import main
    from liveperceiver.core.tokenizer import decode_midi, write_midi

    midi = tmp_path / "chorale.mid"
    write_midi(decode_midi(chorale_tokens[:800]), midi)
    reports = {}
    for weight in ("0.6", "0"):
        out = tmp_path / f"eval-{weight}.json"
        argv = ["eval", "--model", str(MODEL_GOLDEN / "tiny-a"), str(midi), "--adapt", weight, "--json", str(out)]
        assert main(argv) == 0
        reports[weight] = json.loads(out.read_text())
    on, off = reports["0.6"], reports["0"]
    assert on["nll_model"] == pytest.approx(off["nll_model"])  # the model alone, training windows, either way
    assert on["nll"] < off["nll"] - 1.0 and on["adapt"]["weight"] == 0.6 == on["system"]["adapt"]
    from liveperceiver.core.shipped import model_max_latents

    live = Settings().latent_window(model_max_latents(str(MODEL_GOLDEN / "tiny-a"))).setting  # auto, for this model
    assert on["system"]["num_latents"] == live  # the system as play runs it
    assert f"dynamics_follow={Settings().dynamics_follow}" in on["system"]["constraints"]
    assert on["perplexity"] == pytest.approx(np.exp(on["nll"]))
    for kind, row in on["by_type"].items():
        assert row["nll_model"] == pytest.approx(off["by_type"][kind]["nll_model"])
    assert on["by_type"]["note_on"]["nll"] < off["by_type"]["note_on"]["nll"] - 1.0


def test_the_system_nll_is_what_play_samples_from(tiny_model, chorale_tokens):
    """eval's `nll` is the distribution the engine samples from at temperature 1, token by token:
    the model at the window with the output layer the session taught it, the session cache mixed
    in, then play's guards and follows."""
    from liveperceiver.inference.adapt import mix_logits
    from liveperceiver.inference.sampling import Constraints, constraint_mask
    from liveperceiver.training.nll import stream_token_nll

    pieces = [chorale_tokens[:150]]  # from its start: every note-off closes a note-on of the piece
    play = Settings().engine_constraints()
    system, alone = stream_token_nll(tiny_model, pieces, "4:8", None, 0.7, play, progress=False)
    expected_system, expected_alone = [], []
    with torch.inference_mode():
        for piece in pieces:
            engine = Engine(tiny_model, num_latents="4:8", adapt=0.7, constraints=play, device="cpu")
            engine.append(piece[:1])
            for target in piece[1:]:
                logits = engine.next_logits().float()  # with the output layer the session taught it
                model = engine.head.model_logits()[-1].float()  # the model's own projection
                expected_alone.append(-float(torch.log_softmax(model, -1)[target]))
                position = len(engine.tokens)  # the weight and the output layer learn as the engine's do
                hidden = engine.head.hidden[-1]  # tests/test_dynamic.py
                mixed = mix_logits(logits, engine.cache, 0.7, engine.state, engine.cache_weight, position, hidden)
                constraint_mask(replace(play, repeated_note_offs=True), engine.state, mixed)  # real streams
                expected_system.append(-float(torch.log_softmax(mixed, -1)[target]))
                engine.append([target])
    np.testing.assert_allclose(system, expected_system, atol=1e-6)
    np.testing.assert_allclose(alone, expected_alone, atol=1e-6)
    assert np.isfinite(system).all()  # play's guards never rule out a true token
    plain, _ = stream_token_nll(tiny_model, pieces, "4:8", None, 0.7, Constraints(), progress=False)
    assert not np.allclose(plain, system)  # the guards and follows are in it
    first_only, _ = stream_token_nll(tiny_model, pieces, "4:8", 100, 0.0, None, progress=False)
    np.testing.assert_allclose(first_only, alone[:100], atol=1e-6)  # adaptation 0, no constraints: the model


def test_adapt_setting_validates_in_one_line(tmp_path, capsys):
    from liveperceiver.cli import main
    from liveperceiver.live.presets import load_preset

    assert Settings().adapt > 0  # on by default
    with pytest.raises(ValueError, match=r"^adapt = 1\.5 is outside the allowed values \(0 \(off\) \.\. 1\)$"):
        Settings(adapt=1.5).validate()
    preset = tmp_path / "p.toml"
    preset.write_text("[sampling]\nadapt = -0.1\n")
    with pytest.raises(UserError, match=r"p\.toml: sampling\.adapt = -0\.1 is outside the allowed values"):
        load_preset(preset)
    preset.write_text("[sampling]\nadapt = 0\n")
    assert load_preset(preset).adapt == 0.0
    assert main(["eval", "x.mid", "--adapt", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "liveperceiver: error: --adapt 2 is outside the allowed values (0 (off) .. 1)\n"
    from liveperceiver.cli import build_parser
    from liveperceiver.live.play import settings_from_args

    with pytest.raises(UserError, match=r"^--adapt = 1\.5 is outside the allowed values \(0 \(off\) \.\. 1\)$"):
        settings_from_args(build_parser().parse_args(["play", "--adapt", "1.5"]))
    assert settings_from_args(build_parser().parse_args(["play", "--adapt", "0"])).adapt == 0.0


def test_bench_times_adaptation_in_the_engine_on_a_repetitive_stream(tiny_model):
    """`bench` times an adapting engine against one that never adapted (no cache at all), taking
    turns on a stream that repeats itself (the dear case for a cache): a step, a rolled-back step's
    share of the rollback and the player's token, each against the same without adaptation."""
    import math

    from liveperceiver.inference.adapt import practice_stream
    from liveperceiver.tools.bench import adaptation_cost

    stream = practice_stream(3000)
    assert len(stream) == 3000 and loop_rate(stream) > 0.3
    assert {vocab.event_type(t) for t in stream} == {"note_on", "note_off", "time_shift", "velocity"}
    cost = adaptation_cost(tiny_model, "cpu", steps=50)
    assert cost["adapt_step_ms_p50"] > 0 and cost["adapt_step_ms_p50_without"] > 0
    assert all(math.isfinite(cost[key]) for key in ("adapt_rollback_ms_p50", "adapt_absorb_ms_p50"))
    assert cost["adapt_ms_p50"] == pytest.approx(
        cost["adapt_step_ms_p50"]
        - cost["adapt_step_ms_p50_without"]
        + cost["adapt_rollback_ms_p50"]
        + cost["adapt_absorb_ms_p50"],
        abs=4e-4,
    )


def player_state(tokens: list[int]):
    from liveperceiver.inference.sampling import StreamState

    state = StreamState()
    for token in tokens:
        state.push(token)
    return state


def experts_by_type(experts) -> dict:
    """session_experts' distributions by their type's first id."""
    return {first: expert for first, expert, _ in experts}


SOFT_CHORD = [vocab.velocity_token(40), vocab.note_on(60), vocab.note_on(64), vocab.note_on(67), vocab.TIME_SHIFT + 30]


def test_session_experts_follow_the_players_velocities_and_end_the_oldest_note_first():
    from liveperceiver.inference.experts import OLDER_FIRST, OLDER_FIRST_AFTER_OFF, session_experts

    assert session_experts(player_state([vocab.TIME_SHIFT + 10])) == []  # nothing played: nothing to say
    experts = experts_by_type(session_experts(player_state(SOFT_CHORD * 4)))  # the chord struck four times
    velocity, ending = experts[vocab.VELOCITY], experts[vocab.NOTE_OFF]
    assert len(velocity) == vocab.NUM_VELOCITY_BINS and velocity.sum() == pytest.approx(1.0)
    assert velocity.argmax() == 40 // 4 and velocity[8:13].sum() > 0.7  # the player's level and its neighbours
    assert len(ending) == 128 and ending.sum() == pytest.approx(1.0)
    assert np.flatnonzero(ending).tolist() == [60, 64, 67]  # only sounding notes end
    assert ending[64] / ending[60] == pytest.approx(OLDER_FIRST) and ending[67] / ending[64] == pytest.approx(
        OLDER_FIRST
    )
    after_off = experts_by_type(session_experts(player_state([*SOFT_CHORD, vocab.note_off(60)])))[vocab.NOTE_OFF]
    assert after_off[67] / after_off[64] == pytest.approx(OLDER_FIRST_AFTER_OFF)  # simultaneous note-offs: oldest first
    assert after_off[64] > 0.9 and after_off[60] == 0.0
    loud = experts_by_type(
        session_experts(player_state([*SOFT_CHORD * 4, vocab.velocity_token(110), vocab.note_on(72)]))
    )
    assert loud[vocab.VELOCITY][110 // 4] > velocity[110 // 4] * 5  # it moves with the player


def test_in_play_the_note_off_expert_leans_on_the_models_own_notes():
    """A note the player holds is theirs to end: while the model's own notes sound, the expert
    spreads over those only (oldest first); with none of its own, over the player's."""
    from liveperceiver.inference.experts import session_experts

    state = player_state([vocab.velocity_token(60), vocab.note_on(48), vocab.TIME_SHIFT + 20])
    alone = experts_by_type(session_experts(state))[vocab.NOTE_OFF]
    assert alone[48] == pytest.approx(1.0)  # nothing of its own sounds: the player's note
    for token in (vocab.velocity_token(60), vocab.note_on(60), vocab.note_on(64)):
        state.push(token, sampled=True)
    own = experts_by_type(session_experts(state))[vocab.NOTE_OFF]
    assert own[48] == 0.0 and own[60] > own[64] > 0.0 and own.sum() == pytest.approx(1.0)
    # mixed in (an empty cache: the expert alone), it reorders the model's own note-offs only: their
    # total stays the model's, so its notes do not end sooner; the player's note and the pitches not
    # sounding keep their own probability
    logits = torch.randn(vocab.VOCAB_SIZE, generator=torch.Generator().manual_seed(4)) * 2
    plain, leaned = torch.softmax(logits, -1), mix_logits(logits, SessionCache(), 0.7, state).exp()
    mine = [vocab.note_off(60), vocab.note_off(64)]
    assert float(leaned[mine].sum()) == pytest.approx(float(plain[mine].sum()), rel=1e-5)
    others = [t for t in range(vocab.NOTE_OFF, vocab.TIME_SHIFT) if t not in mine]
    torch.testing.assert_close(leaned[others], plain[others])
    assert float(leaned[mine[0]] / leaned[mine[1]]) > float(plain[mine[0]] / plain[mine[1]])  # the older first


def test_the_experts_made_before_are_the_experts_made_afresh(chorale_tokens):
    """session_experts keeps each expert while its input is unchanged (most steps): through a stream
    of the player's and the model's tokens, with rollbacks, it always equals a fresh state's."""
    from liveperceiver.inference.experts import session_experts
    from liveperceiver.inference.sampling import StreamState

    tokens = chorale_tokens[:700]
    flags = bytearray(int(index % 50 > 30) for index in range(len(tokens)))  # the model's turns
    state, made = StreamState(), 0
    for index, (token, flag) in enumerate(zip(tokens, flags, strict=True)):
        state.push(token, sampled=bool(flag))
        if index % 97 == 96:  # a rollback of 12 tokens, played again
            state.rewind(tokens, flags, index - 11)
            for back in range(index - 11, index + 1):
                state.push(tokens[back], sampled=bool(flags[back]))
        fresh = StreamState()
        for back in range(index + 1):
            fresh.push(tokens[back], sampled=bool(flags[back]))
        kept, afresh = session_experts(state), session_experts(fresh)
        assert len(kept) == len(afresh)
        for (first, expert, members), (first2, expert2, members2) in zip(kept, afresh, strict=True):
            assert first == first2 and np.array_equal(expert, expert2)
            assert (members is None) == (members2 is None) and (members is None or np.array_equal(members, members2))
        made += len(kept)
    assert made > 600 and len(state.experts) == 2  # both experts spoke, and were kept


def near_bin_10(probs: torch.Tensor) -> float:
    """The share of a distribution's velocity tokens within two bins of bin 10 (MIDI 40)."""
    velocities = probs[vocab.VELOCITY : vocab.PAD]
    return float(velocities[8:13].sum() / velocities.sum())


def test_the_experts_move_velocities_and_note_offs_within_their_type_only():
    """Mixed into the model alone (an empty cache: the experts only), each type keeps its total."""
    state = player_state(SOFT_CHORD * 4)
    types = [
        (0, vocab.NOTE_OFF),
        (vocab.NOTE_OFF, vocab.TIME_SHIFT),
        (vocab.TIME_SHIFT, vocab.VELOCITY),
        (vocab.VELOCITY, vocab.PAD),
    ]
    for seed in range(3):
        logits = torch.randn(vocab.VOCAB_SIZE, generator=torch.Generator().manual_seed(seed)) * 2
        plain, leaned = torch.softmax(logits, -1), mix_logits(logits, SessionCache(), 0.7, state).exp()
        assert float(leaned.sum()) == pytest.approx(1.0, abs=1e-5)
        for low, high in types:  # whether a note starts, ends or time passes: unchanged
            assert float(leaned[low:high].sum()) == pytest.approx(float(plain[low:high].sum()), abs=1e-6)
        torch.testing.assert_close(leaned[: vocab.NOTE_OFF], plain[: vocab.NOTE_OFF])
        assert near_bin_10(leaned) > near_bin_10(plain) + 0.2  # toward the player's level
        assert float(leaned[vocab.note_off(60)]) > float(plain[vocab.note_off(60)])  # the oldest note gains
        assert float(leaned[vocab.note_off(50)]) < float(plain[vocab.note_off(50)])  # a silent pitch loses
    assert mix_logits(logits, SessionCache(), 0.7, player_state([vocab.TIME_SHIFT])) is logits  # nothing to say


def test_an_adapting_engine_answers_at_the_players_level(tiny_model, chorale_tokens, monkeypatch):
    """Sampled from a real model: with the velocity expert the answer's velocities sit nearer the
    player's than the same engine's without it (its share set to 0), the cache mixed in either way."""
    import liveperceiver.inference.adapt as adapt

    soft = [token for token in chorale_tokens[:400] if not vocab.VELOCITY <= token < vocab.PAD]
    prompt = []
    for token in soft:  # the chorale played pianissimo: bin 6 before every note
        prompt += [vocab.velocity_token(24), token] if token < vocab.NOTE_OFF else [token]
    distances, share_in_play = {}, adapt.EXPERT_SHARE
    for share in (share_in_play, 0.0):
        monkeypatch.setattr(adapt, "EXPERT_SHARE", share)
        engine = Engine(tiny_model, num_latents=1, sampling=SamplingSettings(seed=5), device="cpu", adapt=0.7)
        engine.append(prompt)
        sampled = engine.sample(400)
        levels = [token - vocab.VELOCITY for token in sampled if vocab.VELOCITY <= token < vocab.PAD]
        assert len(levels) > 20
        distances[share] = np.mean([abs(level - 6) for level in levels])
    assert distances[share_in_play] < distances[0.0] - 1.0, distances


def test_the_cache_weight_follows_whichever_predicts_the_player_better():
    """CacheWeight's posterior: tokens the cache predicts far better than the model pull the weight
    toward adapt, tokens it gets wrong pull it toward 0, and older tokens are forgotten, so it turns
    around within a few dozen tokens when the music changes."""
    weight = CacheWeight()
    prior = weight.fraction
    assert prior == pytest.approx(PRIOR_FRACTION)
    for position in range(40):  # a repeated figure: the cache sure and right, the model unsure
        weight.judge(position, p_model=0.02, a_token=0.8, b=0.1, adapt=1.0)
    assert weight.fraction > 0.95
    for position in range(40, 80):  # new material: the cache sure of the old continuation, wrong
        weight.judge(position, p_model=0.3, a_token=0.0, b=0.1, adapt=1.0)
    assert weight.fraction < 0.2
    nothing_heard = CacheWeight()  # a context the cache never saw: b = 1, a = 0, every weight alike
    for position in range(20):
        nothing_heard.judge(position, p_model=0.3, a_token=0.0, b=1.0, adapt=1.0)
    assert nothing_heard.fraction == pytest.approx(prior)


def test_the_engine_learns_the_weight_from_the_players_tokens_and_undoes_it_on_rollback(tiny_model, chorale_tokens):
    """The learnt weight is judged by the player's tokens only: at the step that predicted one (eval,
    and a player's token entering look-ahead), or else from the latent window's rows once they are
    run, with the same probabilities (the window is exact); a rollback undoes the judgements past it
    exactly. The model's own tokens are never judged (they fade the verdict: the next test)."""
    prior = PRIOR_FRACTION
    # eval's way: a step predicts every token, judged as it is appended
    stepped = Engine(tiny_model, num_latents="4:8", device="cpu", adapt=1.0)
    stepped.append(chorale_tokens[:1])
    for target in chorale_tokens[1:260]:
        stepped.played_logits(stepped.next_logits().float(), temperature=1.0)
        stepped.append([target])
    # play's way: the player's tokens come while the engine waits; it runs their rows when idle
    waiting = Engine(tiny_model, num_latents="4:8", device="cpu", adapt=1.0)
    for token in chorale_tokens[:260]:
        waiting.append([token])
        waiting.prepare()
    assert stepped.cache_weight.fraction != pytest.approx(prior)
    assert waiting.cache_weight.fraction == pytest.approx(stepped.cache_weight.fraction, abs=1e-6)
    # a burst of player tokens, judged from rows at the next step; the model's own tokens never
    waited = waiting.cache_weight.fraction
    waiting.append(chorale_tokens[260:266])
    assert waiting.cache_weight.fraction == waited  # not judged before their rows run
    waiting.sample(1)
    judged = waiting.cache_weight.fraction
    assert judged != pytest.approx(waited)
    waiting.sample(9)  # the model's own tokens are not judged: they only age the verdict toward the prior
    assert abs(waiting.cache_weight.fraction - prior) < abs(judged - prior)
    before_entry = len(waiting)
    waiting.truncate(before_entry - 7)  # the player comes in three tokens into the look-ahead
    rolled_back = waiting.cache_weight.fraction
    waiting.append(chorale_tokens[266:270])  # the first predicted by the step there, the rest by rows
    waiting.sample(1)
    assert waiting.cache_weight.fraction != pytest.approx(rolled_back)
    waiting.truncate(before_entry - 7)  # a rollback past those judgements: as if they had not come
    assert waiting.cache_weight.fraction == pytest.approx(rolled_back)
    waiting.append(chorale_tokens[270:273])  # waiting for their rows: a new window keeps them, one latent cannot
    waiting.configure(num_latents="8:16")
    assert len(waiting.cache_weight.deferred) == 3
    waiting.configure(num_latents=1)
    assert not waiting.cache_weight.deferred
    waiting.configure(num_latents="4:8")
    waiting.truncate(1)  # back to the first token: every judgement undone
    assert waiting.cache_weight.fraction == pytest.approx(prior)
    # on a repetitive real piece the learnt weight beats the prior's mean weight, which beats none
    from liveperceiver.training.nll import stream_token_nll

    system, alone = stream_token_nll(tiny_model, [chorale_tokens[:600]], 1, None, 1.0, None, "cpu", False)
    fixed = Engine(tiny_model, num_latents=1, device="cpu", adapt=1.0)  # mixed without a learnt weight
    fixed.append(chorale_tokens[:1])
    prior_nll = []
    with torch.inference_mode():
        for target in chorale_tokens[1:600]:
            logits = fixed.next_logits().float()
            prior_nll.append(-float(torch.log_softmax(mix_logits(logits, fixed.cache, 1.0, fixed.state), -1)[target]))
            fixed.append([target])
    assert system.mean() < np.mean(prior_nll) < alone.mean()


def test_the_models_own_tokens_fade_the_learnt_weight_back_toward_the_prior(tiny_model, chorale_tokens):
    """In a long answer nobody judges the weight: each token the model plays ages the player's
    verdict by FORGET, so the weight drifts back to the prior's mean instead of holding at its top
    (held there, an answer to a repetitive score prompt copied itself into a 64-token loop); a
    rollback of the answer restores the verdict exactly."""
    engine = Engine(tiny_model, num_latents=1, sampling=SamplingSettings(seed=1), device="cpu", adapt=1.0)
    engine.append(chorale_tokens[:1])
    for target in chorale_tokens[1:400]:  # the player's repetitive chorale, each token judged
        engine.played_logits(engine.next_logits().float(), temperature=1.0)
        engine.append([target])
    verdict = engine.cache_weight.fraction
    assert verdict > PRIOR_FRACTION + 0.2
    engine.sample(10)
    assert PRIOR_FRACTION < engine.cache_weight.fraction < verdict
    engine.sample(190)
    assert engine.cache_weight.fraction == pytest.approx(PRIOR_FRACTION, abs=0.01)
    engine.truncate(400)
    assert engine.cache_weight.fraction == verdict


def test_a_pad_token_in_the_stream_counts_nothing_and_teaches_nothing(tiny_model, chorale_tokens):
    """Pad is in the vocabulary but no event: an adapting engine takes it in a stream (a token file
    may hold one) without counting or learning from it, and rolls it back."""
    tokens = chorale_tokens[:40]
    engine = Engine(tiny_model, num_latents="4:8", sampling=SamplingSettings(seed=1), device="cpu", adapt=1.0)
    engine.append(tokens[:30])
    engine.step()  # a step predicted position 30
    engine.truncate(30)
    learnt = engine.dynamic.learnt
    engine.append([vocab.PAD])  # the player's pad comes there: nothing to learn
    assert engine.dynamic.learnt == learnt
    engine.step()
    engine.truncate(31)
    engine.append([tokens[30]])  # a real token where a step predicted it teaches
    assert engine.dynamic.learnt == learnt + 1
    engine.append(tokens[31:])
    assert len(engine.sample(8)) == 8
    counted = {token for record in engine.cache.histories.values() for token in record if token >= 0}
    assert vocab.PAD not in counted and counted  # no n-gram ends at pad
    engine.truncate(30)
    assert engine.cache.tokens == tokens[:30] and engine.dynamic.learnt == learnt
