"""Sampling the next token: settings, the three small filters, and optional musical constraints.

Constraints are logit masks driven by a `StreamState` that follows the token stream (sounding
pitches, time since the last onset, the player's pitch classes, velocities and note rate), plus
three soft biases that lean the model toward the player: key follow, dynamics follow and density
follow. All are off by default, where the reference has none.

On a GPU a step reads back one number, the sampled id (`choose`): the filters, masks and follows
never branch on a tensor's value, and what the host computes (the follows' biases, the masks of
sounding notes) goes to the device through `host_to_device`, without waiting for the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from liveperceiver.core import vocab
from liveperceiver.inference.limits import (  # one set of limits for presets, flags and the engine
    DENSITY_RATIO_RANGE,
    MAX_DENSITY_FOLLOW,
    MAX_DYNAMICS_FOLLOW,
    MAX_KEY_FOLLOW,
    sampling_problem,
)

# The pitch-class histograms forget: each note-on scales its side's histogram (the player's or the
# model's) by this first, so after a modulation the new key dominates within a few dozen notes
# (half-life about 60 notes).
PITCH_CLASS_DECAY = 0.9885
PITCH_CLASS_PRIOR = 0.5  # pseudo-count per pitch class: a few notes only lean, a long phrase decides
PITCH_CLASS_OF = torch.arange(128) % 12

# Dynamics follow: decaying histograms of velocity bins. Dynamics move by the phrase, faster than a
# key, so the half-life is about 24 notes (a velocity token precedes almost every note-on). Each token
# is spread over its neighbours (triangular, +-2 bins: 8 MIDI velocities either way), so a player at
# bin 20 pulls the model's 18-22, not only 20, and a bin the player just missed is not pushed away.
VELOCITY_DECAY = 0.5 ** (1 / 24)
VELOCITY_PRIOR = 0.05  # pseudo-count per bin (32 bins): the model's share counts as uniform before it plays
VELOCITY_SPREAD = (1 / 9, 2 / 9, 3 / 9, 2 / 9, 1 / 9)  # bins b-2 .. b+2


def spread_by_bin(spread: tuple[float, ...]) -> list[list[tuple[int, float]]]:
    """Per velocity bin, the (bin, share) pairs one token adds: `spread` centred on it, cut at the
    ends of the range and renormalised, so every token counts once."""
    half = len(spread) // 2
    table = []
    for center in range(vocab.NUM_VELOCITY_BINS):
        inside = [(center + k - half, share) for k, share in enumerate(spread)]
        inside = [(index, share) for index, share in inside if 0 <= index < vocab.NUM_VELOCITY_BINS]
        total = sum(share for _, share in inside)
        table.append([(index, share / total) for index, share in inside])
    return table


VELOCITY_SPREAD_BY_BIN = spread_by_bin(VELOCITY_SPREAD)

# Density follow: each side's note rate is its decaying count of inter-onset intervals over their
# decaying total length (half-life 24 notes), intervals capped at RATE_GAP_CAP_MS: the rest between
# two phrases (or the other side's turn in call mode) is not the player's tempo.
RATE_DECAY = 0.5 ** (1 / 24)
RATE_GAP_CAP_MS = 2000
RATE_PRIOR_NOTES = 2.0  # the model's rate starts as the player's, worth this many intervals
DENSITY_FACTOR_LIMIT = 4.0  # density follow never asks for more than this change in note rate either way
WAIT_TILT_GAIN = 2.0  # density_follow_bias: the tilt exponent moves ln(notes per second) about this much
LOG_WAIT = torch.log(torch.arange(1, vocab.NUM_TIME_SHIFTS + 1, dtype=torch.float32))  # ln(steps) per time-shift
_LOG_WAIT_ON: dict[torch.device, torch.Tensor] = {torch.device("cpu"): LOG_WAIT}  # copied once per device


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device` without a host sync. A plain copy from pageable memory to
    a CUDA device waits for the device's queue to drain, so a step would stall on every mask;
    from pinned memory the copy is queued like a kernel (torch keeps the pinned block alive until
    it is done). On the CPU, the tensor itself."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None

    def validate(self) -> None:
        problem = sampling_problem(self.temperature, self.top_k, self.top_p, self.greedy, self.seed)
        if problem is not None:
            raise ValueError(" ".join(problem))

    def updated(self, **changes) -> SamplingSettings:
        new = replace(self, **changes)
        new.validate()
        return new


@dataclass(frozen=True)
class Constraints:
    """Optional musical constraints; None/False/0 means off."""

    no_orphan_note_off: bool = False  # no note-off for a pitch that is not sounding
    # with no_orphan_note_off: a pitch struck again while it sounded may be closed twice, as the
    # tokenizer writes it (eval scores real streams so). Sampling closes it once: the reference
    # decoder would make the second note-off a doubled note (continuations' polyphony 0.90 -> 1.27).
    repeated_note_offs: bool = False
    # No rule against striking a pitch the model sounds: in piano continuations 26% of its note-ons
    # do (the data's 0.1-1%; 10% with adaptation off), its way to repeat a note it had not released;
    # the scheduler retriggers, so it is heard as the repeated note it decodes to. Measured and left
    # out (piano card, "Where the thinness is"): banning it made walls of held notes, keeping the
    # note-off total on sounding notes made thin answers.
    pitch_range: tuple[int, int] | None = None  # note-ons allowed only in [low, high]
    max_polyphony: int = 0  # no note-on while this many notes sound
    min_onset_gap_ms: int = 0  # no note-on sooner than this after the previous one
    max_note_ms: int = 0  # a note sounding this long must be closed next (no stuck notes in the stream)
    max_rest_ms: int = 0  # after the model itself waited this long since the last note-on, it may not wait on
    key_follow: float = 0.0  # lean the model's pitches toward the player's pitch classes (0: off; see key_follow_bias)
    dynamics_follow: float = 0.0  # lean its velocities toward the player's (0: off; see dynamics_follow_bias)
    density_follow: float = 0.0  # lean its note rate toward density_ratio x the player's (0: off; density_follow_bias)
    density_ratio: float = 1.0  # the note rate density follow aims at, as a multiple of the player's

    def validate(self) -> None:
        if self.pitch_range is not None:
            low, high = self.pitch_range
            if not 0 <= low <= high <= 127:
                raise ValueError(f"pitch_range {self.pitch_range} must satisfy 0 <= low <= high <= 127")
        for name in ("max_polyphony", "min_onset_gap_ms", "max_note_ms", "max_rest_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0 (0 = off)")
        if not 0.0 <= self.key_follow <= MAX_KEY_FOLLOW:
            raise ValueError(f"key_follow {self.key_follow} outside 0..{MAX_KEY_FOLLOW} (0 = off)")
        for name, limit in (("dynamics_follow", MAX_DYNAMICS_FOLLOW), ("density_follow", MAX_DENSITY_FOLLOW)):
            if not 0.0 <= getattr(self, name) <= limit:
                raise ValueError(f"{name} {getattr(self, name)} outside 0..{limit:g} (0 = off)")
        low, high = DENSITY_RATIO_RANGE
        if not low <= self.density_ratio <= high:
            raise ValueError(f"density_ratio {self.density_ratio} outside {low}..{high}")

    @property
    def active(self) -> bool:
        return bool(
            self.no_orphan_note_off
            or self.pitch_range
            or self.max_polyphony
            or self.min_onset_gap_ms
            or self.max_note_ms
            or self.max_rest_ms
            or self.key_follow
            or self.dynamics_follow
            or self.density_follow
        )


class StreamState:
    """What the token stream implies right now: sounding pitches with their onset times, which of
    them the model sampled itself, the stream's clock in ms (the sum of its time-shifts), and, for
    the player and for the model apart, decaying histograms of the pitch classes struck and of the
    velocity bins used, and a decaying note rate (see `note_rate`).

    Snapshots every `SNAPSHOT_EVERY` tokens make rollback cheap on unbounded streams; replaying the
    tokens after a snapshot repeats the same float operations, so a rewind is exact."""

    SNAPSHOT_EVERY = 256

    def __init__(self) -> None:
        self.onsets: dict[int, int] = {}  # sounding pitch -> onset time (ms)
        # pitch -> its note-ons not yet matched by a note-off: a pitch struck again while it sounds (the
        # pedal holds it) is two notes to the tokenizer, closed by two note-offs (1% of MAESTRO's notes)
        self.open_notes: dict[int, int] = {}
        self.sampled: set[int] = set()  # sounding pitches the model struck (a player's notes are not its to end)
        self.clock_ms = 0
        self.last_onset_ms: int | None = None
        self.model_rest_ms = 0  # the model's own time-shifts since the last note-on (the rest guard's)
        self.length = 0
        self.player_pitch_classes = [0.0] * 12
        self.model_pitch_classes = [0.0] * 12
        self.pitch_class_version = 0  # bumped whenever either histogram changes
        self.key_bias: tuple[tuple, torch.Tensor | None] | None = None  # key_follow_bias's cache
        self.player_velocities = [0.0] * vocab.NUM_VELOCITY_BINS  # spread over neighbouring bins
        self.model_velocities = [0.0] * vocab.NUM_VELOCITY_BINS
        self.velocity_version = 0  # bumped whenever either velocity histogram changes
        self.last_token = -1  # the stream's latest token (-1: none yet)
        self.experts: dict[str, tuple] = {}  # experts.session_experts' cache: what each expert was made from, and it
        self.velocity_bias: tuple[tuple, torch.Tensor | None] | None = None  # dynamics_follow_bias's cache
        # note rate per side (0: the player, 1: the model): [decayed intervals, decayed ms, last onset ms or -1]
        self.rates = [[0.0, 0.0, -1], [0.0, 0.0, -1]]
        self._snapshots: list[tuple] = [self._capture()]

    def _capture(self) -> tuple:
        """A snapshot of numbers, dictionaries of numbers and tuples, which the garbage collector
        leaves out of its scans (an unbounded stream keeps one per SNAPSHOT_EVERY tokens)."""
        return (
            dict(self.onsets),
            dict(self.open_notes),
            tuple(self.sampled),
            self.clock_ms,
            self.last_onset_ms,
            self.model_rest_ms,
            tuple(self.player_pitch_classes),
            tuple(self.model_pitch_classes),
            tuple(self.player_velocities),
            tuple(self.model_velocities),
            tuple(tuple(side) for side in self.rates),
            self.last_token,
        )

    @property
    def sounding(self) -> set[int]:
        return set(self.onsets)

    @property
    def ms_since_onset(self) -> int:
        return 1_000_000 if self.last_onset_ms is None else self.clock_ms - self.last_onset_ms

    def overdue(self, max_note_ms: int) -> list[int]:
        """The model's own pitches that have sounded for at least `max_note_ms`."""
        return [pitch for pitch in self.sampled if self.clock_ms - self.onsets[pitch] >= max_note_ms]

    def note_rate(self, model: bool) -> tuple[float, float]:
        """(intervals, ms) behind a side's note rate, intervals / ms being the rate.

        A rate is counted per note-on (a chord of three is three notes in no time), over the
        intervals between a side's own onsets, each capped at RATE_GAP_CAP_MS. The model's open
        interval (since its last onset, capped) counts as time too: a Poisson rate is events over
        exposure, and a model that has gone quiet is sparser than its last notes say. The player's
        does not: while the player listens (call mode) their rate is what they last played."""
        intervals, ms, last = self.rates[1 if model else 0]
        if model and last >= 0:
            ms += min(self.clock_ms - last, RATE_GAP_CAP_MS)
        return intervals, ms

    def push(self, token: int, sampled: bool = False) -> None:
        if token < vocab.NOTE_OFF:
            self.onsets.setdefault(token, self.clock_ms)
            self.open_notes[token] = self.open_notes.get(token, 0) + 1
            self.last_onset_ms = self.clock_ms
            self.model_rest_ms = 0
            if sampled:
                self.sampled.add(token)
            else:
                self.sampled.discard(token)  # the player struck it too: the note is theirs now
            self.pitch_class_version += 1
            histogram = self.model_pitch_classes if sampled else self.player_pitch_classes
            for pitch_class in range(12):
                histogram[pitch_class] *= PITCH_CLASS_DECAY
            histogram[token % 12] += 1.0
            rate = self.rates[1 if sampled else 0]
            if rate[2] >= 0:
                rate[0] = rate[0] * RATE_DECAY + 1.0
                rate[1] = rate[1] * RATE_DECAY + min(self.clock_ms - rate[2], RATE_GAP_CAP_MS)
            rate[2] = self.clock_ms
        elif token < vocab.TIME_SHIFT:
            pitch = token - vocab.NOTE_OFF
            still_open = self.open_notes.pop(pitch, 0) - 1
            if still_open > 0:  # struck again while it sounded: one more note-off is the tokenizer's
                self.open_notes[pitch] = still_open
            # The first note-off ends the pitch's sound, as the decoder and the scheduler pair notes by
            # pitch: a second one is never required, and allowed only with repeated_note_offs.
            self.onsets.pop(pitch, None)
            self.sampled.discard(pitch)
        elif token < vocab.VELOCITY:
            self.clock_ms += vocab.time_shift_steps(token) * 10
            if sampled:
                self.model_rest_ms += vocab.time_shift_steps(token) * 10
        elif token < vocab.PAD:
            self.velocity_version += 1
            histogram = self.model_velocities if sampled else self.player_velocities
            for index in range(vocab.NUM_VELOCITY_BINS):
                histogram[index] *= VELOCITY_DECAY
            for index, share in VELOCITY_SPREAD_BY_BIN[token - vocab.VELOCITY]:
                histogram[index] += share
        self.last_token = token
        self.length += 1
        if self.length % self.SNAPSHOT_EVERY == 0:
            self._snapshots.append(self._capture())

    def rewind(self, tokens: list[int], sampled: bytearray, length: int) -> None:
        """Restore the state after `tokens[:length]` (`sampled[i]`: token i was sampled) from the nearest snapshot."""
        index = length // self.SNAPSHOT_EVERY
        del self._snapshots[index + 1 :]
        (
            onsets,
            open_notes,
            own,
            self.clock_ms,
            self.last_onset_ms,
            self.model_rest_ms,
            player,
            model,
            player_vel,
            model_vel,
            rates,
            self.last_token,
        ) = self._snapshots[index]
        self.onsets, self.open_notes, self.sampled = dict(onsets), dict(open_notes), set(own)
        self.player_pitch_classes, self.model_pitch_classes = list(player), list(model)
        self.player_velocities, self.model_velocities = list(player_vel), list(model_vel)
        self.rates = [list(side) for side in rates]
        self.pitch_class_version += 1
        self.velocity_version += 1
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
        bias = host_to_device(torch.tensor(by_class)[PITCH_CLASS_OF], logits.device)
        state.key_bias = (key, bias if any(by_class) else None)
    bias = state.key_bias[1]
    if bias is None:
        return
    note_ons = logits[vocab.NOTE_ON : vocab.NOTE_OFF]
    before = torch.logsumexp(note_ons / temperature, 0)
    note_ons.add_(bias, alpha=temperature)
    # No host sync: note-ons that are all -inf stay so (their correction, NaN, counts as 0).
    note_ons.add_(torch.nan_to_num(before - torch.logsumexp(note_ons / temperature, 0), nan=0.0) * temperature)


