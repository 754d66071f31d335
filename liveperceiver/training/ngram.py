"""The n-gram baseline of `eval`: an interpolated Kneser-Ney model over token ids, fitted on a
dataset's train split and scored on the same targets as the model, so "x% below the baseline" says
what the Perceiver's long context buys over local statistics. (The live session cache, session_cache.py,
is the same estimator kept incrementally.)"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from liveperceiver.core import vocab


class KneserNey:
    """Interpolated Kneser-Ney n-gram model over token ids (discount 0.75, uniform floor)."""

    def __init__(self, order: int = 4, discount: float = 0.75, vocab_size: int = vocab.VOCAB_SIZE):
        self.order, self.discount, self.vocab_size = order, discount, vocab_size
        self.counts: list[Counter] = [Counter() for _ in range(order + 1)]  # n -> (history + w) counts
        self.history_totals: list[Counter] = [Counter() for _ in range(order + 1)]
        self.history_types: list[Counter] = [Counter() for _ in range(order + 1)]

    def fit(self, pieces) -> KneserNey:
        """Top order: real counts; lower orders: continuation counts (distinct one-token left extensions)."""
        real: list[Counter] = [Counter() for _ in range(self.order + 1)]
        for piece in pieces:
            seq = [int(t) for t in piece]
            for n in range(1, self.order + 1):
                real[n].update(zip(*(seq[k:] for k in range(n)), strict=False))
        self.counts[self.order] = real[self.order]
        for n in range(1, self.order):
            self.counts[n] = Counter(gram[1:] for gram in real[n + 1])
        self.successors: list[dict] = [{} for _ in range(self.order + 1)]  # history -> (tokens, counts)
        for n in range(1, self.order + 1):
            grouped: dict[tuple, list[tuple[int, int]]] = {}
            for gram, count in self.counts[n].items():
                self.history_totals[n][gram[:-1]] += count
                self.history_types[n][gram[:-1]] += 1
                grouped.setdefault(gram[:-1], []).append((gram[-1], count))
            for history, pairs in grouped.items():
                tokens, counts = zip(*pairs, strict=True)
                self.successors[n][history] = (np.array(tokens), np.array(counts, dtype=np.float64))
        return self

    def distribution(self, history: tuple[int, ...]) -> np.ndarray:
        """P(t | history) for every token t: each order interpolates its discounted counts with the
        order below, from a uniform floor up to the longest history seen in training."""
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for n in range(1, self.order + 1):
            if n - 1 > len(history):
                break
            h = history[len(history) - (n - 1) :] if n > 1 else ()
            total = self.history_totals[n].get(h, 0)
            if total == 0:
                break  # a longer history was never seen either
            tokens, counts = self.successors[n][h]
            discounted = np.zeros(self.vocab_size)
            discounted[tokens] = np.maximum(counts - self.discount, 0.0)
            p = discounted / total + self.discount * self.history_types[n][h] / total * p
        return p

    def sample(self, prompt: list[int], length: int, rng: np.random.Generator) -> list[int]:
        """Continue `prompt` by `length` tokens drawn from the model (temperature 1, no guards)."""
        seq = [int(t) for t in prompt]
        for _ in range(length):
            p = self.distribution(tuple(seq[max(0, len(seq) - self.order + 1) :]))
            seq.append(int(rng.choice(self.vocab_size, p=p / p.sum())))
        return seq[len(prompt) :]

    def prob(self, history: tuple[int, ...], token: int) -> float:
        return float(self.distribution(history)[token])

    def nll(self, piece) -> np.ndarray:
        """NLL (nats) of tokens 1.. of a piece, each given up to order-1 previous tokens of the piece."""
        seq = [int(t) for t in piece]
        out = np.empty(max(len(seq) - 1, 0))
        for i in range(1, len(seq)):
            out[i - 1] = -math.log(self.prob(tuple(seq[max(0, i - self.order + 1) : i]), seq[i]))
        return out
