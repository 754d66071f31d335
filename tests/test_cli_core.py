"""tokenize / detokenize / continue from the command line, and their one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest
from conftest import MODEL_GOLDEN, TOKENIZER_GOLDEN, load_json

from liveperceiver.core.tokenizer import decode_notes, encode_file, read_midi

TINY = str(MODEL_GOLDEN / "tiny-a")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liveperceiver", *args], capture_output=True, text=True, timeout=120)


def test_tokenize_prints_the_reference_tokens():
    result = run("tokenize", str(TOKENIZER_GOLDEN / "v_improv_pedal.mid"))
    assert result.returncode == 0
    assert json.loads(result.stdout) == load_json(TOKENIZER_GOLDEN / "v_improv_pedal.json")["tokens"]


def test_detokenize_writes_the_decoded_notes(tmp_path):
    tokens = load_json(TOKENIZER_GOLDEN / "v_chords.json")["tokens"]
    (tmp_path / "t.json").write_text(json.dumps(tokens))
    assert run("detokenize", str(tmp_path / "t.json"), "-o", str(tmp_path / "out.mid")).returncode == 0
    assert encode_file(tmp_path / "out.mid") == tokens


def test_continue_is_seeded_and_writes_tokens_and_midi(tmp_path):
    prompt = str(TOKENIZER_GOLDEN / "v_chords.mid")
    outputs = []
    for name in ("a", "b"):
        args = ["continue", prompt, "-o", str(tmp_path / f"{name}.mid"), "--model", TINY, "--seed", "3"]
        args += ["--max-new-tokens", "60", "--tokens-out", str(tmp_path / f"{name}.json"), "--temperature", "1.1"]
        assert run(*args).returncode == 0
        outputs.append(load_json(tmp_path / f"{name}.json"))
    assert len(outputs[0]) == 60 and outputs[0] == outputs[1]
    prompt_notes = len(decode_notes(encode_file(prompt)))
    assert len(read_midi(tmp_path / "a.mid").instruments[0].notes) >= prompt_notes


def test_continue_seconds_and_no_prompt(tmp_path):
    out = tmp_path / "c.mid"
    args = ["continue", str(TOKENIZER_GOLDEN / "v_basic.json"), "-o", str(out), "--model", TINY, "--seed", "1"]
    result = run(*args, "--seconds", "3", "--no-include-prompt", "--tokens-out", str(tmp_path / "t.json"))
    assert result.returncode == 0, result.stderr
    generated = load_json(tmp_path / "t.json")
    seconds = sum(t - 255 for t in generated if 256 <= t < 356) / 100
    last_shift = next(t - 255 for t in reversed(generated) if 256 <= t < 356) / 100
    assert 3.0 <= seconds < 3.0 + last_shift + 1e-9
    midi = read_midi(out) if read_midi(out).instruments[0].notes else None
    if midi is not None:
        assert min(n.start for n in midi.instruments[0].notes) >= 0.0


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: (d / "x.mid").write_bytes(b"garbage"), ["continue", "{d}/x.mid"], "not a MIDI file"),
        (lambda d: (d / "t.json").write_text("[1, 2, 999]"), ["continue", "{d}/t.json"], "999, outside 0..388"),
        (lambda d: (d / "t.json").write_text("{oops"), ["continue", "{d}/t.json"], "not a JSON token list"),
        (lambda d: None, ["continue", "{d}/missing.mid"], "cannot read MIDI file"),
        (
            lambda d: None,
            ["continue", str(TOKENIZER_GOLDEN / "v_basic.mid"), "--model", "no-such-model"],
            "unknown model",
        ),
        (lambda d: None, ["continue", str(TOKENIZER_GOLDEN / "v_basic.mid"), "--model", "{d}"], "no config.json"),
        (
            lambda d: None,
            ["continue", str(TOKENIZER_GOLDEN / "v_basic.mid"), "--model", TINY, "--top-p", "2"],
            "--top-p",
        ),
        (lambda d: (d / "t.json").write_text("[1, 2, 999]"), ["detokenize", "{d}/t.json"], "999"),
    ],
)
def test_bad_input_gives_one_line_exit_2_and_no_output(tmp_path, setup, args, message):
    setup(tmp_path)
    out = tmp_path / "out.mid"
    result = run(*[a.format(d=tmp_path) for a in args], "-o", str(out))
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_bench_writes_rows_with_the_documented_keys(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", TINY, "--prefix", "0,64", "--latents", "1,8", "--steps", "10", "--no-reference"]
    result = run(*args, "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = load_json(out)
    assert [(row["prefix"], row["latents"]) for row in rows] == [(0, 1), (0, 8), (64, 1), (64, 8)]
    for row in rows:
        for key in (
            "step_ms_p50",
            "step_ms_p99",
            "player_ms_p99",
            "tokens_per_s",
            "weights_mb",
            "bandwidth_bound_ms",
            "gemv_bound_ms",
        ):
            assert row[key] > 0
        assert row["step_ms_p99"] >= row["step_ms_p50"]
        assert row["weights"] == "float32"


def test_bench_profile_says_where_a_steps_time_goes():
    result = run(
        "bench", "--model", TINY, "--prefix", "0", "--latents", "1", "--steps", "10", "--no-reference", "--profile"
    )
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("where 10 more steps of this row go:")[1]
    assert "Self CPU" in table and "aten::" in table  # torch.profiler's table, operators by their own time


def test_a_midi_library_that_does_not_load_is_one_line(tmp_path):
    """python-rtmidi's extension needs the system's libasound.so.2; without it (a GPU host had none)
    its load fails. Here a python-rtmidi whose extension is not a library fails to load the same way
    (the loader's ImportError, named `_rtmidi`): one line, exit 2, no traceback."""
    package = tmp_path / "rtmidi"
    package.mkdir()
    (package / "__init__.py").write_text("from ._rtmidi import *\n")
    (package / f"_rtmidi{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"not a shared library")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "liveperceiver", "ports"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "python-rtmidi does not load" in result.stderr, result.stderr
    assert "reinstall it" in result.stderr  # not ALSA's: the message does not name libasound


def test_cli_weight_choices_are_the_engines():
    from liveperceiver import cli
    from liveperceiver.inference import weights

    assert cli.WEIGHTS == weights.WEIGHTS  # spelled out in cli.py so that parsing does not import torch


def test_bench_quantize_is_a_deprecated_alias_of_weights(tmp_path):
    """`bench --quantize` (the old name) still works, says so in one line, and the rows record "weights"."""
    out = tmp_path / "bench.json"
    args = ["bench", "--model", TINY, "--prefix", "0", "--latents", "1", "--steps", "10", "--no-reference"]
    result = run(*args, "--quantize", "float16", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("deprecated") == 1 and "use --weights" in result.stderr
    assert [row["weights"] for row in load_json(out)] == ["float16"]
    assert "quantize" not in load_json(out)[0]


def test_bench_live_takes_one_window():
    result = run("bench", "--live", "--model", TINY, "--latents", "1,8")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["liveperceiver: error: bench --live --latents 1,8: give one window"]
    result = run("bench", "--live", "--model", TINY, "--latents", "16:64")  # refused before JACK starts
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "liveperceiver: error: bench --live --latents 16:64 outside 1..32 (the model's max_latents)"
    ]


def test_bench_turns_times_each_storage_in_the_same_run(tmp_path):
    """`bench --turns`: per row, each storage's step and step alone with the engines taking turns,
    printed under the row and recorded in its JSON."""
    out = tmp_path / "bench.json"
    args = ["bench", "--model", TINY, "--prefix", "0", "--latents", "1,4:8", "--steps", "10", "--no-reference"]
    result = run(*args, "--turns", "float32,int8,float16", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = load_json(out)
    assert [list(row["turns"]) for row in rows] == [["float32", "int8", "float16"]] * 2
    for row in rows:
        for times in row["turns"].values():
            assert times["step_ms_p50"] > 0 and times["alone_ms_p50"] > 0
    assert result.stdout.count("taking turns, step p50 ms: float32 ") == 2


def test_bench_turns_and_the_reference_in_one_row(tmp_path, monkeypatch, capsys):
    """Where perceiver-io is installed a row carries both: its reference figures and --turns (here the
    reference's timing is a stand-in that runs our steps as the real one does; perceiver-io itself is
    not installed in CI)."""
    from liveperceiver import cli
    from liveperceiver.tools import bench
    from liveperceiver.tools.reference import ReferenceTimes

    def stand_in(model, prefix, latents, steps, ours) -> ReferenceTimes:
        for _ in range(3):
            ours()
        return ReferenceTimes(alone_ms=10.0, in_turns_ms=12.0, ours_in_turns_ms=1.5)

    monkeypatch.setattr(bench, "reference_step_ms", stand_in)
    out = tmp_path / "bench.json"
    args = ["bench", "--model", TINY, "--prefix", "0", "--latents", "1", "--steps", "10", "--json", str(out)]
    assert cli.main([*args, "--turns", "float32,int8"]) == 0
    (row,) = load_json(out)
    assert list(row["turns"]) == ["float32", "int8"] and row["speedup_in_turns"] == 8.0
    printed = capsys.readouterr().out
    assert "taking turns 12.00 against 1.50 (8.0x)" in printed and "taking turns, step p50 ms: float32" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--turns", ""], "--turns : two or more"),
        (["--turns", "float32"], "--turns float32: two or more of float32, int8, float16, bfloat16, blocked"),
        (["--turns", "float32,auto"], "(auto is not one)"),
        (["--turns", "float32,int8", "--dtype", "bfloat16"], "--turns compares the weight storages of a float32"),
        (["--turns", "float32,int8", "--live"], "bench --turns times the engine's rows; --live times the live bridge"),
    ],
)
def test_bench_turns_refuses_what_it_cannot_compare_in_one_line(args, message):
    result = run("bench", "--model", TINY, "--prefix", "0", "--latents", "1", "--steps", "10", "--no-reference", *args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
