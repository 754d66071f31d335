"""Offline performance tokenizer: MIDI files <-> token ids, exactly as perceiver-io 0.11.0 does it.

The reference (`perceiver/data/audio/midi_processor.py`) has quirks that the seed model was trained
with, so we reproduce them on purpose (the golden files in tests/golden pin each one):

- every gap between consecutive events is rounded to 10 ms on its own (rounding errors accumulate);
- a velocity token is emitted when the note's bin differs from the previous event's *raw*
  velocity (note-offs count as "no velocity"), so one precedes almost every note-on;
- the sustain pedal (CC64) lengthens notes that start while it is down to the next onset of the
  same pitch or to the release; notes after the last release are dropped, a pedal never released is
  ignored, and a pedal span with no later note makes the next span re-read earlier notes;
- decode drops unmatched and zero-length notes and pairs a note-off with the latest note-on.
"""

from __future__ import annotations

import gzip
import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pretty_midi

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError, atomic_output, check_outputs

# music21 writes 10,080 ticks per quarter and a session recording one tick per ms, so long pieces pass
# pretty_midi's MAX_TICK (10^7; it guards the tick -> time table it allocates, 8 bytes per tick).
MAX_TICK = 10**9
_MAX_TICK_LOCK = threading.RLock()

DECODED_PROGRAM = 1  # the program the reference writes for its single decoded track


@dataclass
class Note:
    """A note with times in seconds; mutable because the pedal rule moves `end`."""

    pitch: int
    velocity: int
    start: float
    end: float


@dataclass
class NoteEvent:
    """One half of a note in the token timeline: a note-on (with velocity) or a note-off."""

    kind: str  # "note_on" or "note_off"
    time: float
    pitch: int
    velocity: int | None


# --------------------------------------------------------------------------- reading MIDI files


@contextmanager
def _long_files_allowed() -> Iterator[None]:
    """pretty_midi's MAX_TICK raised to ours while the block runs, under a lock, then restored.

    Why scoped: pretty_midi reads that module global while it parses a file and in `tick_to_time`;
    raising it for good on import would change it for every user of pretty_midi in the process."""
    module = pretty_midi.pretty_midi
    with _MAX_TICK_LOCK:
        default = module.MAX_TICK
        module.MAX_TICK = max(default, MAX_TICK)
        try:
            yield
        finally:
            module.MAX_TICK = default


class LongMidi(pretty_midi.PrettyMIDI):
    """A PrettyMIDI of up to MAX_TICK ticks: `parse_midi` reads it, and its tick -> time conversion
    (which `get_tempo_changes` uses) accepts its late ticks as well."""

    def tick_to_time(self, tick):
        with _long_files_allowed():
            return super().tick_to_time(tick)


def parse_midi(data: bytes) -> pretty_midi.PrettyMIDI:
    """pretty_midi's reading of MIDI file bytes, up to MAX_TICK ticks; raises what pretty_midi raises."""
    with _long_files_allowed():
        return LongMidi(io.BytesIO(data))


def read_midi(path: str | Path) -> pretty_midi.PrettyMIDI:
    """Read a MIDI file (.mid, .midi or .mid.gz); a corrupt or non-MIDI file raises UserError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read MIDI file ({error.strerror or error})") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise UserError(f"{path}: not a valid gzip file ({error})") from None
    if not data.startswith(b"MThd"):
        raise UserError(f"{path}: not a MIDI file (no MThd header)")
    try:
        return parse_midi(data)
    except Exception as error:  # mido and pretty_midi raise many kinds on corrupt data
        raise UserError(f"{path}: corrupt MIDI file ({type(error).__name__}: {error})") from None


def instrument_notes(midi: pretty_midi.PrettyMIDI) -> list[tuple[list[Note], list[tuple[float, int]]]]:
    """Per instrument: its notes in pretty_midi's order and its CC64 events as (time, value)."""
    parts = []
    for instrument in midi.instruments:
        notes = [Note(n.pitch, n.velocity, n.start, n.end) for n in instrument.notes]
        pedal = [(c.time, c.value) for c in instrument.control_changes if c.number == 64]
        parts.append((notes, pedal))
    return parts