def reweight(group: torch.Tensor, bias: torch.Tensor, temperature: float) -> None:
    """Multiply the probabilities of one event type's logits (a view, changed in place) by
    `exp(bias)` at the sampling `temperature`, keeping their total probability at that temperature.
    No host sync: a group that is all -inf stays so (its correction, NaN, counts as 0)."""
    tempered = group / temperature
    kept = torch.logsumexp(tempered, 0) - torch.logsumexp(tempered + bias, 0)
    group.add_(bias + torch.nan_to_num(kept, nan=0.0), alpha=temperature)


def dynamics_follow_bias(strength: float, state: StreamState, logits: torch.Tensor, temperature: float = 1.0) -> None:
    """Shift velocity logits so the model's dynamics follow the player's, in place.

    Key follow's rule on velocity bins: at the sampling `temperature` each velocity token's
    probability is multiplied by `(player share / model share) ** strength` of its bin, from the two
    decaying histograms (each token spread over +-2 bins, so the pull reaches the neighbouring bins;
    before the model has played, its share counts as uniform), then the velocity tokens move
    together so that their total probability is what the model gave. Dynamics follow changes how
    loud the model plays, not whether it starts a note. Why: the model learned from flat-velocity
    scores and answers at its own level; a partner that plays forte under a pianissimo phrase is
    heard at once. Matching shares, not only boosting the player's commonest bin, keeps a feedback
    loop that stops once the model's recent levels look like the player's."""
    key = (state.velocity_version, strength, logits.device)
    if state.velocity_bias is None or state.velocity_bias[0] != key:  # the histograms change only on velocity tokens
        player, model = state.player_velocities, state.model_velocities
        bins = vocab.NUM_VELOCITY_BINS
        player_total, model_total = sum(player) + bins * VELOCITY_PRIOR, sum(model) + bins * VELOCITY_PRIOR
        bias = None
        if player_total > bins * VELOCITY_PRIOR:  # the player has not played: no level to follow
            by_bin = [
                strength * math.log((p + VELOCITY_PRIOR) * model_total / ((m + VELOCITY_PRIOR) * player_total))
                for p, m in zip(player, model, strict=True)
            ]
            bias = host_to_device(torch.tensor(by_bin), logits.device)
        state.velocity_bias = (key, bias)
    if state.velocity_bias[1] is not None:
        reweight(logits[vocab.VELOCITY : vocab.PAD], state.velocity_bias[1], temperature)


