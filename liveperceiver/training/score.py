"""The score as the performance renderer reads it: notes with their roles (melody, inner, bass) and
hands, bars and beats, the key, and the harmony (where a pianist changes the pedal).

A score's MIDI export says little of this: abc2midi's chord-symbol accompaniment is told apart by the
same tune exported without it, the bars come from music21 or from abc2midi's accents, the key from the
Krumhansl-Schmuckler profiles. hands.py, expression.py and perform.py build on it (perform.py says why).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pretty_midi

MELODY, INNER, BASS = "melody", "inner", "bass"  # a note's role: how loud, and whether it leads
CHORD_SYMBOLS = "chord symbols"  # part name of abc2midi's accompaniment (bass and chords)
HARMONY = "harmony"  # part name of the left hand the harmoniser adds
SAME_ONSET_S = 0.005  # score notes this close start together (abc2midi delays notes by a tick)

# Krumhansl-Kessler key profiles (major, minor), tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


# --------------------------------------------------------------------------- the score


@dataclass
class ScoreNote:
    """A note of the score, on the score's own clock (seconds of the quantised MIDI file)."""

    pitch: int
    start: float
    end: float
    role: str = MELODY
    hand: str = "right"
    part: str = ""  # the instrument's name, CHORD_SYMBOLS or HARMONY


@dataclass(frozen=True)
class Chord:
    """A triad by its root pitch class; enough for I/IV/V/vi and for pedalling."""

    root: int
    minor: bool

    @property
    def pitch_classes(self) -> frozenset[int]:
        return frozenset({self.root % 12, (self.root + (3 if self.minor else 4)) % 12, (self.root + 7) % 12})


@dataclass
class ChordSpan:
    start: float
    end: float
    chord: Chord
    degree: str = ""  # "I", "IV", "V", "vi" (or the minor key's "i", "iv", "V", "VI") when harmonised


@dataclass(frozen=True)
class Key:
    tonic: int
    minor: bool

    def chords(self) -> dict[str, Chord]:
        """The four chords the harmoniser may use: I/IV/V/vi, or in minor i/iv/V/VI."""
        t = self.tonic
        if self.minor:
            degrees = {"i": (0, True), "iv": (5, True), "V": (7, False), "VI": (8, False)}
        else:
            degrees = {"I": (0, False), "IV": (5, False), "V": (7, False), "vi": (9, True)}
        return {name: Chord((t + step) % 12, minor) for name, (step, minor) in degrees.items()}


@dataclass
class ScorePiece:
    """What the renderer needs of a score: its notes with roles, bars and beats, key and harmony."""

    notes: list[ScoreNote]
    downbeats: list[float]  # bar starts, ascending; the first may lie before 0 (a pickup)
    beats: list[float]  # beat starts, downbeats included
    key: Key
    compound: bool = False  # beats divide in three (6/8, 9/8, 12/8)
    chords: list[ChordSpan] = field(default_factory=list)

    @property
    def end(self) -> float:
        return max((n.end for n in self.notes), default=0.0)

    def bars(self) -> list[tuple[float, float]]:
        """(start, end) of each bar that holds music; the first starts at 0 or at its downbeat."""
        end = self.end
        edges = [max(0.0, t) for t in self.downbeats if t < end - SAME_ONSET_S] + [end]
        return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b - a > SAME_ONSET_S]

    def beats_in(self, start: float, end: float) -> list[float]:
        """The beats in [start, end), starting with `start` itself (a span may begin off the beat)."""
        low = bisect.bisect_left(self.beats, start - SAME_ONSET_S)
        high = bisect.bisect_left(self.beats, end - SAME_ONSET_S)
        inside = self.beats[low:high]
        return inside if inside and abs(inside[0] - start) <= SAME_ONSET_S else [start, *inside]


# --------------------------------------------------------------------------- reading a score from MIDI


