"""The performance style and the expressive rules it sets: how loud each note is played (the piece's
level, terraced sections, a phrase arc, metric accents, the melody above its accompaniment, higher
melody notes louder, per-note variation) and when (a tempo curve of rubato, phrase arch and ritardandi),
after the KTH rule system (Friberg, Bresin and Sundberg 2006). The amount of each rule is drawn per piece.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from liveperceiver.training.score import BASS, MELODY, SAME_ONSET_S, ScorePiece, onset_groups

PATTERNS = ("block", "oompah", "broken", "arpeggio")  # left-hand figures for a harmonised tune
VELOCITY_MIN, VELOCITY_MAX = 16, 124
TIME_STEP_S = 0.005  # resolution of the tempo curve


# --------------------------------------------------------------------------- the performance style


@dataclass
class PerformanceStyle:
    """How much of each rule one rendition applies, drawn per piece. `neutral()` switches every rule
    off (the score as written, at one velocity, no pedal), so a test can turn on one rule at a time."""

    level: float = 64.0  # the piece's base velocity
    terrace: float = 0.0  # velocity step between sections (terraced dynamics)
    arc: float = 0.0  # phrase arc: velocity rise from a phrase's ends to its peak
    accent: float = 0.0  # metric accent on the downbeat (half on the middle of the bar)
    melody_margin: float = 0.0  # melody above the accompaniment by this much
    high_loud: float = 0.0  # velocity per semitone above the melody's mean pitch
    velocity_noise: float = 0.0  # per-note standard deviation
    rubato: float = 0.0  # depth of the smooth tempo curve (log duration)
    arch: float = 0.0  # phrase arch in tempo: slower at a phrase's ends, faster in its middle
    phrase_ritard: float = 0.0  # each phrase's last beat slows to 1 / (1 + phrase_ritard) of the tempo
    final_ritard: float = 0.0  # the final tempo falls to 1 / (1 + final_ritard) of the tempo
    timing_noise_ms: float = 0.0  # per-onset motor noise
    melody_lead_ms: float = 0.0  # the melody note's lead over the rest of its chord (0: none)
    legato: float = 0.0  # share of phrases played legato (overlapping the next melody note)
    staccato: float = 0.0  # share of phrases played staccato (short notes shortened)
    legato_overlap_ms: float = 30.0
    staccato_ratio: float = 0.5  # a staccato note keeps this share of its written length
    detached_ratio: float = 1.0  # notes of the other phrases keep this share
    pedal: bool = False
    pedal_density: float = 1.0  # share of the harmonies pedalled (a light pedaller skips some)
    pedal_delay_ms: float = 80.0  # pedal down this long after the chord's last onset
    pedal_lift_ms: float = 30.0  # pedal up this long before the next chord's first onset
    pattern: str = "block"  # left-hand figure for a harmonised tune
    octave_bass: float = 0.0  # share of long chorale bass notes doubled an octave below
    phrase_bars: int = 4

    @classmethod
    def neutral(cls, **changes) -> PerformanceStyle:
        return replace(cls(), **changes)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> PerformanceStyle:
        """Random amounts per piece: wide enough that the model meets soft and loud, strict and free
        players, narrow enough that each rendition still sounds like a pianist."""
        legato = float(rng.uniform(0.2, 0.9))
        return cls(
            level=float(rng.uniform(38, 92)),
            terrace=float(rng.choice([0.0, 6.0, 10.0, 15.0])),
            arc=float(rng.uniform(4, 18)),
            accent=float(rng.uniform(2, 10)),
            melody_margin=float(rng.uniform(8, 20)),
            high_loud=float(rng.uniform(0.0, 0.5)),
            velocity_noise=float(rng.uniform(2, 6)),
            rubato=float(rng.uniform(0.01, 0.06)),
            arch=float(rng.uniform(0.0, 0.08)),
            phrase_ritard=float(rng.uniform(0.05, 0.3)),
            final_ritard=float(rng.uniform(0.2, 0.8)),
            timing_noise_ms=float(rng.uniform(3, 9)),
            melody_lead_ms=float(rng.uniform(12, 26)),
            legato=legato,
            staccato=float(rng.uniform(0.0, 1.0 - legato)) * 0.6,
            legato_overlap_ms=float(rng.uniform(15, 60)),
            staccato_ratio=float(rng.uniform(0.3, 0.55)),
            detached_ratio=float(rng.uniform(0.75, 0.95)),
            pedal=bool(rng.random() < 0.75),
            pedal_density=float(rng.uniform(0.4, 1.0)),
            pedal_delay_ms=float(rng.uniform(40, 150)),
            pedal_lift_ms=float(rng.uniform(10, 50)),
            pattern=str(rng.choice(PATTERNS, p=[0.3, 0.3, 0.2, 0.2])),
            octave_bass=float(rng.uniform(0.0, 0.4)),
        )


def phrase_bounds(piece: ScorePiece, phrase_bars: int) -> list[tuple[float, float]]:
    """Phrases of `phrase_bars` bars from the first full bar (a pickup joins the first phrase); bars
    shorter than a second are grouped twice as long, bars over four seconds half as long."""
    bars = piece.bars()
    if not bars:
        return [(0.0, piece.end)]
    bar_s = float(np.median([b - a for a, b in bars]))
    size = phrase_bars * 2 if bar_s < 1.0 else max(1, phrase_bars // 2) if bar_s > 4.0 else phrase_bars
    first = 1 if piece.downbeats and piece.downbeats[0] < -SAME_ONSET_S and len(bars) > 1 else 0  # a pickup
    starts = [bars[i][0] for i in range(first, len(bars), size)]
    starts[0] = 0.0
    if len(starts) > 1 and piece.end - starts[-1] < 0.5 * size * bar_s:
        starts.pop()  # a short last phrase joins the one before it
    return list(zip(starts, [*starts[1:], piece.end], strict=True))


class Phrasing:
    """Where a score time stands among the phrases: the phrase's index and the position in it."""

    def __init__(self, bounds: list[tuple[float, float]]):
        self.bounds = bounds
        self.starts = [a for a, _ in bounds]

    def position(self, t: float) -> tuple[int, float]:
        """Index of the phrase holding t and t's position in it (0 at its start, 1 at its end)."""
        i = max(0, min(len(self.bounds) - 1, bisect.bisect_right(self.starts, t) - 1))
        a, b = self.bounds[i]
        return i, min(1.0, max(0.0, (t - a) / max(b - a, 1e-6)))


