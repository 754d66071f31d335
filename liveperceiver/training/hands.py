"""Two hands from a score: the texture a pianist would play from it and its harmony (where the pedal
changes). Chord symbols are played as abc2midi plays them (bass and chords), a tune without them gets a
harmonised left hand (block, oom-pah, broken or arpeggiated), a chorale's four voices are shared
between the hands; each texture can be switched off (`HANDS`, `dataset build --render-hands`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from liveperceiver.training.expression import PerformanceStyle
from liveperceiver.training.score import (
    BASS,
    CHORD_SYMBOLS,
    HARMONY,
    INNER,
    MELODY,
    SAME_ONSET_S,
    Chord,
    ChordSpan,
    NoteIndex,
    ScoreNote,
    ScorePiece,
    analyse_harmony,
    harmonise,
    onset_groups,
    split_at_bars,
)

HANDS = ("symbols", "harmonise", "chorale")  # the two-hand textures, each can be switched off


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
