"""Render scores as piano performances, so a model trained on scores meets the world of a pianist.

The offline corpora are scores: quantised, flat velocity, mostly one line, no pedal. A live pianist
plays two hands with dynamics, rubato and pedal. This module plays a score the way the KTH rule
system for music performance describes (Friberg, Bresin and Sundberg 2006), with a random amount of
each rule per piece so that the model learns to follow the player's levels rather than one style:

- dynamics: a level per piece with terraced changes between sections, a phrase arc (louder toward
  the middle of each phrase), metric accents, the melody above the accompaniment by a margin,
  higher melody notes a little louder, and per-note variation;
- timing: a smooth tempo curve (rubato), a phrase arch in tempo, a ritardando at each phrase end and
  a larger one at the end of the piece (the KTH final-ritard curve), chord asynchrony (the melody
  note 10-30 ms before the chord under it, Goebl 2001), articulation per phrase (legato overlap,
  detached, staccato) and a little motor noise;
- sustain pedal as CC64, "syncopated": down just after each harmony change, up just before the
  next, so the reference tokenizer lengthens the notes under it as it does for a real player;
- two hands: chord symbols played as abc2midi plays them (bass and chords), tunes without symbols
  harmonised by a simple rule (the key, then one chord per bar or half bar from I/IV/V/vi that
  holds the melody note), chorales voiced for two hands.

A rendition is deterministic from its seed. `dataset build --render N` adds N renditions of each
score piece; MIDI folders (real performances) are never re-rendered.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pretty_midi

from liveperceiver.core.errors import UserError
from liveperceiver.core.tokenizer import encode_midi

MELODY, INNER, BASS = "melody", "inner", "bass"  # a note's role: how loud, and whether it leads
CHORD_SYMBOLS = "chord symbols"  # part name of abc2midi's accompaniment (bass and chords)
HARMONY = "harmony"  # part name of the left hand the harmoniser adds
HANDS = ("symbols", "harmonise", "chorale")  # the two-hand textures, each can be switched off
PATTERNS = ("block", "oompah", "broken", "arpeggio")  # left-hand figures for a harmonised tune
SAME_ONSET_S = 0.005  # score notes this close start together (abc2midi delays notes by a tick)
VELOCITY_MIN, VELOCITY_MAX = 16, 124
PEDAL_DOWN, PEDAL_UP = 127, 0
MIN_NOTE_S = 0.03  # shorter notes are inaudible on a piano and vanish in 10 ms time steps
MIN_PEDAL_S = 0.12  # a pedal held shorter than this is not worth a change
TIME_STEP_S = 0.005  # resolution of the tempo curve
MIDI_RESOLUTION = 480  # ticks per quarter note of the MIDI file written, at 120 quarter notes a minute
TICKS_PER_SECOND = MIDI_RESOLUTION * 2

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


# --------------------------------------------------------------------------- two hands


def accompany(piece: ScorePiece, chords: Sequence[ChordSpan], pattern: str) -> list[ScoreNote]:
    """A left hand for a melody: root in the bass, the triad in close position under the melody,
    played as a block, oom-pah, broken (Alberti) or arpeggiated figure over the chord's beats."""
    melody = NoteIndex([n for n in piece.notes if n.role == MELODY])
    notes: list[ScoreNote] = []
    for span in chords:
        sounding = [n.pitch for n in melody.sounding(span.start, span.end)]
        ceiling = min(69, max(55, (min(sounding) if sounding else 72) - 2))
        triad = _close_triad(span.chord, ceiling)
        bass = 36 + (span.chord.root - 36) % 12
        if bass > triad[0] - 3:
            bass -= 12
        beats = piece.beats_in(span.start, span.end)
        if len(beats) >= 2:
            pulses = beats
        else:
            parts = 3 if piece.compound else 2
            pulses = list(np.linspace(span.start, span.end, parts + 1)[:-1])
        edges = [*pulses, span.end]
        if pattern == "block":
            notes += [_lh(p, span.start, span.end, BASS if p == bass else INNER) for p in [bass, *triad]]
        elif pattern == "oompah":
            for i, (a, b) in enumerate(zip(edges, edges[1:], strict=False)):
                if i == 0:
                    notes.append(_lh(bass, a, a + 0.9 * (b - a), BASS))
                else:
                    notes += [_lh(p, a, a + 0.5 * (b - a), INNER) for p in triad]
        else:
            notes.append(_lh(bass, span.start, span.end, BASS))
            subs = []
            for a, b in zip(edges, edges[1:], strict=False):
                parts = 3 if piece.compound else 2
                subs += list(np.linspace(a, b, parts + 1)[:-1])
            sub_edges = [*subs, span.end]
            if pattern == "broken":
                figure = [triad[0], triad[2], triad[1], triad[2]]
            else:  # arpeggio: up from the bass through fifth, octave and tenth, and back
                tenth = bass + 12 + (3 if span.chord.minor else 4)
                figure = [p for p in (bass + 7, bass + 12, tenth, bass + 12) if p <= ceiling] or [bass + 7]
            for i, (a, b) in enumerate(zip(sub_edges, sub_edges[1:], strict=False)):
                if i == 0 and pattern == "arpeggio":
                    continue  # the held bass is the first note of the figure
                notes.append(_lh(figure[i % len(figure)], a, b, INNER))
    return notes


