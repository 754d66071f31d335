"""A user's mistake costs one line and no file: an output named like an input, under a file, or for
two outputs is refused before any work; numbers that are not numbers (inf, NaN, a thread count no
machine has) are refused by name; a broken model folder, a journal with impossible values, JSON
nested past reason, and a MIDI file hours long are said in one line. Found by a review that fed
every command bad input; each case here printed a traceback, wrote over a file, or filled the disk."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import mido
import pytest
from conftest import MODEL_GOLDEN, TOKENIZER_GOLDEN

import liveperceiver
from liveperceiver.cli import main
from liveperceiver.core.errors import atomic_output

PROMPT = TOKENIZER_GOLDEN / "v_basic.mid"
HEADER = "LPJ1 2026-01-01T12:00:00+00:00\n"


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A prompt MIDI file, a token file and a session journal of the user's, in tmp_path, the
    working folder (the commands run in this process: `main`, as the console script calls it)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROMPT, tmp_path / "prompt.mid")
    (tmp_path / "tokens.json").write_text(json.dumps([356 + 20, 60, 300, 188]))
    (tmp_path / "session").mkdir()
    (tmp_path / "session" / "journal.txt").write_text(HEADER + "10.000 P 903c50\n500.000 P 803c00\n")
    return tmp_path


@pytest.fixture
def user_error(capsys):
    """Run a command; the one line its mistake gets, last on stderr after what the command reported
    before it (train its dataset's summary): exit 2, and a traceback would raise here."""

    def run(*args: str) -> str:
        code = main(list(args))
        err = capsys.readouterr().err
        assert code == 2, err
        lines = err.strip().splitlines()
        assert lines[-1].startswith("liveperceiver: error: ") and err.count("liveperceiver: error: ") == 1, err
        return lines[-1]

    return run


@pytest.mark.parametrize(
    "command",
    [
        ["continue", "prompt.mid", "-o", "prompt.mid"],
        ["continue", "prompt.mid", "-o", "out.mid", "--tokens-out", "prompt.mid"],
        ["detokenize", "tokens.json", "-o", "tokens.json"],
        ["render", "prompt.mid", "-o", "prompt.mid"],
        ["recover", "session", "-o", "session/journal.txt"],
    ],
    ids=["continue", "continue-tokens-out", "detokenize", "render", "recover"],
)
def test_an_output_named_like_an_input_is_refused_and_the_input_kept(files, user_error, command):
    before = {path: path.read_bytes() for path in files.rglob("*") if path.is_file()}
    message = user_error(*command)
    assert "is the input" in message and "overwrite" in message, message
    assert {path: path.read_bytes() for path in files.rglob("*") if path.is_file()} == before


def test_a_bad_extra_output_is_refused_before_the_main_one_is_written(files, user_error):
    (files / "out.mid").write_bytes(b"the user's earlier take")
    (files / "a-file").write_text("")
    message = user_error("continue", "prompt.mid", "-o", "out.mid", "--wav", "a-file/x.wav")
    assert "a-file is a file, not a folder" in message, message
    assert (files / "out.mid").read_bytes() == b"the user's earlier take"
    message = user_error("continue", "prompt.mid", "-o", "out.mid", "--tokens-out", "out.mid")
    assert "named for two outputs" in message, message


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--temperature", "inf"], "--temperature inf is outside"),
        (["--temperature", "nan"], "--temperature nan is outside"),
        (["--temperature", "1e-300"], "--temperature 1e-300 is outside"),
        (["--seed", str(2**64)], "--seed 18446744073709551616 is outside"),
        (["--seconds", "nan"], "--seconds nan must be"),
        (["--seconds", "inf"], "--seconds inf must be"),
        (["--max-note-seconds", "inf"], "--max-note-seconds inf must be"),
        (["--max-rest-seconds", "nan"], "--max-rest-seconds nan must be"),
        (["--threads", "100000"], "threads 100000 must be 1 .."),
    ],
)
def test_numbers_that_are_not_numbers_are_refused_by_name(files, user_error, flags, named):
    message = user_error("continue", "prompt.mid", "-o", "out.mid", *flags)
    assert named in message, message
    assert not (files / "out.mid").exists()