def score_piece(
    midi: pretty_midi.PrettyMIDI,
    melody_only: pretty_midi.PrettyMIDI | None = None,
    bars_ql: Sequence[float] | None = None,
) -> ScorePiece:
    """The piece in a score's MIDI export. `melody_only` is abc2midi's output without chord symbols
    (-NGUI): notes missing from it are the chord-symbol accompaniment. `bars_ql` are the bar starts in
    quarter notes where music21 knows them; otherwise the bars are fitted to the note accents."""
    written_keys: Counter | None = None
    if melody_only is not None:
        written_keys = Counter(
            (n.pitch, round(n.start, 3)) for ins in melody_only.instruments if not ins.is_drum for n in ins.notes
        )
    written: list[tuple[str, list[pretty_midi.Note]]] = []
    symbols: list[list[pretty_midi.Note]] = []
    for index, instrument in enumerate(midi.instruments):
        if instrument.is_drum or not instrument.notes:
            continue
        if written_keys is None:
            written.append((instrument.name.strip() or f"part {index + 1}", instrument.notes))
            continue
        mine, theirs = [], []
        for note in instrument.notes:
            key = (note.pitch, round(note.start, 3))
            if written_keys[key] > 0:
                written_keys[key] -= 1
                mine.append(note)
            else:
                theirs.append(note)
        if mine:
            written.append((instrument.name.strip() or f"part {index + 1}", mine))
        if theirs:
            symbols.append(theirs)
    notes = _written_notes(written) + _symbol_notes(symbols)
    notes.sort(key=lambda n: (n.start, -n.pitch))
    downbeats, beats, compound = metric_grid(midi, bars_ql, [n for n in notes if n.part != CHORD_SYMBOLS])
    signature = midi.key_signature_changes[0].key_number if midi.key_signature_changes else None
    return ScorePiece(notes, downbeats, beats, estimate_key(notes, signature), compound)


def _written_notes(parts: list[tuple[str, list[pretty_midi.Note]]]) -> list[ScoreNote]:
    """The score's own parts: the top note of each onset in the melody part leads; the lowest part is bass."""
    if not parts:
        return []
    means = [float(np.mean([n.pitch for n in notes])) for _, notes in parts]
    names = [name.lower() for name, _ in parts]
    melody = names.index("soprano") if "soprano" in names else int(np.argmax(means))
    bass = int(np.argmin(means)) if len(parts) > 1 else -1
    result = []
    for index, (name, notes) in enumerate(parts):
        hand = "left" if index == bass or (len(parts) > 2 and means[index] < np.median(means)) else "right"
        role = BASS if index == bass else INNER
        part_notes = [ScoreNote(n.pitch, n.start, n.end, role, hand, name) for n in notes]
        if index == melody:
            for group in onset_groups(part_notes):
                top = max(group, key=lambda n: n.pitch)
                top.role = MELODY
        result += part_notes
    return result


def _symbol_notes(instruments: list[list[pretty_midi.Note]]) -> list[ScoreNote]:
    """abc2midi's chord-symbol accompaniment: its lowest channel is the bass, the other the chords."""
    if not instruments:
        return []
    lowest = int(np.argmin([np.mean([n.pitch for n in notes]) for notes in instruments]))
    return [
        ScoreNote(
            n.pitch, n.start, n.end, BASS if i == lowest and len(instruments) > 1 else INNER, "left", CHORD_SYMBOLS
        )
        for i, notes in enumerate(instruments)
        for n in notes
    ]


def onset_groups(notes: Sequence[ScoreNote]) -> list[list[ScoreNote]]:
    """Notes that start together (within SAME_ONSET_S of the group's first), in time order."""
    groups: list[list[ScoreNote]] = []
    for note in sorted(notes, key=lambda n: n.start):
        if groups and note.start - groups[-1][0].start <= SAME_ONSET_S:
            groups[-1].append(note)
        else:
            groups.append([note])
    return groups


def _tick_to_time(midi: pretty_midi.PrettyMIDI) -> Callable[[float], float]:
    """Ticks to seconds through the tempo map; ticks before 0 (a pickup's downbeat) at the first tempo."""
    times, tempi = midi.get_tempo_changes()
    if len(times) == 0:
        times, tempi = np.array([0.0]), np.array([120.0])
    ticks = [midi.time_to_tick(t) for t in times]

    def convert(tick: float) -> float:
        i = max(0, bisect.bisect_right(ticks, tick) - 1)
        return float(times[i] + (tick - ticks[i]) * 60.0 / (tempi[i] * midi.resolution))

    return convert


