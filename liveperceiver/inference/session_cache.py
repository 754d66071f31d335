"""The session cache: a causal interpolated Kneser-Ney n-gram of the session's own tokens, kept in
step with the stream (adapt.py mixes it into the model's distribution).

It is `eval`'s baseline n-gram (training.ngram.KneserNey: interpolated Kneser-Ney, discount 0.75,
continuation counts below the top order, a uniform floor) over the last WINDOW tokens, updated token
by token: a push adds the counts of the n-grams ending at the new token and drops those starting
where the window left off (O(order) dictionary updates), a truncate does the reverse, newest first.
Counts are integers in units of 1/UNIT of an occurrence, so a rollback restores exactly the counts
of the tokens kept (no float drift however often the live session rolls its look-ahead back), and
tokens the model sampled itself can count for less than the player's (`own_weight`, in steps of
1/UNIT). With fractional counts the discount of a count c is min(c, D) (for whole counts: D, as
Kneser-Ney has it), so every level stays a distribution.

Threads: owned by the engine's thread (Engine keeps it in step with its stream).
"""

from __future__ import annotations

import numpy as np

from liveperceiver.core import vocab

UNIT = 8  # one occurrence of an n-gram, in count units (own tokens may count 0..UNIT units)
ORDER = 12  # validation: 4 to 16 all help performances alike; longer orders keep helping scores (repeats)
WINDOW = 8192  # tokens the cache remembers (a few minutes of playing): bounds memory (~25 MB) and time
DISCOUNT = 0.75  # Kneser-Ney's usual absolute discount, as training.ngram.KneserNey
OWN_WEIGHT = 1.0  # how much a token the model sampled counts, against the player's 1 (chosen by measurement)
SIZE = vocab.PAD  # the cache predicts real events only (ids 0..387); a pad in a stream counts for nothing


BASE = vocab.VOCAB_SIZE + 1  # a sequence's key: its tokens as digits token + 1 in this base, the last the lowest
TOTAL, MASS = -1, -2  # a history's record keeps its total and discounted mass beside its counts, under these ids


