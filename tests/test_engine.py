"""The streaming engine equals a full forward pass of the model over the same window, always."""

from __future__ import annotations

import random
import warnings
from collections import Counter

import pretty_midi
import pytest
import torch
from conftest import EVERYTHING, TEST_DEVICE

from liveperceiver.core import vocab
from liveperceiver.core.tokenizer import encode_midi
from liveperceiver.inference.engine import DTYPES, Engine
from liveperceiver.inference.sampling import Constraints, SamplingSettings, constraint_mask
from liveperceiver.inference.weights import Int8Linear, PackedLinear
from liveperceiver.live.settings import Settings
from liveperceiver.tools.bench import player_arrives, weights_read_per_step


def full_forward_logits(model, engine: Engine) -> torch.Tensor:
    start, latent_start, end = engine.window()
    with torch.no_grad():
        return model(torch.tensor([engine.tokens[start:end]]), latent_start - start)[0, -1]


def max_difference(model, engine: Engine) -> float:
    return (engine.next_logits().cpu() - full_forward_logits(model, engine)).abs().max().item()


def test_windowed_greedy_matches_reference(tiny_model, tiny_expected):
    for case in tiny_expected["windowed_greedy"]:
        engine = Engine(
            tiny_model, device=TEST_DEVICE, num_latents=case["num_latents"], sampling=SamplingSettings(greedy=True)
        )
        engine.append(case["prompt"])
        assert engine.sample(len(case["continuation"])) == case["continuation"]


def test_exact_through_rollbacks_latent_changes_and_rebases(tiny_model):
    rng = random.Random(3)
    engine = Engine(tiny_model, device=TEST_DEVICE, num_latents=4, sampling=SamplingSettings(seed=5))
    engine.append([rng.randrange(388) for _ in range(30)])
    worst = 0.0
    checked = 0
    while len(engine) < 9000:  # past the buffer capacity (96 + 4096), so the base moves twice
        if rng.random() < 0.02:
            engine.configure(num_latents=rng.randint(1, 32), prefix_cap=rng.randint(0, 64))
        if rng.random() < 0.02:
            engine.truncate(max(1, len(engine) - rng.randint(0, 40)))
        if rng.random() < 0.3:
            engine.append([rng.randrange(389) for _ in range(rng.randint(1, 3))])
        if len(engine) % 11 == 0 or len(engine) < 200:
            worst = max(worst, max_difference(tiny_model, engine))
            checked += 1
        engine.step()
    assert engine._base > 0  # the buffer was rebuilt on the way
    assert checked > 700
    assert worst < 1e-4


def test_deep_rollback_below_the_buffer_base(tiny_model):
    engine = Engine(tiny_model, device=TEST_DEVICE, num_latents=2, sampling=SamplingSettings(seed=1))
    engine.append([rng_token for rng_token in range(0, 388, 3)] * 80)
    engine.step()
    assert engine._base > 0
    engine.truncate(50)
    assert max_difference(tiny_model, engine) < 1e-4


@pytest.mark.parametrize("num_latents", [1, "4:8"])
def test_a_reset_after_a_rebase_then_a_stream_past_the_old_base(tiny_model, num_latents):
    """A session reset (truncate to 0) after its buffer was rebased, then the player plays on past the
    old base before the next step: the buffer rows from 0 must be written again (found by a review:
    every step raised until about 4,000 more tokens)."""
    engine = Engine(tiny_model, device=TEST_DEVICE, num_latents=num_latents, sampling=SamplingSettings(seed=1))
    engine.append([token for token in range(0, 388, 3)] * 80)
    engine.step()
    old_base = engine._base
    assert old_base > 0
    engine.reset()
    for index in range(old_base + 8 + engine.prefix_cap):
        engine.append([index * 7 % 388])
    assert max_difference(tiny_model, engine) < 1e-4
    engine.step()
    assert max_difference(tiny_model, engine) < 1e-4


def test_same_seed_same_output(tiny_model):
    outputs = []
    for _ in range(2):
        engine = Engine(tiny_model, device=TEST_DEVICE, sampling=SamplingSettings(temperature=1.2, top_p=0.9, seed=42))
        engine.append([60, 300, 188])
        outputs.append(engine.sample(64))
    assert outputs[0] == outputs[1]
    engine = Engine(tiny_model, device=TEST_DEVICE, sampling=SamplingSettings(temperature=1.2, top_p=0.9, seed=43))
    engine.append([60, 300, 188])
    assert engine.sample(64) != outputs[0]


