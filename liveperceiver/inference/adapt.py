"""In-session adaptation: a cache model of the session itself, mixed into the model's distribution.

Why: music repeats itself, and a player's rhythms, voicings and dynamics are in the session long
before any model could have learnt them. A cache language model (Kuhn and De Mori, 1990; Grave,
Joulin and Usunier, 2017) estimates the next token from the history itself, mixed with the
network's distribution: the partner picks up what the player keeps doing within a few bars.

The cache is `eval`'s baseline n-gram (training.ngram.KneserNey: interpolated Kneser-Ney, discount
0.75, continuation counts below the top order, a uniform floor) over the session's own tokens,
updated token by token over the last WINDOW tokens: a push adds the counts of the n-grams ending at
the new token and drops those starting where the window left off (O(order) dictionary updates), a
truncate does the reverse, newest first. Counts are integers in units of
1/UNIT of an occurrence, so a rollback restores exactly the counts of the tokens kept (no float
drift however often the live session rolls its look-ahead back), and tokens the model sampled itself
can count for less than the player's (`own_weight`, in steps of 1/UNIT). With fractional counts the
discount of a count c is min(c, D) (for whole counts: D, as Kneser-Ney has it), so every level stays
a distribution.

The mix: the Kneser-Ney recursion of the cache bottoms out in the model's distribution instead of a
uniform floor, and that is mixed with the model at weight w:

    P = (1 - w) P_model + w (a + b P_model)

where `a` is what the n-grams seen in the session give the next token after their discounts and `b`
the probability mass they leave (1 when the current context was never seen): the cache's share
grows with how often it has seen the current context and how consistently it was continued.

The weight w is learnt in the session (`CacheWeight`): a posterior over candidate weights (`adapt`
times WEIGHTS), each judged by the probability its mix gave the player's tokens, with the older
tokens forgotten (FORGET per token: the last few dozen tokens count). P is linear in w, so the mix
at the posterior's mean weight is exactly the posterior's average of the candidates' mixes. Why:
how much the session predicts itself changes from player to player and from passage to passage (a
repeated figure, then new material), and a fixed weight fits one of them. On three sets dumped
from the live engine (piano-like, rendered-score validation, score test) the learnt weight beat
every fixed weight (chorale model card, "The learnt weight").

The session experts (experts.py) lean the next velocity and which note ends on the session.
The output layer learns at the same steps (dynamic.py).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from liveperceiver.core import vocab
from liveperceiver.inference.dynamic import DynamicOutput
from liveperceiver.inference.experts import EXPERT_SHARE, Expert, lean_on_experts, session_experts
from liveperceiver.inference.sampling import StreamState, host_to_device

UNIT = 8  # one occurrence of an n-gram, in count units (own tokens may count 0..UNIT units)
ORDER = 12  # validation: 4 to 16 all help performances alike; longer orders keep helping scores (repeats)
WINDOW = 8192  # tokens the cache remembers (a few minutes of playing): bounds memory (~25 MB) and time
DISCOUNT = 0.75  # Kneser-Ney's usual absolute discount, as training.ngram.KneserNey
OWN_WEIGHT = 1.0  # how much a token the model sampled counts, against the player's 1 (chosen by measurement)
# The cache's weight, learnt per session (CacheWeight): candidates as fractions of `adapt`, and how
# fast older tokens are forgotten (chosen on three validation sets: 0.95 to 0.98 all did well)
WEIGHTS = (0.0, 0.25, 0.5, 0.7, 0.85, 0.95, 1.0)
PRIOR_FRACTION = sum(WEIGHTS) / len(WEIGHTS)  # the weight before the session has said anything
FORGET = 0.95  # per observed token: a token 14 tokens back counts half
HISTORY = 4096  # judgements a rollback can undo (live rollbacks reach back a few dozen tokens)
STEPS_KEPT = 512  # steps remembered for judging a player's token (more than any look-ahead samples)
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
    or hashed per n-gram. Everything counted is a dictionary of integers, which the garbage
    collector never scans (records as lists were: a full collection over a full window's 80,000 of
    them took 8-13 ms holding the GIL, a stall of every thread in a live session)."""

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


# --------------------------------------------------------------------------- mixing with the model


def mixed_probability(p_model: np.ndarray, a: np.ndarray, b: np.ndarray, weight) -> np.ndarray:
    """The mix's probability of the true tokens, from the model's (`p_model`) and the cache's terms
    there (`SessionCache.token_terms`) at the cache's `weight` (per token or one):
    (1 - weight) p_model + weight (a + b p_model)."""
    return (1.0 - weight + weight * b) * p_model + weight * a


