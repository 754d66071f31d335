"""Finding and loading models: perceiver-io Hugging Face directories, Hugging Face repo ids,
LivePerceiver's own `models/<name>/` format, and random-weight configurations for benchmarks.

Loading never unpickles arbitrary objects: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError, atomic_output, atomic_path
from liveperceiver.core.model import PerceiverAR, PerceiverARConfig
from liveperceiver.core.shipped import (  # finding models needs no torch: presets check the model they name
    DEFAULT_MODEL,
    RANDOM_MAX_LATENTS,
    looks_like_repo_id,
    model_directory,
    unknown_model_message,
)

OWN_FORMAT = "liveperceiver"
SEED_REPO_ID = "krasserm/perceiver-ar-sam-giant-midi"

RANDOM_CONFIGS = {
    # The 134M seed checkpoint's configuration.
    "seed": dict(max_seq_len=6144, max_latents=2048, num_channels=768, num_heads=8, num_self_attention_layers=18),
    # A 5.6M model of the same family (the engine's speed targets refer to it).
    "small": dict(max_seq_len=6144, max_latents=2048, num_channels=256, num_heads=4, num_self_attention_layers=6),
}
assert {name: config["max_latents"] for name, config in RANDOM_CONFIGS.items()} == RANDOM_MAX_LATENTS


@dataclass
class LoadedModel:
    model: PerceiverAR
    name: str  # what the user asked for, shortened for display
    source: str  # where the weights came from


# --------------------------------------------------------------------------- perceiver-io key mapping

# (perceiver-io name, LivePerceiver name); {i} stands for a layer index, {m} for a submodule.
_KEY_PAIRS = [
    ("input_adapter.txt_embedding.", "embedding."),
    ("input_adapter.pos_embedding.", "pos_embedding."),
    ("cross_attention.0.module.{m}.", "cross_attention.{m}."),
    ("cross_attention.1.module.0.", "cross_attention.mlp.norm."),
    ("cross_attention.1.module.1.", "cross_attention.mlp.fc1."),
    ("cross_attention.1.module.3.", "cross_attention.mlp.fc2."),
    ("self_attention.{i}.0.module.{m}.", "self_attention.{i}.{m}."),
    ("self_attention.{i}.1.module.0.", "self_attention.{i}.mlp.norm."),
    ("self_attention.{i}.1.module.1.", "self_attention.{i}.mlp.fc1."),
    ("self_attention.{i}.1.module.3.", "self_attention.{i}.mlp.fc2."),
    ("out_norm.", "out_norm."),
    ("output_adapter.bias", "output_bias"),
]
_DERIVED_REFERENCE_KEYS = ("backend_model.input_adapter.frq_pos_encoding.inv_freq",)


def _template_regex(template: str) -> re.Pattern:
    pattern = (
        re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{m\}", r"(?P<m>q_norm|kv_norm|norm|attention)")
    )
    return re.compile("^" + pattern)


def _rename(key: str, to_reference: bool) -> str | None:
    """The other side's name for `key` (without the `backend_model.` prefix), or None."""
    for reference, own in _KEY_PAIRS:
        source, target = (own, reference) if to_reference else (reference, own)
        match = _template_regex(source).match(key)
        if match and (match.end() == len(key) or source.endswith(".")):
            return target.format(**match.groupdict()) + key[match.end() :]
    return None


def from_reference_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename perceiver-io keys (`backend_model.` prefix) to this package's module names."""
    renamed = {}
    for key, tensor in state.items():
        if key in _DERIVED_REFERENCE_KEYS:
            continue  # rotary inverse frequencies are recomputed
        new_key = _rename(key.removeprefix("backend_model."), to_reference=False)
        if new_key is None:
            raise UserError(f"{source}: unexpected tensor {key!r} in checkpoint")
        renamed[new_key] = tensor
    return renamed


