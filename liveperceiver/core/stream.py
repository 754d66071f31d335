"""Streaming tokenizer: live MIDI events -> tokens as soon as they are determined, tokens -> timed notes.

The live context is ONE token sequence: the player's notes (encoded here) and the model's notes (sampled
by the engine and handed back with `StreamEncoder.absorb_model_tokens`) merged in time order. The
encoder therefore keeps the state that the offline encoder (`liveperceiver.core.tokenizer`) keeps for one
whole file: the time of the last event in the stream and the previous event's raw velocity.

Two rule sets for the encoder (`rules`; not the session's call/duet/listen modes):

- ``rules="live"`` (default): the reference rules applied causally, so every token is emitted once its
  time has passed (on the next event, or on `advance(now)`), except that notes struck at exactly the
  same timestamp in one voice wait until their order is known (see "Ties" below). Equal to the
  reference on every file where the reference's pedal rule is causal (always without a pedal).
- ``rules="reference"``: exactly `tokenizer.encode_midi` on the same events. The reference pedal rule
  is not causal, and not even in a bounded way: a later pair of pedal spans with no note after the
  first one makes the reference read all earlier notes of that instrument twice (duplicates), so no
  token is ever determined before the end of the stream. The reference rules therefore emit everything at
  `close()`; it exists to prove that the event model (`file_events`, the pairing of note-ons with
  note-offs, voices) loses nothing.

Ties (both rule sets reproduce them; the live rules wait for them). The reference orders events at equal times
by the position of their note in a stable sort by start time, a note-on before its own note-off.
pretty_midi lists an instrument's notes in the order their note-offs occur, so: note-offs at one time
come in order of (start, voice, key-release order), and note-ons at one time in one voice come in the
order their keys are *released*. So events at time t are only flushed once a later time is known, and
a chord struck at one exact timestamp only once its notes are released. Live timestamps practically
never coincide, so this costs no latency live; `advance(now)` forces any such undetermined order
(by key-down order) because the model is about to play after `now`.

The live rules' pedal rule (per voice, CC64 >= 64 down, < 64 up): a note that starts while the pedal is
down and is released under it ends at the next onset of the same pitch while the pedal is still down,
else at pedal-up; a note still held at pedal-up ends at its own release. This is the reference rule
on one span. Reference quirks the live rules do NOT reproduce, because each depends on the future and a
live player's notes must not change or vanish after they were heard:

- further CC64 values < 64 after a release extend that span's end (and re-capture the notes struck in
  between): the live rules end the span at the first release;
- notes that start after the last release are dropped: the live rules keep them;
- the last span is only applied when some note starts after it: the live rules always apply it;
- a span with no later note makes the next span re-read earlier notes (duplicates): not reproduced;
- a pedal never released is ignored: the live rules hold the notes until pedal-up or `close()`;
- pretty_midi's list order decides which notes a span manages (a note held past the first note after
  the release is skipped): the live rules manage every note that starts in the span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pretty_midi

from liveperceiver.core import vocab
from liveperceiver.core.tokenizer import (
    Note,
    NoteEvent,
    apply_pedal,
    encode_events,
    event_tokens,
    note_events,
    pedal_spans,
    time_shift_tokens,
)

EVENT_KINDS = ("note_on", "note_off", "pedal")
RULES = ("live", "reference")  # the encoder's rule sets (module docstring)
MAX_MIDI_VALUE = 127


@dataclass(frozen=True)
class LiveEvent:
    """One timestamped input event. `value` is the note-on velocity or the CC64 value (unused for note-off).

    `voice` separates instruments (a MIDI channel live, the instrument index for files): the pedal and
    the pairing of note-ons with note-offs apply per voice, as pretty_midi does per instrument.
    """

    kind: str
    time: float
    pitch: int | None = None
    value: int = 0
    voice: int = 0


@dataclass(eq=False)
class _LiveNote:
    """A note in flight: its note-on/note-off tokens are emitted once their place in the stream is known."""

    pitch: int
    velocity: int
    start: float
    voice: int
    arrival: int  # key-down order over the whole stream: the forced tie order
    in_span: bool  # started while its voice's pedal is down and that span has not ended yet
    end: float | None = None  # known note-off time
    order: int | None = None  # key-release order within the voice = pretty_midi's list position
    key_down: bool = True
    on_emitted: bool = False
    off_emitted: bool = False


@dataclass
class _Voice:
    open: dict[int, list[_LiveNote]] = field(default_factory=dict)  # pitch -> key-held notes, key-down order
    span: list[_LiveNote] = field(default_factory=list)  # notes that started in the current pedal span
    pedal_down: bool = False
    releases: int = 0
    # reference rules only: completed notes in pretty_midi order and the raw CC64 values
    notes: list[Note] = field(default_factory=list)
    pedal: list[tuple[float, int]] = field(default_factory=list)


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {low}-{high}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be {low}-{high}, got {value}")
    return value


class StreamEncoder:
    """Encodes live events one at a time; each call returns the tokens that became determined.

    Tokens already returned never change. Time: each gap between consecutive events of the merged
    stream becomes time-shift tokens when the later event is emitted, rounded to 10 ms on its own from
    unrounded times, as the reference does. `advance(now)` emits only the whole 10 ms steps that have
    fully elapsed since the last event (floor) and remembers the fraction, so when the next event
    comes, the shifts over that event-to-event gap still add up to the reference's `round(gap)` (up to
    an exact half-step tie); only their split into tokens differs (e.g. 30 + 120 steps instead of
    100 + 50).
    """

    def __init__(self, rules: str = "live") -> None:
        if rules not in RULES:
            raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
        self.rules = rules
        self._voices: dict[int, _Voice] = {}
        self._notes: list[_LiveNote] = []  # live notes with an event not yet emitted
        self._last_time = 0.0  # latest timestamp seen (events and advance); inputs must not go back
        self._clock = 0.0  # time of the stream's last event, which the next time shift is measured from
        self._previous_velocity: int | None = 0  # raw velocity of the stream's last note event
        self._register = 0  # the decoder's current velocity: bin x 4 of the stream's last velocity token
        self._arrivals = 0
        self._closed = False

    # ------------------------------------------------------------------ input

    @property
    def clock(self) -> float:
        """Time of the merged stream's last event (seconds; what the next time shift is measured from)."""
        return self._clock

    @property
    def pending(self) -> int:
        """Number of player notes with a token not yet emitted (held for ties, pedal or a later time)."""
        if self.rules == "reference":
            return sum(len(voice.notes) for voice in self._voices.values())
        return len(self._notes)

    def note_on(self, time: float, pitch: int, velocity: int, voice: int = 0) -> list[int]:
        return self.feed(LiveEvent("note_on", time, pitch, velocity, voice))

    def note_off(self, time: float, pitch: int, voice: int = 0) -> list[int]:
        return self.feed(LiveEvent("note_off", time, pitch, 0, voice))

    def pedal(self, time: float, value: int, voice: int = 0) -> list[int]:
        return self.feed(LiveEvent("pedal", time, None, value, voice))

    def feed(self, event: LiveEvent) -> list[int]:
        """Take one event (timestamps non-decreasing); a note-on with velocity 0 is a note-off.

        Invalid input raises ValueError and leaves the encoder unchanged.
        """
        self._check_event(event)
        kind = "note_off" if event.kind == "note_on" and event.value == 0 else event.kind
        voice = self._voices.setdefault(event.voice, _Voice())
        self._last_time = event.time
        if kind == "pedal":
            self._pedal(voice, event.time, event.value)
        elif kind == "note_on":
            self._note_on(voice, event)
        else:
            self._note_off(voice, event.time, event.pitch)
        if self.rules == "reference":
            return []
        return self._emit(event.time, inclusive=False, force=False)

    def advance(self, now: float) -> list[int]:
        """Live rules: emit every pending player event up to `now`, then time shifts for the silence since.

        Call it before the model plays, so the model continues a stream that is complete up to `now`.
        Same-timestamp ties whose reference order is not yet known are emitted in key-down order.
        Later inputs must not be earlier than `now`. The reference rules emit nothing before `close()`.
        """
        self._check_time(now, "advance time")
        self._last_time = now
        if self.rules == "reference":
            return []
        tokens = self._emit(now, inclusive=True, force=True)
        steps = math.floor((now - self._clock) * 100 + 1e-6)
        if steps > 0:
            tokens += time_shift_tokens(steps / 100)
            self._clock += steps / 100
        return tokens

    def absorb_model_tokens(self, tokens: list[int]) -> None:
        """Merge tokens the model played into the stream state: they follow the last emitted token.

        Time shifts move the clock on (so the player's next gap is measured from the model's last
        event); a model note-on makes the previous raw velocity its decoded velocity (bin x 4), a
        note-off makes it "none", exactly what re-encoding the merged performance offline would see.
        Player events still pending (call `advance(now)` first so there are none) and player events
        stamped before the model's last event are placed at the stream's clock with no time shift.
        """
        if self.rules == "reference":
            raise ValueError("absorb_model_tokens() needs rules='live': the reference rules hold tokens until close()")
        self._check_open()
        tokens = vocab.check_tokens(tokens, "model tokens")
        register = self._register
        for token in tokens:
            kind = vocab.event_type(token)
            if kind == "time_shift":
                self._clock += vocab.time_shift_steps(token) / 100
            elif kind in ("velocity", "pad"):  # the reference decodes pad as velocity bin 32
                register = (token - vocab.VELOCITY) * 4
            elif kind == "note_on":
                self._previous_velocity = register
            else:
                self._previous_velocity = None
        self._register = register

    def close(self, now: float | None = None) -> list[int]:
        """End the stream and return the remaining tokens; the encoder takes no more input.

        Reference rules: exactly what `tokenizer.encode_midi` gives for the events (notes never released
        are dropped, as pretty_midi drops them). Live rules: notes still held by key or pedal end at
        `now` (default: the latest timestamp), since their note-ons may already have been played.
        """
        if now is not None:
            self._check_time(now, "close time")
        self._check_open()
        end = self._last_time if now is None else now
        self._closed = True
        if self.rules == "reference":
            return self._reference_tokens()
        for voice in self._voices.values():
            for notes in voice.open.values():
                for note in notes:
                    self._release(voice, note)
            voice.open.clear()
        for note in self._notes:
            if note.end is None:
                note.end = end
        self._notes = [note for note in self._notes if note.on_emitted or note.end != note.start]
        return self._emit(end, inclusive=True, force=True)

    # ------------------------------------------------------------------ validation

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the encoder is closed; start a new StreamEncoder")

    def _check_time(self, time: object, name: str) -> None:
        if isinstance(time, bool) or not isinstance(time, int | float) or not math.isfinite(time):
            raise ValueError(f"{name} must be a finite number of seconds, got {time!r}")
        if time < 0:
            raise ValueError(f"{name} must not be negative, got {time}")
        if time < self._last_time:
            raise ValueError(f"{name} {time} is earlier than the previous timestamp {self._last_time}")

    def _check_event(self, event: LiveEvent) -> None:
        self._check_open()
        if event.kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be one of {EVENT_KINDS}, got {event.kind!r}")
        self._check_time(event.time, f"{event.kind} time")
        if isinstance(event.voice, bool) or not isinstance(event.voice, int) or event.voice < 0:
            raise ValueError(f"voice must be a non-negative integer, got {event.voice!r}")
        if event.kind == "pedal":
            _check_int("CC64 value", event.value, 0, MAX_MIDI_VALUE)
            return
        _check_int("pitch", event.pitch, 0, MAX_MIDI_VALUE)
        if event.kind == "note_on":
            _check_int("velocity", event.value, 0, MAX_MIDI_VALUE)

    # ------------------------------------------------------------------ pairing and pedal

    def _pedal(self, voice: _Voice, time: float, value: int) -> None:
        voice.pedal.append((time, value))
        if value >= 64 and not voice.pedal_down:
            voice.pedal_down = True
            voice.span = []
        elif value < 64 and voice.pedal_down:
            voice.pedal_down = False
            for note in voice.span:
                note.in_span = False
                if note.end is None and not note.key_down:
                    note.end = time  # released under the pedal: sounds until pedal-up
            voice.span = []

    def _note_on(self, voice: _Voice, event: LiveEvent) -> None:
        note = _LiveNote(event.pitch, event.value, event.time, event.voice, self._arrivals, voice.pedal_down)
        self._arrivals += 1
        if self.rules == "live":
            if voice.pedal_down:
                for held in voice.span:  # a restrike under the pedal ends the earlier note of that pitch
                    if held.pitch == note.pitch and held.end is None:
                        held.end = note.start
                voice.span.append(note)
            self._notes.append(note)
        voice.open.setdefault(note.pitch, []).append(note)

    def _note_off(self, voice: _Voice, time: float, pitch: int) -> None:
        """pretty_midi's pairing: close every key-held note of the pitch that did not start at `time`."""
        held = voice.open.pop(pitch, [])
        closing = [note for note in held if note.start != time]
        keeping = [note for note in held if note.start == time]
        for note in closing:
            note_end = None if note.in_span else time  # under the pedal the end waits for pedal-up
            self._release(voice, note, note_end)
        if closing and keeping:
            voice.open[pitch] = keeping
            return
        for note in keeping:  # pretty_midi drops a note whose note-off comes at its own start tick
            if note in voice.span:
                voice.span.remove(note)
            if note.on_emitted:  # the live rules forced it out already: it can only end now
                self._release(voice, note, time)
            elif self.rules == "live":
                self._notes.remove(note)

    def _release(self, voice: _Voice, note: _LiveNote, end: float | None = None) -> None:
        note.key_down = False
        note.order = voice.releases
        voice.releases += 1
        if self.rules == "reference":
            voice.notes.append(Note(note.pitch, note.velocity, note.start, self._last_time))
        elif note.end is None:
            note.end = end

    # ------------------------------------------------------------------ emission (live rules)

    def _emit(self, until: float, inclusive: bool, force: bool) -> list[int]:
        """Emit, in the reference's order, every event before `until` whose place is determined."""
        tokens: list[int] = []
        while True:
            events = [
                (time, note.start, note.voice, note, is_off)
                for note in self._notes
                for time, is_off in ((note.start, False), (note.end, True))
                if time is not None
                and not (note.off_emitted if is_off else note.on_emitted)
                and (time <= until if inclusive else time < until)
            ]
            if not events:
                break
            first = min(events, key=lambda e: (e[0], e[1], e[2]))
            group = [e for e in events if e[:3] == first[:3]]
            ordered = sorted((e for e in group if e[3].order is not None), key=lambda e: (e[3].order, e[4]))
            unordered = {id(e[3]) for e in group if e[3].order is None}
            if ordered:
                chosen = ordered[0]
            elif len(unordered) == 1 or force:
                chosen = min(group, key=lambda e: (e[3].arrival, e[4]))
            else:
                break  # notes struck at one timestamp: wait until their release order is known
            tokens += self._event_tokens(chosen[0], chosen[3], chosen[4])
        return tokens

    def _event_tokens(self, time: float, note: _LiveNote, is_off: bool) -> list[int]:
        tokens = time_shift_tokens(time - self._clock)
        self._clock = max(self._clock, time)
        if is_off:
            note.off_emitted = True
            self._notes.remove(note)
            tokens.append(vocab.note_off(note.pitch))
            self._previous_velocity = None
            return tokens
        note.on_emitted = True
        event = NoteEvent("note_on", time, note.pitch, note.velocity)
        event_part = event_tokens(event, self._previous_velocity)
        if len(event_part) == 2:
            self._register = note.velocity // 4 * 4
        self._previous_velocity = note.velocity
        return tokens + event_part

    # ------------------------------------------------------------------ reference rules

    def _reference_tokens(self) -> list[int]:
        """The offline reference pipeline on the collected notes, voices in index order."""
        notes: list[Note] = []
        for index in sorted(self._voices):
            voice = self._voices[index]
            spans = pedal_spans(voice.pedal)
            notes += apply_pedal(voice.notes, spans) if spans else voice.notes
        return encode_events(note_events(notes))


