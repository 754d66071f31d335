"""Build hook: the wheel carries the shipped presets and models as package data (liveperceiver/data/).

The repository's top-level `presets/` and `models/<name>/` stay the one source of truth; they are
copied into the built package, where `liveperceiver.core.shipped` finds them with importlib.resources.
An editable install copies nothing and reads the top-level folders. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED_MODELS = ("liveperceiver-piano", "liveperceiver-chorale")  # models/<name>/ in the wheel; others stay local
MODEL_FILES = ("config.json", "model.safetensors", "MODEL_CARD.md")


def shipped_files() -> dict[str, Path]:
    """{path inside the package: source file} for every shipped preset and model file."""
    files = {f"data/presets/{path.name}": path for path in sorted((ROOT / "presets").glob("*.toml"))}
    for name in SHIPPED_MODELS:
        for file_name in MODEL_FILES:
            source = ROOT / "models" / name / file_name
            if not source.is_file():
                raise FileNotFoundError(f"{source}: a shipped model file is missing (is git-lfs content checked out?)")
            files[f"data/models/{name}/{file_name}"] = source
    if not any(key.startswith("data/presets/") for key in files):
        raise FileNotFoundError(f"{ROOT / 'presets'}: no presets to ship")
    return files


class BuildWithShippedData(build_py):
    """build_py that also copies the shipped presets and models into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the editable package reads the top-level folders themselves
            return
        data = Path(self.build_lib) / "liveperceiver" / "data"
        shutil.rmtree(data, ignore_errors=True)  # an earlier build's build/ may hold a preset since removed
        for target, source in shipped_files().items():
            destination = Path(self.build_lib) / "liveperceiver" / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [str(Path(self.build_lib) / "liveperceiver" / target) for target in shipped_files()]


setup(cmdclass={"build_py": BuildWithShippedData})
