"""`liveperceiver bench`: engine speed per (prefix, latents), beside the memory-bandwidth bound.

A step = absorb one token + sample one token, the unit of live work. Figures are medians, p99 and
the worst step over many steps after warm-up, with the thread count stated. `latents` is the latent
window (N, or MIN:MAX: inference/window.py); with a window a step runs two new latent rows (the
absorbed token's and the sampled one's) and the worst step is a re-anchoring. `alone_ms_p50` times
steps that only sample (the model playing on its own, one new row), and `ahead_ms_max` the worst
of them when the engine prepared in the idle time before each, as the live engine thread does
whenever it is ahead of playback (`Engine.prepare`). `player_ms_p99` times what the live
engine thread does when the player's tokens arrive while it samples ahead (`Session._absorb_player`,
then the next step): roll back the unplayed look-ahead, append the player's tokens, sample. The bound is the bytes of weights a
step must read divided by the memory bandwidth measured in the same run (one `sum` over 256 MB),
and beside it the same bytes divided by what matrix-vector products reach on this machine, both
measured on the device the engine runs on. On a GPU every clock is read after waiting for the
device's queued work (`device_clock`), else a time would be that of launching the kernels.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from liveperceiver.core.errors import UserError, atomic_output
from liveperceiver.core.model import PerceiverAR
from liveperceiver.inference.auto_weights import resolve_weights, turn_order
from liveperceiver.inference.engine import DTYPES, Engine
from liveperceiver.inference.sampling import SamplingSettings
from liveperceiver.inference.weights import WEIGHTS, Int8Linear, PackedLinear, check_weights
from liveperceiver.inference.window import LatentWindow, parse_window
from liveperceiver.stats import percentile
from liveperceiver.tools.reference import reference_step_ms


@dataclass
class BenchRow:
    prefix: int
    latents: int | str  # the latent window as given: N, or "MIN:MAX"
    step_ms_p50: float
    step_ms_p99: float
    step_ms_max: float  # the worst step (with a window: a re-anchoring, MIN rows at once)
    alone_ms_p50: float  # a step that only samples (the model playing on its own: one new latent row)
    ahead_ms_max: float  # the worst step when the engine prepared in the idle time before it (Engine.prepare)
    player_ms_p99: float  # the player's tokens arrive: roll back the look-ahead, append them, sample
    tokens_per_s: float
    weights_mb: float
    kv_mb: float
    bandwidth_bound_ms: float  # weights / memory read bandwidth (a `sum`): the physical floor
    gemv_bound_ms: float  # weights / what matrix-vector products reach here: the practical floor
    flat_ratio: float | None = None  # step p50 after 100k tokens / after 5k (only with --flat)


def machine_description() -> str:
    """CPU model and core count (and the GPU when one is used), for the tables in README."""
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    description = f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores"
    if torch.cuda.is_available():
        description += f", GPU {torch.cuda.get_device_name()}"
    return description


def device_clock(device: str | torch.device) -> Callable[[], float]:
    """`time.perf_counter`, read once the device has done the work queued on it: a GPU runs kernels
    asynchronously, so a clock read right after a call would time their launch only. On the CPU the
    plain clock (nothing is queued)."""
    device = torch.device(device)
    if device.type == "cuda":

        def cuda_now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return cuda_now
    if device.type == "mps":

        def mps_now() -> float:
            torch.mps.synchronize()
            return time.perf_counter()

        return mps_now
    return time.perf_counter


def read_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Memory read bandwidth of `device`: the best of a few sums over a buffer much larger than the caches."""
    buffer = torch.ones(megabytes * 1024 * 1024 // 4, device=device)
    buffer.sum()
    best = min(_timed(buffer.sum, device_clock(device)) for _ in range(repeats))
    return buffer.numel() * 4 / best / 1e9


def gemv_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """What a step's matrix-vector products can reach on `device`: one vector through 1024x1024
    float32 matrices totalling `megabytes` (far beyond the caches), bytes of weights per second."""
    matrices = [torch.randn(1024, 1024, device=device) for _ in range(megabytes // 4)]
    vector = torch.randn(1, 1024, device=device)

    def chain() -> None:
        for matrix in matrices:
            torch.nn.functional.linear(vector, matrix)

    chain()
    best = min(_timed(chain, device_clock(device)) for _ in range(repeats))
    return sum(_tensor_bytes(m) for m in matrices) / best / 1e9


def _timed(function, now: Callable[[], float] = time.perf_counter) -> float:
    start = now()
    function()
    return now() - start


def weights_read_per_step(engine: Engine, latents: int | str | LatentWindow) -> int:
    """Bytes of weights one step with the latent window `latents` reads: those of the modules the
    engine says a step reads (`Engine.modules_read_per_step`: for window 1 a fused value-output
    matrix per layer), for the rows a step runs: N for N:N, else the two new rows of a bench step
    (the absorbed token's and the sampled one's)."""
    window = parse_window(latents)
    rows = window.max if window.sliding else 2
    return sum(_module_bytes(module, rows) for module in engine.modules_read_per_step(window))


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _module_bytes(module: nn.Module, rows: int) -> int:
    """Bytes a module reads for an input of `rows` rows (PackedLinear keeps float32 weights for several)."""
    if isinstance(module, Int8Linear):
        return sum(_tensor_bytes(t) for t in (module.weight, module.scales, module.bias) if t is not None)
    if isinstance(module, PackedLinear):
        if rows > 1 and module.rows_blocked is not None:
            return _module_bytes(module.rows_blocked, rows)
        weight = module.rows_weight if rows > 1 and module.rows_weight is not None else module.weight
        return _tensor_bytes(weight) + (0 if module.bias is None else _tensor_bytes(module.bias))
    # float Linear and norm layers: their parameters; BlockedLinear: its buffers (the reordered weight, the bias)
    return sum(_tensor_bytes(t) for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


def bench_step(engine: Engine, rng: random.Random) -> None:
    """The unit of live work a bench row times: absorb one token (a random one, as a player's), sample one."""
    engine.append([rng.randrange(388)])
    engine.step()


def bench_row(
    model: PerceiverAR,
    prefix: int,
    latents: int | str | LatentWindow,
    steps: int,
    dtype: torch.dtype,
    weights: str | None,
    device: str | torch.device,
) -> tuple[BenchRow, Engine]:
    config = model.config
    window = parse_window(latents)
    if prefix > config.max_prefix_len or window.max > config.max_latents:
        raise UserError(
            f"prefix {prefix} / latents {window} exceed the model ({config.max_prefix_len} / {config.max_latents})"
        )
    rng = random.Random(0)
    engine = Engine(
        model,
        num_latents=window,
        prefix_cap=prefix,
        sampling=SamplingSettings(seed=0),
        dtype=dtype,
        weights=weights,
        device=device,
    )
    engine.append(rng.randrange(388) for _ in range(prefix + window.max))
    step_times, player_times = [], []
    warmup = max(5, steps // 10)
    now = device_clock(engine.device)
    for index in range(warmup + steps):
        start = now()
        bench_step(engine, rng)
        elapsed = now() - start
        if index >= warmup:
            step_times.append(elapsed * 1000)
        if index % 4 == 0:
            player_time = player_arrives(engine, rng)
            if index >= warmup:
                player_times.append(player_time * 1000)
    p50 = statistics.median(step_times)
    alone = sampled_steps(engine, max(5, steps // 3), prepare=False)
    ahead = sampled_steps(engine, max(5, steps // 3), prepare=True)
    # Keys are read per position; values come from the two per-token tables (engine.py).
    kv_bytes = (prefix + window.max + 2 * config.vocab_size) * config.num_channels * torch.finfo(dtype).bits // 8
    row = BenchRow(
        prefix=prefix,
        latents=window.setting,
        step_ms_p50=round(p50, 3),
        step_ms_p99=round(percentile(step_times, 99), 3),
        step_ms_max=round(max(step_times), 3),
        alone_ms_p50=round(statistics.median(alone), 3),
        ahead_ms_max=round(max(ahead), 3),
        player_ms_p99=round(percentile(player_times, 99), 3),
        tokens_per_s=round(1000 / p50, 1),
        weights_mb=round(weights_read_per_step(engine, window) / 1e6, 2),
        kv_mb=round(kv_bytes / 1e6, 2),
        bandwidth_bound_ms=0.0,
        gemv_bound_ms=0.0,
    )
    return row, engine


def storages_flag(text: str) -> list[str]:
    """`bench --turns`: two or more weight storages (WEIGHTS but auto, which is not one), comma-separated."""
    storages = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    wrong = [storage for storage in storages if storage not in WEIGHTS[1:]]
    if wrong or len(storages) < 2:
        raise UserError(
            f"--turns {text}: two or more of {', '.join(WEIGHTS[1:])}, comma-separated"
            + (f" ({', '.join(wrong)} is not one)" if wrong else "")
        )
    return storages


def storages_in_turns(
    model: PerceiverAR,
    prefix: int,
    latents: int | str | LatentWindow,
    storages: list[str],
    steps: int,
    device: str | torch.device,
) -> dict[str, dict[str, float]]:
    """Per weight storage (`--turns`: "float32" or one of weights.STORED_WEIGHTS), the p50 of a bench
    step (absorb one token, sample one) and of a step alone after it, their engines taking turns step
    by step in one process, each first in turn, all absorbing the same tokens. Why: on a shared VM
    the speed drifts between runs by more than storages differ (the same code's 1-latent p50 moved
    2.0-2.9 ms between runs on one day), and rows measured one after the other inherit that drift."""
    window = parse_window(latents)
    rng = random.Random(0)
    context = [rng.randrange(388) for _ in range(prefix + window.max)]
    engines = []
    for storage in storages:
        engine = Engine(
            model,
            num_latents=window,
            prefix_cap=prefix,
            sampling=SamplingSettings(seed=0),
            weights=resolve_weights(storage, device, model),
            device=device,
        )
        engine.append(context)
        engines.append(engine)
    now = device_clock(engines[0].device)
    counted: list[list[float]] = [[] for _ in storages]
    alone: list[list[float]] = [[] for _ in storages]
    warmup = max(5, steps // 10)
    for index in range(warmup + steps):
        token = rng.randrange(388)
        for turn in turn_order(index, len(engines)):
            start = now()
            engines[turn].append([token])
            engines[turn].step()
            middle = now()
            engines[turn].step()  # the token it sampled is its one new row
            end = now()
            if index >= warmup:
                counted[turn].append((middle - start) * 1000)
                alone[turn].append((end - middle) * 1000)
    return {
        storage: {"step_ms_p50": round(statistics.median(c), 3), "alone_ms_p50": round(statistics.median(a), 3)}
        for storage, c, a in zip(storages, counted, alone, strict=True)
    }


PROFILE_ROWS = 15  # operators `--profile` prints per row
PROFILE_STEPS = 50  # steps `--profile` profiles per row (fewer with --steps)


def profile_steps(engine: Engine, steps: int) -> str:
    """Where a bench step's time goes: torch.profiler over `steps` more steps (absorb one token,
    sample one) of a warmed-up engine, its operators by their own time on the engine's device (on
    CUDA the GPU's kernels, those of graph replays too), the top PROFILE_ROWS. Why: on an H200 one
    replay of the 5.6M model's one-row graph cost 1.8 ms, close to the 134M model's 2.7 (README, "On
    a GPU"), and step times alone cannot say which kernels take it."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    rng = random.Random(1)
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            bench_step(engine, rng)
        if cuda:
            torch.cuda.synchronize(engine.device)
    by = "self_device_time_total" if cuda else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=by, row_limit=PROFILE_ROWS)


def sampled_steps(engine: Engine, steps: int, prepare: bool) -> list[float]:
    """Milliseconds per step that only samples (the model playing on its own). With `prepare` the
    engine first does, untimed, what the live engine thread does whenever it is ahead of playback
    (`Engine.prepare`): then a step is what a token that falls due costs, and a window's
    re-anchoring (MIN rows) is paid in `prepare`, so the worst of them is a normal step. Window 1
    has nothing to prepare."""
    now = device_clock(engine.device)
    times = []
    for _ in range(steps):
        if prepare:
            engine.prepare()
        start = now()
        engine.step()
        times.append((now() - start) * 1000)
    return times


def player_arrives(engine: Engine, rng: random.Random, lookahead: int = 4, tokens: int = 3) -> float:
    """Seconds the live engine thread spends when the player's tokens arrive while it samples ahead
    (`Session._absorb_player` and the next tick): the unplayed look-ahead is rolled back
    (`truncate`), the player's tokens appended, and the next token sampled, the engine calls a
    barge-in makes in a duet. The look-ahead (the last `lookahead` tokens, sampled untimed here) is
    a note's four tokens (velocity, note-on, time shift, note-off), about what a 200 ms look-ahead holds."""
    now = device_clock(engine.device)
    engine.sample(lookahead - 1)  # with the loop's last sampled token: `lookahead` unplayed tokens
    start = now()
    engine.truncate(len(engine) - lookahead)
    engine.append(rng.randrange(388) for _ in range(tokens))
    engine.step()
    return now() - start


def flat_ratio(engine: Engine, steps: int) -> float:
    """Step p50 after 100,000 tokens divided by step p50 after 5,000 (cost must stay flat)."""
    rng = random.Random(1)
    now = device_clock(engine.device)

    def median_step() -> float:
        times = []
        for _ in range(steps):
            start = now()
            bench_step(engine, rng)
            times.append(now() - start)
        return statistics.median(times)

    engine.truncate(0)
    engine.append(rng.randrange(388) for _ in range(5000))
    early = median_step()
    engine.append(rng.randrange(388) for _ in range(100_000 - len(engine)))
    late = median_step()
    return round(late / early, 3)


def top1_agreement(
    model: PerceiverAR, dtype: torch.dtype, weights: str | None, device: str | torch.device, steps: int = 1000
) -> float:
    """Share of steps where the low-precision engine's argmax equals float32's, teacher-forced on float32's greedy path."""
    rng = random.Random(2)
    prompt = [rng.randrange(388) for _ in range(min(1024, model.config.max_prefix_len))]
    engines = [
        Engine(model, sampling=SamplingSettings(greedy=True), device=device),
        Engine(model, sampling=SamplingSettings(greedy=True), dtype=dtype, weights=weights, device=device),
    ]
    for engine in engines:
        engine.append(prompt)
    agree = 0
    for _ in range(steps):
        reference = int(engines[0].next_logits()[:388].argmax())
        agree += int(engines[1].next_logits()[:388].argmax()) == reference
        for engine in engines:
            engine.append([reference])
    return agree / steps


def adaptation_cost(model: PerceiverAR, device: str | torch.device, steps: int = 100, run: int = 8) -> dict:
    """What in-session adaptation (on by default in `play`) adds per token, in the engine: two
    engines follow one practice-like stream (a full cache window of it, adapt.practice_stream), one
    adapting and one that never adapted (no cache at all), taking turns, each first in turn. Per
    player's token each samples `run` steps ahead (as `play` samples an answer), rolls them back and
    absorbs the player's token. The cost per token is the difference of their medians: a step (the
    mix, the learnt output layer, the cache taking the model's own token), a rolled-back step's share
    of the rollback (the cache forgetting it), and the player's token (the cache taking it, the
    weight judged and the output layer taught by it). Their sum is the cost of a player's token
    that a step predicted and that came after the look-ahead was sampled (a step, its rollback and
    the token): the dearest kind; a model's own token costs the step's part."""
    from liveperceiver.inference.adapt import practice_stream
    from liveperceiver.inference.session_cache import ORDER, WINDOW

    stream = practice_stream(WINDOW + steps)
    adapting = Engine(model, sampling=SamplingSettings(seed=0), device=device, adapt=1.0)
    plain = Engine(model, sampling=SamplingSettings(seed=0), device=device)
    times: dict[Engine, dict[str, list[float]]] = {}
    for engine in (adapting, plain):
        engine.append(stream[:WINDOW])
        times[engine] = {"step": [], "rollback": [], "absorb": []}
    now = device_clock(adapting.device)
    for index, token in enumerate(stream[WINDOW:]):
        for engine in (adapting, plain) if index % 2 else (plain, adapting):
            spent = times[engine]
            for _ in range(run):
                start = now()
                engine.step()
                spent["step"].append((now() - start) * 1000)
            start = now()  # the device's clock throughout: its queued work is timed where it was queued
            engine.truncate(len(engine) - run)
            spent["rollback"].append((now() - start) * 1000 / run)
            start = now()
            engine.append([token])
            spent["absorb"].append((now() - start) * 1000)
    added = {
        part: statistics.median(times[adapting][part]) - statistics.median(times[plain][part])
        for part in ("step", "rollback", "absorb")
    }
    return {
        "adapt_ms_p50": round(sum(added.values()), 4),
        "adapt_step_ms_p50": round(statistics.median(times[adapting]["step"]), 4),
        "adapt_step_ms_p50_without": round(statistics.median(times[plain]["step"]), 4),
        "adapt_rollback_ms_p50": round(added["rollback"], 4),
        "adapt_absorb_ms_p50": round(added["absorb"], 4),
        "adapt_run": run,
        "adapt_order": ORDER,
        "adapt_window": WINDOW,
    }


def run(args) -> list[dict]:
    from liveperceiver.core.checkpoint import load_model
    from liveperceiver.runtime import checked_device, configure_inference

    device = checked_device(args.device)
    args.turns = None if args.turns is None else storages_flag(args.turns)
    if args.turns and args.dtype != "float32":
        raise UserError(f"--turns compares the weight storages of a float32 engine; --dtype is {args.dtype}")
    configure_inference(args.threads, device.type, args.dtype)
    loaded = load_model(args.model)
    for storage in args.turns or ():  # before any row is measured (storages_in_turns builds them unchecked)
        try:
            check_weights(resolve_weights(storage, device, loaded.model), torch.float32, device)
        except ValueError as error:  # e.g. blocked weights on a GPU
            raise UserError(f"--turns {storage}: {error}") from None
    dtype = DTYPES[args.dtype]
    bandwidth, gemv = read_bandwidth_gb_s(device=device), gemv_bandwidth_gb_s(device=device)  # the engine's device
    rows = []
    header = (
        f"{'prefix':>6} {'latents':>7} {'p50 ms':>8} {'p99 ms':>8} {'worst ms':>8} {'alone p50':>9} {'ahead ms':>8}"
        f" {'player p99':>10} {'tok/s':>8}"
        f" {'weights MB':>10} {'bound ms':>8} {'gemv bound':>10}"
    )
    print(
        f"model {loaded.name} ({loaded.model.num_parameters() / 1e6:.1f}M parameters), dtype {args.dtype}, weights {args.weights or args.dtype}, threads {args.threads}"
    )
    print(f"machine: {machine_description()}; torch {torch.__version__}")
    on = "" if device.type == "cpu" else f"{device.type}: "
    print(f"{on}memory read bandwidth {bandwidth:.1f} GB/s; matrix-vector products reach {gemv:.1f} GB/s")
    print("player p99: the player's tokens arrive mid-answer: roll back 4 look-ahead tokens, append 3, sample one")
    print(
        "a step: absorb one token, sample one; latents N or MIN:MAX (a window re-anchors to MIN rows after MAX: "
        "worst); alone: a step that only samples (one new latent row); ahead: the worst such step when the "
        "engine prepared in idle time first, as the live engine thread does"
    )
    print(header)
    for prefix in args.prefix:
        for latents in args.latents:
            window = parse_window(latents)
            if prefix > loaded.model.config.max_prefix_len or window.max > loaded.model.config.max_latents:
                print(f"{prefix:>6} {window!s:>7}  skipped: beyond the model's context")
                continue
            # --weights: None or float32 store weights in --dtype; auto measures at this window, as `play` does
            weights = (
                None if args.weights is None else resolve_weights(args.weights, device, loaded.model, window, dtype)
            )
            stored = weights or args.dtype  # the storage precision, as the row records it
            row, engine = bench_row(loaded.model, prefix, latents, args.steps, dtype, weights, device)
            row.bandwidth_bound_ms = round(row.weights_mb / bandwidth, 3)  # MB / (GB/s) = ms
            row.gemv_bound_ms = round(row.weights_mb / gemv, 3)
            profiled = min(args.steps, PROFILE_STEPS) if args.profile else 0
            if profiled:  # before --flat, which leaves the engine 100k tokens further on
                profile = profile_steps(engine, profiled)
            if args.flat:
                row.flat_ratio = flat_ratio(engine, args.steps)
            reference = None
            if not args.no_reference:
                # a window's column: generate() with num_latents = its MAX; in turns with this row's bench step
                reference = reference_step_ms(
                    loaded.model,
                    prefix,
                    window.max,
                    min(args.steps, 100),
                    partial(bench_step, engine, random.Random(2)),
                )
            extra = {}
            if args.turns:
                extra["turns"] = storages_in_turns(loaded.model, prefix, latents, args.turns, args.steps, device)
            if reference is not None:
                extra |= {
                    "reference_ms_p50": round(reference.alone_ms, 3),
                    "speedup": round(reference.alone_ms / row.step_ms_p50, 2),
                    "reference_in_turns_ms_p50": round(reference.in_turns_ms, 3),
                    "ours_in_turns_ms_p50": round(reference.ours_in_turns_ms, 3),
                    "speedup_in_turns": round(reference.in_turns_ms / reference.ours_in_turns_ms, 2),
                }
            rows.append(
                asdict(row)
                | extra
                | {
                    "threads": args.threads,
                    "dtype": args.dtype,
                    "weights": stored,
                    "model": loaded.name,
                }
            )
            line = (
                f"{row.prefix:>6} {row.latents!s:>7} {row.step_ms_p50:>8.2f} {row.step_ms_p99:>8.2f}"
                f" {row.step_ms_max:>8.2f} {row.alone_ms_p50:>9.2f} {row.ahead_ms_max:>8.2f} {row.player_ms_p99:>10.3f}"
                f" {row.tokens_per_s:>8.0f} {row.weights_mb:>10.1f} {row.bandwidth_bound_ms:>8.2f} {row.gemv_bound_ms:>10.2f}"
            )
            if row.flat_ratio is not None:
                line += f"  after-100k/5k {row.flat_ratio:.3f}"
            if reference is not None:
                line += (
                    f"  reference {reference.alone_ms:.2f} ms ({extra['speedup']:.1f}x); taking turns"
                    f" {reference.in_turns_ms:.2f} against {reference.ours_in_turns_ms:.2f} ({extra['speedup_in_turns']:.1f}x)"
                )
            if args.weights == "auto":
                line += f"  weights {stored}"
            print(line, flush=True)
            if args.turns:
                turns = "; ".join(
                    f"{storage} {t['step_ms_p50']:.2f} (alone {t['alone_ms_p50']:.2f})"
                    for storage, t in extra["turns"].items()
                )
                print(f"{'':>6} {'':>7}  taking turns, step p50 ms: {turns}", flush=True)
            if profiled:
                print(f"where {profiled} more steps of this row go:")
                print(profile, flush=True)
    adaptation = adaptation_cost(loaded.model, device)
    print(
        f"in-session adaptation (adapt.py, session_cache.py; order {adaptation['adapt_order']}, {adaptation['adapt_window']}-token "
        f"window, a practice-like stream, 1 latent): {adaptation['adapt_ms_p50']:.3f} ms per token "
        f"(step p50 {adaptation['adapt_step_ms_p50']:.3f} ms with the mix, {adaptation['adapt_step_ms_p50_without']:.3f} "
        f"without adaptation, runs of {adaptation['adapt_run']}; a rolled-back step {adaptation['adapt_rollback_ms_p50']:.3f} ms "
        f"more, the player's token {adaptation['adapt_absorb_ms_p50']:.3f} ms more)"
    )
    for row in rows:
        row.update(adaptation)
    for stored in dict.fromkeys(row["weights"] for row in rows):  # each storage the rows used, once
        if args.dtype != "float32" or stored != "float32":
            agreement = top1_agreement(loaded.model, dtype, None if stored == args.dtype else stored, device)
            print(f"top-1 agreement with float32 over 1000 greedy steps ({stored} weights): {agreement:.3f}")
            for row in rows:
                if row["weights"] == stored:
                    row["top1_agreement"] = agreement
    if args.json:
        with atomic_output(Path(args.json), "w") as file:
            json.dump(rows, file, indent=2)
    return rows
