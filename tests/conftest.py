"""Shared fixtures: golden reference data (copied into tests/golden) and the shared/ reference folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def tiny_model():
    from liveperceiver.checkpoint import load_directory

    return load_directory(MODEL_GOLDEN / "tiny-a")


@pytest.fixture(scope="session")
def tiny_expected():
    return load_json(MODEL_GOLDEN / "tiny-a" / "expected.json")