# --------------------------------------------------------------------------- the pedal rule


@dataclass
class _PedalSpan:
    start: float
    end: float
    held: list[Note]

    def apply(self) -> None:
        """Lengthen held notes: to the next onset of the same pitch in this span, else to the release."""
        next_onset: dict[int, float] = {}
        for note in reversed(self.held):
            if note.pitch in next_onset:
                note.end = next_onset[note.pitch]
            else:
                note.end = max(self.end, note.end)
            next_onset[note.pitch] = note.start


def pedal_spans(pedal: list[tuple[float, int]]) -> list[_PedalSpan]:
    """Pedal-down spans from CC64 values (>= 64 down); extra ups extend the previous span's end."""
    spans: list[_PedalSpan] = []
    down_at: float | None = None
    for time, value in pedal:
        if value >= 64 and down_at is None:
            down_at = time
        elif value < 64 and down_at is not None:
            spans.append(_PedalSpan(down_at, time, []))
            down_at = None
        elif value < 64 and spans:
            spans[-1].end = time
    return spans


def apply_pedal(notes: list[Note], spans: list[_PedalSpan]) -> list[Note]:
    """The reference pedal rule, quirks included (see module docstring)."""
    stream: list[Note] = []
    remaining = notes
    for span in spans:
        for index, note in enumerate(remaining):
            if note.start < span.start:
                stream.append(note)
            elif note.start > span.end:
                remaining = remaining[index:]
                span.apply()
                break
            else:
                span.held.append(note)
    for span in spans:
        stream += span.held
    stream.sort(key=lambda note: note.start)
    return stream


# --------------------------------------------------------------------------- encode


def time_shift_tokens(gap_s: float) -> list[int]:
    """Time-shift tokens for one gap: rounded to 10 ms, 1 s shifts repeated, then the remainder."""
    steps = int(round(gap_s * 100))
    tokens = []
    while steps >= vocab.NUM_TIME_SHIFTS:
        tokens.append(vocab.TIME_SHIFT + vocab.NUM_TIME_SHIFTS - 1)
        steps -= vocab.NUM_TIME_SHIFTS
    if steps > 0:
        tokens.append(vocab.TIME_SHIFT + steps - 1)
    return tokens


def event_tokens(event: NoteEvent, previous_velocity: int | None) -> list[int]:
    """Tokens of one note event; a velocity token when the bin differs from the previous raw velocity."""
    if event.kind == "note_off":
        return [vocab.note_off(event.pitch)]
    tokens = []
    if event.velocity // 4 != previous_velocity:
        tokens.append(vocab.velocity_token(event.velocity))
    tokens.append(vocab.note_on(event.pitch))
    return tokens


def note_events(notes: list[Note]) -> list[NoteEvent]:
    """Split notes (ordered by start, ties kept) into on/off events ordered by time, ties kept."""
    events = []
    for note in sorted(notes, key=lambda n: n.start):
        events.append(NoteEvent("note_on", note.start, note.pitch, note.velocity))
        events.append(NoteEvent("note_off", note.end, note.pitch, None))
    events.sort(key=lambda event: event.time)
    return events


def encode_events(events: list[NoteEvent]) -> list[int]:
    """Tokens for time-ordered note events, starting at time 0."""
    tokens: list[int] = []
    current_time = 0.0
    current_velocity: int | None = 0
    for event in events:
        tokens += time_shift_tokens(event.time - current_time)
        tokens += event_tokens(event, current_velocity)
        current_time = event.time
        current_velocity = event.velocity
    return tokens


