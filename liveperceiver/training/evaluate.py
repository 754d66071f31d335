"""Evaluation: NLL per token against an n-gram baseline, and musical statistics of continuations
(continuations.py).

The model is scored with the context it had in training (a prefix of up to max_prefix_len tokens
before each span of max_latents targets, within a piece; nll.py). The baseline is an interpolated
Kneser-Ney 4-gram (ngram.py) fitted on the train split of the same dataset and scored on the same
targets, so "x% below the baseline" says what the Perceiver's long context buys over local statistics.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError
from liveperceiver.training.continuations import continuation_stats
from liveperceiver.training.ngram import KneserNey

if TYPE_CHECKING:
    import torch

TYPES = ("note_on", "note_off", "time_shift", "velocity")


# --------------------------------------------------------------------------- model scoring


def adaptation_settings() -> dict:
    """The session cache's fixed settings (session_cache.py, adapt.py), for the record next to its weight."""
    from liveperceiver.inference import adapt, session_cache

    return {
        "order": session_cache.ORDER,
        "window": session_cache.WINDOW,
        "discount": session_cache.DISCOUNT,
        "weights": list(adapt.WEIGHTS),
        "forget": adapt.FORGET,
        "own_weight": session_cache.OWN_WEIGHT,
    }


def by_type(nll: np.ndarray, targets: np.ndarray) -> dict[str, dict]:
    result = {}
    kinds = np.array([vocab.event_type(int(t)) for t in targets])
    for kind in TYPES:
        mask = kinds == kind
        if mask.any():
            result[kind] = {"nll": float(nll[mask].mean()), "tokens": int(mask.sum())}
    return result


POSITION_BUCKETS = ((1, 4), (4, 16), (16, 64), (64, 256), (256, None))


def by_position(nll: np.ndarray, pieces: list[list[int]]) -> list[dict]:
    """NLL by how many tokens of its piece precede a target: how much context the model needs
    (a live session starts empty, and a four-note phrase is about 16 tokens)."""
    positions = np.concatenate([np.arange(1, len(p)) for p in pieces]) if pieces else np.zeros(0, dtype=int)
    rows = []
    for low, high in POSITION_BUCKETS:
        mask = (positions >= low) & (positions < (high or np.inf))
        if mask.any():
            label = f"{low}-{high - 1}" if high else f"{low}+"
            rows.append({"context": label, "tokens": int(mask.sum()), "nll": float(nll[mask].mean())})
    return rows


# --------------------------------------------------------------------------- inputs and the command


def load_inputs(inputs: list[str], split: str) -> tuple[list[list[int]], Path | None]:
    """Token lists of the pieces to score, and the dataset they came from (if any)."""
    from liveperceiver.core.tokenizer import encode_file
    from liveperceiver.training.dataset import MIDI_SUFFIXES, SPLITS, TokenDataset

    if split not in SPLITS:
        raise UserError(f"--split {split!r}: not a split (a dataset has {', '.join(SPLITS)})")
    pieces, dataset_dir = [], None
    for spec in inputs:
        if not spec.strip():  # Path("") is the working folder: every MIDI file under it would be scored
            raise UserError("an empty name was given for a dataset, folder or MIDI file to evaluate")
        path = Path(spec)
        if (path / "index.json").is_file():
            data = TokenDataset(path, split)
            if not len(data):
                whole = TokenDataset(path)
                counts = Counter(p["split"] for p in whole.pieces)
                have = ", ".join(f"{s} {counts[s]:,}" for s in SPLITS if counts[s]) or "none at all"
                raise UserError(
                    f"{path}: nothing to evaluate in its {split} split (pieces with at least two tokens: {have}); "
                    "choose one with --split"
                )
            pieces += [[int(t) for t in data.piece(i)] for i in range(len(data))]
            dataset_dir = dataset_dir or path
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(MIDI_SUFFIXES))
            for file in files:
                try:
                    pieces.append(encode_file(file))
                except UserError as error:
                    print(f"warning: skipping {error}", file=sys.stderr)
        elif path.is_file():
            pieces.append(encode_file(path))
        else:
            raise UserError(f"{spec}: no such file, folder or dataset")
    pieces = [p for p in pieces if len(p) > 1]
    if not pieces:
        raise UserError(f"nothing to evaluate: no pieces with at least two tokens in {', '.join(inputs)}")
    return pieces, dataset_dir