class CacheWeight:
    """The cache's weight in the mix, learnt in the session: a posterior over the candidate weights
    `adapt` x WEIGHTS, each scored by the probability its mix gave the player's tokens, older tokens
    forgotten by FORGET per token (module docstring). It starts uniform; where the cache has
    nothing to say (b = 1, a = 0) only the forgetting moves it (toward uniform).

    In `eval` every token is the player's and each is judged at the step that predicted it
    (`remember`, `observe`). In `play` the player's tokens mostly come where no step predicted them
    (while the engine waits, or after the first token of an entry into look-ahead): the engine judges
    those from its latent window's rows once it has run them (`judge_from_rows`; one latent keeps no
    rows). The model's own tokens are never judged (drawn from the mix itself); each ages the
    verdict as a token passing would (`fade`): a long answer drifts back to the prior's mean.

    Threads: owned by the engine's thread (Engine keeps it in step with its stream)."""

    def __init__(self) -> None:
        self._steps: dict[int, tuple] = {}  # position -> (model probabilities, hidden state) of the step there
        # the player's tokens no step predicted, to be judged from the engine's latent rows once they
        # are run (`judge_from_rows`): (position, token, the cache's a and b for it there); the oldest
        # leave at HISTORY (only the last window's can still get a row)
        self.deferred: deque[tuple[int, int, float, float]] = deque(maxlen=HISTORY)
        # (position judged, log posterior before it); the posterior is 7 plain floats: per token,
        # Python's arithmetic on them costs a third of numpy's calls (2.8 against 7.6 us, warm)
        self._history: deque[tuple[int, list[float]]] = deque(maxlen=HISTORY)
        self.reset()

    def reset(self) -> None:
        self._steps.clear()
        self.deferred.clear()
        self._history.clear()
        self._log_posterior = [0.0] * len(WEIGHTS)
        self.fraction = PRIOR_FRACTION  # the posterior's mean weight, as a fraction of `adapt`

    def remember(self, position: int, probs, hidden: torch.Tensor | None = None) -> None:
        """The step at stream `position`: the model's probabilities (numpy, or a device tensor read
        back at one token when a player's token is judged) and the logits' hidden state
        (dynamic.DynamicOutput learns at the same steps)."""
        self._steps[position] = (probs, hidden)
        if len(self._steps) > STEPS_KEPT:  # a long answer: the oldest step is far behind what plays
            del self._steps[next(iter(self._steps))]

    def predicted(self, position: int) -> tuple:
        """(the model's probabilities, the hidden state) of the step that predicted `position`, or Nones."""
        return self._steps.get(position, (None, None))

    def observe(self, position: int, token: int, adapt: float, cache: SessionCache) -> bool:
        """The player's `token` came at `position`: judge the candidates by it if a step predicted it
        there, by the cache's terms for it (`cache` holds the stream up to `position`, as it did at that
        step: a rollback restores its counts exactly). Every step remembered is dropped: those beyond
        it predicted another stream, and those before it are played (a later rollback that far back
        would leave them to the rows). False when no step predicted it (the engine may judge it later
        from its window's rows)."""
        step = self._steps.get(position)
        self._steps.clear()
        if not adapt or not vocab.is_event(token):
            return True  # nothing to judge
        if step is None:
            return False
        self.judge(position, float(step[0][token]), *cache.token_terms(token), adapt)
        return True

    def judge(self, position: int, p_model: float, a_token: float, b: float, adapt: float) -> None:
        """One token's judgement: the model's probability of it, the cache's terms there."""
        slope = adapt * (mixed_probability(p_model, a_token, b, 1.0) - p_model)  # the mix is linear in its weight
        log_posterior = [
            FORGET * log_p + math.log(max(p_model + candidate * slope, 1e-300))
            for log_p, candidate in zip(self._log_posterior, WEIGHTS, strict=True)
        ]
        self._move(position, log_posterior)

    def judge_from_rows(
        self,
        rows_output: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
        anchor: int,
        rows_end: int,
        adapt: float,
        dynamic: DynamicOutput | None = None,
        rate: float = 0.0,
    ) -> None:
        """Judge by the `deferred` tokens, in stream order, from the engine's kept latent rows before
        them (`rows_output(first, end)`: their logits and hidden states; row i predicts the token at
        anchor + i + 1; rows up to stream position `rows_end` are run): one pass over the last layer,
        one read back. Rows run before a token came are those a step there would have used; after a
        re-anchoring they have the later anchor's latents, and tokens at or before the anchor go
        unjudged. `dynamic` adjusts each row's logits and learns from each token (at `rate`) in turn."""
        pending = [entry for entry in self.deferred if anchor < entry[0] <= rows_end]
        self.deferred = deque((entry for entry in self.deferred if entry[0] > rows_end), maxlen=HISTORY)
        if not pending or not adapt:
            return
        first = pending[0][0] - 1 - anchor
        logits, hidden = rows_output(first, pending[-1][0] - anchor)
        rows = [position - 1 - anchor - first for position, *_ in pending]
        tokens = [token for _, token, *_ in pending]
        if dynamic is None or not rate:
            device = logits.device
            probs = torch.softmax(logits.float(), -1)
            chosen = probs[torch.tensor(rows, device=device), torch.tensor(tokens, device=device)]
        else:
            chosen = []
            for (position, token, *_), row in zip(pending, rows, strict=True):
                probs = torch.softmax(dynamic.logits(hidden[row]), -1)  # learnt up to the token before
                chosen.append(probs[token])
                dynamic.learn(position, probs, hidden[row], token, rate)
            chosen = torch.stack(chosen)
        for (position, _, a, b), p_model in zip(pending, chosen.tolist(), strict=True):
            self.judge(position, p_model, a, b, adapt)

    def fade(self, position: int) -> None:
        """The model played the token at `position`: no judgement (it was drawn from the mix), but
        what the player's tokens said ages by FORGET as if a token had passed, so that in a long
        answer the weight drifts back toward the prior's mean instead of holding the player's last
        verdict (held at 0.93 after a repetitive score prompt, the answer copied itself into a loop)."""
        self._move(position, [FORGET * log_p for log_p in self._log_posterior])

    def _move(self, position: int, log_posterior: list[float]) -> None:
        self._history.append((position, self._log_posterior))  # the oldest leaves at HISTORY
        self._set(log_posterior)

    def _set(self, log_posterior: list[float]) -> None:
        self._log_posterior = log_posterior
        top = max(log_posterior)
        posterior = [math.exp(log_p - top) for log_p in log_posterior]
        self.fraction = sum(c * p for c, p in zip(WEIGHTS, posterior, strict=True)) / sum(posterior)

    def truncate(self, length: int) -> None:
        """A rollback to `length` tokens: the judgements of tokens from `length` on are undone and
        the steps beyond `length` dropped (the step at `length` predicted the same context)."""
        if length == 0:
            self.reset()
            return
        steps = self._steps  # remembered in stream order (a rollback drops the later ones first): the newest last
        while steps and (newest := next(reversed(steps))) > length:
            del steps[newest]
        while self.deferred and self.deferred[-1][0] >= length:  # in stream order too
            self.deferred.pop()
        restored = None
        while self._history and self._history[-1][0] >= length:
            restored = self._history.pop()[1]
        if restored is not None:
            self._set(restored)


