"""Windows of token streams, as the model sees them in training: random training windows
(`WindowSampler`, a rank's pieces read back to back) and deterministic scoring windows
(`piece_windows`, `eval_windows`), which training validates on and eval scores with (nll.py).

A window is (tokens, prefix_len): tokens[:prefix_len] the prefix, then latents whose next tokens
are the targets."""

from __future__ import annotations

import numpy as np
import torch

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError
from liveperceiver.training.augment import AugmentConfig, augment_tokens
from liveperceiver.training.dataset import TokenDataset

OPENING_PREFIX_MAX = 32  # prefix tokens at most in an opening batch


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
        score_share: float = 0.0,
    ):
        if not pieces:
            raise UserError(f"{data.directory}: no training pieces for this rank")  # train() says why first
        self.data, self.pieces, self.augment = data, pieces, augment
        self.opening_share = opening_share
        self.starts = np.cumsum([0] + [data.pieces[i]["length"] for i in pieces])
        self.rng = np.random.default_rng(seed)
        # the shard's plain scores (everything but rendered performances), drawn by length for score batches
        scores = [k for k, i in enumerate(pieces) if not data.pieces[i].get("rendition")]
        self.score_share = score_share if scores else 0.0
        self.score_pieces = np.array(scores, dtype=np.int64)
        self.score_ends = np.cumsum([int(self.starts[k + 1] - self.starts[k]) for k in scores])

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

    def window(self, prefix_len: int, latents: int, opening: bool = False, score: bool = False) -> list[int]:
        """prefix_len + latents + 1 tokens (inputs and shifted targets), augmented as a whole; with
        `opening`, from the first token of a random piece (nothing before it, as a live session starts);
        with `score`, the first target is a token of a plain score (its prefix is the stream before it)."""
        need = prefix_len + latents + 1
        if opening:
            position = int(self.starts[int(self.rng.integers(0, len(self.pieces)))])
        elif score:
            drawn = int(self.rng.integers(0, int(self.score_ends[-1])))
            k = int(np.searchsorted(self.score_ends, drawn, side="right"))
            offset = drawn - (int(self.score_ends[k - 1]) if k else 0)
            position = int(self.starts[int(self.score_pieces[k])]) + offset - prefix_len
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
        score = not opening and self.score_share > 0 and bool(self.rng.random() < self.score_share)
        rows = [self.window(prefix_len, latents, opening, score) for _ in range(batch_size)]
        return torch.tensor(rows, dtype=torch.long), prefix_len

    def state(self) -> dict:
        """The generator's state as plain values (PCG64: a dict of ints and its name), which
        `torch.load(weights_only=True)` reads back without unpickling any object."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def piece_windows(piece: list[int], max_prefix_len: int, latents: int) -> list[tuple[list[int], int]]:
    """Deterministic scoring windows of one piece, as in training: its tokens 1.. cut into spans of
    up to `latents` targets, each with up to max_prefix_len tokens of real context before it."""
    windows = []
    for target_start in range(1, len(piece), latents):
        end = min(len(piece), target_start + latents)
        begin = max(0, target_start - 1 - max_prefix_len)
        windows.append((piece[begin:end], target_start - 1 - begin))
    return windows


def eval_windows(
    data: TokenDataset, max_seq_len: int, max_prefix_len: int, limit: int | None, latents: int | None = None
) -> list[tuple[list[int], int]]:
    """`piece_windows` of every piece of a split, with `latents` targets each (default max_latents);
    at most `limit` of them, spread over the whole split."""
    latents = latents or max_seq_len - max_prefix_len
    windows = []
    for i in range(len(data)):
        windows += piece_windows([int(t) for t in data.piece(i)], max_prefix_len, latents)
    if limit is not None and len(windows) > limit:  # spread over the whole split, not its first pieces
        windows = [windows[i] for i in np.linspace(0, len(windows) - 1, limit).round().astype(int)]
    return windows
