"""Shared fixtures: golden reference data (copied into tests/golden) and the shared/ reference folder,
and the one rule for tests that need a program this machine may lack (`missing`)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from liveperceiver.inference.sampling import Constraints

# One torch thread, as the engine uses live: OpenMP spin-waits across 2 threads on a loaded
# 2-core machine make small-matrix work an order of magnitude slower.
torch.set_num_threads(1)

GOLDEN = Path(__file__).parent / "golden"
TOKENIZER_GOLDEN = GOLDEN / "tokenizer"
MODEL_GOLDEN = GOLDEN / "model"
# Third-party files (v_real_*) stay in ../shared/reference, present on the project's machines and CI.
SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def golden_midi_files() -> list[Path]:
    files = sorted(TOKENIZER_GOLDEN.glob("v_*.mid"))
    shared = SHARED_REFERENCE / "tokenizer"
    if shared.is_dir():
        files += sorted(shared.glob("v_real_*.mid"))
    return files


def load_json(path: Path):
    return json.loads(path.read_text())


# Every constraint and follow at once (the overdue rule, which masks all else, has its own state)
EVERYTHING = Constraints(
    no_orphan_note_off=True,
    pitch_range=(36, 96),
    max_polyphony=6,
    min_onset_gap_ms=20,
    max_note_ms=8000,
    key_follow=1.0,
    dynamics_follow=4.0,
    density_follow=1.0,
    density_ratio=0.5,
)

# The device the engine's tests run on: the CPU unless LIVEPERCEIVER_TEST_DEVICE names another
# (.ci/gpu-check runs them with cuda). Tests pin their device; none lets the engine pick one.
TEST_DEVICE = os.environ.get("LIVEPERCEIVER_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def engine_device() -> torch.device:
    device = torch.device(TEST_DEVICE)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"LIVEPERCEIVER_TEST_DEVICE={TEST_DEVICE}, but torch sees no CUDA device", pytrace=False)
    return device


@pytest.fixture(scope="session")
def tiny_model():
    from liveperceiver.core.checkpoint import load_directory

    return load_directory(MODEL_GOLDEN / "tiny-a")


@pytest.fixture(scope="session")
def tiny_expected():
    return load_json(MODEL_GOLDEN / "tiny-a" / "expected.json")


# ------------------------------------------------------------------ programs a test needs

FALSE_VALUES = ("", "0", "false", "no", "off")


def in_ci() -> bool:
    """CI sets CI=true (GitHub Actions and most CI services do)."""
    return os.environ.get("CI", "").strip().lower() not in FALSE_VALUES


def missing(what: str) -> NoReturn:
    """This test cannot run here because `what` is missing: skip it on a developer's machine (the
    reason says what to install), fail it in CI, where a runner that lost a program must not pass by
    skipping every test that needs it."""
    if in_ci():
        pytest.fail(f"{what}, and CI (CI={os.environ['CI']}) must run this test", pytrace=False)
    pytest.skip(what)


def require_command(command: str, install: str) -> str:
    """The path of `command` on PATH; else `missing` (skip here, fail in CI), saying how to `install` it."""
    path = shutil.which(command)
    if path is None:
        missing(f"the {command} command is not installed ({install})")
    return path


@pytest.fixture(scope="session")
def fluidsynth() -> str:
    return require_command("fluidsynth", "Debian/Ubuntu: apt install fluidsynth fluid-soundfont-gm")


@pytest.fixture(scope="session")
def soundfont() -> Path:
    from liveperceiver.core.errors import UserError
    from liveperceiver.tools.render import find_soundfont

    try:
        return find_soundfont()
    except UserError:
        missing("no General MIDI soundfont (Debian/Ubuntu: apt install fluid-soundfont-gm)")


@pytest.fixture(autouse=True)
def no_jack_ports_left_to_the_exit():
    """A live session closed the default way leaves its JACK ports to the process's exit (for the
    `play` command); a test process goes on, and ports left open by one test crashed a later one
    inside libjack. So a test must close with `release_ports=True` or free what it left."""
    yield
    ports = sys.modules.get("liveperceiver.live.ports")
    if ports is None:  # never imported: no port was opened (and a machine without libasound can run the rest)
        return
    left = list(ports.LEFT_TO_EXIT)
    if left:
        ports.LEFT_TO_EXIT.clear()
        for port in left:
            ports.release(port)
        pytest.fail(f"the test left {len(left)} JACK port(s) to the process's exit (Session.close(release_ports=True))")


@pytest.fixture(scope="session")
def chorale_tokens() -> list[int]:
    """A real piece: Bach's BWV 1.6 from the music21 corpus, as the dataset exports it (its opening
    phrases come back, as chorales' do)."""
    import pretty_midi

    from liveperceiver.core.tokenizer import encode_midi
    from liveperceiver.training.dataset import _score_to_midis, music21_corpus_dir

    [(_, data)] = _score_to_midis(music21_corpus_dir() / "bach" / "bwv1.6.mxl")
    return encode_midi(pretty_midi.PrettyMIDI(io.BytesIO(data)))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`liveperceiver ARGS` as a user runs it, in `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "liveperceiver", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one line a user's mistake gets (exit 2, no traceback)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]