def density_factor(strength: float, ratio: float, state: StreamState) -> float:
    """The change in note rate density follow asks for: `(target rate / model rate) ** strength`,
    the target being `ratio` times the player's rate, within 1/4 .. 4 (1: no change).

    Until the player has played two notes there is no rate to follow. Until the model has, its rate
    counts as the player's (RATE_PRIOR_NOTES intervals of it), so `ratio` 1 starts neutral and 0.5
    starts sparser at once; the model's own notes then take over."""
    player_intervals, player_ms = state.note_rate(model=False)
    if player_intervals <= 0.0:
        return 1.0
    player_rate = player_intervals / max(player_ms, 10.0)  # a lone chord: one 10 ms step, then the clamp
    model_intervals, model_ms = state.note_rate(model=True)
    model_rate = (model_intervals + RATE_PRIOR_NOTES) / (model_ms + RATE_PRIOR_NOTES / player_rate)
    factor = (ratio * player_rate / model_rate) ** strength
    return min(max(factor, 1.0 / DENSITY_FACTOR_LIMIT), DENSITY_FACTOR_LIMIT)


def density_follow_bias(
    strength: float, ratio: float, state: StreamState, logits: torch.Tensor, temperature: float = 1.0
) -> None:
    """Lean the model's time-shifts toward shorter or longer waits so that its note rate follows
    `ratio` times the player's, in place.

    At the sampling `temperature` each time-shift of d steps has its probability multiplied by
    `d ** -(ln(density_factor) / WAIT_TILT_GAIN)`, then the time-shifts move together so that their
    total probability is what the model gave: density follow changes how long the model waits, not
    whether it waits rather than play or release a note. Why the waits: the model keeps a beat, and
    it chooses between an eighth and a quarter by the length of one time-shift, so its density is
    decided there (multiplying the odds of a note start against a wait, measured first, made bigger
    chords on the same beats, not more notes per second). Why a power of d: halving every wait is
    the same tilt at any tempo, and the tilt only re-weights lengths the model already considers, so
    it stays on its grid. WAIT_TILT_GAIN is measured: on the validation set one unit of exponent
    moved the notes per second by e ** 2, so the factor asks for about that change in rate.
    Why it is stable: the factor compares the player's rate with the model's own recent rate (its
    current silence counted), a feedback loop that relaxes toward no tilt as the model reaches the
    target and lifts a model that has gone quiet, and its clamp bounds what a noisy estimate from a
    few notes (a trill, one chord) can do."""
    factor = density_factor(strength, ratio, state)
    if factor == 1.0:
        return
    log_wait = _LOG_WAIT_ON.get(logits.device)
    if log_wait is None:
        log_wait = _LOG_WAIT_ON[logits.device] = host_to_device(LOG_WAIT, logits.device)
    reweight(logits[vocab.TIME_SHIFT : vocab.VELOCITY], log_wait * (-math.log(factor) / WAIT_TILT_GAIN), temperature)