class MixPlan(NamedTuple):
    """What the mix adds to the model's distribution (mix_logits), made from the session alone
    (plan_mix): the engine makes it before the step's forward pass, right after the cache took the
    last token, while the cache's records and the code that reads them are still in the processor's
    caches (made after the forward pass, which streams the model's weights through them, the same
    work took about three times as long)."""

    cache_part: np.ndarray  # the cache's terms (SessionCache.terms) at its weight in the mix: cache_weight * a, and b
    b: float
    cache_weight: float
    experts: list[Expert]  # the session experts (experts.py) and their share of their type
    share: float

    @property
    def says_nothing(self) -> bool:
        """Neither the cache nor an expert has anything to go on (b is 1 exactly when no count the
        cache has seen there exceeds its discount, and then a is 0)."""
        return self.b >= 1.0 and not self.experts


def plan_mix(
    cache: SessionCache, adapt: float, state: StreamState | None = None, weight: CacheWeight | None = None
) -> MixPlan:
    """The mix's plan for the next step (MixPlan)."""
    cache_weight = adapt * (weight.fraction if weight is not None else PRIOR_FRACTION)
    cache_part, b = cache.terms(cache_weight)
    experts = session_experts(state) if state is not None else []
    return MixPlan(cache_part, b, cache_weight, experts, adapt * EXPERT_SHARE)


