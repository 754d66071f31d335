"""Token-level augmentation, so a model trained on quantised scores can follow a live expressive player.

Each transform decodes tokens to notes (the reference decoder), changes the notes, and re-encodes
them with the reference encoder, so the output is always exact-format tokens: transposition (notes
pushed out of 0-127 are dropped), tempo stretch, velocity scaling + jitter, onset jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liveperceiver.core.tokenizer import Note, decode_notes, encode_events, note_events

MIN_NOTE_S = 0.01  # one time step: shorter notes would vanish on re-encoding


@dataclass
class AugmentConfig:
    probability: float = 0.9  # share of training windows augmented at all (transpose, tempo, loudness)
    expressive_probability: float = 0.5  # share of those also given per-note velocity and onset jitter
    transpose: int = 5  # semitones, uniform in -transpose..+transpose
    tempo: float = 0.12  # time stretch factor uniform in 1 +/- tempo
    velocity_scale: float = 0.25  # velocity x uniform(1 - s, 1 + s)
    velocity_jitter: float = 6.0  # + normal(0, j) per note
    onset_jitter_ms: float = 20.0  # start += normal(0, j ms), clipped to 2 j

    @classmethod
    def from_dict(cls, values: dict) -> AugmentConfig:
        return cls(**values)


def transpose(notes: list[Note], semitones: int) -> list[Note]:
    """Shift pitches; notes pushed outside MIDI's 0-127 are dropped."""
    return [Note(n.pitch + semitones, n.velocity, n.start, n.end) for n in notes if 0 <= n.pitch + semitones <= 127]


def stretch(notes: list[Note], factor: float) -> list[Note]:
    """Play slower (factor > 1) or faster (factor < 1)."""
    return [Note(n.pitch, n.velocity, n.start * factor, n.end * factor) for n in notes]


def scale_velocity(notes: list[Note], factor: float, jitter: np.ndarray) -> list[Note]:
    """Louder/softer overall plus per-note jitter; kept in 1..127 so no note becomes silent."""
    return [
        Note(n.pitch, int(np.clip(round(n.velocity * factor + j), 1, 127)), n.start, n.end)
        for n, j in zip(notes, jitter, strict=True)
    ]


def jitter_onsets(notes: list[Note], offsets_s: np.ndarray) -> list[Note]:
    """Move each note's start (and end, keeping its length) by its own offset, as a human would."""
    moved = []
    for n, offset in zip(notes, offsets_s, strict=True):
        start = max(0.0, n.start + float(offset))
        end = max(start + MIN_NOTE_S, n.end + float(offset))
        moved.append(Note(n.pitch, n.velocity, start, end))
    return moved


def encode_notes(notes: list[Note]) -> list[int]:
    return encode_events(note_events(notes))


def augment_tokens(tokens: list[int], config: AugmentConfig, rng: np.random.Generator) -> list[int]:
    """One random augmentation of a token window (all transforms, each with a random amount)."""
    if rng.random() >= config.probability:
        return list(tokens)
    notes = decode_notes(list(tokens))
    if not notes:
        return list(tokens)
    notes = transpose(notes, int(rng.integers(-config.transpose, config.transpose + 1)))
    notes = stretch(notes, float(rng.uniform(1 - config.tempo, 1 + config.tempo)))
    # Per-note jitter makes velocity and timing tokens unpredictable; applying it to only part of the
    # windows teaches the model to follow a loose player without forgetting tight (score) timing.
    expressive = rng.random() < config.expressive_probability
    velocity_jitter = rng.normal(0.0, config.velocity_jitter, len(notes)) if expressive else np.zeros(len(notes))
    notes = scale_velocity(
        notes, float(rng.uniform(1 - config.velocity_scale, 1 + config.velocity_scale)), velocity_jitter
    )
    if expressive:
        limit = 2 * config.onset_jitter_ms / 1000
        offsets = np.clip(rng.normal(0.0, config.onset_jitter_ms / 1000, len(notes)), -limit, limit)
        notes = jitter_onsets(notes, offsets)
    return encode_notes(notes)
