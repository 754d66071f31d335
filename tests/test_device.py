"""The step made GPU-ready (issue 16): sampling reads back one number per step, the sampled id, and
runs on the engine's device. Checked here on the CPU: against torch.multinomial's own draws (the
same tokens as before), and on the meta device, where a tensor has no data so that any read back
raises. On a GPU (LIVEPERCEIVER_TEST_DEVICE=cuda, as .ci/gpu-check runs them) with CUDA's sync
debug mode, which also catches copies from the host that wait for the device. And .ci/gpu-check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import EVERYTHING

import liveperceiver
from liveperceiver.core import vocab
from liveperceiver.inference.adapt import (
    PRIOR_FRACTION,
    CacheWeight,
    mix_logits,
    mix_on_device,
    practice_stream,
)
from liveperceiver.inference.engine import Engine
from liveperceiver.inference.experts import EXPERT_SHARE, session_experts
from liveperceiver.inference.sampling import (
    Constraints,
    SamplingSettings,
    StreamState,
    apply_temperature_top_k_top_p,
    choose,
    constraint_mask,
    density_factor,
    sample_id,
)
from liveperceiver.inference.session_cache import SessionCache
from liveperceiver.tools.bench import device_clock

REPO = Path(__file__).resolve().parents[1]
PACKAGE = str(Path(liveperceiver.__file__).parent)  # where "our" lines are (synchronizing)
GPU_CHECK = REPO / ".ci" / "gpu-check"

SETTINGS = [
    SamplingSettings(),
    SamplingSettings(temperature=0.9, top_p=0.95),  # play's defaults
    SamplingSettings(temperature=1.3, top_k=20),
    SamplingSettings(temperature=0.7, top_k=50, top_p=0.8),
    SamplingSettings(greedy=True),
]


def session_state() -> StreamState:
    """A player's practice phrases, then the model's own: every follow has something to lean on."""
    state = StreamState()
    for token in practice_stream(400):
        state.push(token)
    for token in practice_stream(120, seed=1):
        state.push(token, sampled=True)
    state.push(vocab.note_on(72))  # the player holds a note: the note-off expert has work to do too
    return state


def overdue_state() -> StreamState:
    """The model holds a note past max_note_ms: only its note-off may come next."""
    state = session_state()
    for token in (vocab.velocity_token(80), vocab.note_on(60), vocab.TIME_SHIFT + 99, vocab.TIME_SHIFT + 99):
        state.push(token, sampled=True)
    assert state.overdue(1000) == [60]
    return state


def session_cache() -> SessionCache:
    cache = SessionCache()
    cache.extend(practice_stream(600))
    return cache


def random_logits(seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab.VOCAB_SIZE, generator=generator) * (1 + seed % 4)).to(device)


# --------------------------------------------------------------------------- on the CPU


@pytest.mark.parametrize("settings", SETTINGS[:-1], ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_choose_draws_what_multinomial_draws(settings):
    """The CPU streams stay what they were: the same generator state gives the same token as
    torch.multinomial over the same probabilities, and leaves the generator where it left it."""
    for seed in range(40):
        logits = random_logits(seed)
        if seed % 3 == 0:
            logits[vocab.NOTE_ON : vocab.NOTE_OFF] = float("-inf")  # a masked event type
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        masked = logits.clone()
        masked[vocab.PAD] = float("-inf")
        probs = apply_temperature_top_k_top_p(masked, settings)
        for _ in range(10):
            assert choose(logits.clone(), settings, ours) == int(torch.multinomial(probs, 1, generator=theirs))
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_nothing_to_sample_is_one_error():
    nothing = torch.full((vocab.VOCAB_SIZE,), float("-inf"))
    with pytest.raises(RuntimeError, match="no token can be sampled"):
        choose(nothing, SamplingSettings(temperature=0.9, top_p=0.95), torch.Generator().manual_seed(0))
    assert choose(random_logits(1), SamplingSettings(), torch.Generator().manual_seed(0)) in range(vocab.PAD)


def test_the_sampling_path_never_reads_the_device_back():
    """The mix, every constraint and follow, and the draw, on meta tensors: `.item()`, `bool()`,
    `.numpy()` or `.cpu()` of any of them would raise here, so only `choose`'s int() reads back."""
    meta = torch.device("meta")
    state, cache = session_state(), session_cache()
    remembered = CacheWeight()  # the step is remembered for judging a player's token later, on the device
    logits = mix_logits(torch.empty(vocab.VOCAB_SIZE, device=meta), cache, 0.7, state, remembered, 12)
    assert logits.device == meta  # mixed on the device, not in numpy
    constraint_mask(EVERYTHING, state, logits, 0.9)
    assert state.key_bias[1] is not None and state.velocity_bias[1] is not None  # both follows had work to do
    assert density_factor(EVERYTHING.density_follow, EVERYTHING.density_ratio, state) != 1.0
    assert state.key_bias[1].device == meta and state.velocity_bias[1].device == meta
    constraint_mask(Constraints(max_note_ms=1000), overdue_state(), logits, 0.9)
    for settings in SETTINGS:
        token = sample_id(logits.clone(), settings, None)  # meta tensors take no generator
        assert token.device == meta and token.dim() == 0