def test_top_k_one_is_greedy(tiny_model):
    greedy = Engine(tiny_model, device=TEST_DEVICE, sampling=SamplingSettings(greedy=True))
    top1 = Engine(tiny_model, device=TEST_DEVICE, sampling=SamplingSettings(top_k=1, seed=0))
    for engine in (greedy, top1):
        engine.append([376, 60, 300, 188, 62])
    assert greedy.sample(40) == top1.sample(40)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_latents=0), "num_latents 0 outside 1..32"),
        (dict(num_latents=33), "num_latents 33 outside 1..32"),
        (dict(prefix_cap=65), "prefix cap 65 outside 0..64"),
        (dict(sampling=SamplingSettings(top_p=0.0)), r"top_p 0 is outside the allowed values \(above 0, at most 1\)"),
        (dict(sampling=SamplingSettings(top_p=1.5)), r"top_p 1.5 is outside"),
        (dict(sampling=SamplingSettings(temperature=0.0)), r"temperature 0 is outside the allowed values \(0.01 .. 5"),
        (dict(sampling=SamplingSettings(temperature=float("inf"))), "temperature inf is outside"),
        (dict(sampling=SamplingSettings(seed=2**64)), "seed 18446744073709551616 is outside"),
        (dict(constraints=Constraints(pitch_range=(80, 20))), "pitch_range"),
    ],
)
def test_bad_settings_are_refused_before_any_change(tiny_model, change, message):
    engine = Engine(tiny_model, device=TEST_DEVICE, num_latents=3, sampling=SamplingSettings(temperature=0.8))
    with pytest.raises(ValueError, match=message):
        engine.configure(num_latents=2, **change) if "num_latents" not in change else engine.configure(**change)
    assert engine.num_latents == 3 and engine.sampling.temperature == 0.8


def test_out_of_range_tokens_are_refused_without_change(tiny_model):
    engine = Engine(tiny_model, device=TEST_DEVICE)
    engine.append([60, 300])
    with pytest.raises(ValueError, match="389, outside 0..388"):
        engine.append([61, 389])
    assert engine.tokens == [60, 300]


def sounding_before_each(tokens: list[int]):
    """(token, pitches sounding just before it), following note-ons and note-offs as the tokenizer
    pairs them: a pitch struck again while it sounds needs a note-off for each note-on."""
    open_notes: Counter[int] = Counter()
    for token in tokens:
        yield token, {pitch for pitch, count in open_notes.items() if count > 0}
        if token < vocab.NOTE_OFF:
            open_notes[token] += 1
        elif token < vocab.TIME_SHIFT and open_notes[token - vocab.NOTE_OFF] > 0:
            open_notes[token - vocab.NOTE_OFF] -= 1


def sample_under(tiny_model, constraints: Constraints, steps: int = 400) -> tuple[list[int], list[int]]:
    engine = Engine(
        tiny_model, device=TEST_DEVICE, sampling=SamplingSettings(temperature=2.0, seed=7), constraints=constraints
    )
    engine.append([376, 60, 300, 62, 300, 64])
    return engine.tokens[:6], engine.sample(steps)


def test_constraint_no_orphan_note_off_bites(tiny_model):
    prompt, free = sample_under(tiny_model, Constraints())

    def orphans(tokens):
        return sum(128 <= t < 256 and t - 128 not in sounding for t, sounding in sounding_before_each(tokens))

    assert orphans(prompt + free) > 0  # the random tiny model does emit orphan note-offs
    prompt, constrained = sample_under(tiny_model, Constraints(no_orphan_note_off=True))
    assert orphans(prompt + constrained) == 0


@pytest.mark.parametrize("repeated", [False, True])
def test_a_pitch_struck_twice_while_sounding_is_closed_once_or_twice(tiny_model, repeated):
    """The tokenizer writes a note struck again under the pedal as two note-ons, then two note-offs
    (MAESTRO: 1,090 of its 107,484 notes). Sampling closes it once (the reference decoder would make
    the second note-off a doubled note); eval, scoring real streams, allows the second
    (`repeated_note_offs`)."""
    guard = Constraints(no_orphan_note_off=True, repeated_note_offs=repeated)
    engine = Engine(tiny_model, device=TEST_DEVICE, constraints=guard)
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(80, 60, 0.0, 1.0), pretty_midi.Note(80, 60, 0.5, 1.5)]  # overlapping
    midi.instruments.append(piano)
    tokens = encode_midi(midi)
    assert [t for t in tokens if t < vocab.TIME_SHIFT] == [60, 60, vocab.note_off(60), vocab.note_off(60)]
    closable = []
    for token in tokens:
        engine.append([token])
        logits = torch.zeros(vocab.VOCAB_SIZE)
        constraint_mask(engine.constraints, engine.state, logits)
        closable.append(bool(torch.isfinite(logits[vocab.note_off(60)])))
    note_offs = [i for i, t in enumerate(tokens) if t == vocab.note_off(60)]
    assert closable[note_offs[0]] == repeated and not closable[note_offs[1]]  # after the first; after both
    assert closable[tokens.index(60)]


