"""The live session's model and engine: which model a setting names (`resolve_model`) and how the
engine is built from the settings and play's --device, --weights and --dtype (`EngineOptions`, kept by
the run controller to build the engine again when the model changes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from liveperceiver.core.errors import UserError
from liveperceiver.live.settings import Settings

if TYPE_CHECKING:
    from liveperceiver.core.model import PerceiverAR
    from liveperceiver.inference.engine import Engine


def resolve_model(spec) -> PerceiverAR:
    """A PerceiverAR, a LoadedModel, or a spec for checkpoint.load_model (None: the shipped default)."""
    if spec is None or isinstance(spec, str | Path):
        from liveperceiver.core.checkpoint import load_model

        return load_model(None if spec is None else str(spec)).model
    return getattr(spec, "model", spec)


@dataclass(frozen=True)
class EngineOptions:
    """How the session builds its engine (play's --device, --weights, --dtype), kept to build it
    again when the model changes. An immutable value: the session's constructor builds the first
    engine on the caller's thread, the engine thread any later one."""

    device: str = "auto"  # cuda, then mps, then cpu
    weights: str = "auto"  # how the engine stores Linear weights (auto_weights.resolve_weights)
    dtype: str = "float32"  # the compute dtype: float32, or bfloat16/float16 on a GPU

    def build(self, model: PerceiverAR, settings: Settings) -> Engine:
        from liveperceiver.inference.auto_weights import resolve_weights
        from liveperceiver.inference.engine import DTYPES, Engine, pick_device

        max_latents = model.config.max_latents
        if settings.latent_window(max_latents).max > max_latents:
            raise UserError(f"num_latents {settings.num_latents} is more than the model's max_latents {max_latents}")
        cap = settings.prefix_cap or None
        if cap is not None:
            cap = min(cap, model.config.max_prefix_len)
        device, dtype = pick_device(self.device), DTYPES[self.dtype]
        try:
            return Engine(
                model,
                num_latents=settings.num_latents,
                prefix_cap=cap,
                sampling=settings.sampling_settings(),
                constraints=settings.engine_constraints(),
                adapt=settings.adapt,
                device=device,
                dtype=dtype,
                weights=resolve_weights(self.weights, device, model, settings.num_latents, dtype),
            )
        except ValueError as error:  # e.g. int8 weights on a GPU
            raise UserError(f"cannot build the engine: {error}") from None