def test_tokens_that_decode_to_no_note_are_not_written_over_a_file(files, user_error):
    (files / "out.mid").write_bytes(b"the user's earlier file")
    (files / "empty.json").write_text("[355, 355, 355]")
    message = user_error("detokenize", "empty.json", "-o", "out.mid")
    assert "decode to no note" in message, message
    assert (files / "out.mid").read_bytes() == b"the user's earlier file"
    (files / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    message = user_error("detokenize", "deep.json", "-o", "deep.mid")
    assert "not a JSON token list" in message, message


@pytest.mark.parametrize(
    "config, named",
    [
        ("5", "not a checkpoint config"),
        ('{"model_config": null}', "invalid model config (not a JSON object)"),
        (None, "num_heads (0)"),
        (b"\xff\xfe not utf-8", "cannot read checkpoint config"),
    ],
    ids=["a-number", "null", "no-heads", "not-utf-8"],
)
def test_a_broken_model_folder_is_one_line(files, user_error, config, named):
    model = files / "model"
    shutil.copytree(MODEL_GOLDEN / "tiny-a", model)
    if config is None:
        values = json.loads((model / "config.json").read_text())
        values["model_config"]["num_heads"] = 0
        config = json.dumps(values)
    (model / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    message = user_error("continue", "prompt.mid", "-o", "out.mid", "--model", "model")
    assert named in message, message


def test_a_journal_with_impossible_values_is_recovered_without_them(files, capsys):
    journal = files / "session" / "journal.txt"
    bad = ["1000.000 T 0", "1000.000 T nan", "nan P 903e50", "inf P 903e50", "1e300 P 903e50", "1100.000 T 2"]
    journal.write_text(HEADER + "10.000 P 903c50\n" + "\n".join(bad) + "\n500.000 P 803c00\n")
    assert main(["recover", "session", "-o", "take.mid"]) == 0
    assert "6 lines are not journal events" in capsys.readouterr().err
    midi = mido.MidiFile(files / "take.mid")  # a file the project's own reader opens
    assert [m.note for m in midi.tracks[1] if m.type == "note_on"] == [60]


def test_a_midi_file_hours_long_is_not_rendered(files, user_error):
    midi = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    track.append(mido.Message("note_on", note=60, velocity=80, time=0x0FFFFFFF))  # a stray huge delta: 77 h
    track.append(mido.Message("note_off", note=60, velocity=0, time=480))
    midi.tracks.append(track)
    midi.save(files / "long.mid")
    message = user_error("render", "long.mid", "-o", "long.wav")
    assert "render takes at most 6 h" in message, message
    assert not (files / "long.wav").exists()


def test_writes_go_through_a_symbolic_link_and_into_a_named_pipe(tmp_path):
    """`-o` naming a link writes its target (the link stays); a device or pipe (`-o /dev/null`) is
    written into, never replaced by a plain file."""
    (tmp_path / "takes").mkdir()
    (tmp_path / "latest.mid").symlink_to(tmp_path / "takes" / "take-7.mid")
    with atomic_output(tmp_path / "latest.mid") as file:
        file.write(b"MThd")
    assert (tmp_path / "latest.mid").is_symlink()
    assert (tmp_path / "takes" / "take-7.mid").read_bytes() == b"MThd"

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    heard: list[bytes] = []
    reader = threading.Thread(target=lambda: heard.append(pipe.read_bytes()), daemon=True)
    reader.start()
    with atomic_output(pipe) as file:
        file.write(b"through the pipe")
    reader.join(10)
    assert heard == [b"through the pipe"]
    assert not pipe.is_file() and pipe.exists()  # still a pipe


@pytest.fixture(scope="module")
def built_dataset(tmp_path_factory):
    """A dataset built from the tokenizer's golden MIDI files (`dataset build`, in this process)."""
    from liveperceiver.training.dataset import build, find_sources

    folder = tmp_path_factory.mktemp("midis")
    for path in TOKENIZER_GOLDEN.glob("v_*.mid"):
        shutil.copy(path, folder / path.name)
    out = tmp_path_factory.mktemp("dataset")
    build(find_sources(str(folder)), out, jobs=1, progress=False)
    return out


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda index, tokens: (dict(index, pieces=[5]), tokens), "piece 1 is damaged"),
        (lambda index, tokens: (dict(index, pieces=[{}]), tokens), "piece 1 is damaged"),
        (lambda index, tokens: (dict(index, pieces=[dict(index["pieces"][0], length="14")]), tokens), "is damaged"),
        (lambda index, tokens: (index, tokens[:-1]), "not whole 16-bit tokens"),
        (lambda index, tokens: (index, tokens[:-2] + b"\xff\xff"), "token ids above 388"),
    ],
    ids=["a-number", "an-empty-entry", "a-text-length", "cut-short", "an-impossible-token"],
)
def test_a_damaged_dataset_is_one_line_for_eval_and_train(built_dataset, tmp_path, user_error, damage, named):
    damaged = tmp_path / "damaged"
    shutil.copytree(built_dataset, damaged)
    index, tokens = damage(json.loads((damaged / "index.json").read_text()), (damaged / "tokens.u16").read_bytes())
    (damaged / "index.json").write_text(json.dumps(index))
    (damaged / "tokens.u16").write_bytes(tokens)
    assert named in user_error("eval", str(damaged), "--max-tokens", "100")
    config = Path(liveperceiver.__file__).parent / "configs" / "tiny-test.toml"
    assert named in user_error("train", "--config", str(config), "--data", str(damaged), "--out", str(tmp_path / "run"))


def test_an_empty_name_to_evaluate_and_no_build_jobs_are_refused(tmp_path, user_error):
    assert "an empty name was given" in user_error("eval", "")
    assert "--jobs 0 must be at least 1" in user_error(
        "dataset", "build", "--source", str(TOKENIZER_GOLDEN), "--out", str(tmp_path / "d"), "--jobs", "0"
    )
    assert not (tmp_path / "d").exists()


def test_dataset_build_never_writes_into_a_folder_of_other_files_and_says_when_nothing_was_read(tmp_path, user_error):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("the user's own files")
    message = user_error("dataset", "build", "--source", str(TOKENIZER_GOLDEN), "--out", str(tmp_path / "project"))
    assert "not a dataset; give a new or empty folder" in message, message
    assert sorted(path.name for path in (tmp_path / "project").iterdir()) == ["notes.txt"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.mid").write_bytes(b"not a MIDI file")
    message = user_error(
        "dataset", "build", "--source", str(tmp_path / "junk"), "--out", str(tmp_path / "d"), "--quiet"
    )
    assert "none of the 1 files could be read" in message, message