def test_a_re_struck_note_closed_once_leaves_nothing_overdue(tiny_model):
    """The first note-off ends a re-struck pitch's sound (the decoder and the scheduler pair notes by
    pitch): a second note-off is allowed, never required. Requiring it made every later answer fail
    once the note was 'overdue': an answer's opening forbids note-offs (live/runs.py), the guard then
    allowed only that note-off, and nothing could be sampled (bench --live's Link phase: 11 of 20
    answers dropped)."""
    from liveperceiver.live.runs import OPENING_FORBID

    guard = Constraints(no_orphan_note_off=True, max_note_ms=1000, dynamics_follow=4.0)
    engine = Engine(tiny_model, constraints=guard, sampling=SamplingSettings(seed=0), device="cpu")
    engine.append([vocab.velocity_token(80), 60, 60, vocab.note_off(60)], sampled=[1, 1, 1, 1])
    engine.append([vocab.TIME_SHIFT + 99] * 2)  # 2 s later, the player's silence ends: an answer opens
    assert engine.state.overdue(guard.max_note_ms) == []
    for _ in range(3):
        engine.step(forbid=(OPENING_FORBID,))
        engine.truncate(6)


def test_constraint_pitch_range_bites(tiny_model):
    _, free = sample_under(tiny_model, Constraints())
    assert any(t < 128 and not 50 <= t <= 70 for t in free)
    _, constrained = sample_under(tiny_model, Constraints(pitch_range=(50, 70)))
    assert all(50 <= t <= 70 for t in constrained if t < 128)


def test_constraint_max_polyphony_bites(tiny_model):
    def peak(tokens):
        return max(len(sounding) for _, sounding in sounding_before_each(tokens + [vocab.PAD]))

    prompt, free = sample_under(tiny_model, Constraints())
    assert peak(prompt + free) > 3
    prompt, constrained = sample_under(tiny_model, Constraints(max_polyphony=3))
    assert peak(prompt + constrained) <= 3


def test_constraint_min_onset_gap_bites(tiny_model):
    def smallest_gap_ms(tokens):
        gap, smallest = None, 10**9
        for token in tokens:
            if token < 128:
                if gap is not None:
                    smallest = min(smallest, gap)
                gap = 0
            elif vocab.TIME_SHIFT <= token < vocab.VELOCITY and gap is not None:
                gap += vocab.time_shift_steps(token) * 10
        return smallest

    _, free = sample_under(tiny_model, Constraints())
    assert smallest_gap_ms(free) < 100
    _, constrained = sample_under(tiny_model, Constraints(min_onset_gap_ms=100))
    assert smallest_gap_ms(constrained) >= 100


def test_a_velocity_while_no_note_may_start_leaves_tokens_to_sample():
    """Dynamics follow lets only note-ons follow a velocity token; polyphony full or an onset too soon
    forbids note-ons. Together they forbade every token (found on the GPU check: `no token can be
    sampled`); now a velocity is not sampled while no note may start, and one that came anyway (the
    player's, a prompt's) lets time pass or a note end."""
    from liveperceiver.inference.sampling import StreamState

    for blocking in (Constraints(max_polyphony=1), Constraints(min_onset_gap_ms=20)):
        constraints = Constraints(
            dynamics_follow=4.0,
            max_polyphony=blocking.max_polyphony,
            min_onset_gap_ms=blocking.min_onset_gap_ms,
        )
        state = StreamState()
        for token in (vocab.velocity_token(80), vocab.note_on(60), vocab.velocity_token(90)):
            state.push(token)
        logits = torch.zeros(vocab.VOCAB_SIZE)
        constraint_mask(constraints, state, logits)
        allowed = torch.isfinite(logits)
        assert not allowed[vocab.NOTE_ON : vocab.NOTE_OFF].any() and not allowed[vocab.VELOCITY : vocab.PAD].any()
        assert allowed[vocab.TIME_SHIFT : vocab.VELOCITY].all() and allowed[vocab.note_off(60)]


def test_every_constraint_at_once_never_leaves_nothing_to_sample(tiny_model):
    """Every constraint and follow together, with adaptation, over a practice session's prompt."""
    from liveperceiver.inference.adapt import practice_stream

    for window, seed in ((4, 1), ("4:12", 0), (1, 2)):  # each raised before the fix
        engine = Engine(
            tiny_model,
            device=TEST_DEVICE,
            num_latents=window,
            sampling=SamplingSettings(temperature=0.9, top_p=0.95, seed=seed),
            constraints=EVERYTHING,
            adapt=0.7,
        )
        engine.append(practice_stream(300))
        assert len(engine.sample(40)) == 40


def test_long_prompts_keep_their_most_recent_part(tiny_model):
    """Only the last max_prefix_len + num_latents tokens matter (the reference pipeline keeps the oldest)."""
    rng = random.Random(9)
    prompt = [rng.randrange(388) for _ in range(500)]
    window = tiny_model.config.max_prefix_len + 2
    outputs = []
    for tokens in (prompt, prompt[-window:]):
        engine = Engine(tiny_model, device=TEST_DEVICE, num_latents=2, sampling=SamplingSettings(greedy=True))
        engine.append(tokens)
        outputs.append(engine.sample(30))
    assert outputs[0] == outputs[1]
    engine = Engine(tiny_model, device=TEST_DEVICE, num_latents=2, sampling=SamplingSettings(greedy=True))
    engine.append(prompt[:window])
    assert engine.sample(30) != outputs[0]