def encode_midi(midi: pretty_midi.PrettyMIDI) -> list[int]:
    """Token ids of a parsed MIDI file, all instruments merged (drums included), pedal applied."""
    notes: list[Note] = []
    for instrument_notes_, pedal in instrument_notes(midi):
        spans = pedal_spans(pedal)
        notes += apply_pedal(instrument_notes_, spans) if spans else instrument_notes_
    return encode_events(note_events(notes))


def encode_file(path: str | Path) -> list[int]:
    """Token ids of a MIDI file; a corrupt or note-less file raises UserError."""
    midi = read_midi(path)
    if not any(instrument.notes for instrument in midi.instruments):
        raise UserError(f"{path}: MIDI file has no notes")
    return encode_midi(midi)


# --------------------------------------------------------------------------- decode


def decode_notes(tokens: list[int]) -> list[Note]:
    """Notes from token ids, as the reference decoder pairs them (sorted by start, ties kept)."""
    time = 0.0
    velocity = 0
    open_notes: dict[int, tuple[float, int]] = {}  # pitch -> (start, velocity) of the latest note-on
    notes: list[Note] = []
    for token in tokens:
        if vocab.TIME_SHIFT <= token < vocab.VELOCITY:
            time += vocab.time_shift_steps(token) / 100
        elif token >= vocab.VELOCITY:
            velocity = (token - vocab.VELOCITY) * 4
        elif token < vocab.NOTE_OFF:
            open_notes[token] = (time, velocity)
        else:
            pitch = token - vocab.NOTE_OFF
            if pitch in open_notes:
                start, note_velocity = open_notes[pitch]
                if time - start != 0:
                    notes.append(Note(pitch, note_velocity, start, time))
    notes.sort(key=lambda note: note.start)
    return notes


def notes_to_midi(notes: list[Note], name: str = "LivePerceiver") -> pretty_midi.PrettyMIDI:
    """One piano track holding `notes` (velocities clipped to MIDI's 0-127)."""
    midi = pretty_midi.PrettyMIDI()
    instrument = pretty_midi.Instrument(program=DECODED_PROGRAM, is_drum=False, name=name)
    instrument.notes = [pretty_midi.Note(min(note.velocity, 127), note.pitch, note.start, note.end) for note in notes]
    midi.instruments.append(instrument)
    return midi


def decode_midi(tokens: list[int]) -> pretty_midi.PrettyMIDI:
    """A single-track MIDI file from token ids."""
    return notes_to_midi(decode_notes(tokens))


def write_midi(midi: pretty_midi.PrettyMIDI, path: str | Path) -> None:
    """Write a MIDI file atomically: a failure leaves no partial file behind."""
    try:
        with atomic_output(path) as file:
            midi.write(file)
    except OSError as error:
        raise UserError(f"{path}: cannot write MIDI file ({error.strerror or error})") from None


# --------------------------------------------------------------------------- token files and the commands


def read_token_file(path: Path) -> list[int]:
    """A JSON list of token ids (or an object with a `tokens` list); bad content raises UserError."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise UserError(f"{path}: cannot read token file ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"{path}: not a JSON token list ({error})") from None
    if isinstance(data, dict):
        data = data.get("tokens")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of token ids")
    try:
        return vocab.check_tokens(data, str(path))
    except ValueError as error:
        raise UserError(str(error)) from None


def run_tokenize(args) -> None:
    """`liveperceiver tokenize`: the token ids of a MIDI file, as a JSON list on stdout."""
    print(json.dumps(encode_file(args.midi)))


def run_detokenize(args) -> None:
    """`liveperceiver detokenize`: the MIDI file decoded from a JSON token list; tokens that decode
    to no note are refused, as `render` and `recover` refuse, rather than written over a file."""
    check_outputs([args.output], [args.tokens])
    midi = decode_midi(read_token_file(args.tokens))
    if not any(instrument.notes for instrument in midi.instruments):
        raise UserError(f"{args.tokens}: the tokens decode to no note; {args.output} not written")
    write_midi(midi, args.output)
