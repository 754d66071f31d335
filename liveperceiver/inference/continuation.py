"""Offline continuation: a prompt (MIDI file or token list) in, the model's continuation out, on the engine."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from liveperceiver.core import vocab
from liveperceiver.core.stream import played_notes
from liveperceiver.core.tokenizer import Note, notes_to_midi, write_midi
from liveperceiver.inference.engine import Engine
from liveperceiver.inference.sampling import StreamState


@dataclass
class Continuation:
    prompt: list[int]
    generated: list[int]

    def music_seconds(self) -> float:
        return seconds_of(self.generated)

    def notes(self, include_prompt: bool) -> list[Note]:
        """The notes as `play` sounds them (`stream.played_notes`: a pitch struck again while it sounds
        is two notes, where the reference decoder keeps only the second); notes still sounding at the
        end are closed there, so none are lost.

        The whole sequence is decoded (so the continuation keeps the prompt's velocity and its
        note-offs match); without the prompt, notes starting before the continuation are dropped
        and times start at 0."""
        tokens = self.prompt + self.generated
        state = StreamState()
        for token in tokens:
            state.push(token)
        closing = [vocab.TIME_SHIFT] + [vocab.note_off(pitch) for pitch in sorted(state.sounding)]
        notes = played_notes(tokens + closing)
        if include_prompt:
            return notes
        offset = seconds_of(self.prompt)
        kept = [note for note in notes if note.start >= offset - 1e-9]
        return [Note(n.pitch, n.velocity, n.start - offset, n.end - offset) for n in kept]


def seconds_of(tokens: list[int]) -> float:
    """Music time that time-shift tokens add up to."""
    steps = sum(vocab.time_shift_steps(t) for t in tokens if vocab.TIME_SHIFT <= t < vocab.VELOCITY)
    return steps * vocab.TIME_STEP_S


def handover_flags(prompt: list[int]) -> list[int]:
    """`sampled` flags for appending a prompt that the model continues: 1 on the note-on of each note
    the prompt leaves sounding, 0 elsewhere.

    Why: a prompt cut from a piece often ends with notes held (a pedalled bass, a chord). In a live
    session the player ends their own notes; offline nobody would, and the note-length guard
    (`max_note_seconds`) watches only the model's notes. Handed over, they are the continuation's to
    end, and the guard closes them like its own once they have sounded that long."""
    open_at: dict[int, int] = {}  # pitch -> index of the note-on that sounds it now
    for index, token in enumerate(prompt):
        if token < vocab.NOTE_OFF:
            open_at[token] = index
        elif token < vocab.TIME_SHIFT:
            open_at.pop(token - vocab.NOTE_OFF, None)
    flags = [0] * len(prompt)
    for index in open_at.values():
        flags[index] = 1
    return flags


def append_as_played(engine: Engine, tokens: Sequence[int], sampled: Sequence[int] | None = None) -> None:
    """`engine.append`, one token at a time with the window's rows run after each (`prepare`), as a
    live session's engine runs them between the player's events: an offline continuation so judges
    the session cache's weight and teaches the output layer (dynamic.py) by every prompt token, as
    `play` would have (appended at once, only the tokens in the first step's window would be).
    Without kept rows: `append`."""
    if not engine.keeps_rows():
        engine.append(tokens, sampled)
        return
    flags = [0] * len(tokens) if sampled is None else list(sampled)
    for token, flag in zip(tokens, flags, strict=True):
        engine.append([token], [flag])
        engine.prepare()


def continue_prompt(engine: Engine, prompt: Sequence[int], count: int) -> list[int]:
    """Append `prompt` as played (`append_as_played`) with its sounding notes handed over
    (`handover_flags`), and sample `count` tokens."""
    append_as_played(engine, prompt, sampled=handover_flags(list(prompt)))
    return engine.sample(count)


def generate(engine: Engine, prompt: list[int], max_new_tokens: int, seconds: float | None = None) -> Continuation:
    """Sample until `max_new_tokens` or until the continuation holds `seconds` of music; the notes the
    prompt leaves sounding are the continuation's to end (`handover_flags`); the prompt is appended
    as played (`append_as_played`)."""
    append_as_played(engine, prompt, sampled=handover_flags(prompt))
    generated: list[int] = []
    steps_10ms = 0
    limit_10ms = None if seconds is None else round(seconds * 100)
    with tqdm(total=max_new_tokens, unit="tok", disable=not sys.stderr.isatty(), leave=False) as progress:
        while len(generated) < max_new_tokens:
            token = engine.step()
            generated.append(token)
            progress.update()
            if vocab.TIME_SHIFT <= token < vocab.VELOCITY:
                steps_10ms += vocab.time_shift_steps(token)
                if limit_10ms is not None and steps_10ms >= limit_10ms:
                    break
    return Continuation(list(prompt), generated)


def write_continuation(continuation: Continuation, path: Path, include_prompt: bool) -> None:
    write_midi(notes_to_midi(continuation.notes(include_prompt)), path)
