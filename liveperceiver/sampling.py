"""Sampling the next token: settings, the three small filters, and optional musical constraints.

Constraints are logit masks driven by a `StreamState` that follows the token stream (sounding
pitches, time since the last onset, the player's pitch classes), plus one soft bias: key follow.
All are off by default, where the reference has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from liveperceiver import vocab
from liveperceiver.settings import MAX_KEY_FOLLOW  # one limit for presets, flags and the engine

# The pitch-class histograms forget: each note-on scales its side's histogram (the player's or the
# model's) by this first, so after a modulation the new key dominates within a few dozen notes
# (half-life about 60 notes).
PITCH_CLASS_DECAY = 0.9885
PITCH_CLASS_PRIOR = 0.5  # pseudo-count per pitch class: a few notes only lean, a long phrase decides
PITCH_CLASS_OF = torch.arange(128) % 12


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None

    def validate(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature {self.temperature} must be > 0 (or use greedy sampling)")
        if not 0 <= self.top_k <= vocab.VOCAB_SIZE:
            raise ValueError(f"top_k {self.top_k} outside 0..{vocab.VOCAB_SIZE} (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} outside (0, 1]")

    def updated(self, **changes) -> SamplingSettings:
        new = replace(self, **changes)
        new.validate()
        return new


@dataclass(frozen=True)
class Constraints:
    """Optional musical constraints; None/False/0 means off."""

    no_orphan_note_off: bool = False  # no note-off for a pitch that is not sounding
    pitch_range: tuple[int, int] | None = None  # note-ons allowed only in [low, high]
    max_polyphony: int = 0  # no note-on while this many notes sound
    min_onset_gap_ms: int = 0  # no note-on sooner than this after the previous one
    max_note_ms: int = 0  # a note sounding this long must be closed next (no stuck notes in the stream)
    key_follow: float = 0.0  # lean the model's pitches toward the player's pitch classes (0: off; see key_follow_bias)

    def validate(self) -> None:
        if self.pitch_range is not None:
            low, high = self.pitch_range
            if not 0 <= low <= high <= 127:
                raise ValueError(f"pitch_range {self.pitch_range} must satisfy 0 <= low <= high <= 127")
        for name in ("max_polyphony", "min_onset_gap_ms", "max_note_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0 (0 = off)")
        if not 0.0 <= self.key_follow <= MAX_KEY_FOLLOW:
            raise ValueError(f"key_follow {self.key_follow} outside 0..{MAX_KEY_FOLLOW} (0 = off)")

    @property
    def active(self) -> bool:
        return bool(
            self.no_orphan_note_off
            or self.pitch_range
            or self.max_polyphony
            or self.min_onset_gap_ms
            or self.max_note_ms
            or self.key_follow
        )


class StreamState:
    """What the token stream implies right now: sounding pitches with their onset times, which of
    them the model sampled itself, the stream's clock in ms (the sum of its time-shifts), and a
    decaying histogram of the pitch classes struck by the player and one of those the model struck.

    Snapshots every `SNAPSHOT_EVERY` tokens make rollback cheap on unbounded streams."""

    SNAPSHOT_EVERY = 256

    def __init__(self) -> None:
        self.onsets: dict[int, int] = {}  # sounding pitch -> onset time (ms)
        self.sampled: set[int] = set()  # sounding pitches the model struck (a player's notes are not its to end)
        self.clock_ms = 0
        self.last_onset_ms: int | None = None
        self.length = 0
        self.player_pitch_classes = [0.0] * 12
        self.model_pitch_classes = [0.0] * 12
        self.pitch_class_version = 0  # bumped whenever either histogram changes
        self.key_bias: tuple[tuple, torch.Tensor | None] | None = None  # key_follow_bias's cache
        self._snapshots: list[tuple[dict[int, int], set[int], int, int | None, list[float], list[float]]] = [
            ({}, set(), 0, None, [0.0] * 12, [0.0] * 12)
        ]

    @property
    def sounding(self) -> set[int]:
        return set(self.onsets)

    @property
    def ms_since_onset(self) -> int:
        return 1_000_000 if self.last_onset_ms is None else self.clock_ms - self.last_onset_ms

    def overdue(self, max_note_ms: int) -> list[int]:
        """The model's own pitches that have sounded for at least `max_note_ms`."""
        return [pitch for pitch in self.sampled if self.clock_ms - self.onsets[pitch] >= max_note_ms]

    def push(self, token: int, sampled: bool = False) -> None:
        if token < vocab.NOTE_OFF:
            self.onsets.setdefault(token, self.clock_ms)
            self.last_onset_ms = self.clock_ms
            if sampled:
                self.sampled.add(token)
            else:
                self.sampled.discard(token)  # the player struck it too: the note is theirs now
            self.pitch_class_version += 1
            histogram = self.model_pitch_classes if sampled else self.player_pitch_classes
            for pitch_class in range(12):
                histogram[pitch_class] *= PITCH_CLASS_DECAY
            histogram[token % 12] += 1.0
        elif token < vocab.TIME_SHIFT:
            self.onsets.pop(token - vocab.NOTE_OFF, None)
            self.sampled.discard(token - vocab.NOTE_OFF)
        elif token < vocab.VELOCITY:
            self.clock_ms += vocab.time_shift_steps(token) * 10
        self.length += 1
        if self.length % self.SNAPSHOT_EVERY == 0:
            self._snapshots.append(
                (
                    dict(self.onsets),
                    set(self.sampled),
                    self.clock_ms,
                    self.last_onset_ms,
                    list(self.player_pitch_classes),
                    list(self.model_pitch_classes),
                )
            )

    def rewind(self, tokens: list[int], sampled: bytearray, length: int) -> None:
        """Restore the state after `tokens[:length]` (`sampled[i]`: token i was sampled) from the nearest snapshot."""
        index = length // self.SNAPSHOT_EVERY
        del self._snapshots[index + 1 :]
        onsets, own, self.clock_ms, self.last_onset_ms, player, model = self._snapshots[index]
        self.onsets, self.sampled = dict(onsets), set(own)
        self.player_pitch_classes, self.model_pitch_classes = list(player), list(model)
        self.pitch_class_version += 1
        self.length = index * self.SNAPSHOT_EVERY
        for position in range(self.length, length):
            self.push(tokens[position], bool(sampled[position]))