def mix_logits(
    logits: torch.Tensor,
    cache: SessionCache,
    adapt: float,
    state: StreamState | None = None,
    weight: CacheWeight | None = None,
    position: int | None = None,
    hidden: torch.Tensor | None = None,
    plan: MixPlan | None = None,
) -> torch.Tensor:
    """The mix as logits (log-probabilities) of the same shape, device and dtype: the cache with the
    model as its floor, mixed with the model at `adapt` times the learnt fraction of `weight` (the
    prior's mean without one), then the session experts of `state` at `adapt * EXPERT_SHARE` (see
    this module's docstring and experts.py). Where neither the cache nor an expert has anything to
    go on, `logits` themselves. With `weight` and the stream `position` predicted, the step (and the logits' `hidden`
    state) is remembered there for the player's token that comes at it (CacheWeight.remember).
    `plan`: plan_mix's for this cache, state and weight, made before (else made here).

    Both are taken at temperature 1, where each is an estimate of the next token's probability and
    the mix is the one `eval` scores; the sampling temperature, key follow and the masks then act on
    the mix exactly as they act on the model alone (a cache cannot bring back a masked token, and
    the weight means the same at every temperature). On the CPU computed in numpy: a few operations
    on 389 numbers, where each torch call would cost more than its arithmetic. Elsewhere on the
    device (`mix_on_device`): reading the logits back would stall the step."""
    if plan is None:
        plan = plan_mix(cache, adapt, state, weight)
    if plan.says_nothing:
        return logits
    if logits.device.type != "cpu":
        mixed, probs = mix_on_device(logits, plan.cache_part, plan.b, plan.cache_weight, plan.experts, plan.share)
    else:
        probs = torch.softmax(logits.float(), -1).numpy()
        mixed = probs * np.float32(1.0 - plan.cache_weight + plan.cache_weight * plan.b)
        mixed[:SIZE] += plan.cache_part
        lean_on_experts(mixed, plan.experts, plan.share)
        # torch's log: a token the model gives exactly 0 and the cache nothing is -inf, without numpy's warning
        mixed = torch.from_numpy(mixed).log_().to(dtype=logits.dtype)
    if weight is not None and position is not None:
        weight.remember(position, probs, hidden)
    return mixed


def mix_on_device(
    logits: torch.Tensor,
    cache_part: np.ndarray,
    b: float,
    weight: float,
    experts: Sequence[Expert] = (),
    share: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mix_logits`' mix on the logits' own device, the cache's terms at its `weight` (`cache_part`:
    weight * a, and `b`; SessionCache.terms) and the experts sent there without a host sync
    (sampling.host_to_device); float32 throughout (a few roundings from the CPU's numpy mix, which
    makes the cache's part in float64). Returns the mixed logits and the model's probabilities (both
    on the device)."""
    probs = torch.softmax(logits.float(), -1)
    mixed = probs * (1.0 - weight + weight * b)
    mixed[:SIZE] += host_to_device(torch.from_numpy(cache_part).float(), logits.device)
    for first, expert, members in experts:
        group = mixed[first : first + len(expert)]
        if members is None:
            total = group.sum()  # stays on the device
            group.mul_(1.0 - share)
        else:
            inside = host_to_device(torch.from_numpy(members.astype(np.float32)), logits.device)
            total = (group * inside).sum()
            group.mul_(1.0 - share * inside)
        group.add_(host_to_device(torch.from_numpy(share * expert).float(), logits.device) * total)
    return mixed.log_().to(logits.dtype), probs


def loop_rate(tokens: list[int], start: int = 0, n: int = 16) -> float:
    """The share of the n-grams beginning at `start` or later that occurred earlier in `tokens`: 0
    for fresh material, near 1 for a stream that copies itself (16 tokens: about four notes)."""
    seen: set[tuple[int, ...]] = set()
    repeated = total = 0
    for begin in range(len(tokens) - n + 1):
        gram = tuple(tokens[begin : begin + n])
        if begin >= start:
            repeated += gram in seen
            total += 1
        seen.add(gram)
    return repeated / total if total else math.nan


# --------------------------------------------------------------------------- cost


def practice_stream(length: int, seed: int = 0) -> list[int]:
    """A stream like a player practising: 4-token notes (velocity, note-on, time shift, note-off)
    in 8-note phrases that come back with about one note in seven changed. Repetition is what makes
    a cache's step dear (long seen contexts, every order in play), so this is a busy case to time."""
    rng = np.random.default_rng(seed)
    phrases = [
        [
            (int(p), int(v), int(s))
            for p, v, s in zip(
                rng.integers(48, 72, 8), rng.integers(12, 30, 8), rng.choice([19, 24, 49], 8), strict=True
            )
        ]
        for _ in range(6)
    ]
    tokens: list[int] = []
    while len(tokens) < length:
        for pitch, velocity_bin, shift in phrases[int(rng.integers(len(phrases)))]:
            if rng.random() < 0.15:
                pitch = int(rng.integers(48, 72))
            tokens += [
                vocab.VELOCITY + velocity_bin,
                vocab.note_on(pitch),
                vocab.TIME_SHIFT + shift,
                vocab.note_off(pitch),
            ]
    return tokens[:length]
