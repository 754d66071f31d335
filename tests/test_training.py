"""Dataset building, augmentation, training (exact resume, 2-process data parallel) and evaluation,
all on small synthetic MIDI files made on the fly."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import torch

from liveperceiver.core import vocab
from liveperceiver.core.checkpoint import load_directory
from liveperceiver.core.tokenizer import Note, decode_notes, encode_midi
from liveperceiver.live.settings import Settings
from liveperceiver.training.augment import (
    AugmentConfig,
    augment_tokens,
    encode_notes,
    jitter_onsets,
    scale_velocity,
    stretch,
)
from liveperceiver.training.augment import transpose as transpose_notes
from liveperceiver.training.dataset import SPLITS, TokenDataset, build, find_sources, split_of

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "liveperceiver" / "configs" / "tiny-test.toml"


def write_tune(path: Path, seed: int, notes: int = 40) -> None:
    """A simple repetitive melody with a bass note: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    scale = [60, 62, 64, 65, 67, 69, 71, 72]
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    for i in range(notes):
        start = i * 0.25
        piano.notes.append(pretty_midi.Note(80, scale[(i + seed) % 8], start, start + 0.2))
        if i % 4 == 0:
            piano.notes.append(pretty_midi.Note(60, 48 + int(rng.integers(0, 5)), start, start + 0.9))
    midi.instruments.append(piano)
    midi.write(str(path))


@pytest.fixture(scope="module")
def midi_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("midis") / "tunes"
    (folder / "sub").mkdir(parents=True)
    for i in range(24):
        write_tune(folder / ("sub" if i % 3 == 0 else "") / f"tune{i:02d}.mid", i)
    return folder