def test_constraint_max_note_length_bites(tiny_model):
    def longest_sampled_note_ms(prompt, generated):
        """Longest note the model struck itself (the prompt's notes are the player's)."""
        clock, onsets, longest = 0, {}, 0
        for index, token in enumerate(prompt + generated):
            if token < vocab.NOTE_OFF:
                onsets.setdefault(token, (clock, index >= len(prompt)))
            elif token < vocab.TIME_SHIFT and token - vocab.NOTE_OFF in onsets:
                onset, sampled = onsets.pop(token - vocab.NOTE_OFF)
                longest = max(longest, (clock - onset) * sampled)
            elif vocab.TIME_SHIFT <= token < vocab.VELOCITY:
                clock += vocab.time_shift_steps(token) * 10
        return max([longest] + [clock - onset for onset, sampled in onsets.values() if sampled])

    prompt, free = sample_under(tiny_model, Constraints())
    assert longest_sampled_note_ms(prompt, free) > 2000
    prompt, constrained = sample_under(tiny_model, Constraints(max_note_ms=500))
    # a note closes on the first step after it is due; one time-shift (<= 1 s) can pass it
    assert longest_sampled_note_ms(prompt, constrained) < 500 + 1000


def test_max_note_length_closes_only_the_models_notes(tiny_model):
    """A player holding a key for 5 s is not the model's to release; the model's own 5 s note is."""
    engine = Engine(tiny_model, device=TEST_DEVICE, constraints=Constraints(max_note_ms=500))
    engine.append([376, 60] + [355] * 5)  # the player's middle C, held
    assert engine.state.overdue(500) == []
    engine.truncate(1)
    engine.configure(constraints=Constraints())
    engine.configure(sampling=SamplingSettings(temperature=3.0, seed=0))
    for _ in range(5000):  # let the model strike middle C itself
        if engine.step() == 60:
            break
        engine.truncate(1)
    else:
        pytest.fail("the tiny model never struck middle C")
    engine.append([355] * 5)
    assert engine.state.overdue(500) == [60]
    engine.append([355])
    length = len(engine)
    engine.append([61, 355])
    engine.truncate(length)  # a rollback keeps which notes the model struck
    assert engine.state.overdue(500) == [60]


def longest_sampled_rest_ms(prompt: list[int], generated: list[int]) -> int:
    """Longest wait the model made of its own time-shifts with no note-on in between (anyone's)."""
    rest, longest = 0, 0
    for index, token in enumerate(prompt + generated):
        if token < vocab.NOTE_OFF:
            rest = 0
        elif vocab.TIME_SHIFT <= token < vocab.VELOCITY and index >= len(prompt):
            rest += vocab.time_shift_steps(token) * 10
            longest = max(longest, rest)
    return longest


def test_the_rest_guard_bites(tiny_model):
    prompt, free = sample_under(tiny_model, Constraints(), steps=600)
    assert longest_sampled_rest_ms(prompt, free) > 1500
    prompt, guarded = sample_under(tiny_model, Constraints(max_rest_ms=400), steps=600)
    # the model plays on the first step after its rest reached the limit; one time-shift (<= 1 s) can pass it
    assert longest_sampled_rest_ms(prompt, guarded) < 400 + 1000


def test_the_rest_guard_counts_only_the_models_own_waits(tiny_model):
    """A player resting 5 s is real time, not the model's stall; the model's own waits are, until
    anyone strikes a note; a rollback restores what the model had waited."""
    engine = Engine(tiny_model, device=TEST_DEVICE, constraints=Constraints(max_rest_ms=500))
    engine.append([376, 60] + [355] * 5)  # the player's note, then the player's 5 s rest
    assert engine.state.model_rest_ms == 0
    engine.state.push(330, sampled=True)  # the model waits 750 ms
    assert engine.state.model_rest_ms == 750
    logits = torch.zeros(vocab.VOCAB_SIZE)
    constraint_mask(engine.constraints, engine.state, logits)
    assert torch.isinf(logits[vocab.TIME_SHIFT : vocab.VELOCITY]).all()
    assert torch.isfinite(logits[: vocab.TIME_SHIFT]).all() and torch.isfinite(logits[vocab.VELOCITY :]).all()
    engine.state.push(62)  # the player strikes a note: the model's rest starts again
    assert engine.state.model_rest_ms == 0
    engine.state.push(330, sampled=True)  # 750 ms again, but two notes sound and one is the most allowed
    logits = torch.zeros(vocab.VOCAB_SIZE)
    constraint_mask(Constraints(max_rest_ms=500, max_polyphony=1), engine.state, logits)
    assert torch.isfinite(logits[vocab.TIME_SHIFT : vocab.VELOCITY]).all()  # no note may start: time moves on
    tokens = [*engine.tokens, 330, 62, 330]
    sampled = bytearray(len(engine.tokens)) + bytearray([1, 0, 1])
    engine.state.rewind(tokens, sampled, len(tokens) - 2)  # back to just after the model's first wait
    assert engine.state.model_rest_ms == 750