def file_events(midi: pretty_midi.PrettyMIDI) -> list[LiveEvent]:
    """The time-ordered live events of a parsed MIDI file, voice = instrument index.

    At equal times: CC64 first (a note struck at the pedal-down time is under the pedal), then
    note-offs in pretty_midi's list order (which is the tie order the reference uses), then note-ons.
    Assumes pretty_midi's own pairing (a MIDI file read by pretty_midi): one note-off closes every
    open note of its pitch, so notes of one pitch that end together are replayed as one note-off.
    """
    rows: list[tuple[float, int, int, LiveEvent]] = []
    for voice, instrument in enumerate(midi.instruments):
        for control in instrument.control_changes:
            if control.number == 64:
                rows.append((control.time, 0, len(rows), LiveEvent("pedal", control.time, None, control.value, voice)))
        for note in instrument.notes:
            rows.append((note.end, 1, len(rows), LiveEvent("note_off", note.end, note.pitch, 0, voice)))
            rows.append((note.start, 2, len(rows), LiveEvent("note_on", note.start, note.pitch, note.velocity, voice)))
    rows.sort(key=lambda row: row[:3])
    return [row[3] for row in rows]


def encode_stream(events: list[LiveEvent], rules: str = "live") -> list[int]:
    """All tokens of an event list fed one at a time (for tests and file replays)."""
    encoder = StreamEncoder(rules)
    tokens: list[int] = []
    for event in events:
        tokens += encoder.feed(event)
    return tokens + encoder.close()


