"""The rule for tests that need a program (conftest.missing): a skip that says why on a developer's
machine, a failure in CI. Checked on a real pytest run whose PATH lacks the programs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import in_ci

REPO = Path(__file__).resolve().parents[1]

NEEDS_PROGRAMS = """
from tests.jack_fixture import jack_server  # noqa: F401


def test_needs_jack(jack_server):
    pass


def test_needs_fluidsynth(fluidsynth):
    pass
"""


def run_without_programs(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    """pytest on two tests that need jackd and fluidsynth, with an empty PATH and CI as given."""
    test_file = tmp_path / "test_needs_programs.py"
    test_file.write_text(NEEDS_PROGRAMS)
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PATH"] = str(empty)
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    command += ["--rootdir", str(tmp_path), str(test_file)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_missing_programs_fail_the_run_in_ci(tmp_path):
    result = run_without_programs(tmp_path, ci="true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 errors" in result.stdout, result.stdout
    assert "the jackd command is not installed" in result.stdout and "CI=true" in result.stdout
    assert "the fluidsynth command is not installed" in result.stdout


def test_missing_programs_skip_with_the_reason_elsewhere(tmp_path):
    result = run_without_programs(tmp_path, ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 skipped" in result.stdout, result.stdout
    assert "the jackd command is not installed (Debian/Ubuntu: apt install jackd2)" in result.stdout
    assert "the fluidsynth command is not installed" in result.stdout


@pytest.mark.parametrize(("value", "ci"), [("true", True), ("1", True), ("TRUE", True), ("false", False), ("0", False)])
def test_what_counts_as_ci(monkeypatch, value, ci):
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci
    monkeypatch.delenv("CI")
    assert in_ci() is False