def cap_tokens(pieces: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The opening of every piece, sharing `max_tokens` targets fairly (short pieces whole)."""
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
    remaining, kept = max_tokens, {}
    for rank, i in enumerate(order):
        take = min(len(pieces[i]) - 1, remaining // (len(order) - rank))
        if take > 0:
            kept[i] = pieces[i][: take + 1]
            remaining -= take
    return [kept[i] for i in sorted(kept)]


def evaluate(
    model,
    pieces: list[list[int]],
    ngram_data: Path | None,
    continuations: int = 0,
    progress: bool = True,
    continuation_pieces: list[list[int]] | None = None,
    window_latents: tuple[int | str, ...] = (),
    window_tokens: int = 20000,
    adapt: float = 0.0,
    device: str | torch.device = "cpu",
    **sampling,
) -> dict:
    """`nll`: the system as `play` runs it, token by token on the live engine (nll.stream_token_nll):
    the latent window `sampling["num_latents"]` (default: the model's max_latents), in-session
    adaptation with its weight learnt up to `adapt`, and `sampling["constraints"]` (play's guards and follows), scored at
    temperature 1; `nll_model`: the model alone with the context of training windows. Both on the
    same targets. Everything runs on `device` (the model is moved there)."""
    from liveperceiver.inference.window import fitted_window
    from liveperceiver.training.nll import model_nll, stream_nll, stream_token_nll

    model = model.to(device)
    alone, targets = model_nll(model, pieces, progress)
    system_window = sampling.get("num_latents") or model.config.max_latents
    constraints = sampling.get("constraints")
    nll, _ = stream_token_nll(model, pieces, system_window, None, adapt, constraints, device, progress)
    if len(nll) != len(alone):
        raise ValueError(f"evaluate: {len(nll)} streamed targets for {len(alone)} scored ones")
    result: dict = {
        "tokens": int(len(nll)),
        "pieces": len(pieces),
        "nll": float(nll.mean()),
        "perplexity": float(math.exp(nll.mean())),
        "nll_model": float(alone.mean()),
        "perplexity_model": float(math.exp(alone.mean())),
        "adapt": {"weight": adapt, **adaptation_settings()},
        "system": {
            "num_latents": fitted_window(system_window, model.config.max_latents).setting,
            "adapt": adapt,
            "constraints": repr(constraints) if constraints is not None else None,
            "temperature": 1.0,
        },
        "by_type": by_type(nll, targets),
        "by_context": by_position(nll, pieces),
        "baseline": None,
        "baseline_nll": None,
    }
    for row, model_row in zip(result["by_type"].values(), by_type(alone, targets).values(), strict=True):
        row["nll_model"] = model_row["nll"]
    for row, model_row in zip(result["by_context"], by_position(alone, pieces), strict=True):
        row["nll_model"] = model_row["nll"]
    ngram = None
    if ngram_data is not None:
        from liveperceiver.training.dataset import TokenDataset

        train = TokenDataset(ngram_data, "train")
        if len(train):
            ngram = KneserNey(4).fit(train.piece(i) for i in range(len(train)))
        else:  # an evaluation-only set: a 4-gram fitted on nothing is the uniform distribution, no yardstick
            result["baseline"] = f"none: {ngram_data} has no train split to fit the 4-gram on (see --ngram-data)"
    if ngram is not None:
        base = np.concatenate([ngram.nll(p) for p in pieces])
        result["baseline"] = f"interpolated Kneser-Ney 4-gram fitted on {ngram_data} (train split)"
        result["baseline_nll"] = float(base.mean())
        result["baseline_perplexity"] = float(math.exp(base.mean()))
        result["baseline_by_type"] = by_type(base, targets)
        for row, base_row in zip(result["by_context"], by_position(base, pieces), strict=True):
            row["baseline_nll"] = base_row["nll"]
        result["improvement_over_baseline"] = 1.0 - result["nll_model"] / result["baseline_nll"]  # the model alone
    if window_latents:
        whole = continuation_pieces or pieces
        result["nll_by_window"] = [
            stream_nll(model, whole, n, window_tokens, progress, adapt, device) for n in window_latents
        ]
    if continuations:
        result["continuations"] = continuation_stats(
            model, continuation_pieces or pieces, continuations, ngram=ngram, adapt=adapt, device=device, **sampling
        )
    return result


def baseline_line(nll: float, baseline_nll: float) -> str:
    """The model against the 4-gram in words that read right either way (lower NLL is better)."""
    change = 1.0 - nll / baseline_nll
    if change >= 0:
        return f"4-gram baseline NLL {baseline_nll:.4f} (the model's NLL is {100 * change:.1f}% lower: better)"
    return f"4-gram baseline NLL {baseline_nll:.4f} (the model's NLL is {-100 * change:.1f}% higher: worse than the 4-gram)"


def check_run_folder(spec: str | None) -> None:
    """`--model runs/x` names a training run, not a model: say which of its folders is one."""
    if spec is None:
        return
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoint.pt").is_file():
        if (path / "best" / "config.json").is_file():
            raise UserError(f"{spec} is a training run: use --model {path / 'best'} (its best validation model)")
        raise UserError(f"{spec} is a training run with no best/ model yet (it has not validated once)")


def prepare_json(path: Path | None) -> None:
    """Make sure the results can be written before spending minutes on scoring (the folder is created,
    as `continue` does); a path that cannot be written is one line now, not a lost result later."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--json {path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--json {path}: cannot create its folder ({error.strerror or error})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"--json {path}: not writable")


def check_counts(args) -> None:
    """Counts that must be positive, each a one-line error instead of a numpy traceback."""
    if args.continuations < 0:
        raise UserError(f"--continuations {args.continuations} must be >= 0 (0: none)")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens} must be >= 1")
    if args.window_tokens < 1:
        raise UserError(f"--window-tokens {args.window_tokens} must be >= 1")


def parse_window_flags(args) -> None:
    """--window-latents and --num-latents as latent windows (N or MIN:MAX), each mistake one line."""
    from liveperceiver.inference.window import window_flag, windows_flag

    args.window_latents = windows_flag("--window-latents", args.window_latents)
    args.num_latents = window_flag("--num-latents", args.num_latents)


def check_windows(windows: list[int | str], max_latents: int) -> None:
    """Each --window-latents window fits the model (scored as given, never cut down to fit)."""
    from liveperceiver.inference.window import parse_window

    for window in windows:
        try:
            parse_window(window).check(max_latents)
        except ValueError as error:
            raise UserError(f"--window-latents {error}") from None


def run_eval(args) -> None:
    from liveperceiver.core.checkpoint import load_model
    from liveperceiver.core.errors import atomic_output
    from liveperceiver.inference.limits import check_follow_flags, check_key_follow_flag, check_sampling_flags
    from liveperceiver.runtime import checked_device, configure_inference

    check_key_follow_flag(args.key_follow)
    check_follow_flags(args)
    check_sampling_flags(args)
    if not 0.0 <= args.adapt <= 1.0:
        raise UserError(f"--adapt {args.adapt:g} is outside the allowed values (0 (off) .. 1)")
    check_counts(args)
    parse_window_flags(args)
    check_run_folder(args.model)
    device = checked_device(args.device)
    prepare_json(args.json)
    # once for the whole run: every engine and forward pass here is float32 on `device`
    configure_inference(max(1, getattr(args, "threads", 1) or 1), device.type, "float32")
    loaded = load_model(args.model)
    check_windows(args.window_latents, loaded.model.config.max_latents)
    pieces, dataset_dir = load_inputs(args.inputs, args.split)
    full_pieces = pieces  # continuations need whole pieces for their prompts
    if args.max_tokens:
        pieces = cap_tokens(pieces, args.max_tokens)
    sampling = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "num_latents": args.num_latents,
    }

    if not args.no_constraints:
        from liveperceiver.inference.sampling import Constraints

        # play's pitch range (Settings.played_pitches) is left out: it bounds what the model plays,
        # and a true note outside it would score an infinite NLL here
        sampling["constraints"] = Constraints(
            no_orphan_note_off=True,
            max_note_ms=round(args.max_note_seconds * 1000),
            max_rest_ms=round(args.max_rest_seconds * 1000),
            key_follow=args.key_follow,
            dynamics_follow=args.dynamics_follow,
            density_follow=args.density_follow,
            density_ratio=args.density_ratio,
        )
    result = evaluate(
        loaded.model,
        pieces,
        args.ngram_data or dataset_dir,
        args.continuations,
        continuation_pieces=full_pieces,
        window_latents=tuple(args.window_latents),
        window_tokens=args.window_tokens,
        adapt=args.adapt,
        device=device,
        **sampling,
    )
    result["model"] = loaded.source
    alone = "  (model alone {:.4f})"
    system = result["system"]
    parts = [
        f"latent window {system['num_latents']}",
        f"in-session adaptation {args.adapt:g}" if args.adapt else "adaptation off",
        "play's guards and follows" if system["constraints"] else "no guards or follows",
    ]
    lines = [
        f"model {loaded.name}: {result['tokens']:,} tokens in {result['pieces']} pieces",
        f"  NLL {result['nll']:.4f} nats/token, perplexity {result['perplexity']:.2f}: the system as play runs it "
        f"({', '.join(parts)}; scored at temperature 1); the model alone with training windows: NLL "
        f"{result['nll_model']:.4f}, perplexity {result['perplexity_model']:.2f}",
    ]
    if result["baseline_nll"] is not None:
        lines.append("  " + baseline_line(result["nll_model"], result["baseline_nll"]))
    elif result["baseline"]:
        lines.append(f"  no 4-gram baseline: {result['baseline'].removeprefix('none: ')}")
    for kind, row in result["by_type"].items():
        base = result.get("baseline_by_type", {}).get(kind, {}).get("nll")
        lines.append(
            f"  {kind:10s} NLL {row['nll']:.4f}"
            + alone.format(row["nll_model"])
            + (f"  (4-gram {base:.4f})" if base is not None else "")
        )
    for row in result["by_context"]:
        base = row.get("baseline_nll")
        lines.append(
            f"  after {row['context']:>7} tokens of context: NLL {row['nll']:.4f}"
            + alone.format(row["nll_model"])
            + (f"  (4-gram {base:.4f})" if base is not None else "")
            + f"  ({row['tokens']:,} tokens)"
        )
    for row in result.get("nll_by_window", []):
        lines.append(
            f"  NLL with latent window {row['num_latents']}, as live: {row['nll']:.4f}"
            + alone.format(row["nll_model"])
            + f" ({row['tokens']:,} tokens)"
        )
    if "continuations" in result and result["continuations"].get("count"):
        c = result["continuations"]
        lines.append(
            f"  {c['count']} continuations: well-formed {100 * c['well_formed']:.1f}%, "
            f"pitch-class overlap {c['pitch_class_overlap']:.3f} (the prompt's own: {c['prompt_pitch_class_overlap']:.3f}"
            + (f", the 4-gram's: {c['ngram_pitch_class_overlap']:.3f}" if "ngram_pitch_class_overlap" in c else "")
            + "), "
            f"note-length overlap {c['note_length_overlap']:.3f}, "
            f"inter-onset overlap {c['inter_onset_overlap']:.3f}"
        )
        lines.append(
            f"  velocity overlap {c['velocity_overlap']:.3f} (the prompt's own: {c['prompt_velocity_overlap']:.3f}), "
            + ", ".join(
                f"{label} {c[key]['generated']:.2f} against the truth's {c[key]['true']:.2f}"
                + (
                    f" (per prompt: median ratio {c[key + '_ratio']['median']:.2f}, "
                    f"{100 * c[key + '_ratio']['within_25_percent']:.0f}% within 25%)"
                    if c[key + "_ratio"]["prompts"]
                    else ""
                )
                for label, key in (("notes/s", "notes_per_second"), ("polyphony", "polyphony"))
            )
        )
        lines.append(
            f"  longest rest {c['longest_rest_s']['generated']:.2f} s against the truth's "
            f"{c['longest_rest_s']['true']:.2f} (mean); 5 s or more without a note-on: {c['rests_of_5s']} of "
            f"{c['count']} continuations (the truth: {c['true_rests_of_5s']})"
        )
    print("\n".join(lines))
    if args.json:
        text = json.dumps(result, indent=2, default=_jsonable) + "\n"
        try:
            with atomic_output(args.json, "w") as file:
                file.write(text)
        except OSError as error:  # checked before scoring, yet the disk can fill: keep the result
            print(text)
            raise UserError(
                f"--json {args.json}: cannot write ({error.strerror or error}); the JSON is printed above"
            ) from None


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)