def constraint_mask(
    constraints: Constraints, state: StreamState, logits: torch.Tensor, temperature: float = 1.0
) -> None:
    """Set disallowed token logits to -inf, and apply the follows (at the sampling temperature), in place.

    Each follow re-weights one event type (time-shifts, velocities, note-ons) keeping its total, so
    they compose in any order and never change which type of event comes next."""
    minus_inf = float("-inf")
    after_velocity = vocab.VELOCITY <= state.last_token < vocab.PAD
    polyphony_full = constraints.max_polyphony and len(state.onsets) >= constraints.max_polyphony
    too_soon = constraints.min_onset_gap_ms and state.ms_since_onset < constraints.min_onset_gap_ms
    notes_blocked = bool(polyphony_full or too_soon)  # no note may start now
    # A velocity token is always followed by its note-on in the data; pushed toward a level it would
    # not start a note at, the model sometimes waited instead, and the level was lost. So with
    # dynamics follow a velocity token allows only note-ons next, unless no note may start: then
    # only that rule would be left, and it would forbid every token.
    note_on_next = bool(constraints.dynamics_follow) and after_velocity and not notes_blocked
    if constraints.density_follow:
        density_follow_bias(constraints.density_follow, constraints.density_ratio, state, logits, temperature)
    if constraints.dynamics_follow:
        dynamics_follow_bias(constraints.dynamics_follow, state, logits, temperature)
        if note_on_next:
            logits[vocab.NOTE_OFF :] = minus_inf
    if constraints.key_follow:
        key_follow_bias(constraints.key_follow, state, logits, temperature)
    overdue = state.overdue(constraints.max_note_ms) if constraints.max_note_ms else []
    # Right after a velocity token its note-on comes first (no time passes): a stream that ends on a
    # velocity while a note is overdue (a prompt cut there, its held notes handed over) closes it next.
    if overdue and not note_on_next:
        # Only the overdue notes' note-offs stay possible.
        allowed = torch.zeros(len(logits), dtype=torch.bool)
        allowed[[vocab.note_off(pitch) for pitch in overdue]] = True
        logits.masked_fill_(~host_to_device(allowed, logits.device), minus_inf)
        return
    if constraints.no_orphan_note_off:
        allowed = torch.zeros(128, dtype=torch.bool)
        allowed[list(state.open_notes if constraints.repeated_note_offs else state.onsets)] = True
        logits[vocab.NOTE_OFF : vocab.TIME_SHIFT].masked_fill_(~host_to_device(allowed, logits.device), minus_inf)
    if constraints.pitch_range is not None:
        low, high = constraints.pitch_range
        logits[vocab.NOTE_ON : vocab.NOTE_ON + low] = minus_inf
        logits[vocab.NOTE_ON + high + 1 : vocab.NOTE_OFF] = minus_inf
    if notes_blocked:  # neither a note-on nor the velocity that announces one
        logits[vocab.NOTE_ON : vocab.NOTE_OFF] = minus_inf
        logits[vocab.VELOCITY : vocab.PAD] = minus_inf
    if constraints.max_rest_ms and state.model_rest_ms >= constraints.max_rest_ms and not notes_blocked:
        # The rest guard: a model that has waited this long on its own plays (or releases) next. Its
        # waits are its own decision step by step, and a slow, sparse prompt (the Gymnopédie) could
        # talk it into waiting for good (piano card, "Rests"). Only its own time-shifts count: the
        # player's rests are real time, and a stream scored as the player's is never guarded. While
        # no note may start (polyphony full, too soon), waiting stays allowed: time must move on.
        logits[vocab.TIME_SHIFT : vocab.VELOCITY] = minus_inf


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