class SessionCache:
    """A causal interpolated Kneser-Ney n-gram over the last `window` tokens of one stream, kept in
    step with it.

    `push` and `truncate` mirror Engine.append/step and Engine.truncate; `distribution` is the
    cache's P(next token) over the real events, `terms` the same as a discounted part and a
    back-off weight on the floor (so the floor can be the uniform one or the model itself). The
    counts are always exactly those of a Kneser-Ney model fitted on tokens[-window:] alone.

    A sequence of tokens is known by one integer, its key (BASE): the keys of the sequences ending
    at a position follow from the position before by one multiply-add each, so no tuple is built
    or hashed per n-gram. Everything counted is in dictionaries of integers, which the garbage
    collector keeps out of its lists (records as lists were in them: a full collection over a full
    window's 80,000 took 7-13 ms holding the GIL, a stall of every thread in a live session)."""

    def __init__(
        self, order: int = ORDER, own_weight: float = OWN_WEIGHT, discount: float = DISCOUNT, window: int = WINDOW
    ) -> None:
        if order < 1:
            raise ValueError(f"order {order} must be >= 1")
        if window < order:
            raise ValueError(f"window {window} must hold at least one n-gram of order {order}")
        if not 0.0 <= own_weight <= 1.0:
            raise ValueError(f"own_weight {own_weight} outside 0..1")
        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount {discount} outside (0, 1)")
        self.order, self.window = order, window
        self.own_units = round(own_weight * UNIT)
        self.discount = round(discount * UNIT)  # in units
        if self.own_units / UNIT != own_weight or self.discount / UNIT != discount:
            raise ValueError(f"own_weight and discount must be multiples of 1/{UNIT}")
        self.tokens: list[int] = []
        self.units: list[int] = []  # per token: how much the n-grams ending at it count
        self.reset()

    def reset(self) -> None:
        self.tokens.clear()
        self.units.clear()
        # per position (from `_keys_from`): the keys of the sequences ending there, of lengths 0..order
        # (rows of the last two windows are kept: a rollback and the window's far end read them)
        self._keys: list[tuple[int, ...]] = []
        self._keys_from = 0
        # history key -> record: {token: count, TOTAL: total, MASS: the sum of min(count, D)} in units,
        # for the order len(history) + 1: the top order holds real counts, lower orders continuation
        # counts (distinct one-token left extensions). One record per history: a push updates about
        # two dozen of them, so each costs one dictionary lookup.
        self.histories: dict[int, dict[int, int]] = {}
        # n-gram key -> real count, for the n-grams below the top order (n >= 2): the continuation counts come from them
        self.grams: dict[int, int] = {}
        # the counts of orders 1 and 2 less their discounts (max(count - D, 0)) as dense rows: their
        # contexts have hundreds of successors, and one vector operation reads a row faster than a
        # dictionary's scattered entries
        self.unigram_excess = np.zeros(SIZE)
        self.bigram_excess = np.zeros((vocab.VOCAB_SIZE, SIZE)) if self.order >= 2 else None

    def __len__(self) -> int:
        return len(self.tokens)

    # ------------------------------------------------------------------ the stream

    def push(self, token: int, sampled: bool = False) -> None:
        """Add one token; `sampled`: the model played it (it counts `own_weight`)."""
        length = len(self.tokens)
        if length >= self.window:  # the oldest token leaves: the n-grams it starts go with it
            self._starting_at(length - self.window, length, -1)
        self.tokens.append(token)
        self.units.append(self._units(token, sampled))
        self._add_keys(length)
        self._ending_at(length, max(0, length + 1 - self.window), 1)

    def _units(self, token: int, sampled: bool) -> int:
        """How much the n-grams ending at `token` count: the model's own tokens `own_units`; pad,
        which is not an event (nothing predicts it), nothing."""
        return 0 if not vocab.is_event(token) else self.own_units if sampled else UNIT

    def _add_keys(self, end: int) -> None:
        """The keys of the sequences ending at the token just appended at `end`."""
        digit = self.tokens[end] + 1
        before = self._row(end - 1)
        self._keys.append((0, *(key * BASE + digit for key in before[: self.order])))
        if len(self._keys) > 2 * (self.window + self.order):  # the older half is never read again
            drop = self.window + self.order
            del self._keys[:drop]
            self._keys_from += drop

    def _row(self, end: int) -> tuple[int, ...]:
        """The keys of the sequences ending at `end` (lengths 0..order; lengths beyond the stream's
        start repeat the whole prefix, and are never counted): kept, or made again from the tokens
        after a rollback reached further back than the kept rows."""
        if 0 <= end - self._keys_from < len(self._keys):
            return self._keys[end - self._keys_from]
        keys, key = [0], 0
        for back in range(self.order):
            if end - back >= 0:
                key += (self.tokens[end - back] + 1) * BASE**back
            keys.append(key)
        return tuple(keys)

    def extend(self, tokens, sampled=None) -> None:
        """Push `tokens` (`sampled[i]`: token i was the model's). Into an empty cache only the last
        `window` tokens are counted, so turning adaptation on late in a long session costs a window's
        pushes, not the whole session's."""
        flags = [False] * len(tokens) if sampled is None else [bool(flag) for flag in sampled]
        if not self.tokens and len(tokens) > self.window:
            first = len(tokens) - self.window
            self.tokens.extend(int(token) for token in tokens)
            self.units.extend(self._units(token, flag) for token, flag in zip(tokens, flags, strict=True))
            row = self._row(first - 1)
            self._keys_from = first - 1
            self._keys.append(row)
            for end in range(first, len(tokens)):
                self._add_keys(end)
                self._ending_at(end, first, 1)
            return
        for token, flag in zip(tokens, flags, strict=True):
            self.push(int(token), flag)

    def truncate(self, length: int) -> None:
        """Forget tokens from the end, newest first: exactly the reverse of their pushes."""
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"truncate length {length} outside 0..{len(self.tokens)}")
        if length == 0:
            self.reset()
            return
        for end in range(len(self.tokens) - 1, length - 1, -1):
            self._ending_at(end, max(0, end + 1 - self.window), -1)
            if end >= self.window:
                self._starting_at(end - self.window, end, 1)
            self.tokens.pop()
            self.units.pop()
            if end >= self._keys_from:
                self._keys.pop()
        if not self._keys:  # rolled back to or past the oldest kept row: keep the new end's
            row = self._row(length - 1)
            self._keys_from = length - 1
            self._keys.append(row)

    def _ending_at(self, end: int, first: int, sign: int) -> None:
        """Count (sign 1) or uncount (-1) the n-grams ending at `end` that start at `first` or later."""
        delta = sign * self.units[end]
        if not delta:
            return
        keys, before = self._row(end), self._row(end - 1)
        for n in range(1 if self.order == 1 else 2, self.order + 1):
            if end - n + 1 < first:
                break
            self._gram(n, keys, before, self.tokens[end], delta)

    def _starting_at(self, start: int, stop: int, sign: int) -> None:
        """Count or uncount the n-grams starting at `start` that end before `stop`."""
        for end in range(start + (0 if self.order == 1 else 1), min(stop, start + self.order)):
            delta = sign * self.units[end]
            if delta:
                self._gram(end - start + 1, self._row(end), self._row(end - 1), self.tokens[end], delta)

    def _gram(self, n: int, keys: tuple[int, ...], before: tuple[int, ...], token: int, delta: int) -> None:
        """Add `delta` units to the n-gram of length n ending in `token`: `keys` are those of the
        sequences ending at it, `before` those ending just before (its history's, n >= 2, or n = 1
        for a unigram cache)."""
        if n == self.order:
            old = self._add(n, before[n - 1], token, delta)
            if n == 1:
                return
        else:
            grams, gram = self.grams, keys[n]
            old = grams.get(gram, 0)
            if old + delta:
                grams[gram] = old + delta
            else:
                del grams[gram]
        # a left extension counts once (UNIT) for the order below, or its weight if it is less
        new = old + delta
        change = (new if new < UNIT else UNIT) - (old if old < UNIT else UNIT)
        if change:
            self._add(n - 1, before[n - 2], token, change)

    def _add(self, n: int, history: int, token: int, delta: int) -> int:
        """Change one count of order n (`history`: the key of its n - 1 tokens); returns the count before."""
        record = self.histories.get(history)
        if record is None:
            record = self.histories[history] = {TOTAL: 0, MASS: 0}
        old = record.get(token, 0)
        new = old + delta
        if new:
            record[token] = new
        else:
            del record[token]
        discount = self.discount
        if n == 1:
            self.unigram_excess[token] = new - discount if new > discount else 0
        elif n == 2:
            self.bigram_excess[history - 1, token] = new - discount if new > discount else 0
        total = record[TOTAL] + delta
        if total:
            record[TOTAL] = total
            record[MASS] += (new if new < discount else discount) - (old if old < discount else discount)
        else:
            del self.histories[history]
        return old

    def _levels(self) -> list[dict[int, int]]:
        """The records of each order from 1 up to the longest history the cache has seen."""
        length = len(self.tokens)
        keys, histories, levels = self._row(length - 1), self.histories, []
        for n in range(1, min(self.order, length + 1) + 1):
            record = histories.get(keys[n - 1])
            if record is None:
                break  # a longer history was never seen either
            levels.append(record)
        return levels

    # ------------------------------------------------------------------ probabilities

    def terms(self, weight: float = 1.0) -> tuple[np.ndarray, float]:
        """(weight * a, b): P_cache(t) = a[t] + b * floor(t) for any floor distribution (uniform: the
        cache alone). `a` is what the seen n-grams give after their discounts, `b` the mass they leave.
        Three array operations at most (each costs microseconds on caches cooled by a step's weights):
        the dense rows of orders 2 and 1 make `a`, then the few successors of each longer context are
        added one by one."""
        levels = self._levels()
        factors, back_off = [], 1.0  # each level's share, from the longest context down
        for record in reversed(levels):
            total = record[TOTAL]
            factors.append(weight * back_off / total)
            back_off *= record[MASS] / total
        factors.reverse()  # by order, from 1
        if len(levels) >= 2:
            a = factors[1] * self.bigram_excess[self.tokens[-1]]
            a += factors[0] * self.unigram_excess
        elif levels:
            a = factors[0] * self.unigram_excess
        else:
            a = np.zeros(SIZE)
        discount = self.discount
        for record, factor in zip(levels[2:], factors[2:], strict=True):
            for token, count in record.items():
                if count > discount and token >= 0:
                    a[token] += factor * (count - discount)
        return a, back_off

    def token_terms(self, token: int) -> tuple[float, float]:
        """`terms()` at one token: (a[token], b), in O(order) (eval scores only the true token)."""
        a, scale = 0.0, 1.0
        for record in reversed(self._levels()):
            total = record[TOTAL]
            a += scale * max(record.get(token, 0) - self.discount, 0) / total
            scale *= record[MASS] / total
        return a, scale

    def distribution(self) -> np.ndarray:
        """The cache alone: P(next token) over the 388 real events, with a uniform floor."""
        a, b = self.terms()
        return a + b / SIZE