def metric_grid(
    midi: pretty_midi.PrettyMIDI, bars_ql: Sequence[float] | None, notes: Sequence[ScoreNote]
) -> tuple[list[float], list[float], bool]:
    """Downbeats and beats in seconds, and whether the metre is compound.

    music21 knows where its bars start (pickups included); abc2midi's MIDI does not say, but it
    accents the first note of each bar (velocity 105 against 95 and 80), so the bar phase that
    collects the most accent is the one abc2midi read from the bar lines. With no accents at all
    (a flat-velocity export), longer notes mark the downbeats."""
    resolution = midi.resolution
    to_time = _tick_to_time(midi)
    signatures = [(midi.time_to_tick(ts.time), ts.numerator, ts.denominator) for ts in midi.time_signature_changes] or [
        (0, 4, 4)
    ]
    if signatures[0][0] > 0:
        signatures.insert(0, (0, 4, 4))
    end_tick = midi.time_to_tick(max((n.end for n in notes), default=0.0)) + 1

    def bar_and_beat(tick: float) -> tuple[float, float, bool]:
        _, numerator, denominator = signatures[max(0, bisect.bisect_right([s[0] for s in signatures], tick) - 1)]
        quarter = resolution * 4 / denominator
        compound = numerator % 3 == 0 and numerator > 3 and denominator >= 8
        return numerator * quarter, quarter * (3 if compound else 1), compound

    if bars_ql:
        bar_ticks = [ql * resolution for ql in bars_ql]
    else:
        bar, _, _ = bar_and_beat(0)
        phase = _bar_phase(midi, notes, bar)
        first = phase - bar * math.ceil(phase / bar) if phase > 0 else 0.0
        bar_ticks, tick = [], first
        while tick < end_tick:
            bar_ticks.append(tick)
            length, _, _ = bar_and_beat(max(tick, 0))
            next_change = next((s[0] for s in signatures[1:] if tick < s[0] < tick + length), None)
            tick = next_change if next_change is not None else tick + length
    beats: list[float] = []
    for a, b in zip(bar_ticks, [*bar_ticks[1:], end_tick], strict=True):
        _, beat, _ = bar_and_beat(max(a, 0))
        beats += [to_time(t) for t in np.arange(a, max(b, a + 1), beat)]
    return [to_time(t) for t in bar_ticks], beats, bar_and_beat(0)[2]


def _bar_phase(midi: pretty_midi.PrettyMIDI, notes: Sequence[ScoreNote], bar: float) -> float:
    """Ticks from 0 to the first downbeat: the phase (on a 16th-note grid) that collects most accent."""
    if not notes:
        return 0.0
    velocity = {}
    for instrument in midi.instruments:
        for n in instrument.notes:
            velocity[(n.pitch, round(n.start, 3))] = n.velocity
    grid = midi.resolution / 4
    onsets = np.array([round(midi.time_to_tick(n.start) / grid) * grid for n in notes])
    levels = np.array([velocity.get((n.pitch, round(n.start, 3)), 64) for n in notes], dtype=float)
    weights = np.clip(levels - np.median(levels), 0, None)
    if not weights.any():
        weights = np.array([midi.time_to_tick(n.end) - midi.time_to_tick(n.start) for n in notes], dtype=float)
    phases = np.arange(0, bar, grid)
    scores = []
    for phase in phases:
        offset = np.mod(onsets - phase, bar)
        scores.append(float(weights[(offset < 1) | (offset > bar - 1)].sum()))
    return float(phases[int(np.argmax(scores))])  # ties: the earliest phase, i.e. no pickup


# --------------------------------------------------------------------------- key and harmony


def estimate_key(notes: Sequence[ScoreNote], signature: int | None = None) -> Key:
    """Krumhansl-Schmuckler on duration-weighted pitch classes; a key signature (pretty_midi's key
    number) narrows the choice to its major and relative minor, the last melody note breaks near-ties."""
    histogram = np.zeros(12)
    for n in notes:
        histogram[n.pitch % 12] += n.end - n.start
    if signature is None:
        candidates = [Key(t, m) for t in range(12) for m in (False, True)]
    else:
        major = signature if signature < 12 else (signature - 12 + 3) % 12
        candidates = [Key(major, False), Key((major + 9) % 12, True)]
    melody = [n for n in notes if n.role == MELODY] or list(notes)
    final = max(melody, key=lambda n: n.start).pitch % 12 if melody else None

    def score(key: Key) -> float:
        profile = np.roll(MINOR_PROFILE if key.minor else MAJOR_PROFILE, key.tonic)
        fit = float(np.corrcoef(histogram, profile)[0, 1]) if histogram.any() else 0.0
        return fit + (0.2 if final == key.tonic else 0.0)

    return max(candidates, key=score)


class NoteIndex:
    """Notes sorted by start, to find those sounding in a time span without scanning them all."""

    def __init__(self, notes: Sequence[ScoreNote]):
        self.notes = sorted(notes, key=lambda n: n.start)
        self.starts = [n.start for n in self.notes]
        self.longest = max((n.end - n.start for n in self.notes), default=0.0)

    def sounding(self, start: float, end: float) -> list[ScoreNote]:
        """Notes that sound somewhere in [start, end), in order of their starts."""
        low = bisect.bisect_left(self.starts, start - self.longest)
        high = bisect.bisect_left(self.starts, end)
        return [n for n in self.notes[low:high] if n.end > start]


