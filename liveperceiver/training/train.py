"""Training a Perceiver AR on a built dataset, on one process or data-parallel under torchrun.

On the device `--device` names (auto: cuda, then mps, then the CPU). Under torchrun on CUDA each rank
trains on its own GPU, cuda:LOCAL_RANK, and the ranks talk over NCCL; on the CPU over gloo (devices.py).

Each example is a window of up to max_seq_len tokens: a prefix of random length (0..max_prefix_len,
one draw per batch since the model takes one prefix length) and `latents` positions whose next
tokens carry the loss. Windows are cut from the rank's pieces read back to back (windows.WindowSampler).

Checkpoints hold model, optimiser, scheduler, step and every RNG (torch, numpy sampler, per rank),
so `--resume` continues exactly as if the run had never stopped. They hold tensors and plain values
only (the numpy generator's state is a dict of ints and strings) and are read back with
`torch.load(weights_only=True)`: a checkpoint file can not run code.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
import torch
import torch.nn.functional as F

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError
from liveperceiver.core.model import PerceiverAR, PerceiverARConfig
from liveperceiver.runtime import set_torch_threads
from liveperceiver.training.augment import AugmentConfig
from liveperceiver.training.dataset import TokenDataset, selection_report
from liveperceiver.training.devices import exit_rank, join_ranks, native_bf16, record_rank_checksums, training_device
from liveperceiver.training.nll import windows_nll
from liveperceiver.training.windows import WindowSampler, eval_windows

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
LOG_FIELDS = ["step", "tokens", "elapsed_s", "lr", "loss", "val_loss", "tokens_per_s"]
RUN_FILES = (CHECKPOINT, LOG, "best", "ranks.json")  # what a run writes into its folder


@dataclass
class TrainConfig:
    batch_size: int = 8
    latents: int = 0  # loss positions per window; 0 = the model's max_latents
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 200
    max_steps: int = 20000
    grad_clip: float = 1.0
    bf16: bool = False  # autocast on CPU; ignored (with a warning) where the CPU has no native bfloat16
    seed: int = 0
    threads: int = 1  # torch threads per process
    # train only on pieces whose licence allows shipping the weights (`--shippable-only`): for the
    # models we ship; a user's own MIDI is marked not shippable and trains by default
    shippable_only: bool = False
    val_every: int = 250
    val_windows: int = 64
    checkpoint_every_s: float = 180.0
    log_every: int = 10
    init_from: str = ""  # fine-tune: start from this model's weights (path or name), fresh optimiser
    opening_share: float = 0.0  # share of batches cut from pieces' openings with a short prefix (see WindowSampler)
    # share of batches whose targets lie in plain scores, not their rendered performances (`dataset build
    # --render`); 0: windows fall anywhere, so renditions (longer, and N per score) dominate
    score_share: float = 0.0


@dataclass
class RunConfig:
    model: PerceiverARConfig
    train: TrainConfig
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise UserError(f"{path}: cannot read training config ({error})") from None
        for table in values:
            if table not in ("model", "train", "augment"):
                raise UserError(f"{path}: unknown table [{table}] (known: [model], [train], [augment])")
            if not isinstance(values[table], dict):
                raise UserError(f"{path}: {table} must be a table, [{table}]")
        augment = dict(values.get("augment", {}))
        enabled = augment.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise UserError(f"{path}: [augment] enabled = {enabled!r} must be true or false")
        _check_types(path, "model", values.get("model", {}), PerceiverARConfig)
        _check_types(path, "train", values.get("train", {}), TrainConfig)
        _check_types(path, "augment", augment, AugmentConfig)
        try:
            train = dict(values.get("train", {}))
            if "betas" in train:
                train["betas"] = tuple(train["betas"])
            run = cls(
                model=PerceiverARConfig.from_dict(values.get("model", {})),
                train=TrainConfig(**train),
                augment=AugmentConfig.from_dict(augment) if enabled else None,
            )
        except (TypeError, ValueError) as error:
            raise UserError(f"{path}: invalid training config ({error})") from None
        _check_ranges(path, run)
        return run


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_types(path: Path, table: str, values: dict, cls: type) -> None:
    """Every key a setting of `cls` and every value of its type, so a typo or a quoted number gets one
    line naming the file, the key and the type wanted (not an error from deep inside the model)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{path}: [{table}] {key} is not a setting (known: {', '.join(sorted(hints))})")
        want = hints[key]
        if typing.get_origin(want) is tuple:  # betas: two numbers
            size = len(typing.get_args(want))
            ok = isinstance(value, list) and len(value) == size and all(_is(v, float) for v in value)
            name = f"a list of {size} numbers"
        else:
            ok, name = _is(value, want), _TYPE_NAMES.get(want, str(want))
        if not ok:
            raise UserError(f"{path}: [{table}] {key} = {value!r} must be {name}")