def differences_over_changing_windows(model, engine: Engine, steps: int) -> list[float]:
    """Largest logit difference from the float32 model at each of `steps` sampled steps after a
    200-token prompt, alternating one latent (the live chain) with wider windows."""
    rng = random.Random(4)
    engine.append([rng.randrange(388) for _ in range(200)])
    differences = []
    for index in range(steps):
        engine.configure(num_latents=1 if index % 2 else 1 + index % 7)
        differences.append(max_difference(model, engine))
        engine.step()
    return differences


@pytest.mark.parametrize("storage, tolerance", [("float16", 0.02), ("bfloat16", 0.2)])
def test_16_bit_weights_stay_close_to_the_float32_model(tiny_model, storage, tolerance):
    """16-bit weight storage (the fast CPU setting) changes the logits by rounding only."""
    engine = Engine(tiny_model, device=TEST_DEVICE, num_latents=1, weights=storage, sampling=SamplingSettings(seed=2))
    packed = [module for module in engine.model.modules() if isinstance(module, PackedLinear)]
    assert packed and all(module.weight.dtype == DTYPES[storage] for module in packed)
    assert not any(isinstance(module, torch.nn.Linear) for module in engine.model.modules())
    assert all(fused.weight.dtype == DTYPES[storage] for fused in engine._fused_value_output)
    assert 0.0 < max(differences_over_changing_windows(tiny_model, engine, 120)) < tolerance


def test_int8_layers_stay_close_to_the_float32_model(tiny_model):
    """int8 weights: every Linear and fused matrix is an Int8Linear, called as a module in the
    one-latent chain and in wider windows. The bound is half the largest difference torch.ao's
    dynamic quantisation gave (0.35), which also quantised the activations."""
    engine = Engine(tiny_model, device=TEST_DEVICE, num_latents=1, weights="int8", sampling=SamplingSettings(seed=2))
    int8 = [module for module in engine.model.modules() if isinstance(module, Int8Linear)]
    assert int8 and all(module.weight.dtype == torch.int8 for module in int8)
    assert not any(isinstance(module, torch.nn.Linear) for module in engine.model.modules())
    assert all(isinstance(fused, Int8Linear) for fused in engine._fused_value_output + engine._fused_qkv)
    assert 0.0 < max(differences_over_changing_windows(tiny_model, engine, 40)) < 0.3


def test_an_int8_engine_raises_no_warning(tiny_model):
    """torch.ao's dynamic quantisation warned that it is deprecated; the int8 kernel does not."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(tiny_model, device=TEST_DEVICE, weights="int8", sampling=SamplingSettings(seed=2))
        engine.append([vocab.velocity_token(80), 60])
        engine.sample(3)
    assert [str(warning.message) for warning in caught] == []


@pytest.mark.parametrize("width", [64, 24])  # 24: not a multiple of 16, so never the CPU kernel
def test_int8_linear_is_the_per_channel_quantised_product(width):
    """Symmetric per-output-channel int8: each row's largest weight maps to +-127, every weight is
    within half a step of its original, and the CPU kernel's product equals the dequantised one
    (the path of cuda and mps) up to its bfloat16 input rounding."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, width, generator=generator) * torch.linspace(0.01, 1.0, 40)[:, None]
    bias = torch.randn(40, generator=generator)
    layer = Int8Linear(weight, bias)
    assert (layer.kernel_scales is not None) == (width % 16 == 0)
    assert torch.equal(layer.weight.abs().amax(dim=1), torch.full((40,), 127, dtype=torch.int8))
    assert ((layer.weight.float() * layer.scales[:, None] - weight).abs() <= layer.scales[:, None] * 0.51).all()
    x = torch.randn(3, 5, width, generator=generator)
    exact = torch.nn.functional.linear(x, weight, bias)
    dequantised = x @ (layer.weight.float() * layer.scales[:, None]).T + bias
    assert torch.allclose(layer.dequantised(x), dequantised, atol=1e-5)
    output = layer(x)
    assert output.shape == exact.shape and output.dtype == torch.float32
    scale = exact.abs().max().item()
    assert (output - dequantised).abs().max().item() < 0.01 * scale  # bfloat16 inputs and outputs
    assert 0 < (output - exact).abs().max().item() < 0.03 * scale  # int8 weights


def test_bench_times_what_the_engine_thread_does_when_the_player_plays(tiny_model):
    """`bench`'s player p99 is the live path (Session._absorb_player, then the next step): the
    unplayed look-ahead is rolled back, the player's tokens appended, one token sampled."""
    engine = Engine(tiny_model, device=TEST_DEVICE, sampling=SamplingSettings(seed=0))
    engine.append(range(50))
    engine.step()
    before = list(engine.tokens)
    assert player_arrives(engine, random.Random(0), lookahead=4, tokens=3) > 0
    # 3 look-ahead tokens were sampled, then 4 rolled back: the one sampled before goes too
    assert engine.tokens[: len(before) - 1] == before[:-1] and len(engine) == len(before) + 3
    assert list(engine.sampled[len(before) - 1 :]) == [0, 0, 0, 1]
    assert max_difference(tiny_model, engine) < 1e-4  # rows rewritten after the rollback


