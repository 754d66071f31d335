"""`pip install .` works like any Python package: the wheel carries the presets and the default model.

The test builds an sdist and a wheel from it (what `python -m build` does), installs the wheel into a
fresh virtual environment and runs the console script from an unrelated folder, as a new user would.
The venv reaches this environment's site-packages through a .pth file (torch and the other
dependencies; the wheel goes in with --no-deps), behind its own, also when the tests run in a venv
themselves; the test proves that the package it imports is the wheel's copy inside the venv, not
this checkout.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import mido
import pytest
from conftest import TOKENIZER_GOLDEN

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODELS = ("liveperceiver-piano", "liveperceiver-chorale")  # setup.py: the default first
PRESETS = sorted(path.stem for path in (REPO / "presets").glob("*.toml"))
BUILD_INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "liveperceiver", "presets"]


def run(command: list, cwd: Path, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def source_tree(destination: Path) -> Path:
    """The checkout's build inputs, plus a model folder that must NOT ship (a user's own export)."""
    destination.mkdir()
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "data"))
        else:
            shutil.copy2(source, destination / name)
    for model in SHIPPED_MODELS:
        shutil.copytree(REPO / "models" / model, destination / "models" / model)
    local = destination / "models" / "my-own-model"
    local.mkdir()
    (local / "config.json").write_text((REPO / "models" / SHIPPED_MODELS[0] / "config.json").read_text())
    return destination


def build_wheel(tree: Path, out: Path) -> Path:
    """sdist, then the wheel from the sdist. Offline when this environment's setuptools meets
    pyproject's build requirement; otherwise pip fetches it from the registry (build isolation)."""
    setuptools_major = int(importlib.metadata.version("setuptools").split(".")[0])
    isolation = ["--no-build-isolation"] if setuptools_major >= 77 else []
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    if isolation:
        sdist = out / run([sys.executable, "-c", code, out], cwd=tree).stdout.split()[-1]
    else:  # build_meta needs the required setuptools too
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, tree], cwd=tree)
        return next(out.glob("liveperceiver-*.whl"))
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    for model in SHIPPED_MODELS:
        assert any(name.endswith(f"models/{model}/model.safetensors") for name in names), f"sdist lacks {model}"
    assert any(name.endswith("presets/duet.toml") for name in names), "sdist lacks the presets"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", out, sdist], cwd=out)
    return next(out.glob("liveperceiver-*.whl"))


def test_wheel_installs_with_presets_and_default_model(tmp_path):
    tree = source_tree(tmp_path / "src")
    wheel = build_wheel(tree, tmp_path / "dist")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    data = "liveperceiver/data"
    for model in SHIPPED_MODELS:
        for file_name in ("config.json", "model.safetensors", "MODEL_CARD.md"):
            assert f"{data}/models/{model}/{file_name}" in names
    assert {f"{data}/presets/{name}.toml" for name in PRESETS} <= names
    assert not [name for name in names if "my-own-model" in name], "only the shipped model goes into the wheel"
    # every module ships, the test harness (liveperceiver/testing) too: `bench --live` drives a session with it
    modules = {path.relative_to(REPO).as_posix() for path in (REPO / "liveperceiver").rglob("*.py")}
    assert "liveperceiver/testing/jack.py" in modules and not modules - names, sorted(modules - names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    venv_site = Path(run([python, "-c", "import site; print(site.getsitepackages()[0])"], cwd=tmp_path).stdout.strip())
    # this environment's packages after the venv's own (its .pth files, e.g. the editable finder, stay unread)
    (venv_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # the machine's pip, running inside the venv: installs there, never touches this environment's copy.
    # Without PYTHONPATH: a checkout on it (its egg-info) reads to pip as this very version installed,
    # and pip then skips the wheel ("already installed with the same version").
    clean = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path, env=clean)

    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
        "LANG": "C.UTF-8",
    }
    probe = "import liveperceiver.core.shipped as s; print(s.__file__); print(s.shipped_dir('presets')); print(s.shipped_dir('models'))"
    located = run([python, "-c", probe], cwd=elsewhere, env=env).stdout.split()
    venv_root = venv.resolve()
    assert all(Path(path).resolve().is_relative_to(venv_root) for path in located), f"not the wheel's copy: {located}"

    listed = run([venv / "bin" / "liveperceiver", "presets"], cwd=elsewhere, env=env).stdout
    assert "no presets found" not in listed
    assert [line.split()[1] for line in listed.splitlines()[: len(PRESETS)]] == PRESETS

    shown = run([venv / "bin" / "liveperceiver", "presets", "show", "duet"], cwd=elsewhere, env=env).stdout
    assert 'mode = "duet"' in shown and str(venv_root) in shown.splitlines()[0]

    shutil.copy(TOKENIZER_GOLDEN / "v_chords.mid", elsewhere / "x.mid")
    command = ["continue", "x.mid", "-o", "y.mid", "--max-new-tokens", "48", "--seed", "1", "--no-include-prompt"]
    run([venv / "bin" / "liveperceiver", *command], cwd=elsewhere, env=env)
    notes = [m for m in mido.MidiFile(elsewhere / "y.mid") if m.type == "note_on" and m.velocity > 0]
    assert notes, "the default model's continuation holds no notes"
    assert not os.path.exists(home / "data" / "liveperceiver"), "nothing was installed into the user's data dir"
