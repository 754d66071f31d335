"""NLL per token, the figure training validates on and eval reports, computed in one place:

- `window_nll`: the model's NLL of one scoring window (a full forward pass);
- `windows_nll`: the loop over windows (training's validation, eval's `model_nll`);
- `model_nll`: every token of some pieces with the context of training windows (windows.py);
- `adapted_nll`: the same targets with in-session adaptation mixed in, as `play` runs it;
- `stream_nll`: token by token on the live engine, with a chosen latent window (eval --window-latents).

The forward passes run where the model's weights are, the engine on the device it is given.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from liveperceiver.core.model import PerceiverAR
from liveperceiver.inference.adapt import SessionCache, effective_weight, mixed_probability
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


def adapted_nll(nll: np.ndarray, pieces: list[list[int]], weight: float) -> np.ndarray:
    """Per-target NLL with in-session adaptation, as `play` mixes it (adapt.py): each piece is a
    session, its own past feeds a fresh cache token by token, and the cache is mixed with the
    model's probability of each target (`nll`, from `model_nll`: the same targets in the same order)."""
    if not weight:
        return nll
    a, b, seen = np.empty(len(nll)), np.empty(len(nll)), np.empty(len(nll))
    index = 0
    for piece in pieces:
        cache = SessionCache()
        cache.push(piece[0])
        for token in piece[1:]:
            a[index], b[index] = cache.token_terms(token)
            seen[index] = len(cache)
            cache.push(token)
            index += 1
    if index != len(nll):
        raise ValueError(f"adapted_nll: {len(nll)} model targets for {index} tokens")
    return -np.log(mixed_probability(np.exp(-nll), a, b, effective_weight(weight, seen)))


def stream_nll(
    model,
    pieces: list[list[int]],
    num_latents: int | str,
    max_tokens: int,
    progress: bool = True,
    adapt: float = 0.0,
    device: str | torch.device = "cpu",
) -> dict:
    """NLL per token as the live engine sees the stream: every token predicted from all the tokens
    before it in its piece, its latents those of the latent window `num_latents` (N or MIN:MAX,
    inference/window.py; training uses the model's max_latents, a small live window trades some of
    that quality for speed; at most the model's max_latents here); `nll` with the
    engine's own session cache mixed in at weight `adapt` (adapt.mix_logits), `nll_model` without.
    The engine runs on `device`."""
    from liveperceiver.inference.adapt import mix_logits
    from liveperceiver.inference.engine import Engine
    from liveperceiver.inference.window import parse_window

    latents = parse_window(num_latents).capped(model.config.max_latents)
    total, total_model, count = 0.0, 0.0, 0
    bar = tqdm(total=max_tokens, desc=f"window {latents}", unit="token", disable=not progress, file=sys.stderr)
    for piece in pieces:
        if count >= max_tokens:
            break
        engine = Engine(model, num_latents=latents, device=device, adapt=adapt)
        engine.append(piece[:1])
        for target in piece[1 : 1 + max_tokens - count]:
            logits = engine.next_logits().float()
            total_model -= float(torch.log_softmax(logits, -1)[target])
            total -= float(torch.log_softmax(mix_logits(logits, engine.cache, adapt), -1)[target]) if adapt else 0.0
            count += 1
            engine.append([target])
            bar.update()
    bar.close()
    alone = total_model / max(count, 1)
    return {
        "num_latents": latents.setting,
        "tokens": count,
        "adapt": adapt,
        "nll": total / max(count, 1) if adapt else alone,
        "nll_model": alone,
    }
