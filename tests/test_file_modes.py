"""Files a user saves get the permissions a plain open() gives them (0666 & ~umask), not a private 0600:
a DAW or file manager running as another user must be able to open a session, continuation, WAV or model."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import MODEL_GOLDEN, TOKENIZER_GOLDEN

from liveperceiver.cli import main
from liveperceiver.core.checkpoint import load_directory, save_directory
from liveperceiver.core.errors import UserError, atomic_output, atomic_path
from liveperceiver.live.recorder import Recorder, recover
from liveperceiver.tools.render import find_soundfont, render_midi


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request) -> int:
    """Run the test under a known umask; returns the mode open() gives new files under it."""
    previous = os.umask(request.param)
    yield 0o666 & ~request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_output_and_atomic_path_give_open_s_mode(tmp_path, umask):
    with open(tmp_path / "plain", "w") as file:
        file.write("x")
    assert mode(tmp_path / "plain") == umask, "the reference: what open() gives"
    with atomic_output(tmp_path / "a.bin") as file:
        file.write(b"x")
    with atomic_path(tmp_path / "b.bin") as temporary:  # a writer that replaces the file with a private one
        (temporary.parent / "private").write_bytes(b"y")
        os.chmod(temporary.parent / "private", 0o600)
        os.replace(temporary.parent / "private", temporary)
    assert (mode(tmp_path / "a.bin"), mode(tmp_path / "b.bin")) == (umask, umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "plain"], "no temporary files left"


def test_continuation_and_its_tokens(tmp_path, umask):
    out, tokens = tmp_path / "out" / "answer.mid", tmp_path / "out" / "tokens.json"
    args = ["continue", str(TOKENIZER_GOLDEN / "v_chords.mid"), "-o", str(out), "--model", str(MODEL_GOLDEN / "tiny-a")]
    assert main([*args, "--max-new-tokens", "16", "--seed", "1", "--tokens-out", str(tokens)]) == 0
    assert (mode(out), mode(tokens)) == (umask, umask)


def test_session_midi_journal_and_recovered_file(tmp_path, umask):
    recorder = Recorder(tmp_path / "session", origin=0.0)
    recorder.record("P", 0.010, [0x90, 60, 90])
    recorder.record("P", 0.510, [0x80, 60, 0])
    recorder.record("M", 1.000, [0x90, 64, 80])
    saved = recorder.save()
    recorder.close()
    recovered = recover(tmp_path / "session", tmp_path / "recovered.mid")
    assert recovered == {"Player": 1, "LivePerceiver": 1}
    assert mode(saved) == mode(tmp_path / "session" / "journal.txt") == mode(tmp_path / "recovered.mid") == umask


def test_exported_model(tmp_path, umask):
    save_directory(load_directory(MODEL_GOLDEN / "tiny-a"), tmp_path / "my-model")
    assert {path.name: mode(path) for path in (tmp_path / "my-model").iterdir()} == {
        "model.safetensors": umask,
        "config.json": umask,
    }
    load_directory(tmp_path / "my-model")  # and it is still a model


def test_rendered_wav(tmp_path, umask):
    problem = "" if shutil.which("fluidsynth") else "the fluidsynth command is not installed"
    try:
        find_soundfont()
    except UserError as error:
        problem = problem or str(error)
    if problem:  # a developer's machine may lack it; CI must not pass by skipping
        (pytest.fail if os.environ.get("CI", "").lower() in ("true", "1", "yes") else pytest.skip)(problem)
    wav = render_midi(TOKENIZER_GOLDEN / "v_chords.mid", tmp_path / "takes" / "chords.wav")
    assert mode(wav) == umask
    assert [path.name for path in wav.parent.iterdir()] == ["chords.wav"], "no temporary files left"
