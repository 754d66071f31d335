"""Training a Perceiver AR on a built dataset, on one process or data-parallel under torchrun.

Each example is a window of up to max_seq_len tokens: a prefix of random length (0..max_prefix_len,
one draw per batch since the model takes one prefix length) and `latents` positions whose next
tokens carry the loss. Windows are cut from the rank's pieces read back to back (see WindowSampler).

Checkpoints hold model, optimiser, scheduler, step and every RNG (torch, numpy sampler, per rank),
so `--resume` continues exactly as if the run had never stopped.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomllib
import torch
import torch.nn.functional as F

from liveperceiver import vocab
from liveperceiver.augment import AugmentConfig, augment_tokens
from liveperceiver.dataset import TokenDataset
from liveperceiver.errors import UserError
from liveperceiver.model import PerceiverAR, PerceiverARConfig

CHECKPOINT = "checkpoint.pt"
OPENING_PREFIX_MAX = 32  # prefix tokens at most in an opening batch
LOG = "log.csv"
LOG_FIELDS = ["step", "tokens", "elapsed_s", "lr", "loss", "val_loss", "tokens_per_s"]


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
    shippable_only: bool = True  # train only on pieces whose licence allows shipping the weights
    val_every: int = 250
    val_windows: int = 64
    checkpoint_every_s: float = 180.0
    log_every: int = 10
    init_from: str = ""  # fine-tune: start from this model's weights (path or name), fresh optimiser
    opening_share: float = 0.0  # share of batches cut from pieces' openings with a short prefix (see WindowSampler)


@dataclass
class RunConfig:
    model: PerceiverARConfig
    train: TrainConfig
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise UserError(f"{path}: cannot read training config ({error})") from None
        try:
            train = dict(values.get("train", {}))
            if "betas" in train:
                train["betas"] = tuple(train["betas"])
            augment = values.get("augment", {})
            return cls(
                model=PerceiverARConfig.from_dict(values.get("model", {})),
                train=TrainConfig(**train),
                augment=None
                if augment.get("enabled") is False
                else AugmentConfig.from_dict({k: v for k, v in augment.items() if k != "enabled"}),
            )
        except (TypeError, ValueError) as error:
            raise UserError(f"{path}: invalid training config ({error})") from None


# --------------------------------------------------------------------------- batches


class WindowSampler:
    """Random training windows from one rank's shard of the training pieces, reproducible from its RNG.

    The shard's pieces are read as one stream (like a live session moving from tune to tune), so every
    window is full of real tokens and long prefixes are real context, never padding.
    """

    def __init__(
        self,
        data: TokenDataset,
        pieces: list[int],
        augment: AugmentConfig | None,
        seed: int,
        opening_share: float = 0.0,
    ):
        if not pieces:
            raise UserError(f"{data.directory}: no training pieces for this rank")
        self.data, self.pieces, self.augment = data, pieces, augment
        self.opening_share = opening_share
        self.starts = np.cumsum([0] + [data.pieces[i]["length"] for i in pieces])
        self.rng = np.random.default_rng(seed)

    def stream(self, position: int, count: int) -> list[int]:
        """`count` tokens of the shard stream from `position`, wrapping around at its end."""
        out: list[int] = []
        total = int(self.starts[-1])
        position %= total
        while len(out) < count:
            k = int(np.searchsorted(self.starts, position, side="right")) - 1
            piece = self.data.piece(self.pieces[k])
            offset = position - int(self.starts[k])
            chunk = piece[offset : offset + count - len(out)]
            out.extend(int(t) for t in chunk)
            position = (position + len(chunk)) % total
        return out

    def window(self, prefix_len: int, latents: int, opening: bool = False) -> list[int]:
        """prefix_len + latents + 1 tokens (inputs and shifted targets), augmented as a whole; with
        `opening`, from the first token of a random piece (nothing before it, as a live session starts)."""
        need = prefix_len + latents + 1
        if opening:
            position = int(self.starts[int(self.rng.integers(0, len(self.pieces)))])
        else:
            position = int(self.rng.integers(0, int(self.starts[-1])))
        tokens = self.stream(position, need + latents // 2 + 32)  # a margin: augmenting may shorten
        if self.augment is not None:
            tokens = augment_tokens(tokens, self.augment, self.rng)
        tokens = tokens[:need]
        return tokens + [vocab.PAD] * (need - len(tokens))

    def batch(self, batch_size: int, max_prefix_len: int, latents: int) -> tuple[torch.Tensor, int]:
        """One prefix length per batch. An opening batch (share `opening_share`) starts every row at a
        piece's first token with a prefix of at most OPENING_PREFIX_MAX, so the latents learn to
        predict from almost no context; a uniform 0..max_prefix_len draw nearly never does that."""
        opening = self.opening_share > 0 and bool(self.rng.random() < self.opening_share)
        prefix_len = int(
            self.rng.integers(0, (min(max_prefix_len, OPENING_PREFIX_MAX) if opening else max_prefix_len) + 1)
        )
        rows = [self.window(prefix_len, latents, opening) for _ in range(batch_size)]
        return torch.tensor(rows, dtype=torch.long), prefix_len

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def eval_windows(
    data: TokenDataset, max_seq_len: int, max_prefix_len: int, limit: int | None, latents: int | None = None
) -> list[tuple[list[int], int]]:
    """Deterministic scoring windows as in training: each piece cut into spans of up to `latents`
    targets (default max_latents), each with up to max_prefix_len tokens of real context before it.
    Returns (tokens, prefix_len)."""
    latents = latents or max_seq_len - max_prefix_len
    windows = []
    for i in range(len(data)):
        piece = [int(t) for t in data.piece(i)]
        for target_start in range(1, len(piece), latents):
            end = min(len(piece), target_start + latents)
            begin = max(0, target_start - 1 - max_prefix_len)
            windows.append((piece[begin:end], target_start - 1 - begin))
    if limit is not None and len(windows) > limit:  # spread over the whole split, not its first pieces
        windows = [windows[i] for i in np.linspace(0, len(windows) - 1, limit).round().astype(int)]
    return windows


def window_nll(model: PerceiverAR, tokens: list[int], prefix_len: int) -> torch.Tensor:
    """Per-target NLL (nats) of the latent positions of one window: targets tokens[prefix_len+1:]."""
    x = torch.tensor([tokens[:-1]], dtype=torch.long)
    logits = model(x, prefix_len)[0].float()
    targets = torch.tensor(tokens[prefix_len + 1 :], dtype=torch.long)
    return F.cross_entropy(logits, targets, reduction="none")


@torch.no_grad()
def validate(model: PerceiverAR, windows: list[tuple[list[int], int]], bf16: bool = False) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for tokens, prefix_len in windows:
            nll = window_nll(model, tokens, prefix_len)
            total += float(nll.sum())
            count += len(nll)
    model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- the loop


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up then cosine decay to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _init_weights(model: PerceiverAR, spec: str, config: PerceiverARConfig) -> None:
    """Copy a trained model's weights into a new run (a fine-tune); its architecture must match."""
    from liveperceiver.checkpoint import load_model

    source = load_model(spec).model
    mine, theirs = config.to_dict(), source.config.to_dict()
    differ = sorted(k for k in mine if k in theirs and mine[k] != theirs[k] and not k.endswith("dropout"))
    if differ:
        raise UserError(f"init_from {spec}: its model config differs in {', '.join(differ)}")
    model.load_state_dict(source.state_dict())


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bfloat16 autocast pays (measured 1.5-2x faster than float32 on an
    AVX512-BF16 EPYC; on an AVX2-only one the emulation made a step about 10x slower)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _record_rank_checksums(model: PerceiverAR, out: Path, rank: int, world: int) -> None:
    """Per-rank parameter checksums in ranks.json: data-parallel ranks must hold identical weights."""
    import json

    import torch.distributed as dist

    with torch.no_grad():
        mine = [float(p.double().sum()) + float(p.double().square().sum()) for p in model.parameters()]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        (out / "ranks.json").write_text(json.dumps({"world_size": world, "checksums": gathered}) + "\n")