def _lh(pitch: int, start: float, end: float, role: str) -> ScoreNote:
    return ScoreNote(int(pitch), float(start), float(end), role, "left", HARMONY)


def _close_triad(chord: Chord, ceiling: int) -> list[int]:
    """The chord's three tones in close position, the highest at or below `ceiling`."""
    top = max(p for p in range(ceiling - 11, ceiling + 1) if p % 12 in chord.pitch_classes)
    below = [p for p in range(top - 1, top - 12, -1) if p % 12 in chord.pitch_classes][:2]
    return sorted([top, *below])


def is_monophonic(notes: Sequence[ScoreNote]) -> bool:
    """One line: at most a tenth of the onsets sound together with another note (double stops)."""
    groups = onset_groups(notes)
    return bool(groups) and sum(len(g) > 1 for g in groups) <= 0.1 * len(groups)


VOICES = ("soprano", "alto", "tenor", "bass")


def chorale_voices(notes: Sequence[ScoreNote]) -> dict[str, list[ScoreNote]] | None:
    """The four voices of a chorale by part name (Soprano/Alto/Tenor/Bass), else four unnamed parts
    ordered by pitch; None when the score is no four-part texture."""
    parts: dict[str, list[ScoreNote]] = {}
    for n in notes:
        parts.setdefault(n.part, []).append(n)
    named = {name.lower(): name for name in parts}
    if all(voice in named for voice in VOICES):
        return {voice: parts[named[voice]] for voice in VOICES}
    if len(parts) == 4:
        ordered = sorted(parts.values(), key=lambda ns: -float(np.mean([n.pitch for n in ns])))
        return dict(zip(VOICES, ordered, strict=True))
    return None


def voice_for_two_hands(
    voices: dict[str, list[ScoreNote]], octave_bass: float, rng: np.random.Generator
) -> list[ScoreNote]:
    """Soprano and alto to the right hand, tenor and bass to the left; the tenor moves to the right hand
    where the left would stretch past an octave and the right can reach it; instrumental doublings are
    dropped; some long bass notes are doubled an octave below, as pianists play cadences."""
    notes = []
    for voice, part in voices.items():
        for n in part:
            role = MELODY if voice == "soprano" else BASS if voice == "bass" else INNER
            notes.append(replace(n, role=role, hand="right" if voice in ("soprano", "alto") else "left"))

    def sounding(voice: str, t: float) -> int | None:
        return next((n.pitch for n in voices[voice] if n.start <= t + SAME_ONSET_S and n.end > t + SAME_ONSET_S), None)

    for n in notes:
        if n.part == voices["tenor"][0].part and n.hand == "left":
            bass, soprano = sounding("bass", n.start), sounding("soprano", n.start)
            if bass is not None and soprano is not None and n.pitch - bass > 12 and soprano - n.pitch <= 12:
                n.hand = "right"
    doubled = []
    for n in notes:
        if n.role == BASS and n.end - n.start >= 0.6 and n.pitch >= 40 and rng.random() < octave_bass:
            doubled.append(replace(n, pitch=n.pitch - 12))
    return sorted(notes + doubled, key=lambda n: (n.start, -n.pitch))