# --------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class TimedEvent:
    """A note-on or note-off to play at `time` seconds (velocity clipped to MIDI's 0-127)."""

    kind: str
    time: float
    pitch: int
    velocity: int


class StreamDecoder:
    """Decodes tokens one at a time into timed note events for playback, and the reference's notes.

    `notes` is exactly what `tokenizer.decode_notes` makes of the tokens so far (in completion order;
    sort by start, stably, to compare): a note-off pairs with the latest note-on of its pitch, which
    stays open, and zero-length or never-closed notes are dropped.

    The events are what can be played causally: a note-on is released once time moves past it (so a
    note-on cancelled at the same time, a zero-length note, never sounds); a note-off ends the sounding
    note of its pitch. They pair up into `notes` except where the reference decoder looks ahead or
    back: a second note-on of a sounding pitch ends the first one (the reference drops that first
    note), a repeated note-off makes no second note (the reference makes one more from the same
    start), and `close()` ends notes never closed (the reference drops them).
    """

    def __init__(self) -> None:
        self.time = 0.0
        self.velocity = 0
        self.notes: list[Note] = []
        self._open: dict[int, tuple[float, int]] = {}  # the reference's pairing state
        self._starting: dict[int, int] = {}  # note-ons at the current time, not yet released: pitch -> velocity
        self._sounding: dict[int, int] = {}

    def feed(self, token: int) -> list[TimedEvent]:
        """Take one token; return the events it makes playable."""
        token = vocab.check_tokens([token], "token")[0]
        kind = vocab.event_type(token)
        if kind == "time_shift":
            events = self._release_starting()
            self.time += vocab.time_shift_steps(token) / 100
            return events
        if kind in ("velocity", "pad"):
            self.velocity = (token - vocab.VELOCITY) * 4
            return []
        if kind == "note_on":
            pitch = token - vocab.NOTE_ON
            self._open[pitch] = (self.time, self.velocity)
            self._starting.pop(pitch, None)
            self._starting[pitch] = self.velocity
            if pitch in self._sounding:
                return [TimedEvent("note_off", self.time, pitch, self._sounding.pop(pitch))]
            return []
        pitch = token - vocab.NOTE_OFF
        if pitch in self._open:
            start, velocity = self._open[pitch]
            if self.time != start:
                self.notes.append(Note(pitch, velocity, start, self.time))
        if self._starting.pop(pitch, None) is not None:
            return []
        if pitch in self._sounding:
            return [TimedEvent("note_off", self.time, pitch, self._sounding.pop(pitch))]
        return []

    def close(self) -> list[TimedEvent]:
        """End the stream: note-offs, at the current time, for notes still sounding."""
        self._starting.clear()
        events = [TimedEvent("note_off", self.time, pitch, velocity) for pitch, velocity in self._sounding.items()]
        self._sounding.clear()
        return events

    def _release_starting(self) -> list[TimedEvent]:
        events = []
        for pitch, velocity in self._starting.items():
            clipped = min(velocity, MAX_MIDI_VALUE)
            self._sounding[pitch] = clipped
            events.append(TimedEvent("note_on", self.time, pitch, clipped))
        self._starting.clear()
        return events


def played_notes(tokens: list[int]) -> list[Note]:
    """The notes `play` sounds for `tokens` (StreamDecoder's events, paired; sorted by start, ties
    kept), where the reference decoder (`tokenizer.decode_notes`) pairs them for files: a note-on of
    a sounding pitch ends the note before it, as the scheduler retriggers it (the reference drops
    that first note), and notes still sounding end with the stream. Offline figures of what the
    model plays count these: 26% of its note-ons in piano continuations strike a sounding pitch, so
    the reference's notes missed a third of what a listener hears."""
    decoder = StreamDecoder()
    started: dict[int, tuple[float, int]] = {}
    notes: list[Note] = []

    def pair(events: list[TimedEvent]) -> None:
        for event in events:
            if event.kind == "note_on":
                started[event.pitch] = (event.time, event.velocity)
            elif event.pitch in started:
                start, velocity = started.pop(event.pitch)
                notes.append(Note(event.pitch, velocity, start, event.time))

    for token in tokens:
        pair(decoder.feed(token))
    pair(decoder.close())
    notes.sort(key=lambda note: note.start)
    return notes
