"""The engine's `weights` setting resolved to what it stores (weights.py holds the storage): `auto`
measures the choices (float32, float16, blocked, int8) on the engine itself, once per model
configuration, device and window.
"""

from __future__ import annotations

import time

import torch

from liveperceiver.core import vocab
from liveperceiver.core.model import PerceiverAR
from liveperceiver.inference.engine import Engine
from liveperceiver.inference.sampling import SamplingSettings
from liveperceiver.inference.weights import WEIGHTS, blocked_weights_available, int8_kernel_available
from liveperceiver.inference.window import LatentWindow, fitted_window


def resolve_weights(
    weights: str,
    device: torch.device,
    model: PerceiverAR,
    num_latents: int | str | LatentWindow = 1,
    dtype: torch.dtype = torch.float32,
) -> str | None:
    """The engine's `weights` (None: stored in the compute dtype) for a weights setting (weights.py).
    `auto` keeps the compute dtype for 16-bit compute (`dtype`), which stores its own weights, and
    float32 on GPUs, where a step costs kernel launches, not bytes. On a CPU a step costs about the
    bytes of its weights, so 16-bit and int8 weights should pay, but whether they do depends on the
    CPU (float16 weights 30% faster on an AVX2 EPYC, 30% slower on an AVX512 Xeon: README, "Weight
    storage"), on the model's size (torch's int8 kernel is the fastest for the 5.6M model on an
    AVX512 EPYC and slower than float16 for the 134M one at one latent) and on the latent window
    (16-bit kernels serve one row only, a window's several rows go through a float32 copy; int8
    serves any rows), and blocked float32 weights pay for large models only (weights.BlockedLinear).
    So `auto` measures them on the engine at the window it is built with, once per model
    configuration, device and window (`faster_weights`); a later change of window (Engine.configure)
    keeps the weights."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r} is not one of: {', '.join(WEIGHTS)}")
    if weights == "auto":
        if device.type != "cpu" or dtype != torch.float32:
            return None
        window = fitted_window(num_latents, model.config.max_latents)
        key = (repr(model.config), str(device), window.setting)
        if key not in _MEASURED_WEIGHTS:
            _MEASURED_WEIGHTS[key] = faster_weights(model, device, num_latents=window)
        return _MEASURED_WEIGHTS[key]
    return None if weights == "float32" else weights


_MEASURED_WEIGHTS: dict[tuple[str, str, str], str | None] = {}


def turn_order(round_index: int, count: int) -> list[int]:
    """The order `count` engines taking turns step in at round `round_index`: each goes first in turn,
    so none always runs right after another's (its caches filled by it) or always first."""
    first = round_index % count
    return [*range(first, count), *range(first)]


def faster_weights(
    model: PerceiverAR, device: torch.device, budget_s: float = 0.3, num_latents: int | str | LatentWindow = 1
) -> str | None:
    """None (float32), "float16", "blocked" or "int8" (the last two where their kernels work),
    whichever makes a duet's steps with the latent window `num_latents` fastest here: the median
    over rounds of a one-row step plus a two-row step, engines taking turns for about `budget_s`
    seconds after a 1,024-token context. Why both: the model's own next token is one new latent row
    with a window, a player's token arriving with it two (a bench step), and the storages rank
    differently for them (16-bit kernels serve single rows only)."""
    candidates = (
        None,
        "float16",
        *(("blocked",) if blocked_weights_available(device) else ()),
        *(("int8",) if int8_kernel_available(device) else ()),
    )
    engines = [
        Engine(model, num_latents=num_latents, device=device, weights=w, sampling=SamplingSettings(seed=0))
        for w in candidates
    ]
    context = [vocab.velocity_token(80), vocab.note_on(60), vocab.TIME_SHIFT + 44, vocab.note_off(60)] * 256  # 450 ms
    for engine in engines:
        engine.append(context)
    times: list[list[float]] = [[] for _ in candidates]
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 4 or (time.perf_counter() < deadline and rounds < 200):
        for index in turn_order(rounds, len(engines)):
            elapsed = 0.0
            for rows in (1, 2):
                # the context's last tokens taken back and played again: with a window their latent
                # rows are computed anew in the step, as a player's tokens are (a kept row costs nothing)
                engines[index].truncate(len(context) - rows)
                engines[index].append(context[-rows:])
                start = time.perf_counter()
                engines[index].step()
                elapsed += time.perf_counter() - start
            times[index].append(elapsed)
        rounds += 1
    medians = [sorted(measured[1:])[len(measured[1:]) // 2] for measured in times]  # the first is warm-up
    return candidates[medians.index(min(medians))]