@pytest.fixture(scope="module")
def dataset_dir(midi_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    build(find_sources(str(midi_folder)), out, jobs=1, progress=False)
    return out


# --------------------------------------------------------------------------- dataset


def test_split_is_a_stable_hash_of_the_source_name():
    names = [f"music21:bach/bwv{i}.mxl" for i in range(2000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]
    assert split_of("music21:bach/bwv1.6.mxl") == "train"  # pinned: changing the hash moves pieces
    shares = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert 0.85 < shares["train"] < 0.95 and 0.02 < shares["test"] < 0.08


def test_build_is_cached_skips_bad_files_and_keeps_splits(midi_folder, tmp_path, capsys):
    folder = tmp_path / "tunes"
    folder.mkdir()
    for i in range(4):
        write_tune(folder / f"t{i}.mid", i)
    (folder / "broken.mid").write_bytes(b"MThd not really")
    first = build(find_sources(str(folder)), tmp_path / "out", jobs=2, progress=False)
    assert first["converted"] == 5 and first["skipped"] == 1 and first["pieces"] == 4
    assert "warning: skipping" in capsys.readouterr().err
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    again = build(find_sources(str(folder)), tmp_path / "out", jobs=2, progress=False)
    assert again["converted"] == 0 and again["skipped"] == 1  # a rerun converts nothing new
    # Adding a file never moves an existing piece to another split.
    write_tune(folder / "t9.mid", 9)
    build(find_sources(str(folder)), tmp_path / "out", jobs=1, progress=False)
    after = {p["source"]: p["split"] for p in json.loads((tmp_path / "out" / "index.json").read_text())["pieces"]}
    assert all(after[p["source"]] == p["split"] for p in index["pieces"])
    data = TokenDataset(tmp_path / "out")
    assert len(data) == 5
    assert [int(t) for t in data.piece(0)] == encode_midi(pretty_midi.PrettyMIDI(str(folder / "t0.mid")))


def test_music21_sources_carry_licence_notes():
    sources = find_sources("music21:bach")
    assert sources and all(s.name.startswith("music21:bach/") for s in sources)
    krn = [s for s in sources if s.path.suffix == ".krn"]
    assert all(not s.shippable for s in krn)  # CCARH encodings reserve derivative rights
    assert any(s.shippable for s in sources if s.path.suffix == ".mxl")
    assert not any(s.shippable for s in find_sources("music21:palestrina")[:5])


def test_music21_score_and_abc_conversion():
    from liveperceiver.training.dataset import _score_to_midis, convert_file, music21_corpus_dir

    corpus = music21_corpus_dir()
    [(_, chorale)] = convert_file(corpus / "bach" / "bwv1.6.mxl")
    assert len(chorale) > 500 and vocab.check_tokens(chorale)
    tunes = convert_file(corpus / "oneills1850" / "0001-0050.abc")  # one ABC book, many tunes
    assert len(tunes) == 50
    [(_, data)] = _score_to_midis(corpus / "ryansMammoth" / "7thRegimentReel.abc")  # music21's ABC path
    assert data.startswith(b"MThd")


# --------------------------------------------------------------------------- augmentation


def sample_tokens() -> list[int]:
    notes = [Note(60 + i % 12, 64 + 4 * (i % 5), 0.5 * i, 0.5 * i + 0.4) for i in range(16)]
    notes.append(Note(126, 80, 1.0, 2.0))
    return encode_notes(notes)


def assert_exact_format(tokens: list[int]) -> None:
    vocab.check_tokens(tokens)
    assert encode_notes(decode_notes(tokens)) == tokens  # re-encoding changes nothing: exact format


def test_transpose_shifts_note_tokens_and_drops_notes_out_of_range():
    tokens = sample_tokens()
    up = encode_notes(transpose_notes(decode_notes(tokens), 3))
    assert_exact_format(up)
    ons = [t for t in tokens if t < vocab.NOTE_OFF]
    assert sorted(t for t in up if t < vocab.NOTE_OFF) == sorted(t + 3 for t in ons if t + 3 <= 127)
    assert 126 + 3 - 128 + 128 not in up and len([t for t in up if t < 128]) == len(ons) - 1  # 126 -> 129 dropped


def test_stretch_scales_time_shifts():
    tokens = sample_tokens()

    def seconds(ts: list[int]) -> float:
        return sum(vocab.time_shift_steps(t) for t in ts if vocab.TIME_SHIFT <= t < vocab.VELOCITY) / 100

    slower = encode_notes(stretch(decode_notes(tokens), 1.15))
    assert_exact_format(slower)
    assert seconds(slower) == pytest.approx(1.15 * seconds(tokens), rel=0.01)  # gaps round to 10 ms each
    assert [t for t in slower if t < vocab.TIME_SHIFT] == [t for t in tokens if t < vocab.TIME_SHIFT]


def test_velocity_scaling_and_jitter_change_velocity_tokens_only():
    tokens = sample_tokens()
    notes = decode_notes(tokens)
    louder = encode_notes(scale_velocity(notes, 1.25, np.zeros(len(notes))))
    assert_exact_format(louder)
    before = [n.velocity for n in decode_notes(tokens)]
    after = [n.velocity for n in decode_notes(louder)]
    assert after == [min(127, round(v * 1.25)) // 4 * 4 for v in before]
    jittered = decode_notes(encode_notes(scale_velocity(notes, 1.0, np.full(len(notes), 8.0))))
    assert [n.velocity for n in jittered] == [min(127, v + 8) // 4 * 4 for v in before]
    assert [t for t in louder if t < vocab.VELOCITY] == [t for t in tokens if t < vocab.VELOCITY]


def test_onset_jitter_moves_onsets_by_tens_of_ms():
    notes = [Note(40 + i, 80, 0.5 + 0.25 * i, 0.5 + 0.25 * i + 0.2) for i in range(12)]  # distinct pitches
    tokens = encode_notes(notes)
    later = encode_notes(jitter_onsets(notes, np.full(len(notes), 0.03)))
    assert later[0] == tokens[0] + 3 and later[1:] == tokens[1:]  # only the opening gap grows by 30 ms
    offsets = np.tile([0.02, -0.03, 0.0], 4)
    moved = encode_notes(jitter_onsets(notes, offsets))
    assert_exact_format(moved)
    assert moved != tokens
    starts = {n.pitch: n.start for n in decode_notes(moved)}
    for note, offset in zip(notes, offsets, strict=True):
        assert starts[note.pitch] == pytest.approx(note.start + offset, abs=0.011)


def test_random_augmentation_is_exact_format_and_seeded():
    tokens = sample_tokens()
    config = AugmentConfig(probability=1.0)
    a = augment_tokens(tokens, config, np.random.default_rng(1))
    b = augment_tokens(tokens, config, np.random.default_rng(1))
    assert a == b and a != tokens
    assert_exact_format(a)


# --------------------------------------------------------------------------- training


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "liveperceiver", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=120,
    )


def test_resume_continues_exactly(dataset_dir, tmp_path):
    from liveperceiver.training.train import RunConfig, train

    run = RunConfig.load(TINY_CONFIG)
    train(run, dataset_dir, tmp_path / "straight", max_steps=8, progress=False, device="cpu")
    train(run, dataset_dir, tmp_path / "split", max_steps=4, progress=False, device="cpu")
    train(
        RunConfig.load(TINY_CONFIG),
        dataset_dir,
        tmp_path / "split",
        resume=True,
        max_steps=8,
        progress=False,
        device="cpu",
    )
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)  # plain values only
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows = list(csv.DictReader((tmp_path / "split" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))


def test_fine_tune_starts_from_a_model_and_validates_on_its_own_window(dataset_dir, tmp_path):
    from liveperceiver.core.errors import UserError
    from liveperceiver.training.train import RunConfig, train
    from liveperceiver.training.windows import eval_windows

    base = RunConfig.load(TINY_CONFIG)
    train(base, dataset_dir, tmp_path / "base", max_steps=10, progress=False, device="cpu")
    source = load_directory(tmp_path / "base" / "best")
    tune = RunConfig.load(TINY_CONFIG)
    tune.train.init_from, tune.train.latents = str(tmp_path / "base" / "best"), 4
    train(tune, dataset_dir, tmp_path / "tune", max_steps=0, progress=False, device="cpu")
    started = torch.load(tmp_path / "tune" / "checkpoint.pt", weights_only=True)["model"]
    for key, value in source.state_dict().items():
        assert torch.equal(started[key], value), key
    windows = eval_windows(TokenDataset(dataset_dir, "validation", False), 96, 64, None, latents=4)
    assert windows and all(len(tokens) - 1 - prefix_len <= 4 for tokens, prefix_len in windows)
    wider = RunConfig.load(TINY_CONFIG)
    wider.model.num_channels = 64
    wider.train.init_from = str(tmp_path / "base" / "best")
    with pytest.raises(UserError, match="num_channels"):
        train(wider, dataset_dir, tmp_path / "wider", max_steps=0, progress=False, device="cpu")


def test_opening_batches_start_at_a_piece_with_a_short_prefix(dataset_dir):
    from liveperceiver.training.windows import OPENING_PREFIX_MAX, WindowSampler

    data = TokenDataset(dataset_dir, "train", False)
    pieces = list(range(len(data)))
    openings = {tuple(int(t) for t in data.piece(i)[:8]) for i in pieces}
    sampler = WindowSampler(data, pieces, None, seed=3, opening_share=1.0)
    for _ in range(5):
        tokens, prefix_len = sampler.batch(4, 64, 16)
        assert prefix_len <= OPENING_PREFIX_MAX
        assert all(tuple(row[:8].tolist()) in openings for row in tokens)
    anywhere = WindowSampler(data, pieces, None, seed=3)
    rows = [tuple(row[:8].tolist()) for _ in range(5) for row in anywhere.batch(4, 64, 16)[0]]
    assert sum(row in openings for row in rows) < len(rows) / 2  # without the share, windows start anywhere


def test_score_batches_put_their_targets_in_plain_scores(dataset_dir):
    from liveperceiver.training.windows import WindowSampler

    data = TokenDataset(dataset_dir, "train", False)
    pieces = list(range(len(data)))
    plain = max(pieces, key=lambda i: len(data.piece(i)))  # one score; every other piece plays a rendition
    for i in pieces:
        if i != plain:
            data.pieces[i]["rendition"] = 1
    text = [int(t) for t in data.piece(plain)]
    following = [int(t) for i in pieces[pieces.index(plain) + 1 :] for t in data.piece(i)][:32]

    def in_score(row, prefix_len) -> bool:
        target = row[prefix_len : prefix_len + 4].tolist()
        stream = text + following  # the first target lies in the score; the next ones may run past its end
        return any(stream[k : k + 4] == target for k in range(len(text)))

    scores = WindowSampler(data, pieces, None, seed=5, score_share=1.0)
    anywhere = WindowSampler(data, pieces, None, seed=5)
    hits = {"score": 0, "anywhere": 0}
    for _ in range(10):
        for name, sampler in (("score", scores), ("anywhere", anywhere)):
            tokens, prefix_len = sampler.batch(4, 64, 16)
            hits[name] += sum(in_score(row, prefix_len) for row in tokens)
    assert hits["score"] == 40, hits
    assert hits["anywhere"] < 30, hits  # without the share, targets fall anywhere


def ranks_own_output(stderr: str) -> str:
    """What the ranks themselves printed to stderr (the end of it), before torchrun's own report,
    whose tracebacks would fill the message and hide a rank's error."""
    return stderr.split("torch/distributed/elastic")[0][-2000:]


def test_two_process_data_parallel_keeps_ranks_identical_and_learns(dataset_dir, tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "liveperceiver", "train", "--config", str(TINY_CONFIG), "--data", str(dataset_dir)]
        + ["--out", str(out), "--max-steps", "30", "--quiet", "--device", "cpu"],  # gloo, even beside a GPU
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=180,
    )
    assert result.returncode == 0, ranks_own_output(result.stderr)
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and ranks["checksums"][0] == ranks["checksums"][1]
    losses = [float(r["loss"]) for r in csv.DictReader((out / "log.csv").open())]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


# --------------------------------------------------------------------------- the device


def test_each_torchrun_rank_trains_on_its_own_gpu_and_the_cpu_keeps_gloo():
    from liveperceiver.core.errors import UserError
    from liveperceiver.training.devices import process_group_backend, rank_device

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert rank_device(cuda, 1, 0) == cuda  # one process: the device as given
    assert rank_device(cuda, 2, 1) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda", 1), 2, 1) == torch.device("cuda", 1)
    assert rank_device(cpu, 4, 3) == cpu
    assert process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert process_group_backend(cpu) == "gloo"  # on a GPU machine too, when the CPU trains
    with pytest.raises(UserError, match="each rank trains on cuda:LOCAL_RANK"):
        rank_device(torch.device("cuda", 0), 2, 1)
    with pytest.raises(UserError, match=r"CUDA GPUs \(NCCL\) or the CPU \(gloo\), not mps"):
        rank_device(torch.device("mps"), 2, 0)


@pytest.mark.parametrize("command", ["train", "eval", "continue", "bench", "bench --live", "play"])
def test_a_device_this_machine_lacks_is_one_line(command, dataset_dir, midi_folder, tiny_run, tmp_path, capsys):
    from liveperceiver.cli import main

    lacking = "cuda:64" if torch.cuda.is_available() else "cuda"  # `--device cuda` without CUDA
    model = str(tiny_run / "best")
    argv = {
        "train": ["train", "--config", str(TINY_CONFIG), "--data", str(dataset_dir), "--out", str(tmp_path / "new")],
        "eval": ["eval", "--model", model, str(dataset_dir), "--json", str(tmp_path / "new" / "x.json")],
        "continue": ["continue", "--model", model, str(midi_folder / "tune01.mid"), "-o", str(tmp_path / "new.mid")],
        "bench": ["bench", "--model", model, "--no-reference", "--json", str(tmp_path / "new" / "b.json")],
        "bench --live": ["bench", "--live", "--model", model],
        "play": ["play", "--headless", "--model", model, "--record", str(tmp_path / "new.mid")],
    }[command]
    for device, message in ((lacking, "CUDA device"), ("bogus", "not a device")):
        capsys.readouterr()
        assert main([*argv, "--device", device]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"liveperceiver: error: --device {device}: ") and message in captured.err
        assert captured.err.count("\n") == 1 and captured.out == "", captured.err
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_training_and_eval_run_on_the_device_given(dataset_dir, tmp_path, engine_device, monkeypatch):
    """The weights and every batch meet on the device asked for: the model's forward passes (training,
    validation, eval's NLL) and the engines (eval's live-window NLL, continuations). On the CPU here;
    on the GPU under .ci/gpu-check, where eval's NLL must also be the CPU's."""
    from liveperceiver.core.model import PerceiverAR
    from liveperceiver.inference.engine import Engine
    from liveperceiver.training.evaluate import evaluate
    from liveperceiver.training.train import RunConfig, train

    forwards, engines = set(), set()
    forward, next_logits = PerceiverAR.forward, Engine.next_logits

    def observed_forward(self, tokens, *args, **kwargs):
        forwards.add((tokens.device.type, next(self.parameters()).device.type))
        return forward(self, tokens, *args, **kwargs)

    def observed_logits(self):
        logits = next_logits(self)
        engines.add(logits.device.type)
        return logits

    monkeypatch.setattr(PerceiverAR, "forward", observed_forward)
    monkeypatch.setattr(Engine, "next_logits", observed_logits)
    run = RunConfig.load(TINY_CONFIG)
    run.train.val_every = 2
    result = train(run, dataset_dir, tmp_path / "run", max_steps=4, progress=False, device=engine_device)
    assert result["step"] == 4 and result["validated"]
    assert forwards == {(engine_device.type, engine_device.type)}
    forwards.clear()
    data = TokenDataset(dataset_dir, "validation", False)
    pieces = [[int(t) for t in data.piece(i)][:120] for i in range(len(data))]
    scored = {}
    for device in {torch.device("cpu"), engine_device}:
        model = load_directory(tmp_path / "run" / "best")
        scored[device.type] = evaluate(
            model, pieces, None, 1, False, window_latents=(2,), window_tokens=50, device=device, num_latents=2
        )
    assert forwards == {(device.type, device.type) for device in {torch.device("cpu"), engine_device}}
    assert engines == {device.type for device in {torch.device("cpu"), engine_device}}
    on_device, on_cpu = scored[engine_device.type], scored["cpu"]
    assert on_device["continuations"]["count"] == 1
    assert on_device["nll_model"] == pytest.approx(on_cpu["nll_model"], rel=1e-4)
    assert on_device["nll_by_window"][0]["nll"] == pytest.approx(on_cpu["nll_by_window"][0]["nll"], rel=1e-4)


@pytest.mark.cuda
def test_two_gpu_data_parallel_keeps_ranks_identical(dataset_dir, tmp_path, engine_device):
    """torchrun on CUDA: each rank on its own GPU (cuda:LOCAL_RANK), NCCL between them."""
    if engine_device.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs and LIVEPERCEIVER_TEST_DEVICE=cuda (.ci/gpu-check)")
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "liveperceiver", "train", "--config", str(TINY_CONFIG), "--data", str(dataset_dir)]
        + ["--out", str(out), "--max-steps", "30", "--quiet", "--device", "cuda"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, ranks_own_output(result.stderr)
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and ranks["checksums"][0] == ranks["checksums"][1]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all("cuda" in rank for rank in state["ranks"])  # each rank's GPU generator, for an exact resume


class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint.pt would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_a_checkpoint_carrying_code_is_refused_and_never_runs(dataset_dir, tmp_path):
    from liveperceiver.training.train import RunConfig, train

    run_dir, marker = tmp_path / "run", tmp_path / "payload-ran"
    train(RunConfig.load(TINY_CONFIG), dataset_dir, run_dir, max_steps=2, progress=False, device="cpu")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.save(
        {**state, "ranks": [{"sampler": Payload(marker), "torch": torch.get_rng_state()}]}, run_dir / "checkpoint.pt"
    )
    args = ["train", "--config", str(TINY_CONFIG), "--data", str(dataset_dir), "--out", str(run_dir), "--device", "cpu"]
    result = run_cli(*args, "--resume", "--max-steps", "4", "--quiet")
    assert result.returncode == 2 and not marker.exists()
    assert result.stderr.count("\n") == 1 and "refused" in result.stderr and "Traceback" not in result.stderr
    torch.load(run_dir / "checkpoint.pt", weights_only=False)  # the payload is real: the unsafe reader runs it
    assert marker.exists()


def build_mixed(midi_folder: Path, tmp_path: Path) -> Path:
    """The user's own folder (not shippable, as `dataset build` marks it) beside a shippable source."""
    from dataclasses import replace

    public = tmp_path / "pd"
    public.mkdir()
    for i in range(8):
        write_tune(public / f"p{i}.mid", 30 + i)
    sources = find_sources(str(midi_folder)) + [replace(s, shippable=True) for s in find_sources(str(public))]
    out = tmp_path / "mixed"
    build(sources, out, jobs=1, progress=False)
    return out


def expected_counts(data: Path, group: str, shippable_only: bool) -> tuple[dict, dict]:
    """Pieces and tokens per split that training uses, and pieces per split it leaves out, of one source."""
    used, left = {}, {}
    for piece in json.loads((data / "index.json").read_text())["pieces"]:
        if piece["source"].split("/")[0] != group:
            continue
        if shippable_only and not piece["shippable"]:
            left[piece["split"]] = left.get(piece["split"], 0) + 1
        else:
            n, tokens = used.get(piece["split"], (0, 0))
            used[piece["split"]] = (n + 1, tokens + piece["length"])
    return used, left


def test_own_midi_trains_by_default_and_every_count_is_printed(midi_folder, tmp_path, capsys):
    from liveperceiver.cli import main
    from liveperceiver.training.train import RunConfig

    for config in sorted((REPO / "liveperceiver" / "configs").glob("*.toml")):
        assert RunConfig.load(config).train.shippable_only is False, config.name  # README: train your own
    data = build_mixed(midi_folder, tmp_path)
    capsys.readouterr()
    args = [
        "train",
        "--config",
        str(TINY_CONFIG),
        "--data",
        str(data),
        "--max-steps",
        "2",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main([*args, "--out", str(tmp_path / "all")]) == 0
    err = capsys.readouterr().err
    for group in ("tunes", "pd"):
        used, _ = expected_counts(data, group, False)
        cells = [f"{split} {used.get(split, (0, 0))[0]} ({used.get(split, (0, 0))[1]:,})" for split in SPLITS]
        assert f"  {group}: {', '.join(cells)}\n" in err, err
    pieces = json.loads((data / "index.json").read_text())["pieces"]
    totals = [f"{split} {sum(p['split'] == split for p in pieces)}" for split in SPLITS]
    assert all(total in err.split("  all sources: ")[1].splitlines()[0] for total in totals)
    # The licence filter is for the models we ship: asked for, it says what it leaves out, per split.
    assert main([*args, "--out", str(tmp_path / "public"), "--shippable-only"]) == 0
    err = capsys.readouterr().err
    _, left = expected_counts(data, "tunes", True)
    assert (
        "  tunes: train 0 (0), validation 0 (0), test 0 (0); left out, not shippable: "
        + ", ".join(f"{split} {left.get(split, 0)}" for split in SPLITS)
        in err
    )
    assert f"warning: --shippable-only left out {left['train'] + left['validation']} train/validation pieces" in err
    user_only = tmp_path / "mine"
    build(find_sources(str(midi_folder)), user_only, jobs=1, progress=False)
    assert main([*args[:4], str(user_only), *args[5:], "--out", str(tmp_path / "none"), "--shippable-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{left['train']} left out as not shippable by --shippable-only" in err


def test_without_validation_pieces_best_is_the_latest_model(tmp_path, capsys):
    from liveperceiver.cli import main

    folder = tmp_path / "pd"  # p0..p5 all hash to the train split
    folder.mkdir()
    for i in range(6):
        write_tune(folder / f"p{i}.mid", i)
    assert {split_of(f"pd/p{i}.mid") for i in range(6)} == {"train"}
    build(find_sources(str(folder)), tmp_path / "data", jobs=1, progress=False)
    args = ["train", "--config", str(TINY_CONFIG), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert main([*args, "--max-steps", "3", "--quiet", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "has no validation pieces" in captured.err and "no validation pieces" in captured.out
    meta = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert meta["step"] == 3 and meta["val_loss"] is None
    load_directory(tmp_path / "run" / "best")  # README's next step, eval --model runs/x/best, has a model


def test_a_run_folder_is_kept_unless_resume_or_overwrite(dataset_dir, tmp_path, capsys):
    from liveperceiver.cli import main

    run_dir = tmp_path / "run"
    args = ["train", "--config", str(TINY_CONFIG), "--data", str(dataset_dir), "--out", str(run_dir), "--quiet"]
    args += ["--device", "cpu"]
    assert main([*args, "--max-steps", "10"]) == 0
    before = {p: p.read_bytes() for p in [run_dir / "log.csv", *sorted((run_dir / "best").iterdir())]}
    capsys.readouterr()
    for extra in ([], ["--resume", "--overwrite"]):
        assert main([*args, "--max-steps", "2", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("--overwrite" in err), err
        assert {p: p.read_bytes() for p in before} == before  # nothing touched
    assert main([*args, "--max-steps", "2", "--overwrite"]) == 0
    assert [int(r["step"]) for r in csv.DictReader((run_dir / "log.csv").open())] == [1, 2]
    assert json.loads((run_dir / "best" / "config.json").read_text())["step"] == 2


def write_config(path: Path, old: str, new: str) -> Path:
    text = TINY_CONFIG.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


@pytest.fixture(scope="module")
def tiny_run(dataset_dir, tmp_path_factory) -> Path:
    from liveperceiver.training.train import RunConfig, train

    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(RunConfig.load(TINY_CONFIG), dataset_dir, run_dir, max_steps=2, progress=False, device="cpu")
    return run_dir


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty dataset", "no pieces in the train split (the dataset holds 0 pieces in all)"),
        ("resume, another size", "the run has another model config (num_channels 32 in the run, 64 in this config)"),
        ("dataset build --out a file", "exists and is not a folder"),
        ("eval --continuations -2", "--continuations -2 must be >= 0"),
        ("eval --json under a file", "cannot create its folder"),
        ("train --max-steps -3", "--max-steps -3 must be >= 1"),
        ("config value of the wrong type", "[model] num_channels = '32' must be an integer"),
        ("config count out of range", "[train] batch_size = 0 is outside the allowed values (>= 1)"),
        ("eval --split bogus", "--split 'bogus': not a split (a dataset has train, validation, test)"),
        ("eval on an empty split", "nothing to evaluate in its test split (pieces with at least two tokens: train"),
        ("eval --model a run folder", "is a training run: use --model"),
    ],
)
def test_user_mistakes_in_training_and_eval_are_one_line(
    case, message, midi_folder, dataset_dir, tiny_run, tmp_path, capsys
):
    import shutil

    from liveperceiver.cli import main

    config, data, run_dir = str(TINY_CONFIG), str(dataset_dir), tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    model = str(run_dir / "best")
    (tmp_path / "a-file").write_text("")
    train = ["train", "--config", config, "--data", data, "--quiet"]
    if case == "empty dataset":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.mid").write_bytes(b"MThd not really")
        build(find_sources(str(tmp_path / "bad")), tmp_path / "empty", jobs=1, progress=False)
        argv = ["train", "--config", config, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "new")]
    elif case == "resume, another size":
        bigger = write_config(tmp_path / "big.toml", "num_channels = 32", "num_channels = 64")
        argv = ["train", "--config", str(bigger), "--data", data, "--out", str(run_dir), "--resume"]
    elif case == "dataset build --out a file":
        argv = ["dataset", "build", "--source", str(midi_folder), "--out", str(tmp_path / "a-file"), "--quiet"]
    elif case == "eval --continuations -2":
        argv = ["eval", "--model", model, data, "--continuations", "-2"]
    elif case == "eval --json under a file":
        argv = ["eval", "--model", model, data, "--json", str(tmp_path / "a-file" / "x.json")]
    elif case == "train --max-steps -3":
        argv = [*train, "--out", str(tmp_path / "new"), "--max-steps", "-3"]
    elif case == "config value of the wrong type":
        typed = write_config(tmp_path / "typed.toml", "num_channels = 32", 'num_channels = "32"')
        argv = ["train", "--config", str(typed), "--data", data, "--out", str(tmp_path / "new")]
    elif case == "config count out of range":
        zero = write_config(tmp_path / "zero.toml", "batch_size = 4", "batch_size = 0")
        argv = ["train", "--config", str(zero), "--data", data, "--out", str(tmp_path / "new")]
    elif case == "eval --split bogus":
        argv = ["eval", "--model", model, data, "--split", "bogus"]
    elif case == "eval on an empty split":
        index = json.loads((dataset_dir / "index.json").read_text())
        index["pieces"] = [p for p in index["pieces"] if p["split"] != "test"]
        (tmp_path / "no-test").mkdir()
        (tmp_path / "no-test" / "index.json").write_text(json.dumps(index))
        shutil.copy(dataset_dir / "tokens.u16", tmp_path / "no-test")
        argv = ["eval", "--model", model, str(tmp_path / "no-test")]
    else:
        argv = ["eval", "--model", str(run_dir), data]
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""  # refused before any work: nothing scored, nothing trained
    assert not (tmp_path / "new").exists() and (run_dir / "checkpoint.pt").read_bytes() == checkpoint


def test_eval_json_into_a_new_folder(dataset_dir, tiny_run, tmp_path, capsys):
    from liveperceiver.cli import main

    out = tmp_path / "missing" / "dir" / "x.json"
    argv = ["eval", "--model", str(tiny_run / "best"), str(dataset_dir), "--split", "validation", "--max-tokens", "40"]
    assert main([*argv, "--json", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["tokens"] == 40


def test_baseline_comparison_reads_right_both_ways():
    from liveperceiver.training.evaluate import baseline_line

    assert baseline_line(5.0662, 1.9012) == (
        "4-gram baseline NLL 1.9012 (the model's NLL is 166.5% higher: worse than the 4-gram)"
    )
    assert baseline_line(0.826, 1.4340) == "4-gram baseline NLL 1.4340 (the model's NLL is 42.4% lower: better)"


# --------------------------------------------------------------------------- evaluation


def test_eval_reports_nll_baseline_and_continuation_statistics(dataset_dir, tmp_path):
    from liveperceiver.core.checkpoint import save_directory
    from liveperceiver.training.train import RunConfig, train

    run = RunConfig.load(TINY_CONFIG)
    train(run, dataset_dir, tmp_path / "run", max_steps=20, progress=False, device="cpu")
    model = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    from liveperceiver.core.model import PerceiverAR

    net = PerceiverAR(run.model)
    net.load_state_dict(model["model"])
    save_directory(net, tmp_path / "model")
    result = run_cli(
        "eval", "--model", str(tmp_path / "model"), str(dataset_dir), "--split", "train", "--max-tokens", "400",
        "--continuations", "2", "--window-latents", "1,4", "--window-tokens", "50", "--json", str(tmp_path / "eval.json"),
        "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    from liveperceiver.training.evaluate import baseline_line

    assert "  " + baseline_line(report["nll_model"], report["baseline_nll"]) + "\n" in result.stdout  # the model alone
    assert 380 <= report["tokens"] <= 400 and report["perplexity"] == pytest.approx(np.exp(report["nll"]))
    assert report["baseline_nll"] > 0 and set(report["by_type"]) <= {"note_on", "note_off", "time_shift", "velocity"}
    assert report["continuations"]["count"] == 2 and 0 <= report["continuations"]["pitch_class_overlap"] <= 1
    assert 0 <= report["continuations"]["prompt_pitch_class_overlap"] <= 1
    assert 0 <= report["continuations"]["generated_vs_prompt_pitch_class_overlap"] <= 1
    assert 0 <= report["continuations"]["ngram_pitch_class_overlap"] <= 1  # the yardstick, same prompts
    contexts = report["by_context"]
    assert sum(row["tokens"] for row in contexts) == report["tokens"] and contexts[0]["context"] == "1-3"
    assert all(row["baseline_nll"] > 0 for row in contexts)
    assert [(row["num_latents"], row["tokens"]) for row in report["nll_by_window"]] == [(1, 50), (4, 50)]
    from liveperceiver.core.shipped import model_max_latents

    live = Settings().latent_window(model_max_latents(str(tmp_path / "model"))).setting  # auto, for this model
    assert report["continuations"]["sampling"]["num_latents"] == live  # as live by default
    assert f"key_follow={Settings().key_follow}" in report["continuations"]["constraints"]
    wrong = run_cli("eval", "--model", str(tmp_path / "model"), str(dataset_dir), "--key-follow", "-1")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "liveperceiver: error: --key-follow -1 is outside the allowed values (0 (off) .. 4)"
    ]


def test_an_evaluation_only_set_has_no_fitted_baseline(dataset_dir, tiny_model, tmp_path):
    """A set with no train split (e.g. held-out performances) gets no 4-gram: fitted on nothing it
    would be the uniform distribution, reported as if it were a yardstick."""
    import shutil

    from liveperceiver.training.evaluate import evaluate

    only_test = tmp_path / "only-test"
    shutil.copytree(dataset_dir, only_test)
    index = json.loads((only_test / "index.json").read_text())
    for piece in index["pieces"]:
        piece["split"] = "test"
    (only_test / "index.json").write_text(json.dumps(index))
    data = TokenDataset(only_test, "test")
    pieces = [[int(t) for t in data.piece(i)][:60] for i in range(len(data))]
    report = evaluate(tiny_model, pieces, only_test, progress=False, num_latents=2)
    assert report["baseline_nll"] is None and report["baseline"].startswith("none: ")
    fitted = evaluate(tiny_model, pieces, dataset_dir, progress=False, num_latents=2)
    assert fitted["baseline_nll"] > 0 and fitted["nll"] == pytest.approx(report["nll"])


def test_stream_nll_is_the_full_forward_nll_of_each_window(tiny_model):
    from liveperceiver.training.nll import stream_nll

    rng = np.random.default_rng(1)
    pieces = [[int(t) for t in rng.integers(0, 388, 40)], [int(t) for t in rng.integers(0, 388, 30)]]
    for latents in (1, 3):
        expected = []
        with torch.no_grad():
            for piece in pieces:
                for t in range(1, len(piece)):
                    context = torch.tensor([piece[:t]])
                    window = min(latents, t)
                    logits = tiny_model(context, t - window)[0, -1]
                    expected.append(-float(torch.log_softmax(logits.float(), -1)[piece[t]]))
        got = stream_nll(tiny_model, pieces, latents, max_tokens=60, progress=False)
        assert got["tokens"] == 60 and got["num_latents"] == latents
        assert got["nll"] == pytest.approx(np.mean(expected[:60]), abs=1e-5)


def test_validation_and_eval_score_the_same_windows_alike(dataset_dir, tiny_model):
    """train.validate and eval's model_nll run one loop (nll.windows_nll) over the same windows
    (windows.piece_windows): on a whole split, the same mean NLL, and each window is the NLL of a
    full forward pass over it."""
    from liveperceiver.training.nll import model_nll, window_nll
    from liveperceiver.training.train import validate
    from liveperceiver.training.windows import eval_windows

    data = TokenDataset(dataset_dir, "validation", False)
    config = tiny_model.config
    windows = eval_windows(data, config.max_seq_len, config.max_prefix_len, None)
    assert len(windows) > len(data) > 0  # several windows per piece
    nll, targets = model_nll(tiny_model, [[int(t) for t in data.piece(i)] for i in range(len(data))])
    assert len(nll) == sum(len(data.piece(i)) - 1 for i in range(len(data))) == sum(len(w) - p - 1 for w, p in windows)
    assert validate(tiny_model, windows) == pytest.approx(float(nll.mean()), rel=1e-6)
    tokens, prefix_len = windows[-1]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([tokens[:-1]]), prefix_len)[0]
    expected = -torch.log_softmax(logits, -1)[torch.arange(len(logits)), torch.tensor(tokens[prefix_len + 1 :])]
    assert torch.allclose(window_nll(tiny_model, tokens, prefix_len), expected, atol=1e-5)
    assert list(targets[-len(expected) :]) == tokens[prefix_len + 1 :]


def test_kneser_ney_is_a_distribution():
    from liveperceiver.training.ngram import KneserNey

    rng = np.random.default_rng(0)
    ngram = KneserNey(4).fit([rng.integers(0, 20, 500), rng.integers(0, 30, 300)])
    for history in [(), (3,), (3, 4, 5), (1, 2, 300)]:
        assert sum(ngram.prob(history, t) for t in range(vocab.VOCAB_SIZE)) == pytest.approx(1.0)
    # a seen trigram outweighs an unseen continuation of the same history
    *seen, follower = next(iter(ngram.counts[3]))
    assert ngram.prob(tuple(seen), follower) > 10 * ngram.prob(tuple(seen), 388)
    drawn = ngram.sample([3, 4], 2000, np.random.default_rng(1))
    assert len(drawn) == 2000 and np.mean(np.array(drawn) < 30) > 0.95  # mostly the training alphabet (0-29)


def test_well_formed():
    from liveperceiver.training.continuations import well_formed

    assert well_formed([60], [300, 128 + 60])
    assert well_formed([60, 60], [128 + 60, 128 + 60])  # a unison needs two note-offs
    assert not well_formed([], [128 + 60])  # note-off without note-on
    assert not well_formed([60], [60, 128 + 60, 128 + 60, 128 + 60])
    assert well_formed([], [60, 60, 300, 128 + 60] + [355] * 5)  # one note-off silences a unison
    assert well_formed([], [60, 300])  # cut while sounding: fine
    assert not well_formed([], [60, 300], max_open_s=None)
    assert not well_formed([], [60] + [355] * 5)  # hung for 5 s: a stuck note


def test_overlaps_of_known_histograms():
    """Overlap = the sum of bin-wise minima of the normalised histograms, checked against sums by hand."""
    from liveperceiver.training.continuations import histogram_overlap, note_stats, pitch_class_overlap

    def notes(pitches: list[int]) -> dict:
        return note_stats(encode_notes([Note(p, 80, 0.5 * i, 0.5 * i + 0.4) for i, p in enumerate(pitches)]))

    # C C E G (C4, C5: one pitch class) against C E E A: C min(2/4, 1/4) + E min(1/4, 2/4) = 0.5
    a, b = notes([60, 72, 64, 67]), notes([48, 64, 76, 69])
    assert list(a["pitch_classes"]) == [0.5, 0, 0, 0, 0.25, 0, 0, 0.25, 0, 0, 0, 0]
    assert pitch_class_overlap(a, b) == pytest.approx(0.5)
    assert pitch_class_overlap(a, a) == pytest.approx(1.0) and pitch_class_overlap(a, notes([61, 62])) == 0.0
    bins = np.array([0.01, 0.1, 1.0, 8.0])
    # [0.05, 0.05, 0.5, 20 (clipped into the last bin)] -> 2/4, 1/4, 1/4; [0.05, 0.5, 0.5, 0.5] -> 1/4, 3/4, 0
    assert histogram_overlap(np.array([0.05, 0.05, 0.5, 20.0]), np.array([0.05, 0.5, 0.5, 0.5]), bins) == (
        pytest.approx(0.25 + 0.25 + 0.0)
    )
    # a value below the first edge counts in the first bin: 1/2, 1/2 against 1/3, 2/3 -> 1/3 + 1/2
    assert histogram_overlap(np.array([0.001, 5.0]), np.array([0.05, 2.0, 3.0]), bins) == pytest.approx(1 / 3 + 1 / 2)
    assert histogram_overlap(np.array([]), np.array([0.5]), bins) == 0.0
