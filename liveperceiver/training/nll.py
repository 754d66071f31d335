"""NLL per token, the figure training validates on and eval reports, computed in one place:

- `window_nll`: the model's NLL of one scoring window (a full forward pass);
- `windows_nll`: the loop over windows (training's validation, eval's `model_nll`);
- `model_nll`: every token of some pieces with the context of training windows (windows.py);
- `adapted_nll`: the same targets with in-session adaptation mixed in (the closed form of the
  engine's mix, on the scores of `model_nll`: a quick way to try a weight);
- `stream_token_nll`: token by token on the live engine, with a chosen latent window, adaptation
  and the guards and follows of `play` (eval's `nll`, the system as `play` runs it);
- `stream_nll`: its mean, per latent window (eval --window-latents).

The forward passes run where the model's weights are, the engine on the device it is given.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from liveperceiver.core.model import PerceiverAR
from liveperceiver.inference.adapt import CacheWeight, mixed_probability
from liveperceiver.inference.session_cache import SessionCache
from liveperceiver.training.windows import piece_windows


def window_nll(model: PerceiverAR, tokens: list[int], prefix_len: int) -> torch.Tensor:
    """Per-target NLL (nats) of the latent positions of one window: targets tokens[prefix_len+1:],
    on the model's device."""
    device = next(model.parameters()).device
    x = torch.tensor([tokens[:-1]], dtype=torch.long, device=device)
    logits = model(x, prefix_len)[0].float()
    targets = torch.tensor(tokens[prefix_len + 1 :], dtype=torch.long, device=device)
    return F.cross_entropy(logits, targets, reduction="none")


def windows_nll(
    model: PerceiverAR, windows: list[tuple[list[int], int]], bf16: bool = False, progress: bool = False
) -> list[torch.Tensor]:
    """Per-target NLL of each window (`window_nll`), in eval mode and without gradients (bfloat16
    autocast with `bf16`, as training runs); the model's mode is restored after."""
    was_training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type
    try:
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            scored = tqdm(windows, desc="scoring", unit="window", disable=not progress, file=sys.stderr)
            return [window_nll(model, tokens, prefix_len) for tokens, prefix_len in scored]
    finally:
        model.train(was_training)


def model_nll(model: PerceiverAR, pieces: list[list[int]], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-target NLL and the target ids, over tokens 1.. of every piece, context as in training."""
    config = model.config
    windows = [w for piece in pieces for w in piece_windows(piece, config.max_prefix_len, config.max_latents)]
    if not windows:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    nlls = windows_nll(model, windows, progress=progress)
    targets = [np.asarray(tokens[prefix_len + 1 :]) for tokens, prefix_len in windows]
    return np.concatenate([nll.cpu().numpy() for nll in nlls]), np.concatenate(targets)


def adapted_nll(nll: np.ndarray, pieces: list[list[int]], adapt: float) -> np.ndarray:
    """Per-target NLL with in-session adaptation, as `play` mixes it (adapt.py): each piece is a
    session, its own past feeds a fresh cache token by token, and the cache is mixed with the
    model's probability of each target (`nll`, from `model_nll`: the same targets in the same order)
    at the weight the session has learnt so far (adapt.CacheWeight), every token the player's. The
    session cache only: the experts and the output layer's learning (dynamic.py) are not in it."""
    if not adapt:
        return nll
    targets = sum(len(piece) - 1 for piece in pieces)
    if targets != len(nll):
        raise ValueError(f"adapted_nll: {len(nll)} model targets for {targets} tokens")
    p_model = np.exp(-nll)
    mixed = np.empty(len(nll))
    index = 0
    for piece in pieces:
        cache, weight = SessionCache(), CacheWeight()
        cache.push(piece[0])
        for position, token in enumerate(piece[1:], start=1):
            a, b = cache.token_terms(token)
            mixed[index] = mixed_probability(p_model[index], a, b, adapt * weight.fraction)
            weight.judge(position, p_model[index], a, b, adapt)
            cache.push(token)
            index += 1
    return -np.log(mixed)


def stream_token_nll(
    model,
    pieces: list[list[int]],
    num_latents: int | str,
    max_tokens: int | None = None,
    adapt: float = 0.0,
    constraints=None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-target NLL as the live engine predicts the stream, token by token: (the system, the model
    alone), over tokens 1.. of every piece in order (at most `max_tokens`).

    Every token is predicted from all the tokens before it in its piece, its latents those of the
    latent window `num_latents` (N or MIN:MAX, inference/window.py; at most the model's
    max_latents). The model alone is the engine's logits by the model's own output projection; the
    system is what `play` samples from at temperature 1 (Engine.played_logits): the output layer the
    session taught it (dynamic.py), the engine's session cache mixed in at the weight it learns up
    to `adapt`, and its experts (adapt.mix_logits), then `constraints` (sampling.constraint_mask: the guards and the key,
    dynamics and density follows; the orphan guard in the tokenizer's language,
    `repeated_note_offs`), every token counted as the player's. Top-k and top-p are not applied:
    they give some true tokens probability 0. The engine runs on `device`."""
    from liveperceiver.inference.engine import Engine
    from liveperceiver.inference.sampling import Constraints
    from liveperceiver.inference.window import fitted_window

    latents = fitted_window(num_latents, model.config.max_latents)
    constraints = constraints or Constraints()
    if constraints.no_orphan_note_off:  # real streams close a pitch struck twice twice (sampling.Constraints)
        constraints = replace(constraints, repeated_note_offs=True)
    total = sum(len(piece) - 1 for piece in pieces)
    count = total if max_tokens is None else min(total, max_tokens)
    system, alone = np.empty(count), np.empty(count)
    index = 0
    bar = tqdm(total=count, desc=f"window {latents}", unit="token", disable=not progress, file=sys.stderr)
    with torch.inference_mode():
        for piece in pieces:
            if index >= count:
                break
            engine = Engine(model, num_latents=latents, device=device, adapt=adapt, constraints=constraints)
            engine.append(piece[:1])
            for target in piece[1 : 1 + count - index]:
                logits = engine.next_logits().float()
                own = engine.head.model_logits()[-1].float() if engine.dynamic is not None and adapt else logits
                alone[index] = -float(torch.log_softmax(own, -1)[target])
                if adapt or constraints.active:
                    played = engine.played_logits(logits.clone(), temperature=1.0)
                    system[index] = -float(torch.log_softmax(played, -1)[target])
                else:
                    system[index] = alone[index]
                index += 1
                engine.append([target])
                bar.update()
    bar.close()
    return system, alone


def stream_nll(
    model,
    pieces: list[list[int]],
    num_latents: int | str,
    max_tokens: int,
    progress: bool = True,
    adapt: float = 0.0,
    device: str | torch.device = "cpu",
) -> dict:
    """Mean NLL per token as the live engine sees the stream with the latent window `num_latents`
    (`stream_token_nll`; a small live window trades some of the training windows' quality for
    speed): `nll` with the session cache mixed in (its weight learnt up to `adapt`), `nll_model` without."""
    from liveperceiver.inference.window import fitted_window

    system, alone = stream_token_nll(model, pieces, num_latents, max_tokens, adapt, None, device, progress)
    return {
        "num_latents": fitted_window(num_latents, model.config.max_latents).setting,
        "tokens": len(system),
        "adapt": adapt,
        "nll": float(system.mean()) if len(system) else 0.0,
        "nll_model": float(alone.mean()) if len(alone) else 0.0,
    }