def train(
    run: RunConfig, data_dir: Path, out: Path, resume: bool = False, max_steps: int | None = None, progress: bool = True
) -> dict:
    """Train until max_steps (config or override); returns {"step", "val_loss", "best_val_loss"}."""
    from tqdm import tqdm

    from liveperceiver.checkpoint import save_directory

    rank, world = _distributed()
    cfg = run.train
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    stop_step = max_steps if max_steps is not None else cfg.max_steps

    train_data = TokenDataset(data_dir, "train", cfg.shippable_only)
    val_data = TokenDataset(data_dir, "validation", cfg.shippable_only)
    shard = list(range(rank, len(train_data), world))  # each rank its own pieces
    sampler = WindowSampler(train_data, shard, run.augment, cfg.seed * 1000 + rank, cfg.opening_share)
    latents = cfg.latents or run.model.max_latents
    bf16 = cfg.bf16 and cpu_has_native_bf16()
    if cfg.bf16 and not bf16 and rank == 0:
        print(
            "warning: bf16 = true, but this CPU has no native bfloat16 (emulated, ~10x slower): float32",
            file=sys.stderr,
        )
    # validated on windows of the trained latent count, so a small-window fine-tune is judged as it plays
    val = eval_windows(val_data, run.model.max_seq_len, run.model.max_prefix_len, cfg.val_windows, latents)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = PerceiverAR(run.model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    step, tokens_seen, elapsed, best_val = 0, 0, 0.0, float("inf")

    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise UserError(f"{out}: no {CHECKPOINT} to resume from")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own file
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed_s"]
        best_val = state.get("best_val_loss", best_val)
        ranks = state["ranks"]
        if len(ranks) != world:
            raise UserError(f"{ckpt_path}: saved with {len(ranks)} ranks, resuming with {world}")
        sampler.set_state(ranks[rank]["sampler"])
        torch.set_rng_state(ranks[rank]["torch"])
    else:
        if cfg.init_from:
            _init_weights(model, cfg.init_from, run.model)
        torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank prefix dropout

    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
    model.train()

    def save_checkpoint() -> None:
        rank_state = {"sampler": sampler.state(), "torch": torch.get_rng_state()}
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
            inputs, targets = tokens[:, :-1], tokens[:, prefix_len + 1 :]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = ddp(inputs, prefix_len)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=vocab.PAD)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            n_targets = int((targets != vocab.PAD).sum()) * world
            tokens_seen += n_targets
            window_tokens += n_targets
            elapsed += time.monotonic() - t0

            if step % cfg.val_every == 0 or step == stop_step:
                val_loss = validate(model, val, bf16) if val else float("nan")
                if rank == 0 and val_loss < best_val:
                    best_val = val_loss
                    save_directory(model, out / "best", extra={"step": step, "val_loss": val_loss})
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

                flag = torch.tensor([int(due)])
                dist.broadcast(flag, 0)
                due = bool(flag.item())
            if due:
                save_checkpoint()
                last_ckpt = time.monotonic()
        save_checkpoint()
        if world > 1:
            _record_rank_checksums(model, out, rank, world)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    return {"step": step, "val_loss": val_loss, "best_val_loss": best_val, "tokens_seen": tokens_seen}


def run_train(args) -> None:
    run = RunConfig.load(args.config)
    result = train(run, args.data, args.out, resume=args.resume, max_steps=args.max_steps, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"step {result['step']}, {result['tokens_seen']:,} tokens, validation loss {result['val_loss']:.4f} "
            f"(best {result['best_val_loss']:.4f}) -> {args.out}"
        )


def export_best(
    run_dir: str | Path, model_dir: str | Path, dtype: torch.dtype = torch.float32, which: str = "best"
) -> dict:
    """Copy a run's weights (`best`: best validation loss; `last`: the latest checkpoint) to a
    shippable `models/<name>/` directory, adding the training figures (step, tokens seen, wall time)
    from the run's checkpoint and CSV log to config.json."""
    import json

    from liveperceiver.checkpoint import build_model, load_directory, save_directory

    run_dir, model_dir = Path(run_dir), Path(model_dir)
    if which == "last":
        state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)  # our own file
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