def _segment_weights(notes: Sequence[ScoreNote], start: float, end: float) -> np.ndarray:
    """Pitch-class weights of what sounds in [start, end): overlap duration, the note sounding at the
    segment's start counted double (it is what a listener hears the chord against)."""
    weights = np.zeros(12)
    for n in notes:
        overlap = min(n.end, end) - max(n.start, start)
        if overlap > 0:
            weights[n.pitch % 12] += overlap * (2.0 if n.start <= start + SAME_ONSET_S else 1.0)
    return weights


def harmonise(piece: ScorePiece) -> list[ChordSpan]:
    """One chord per bar (or half bar where one chord does not fit) from I/IV/V/vi of the key, holding
    the melody note at the chord's start, then the most melody; I opens and closes, V before the end.
    A chord repeated in the next bar is a span of its own: the left hand plays each bar."""
    melody = NoteIndex([n for n in piece.notes if n.role == MELODY])
    chords = piece.key.chords()
    names = list(chords)  # tonic first, then IV, V, vi: the order that breaks ties toward the simple
    bars = piece.bars()
    segments: list[tuple[float, float]] = []
    for a, b in bars:
        beats = piece.beats_in(a, b)
        fit_bar = _best_fit(melody, a, b, chords, names)[1]
        if len(beats) >= 2 and len(beats) % 2 == 0 and fit_bar < 0.9:
            middle = beats[len(beats) // 2]
            halves = [_best_fit(melody, a, middle, chords, names)[1], _best_fit(melody, middle, b, chords, names)[1]]
            if min(halves) > fit_bar + 0.05:
                segments += [(a, middle), (middle, b)]
                continue
        segments.append((a, b))
    spans: list[ChordSpan] = []
    for index, (a, b) in enumerate(segments):
        bonus = {}
        if index == 0 or index == len(segments) - 1:
            bonus[names[0]] = 0.3
        elif index == len(segments) - 2:
            bonus["V"] = 0.1
        name, _ = _best_fit(melody, a, b, chords, names, bonus)
        spans.append(ChordSpan(a, b, chords[name], name))  # a repeated chord is struck (and pedalled) again
    return spans


def _best_fit(
    melody: NoteIndex,
    start: float,
    end: float,
    chords: dict[str, Chord],
    names: list[str],
    bonus: dict[str, float] | None = None,
) -> tuple[str, float]:
    """The chord for one segment and the share of the melody it holds."""
    notes = melody.sounding(start, end)
    weights = _segment_weights(notes, start, end)
    total = weights.sum()
    if total == 0:
        return names[0], 1.0
    held = [n for n in notes if n.end > start + SAME_ONSET_S]  # the note heard at the chord's start
    first = held[0] if held else notes[0]
    allowed = [name for name in names if first is None or first.pitch % 12 in chords[name].pitch_classes] or names
    shares = {name: sum(weights[pc] for pc in chords[name].pitch_classes) / total for name in allowed}
    best = max(allowed, key=lambda name: shares[name] + (bonus or {}).get(name, 0.0))
    return best, float(shares[best])


TRIADS = [Chord(root, minor) for root in range(12) for minor in (False, True)]
TRIAD_MASKS = np.array([[pc in chord.pitch_classes for pc in range(12)] for chord in TRIADS], dtype=float)


def analyse_harmony(notes: Sequence[ScoreNote], segments: Sequence[tuple[float, float]]) -> list[ChordSpan]:
    """The triad holding most of each segment's sound (the bass counted extra), consecutive equal
    chords merged: where a polyphonic score changes harmony, so where the pedal changes."""
    spans: list[ChordSpan] = []
    index = NoteIndex(notes)
    for a, b in segments:
        sounding = index.sounding(a, b)
        weights = _segment_weights(sounding, a, b)
        if not weights.any():
            if spans:
                spans[-1].end = b
            continue
        lowest = min(sounding, key=lambda n: n.pitch)
        weights[lowest.pitch % 12] += weights.max() * 0.5  # the bass names the root more often than not

        chord = TRIADS[int(np.argmax(TRIAD_MASKS @ weights))]
        if spans and spans[-1].chord == chord:
            spans[-1].end = b
        else:
            spans.append(ChordSpan(a, b, chord))
    return spans


def split_at_bars(spans: Sequence[ChordSpan], downbeats: Sequence[float]) -> list[ChordSpan]:
    """A harmony held over a bar line is changed there too: a pianist re-pedals at least once a bar."""
    result = []
    for span in spans:
        cuts = [t for t in downbeats if span.start + SAME_ONSET_S < t < span.end - SAME_ONSET_S]
        edges = [span.start, *cuts, span.end]
        result += [replace(span, start=a, end=b) for a, b in zip(edges, edges[1:], strict=False)]
    return result
