"""Presets: named TOML files holding a partial `Settings`; anything they leave out keeps its default.

Shipped presets live in the repository's `presets/` folder, copied into the package when a wheel
is built (see shipped.py), or in `$LIVEPERCEIVER_PRESETS`; the user's own live in the platform config
directory (`~/.config/liveperceiver/presets` on Linux) and shadow shipped ones of the same name, so a
user can tune `duet` without copying the whole set.

The schema is `Settings` itself: a key that is not a field, a value of the wrong type or outside
`Settings.validate()`'s range is refused with one line naming the file, the key and what is allowed.
The model a preset names must exist, and its num_latents (N, "MIN:MAX" or "auto") must fit that model (or the default model
when it names none): both are read from the model's config.json, without loading weights. A preset
is loaded in full before a session starts, so a typo never surfaces mid-performance.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import platformdirs

from liveperceiver.core.errors import UserError
from liveperceiver.core.shipped import DEFAULT_MODEL, UnknownModel, model_max_latents, shipped_dir
from liveperceiver.live.settings import FIELD_TYPES, SECTIONS, Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}
assert set(SECTION_OF) == {field.name for field in fields(Settings)}, "SECTIONS must cover every Settings field"


@dataclass(frozen=True)
class PresetInfo:
    name: str
    path: Path
    description: str
    user: bool  # True: from the user's config directory (it may shadow a shipped preset)


# --------------------------------------------------------------------------- where presets live


def shipped_presets_dir() -> Path:
    """`$LIVEPERCEIVER_PRESETS`, else the installed package's presets (the checkout's `presets/` when editable)."""
    if os.environ.get("LIVEPERCEIVER_PRESETS"):
        return Path(os.environ["LIVEPERCEIVER_PRESETS"])
    return shipped_dir("presets")


def user_presets_dir() -> Path:
    """The platform config directory: honours $XDG_CONFIG_HOME on Linux."""
    return platformdirs.user_config_path("liveperceiver") / "presets"


def _toml_files(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        return {}
    return {path.stem: path for path in directory.glob("*.toml") if path.is_file()}


def list_presets() -> list[PresetInfo]:
    """All presets sorted by name (the UI maps keys 1-9 to this order); user presets win on a name clash."""
    found = {name: (path, False) for name, path in _toml_files(shipped_presets_dir()).items()}
    found.update({name: (path, True) for name, path in _toml_files(user_presets_dir()).items()})
    return [PresetInfo(name, path, _description(path), user) for name, (path, user) in sorted(found.items())]


def _description(path: Path) -> str:
    """The preset's one-line description; a broken file is listed (not fatal) so it can be fixed."""
    try:
        description = _read_toml(path).get("description", "")
    except UserError as error:
        return f"(invalid: {error})"
    return description.splitlines()[0] if isinstance(description, str) and description else ""