def _is(value, want: type) -> bool:
    if want is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def _check_ranges(path: Path, run: RunConfig) -> None:
    """Counts and shares within the values that train at all (a negative step count trains nothing)."""
    t, m = run.train, run.model
    rules = [
        ("train", "batch_size", t.batch_size >= 1, ">= 1"),
        ("train", "max_steps", t.max_steps >= 1, ">= 1"),
        ("train", "warmup_steps", t.warmup_steps >= 0, ">= 0"),
        ("train", "val_every", t.val_every >= 1, ">= 1"),
        ("train", "val_windows", t.val_windows >= 1, ">= 1"),
        ("train", "log_every", t.log_every >= 1, ">= 1"),
        ("train", "threads", t.threads >= 1, ">= 1"),
        ("train", "seed", t.seed >= 0, ">= 0"),
        ("train", "latents", 0 <= t.latents <= m.max_latents, f"0 (the model's max_latents) .. {m.max_latents}"),
        ("train", "lr", t.lr > 0, "> 0"),
        ("train", "min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "0 .. 1"),
        ("train", "weight_decay", t.weight_decay >= 0, ">= 0"),
        ("train", "betas", all(0 <= b < 1 for b in t.betas), "two numbers in 0 .. 1 (1 excluded)"),
        ("train", "grad_clip", t.grad_clip > 0, "> 0"),
        ("train", "checkpoint_every_s", t.checkpoint_every_s > 0, "> 0"),
        ("train", "opening_share", 0 <= t.opening_share <= 1, "0 .. 1"),
        ("train", "score_share", 0 <= t.score_share <= 1, "0 .. 1"),
    ]
    for key in ("max_seq_len", "max_latents", "num_channels", "num_heads", "num_self_attention_layers"):
        rules.append(("model", key, getattr(m, key) >= 1, ">= 1"))
    for key in ("cross_attention_dropout", "post_attention_dropout", "residual_dropout"):
        rules.append(("model", key, 0 <= getattr(m, key) < 1, "0 .. 1 (1 excluded)"))
    if run.augment is not None:
        a = run.augment
        rules += [
            ("augment", "probability", 0 <= a.probability <= 1, "0 .. 1"),
            ("augment", "expressive_probability", 0 <= a.expressive_probability <= 1, "0 .. 1"),
            ("augment", "transpose", a.transpose >= 0, ">= 0"),
            ("augment", "tempo", 0 <= a.tempo < 1, "0 .. 1 (1 excluded)"),
            ("augment", "velocity_scale", 0 <= a.velocity_scale < 1, "0 .. 1 (1 excluded)"),
            ("augment", "velocity_jitter", a.velocity_jitter >= 0, ">= 0"),
            ("augment", "onset_jitter_ms", a.onset_jitter_ms >= 0, ">= 0"),
        ]
    for table, key, ok, allowed in rules:
        if not ok:
            value = getattr({"train": t, "model": m, "augment": run.augment}[table], key)
            raise UserError(f"{path}: [{table}] {key} = {value!r} is outside the allowed values ({allowed})")


def validate(model: PerceiverAR, windows: list[tuple[list[int], int]], bf16: bool = False) -> float:
    """Mean NLL per target over the validation windows (nll.windows_nll, the loop eval scores with)."""
    nlls = windows_nll(model, windows, bf16)
    return sum(float(nll.sum()) for nll in nlls) / max(sum(len(nll) for nll in nlls), 1)


# --------------------------------------------------------------------------- the loop


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up then cosine decay to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _init_weights(model: PerceiverAR, spec: str, config: PerceiverARConfig) -> None:
    """Copy a trained model's weights into a new run (a fine-tune); its architecture must match."""
    from liveperceiver.core.checkpoint import load_model

    source = load_model(spec).model
    mine, theirs = config.to_dict(), source.config.to_dict()
    differ = sorted(k for k in mine if k in theirs and mine[k] != theirs[k] and not k.endswith("dropout"))
    if differ:
        raise UserError(f"init_from {spec}: its model config differs in {', '.join(differ)}")
    model.load_state_dict(source.state_dict())


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A run's checkpoint.pt, read with `weights_only=True`: tensors and plain values only, so a file
    carrying pickled code is refused (one line) before any of it runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the weights-only reader's refusal, or a truncated or corrupt file
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        if "Weights only load failed" in lines[0]:
            why = next((line for line in lines if "GLOBAL" in line or "nsupported" in line), "refused by the reader")
            raise UserError(
                f"{path}: refused: it holds objects other than tensors and plain values, which could run code "
                f"({why.split('. ')[0].rstrip('.')})"
            ) from None
        raise UserError(f"{path}: cannot read checkpoint ({type(error).__name__}: {lines[0]})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "step", "ranks"} <= set(state):
        raise UserError(f"{path}: not a LivePerceiver training checkpoint (no model/optimizer/step)")
    return state


def _check_run_folder(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """Refuse to write over a run unless told (--resume continues it, --overwrite replaces it);
    returns the run files found. Read-only, so every rank can check before any rank writes."""
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (a run is written as a folder)")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if resume and not (out / CHECKPOINT).is_file():
        raise UserError(f"{out}: no {CHECKPOINT} to resume from")
    if found and not resume and not overwrite:
        raise UserError(
            f"{out} already holds a training run ({', '.join(found)}): continue it with --resume, "
            "or replace it with --overwrite"
        )
    return found


def _clear_run(out: Path, found: list[str]) -> None:
    """--overwrite: remove the old run's files (only those a run writes), so no stale best/ survives."""
    for name in found:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _check_resumed(state: dict, path: Path, run: RunConfig, world: int) -> None:
    """A checkpoint resumes only the run it came from: same model shape, data selection and rank count."""
    saved, mine = state.get("model_config", {}), run.model.to_dict()
    differ = [k for k in mine if k in saved and saved[k] != mine[k] and not k.endswith("dropout")]
    if differ:
        changes = ", ".join(f"{k} {saved[k]} in the run, {mine[k]} in this config" for k in differ)
        raise UserError(f"{path}: the run has another model config ({changes}); resume it with its own config")
    if "shippable_only" in state and bool(state["shippable_only"]) != run.train.shippable_only:
        how = "with" if state["shippable_only"] else "without"
        raise UserError(f"{path}: the run started {how} --shippable-only (shippable_only); resume it the same way")
    if len(state["ranks"]) != world:
        raise UserError(f"{path}: saved with {len(state['ranks'])} ranks, resuming with {world}")


def _report_data(data_dir: Path, shippable_only: bool, rank: int, world: int) -> None:
    """Refuse a run with nothing to train on, saying why (one line); then print what the run trains
    on and leaves out (per source and split), and warn when no piece validates."""
    lines, totals = selection_report(data_dir, shippable_only)
    train_pieces = totals[("train", "used")][0]
    licence = sum(totals[(split, "licence")][0] for split in ("train", "validation"))
    if train_pieces == 0:
        everything = sum(pieces for pieces, _ in totals.values())
        held = totals[("test", "evaluation")][0]  # evaluation-only pieces (a build puts them all in test)
        short = sum(totals[(split, "short")][0] for split in ("train", "validation", "test"))
        why = (
            f": {totals[('train', 'licence')][0]:,} left out as not shippable by --shippable-only"
            if totals[("train", "licence")][0]
            else f": an evaluation set ({held:,} pieces held out for `liveperceiver eval`, never trained on)"
            if held and held + short == everything
            else f" (the dataset holds {everything:,} pieces in all)"
        )
        raise UserError(f"{data_dir}: no pieces in the train split{why}")
    if train_pieces < world:
        raise UserError(f"{data_dir}: {train_pieces} train pieces for {world} ranks: each rank needs at least one")
    if rank != 0:
        return
    print("\n".join(lines), file=sys.stderr)
    if licence:
        print(
            f"warning: --shippable-only left out {licence:,} train/validation pieces whose licence does not "
            "allow shipping the weights (a user's own MIDI is marked so): drop the flag to train on them",
            file=sys.stderr,
        )
    if totals[("validation", "used")][0] == 0:
        print(
            f"warning: {data_dir} has no validation pieces: validation loss is not measured and best/ "
            "holds the latest model",
            file=sys.stderr,
        )


def train(
    run: RunConfig,
    data_dir: Path,
    out: Path,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "auto",
) -> dict:
    """Train until max_steps (config or override); returns {"step", "val_loss", "best_val_loss"}.
    An existing run in `out` is continued only with `resume` and replaced only with `overwrite`.
    `device`: auto (cuda, mps, then the CPU) or a device; under torchrun see `rank_device`."""
    from tqdm import tqdm

    from liveperceiver.core.checkpoint import save_directory

    found = _check_run_folder(out, resume, overwrite)  # before the rendezvous: no rank has written yet
    device = training_device(device)
    rank, world = join_ranks(device)
    cfg = run.train
    set_torch_threads(cfg.threads)  # oneDNN stays on: bfloat16 autocast needs it
    ckpt_path = out / CHECKPOINT
    state = load_checkpoint(ckpt_path) if resume else None  # refused before anything is written
    if state is not None:
        _check_resumed(state, ckpt_path, run, world)
    stop_step = max_steps if max_steps is not None else cfg.max_steps

    _report_data(data_dir, cfg.shippable_only, rank, world)
    train_data = TokenDataset(data_dir, "train", cfg.shippable_only)
    val_data = TokenDataset(data_dir, "validation", cfg.shippable_only)
    if rank == 0:
        if found and overwrite:
            _clear_run(out, found)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"{out}: cannot create the run folder ({error.strerror or error})") from None
    shard = list(range(rank, len(train_data), world))  # each rank its own pieces
    sampler = WindowSampler(train_data, shard, run.augment, cfg.seed * 1000 + rank, cfg.opening_share, cfg.score_share)
    latents = cfg.latents or run.model.max_latents
    bf16 = cfg.bf16 and native_bf16(device)
    if cfg.bf16 and not bf16 and rank == 0:
        where = (
            "this CPU has no native bfloat16 (emulated, ~10x slower)" if device.type == "cpu" else f"not on {device}"
        )
        print(f"warning: bf16 = true, but {where}: float32", file=sys.stderr)
    # validated on windows of the trained latent count, so a small-window fine-tune is judged as it plays
    val = eval_windows(val_data, run.model.max_seq_len, run.model.max_prefix_len, cfg.val_windows, latents)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = PerceiverAR(run.model).to(device)  # made on the CPU: the same weights on every device
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    step, tokens_seen, elapsed, best_val = 0, 0, 0.0, float("inf")

    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            sampler.set_state(state["ranks"][rank]["sampler"])
            torch.set_rng_state(state["ranks"][rank]["torch"])
            if device.type == "cuda" and "cuda" in state["ranks"][rank]:  # prefix dropout draws on the GPU
                torch.cuda.set_rng_state(state["ranks"][rank]["cuda"], device)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise UserError(f"{ckpt_path}: does not fit this run ({detail.strip()})") from None
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed_s"]
        best_val = state.get("best_val_loss", best_val)
    else:
        if cfg.init_from:
            _init_weights(model, cfg.init_from, run.model)
        torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank prefix dropout

    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    def save_checkpoint() -> None:
        rank_state = {"sampler": sampler.state(), "torch": torch.get_rng_state()}
        if device.type == "cuda":
            rank_state["cuda"] = torch.cuda.get_rng_state(device)
        ranks = [rank_state]
        if world > 1:
            import torch.distributed as dist

            ranks = [None] * world
            dist.all_gather_object(ranks, rank_state)
        if rank == 0:
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "elapsed_s": elapsed,
                    "best_val_loss": best_val,
                    "ranks": ranks,
                    "model_config": run.model.to_dict(),
                    "shippable_only": cfg.shippable_only,
                },
                ckpt_path,
            )

    log_file = None
    if rank == 0:
        new_log = not (out / LOG).is_file() or not resume
        log_file = open(out / LOG, "w" if new_log else "a", newline="")
        writer = csv.DictWriter(log_file, LOG_FIELDS)
        if new_log:
            writer.writeheader()
    bar = tqdm(
        total=stop_step, initial=step, desc="train", unit="step", disable=not progress or rank != 0, file=sys.stderr
    )
    last_ckpt, window_start, window_tokens, val_loss = time.monotonic(), time.monotonic(), 0, float("nan")
    try:
        while step < stop_step:
            t0 = time.monotonic()
            tokens, prefix_len = sampler.batch(cfg.batch_size, run.model.max_prefix_len, latents)
            # counted on the host, where the batch is made: no wait for the device
            n_targets = int((tokens[:, prefix_len + 1 :] != vocab.PAD).sum()) * world
            tokens = tokens.to(device)
            inputs, targets = tokens[:, :-1], tokens[:, prefix_len + 1 :]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = ddp(inputs, prefix_len)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=vocab.PAD)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            tokens_seen += n_targets
            window_tokens += n_targets
            elapsed += time.monotonic() - t0

            if step % cfg.val_every == 0 or step == stop_step:
                val_loss = validate(model, val, bf16) if val else float("nan")
                if rank == 0 and val_loss < best_val:
                    best_val = val_loss
                    save_directory(model, out / "best", extra={"step": step, "val_loss": val_loss})
                elif rank == 0 and not val:  # nothing to judge by: best/ is the latest, as the warning said
                    note = "no validation pieces: the latest model"
                    save_directory(model, out / "best", extra={"step": step, "val_loss": None, "note": note})
            if rank == 0 and (step % cfg.log_every == 0 or step == stop_step or step % cfg.val_every == 0):
                now = time.monotonic()
                speed = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                writer.writerow(
                    {
                        "step": step,
                        "tokens": tokens_seen,
                        "elapsed_s": round(elapsed, 1),
                        "lr": f"{scheduler.get_last_lr()[0]:.3g}",
                        "loss": f"{loss.item():.4f}",
                        "val_loss": f"{val_loss:.4f}" if step % cfg.val_every == 0 or step == stop_step else "",
                        "tokens_per_s": round(speed),
                    }
                )
                log_file.flush()
                bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_loss:.3f}", tok_s=f"{speed:.0f}")
            bar.update()
            due = time.monotonic() - last_ckpt > cfg.checkpoint_every_s
            if world > 1:  # rank 0's clock decides, so every rank joins the gather in save_checkpoint
                import torch.distributed as dist

                flag = torch.tensor([int(due)], device=device)  # NCCL broadcasts GPU tensors only
                dist.broadcast(flag, 0)
                due = bool(flag.item())
            if due:
                save_checkpoint()
                last_ckpt = time.monotonic()
        save_checkpoint()
        if world > 1:
            record_rank_checksums(model, out, rank, world)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    return {
        "step": step,
        "val_loss": val_loss,
        "best_val_loss": best_val,
        "tokens_seen": tokens_seen,
        "validated": bool(val),
    }