def velocities(piece: ScorePiece, style: PerformanceStyle, rng: np.random.Generator) -> list[int]:
    """Dynamics for each note of `piece.notes`: level + section terrace + phrase arc + metric accent
    + role (melody above its accompaniment) + high-loud + noise, the melody kept above its chord."""
    phrasing = Phrasing(phrase_bounds(piece, style.phrase_bars))
    sections = len(phrasing.bounds) // 2 + 1  # terraces change every two phrases
    terraces = np.concatenate([[0.0], rng.choice([-1.0, 0.0, 1.0], size=sections - 1)]) * style.terrace
    melody_pitches = [n.pitch for n in piece.notes if n.role == MELODY]
    melody_mean = float(np.mean(melody_pitches)) if melody_pitches else 60.0
    count = len(piece.notes)
    noise = rng.normal(0.0, style.velocity_noise, count) if style.velocity_noise else np.zeros(count)
    accents = metric_weights(piece, [n.start for n in piece.notes]) * style.accent
    peak = math.log(0.5) / math.log(0.6)  # the arc peaks at 60% of the phrase
    values = []
    for note, jitter, accent in zip(piece.notes, noise, accents, strict=True):
        phrase, x = phrasing.position(note.start)
        level = style.level + terraces[phrase // 2] + accent + jitter
        level += style.arc * (math.sin(math.pi * x**peak) - 0.5)
        if note.role == MELODY:
            level += style.melody_margin / 2 + style.high_loud * (note.pitch - melody_mean)
        else:
            level -= style.melody_margin / 2 + (0.0 if note.role == BASS else 2.0)
        values.append(level)
    result = [min(VELOCITY_MAX, max(VELOCITY_MIN, round(v))) for v in values]
    if style.melody_margin > 0:  # the melody sounds above the chord it starts with, whatever the noise
        margin = max(3, round(style.melody_margin / 2))
        index = {id(n): i for i, n in enumerate(piece.notes)}
        for group in onset_groups(piece.notes):
            lead = [index[id(n)] for n in group if n.role == MELODY]
            if lead:
                top = max(result[i] for i in lead)
                for n in group:
                    if n.role != MELODY:
                        result[index[id(n)]] = max(1, min(result[index[id(n)]], top - margin))
    return result


def metric_weights(piece: ScorePiece, times: Sequence[float]) -> np.ndarray:
    """1 on a downbeat, 0.5 on the middle beat of a bar of four or six beats, 0 on other beats, -1/3
    off the beat: the metric accent's shape (its size is the style's)."""
    beats = np.array(piece.beats)
    if not beats.size:
        return np.zeros(len(times))
    weight = np.zeros(len(beats))
    edges = np.searchsorted(beats, np.array([*piece.downbeats, piece.end + 1.0]) - SAME_ONSET_S)
    for first, stop in zip(edges, edges[1:], strict=False):
        count = stop - first
        if count > 0:
            weight[first] = 1.0
        if count >= 4 and count % 2 == 0:
            weight[first + count // 2] = 0.5
    times = np.asarray(times, dtype=float)
    right = np.clip(np.searchsorted(beats, times), 0, len(beats) - 1)
    left = np.clip(right - 1, 0, len(beats) - 1)
    nearest = np.where(np.abs(beats[left] - times) < np.abs(beats[right] - times), left, right)
    on_beat = np.abs(beats[nearest] - times) <= SAME_ONSET_S
    return np.where(on_beat, weight[nearest], -1 / 3)


def tempo_curve(piece: ScorePiece, style: PerformanceStyle, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Score time -> performed time, as two arrays for np.interp. The local duration multiplier is
    exp(rubato + phrase arch + phrase-final ritardando) times the final ritardando."""
    end = piece.end
    grid = np.arange(0.0, end + 2.0, TIME_STEP_S)
    log_d = np.zeros_like(grid)
    bars = piece.bars()
    bar_s = float(np.median([b - a for a, b in bars])) if bars else 2.0
    if style.rubato:
        for _ in range(3):  # a few slow waves, two to eight bars long, random phases
            period = bar_s * float(rng.uniform(2, 8))
            log_d += (
                style.rubato / math.sqrt(3) * np.sin(2 * math.pi * grid / period + float(rng.uniform(0, 2 * math.pi)))
            )
    bounds = phrase_bounds(piece, style.phrase_bars)
    beat_s = float(np.median(np.diff(piece.beats))) if len(piece.beats) > 1 else 0.5
    for index, (a, b) in enumerate(bounds):
        inside = (grid >= a) & (grid < b)
        x = (grid[inside] - a) / max(b - a, 1e-6)
        log_d[inside] += style.arch * ((2 * x - 1) ** 2 - 1 / 3)
        if style.phrase_ritard and index < len(bounds) - 1:
            ramp = np.clip((grid - (b - beat_s)) / beat_s, 0, 1) * (grid < b)
            log_d += math.log1p(style.phrase_ritard) * ramp**2
    duration = np.exp(log_d)
    if style.final_ritard:
        # KTH final ritard: tempo v(x) = (1 + (w^q - 1) x)^(1/q) over the last two bars before the last onset
        last_onset = max(n.start for n in piece.notes)
        length = min(2 * bar_s, last_onset) or bar_s
        x = np.clip((grid - (last_onset - length)) / length, 0, 1)
        w, q = 1.0 / (1.0 + style.final_ritard), 2.0
        duration /= (1 + (w**q - 1) * x) ** (1 / q)
    performed = np.concatenate([[0.0], np.cumsum(duration[:-1]) * TIME_STEP_S])
    return grid, performed
