"""In-session adaptation: a cache model of the session itself, mixed into the model's distribution.

Why: music repeats itself, and a player's rhythms, voicings and dynamics are in the session long
before any model could have learnt them. A cache language model (Kuhn and De Mori, 1990; Grave,
Joulin and Usunier, 2017) estimates the next token from the history itself, mixed with the
network's distribution: the partner picks up what the player keeps doing within a few bars.

The cache (session_cache.SessionCache) is `eval`'s baseline n-gram, interpolated Kneser-Ney, over
the session's own tokens, kept in step with the stream token by token.

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
from liveperceiver.inference.session_cache import SIZE, SessionCache

# The cache's weight, learnt per session (CacheWeight): candidates as fractions of `adapt`, and how
# fast older tokens are forgotten (chosen on three validation sets: 0.95 to 0.98 all did well)
WEIGHTS = (0.0, 0.25, 0.5, 0.7, 0.85, 0.95, 1.0)
PRIOR_FRACTION = sum(WEIGHTS) / len(WEIGHTS)  # the weight before the session has said anything
FORGET = 0.95  # per observed token: a token 14 tokens back counts half
HISTORY = 4096  # judgements a rollback can undo (live rollbacks reach back a few dozen tokens)
STEPS_KEPT = 512  # steps remembered for judging a player's token (more than any look-ahead samples)


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
        # Python's arithmetic on them costs a third of numpy's calls (2.8 against 7.6 us, warm), and
        # as a tuple the garbage collector stops scanning it (a list each, 8,000 objects a session)
        self._history: deque[tuple[int, tuple[float, ...]]] = deque(maxlen=HISTORY)
        self.reset()

    def reset(self) -> None:
        self._steps.clear()
        self.deferred.clear()
        self._history.clear()
        self._log_posterior = (0.0,) * len(WEIGHTS)
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
        probs, _ = step
        self.judge(position, float(probs[token]), *cache.token_terms(token), adapt)
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

    def _set(self, log_posterior: list[float] | tuple[float, ...]) -> None:
        self._log_posterior = tuple(log_posterior)
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
    (plan_mix): the engine makes it before the step's forward pass, closer to the cache's last
    update than to the forward pass, which streams the model's weights through the processor's
    caches (four alternating `bench` runs on the AMD EPYC VM: the step's added cost 0.21-0.26 ms made
    before, 0.23-0.35 made after; noisy, kept for its mean, 0.24 against 0.30)."""

    cache_part: np.ndarray  # cache_weight * a: the cache's terms (SessionCache.terms) at its weight in the mix
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