def find_preset(name_or_path: str | Path) -> Path:
    """A preset's file: a path (it has a separator or ends in .toml) or a preset name."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or os.sep in text:
        return Path(text)
    presets = list_presets()
    for info in presets:
        if info.name == text:
            return info.path
    known = ", ".join(info.name for info in presets) or f"none (no presets in {shipped_presets_dir()})"
    raise UserError(f"unknown preset '{text}' (known: {known})")


# --------------------------------------------------------------------------- loading and validating


def load_preset(name_or_path: str | Path, default_model: str | None = None) -> Settings:
    """The validated Settings of a preset name or TOML file; any mistake raises a one-line UserError.
    `default_model`: the model that plays when the preset names none (a `--model` flag, a live
    session's current model; None: the shipped default); num_latents is checked against it."""
    path = find_preset(name_or_path)
    values = _flatten(_read_toml(path), path)
    settings = replace(Settings(), **values)
    try:
        settings.validate()
    except ValueError as error:
        name = str(error).split(" ", 1)[0]
        origin = "" if name in values else " (the default)"
        raise UserError(
            f"{path}: {_key(name)} = {_show(getattr(settings, name))}{origin} is outside the allowed values "
            f"({_allowed_by(error, name)})"
        ) from None
    _check_model(settings, values, path, default_model)
    return settings


def _check_model(settings: Settings, values: dict, path: Path, default_model: str | None) -> None:
    """The model the preset names exists, and num_latents fits it (or the model that plays if it names none)."""
    try:
        max_latents = model_max_latents(settings.model or default_model)
    except UnknownModel as error:
        if settings.model is None:  # not the preset's mistake: whoever chose that model reports it
            return
        raise UserError(f"{path}: model = {_show(settings.model)}: {error}") from None
    if max_latents is not None and settings.latent_window(max_latents).max > max_latents:
        if settings.model:
            model = _show(settings.model)
        elif default_model:
            model = f"{_show(default_model)} (the model that plays)"
        else:
            model = f"{_show(DEFAULT_MODEL)} (the default)"
        origin = "" if "num_latents" in values else " (the default)"
        raise UserError(
            f"{path}: {_key('num_latents')} = {settings.num_latents}{origin} is more than the model {model} allows "
            f"(1 .. {max_latents}, its max_latents)"
        )


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise UserError(f"{path}: cannot read preset ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # The message ends with "(at line L, column C)".
        raise UserError(f"{path}: invalid TOML: {error}") from None


def _flatten(document: dict, path: Path) -> dict:
    """Section tables -> {field: value}, refusing unknown keys and wrong types."""
    values = {}
    for key, value in document.items():
        if key in SECTIONS and key:
            if not isinstance(value, dict):
                raise UserError(f"{path}: '{key}' must be a [{key}] section (allowed: {', '.join(SECTIONS[key])})")
            for name, item in value.items():
                if SECTION_OF.get(name) not in (key, None):
                    raise UserError(f"{path}: {key}.{name} belongs in {_where(name)}, not in [{key}]")
                if SECTION_OF.get(name) != key:
                    raise UserError(
                        f"{path}: unknown key {key}.{name}{_suggest(name)} (allowed in [{key}]: {', '.join(SECTIONS[key])})"
                    )
                values[name] = _checked(name, item, f"{path}: {key}.{name}")
        elif SECTION_OF.get(key) == "":
            values[key] = _checked(key, value, f"{path}: {key}")
        elif key in SECTION_OF:
            raise UserError(f"{path}: {key} belongs in {_where(key)}, not at the top level")
        else:
            allowed = ", ".join(list(SECTIONS[""]) + [f"[{section}]" for section in SECTIONS if section])
            raise UserError(f"{path}: unknown key {key}{_suggest(key)} (allowed at the top level: {allowed})")
    return values


def _checked(name: str, value, where: str):
    """The value as the field's type (an int is fine for a float; a bool is not an int), else UserError."""
    kinds = {kind.strip() for kind in FIELD_TYPES[name].split("|")} - {"None"}
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if "str" in kinds and isinstance(value, str):
        return value
    raise UserError(f"{where} = {_show(value)} has the wrong type: expected {_type_words(name)}")


def _type_words(name: str) -> str:
    kinds = {kind.strip() for kind in FIELD_TYPES[name].split("|")} - {"None"}
    words = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
    text = " or ".join(words[kind] for kind in sorted(kinds))
    allowed = _allowed(name)
    return f"{text} ({allowed})" if allowed else text


def _allowed(name: str) -> str:
    """The allowed values as `Settings.validate()` words them (one source of truth): ask it with a bad value."""
    kinds = FIELD_TYPES[name]
    probe = "\0" if "str" in kinds else -math.inf if "float" in kinds else -(10**9) if "int" in kinds else None
    if probe is None:
        return ""
    try:
        replace(Settings(), **{name: probe}).validate()
    except ValueError as error:
        message = str(error)
        if message.startswith(f"{name} ") and message.endswith(")"):
            return message[message.index("(") + 1 : -1]
    return ""


def _allowed_by(error: ValueError, name: str) -> str:
    """The allowed values `Settings.validate()` named when it refused `name` (a field checked twice,
    as transpose is, words each check its own way); `_allowed` when the message is not its own."""
    message, marker = str(error), " is outside the allowed values ("
    if message.startswith(f"{name} ") and marker in message and message.endswith(")"):
        return message[message.rindex(marker) + len(marker) : -1]
    return _allowed(name)


def _key(name: str) -> str:
    section = SECTION_OF[name]
    return f"{section}.{name}" if section else name


def _where(name: str) -> str:
    section = SECTION_OF[name]
    return f"the [{section}] section" if section else "the top level"


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(SECTION_OF) + [s for s in SECTIONS if s], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return _toml_value(value) if isinstance(value, str) else repr(value)


# --------------------------------------------------------------------------- command-line overrides


def apply_overrides(settings: Settings, **flags) -> Settings:
    """`settings` with the CLI flags that were given (None: keep the preset's value), validated."""
    unknown = set(flags) - set(FIELD_TYPES)
    if unknown:
        raise TypeError(f"apply_overrides: not Settings fields: {', '.join(sorted(unknown))}")
    changes = {}
    for name, value in flags.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        changes[name] = _checked(name, value, flag)
    try:
        return settings.updated(**changes)
    except ValueError as error:
        name = str(error).split(" ", 1)[0]
        where = "--" + name.replace("_", "-") if name in changes else f"{_key(name)} (from the preset)"
        raise UserError(
            f"{where} = {_show(getattr(replace(settings, **changes), name))} is outside the allowed values "
            f"({_allowed_by(error, name)})"
        ) from None


# --------------------------------------------------------------------------- writing


def preset_to_toml(settings: Settings) -> str:
    """Every field of `settings` as a preset file (load_preset reads it back to equal settings)."""
    lines = []
    for section, names in SECTIONS.items():
        if section:
            lines += ["", f"[{section}]"]
        for name in names:
            value = getattr(settings, name)
            if value is None:
                lines.append(f"# {name} is unset ({'the default model' if name == 'model' else 'random'})")
            else:
                lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = []
    for char in str(value):
        if char in '"\\':
            escaped.append("\\" + char)
        elif char == "\n":
            escaped.append("\\n")
        elif char == "\t":
            escaped.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


# --------------------------------------------------------------------------- command line


def run_presets_list(args) -> None:
    presets = list_presets()
    width = max((len(info.name) for info in presets), default=0)
    for number, info in enumerate(presets, start=1):
        key = str(number) if number <= 9 else " "
        origin = f"  [user: {info.path}]" if info.user else ""
        print(f"{key}  {info.name:<{width}}  {info.description}{origin}")
    if not presets:
        print(f"no presets found in {shipped_presets_dir()}")
    print(f"(your own presets go in {user_presets_dir()}; they override shipped ones of the same name)")


def run_presets_show(args) -> None:
    settings = load_preset(args.preset)
    print(f"# preset {args.preset}: {find_preset(args.preset)}")
    print(preset_to_toml(settings), end="")