def run_train(args) -> None:
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps {args.max_steps} must be >= 1")
    run = RunConfig.load(args.config)
    run.train.shippable_only = run.train.shippable_only or args.shippable_only
    result = train(
        run,
        args.data,
        args.out,
        resume=args.resume,
        max_steps=args.max_steps,
        progress=not args.quiet,
        overwrite=args.overwrite,
        device=args.device,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        validation = (
            f"validation loss {result['val_loss']:.4f} (best {result['best_val_loss']:.4f})"
            if result["validated"]
            else "no validation pieces (best/ is the latest model)"
        )
        print(f"step {result['step']}, {result['tokens_seen']:,} tokens, {validation} -> {args.out}")
    exit_rank()


def export_best(
    run_dir: str | Path, model_dir: str | Path, dtype: torch.dtype = torch.float32, which: str = "best"
) -> dict:
    """Copy a run's weights (`best`: best validation loss; `last`: the latest checkpoint) to a
    shippable `models/<name>/` directory, adding the training figures (step, tokens seen, wall time)
    from the run's checkpoint and CSV log to config.json."""
    import json

    from liveperceiver.core.checkpoint import build_model, load_directory, save_directory

    run_dir, model_dir = Path(run_dir), Path(model_dir)
    if which == "last":
        state = load_checkpoint(run_dir / CHECKPOINT)
        model = build_model(PerceiverARConfig.from_dict(state["model_config"]), state["model"], str(run_dir))
        step, val_loss = state["step"], None
        seen, seconds = state["tokens_seen"], state["elapsed_s"]
    else:
        meta = json.loads((run_dir / "best" / "config.json").read_text())
        model, step, val_loss = load_directory(run_dir / "best"), meta.get("step"), meta.get("val_loss")
        rows = {int(r["step"]): r for r in csv.DictReader((run_dir / LOG).open())}
        row = rows.get(step, {})
        seen = int(row["tokens"]) if row else None
        seconds = float(row["elapsed_s"]) if row else None
    training = {"step": step, "val_loss": val_loss, "tokens_seen": seen, "train_seconds": seconds}
    save_directory(model, model_dir, dtype=dtype, extra={"training": training})
    return training
