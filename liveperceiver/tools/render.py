"""Render MIDI to a WAV file with FluidSynth and a General MIDI soundfont, to listen without a DAW.

The `fluidsynth` command line does the work (no Python binding to build). Three things it does
not do well are handled here: it silently falls back to another soundfont when the given file is
not one (so the file is checked first), it does not read .mid.gz, and it pads every render with
about two seconds of digital silence (trimmed, so the WAV is as long as the music plus its release).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Callable
from functools import partial
from pathlib import Path

from liveperceiver.core.errors import UserError, atomic_path, check_outputs

SOUNDFONT_CANDIDATES = [
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",  # Debian/Ubuntu: fluid-soundfont-gm
    "/usr/share/soundfonts/default.sf2",  # FluidSynth's own default path (Arch, Fedora)
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/*.sf2",
    "/usr/share/soundfonts/*.sf2",
    "/opt/homebrew/share/soundfonts/*.sf2",  # macOS Homebrew (Apple silicon)
    "/usr/local/share/soundfonts/*.sf2",  # macOS Homebrew (Intel), hand installs
    "~/Library/Audio/Sounds/Banks/*.sf2",  # macOS's own sound bank folder
    "C:/soundfonts/default.sf2",  # FluidSynth's default path on Windows
]

INSTALL_HINT = (
    "install FluidSynth and a General MIDI soundfont: Debian/Ubuntu `sudo apt install fluidsynth fluid-soundfont-gm`; "
    "macOS `brew install fluid-synth` plus a GM .sf2 (e.g. FluidR3_GM.sf2) in /opt/homebrew/share/soundfonts; "
    "Windows: the FluidSynth release zip from github.com/FluidSynth/fluidsynth/releases on PATH plus a GM .sf2; "
    "or pass --soundfont FILE / set LIVEPERCEIVER_SOUNDFONT"
)

SILENCE_LEVEL = 4  # 16-bit sample values at or below this are FluidSynth's dither, not sound (about -78 dBFS)
TAIL_SECONDS = 0.5  # kept after the last audible sample so a release is never cut mid-fade


MAX_RENDER_SECONDS = 6 * 3600  # 16-bit stereo at 44.1 kHz: about 3.8 GB of WAV


def _dies_with_parent() -> Callable[[], object] | None:
    """For the FluidSynth child to run before it starts: on Linux, ask for SIGKILL when its parent
    dies, so that a render whose process is killed (SIGKILL, a test's timeout) does not go on
    writing a WAV nobody will read (seen: 38 GB in 12 minutes). Looked up here, in the parent: the
    child only calls it (nothing to import between fork and exec). Elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl, set_parent_death_signal = ctypes.CDLL(None, use_errno=True).prctl, 1  # PR_SET_PDEATHSIG, linux/prctl.h
    return partial(prctl, set_parent_death_signal, int(signal.SIGKILL))


def find_fluidsynth() -> str:
    path = shutil.which("fluidsynth")
    if path is None:
        raise UserError(f"fluidsynth not found on PATH; {INSTALL_HINT}")
    return path


def find_soundfont(soundfont: str | Path | None = None) -> Path:
    """The given soundfont, else $LIVEPERCEIVER_SOUNDFONT, else the first GM soundfont in the usual places."""
    if soundfont is not None:
        return _checked_soundfont(Path(soundfont).expanduser(), "")
    if os.environ.get("LIVEPERCEIVER_SOUNDFONT"):
        return _checked_soundfont(
            Path(os.environ["LIVEPERCEIVER_SOUNDFONT"]).expanduser(), " (from LIVEPERCEIVER_SOUNDFONT)"
        )
    for pattern in SOUNDFONT_CANDIDATES:
        pattern = os.path.expanduser(pattern)
        if "*" in pattern:
            directory = Path(pattern).parent
            matches = sorted(directory.glob(Path(pattern).name)) if directory.is_dir() else []
        else:
            matches = [Path(pattern)] if Path(pattern).is_file() else []
        if matches:
            return matches[0]
    raise UserError(f"no General MIDI soundfont found; {INSTALL_HINT}")


def _checked_soundfont(path: Path, origin: str) -> Path:
    """A readable SoundFont (RIFF sfbk) or DLS file; FluidSynth would otherwise quietly use another one."""
    try:
        with path.open("rb") as file:
            header = file.read(12)
    except OSError as error:
        raise UserError(f"{path}{origin}: cannot read soundfont ({error.strerror or error}); {INSTALL_HINT}") from None
    if header[:4] != b"RIFF" or header[8:12] not in (b"sfbk", b"DLS "):
        raise UserError(f"{path}{origin}: not a SoundFont (.sf2/.sf3) file")
    return path


def render_midi(
    midi_path: str | Path, wav_path: str | Path, soundfont: str | Path | None = None, sample_rate: int = 44100
) -> Path:
    """Render `midi_path` to a 16-bit stereo WAV at `wav_path`, atomically; mistakes raise one-line UserErrors.

    A MIDI file without notes (a session where nobody played) is refused rather than rendered: a
    silent WAV dropped into a DAW looks like a broken audio chain, and nothing is lost by not writing it."""
    from liveperceiver.core.tokenizer import read_midi

    midi_path, wav_path = Path(midi_path), Path(wav_path)
    if not 8000 <= sample_rate <= 96000:
        raise UserError(f"--sample-rate {sample_rate} is outside FluidSynth's range (8000 .. 96000)")
    check_outputs([wav_path], [midi_path])
    midi = read_midi(midi_path)  # a corrupt file fails here, with the tokenizer's one-line message
    if not any(instrument.notes for instrument in midi.instruments):
        raise UserError(f"{midi_path}: no notes to render (a silent WAV would be all it held); nothing written")
    if midi.get_end_time() > MAX_RENDER_SECONDS:  # a stray huge delta time: FluidSynth would fill the disk
        hours = midi.get_end_time() / 3600
        raise UserError(
            f"{midi_path}: lasts {hours:.1f} h; render takes at most {MAX_RENDER_SECONDS // 3600} h; nothing written"
        )
    fluidsynth = find_fluidsynth()
    font = find_soundfont(soundfont)
    try:
        with atomic_path(wav_path) as temporary, tempfile.TemporaryDirectory(prefix="liveperceiver-render-") as scratch:
            source = midi_path
            if midi_path.suffix == ".gz":  # FluidSynth reads plain MIDI files only
                source = Path(scratch) / midi_path.name.removesuffix(".gz")
                source.write_bytes(gzip.decompress(midi_path.read_bytes()))
            command = [fluidsynth, "-n", "-i", "-T", "wav", "-O", "s16", "-r", str(sample_rate)]
            command += ["-F", str(temporary), str(font), str(source)]
            result = subprocess.run(
                command, stdin=subprocess.DEVNULL, capture_output=True, text=True, preexec_fn=_dies_with_parent()
            )
            if "Failed to load SoundFont" in result.stderr + result.stdout:  # it renders on with its default one
                raise UserError(f"{font}: FluidSynth cannot load this SoundFont (damaged?); nothing written")
            if result.returncode != 0 or os.path.getsize(temporary) <= 44:
                lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
                detail = lines[-1] if lines else f"exit status {result.returncode}"
                raise UserError(f"{midi_path}: fluidsynth could not render it ({detail})")
            _trim_silence(temporary, keep_until=midi.get_end_time())
    except OSError as error:
        raise UserError(f"{wav_path}: cannot write WAV file ({error.strerror or error})") from None
    return wav_path


def _trim_silence(path: Path, keep_until: float) -> None:
    """Cut FluidSynth's trailing silence, keeping TAIL_SECONDS after the last audible sample (never before `keep_until`)."""
    import numpy as np

    with wave.open(str(path), "rb") as reader:
        params = reader.getparams()
        frames = reader.readframes(params.nframes)
    if params.sampwidth != 2:
        return
    samples = np.frombuffer(frames, dtype="<i2").reshape(-1, params.nchannels)
    audible = np.flatnonzero(np.abs(samples.astype(np.int32)).max(axis=1) > SILENCE_LEVEL)
    last = (audible[-1] + 1) if audible.size else 0
    keep = max(last + round(TAIL_SECONDS * params.framerate), round(keep_until * params.framerate))
    if keep >= len(samples):
        return
    with wave.open(str(path), "wb") as writer:
        writer.setparams(params)
        writer.writeframes(samples[:keep].tobytes())


def wav_seconds(path: str | Path) -> float:
    with wave.open(str(path), "rb") as reader:
        return reader.getnframes() / reader.getframerate()


# --------------------------------------------------------------------------- command line


def run_render(args) -> None:
    path = render_midi(args.midi, args.output, soundfont=args.soundfont, sample_rate=args.sample_rate)
    print(f"{path}: {wav_seconds(path):.1f} s at {args.sample_rate} Hz", file=sys.stderr)