def test_the_engine_leaves_process_wide_settings_alone(tiny_model):
    """oneDNN's switch and torch's thread count are the entry point's (runtime.configure_inference):
    building an engine and stepping it change neither."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for enabled in (False, True):
            torch.backends.mkldnn.enabled = enabled
            engine = Engine(tiny_model, device=TEST_DEVICE, sampling=SamplingSettings(seed=0))
            engine.append([vocab.velocity_token(80), 60])
            engine.step()
            assert torch.backends.mkldnn.enabled is enabled and torch.get_num_threads() == 2
    finally:
        torch.backends.mkldnn.enabled = True
        torch.set_num_threads(threads)


def test_bench_counts_the_weights_a_step_reads(tiny_model):
    """One latent reads each self-attention layer's fused value-output matrix (C x C) instead of its
    four projections; several latents read float32 copies of 16-bit weights (PackedLinear's rows)."""
    float32, float16 = Engine(tiny_model, device=TEST_DEVICE), Engine(tiny_model, device=TEST_DEVICE, weights="float16")
    config = tiny_model.config
    projections = config.num_self_attention_layers * 3 * config.num_channels**2 * 4  # bytes
    assert weights_read_per_step(float32, 8) - weights_read_per_step(float32, 1) == projections
    assert weights_read_per_step(float16, 8) == weights_read_per_step(float32, 8)
    assert weights_read_per_step(float16, 1) < weights_read_per_step(float32, 1)


def test_16_bit_weights_need_a_float32_model(tiny_model):
    with pytest.raises(ValueError, match="float32"):
        Engine(tiny_model, device=TEST_DEVICE, weights="float16", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not one of"):
        Engine(tiny_model, device=TEST_DEVICE, weights="int4")


def test_quantize_is_a_deprecated_name_of_weights(tiny_model):
    with pytest.warns(DeprecationWarning, match="weights="):
        engine = Engine(tiny_model, device=TEST_DEVICE, quantize="float16")
    assert engine.precision == "float16 weights"


C_MAJOR = {0, 2, 4, 5, 7, 9, 11}


def c_major_phrase(notes: int = 48) -> list[int]:
    """A player's phrase on the white keys: velocity, note-on, time shift, note-off per note."""
    rng = random.Random(4)
    phrase = []
    for _ in range(notes):
        pitch = rng.choice([p for p in range(48, 84) if p % 12 in C_MAJOR])
        phrase += [376, pitch, 270, vocab.note_off(pitch)]
    return phrase


def test_key_follow_bites(tiny_model):
    def in_key_share(key_follow: float) -> float:
        engine = Engine(
            tiny_model,
            device=TEST_DEVICE,
            sampling=SamplingSettings(temperature=2.0, seed=7),
            constraints=Constraints(key_follow=key_follow),
        )
        engine.append(c_major_phrase())
        onsets = [t for t in engine.sample(600) if t < vocab.NOTE_OFF]
        assert len(onsets) > 40
        return sum(t % 12 in C_MAJOR for t in onsets) / len(onsets)

    free, following = in_key_share(0.0), in_key_share(2.0)
    assert free < 0.65  # the random tiny model knows no key (7 of 12 pitch classes: 0.58)
    assert following > free + 0.2


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_key_follow_moves_pitch_not_the_choice_to_play(temperature):
    """At the sampling temperature the note-ons' total probability is the model's; only its split
    between pitches changes."""
    from liveperceiver.inference.sampling import StreamState, constraint_mask

    state = StreamState()
    for token in c_major_phrase(20):
        state.push(token)
    logits = torch.randn(vocab.VOCAB_SIZE, generator=torch.Generator().manual_seed(1))
    biased = logits.clone()
    constraint_mask(Constraints(key_follow=1.5), state, biased, temperature)
    before, after = torch.softmax(logits / temperature, 0), torch.softmax(biased / temperature, 0)
    assert after[: vocab.NOTE_OFF].sum().item() == pytest.approx(before[: vocab.NOTE_OFF].sum().item(), abs=1e-5)
    assert torch.equal(biased[vocab.NOTE_OFF :], logits[vocab.NOTE_OFF :])
    white = torch.tensor([p % 12 in C_MAJOR for p in range(128)])
    assert after[:128][white].sum() > 1.5 * before[:128][white].sum()


def test_key_follow_lowers_what_the_model_overplays():
    """Shares are matched, not only boosted: after the model has played many Cs, D beats C."""
    from liveperceiver.inference.sampling import StreamState, key_follow_bias

    state = StreamState()
    for token in c_major_phrase(40):
        state.push(token)
    flat = torch.zeros(vocab.VOCAB_SIZE)
    key_follow_bias(1.0, state, flat)
    c, d = 60, 62
    assert abs(flat[c] - flat[d]) < 0.5  # the player's C and D are about as common
    for token in [376, c, 270, vocab.note_off(c)] * 30:
        state.push(token, sampled=True)
    flat = torch.zeros(vocab.VOCAB_SIZE)
    key_follow_bias(1.0, state, flat)
    assert flat[d] > flat[c] + 1.0


def test_key_follow_hears_only_the_player_and_survives_rollback():
    from liveperceiver.inference.sampling import StreamState, key_follow_bias

    def replayed(tokens, flags):
        state = StreamState()
        for token, flag in zip(tokens, flags, strict=True):
            state.push(token, sampled=bool(flag))
        return state

    def bias(state):
        logits = torch.zeros(vocab.VOCAB_SIZE)
        key_follow_bias(1.0, state, logits)
        return logits

    phrase = c_major_phrase(100)  # 400 tokens: past a snapshot boundary
    model_part = [377, 61, 300, vocab.note_off(61)] * 80  # the model's own C sharps
    tokens = phrase + model_part
    flags = bytearray([0] * len(phrase) + [1] * len(model_part))
    state = replayed(tokens, flags)
    player_only = replayed(phrase, flags[: len(phrase)])
    assert state.player_pitch_classes == player_only.player_pitch_classes  # the model's notes are not the player's
    assert state.model_pitch_classes[1] > 0 and player_only.player_pitch_classes[1] == 0.0
    before = bias(state)  # fills the cache, which the rollback must not keep
    cut = len(phrase) + 130  # into the model's part, after another snapshot
    state.rewind(tokens, flags, cut)
    fresh = replayed(tokens[:cut], flags[:cut])
    assert state.player_pitch_classes == pytest.approx(fresh.player_pitch_classes)
    assert state.model_pitch_classes == pytest.approx(fresh.model_pitch_classes)
    assert torch.allclose(bias(state), bias(fresh)) and not torch.allclose(bias(state), before)


def test_append_carries_whose_tokens_they_were(tiny_model):
    """A stream moved to a new engine (a model switch) keeps the model's notes as the model's."""
    engine = Engine(tiny_model, device=TEST_DEVICE)
    engine.append([376, 60, 300, 188, 377, 61], sampled=[0, 0, 0, 0, 1, 1])
    assert list(engine.sampled) == [0, 0, 0, 0, 1, 1]
    assert engine.state.model_pitch_classes[1] == 1.0 and engine.state.player_pitch_classes[1] == 0.0
    assert engine.state.sampled == {61}
    with pytest.raises(ValueError, match="sampled flags"):
        engine.append([60, 62], sampled=[0])


def test_auto_weights_measures_once_per_model_and_device(tiny_model, monkeypatch):
    from liveperceiver.inference import auto_weights as weights_module

    calls = []
    real = weights_module.faster_weights
    monkeypatch.setattr(weights_module, "_MEASURED_WEIGHTS", {})
    monkeypatch.setattr(weights_module, "faster_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    cpu = torch.device("cpu")
    first = weights_module.resolve_weights("auto", cpu, tiny_model)
    assert first in (None, "float16", "blocked", "int8")
    assert weights_module.resolve_weights("auto", cpu, tiny_model) == first
    assert len(calls) == 1
    assert weights_module.resolve_weights("float32", cpu, tiny_model) is None
    assert weights_module.resolve_weights("auto", torch.device("meta"), tiny_model) is None  # not a CPU: float32


def test_auto_weights_choose_the_fastest_duet_not_the_fastest_single_row(tiny_model, monkeypatch):
    """`auto` picks the storage whose one-row step plus two-row step is fastest (a duet: the model's
    own token, a player's token with it), not the fastest at one row: here float16 is the fastest
    single-row step but the slowest with two rows, and int8 the fastest over both (delays added to
    real engines' steps, far above their own cost)."""
    import time as clock

    from liveperceiver.inference import auto_weights as weights_module

    delays_ms = {None: (5, 5), "float16": (0, 14), "int8": (3, 3)}  # (one row, two rows)

    class DelayedEngine(Engine):
        def __init__(self, model, **settings) -> None:
            super().__init__(model, **settings)
            self.delays, self.appended = delays_ms[settings["weights"]], 0

        def append(self, tokens, sampled=None, judged=True) -> None:
            tokens = list(tokens)
            self.appended += len(tokens)
            super().append(tokens, sampled, judged)

        def step(self, forbid=()) -> int:
            clock.sleep(self.delays[min(self.appended, 2) - 1] / 1000)
            self.appended = 0
            return super().step(forbid)

    monkeypatch.setattr(weights_module, "Engine", DelayedEngine)
    monkeypatch.setattr(weights_module, "blocked_weights_available", lambda device: False)  # three, as anywhere
    monkeypatch.setattr(weights_module, "int8_kernel_available", lambda device: True)  # its fallback where not
    assert weights_module.faster_weights(tiny_model, torch.device("cpu"), budget_s=0.0, num_latents="2:4") == "int8"
    delays_ms["int8"] = (3, 10)  # now float32's 10 ms is the fastest duet
    assert weights_module.faster_weights(tiny_model, torch.device("cpu"), budget_s=0.0, num_latents="2:4") is None


def test_per_token_sums_in_order_equal_index_add(tiny_model):
    """The CUDA path of the prefix values' per-token sums (index_put_ with accumulate: sorted, so
    deterministic there) gives the CPU's index_add_ sums, here on the CPU."""
    from liveperceiver.inference.engine import sum_per_token, sum_per_token_in_order

    generator = torch.Generator().manual_seed(0)
    weights = torch.softmax(torch.randn(4, 3, 500, generator=generator), dim=-1)
    ids = torch.randint(0, vocab.VOCAB_SIZE, (500,), generator=generator)
    assert torch.allclose(sum_per_token(weights, ids), sum_per_token_in_order(weights, ids), atol=1e-6)


@pytest.mark.parametrize("window", [1, "8:16"])
def test_a_sampled_step_builds_no_tensor_from_python_lists(tiny_model, monkeypatch, window):
    """GPU-ready: ids, positions and masks are slices of device buffers, and a sampled token goes
    into the id buffer as it is chosen; only the player's tokens are copied in (once, at append)."""
    engine = Engine(tiny_model, device=TEST_DEVICE, num_latents=window, sampling=SamplingSettings(seed=1))
    engine.append(range(100, 160))
    engine.sample(3)
    built = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: built.append(args) or real(*args, **kwargs))
    engine.sample(40)
    assert built == []
    engine.append([60, 61])
    engine.step()
    assert len(built) == 1


def test_play_samples_only_the_pitches_its_output_plays(tiny_model):
    """The scheduler drops a note outside the output's range (after transpose); play's engine never
    samples one, so no dropped note ends the model's rest or sits in its context as if heard."""
    settings = Settings(pitch_low=60, pitch_high=72, transpose=5)
    _, free = sample_under(tiny_model, Constraints(), steps=600)
    assert any(t < vocab.NOTE_OFF and t not in range(55, 68) for t in free)  # the random model strays
    _, played = sample_under(tiny_model, settings.engine_constraints(), steps=600)
    onsets = [t for t in played if t < vocab.NOTE_OFF]
    assert onsets and all(55 <= t <= 67 for t in onsets)


def test_cpu_weights_are_stored_for_a_few_rows(tiny_model):
    """weights.store_for_few_rows: column by column where a Linear has at least as many outputs as
    inputs, as it is (row by row) where it has fewer, the MLP's second layer (2x slower stored by
    columns for one row); the values are the model's."""
    engine = Engine(tiny_model, num_latents="2:4", device="cpu")
    fused = [*engine._fused_qkv, *engine._fused_value_output]  # the engine's own products, stored likewise
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)] + fused
    wide = [m for m in linears if m.weight.shape[0] < m.weight.shape[1]]
    assert wide and len(wide) < len(linears)
    for module in linears:
        outputs, inputs = module.weight.shape
        by_columns = module.weight.stride() == (1, outputs)
        assert by_columns == (outputs >= inputs), (tuple(module.weight.shape), module.weight.stride())
    for ours, theirs in zip(engine.model.modules(), tiny_model.modules(), strict=True):
        if isinstance(ours, torch.nn.Linear):
            assert torch.equal(ours.weight, theirs.weight)


