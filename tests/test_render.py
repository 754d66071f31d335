"""Rendering MIDI to WAV with FluidSynth: right length, not silent, atomic, one-line errors."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pretty_midi
import pytest

from liveperceiver.core.errors import UserError
from liveperceiver.tools.render import find_soundfont, render_midi

pytestmark = pytest.mark.usefixtures("fluidsynth")  # conftest: skips without it, fails in CI

LAST_NOTE_END = 2.0


needs_soundfont = pytest.mark.usefixtures("soundfont")  # conftest: skips without one, fails in CI


@pytest.fixture
def midi_file(tmp_path) -> Path:
    """A C major arpeggio on a piano, four half-second notes ending at 2.0 s."""
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for index, pitch in enumerate([60, 64, 67, 72]):
        piano.notes.append(pretty_midi.Note(velocity=100, pitch=pitch, start=index * 0.5, end=index * 0.5 + 0.5))
    midi.instruments.append(piano)
    path = tmp_path / "arpeggio.mid"
    midi.write(str(path))
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as reader:
        assert reader.getsampwidth() == 2
        frames = reader.readframes(reader.getnframes())
        return np.frombuffer(frames, dtype="<i2").reshape(-1, reader.getnchannels()).astype(
            np.float64
        ), reader.getframerate()


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


@needs_soundfont
@pytest.mark.parametrize("sample_rate", [44100, 22050])
def test_render_has_the_music_length_and_is_not_silent(midi_file, tmp_path, sample_rate):
    wav = render_midi(midi_file, tmp_path / "out" / "arpeggio.wav", sample_rate=sample_rate)
    samples, rate = read_wav(wav)
    assert rate == sample_rate
    seconds = len(samples) / rate
    assert LAST_NOTE_END <= seconds <= LAST_NOTE_END + 2.0, f"{seconds:.2f} s for music ending at {LAST_NOTE_END} s"
    rms = np.sqrt(np.mean(samples[: int(LAST_NOTE_END * rate)] ** 2)) / 32768
    assert rms > 1e-3, f"RMS {rms:.2e}: the render is silent"
    assert leftovers(wav.parent) == [], "no temporary files are left behind"


@needs_soundfont
def test_render_reads_gzipped_midi(midi_file, tmp_path):
    gz = tmp_path / "arpeggio.mid.gz"
    gz.write_bytes(gzip.compress(midi_file.read_bytes()))
    samples, _ = read_wav(render_midi(gz, tmp_path / "gz.wav"))
    assert np.abs(samples).max() > 1000


def test_missing_soundfont_is_one_line_and_leaves_no_file(midi_file, tmp_path):
    out = tmp_path / "out.wav"
    with pytest.raises(UserError) as caught:
        render_midi(midi_file, out, soundfont=tmp_path / "missing.sf2")
    message = str(caught.value)
    assert "\n" not in message and "missing.sf2" in message and "apt install" in message and "brew" in message
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_file_that_is_not_a_soundfont_is_refused(midi_file, tmp_path):
    # FluidSynth itself would quietly fall back to its default soundfont.
    fake = tmp_path / "fake.sf2"
    fake.write_bytes(b"not a soundfont at all")
    with pytest.raises(UserError, match="not a SoundFont"):
        render_midi(midi_file, tmp_path / "out.wav", soundfont=fake)


def test_a_soundfont_fluidsynth_cannot_load_is_refused(midi_file, tmp_path):
    # A SoundFont's header and nothing else passes the header check; FluidSynth then renders with
    # its default one and exits 0.
    fake = tmp_path / "header-only.sf2"
    fake.write_bytes(b"RIFF\x04\x00\x00\x00sfbk")
    with pytest.raises(UserError, match="FluidSynth cannot load this SoundFont"):
        render_midi(midi_file, tmp_path / "out.wav", soundfont=fake)
    assert not (tmp_path / "out.wav").exists() and leftovers(tmp_path) == []


def test_soundfont_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVEPERCEIVER_SOUNDFONT", str(tmp_path / "nope.sf2"))
    with pytest.raises(UserError, match="LIVEPERCEIVER_SOUNDFONT"):
        find_soundfont()


def test_missing_fluidsynth_says_how_to_install(midi_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError) as caught:
        render_midi(midi_file, tmp_path / "out.wav")
    message = str(caught.value)
    assert "fluidsynth not found" in message and "apt install fluidsynth" in message and "Windows" in message
    assert "\n" not in message


def test_corrupt_midi_is_the_tokenizers_one_line_error(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd\x00\x00\x00\x06garbage")
    out = tmp_path / "out.wav"
    with pytest.raises(UserError, match="bad.mid: corrupt MIDI file"):
        render_midi(bad, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_missing_soundfont_exit_2_one_line(midi_file, tmp_path):
    out = tmp_path / "out.wav"
    result = subprocess.run(
        [sys.executable, "-m", "liveperceiver", "render", str(midi_file), "-o", str(out), "--soundfont", "nope.sf2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


@needs_soundfont
def test_cli_renders(midi_file, tmp_path):
    out = tmp_path / "cli.wav"
    result = subprocess.run(
        [sys.executable, "-m", "liveperceiver", "render", str(midi_file), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 44 * 1000


def renders_into(folder: Path) -> list[int]:
    """Process ids of the FluidSynth renders writing into `folder` (their command line names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not a process
            continue
        if (
            entry.name.isdigit()
            and command
            and command[0].endswith(b"fluidsynth")
            and str(folder).encode() in b" ".join(command)
        ):
            found.append(int(entry.name))
    return found


@needs_soundfont
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_render_takes_its_fluidsynth_with_it(tmp_path):
    """A render whose process is killed must not leave FluidSynth writing on (seen: a test's timeout
    killed the Python process, and its FluidSynth wrote 38 GB in 12 minutes)."""
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    piano.notes.append(pretty_midi.Note(velocity=100, pitch=60, start=0.0, end=1.0))
    piano.notes.append(pretty_midi.Note(velocity=100, pitch=64, start=5 * 3600.0, end=5 * 3600.0 + 1))  # 5 hours
    midi.instruments.append(piano)
    midi.write(str(tmp_path / "long.mid"))
    script = "import sys; from liveperceiver.tools.render import render_midi; render_midi(sys.argv[1], sys.argv[2])"
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "long.mid"), str(tmp_path / "long.wav")])
    try:
        deadline = time.monotonic() + 60
        while not renders_into(tmp_path) and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.05)
        assert renders_into(tmp_path), "FluidSynth never started"
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while renders_into(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert renders_into(tmp_path) == []
    finally:
        for pid in renders_into(tmp_path):  # never leave one writing, whatever failed above
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
