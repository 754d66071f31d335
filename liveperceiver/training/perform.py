"""Render scores as piano performances, so a model trained on scores meets the world of a pianist.

The offline corpora are scores: quantised, flat velocity, mostly one line, no pedal. A live pianist
plays two hands with dynamics, rubato and pedal. The renderer plays a score the way the KTH rule
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

The stages, one module each: score.py reads the score (roles, bars, key, harmony), hands.py makes
the two-hand texture, expression.py holds the style and its dynamics and tempo rules, and this module
plays the notes (onsets, asynchrony, articulation, pedal) and makes the dataset's renditions.

A rendition is deterministic from its seed. `dataset build --render N` adds N renditions of each
score piece; MIDI folders (real performances) are never re-rendered.
"""

from __future__ import annotations

import bisect
import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pretty_midi

from liveperceiver.core.errors import UserError
from liveperceiver.core.tokenizer import encode_midi, parse_midi
from liveperceiver.training.expression import PerformanceStyle, Phrasing, phrase_bounds, tempo_curve, velocities
from liveperceiver.training.hands import HANDS, two_hands
from liveperceiver.training.score import MELODY, SAME_ONSET_S, ChordSpan, ScorePiece, onset_groups, score_piece

PEDAL_DOWN, PEDAL_UP = 127, 0
MIN_NOTE_S = 0.03  # shorter notes are inaudible on a piano and vanish in 10 ms time steps
MIN_PEDAL_S = 0.12  # a pedal held shorter than this is not worth a change
MIDI_RESOLUTION = 480  # ticks per quarter note of the MIDI file written, at 120 quarter notes a minute
TICKS_PER_SECOND = MIDI_RESOLUTION * 2


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
        return encode_midi(parse_midi(data.getvalue()))


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