def test_bench_turns_time_each_storage_on_its_own_engine(tiny_model, monkeypatch):
    """bench's `storages_in_turns`: a delay in one storage's steps shows in its figures only (the
    engines take turns, each timed on its own)."""
    import time as clock

    from liveperceiver.tools import bench

    class SlowFloat16(Engine):
        def step(self, forbid=()) -> int:
            if self.weights == "float16":
                clock.sleep(0.004)
            return super().step(forbid)

    monkeypatch.setattr(bench, "Engine", SlowFloat16)
    turns = bench.storages_in_turns(tiny_model, 16, "2:4", ["float32", "float16"], 20, "cpu")
    for figure in ("step_ms_p50", "alone_ms_p50"):
        assert turns["float16"][figure] >= 4
        assert turns["float16"][figure] - turns["float32"][figure] >= 3.5  # the delay is float16's alone


@pytest.mark.reference
def test_the_reference_takes_turns_with_our_steps(tiny_model, monkeypatch):
    """bench's reference column: perceiver-io's generate() timed alone and with a run of our steps
    between two of its tokens, ours timed apart from its own (run in the reference venv:
    `python -m pytest -m reference tests/test_engine.py`)."""
    import time as clock

    pytest.importorskip("perceiver.model.audio.symbolic.huggingface")
    from liveperceiver.tools import reference
    from liveperceiver.tools.reference import OURS_PER_TOKEN, reference_step_ms

    ours = []

    def our_step() -> None:
        ours.append(1)
        clock.sleep(0.02)

    assert OURS_PER_TOKEN > 1
    monkeypatch.setattr(reference, "OURS_PER_TOKEN", 2)  # half its tokens follow a run of ours
    times = reference_step_ms(tiny_model, 16, 2, 16, our_step)
    assert len(ours) == 9 * 2  # a run of two at its tokens 0, 2, .. 16 (of 17)
    assert times.ours_in_turns_ms >= 20
    assert 0 < times.in_turns_ms < 20 and 0 < times.alone_ms < 20  # its own steps, without ours
