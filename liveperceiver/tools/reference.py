"""perceiver-io 0.11.0 as `bench`'s yardstick: its own `generate()` on the same weights, timed alone and
taking turns with our engine's steps (the reference column of README's tables). perceiver-io is an
optional benchmark dependency (a separate virtual environment: README, "Performance")."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from liveperceiver.core.model import PerceiverAR

# The reference and ours take turns in runs of this many tokens and steps (`reference_step_ms`), and
# each run's first, which starts with caches the other filled, is not timed: one step of ours between
# two reference tokens ran cold (the 5.6M model's 1-latent step 1.30 -> 1.99 ms), and the reference's
# token after a run of ours as well (13.4 -> 21.3 ms at 16:32, prefix 4096)
OURS_PER_TOKEN = 8


@dataclass(frozen=True)
class ReferenceTimes:
    """perceiver-io's median step, alone and taking turns with ours, and ours in those turns (ms)."""

    alone_ms: float
    in_turns_ms: float
    ours_in_turns_ms: float


def reference_step_ms(
    model: PerceiverAR, prefix: int, latents: int, steps: int, ours: Callable[[], None]
) -> ReferenceTimes | None:
    """Median per-token time of perceiver-io's own `generate()` with its KV cache, on the same weights;
    None when perceiver-io is not importable (it is an optional benchmark dependency). Timed twice:
    alone, then taking turns with `ours` (a bench step of our engine): at every OURS_PER_TOKEN-th
    of its tokens a hook runs OURS_PER_TOKEN of ours and times them. The two alternate in one
    process, so the ratio holds on a VM whose speed drifts (the reference's own step varied
    12.5-27.9 ms in four runs of one session, ours 2.1-3.1 ms)."""
    try:
        from perceiver.model.audio.symbolic.backend import SymbolicAudioModelConfig
        from perceiver.model.audio.symbolic.huggingface import (
            PerceiverSymbolicAudioModel,
            PerceiverSymbolicAudioModelConfig,
        )
        from transformers import LogitsProcessor, LogitsProcessorList
    except ImportError:
        return None
    from liveperceiver.core.checkpoint import to_reference_state_dict

    class StepClock(LogitsProcessor):
        """Between two reference tokens: the time it arrived, then (with `between`, at every
        OURS_PER_TOKEN-th token) a run of OURS_PER_TOKEN of ours, each timed."""

        def __init__(self, between: Callable[[], None] | None) -> None:
            self.between = between
            self.arrived: list[float] = []
            self.resumed: list[float] = []
            self.ours: list[float] = []

        def __call__(self, input_ids, scores):
            self.arrived.append(time.perf_counter())
            if self.between is not None and len(self.arrived) % OURS_PER_TOKEN == 1:
                for step in range(OURS_PER_TOKEN):
                    start = time.perf_counter()
                    self.between()
                    if step:  # the first is cold
                        self.ours.append((time.perf_counter() - start) * 1000)
            self.resumed.append(time.perf_counter())
            return scores

        def reference_ms(self) -> float:
            """Its median token, over the tokens that did not follow a run of ours (those start
            with caches ours filled, as ours would after its tokens: both are timed warm)."""
            return statistics.median(
                (arrived - resumed) * 1000
                for index, (resumed, arrived) in enumerate(zip(self.resumed, self.arrived[1:], strict=False))
                if self.between is None or index % OURS_PER_TOKEN != 0
            )

    config = PerceiverSymbolicAudioModelConfig(SymbolicAudioModelConfig.create(**model.config.to_dict()))
    config.is_decoder = True
    reference = PerceiverSymbolicAudioModel(config).eval()
    state = to_reference_state_dict(model.state_dict())
    state["backend_model.input_adapter.frq_pos_encoding.inv_freq"] = reference.state_dict()[
        "backend_model.input_adapter.frq_pos_encoding.inv_freq"
    ]
    reference.load_state_dict(state)
    prompt = torch.randint(0, 388, (1, prefix + latents), generator=torch.Generator().manual_seed(0))
    clocks = [StepClock(None), StepClock(ours)]
    with torch.inference_mode():
        for clock in clocks:
            reference.generate(
                input_ids=prompt,
                max_new_tokens=steps + 1,
                num_latents=latents,
                do_sample=False,
                use_cache=True,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=388,
            )

    return ReferenceTimes(
        alone_ms=clocks[0].reference_ms(),
        in_turns_ms=clocks[1].reference_ms(),
        ours_in_turns_ms=statistics.median(clocks[1].ours),
    )