def to_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This package's keys renamed to perceiver-io's (without the derived rotary frequencies)."""
    renamed = {}
    for key, tensor in state.items():
        new_key = _rename(key, to_reference=True)
        if new_key is None:
            raise ValueError(f"no perceiver-io name for tensor {key!r}")
        renamed["backend_model." + new_key] = tensor
    return renamed


# --------------------------------------------------------------------------- building models


def build_model(config: PerceiverARConfig, state: dict[str, torch.Tensor] | None, source: str) -> PerceiverAR:
    """A model in eval mode with `state` loaded strictly; mismatches become one-line UserErrors."""
    if config.vocab_size != vocab.VOCAB_SIZE:
        raise UserError(
            f"{source}: vocab_size {config.vocab_size} does not match the {vocab.VOCAB_SIZE}-token performance vocabulary"
        )
    model = PerceiverAR(config)
    if state is not None:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing:
            raise UserError(f"{source}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if extra:
            raise UserError(f"{source}: checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[0]!r}")
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise UserError(
                    f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[key].shape)}"
                )
        model.load_state_dict({key: tensor.float() for key, tensor in state.items()})
    return model.eval()


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"{path}: cannot read checkpoint config ({error})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: not a checkpoint config (a JSON object)")
    return values


def _config_from(values: object, source: str) -> PerceiverARConfig:
    if not isinstance(values, dict):
        raise UserError(f"{source}: invalid model config (not a JSON object)")
    try:
        return PerceiverARConfig.from_dict(values)
    except (TypeError, ValueError, ZeroDivisionError) as error:
        raise UserError(f"{source}: invalid model config ({error})") from None


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = directory / "model.safetensors", directory / "pytorch_model.bin"
    try:
        if safetensors_path.is_file():
            return load_file(str(safetensors_path))
        if bin_path.is_file():
            return torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or truncated weight files
        raise UserError(f"{directory}: cannot read weights ({type(error).__name__}: {error})") from None
    raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin")


def load_directory(directory: str | Path) -> PerceiverAR:
    """Load a perceiver-io Hugging Face directory or a LivePerceiver `models/<name>/` directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no config.json, not a model directory")
    meta = _read_json(config_path)
    if "model_config" not in meta:
        raise UserError(f"{config_path}: no 'model_config' section")
    config = _config_from(meta["model_config"], str(config_path))
    state = _read_weights(directory)
    if meta.get("format") != OWN_FORMAT:
        state = from_reference_state_dict(state, str(directory))
    return build_model(config, state, str(directory))


def save_directory(
    model: PerceiverAR, directory: str | Path, dtype: torch.dtype = torch.float32, extra: dict | None = None
) -> None:
    """Save in LivePerceiver's own format: config.json + model.safetensors (the model card is written separately).
    Each file is replaced atomically and gets the permissions a plain open() gives (safetensors alone writes 0600)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().to(dtype).contiguous() for key, tensor in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as temporary:
        save_file(state, str(temporary))
    meta = {"format": OWN_FORMAT, "model_config": model.config.to_dict(), **(extra or {})}
    with atomic_output(directory / "config.json", "w") as file:
        file.write(json.dumps(meta, indent=2) + "\n")


def random_model(spec: str, seed: int = 0) -> PerceiverAR:
    """`seed`, `small` or a path to a config.json, with random weights (for benchmarks)."""
    if spec in RANDOM_CONFIGS:
        config = PerceiverARConfig(**RANDOM_CONFIGS[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"random:{spec}: not 'seed', 'small' or an existing config.json")
        values = _read_json(path)
        config = _config_from(values.get("model_config", values), spec)
    torch.manual_seed(seed)
    return build_model(config, None, f"random:{spec}")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors", "pytorch_model.bin"])
        )
    except Exception as error:  # offline, unknown repo, auth
        raise UserError(f"{repo_id}: cannot download from Hugging Face ({type(error).__name__}: {error})") from None


def load_model(spec: str | None = None) -> LoadedModel:
    """Resolve a model spec: None (the shipped default), a path, a name under models/, a Hugging Face
    repo id, or `random:seed|small|<config.json>`."""
    spec = spec or DEFAULT_MODEL
    if spec.startswith("random:"):
        return LoadedModel(random_model(spec.removeprefix("random:")), spec, "random weights")
    directory = model_directory(spec)
    if directory is not None:
        name = directory.name if directory == Path(spec).expanduser() else spec
        return LoadedModel(load_directory(directory), name, str(directory))
    if looks_like_repo_id(spec):
        return LoadedModel(load_directory(_download(spec)), spec, f"huggingface:{spec}")
    raise UserError(unknown_model_message(spec))