def test_the_device_mix_is_the_cpu_mix():
    cache = session_cache()
    weight = 0.7 * PRIOR_FRACTION  # mix_logits without a learnt weight: the prior's mean
    part, b = cache.terms(weight)  # the cache's part at that weight
    state = session_state()
    experts = session_experts(state)
    assert {first for first, _, _ in experts} == {vocab.VELOCITY, vocab.NOTE_OFF}  # both experts have work to do
    for seed in range(5):
        logits = random_logits(seed)
        on_cpu, (on_device, probs) = mix_logits(logits, cache, 0.7), mix_on_device(logits, part, b, weight)
        torch.testing.assert_close(probs, torch.softmax(logits, -1))
        assert on_device.dtype == on_cpu.dtype and not torch.equal(on_cpu, logits)
        torch.testing.assert_close(on_device, on_cpu, rtol=1e-6, atol=1e-6)
        leaned, _ = mix_on_device(logits, part, b, weight, experts, 0.7 * EXPERT_SHARE)
        torch.testing.assert_close(leaned, mix_logits(logits, cache, 0.7, state), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(leaned, on_cpu)


# --------------------------------------------------------------------------- on a GPU (.ci/gpu-check)


@pytest.fixture
def cuda(engine_device) -> torch.device:
    if engine_device.type != "cuda":
        pytest.skip("a CUDA check: run with LIVEPERCEIVER_TEST_DEVICE=cuda (.ci/gpu-check)")
    return engine_device


def synchronizing(calls) -> tuple[int, str]:
    """How many times `calls()` made the host wait for the GPU (torch's sync debug mode warns each
    time), and where: the innermost line of ours each came from, with counts (for the assertion's
    message: a GPU check is rare, so a failure should say where at once)."""
    sites: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        # torch's own words for a sync; its first set_sync_debug_mode also warns, once, that the mode
        # is a prototype that does "not yet detect all synchronizing operations": not a sync (H200)
        if "called a synchronizing CUDA operation" in str(message):
            ours = [frame for frame in traceback.extract_stack()[:-1] if frame.filename.startswith(PACKAGE)]
            sites[f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "not in liveperceiver"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            calls()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(sites.values()), ", ".join(f"{site} x{count}" for site, count in sites.most_common())


@pytest.mark.cuda
def test_on_cuda_the_sampling_path_never_waits_for_the_gpu(cuda):
    cpu_state, cuda_state, cache = session_state(), session_state(), session_cache()
    on_cpu = mix_logits(random_logits(3), cache, 0.7, cpu_state)
    constraint_mask(EVERYTHING, cpu_state, on_cpu, 0.9)
    logits, overdue = random_logits(3, cuda), overdue_state()
    generators = [torch.Generator(cuda).manual_seed(0) for _ in SETTINGS]
    torch.cuda.synchronize()
    results = {}

    def sample() -> None:
        mixed = mix_logits(logits, cache, 0.7, cuda_state)
        constraint_mask(EVERYTHING, cuda_state, mixed, 0.9)
        constraint_mask(Constraints(max_note_ms=1000), overdue, mixed.clone(), 0.9)
        results["logits"] = mixed
        results["ids"] = [sample_id(mixed.clone(), s, g) for s, g in zip(SETTINGS, generators, strict=True)]

    syncs, where = synchronizing(sample)
    assert syncs == 0, where
    torch.testing.assert_close(results["logits"].cpu(), on_cpu, rtol=1e-5, atol=1e-5)
    assert int(results["ids"][-1]) == choose(on_cpu, SamplingSettings(greedy=True), torch.Generator())
    assert all(0 <= int(token) < vocab.PAD for token in results["ids"])


@pytest.mark.cuda
@pytest.mark.parametrize("window", [4, "4:12", 1])  # sliding; cached (a CUDA graph per one-row step); one latent
def test_on_cuda_a_step_reads_back_once(tiny_model, cuda, window):
    engine = Engine(
        tiny_model,
        device=cuda,
        num_latents=window,
        sampling=SamplingSettings(temperature=0.9, top_p=0.95, seed=0),
        constraints=EVERYTHING,
        adapt=0.7,
    )
    engine.append(practice_stream(300))
    engine.sample(8)  # warm-up: tables, masks and pinned buffers are made once, the graph captured
    syncs, where = synchronizing(lambda: engine.sample(20))
    assert syncs == 20, where  # the sampled id, once a step
    if window != 4:
        assert engine.row_steps and engine.row_steps[1].graph is not None


@pytest.mark.cuda
def test_on_cuda_a_step_after_one_absorbed_token_reads_back_once(tiny_model, cuda):
    """A player's token, then a step: two new rows, the two-row graph (graphed.NewRowsStep). Without
    adaptation: with it, a player's token is judged from the eager rows (adapt.CacheWeight)."""
    engine = Engine(
        tiny_model,
        device=cuda,
        num_latents="4:12",
        sampling=SamplingSettings(temperature=0.9, top_p=0.95, seed=0),
        constraints=EVERYTHING,
    )
    engine.append(practice_stream(300))
    player = iter(practice_stream(400, seed=2)[300:])

    def absorb_and_step(count: int) -> None:
        for _ in range(count):
            engine.append([next(player)])
            engine.step()

    absorb_and_step(8)  # warm-up: the graphs captured
    syncs, where = synchronizing(lambda: absorb_and_step(20))
    assert syncs == 20, where
    assert engine.row_steps[2].graph is not None


@pytest.mark.cuda
@pytest.mark.parametrize("window", [4, "4:12", 1])  # sliding (eager); cached and one latent (a CUDA graph)
def test_on_cuda_the_engine_gives_the_cpu_logits(tiny_model, cuda, window):
    """Teacher-forced on the CPU engine's greedy path, with rollbacks across the anchor, both engines'
    logits agree step by step; the one-row steps replay a CUDA graph (on by default on CUDA)."""
    engines = [Engine(tiny_model, num_latents=window, device=device) for device in ("cpu", cuda)]
    assert not engines[0].row_steps and engines[1].row_steps
    for engine in engines:
        engine.append(practice_stream(200))
    for index in range(150):
        on_cpu, on_cuda = (engine.next_logits() for engine in engines)
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
        token = int(on_cpu[: vocab.PAD].argmax())
        for engine in engines:
            engine.append([token])
            if index % 40 == 39:
                engine.truncate(len(engine) - 7)
    assert (engines[1].row_steps[1].graph is not None) == (window != 4)


# --------------------------------------------------------------------------- .ci/gpu-check


def test_gpu_check_is_an_executable_bash_script():
    assert os.access(GPU_CHECK, os.X_OK)
    assert GPU_CHECK.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)


def test_gpu_check_without_cuda_says_so_in_one_line_and_fails(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    result = subprocess.run(
        [str(GPU_CHECK), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("gpu-check: no CUDA device here")
    assert not (tmp_path / "out").exists()  # nothing ran


# --------------------------------------------------------------------------- bench's clock


def test_bench_reads_the_plain_clock_on_the_cpu():
    assert device_clock("cpu") is time.perf_counter


@pytest.mark.cuda
def test_on_cuda_bench_times_the_work_not_its_launch(cuda):
    """A kernel that spins for about 50 ms (at 1 GHz or more) is queued in microseconds; bench's clock waits for it."""
    now = device_clock(cuda)
    torch.cuda.synchronize()
    start = now()
    torch.cuda._sleep(50_000_000)
    assert now() - start > 0.02