def two_hands(piece: ScorePiece, hands: Sequence[str], style: PerformanceStyle, rng: np.random.Generator) -> ScorePiece:
    """The texture a pianist would play from this score, and its harmony (where the pedal changes).

    - a tune with chord symbols: abc2midi's bass and chords (if "symbols");
    - a tune without: the melody over a harmonised left hand (if "harmonise"), else the melody alone;
    - a chorale: its four voices in two hands (if "chorale"), else all its parts as written."""
    written = [n for n in piece.notes if n.part != CHORD_SYMBOLS]
    symbols = [n for n in piece.notes if n.part == CHORD_SYMBOLS]
    if symbols and "symbols" in hands:
        halves = []
        for a, b in piece.bars():
            beats = piece.beats_in(a, b)
            if len(beats) >= 2 and len(beats) % 2 == 0:
                halves += [(a, beats[len(beats) // 2]), (beats[len(beats) // 2], b)]
            else:
                halves.append((a, b))
        chords = split_at_bars(analyse_harmony(symbols, halves), piece.downbeats)
        return replace(piece, notes=piece.notes, chords=chords)
    if not written:
        return replace(piece, notes=[], chords=[])
    if is_monophonic(written):
        melody_piece = replace(piece, notes=written)
        chords = harmonise(melody_piece)
        notes = written + (accompany(melody_piece, chords, style.pattern) if "harmonise" in hands else [])
        return replace(piece, notes=sorted(notes, key=lambda n: (n.start, -n.pitch)), chords=chords)
    voices = chorale_voices(written) if "chorale" in hands else None
    notes = voice_for_two_hands(voices, style.octave_bass, rng) if voices else written
    beats = [t for t in piece.beats if t >= 0] or [0.0]
    segments = list(zip(beats, [*beats[1:], max(n.end for n in notes)], strict=True))
    return replace(piece, notes=notes, chords=split_at_bars(analyse_harmony(notes, segments), piece.downbeats))


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


# --------------------------------------------------------------------------- the performance


@dataclass
class PerformedNote:
    """A played note: its role and hand stay with it, so tests can check each rule's effect."""

    pitch: int
    velocity: int
    start: float
    end: float
    role: str
    hand: str
    score_start: float  # where it stands in the score (for tests and analysis)


@dataclass
class Performance:
    """One rendition: piano notes in seconds, the sustain pedal as CC64 (time, value), and the
    performed time of each harmony change."""

    notes: list[PerformedNote]
    pedal: list[tuple[float, int]]
    changes: list[float]

    def to_midi(self) -> pretty_midi.PrettyMIDI:
        """One acoustic-piano track, as a recorded pianist's file looks (one track, notes and CC64).
        Times are put on the file's tick grid, so the tokens of the file written are these tokens."""
        midi = pretty_midi.PrettyMIDI(resolution=MIDI_RESOLUTION, initial_tempo=120.0)
        piano = pretty_midi.Instrument(program=0, name="Piano")

        def tick(t: float) -> float:
            return round(t * TICKS_PER_SECOND) / TICKS_PER_SECOND

        piano.notes = [pretty_midi.Note(n.velocity, n.pitch, tick(n.start), tick(n.end)) for n in self.notes]
        piano.control_changes = [pretty_midi.ControlChange(64, value, tick(time)) for time, value in self.pedal]
        midi.instruments.append(piano)
        return midi

    def tokens(self) -> list[int]:
        """The reference tokenizer's tokens of the MIDI file (the pedal lengthens the notes under it).
        Read back from the file's bytes: notes that start together are ordered as in any MIDI file read,
        so the tokens are those of the file a person listens to (`dataset render-example`)."""
        if not self.notes:
            return []
        data = io.BytesIO()
        self.to_midi().write(data)
        return encode_midi(pretty_midi.PrettyMIDI(io.BytesIO(data.getvalue())))


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


def render_performance(piece: ScorePiece, style: PerformanceStyle, rng: np.random.Generator) -> Performance:
    """Play `piece` with `style`: dynamics, tempo, asynchrony, articulation, then the pedal."""
    if not piece.notes:
        return Performance([], [], [])
    notes = sorted(piece.notes, key=lambda n: (n.start, -n.pitch))
    piece = replace(piece, notes=notes)
    levels = velocities(piece, style, rng)
    grid, performed = tempo_curve(piece, style, rng)

    def at(t: float) -> float:
        return float(np.interp(t, grid, performed))

    # Onsets: each chord at its performed time plus motor noise; the melody note leads the rest.
    starts: dict[int, float] = {}
    group_of: dict[int, float] = {}  # note -> its chord's performed time (before the lead)
    previous: tuple[float, float] | None = None  # the last chord's performed and unperturbed times
    for group in onset_groups(notes):
        exact = t = at(group[0].start)
        if style.timing_noise_ms:
            sd = style.timing_noise_ms / 1000
            t += float(np.clip(rng.normal(0.0, sd), -2 * sd, 2 * sd))
        if previous is not None:  # noise never swaps two chords: at least half their written distance
            t = max(t, previous[0] + 0.5 * (exact - previous[1]))
        previous = (t, exact)
        has_melody = any(n.role == MELODY for n in group)
        lead = 0.0
        if style.melody_lead_ms and has_melody and len(group) > 1:
            lead = float(np.clip(rng.normal(style.melody_lead_ms, 2.0), 10.0, 28.0)) / 1000
        for n in group:
            starts[id(n)] = t + (lead if n.role != MELODY else 0.0)
            group_of[id(n)] = t
    # Ends: as written on the performed clock, then the phrase's articulation for the melody.
    bounds = phrase_bounds(piece, style.phrase_bars)
    phrasing = Phrasing(bounds)
    touches = rng.choice(
        ["legato", "staccato", "detached"],
        size=len(bounds),
        p=[style.legato, style.staccato, max(0.0, 1.0 - style.legato - style.staccato)],
    )
    beat_s = float(np.median(np.diff(piece.beats))) if len(piece.beats) > 1 else 0.5
    melody = [n for n in notes if n.role == MELODY]
    next_melody = {id(a): b for a, b in zip(melody, melody[1:], strict=False)}
    performed_notes = []
    for n, velocity in zip(notes, levels, strict=True):
        start = starts[id(n)]
        end = at(n.end) + (group_of[id(n)] - at(n.start))
        if n.role == MELODY:
            touch = touches[phrasing.position(n.start)[0]]
            following = next_melody.get(id(n))
            joined = following is not None and abs(following.start - n.end) <= SAME_ONSET_S
            if touch == "legato" and joined and following.pitch != n.pitch:
                end = starts[id(following)] + style.legato_overlap_ms / 1000
            elif touch == "staccato" and n.end - n.start <= beat_s + SAME_ONSET_S:
                end = start + (end - start) * style.staccato_ratio
            else:
                end = start + (end - start) * style.detached_ratio
        performed_notes.append(
            PerformedNote(n.pitch, velocity, start, max(end, start + MIN_NOTE_S), n.role, n.hand, n.start)
        )
    performed_notes = _one_key_one_note(performed_notes)
    onsets = _onsets_by_score_time(performed_notes)
    changes = [min(onsets(span.start), default=at(span.start)) for span in piece.chords]
    pedal = sustain_pedal(piece.chords, performed_notes, style, rng, at) if style.pedal else []
    shift = -min(0.0, min(n.start for n in performed_notes))
    if shift:
        for n in performed_notes:
            n.start += shift
            n.end += shift
        pedal = [(t + shift, v) for t, v in pedal]
        changes = [t + shift for t in changes]
    return Performance(performed_notes, pedal, changes)


def _one_key_one_note(notes: list[PerformedNote]) -> list[PerformedNote]:
    """A piano key sounds once at a time: a note ends before the next strike of its pitch, and a pitch
    struck twice at once (melody doubled by the accompaniment) keeps the louder strike."""
    by_pitch: dict[int, list[PerformedNote]] = {}
    for n in sorted(notes, key=lambda n: (n.start, -n.velocity)):
        same = by_pitch.setdefault(n.pitch, [])
        if same and n.start - same[-1].start < MIN_NOTE_S:
            continue
        if same and same[-1].end > n.start - 0.005:
            same[-1].end = max(same[-1].start + 0.01, n.start - 0.005)
        same.append(n)
    return sorted((n for same in by_pitch.values() for n in same), key=lambda n: (n.start, -n.pitch))


def _onsets_by_score_time(notes: Sequence[PerformedNote]) -> Callable[[float], list[float]]:
    """The performed onsets of the notes written at a score time."""
    keyed = sorted((n.score_start, n.start) for n in notes)
    times = [k for k, _ in keyed]

    def onsets(t: float) -> list[float]:
        low, high = bisect.bisect_left(times, t - SAME_ONSET_S), bisect.bisect_right(times, t + SAME_ONSET_S)
        return [keyed[i][1] for i in range(low, high)]

    return onsets


def sustain_pedal(
    chords: Sequence[ChordSpan],
    notes: Sequence[PerformedNote],
    style: PerformanceStyle,
    rng: np.random.Generator,
    at: Callable[[float], float],
) -> list[tuple[float, int]]:
    """Syncopated pedalling: for each harmony, down just after its chord is struck, up just before the
    next chord is. A harmony too short for a change keeps the pedal up. The last release comes after
    every note: the reference tokenizer drops the notes that start after the last release."""
    if not chords or not notes:
        return []
    onsets = _onsets_by_score_time(notes)
    last_onset = max(n.start for n in notes)
    events: list[tuple[float, int]] = []
    for index, span in enumerate(chords):
        delay = style.pedal_delay_ms / 1000 * float(rng.uniform(0.8, 1.2))
        down = max(onsets(span.start), default=at(span.start)) + delay
        if index + 1 < len(chords):
            lift = style.pedal_lift_ms / 1000 * float(rng.uniform(0.8, 1.2))
            up = min(onsets(chords[index + 1].start), default=at(chords[index + 1].start)) - lift
            # The tokenizer applies a pedal span at the first note after its release: without one, the
            # next span would read the same notes again. Only the last span may lack it.
            pedalled = rng.random() < style.pedal_density
            if pedalled and up - down >= MIN_PEDAL_S and up < last_onset:
                events += [(down, PEDAL_DOWN), (up, PEDAL_UP)]
        else:
            events += [(down, PEDAL_DOWN), (max(n.end for n in notes) + 0.05, PEDAL_UP)]
    return events


# --------------------------------------------------------------------------- renditions for the dataset


@dataclass(frozen=True)
class RenderSettings:
    """`dataset build --render N`: N renditions per score piece, the textures in `hands`; the score
    as written is kept beside them unless `keep_score` is off."""

    renditions: int = 0
    hands: tuple[str, ...] = HANDS
    keep_score: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.renditions < 0:
            raise UserError(f"--render {self.renditions} must be >= 0")
        unknown = [h for h in self.hands if h not in HANDS]
        if unknown:
            raise UserError(f"--render-hands: unknown {', '.join(unknown)} (known: {', '.join(HANDS)}, or none)")

    def cache_tag(self) -> str:
        """Goes into the conversion cache's key: other settings, other renditions."""
        return f"render={self.renditions}|hands={','.join(self.hands)}|score={int(self.keep_score)}|seed={self.seed}"


def parse_hands(text: str) -> tuple[str, ...]:
    """`symbols,harmonise,chorale`, a subset of them, or `none`."""
    hands = tuple(h.strip() for h in text.split(",") if h.strip() and h.strip() != "none")
    RenderSettings(hands=hands)  # raises on unknown names
    return hands


def rendition_seed(seed: int, name: str, index: int) -> int:
    """A stable seed per piece and rendition (SHA-1, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha1(f"{seed}|{name}|{index}".encode()).digest()[:8], "big")


def render_rendition(piece: ScorePiece, hands: Sequence[str], seed: int) -> Performance:
    """One rendition: a style drawn from the seed, the two-hand texture, the performance."""
    rng = np.random.default_rng(seed)
    style = PerformanceStyle.draw(rng)
    return render_performance(two_hands(piece, hands, style, rng), style, rng)


def render_tokens(
    midi: pretty_midi.PrettyMIDI,
    settings: RenderSettings,
    name: str,
    melody_only: pretty_midi.PrettyMIDI | None = None,
    bars_ql: Sequence[float] | None = None,
) -> list[tuple[int, list[int]]]:
    """(rendition number from 1, tokens) for each rendition of one score piece named `name`."""
    piece = score_piece(midi, melody_only, bars_ql)
    if not piece.notes:
        return []
    result = []
    for index in range(1, settings.renditions + 1):
        tokens = render_rendition(piece, settings.hands, rendition_seed(settings.seed, name, index)).tokens()
        if tokens:
            result.append((index, tokens))
    return result


# --------------------------------------------------------------------------- looking at a rendition


def describe(midi: pretty_midi.PrettyMIDI) -> dict:
    """What a listener would notice, measured on the tokens the model sees (the pedal applied), as
    `eval` measures continuations: notes, seconds, notes per second, polyphony (notes sounding at each
    onset), velocity range and distinct velocity bins, and the share of the time the pedal is down."""
    from liveperceiver.core.tokenizer import decode_notes
    from liveperceiver.training.evaluate import note_stats

    tokens = encode_midi(midi)
    notes = decode_notes(tokens)
    stats = note_stats(tokens)
    seconds = max((n.end for n in notes), default=0.0)
    down = 0.0
    for instrument in midi.instruments:
        pressed_at = None
        for change in sorted((c for c in instrument.control_changes if c.number == 64), key=lambda c: c.time):
            if change.value >= 64 and pressed_at is None:
                pressed_at = change.time
            elif change.value < 64 and pressed_at is not None:
                down += change.time - pressed_at
                pressed_at = None
    velocities = [n.velocity for n in notes] or [0]
    return {
        "notes": len(notes),
        "seconds": round(seconds, 1),
        "notes_per_second": round(stats["density"], 2),
        "polyphony": round(stats["polyphony"], 2),
        "velocity": (min(velocities), int(np.median(velocities)), max(velocities)),
        "velocity_bins": len({v // 4 for v in velocities}),
        "pedal_share": round(down / seconds, 2) if seconds else 0.0,
    }


def run_render_example(args) -> None:
    """`liveperceiver dataset render-example`: one score, one rendition as `build --render` makes it."""
    from liveperceiver.core.errors import atomic_output
    from liveperceiver.core.tokenizer import write_midi
    from liveperceiver.training.dataset import (
        SCORE_SUFFIXES,
        _abc_to_midis,
        _has_abc2midi,
        _score_to_midis,
        music21_corpus_dir,
    )

    if args.source.startswith("music21:"):
        path = music21_corpus_dir() / args.source.removeprefix("music21:")
        name = args.source
    else:
        path = Path(args.source).expanduser()
        name = path.name
    if not path.is_file() or not path.name.lower().endswith(SCORE_SUFFIXES):
        raise UserError(f"{args.source}: not a score file ({', '.join(SCORE_SUFFIXES)})")
    if args.rendition < 1:
        raise UserError(f"--rendition {args.rendition} must be >= 1")
    hands = parse_hands(args.render_hands)
    bars: dict[str, list[float]] = {}
    melody_only: dict[str, bytes] = {}
    if path.name.lower().endswith(".abc") and _has_abc2midi():
        midis = _abc_to_midis(path)
        melody_only = dict(_abc_to_midis(path, ("-NGUI",)))
    else:
        try:
            midis = _score_to_midis(path, bars)
        except Exception as error:  # music21 raises many kinds on files it cannot read
            raise UserError(f"{path}: cannot read the score ({type(error).__name__}: {error})") from None
    tunes = [tune for tune, _ in midis]
    if not midis:
        raise UserError(f"{path}: no tune in this file")
    wanted = tunes[0] if args.tune is None else next((t for t in tunes if t in (args.tune, f"tune{args.tune}")), None)
    if wanted is None:
        raise UserError(
            f"{path}: no tune {args.tune} (tunes: {', '.join(tunes[:20])}{', ...' if len(tunes) > 20 else ''})"
        )
    data = dict(midis)[wanted]
    midi = pretty_midi.PrettyMIDI(io.BytesIO(data))
    plain = pretty_midi.PrettyMIDI(io.BytesIO(melody_only[wanted])) if wanted in melody_only else None
    piece = score_piece(midi, plain, bars.get(wanted))
    if not piece.notes:
        raise UserError(f"{path}: tune {wanted or 1} has no notes")
    seed = rendition_seed(args.render_seed, f"{name}#{wanted}", args.rendition)
    performance = render_rendition(piece, hands, seed)
    rendered = performance.to_midi()
    write_midi(rendered, args.output)
    if args.score_output:
        with atomic_output(args.score_output) as file:
            file.write(data)
    for label, what in (("score", midi), ("rendition", rendered)):
        facts = describe(what)
        print(f"{label:9} " + ", ".join(f"{key} {value}" for key, value in facts.items()))
    if args.wav:
        from liveperceiver.tools.render import render_midi

        render_midi(args.output, args.wav)
