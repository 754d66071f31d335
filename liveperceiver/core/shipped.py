"""Where the shipped presets and models are: inside the installed package (a wheel), else the checkout.

A wheel carries copies of the repository's top-level `presets/` and of the models meant to ship
(`models/<name>/`) in `liveperceiver/data/`: setup.py copies them at build time, so the top-level
folders stay the one source of truth. An editable install or a plain checkout has no such copies
and reads the top-level folders. Nothing here imports torch, so `presets` stays instant.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path

PACKAGE = "liveperceiver"
DATA = "data"  # liveperceiver/data/{presets,models} in a wheel; setup.py writes it
DEFAULT_MODEL = "liveperceiver-piano"  # liveperceiver-chorale ships too (the chorale preset names it)
RANDOM_MAX_LATENTS = {"seed": 2048, "small": 2048}  # checkpoint.RANDOM_CONFIGS, without importing torch
DEFAULT_MAX_LATENTS = 2048  # PerceiverARConfig's default, for a config.json that leaves it out


def shipped_dir(name: str) -> Path:
    """The installed package's copy of the top-level folder `name` (`presets`, `models`), else the
    checkout's folder itself (editable install). Only a checkout (it has pyproject.toml) counts: next
    to an installed package there may be an unrelated top-level `models` package."""
    packaged = resources.files(PACKAGE) / DATA / name
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2]  # liveperceiver/core/shipped.py -> the checkout
    if (checkout / "pyproject.toml").is_file():
        return checkout / name
    return Path(str(packaged))  # absent: named in messages such as "no presets found in ..."


def models_dirs() -> list[Path]:
    """Where model names are looked up: $LIVEPERCEIVER_MODELS, the user's data dir, the shipped models."""
    dirs = []
    if os.environ.get("LIVEPERCEIVER_MODELS"):
        dirs.append(Path(os.environ["LIVEPERCEIVER_MODELS"]))
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    dirs.append(data_home / "liveperceiver" / "models")
    dirs.append(shipped_dir("models"))
    return dirs


def installed_model_names() -> list[str]:
    """Every model name that `--model NAME` finds."""
    names = set()
    for directory in models_dirs():
        if directory.is_dir():
            names.update(p.name for p in directory.iterdir() if (p / "config.json").is_file())
    return sorted(names)


def looks_like_repo_id(spec: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None


def model_directory(spec: str) -> Path | None:
    """The local directory a model spec (a path or a name) names, or None (a repo id, random:..., unknown)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    for directory in models_dirs():
        if (directory / spec / "config.json").is_file():
            return directory / spec
    return None


class UnknownModel(LookupError):
    """A model spec that names no model: not a model directory, an installed name, random:... or a repo id."""


def unknown_model_message(spec: str) -> str:
    known = ", ".join(installed_model_names()) or "none installed"
    return f"unknown model {spec!r}: not a path, a model name ({known}) or a Hugging Face repo id"


def model_max_latents(spec: str | None) -> int | None:
    """The model's max_latents, read from its config.json without loading weights; None where only
    loading would tell (a Hugging Face repo id, an unreadable config.json: loading reports it in full).
    A spec that names no model raises UnknownModel with a one-line message."""
    spec = spec or DEFAULT_MODEL
    if spec.startswith("random:"):
        name = spec.removeprefix("random:")
        if name in RANDOM_MAX_LATENTS:
            return RANDOM_MAX_LATENTS[name]
        if not Path(name).is_file():
            raise UnknownModel(f"random:{name}: not 'seed', 'small' or an existing config.json")
        return _config_max_latents(Path(name))
    directory = model_directory(spec)
    if directory is not None:
        if not (directory / "config.json").is_file():
            raise UnknownModel(f"{directory}: no config.json, not a model directory")
        return _config_max_latents(directory / "config.json")
    if looks_like_repo_id(spec):
        return None
    raise UnknownModel(unknown_model_message(spec))


def _config_max_latents(config_path: Path) -> int | None:
    try:
        values = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    model_config = values.get("model_config", values) if isinstance(values, dict) else None
    value = model_config.get("max_latents", DEFAULT_MAX_LATENTS) if isinstance(model_config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