def sample_id(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
    """The next token id from float logits of shape (vocab,), as a 0-d tensor on their device, read
    by nobody yet; pad is never chosen. When nothing can be sampled (every probability 0 or NaN) it
    is -1, so that the one read back (`choose`) can say so.

    The draw is torch.multinomial's for one sample, the same random numbers and the same result:
    the argmax of p / q with q ~ Exp(1). multinomial reads its input back on the host first (two
    checks of the probabilities), two syncs per step on a GPU; the check here rides on the id."""
    logits = logits.float()
    # fill_, not `logits[PAD] = -inf`: a Python number written to one element of a CUDA tensor is
    # copied from the host and waits for the device (seen on an H200); fill_ passes it to a kernel.
    logits[vocab.PAD].fill_(float("-inf"))
    if settings.greedy:
        return logits.argmax()
    probs = apply_temperature_top_k_top_p(logits, settings)
    best, token = (probs / torch.empty_like(probs).exponential_(generator=generator)).max(0)
    return torch.where(best > 0, token, -1)  # NaN (no distribution) and 0 (no mass) fail


def choose(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """The next token id from float logits of shape (vocab,); pad is never chosen. The step's one
    read back from the device."""
    token = int(sample_id(logits, settings, generator))
    if token < 0:
        raise RuntimeError("no token can be sampled: every token's probability is 0 or not a number")
    return token