def key_follow_bias(strength: float, state: StreamState, logits: torch.Tensor, temperature: float = 1.0) -> None:
    """Shift note-on logits so the model's pitch classes follow the player's, in place.

    At the sampling `temperature`, each note-on's probability is multiplied by
    `(player share / model share) ** strength` of its pitch class, from the two decaying histograms
    (before the model has played, its share counts as uniform): a pitch class the player uses more
    than the model has lately gains, one the model overplays loses. Then all note-ons move together
    so that their total probability at that temperature is what the model gave (top-k and top-p cut
    afterwards): key follow changes which pitch the model plays, not whether it plays a note rather
    than wait or release one. Why: a small model drifts out of the player's key over a long answer
    (model card), and a partner in another key is the first thing a player hears. Matching shares
    rather than only boosting the player's commonest pitch classes keeps it from circling the tonic."""
    key = (state.pitch_class_version, strength, logits.device)
    if state.key_bias is None or state.key_bias[0] != key:  # the histograms change only on note-ons
        player, model = state.player_pitch_classes, state.model_pitch_classes
        player_total, model_total = sum(player) + 12 * PITCH_CLASS_PRIOR, sum(model) + 12 * PITCH_CLASS_PRIOR
        by_class = [
            0.0
            if player_total == 12 * PITCH_CLASS_PRIOR  # the player has not played: no key to follow
            else strength * math.log((p + PITCH_CLASS_PRIOR) * model_total / ((m + PITCH_CLASS_PRIOR) * player_total))
            for p, m in zip(player, model, strict=True)
        ]
        bias = torch.tensor(by_class, device=logits.device)[PITCH_CLASS_OF.to(logits.device)]
        state.key_bias = (key, bias if any(by_class) else None)
    bias = state.key_bias[1]
    if bias is None:
        return
    note_ons = logits[vocab.NOTE_ON : vocab.NOTE_OFF]
    before = torch.logsumexp(note_ons / temperature, 0)
    if not torch.isfinite(before):
        return
    note_ons.add_(bias, alpha=temperature)
    note_ons.add_((before - torch.logsumexp(note_ons / temperature, 0)) * temperature)


def constraint_mask(
    constraints: Constraints, state: StreamState, logits: torch.Tensor, temperature: float = 1.0
) -> None:
    """Set disallowed token logits to -inf, and apply key follow (at the sampling temperature), in place."""
    minus_inf = float("-inf")
    if constraints.key_follow:
        key_follow_bias(constraints.key_follow, state, logits, temperature)
    overdue = state.overdue(constraints.max_note_ms) if constraints.max_note_ms else []
    if overdue:
        # Only the overdue notes' note-offs stay possible.
        allowed = [vocab.note_off(pitch) for pitch in overdue]
        kept = logits[allowed].clone()
        logits.fill_(minus_inf)
        logits[allowed] = kept
        return
    if constraints.no_orphan_note_off:
        allowed = torch.zeros(128, dtype=torch.bool)
        allowed[list(state.onsets)] = True
        logits[vocab.NOTE_OFF : vocab.TIME_SHIFT].masked_fill_(~allowed.to(logits.device), minus_inf)
    if constraints.pitch_range is not None:
        low, high = constraints.pitch_range
        logits[vocab.NOTE_ON : vocab.NOTE_ON + low] = minus_inf
        logits[vocab.NOTE_ON + high + 1 : vocab.NOTE_OFF] = minus_inf
    polyphony_full = constraints.max_polyphony and len(state.onsets) >= constraints.max_polyphony
    too_soon = constraints.min_onset_gap_ms and state.ms_since_onset < constraints.min_onset_gap_ms
    if polyphony_full or too_soon:
        logits[vocab.NOTE_ON : vocab.NOTE_OFF] = minus_inf


def apply_temperature_top_k_top_p(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop_sorted = cumulative - sorted_probs > settings.top_p  # keep the smallest set reaching top_p
        probs = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
    return probs


def choose(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """The next token id from float logits of shape (vocab,); pad is never chosen."""
    logits = logits.float()
    logits[vocab.PAD] = float("-inf")
    if settings.greedy:
        return int(logits.argmax())
    probs = apply_temperature_top_k_top_p(logits, settings)
    return int(torch.multinomial(probs, 1, generator=generator))
