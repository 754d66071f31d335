"""The streaming tokenizer agrees with the offline one (and so with the reference golden files)."""

from __future__ import annotations

import copy
import math

import pretty_midi
import pytest
from conftest import TOKENIZER_GOLDEN, golden_midi_files, load_json

from liveperceiver.core import vocab
from liveperceiver.core.stream import LiveEvent, StreamDecoder, StreamEncoder, encode_stream, file_events, played_notes
from liveperceiver.core.tokenizer import Note, decode_notes, encode_events, encode_midi, note_events, read_midi


def has_pedal(path) -> bool:
    midi = read_midi(path)
    return any(c.number == 64 for instrument in midi.instruments for c in instrument.control_changes)


def note_rows(notes):
    rows = [[n.pitch, n.velocity, round(n.start, 6), round(n.end, 6)] for n in notes]
    return sorted(rows, key=lambda row: (row[2], row[0], row[3]))


def offline_tokens(notes: list[Note]) -> list[int]:
    return encode_events(note_events(notes))


def write_and_read(midi: pretty_midi.PrettyMIDI, tmp_path) -> pretty_midi.PrettyMIDI:
    """Round-trip through a file so that note order is pretty_midi's own, as in the reference."""
    path = tmp_path / "case.mid"
    midi.write(str(path))
    return read_midi(path)


PEDAL_FREE = [path for path in golden_midi_files() if not has_pedal(path)]


# --------------------------------------------------------------------------- encoder: files


@pytest.mark.parametrize("path", golden_midi_files(), ids=lambda p: p.stem)
def test_reference_rules_match_golden_tokens(path):
    expected = load_json(path.with_suffix(".json"))["tokens"]
    encoder = StreamEncoder(rules="reference")
    early = [token for event in file_events(read_midi(path)) for token in encoder.feed(event)]
    assert early == []  # a later pedal pair could still duplicate every earlier note
    assert encoder.close() == expected


def test_pedal_free_files_include_chords_and_real_files():
    names = {path.stem for path in PEDAL_FREE}
    assert {"v_chords", "v_dense", "v_same_pitch_overlap", "v_drums_and_piano"} <= names


@pytest.mark.parametrize("path", PEDAL_FREE, ids=lambda p: p.stem)
def test_live_rules_match_golden_tokens_without_pedal(path):
    expected = load_json(path.with_suffix(".json"))["tokens"]
    assert encode_stream(file_events(read_midi(path)), rules="live") == expected


def test_live_rules_match_reference_on_a_causal_pedal_file(tmp_path):
    """Every span has a later note, nothing starts after the last release, a restrike, a chord held."""
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    notes = [(72, 0.1, 0.15), (60, 0.2, 0.3), (64, 0.2, 0.4), (60, 0.6, 0.7), (67, 0.8, 1.5), (72, 1.2, 1.3)]
    notes += [(62, 2.1, 2.2), (65, 2.1, 2.15), (62, 2.5, 2.6), (70, 3.0, 3.2)]
    piano.notes = [pretty_midi.Note(90, pitch, start, end) for pitch, start, end in notes]
    piano.control_changes = [pretty_midi.ControlChange(64, value, time) for time, value in [(0.1, 127), (1.0, 0)]]
    piano.control_changes += [pretty_midi.ControlChange(64, value, time) for time, value in [(2.0, 100), (2.8, 20)]]
    piano.control_changes += [pretty_midi.ControlChange(64, value, time) for time, value in [(3.5, 127), (3.6, 0)]]
    midi.instruments.append(piano)
    midi = write_and_read(midi, tmp_path)
    expected = encode_midi(midi)
    decoded = decode_notes(expected)
    assert any(n.pitch == 60 and n.start == pytest.approx(0.2) and n.end == pytest.approx(0.6) for n in decoded)
    assert encode_stream(file_events(midi), rules="live") == expected
    assert encode_stream(file_events(midi), rules="reference") == expected


def test_live_rules_keep_the_note_after_the_last_release():
    """v_sustain: the reference drops the note struck after the last pedal-up; the live rules play it."""
    path = TOKENIZER_GOLDEN / "v_sustain.mid"
    golden = load_json(path.with_suffix(".json"))
    live = note_rows(decode_notes(encode_stream(file_events(read_midi(path)), rules="live")))
    dropped = [row for row in live if row not in golden["notes"]]
    assert [row[0] for row in dropped] == [65]
    assert sorted(row for row in live if row not in dropped) == sorted(golden["notes"])


# --------------------------------------------------------------------------- encoder: live behaviour


def test_note_under_pedal_ends_at_pedal_up_and_later_notes_are_kept():
    encoder = StreamEncoder()
    tokens = encoder.pedal(0.1, 127)
    tokens += encoder.note_on(0.2, 60, 80)
    tokens += encoder.note_off(0.3, 60)
    tokens += encoder.advance(0.9)
    assert vocab.note_on(60) in tokens and vocab.note_off(60) not in tokens  # still sounding: pedal down
    tokens += encoder.pedal(1.0, 0)
    up = encoder.advance(1.01)
    assert vocab.note_off(60) in up  # emitted as soon as pedal-up time has passed
    tokens += up
    tokens += encoder.note_on(1.5, 64, 70)
    tokens += encoder.note_off(2.0, 64)
    tokens += encoder.close()
    expected_notes = [Note(60, 80, 0.2, 1.0), Note(64, 70, 1.5, 2.0)]
    assert note_rows(decode_notes(tokens)) == note_rows(decode_notes(offline_tokens(expected_notes)))


def test_pedal_applies_per_voice():
    encoder = StreamEncoder()
    tokens = encoder.pedal(0.0, 127, voice=1)
    tokens += encoder.note_on(0.1, 60, 80, voice=0)
    tokens += encoder.note_on(0.2, 48, 80, voice=1)
    tokens += encoder.note_off(0.3, 60, voice=0)
    tokens += encoder.note_off(0.4, 48, voice=1)
    tokens += encoder.pedal(0.9, 0, voice=1)
    tokens += encoder.close()
    assert tokens == offline_tokens([Note(60, 80, 0.1, 0.3), Note(48, 80, 0.2, 0.9)])


def test_velocity_zero_note_on_is_a_note_off():
    path = TOKENIZER_GOLDEN / "v_basic.mid"
    events = file_events(read_midi(path))
    as_note_on = [LiveEvent("note_on", e.time, e.pitch, 0, e.voice) if e.kind == "note_off" else e for e in events]
    assert encode_stream(as_note_on) == load_json(path.with_suffix(".json"))["tokens"]


def test_simultaneous_chord_waits_for_its_order_unless_forced():
    encoder = StreamEncoder()
    assert encoder.note_on(0.0, 60, 80) + encoder.note_on(0.0, 64, 80) == []
    assert encoder.note_on(0.5, 67, 80) == []  # order of the chord = order of release, not known yet
    released = encoder.note_off(0.8, 64)
    assert [t for t in released if t < vocab.NOTE_OFF] == [64, 60, 67]  # 64 was released first
    forced = StreamEncoder()
    forced.note_on(0.0, 60, 80)
    forced.note_on(0.0, 64, 80)
    tokens = forced.advance(0.05)
    assert [t for t in tokens if t < vocab.NOTE_OFF] == [60, 64]


@pytest.mark.parametrize("name", ["v_long_gaps", "v_basic", "v_velocity_extremes"])
def test_advance_splits_time_shifts_but_keeps_the_reference_timing(name):
    path = TOKENIZER_GOLDEN / f"{name}.mid"
    golden = load_json(path.with_suffix(".json"))
    encoder = StreamEncoder()
    tokens: list[int] = []
    previous = 0.0
    for event in file_events(read_midi(path)):
        if event.time > previous:
            for fraction in (0.37, 0.81):  # the model is asked to play twice in every gap
                now = previous + fraction * (event.time - previous)
                tokens += encoder.advance(now)
                assert previous <= encoder.clock <= now + 1e-9  # whole elapsed steps only, never ahead
        tokens += encoder.feed(event)
        previous = event.time
    tokens += encoder.close()
    assert tokens != golden["tokens"] or name == "v_velocity_extremes"
    assert note_rows(decode_notes(tokens)) == golden["notes"]


def test_model_tokens_merge_into_one_stream():
    """The merged stream is what the offline encoder gives for the merged performance."""
    encoder = StreamEncoder()
    tokens = encoder.note_on(0.0, 60, 80) + encoder.note_off(0.5, 60)
    tokens += encoder.advance(1.0)
    assert encoder.clock == pytest.approx(1.0)
    model = [vocab.velocity_token(100), vocab.note_on(67), vocab.TIME_SHIFT + 49, vocab.note_off(67)]
    model += [vocab.velocity_token(40), vocab.note_on(69)]
    encoder.absorb_model_tokens(model)
    tokens += model
    assert encoder.clock == pytest.approx(1.5)
    player = encoder.note_on(2.0, 62, 40) + encoder.note_off(2.4, 62)  # 0.5 s after the model's last event
    assert player[0] == vocab.TIME_SHIFT + 49
    assert player[1] == vocab.velocity_token(40)  # previous raw velocity is the model's 40, bin 10 differs
    tokens += player + encoder.close()
    tokens += [vocab.TIME_SHIFT + 9, vocab.note_off(69)]  # the model ends its note later
    merged = decode_notes(tokens)
    assert [(n.pitch, round(n.start, 6), round(n.end, 6)) for n in merged] == [
        (60, 0.0, 0.5),
        (67, 1.0, 1.5),
        (69, 1.5, 2.5),
        (62, 2.0, 2.4),
    ]
    assert offline_tokens(merged) == tokens


def test_velocity_rule_sees_the_model_note_before_the_player_note():
    encoder = StreamEncoder()
    encoder.absorb_model_tokens([vocab.velocity_token(0), vocab.note_on(69), vocab.TIME_SHIFT + 9])
    tokens = encoder.note_on(0.2, 60, 2) + encoder.note_off(0.3, 60)
    # previous raw velocity is the model note's 0, equal to bin 0: the reference emits no velocity token
    assert tokens[:2] == [vocab.TIME_SHIFT + 9, vocab.note_on(60)]


def test_reference_rules_refuse_model_tokens():
    with pytest.raises(ValueError, match="rules='live'"):
        StreamEncoder(rules="reference").absorb_model_tokens([60])


@pytest.mark.parametrize(
    "event, message",
    [
        (LiveEvent("note_on", -0.5, 60, 80), "negative"),
        (LiveEvent("note_on", 0.5, 60, 80), "earlier than the previous timestamp"),
        (LiveEvent("note_on", math.nan, 60, 80), "finite"),
        (LiveEvent("note_on", 2.0, 128, 80), "pitch must be 0-127"),
        (LiveEvent("note_off", 2.0, -1), "pitch must be 0-127"),
        (LiveEvent("note_on", 2.0, 60, 128), "velocity must be 0-127"),
        (LiveEvent("note_on", 2.0, 60, -3), "velocity must be 0-127"),
        (LiveEvent("pedal", 2.0, None, 200), "CC64 value must be 0-127"),
        (LiveEvent("aftertouch", 2.0, 60, 1), "event kind"),
        (LiveEvent("note_on", 2.0, 60, 80, voice=-1), "voice"),
    ],
)
def test_bad_input_raises_and_changes_nothing(event, message):
    events = [LiveEvent("pedal", 0.5, None, 127), LiveEvent("note_on", 1.0, 60, 80), LiveEvent("note_off", 1.5, 60)]
    rest = [LiveEvent("pedal", 2.5, None, 0), LiveEvent("note_on", 3.0, 62, 70), LiveEvent("note_off", 3.5, 62)]
    encoder = StreamEncoder()
    tokens = [token for e in events for token in encoder.feed(e)]
    before = repr(copy.deepcopy(encoder.__dict__))
    with pytest.raises(ValueError, match=message):
        encoder.feed(event)
    assert repr(encoder.__dict__) == before
    tokens += [token for e in rest for token in encoder.feed(e)] + encoder.close()
    assert tokens == encode_stream(events + rest)


def test_bad_advance_time_raises():
    encoder = StreamEncoder()
    encoder.note_on(1.0, 60, 80)
    with pytest.raises(ValueError, match="earlier"):
        encoder.advance(0.5)
    with pytest.raises(ValueError, match="model tokens"):
        encoder.absorb_model_tokens([60, 400])


# --------------------------------------------------------------------------- decoder


def decode_stream(tokens: list[int]) -> tuple[list[Note], list]:
    decoder = StreamDecoder()
    events = [event for token in tokens for event in decoder.feed(token)]
    return decoder.notes, events + decoder.close()


def well_formed(tokens: list[int]) -> bool:
    """Every note-on is closed once, by the next note-off of its pitch, before that pitch starts again."""
    sounding: set[int] = set()
    for token in tokens:
        kind = vocab.event_type(token)
        if kind == "note_on":
            if token in sounding:
                return False
            sounding.add(token)
        elif kind == "note_off":
            if token - vocab.NOTE_OFF not in sounding:
                return False
            sounding.remove(token - vocab.NOTE_OFF)
    return not sounding


DECODE_CASES = [case["tokens"] for case in load_json(TOKENIZER_GOLDEN / "decode_cases.json")]
GOLDEN_TOKENS = [load_json(path.with_suffix(".json"))["tokens"] for path in golden_midi_files()]


@pytest.mark.parametrize("index", range(len(DECODE_CASES)))
def test_decoder_notes_match_reference_decode_cases(index):
    case = load_json(TOKENIZER_GOLDEN / "decode_cases.json")[index]
    notes, _ = decode_stream(case["tokens"])
    assert note_rows(notes) == case["notes"]
    assert sorted(notes, key=lambda n: n.start) == decode_notes(case["tokens"])


@pytest.mark.parametrize("path", golden_midi_files(), ids=lambda p: p.stem)
def test_decoder_matches_golden_notes(path):
    golden = load_json(path.with_suffix(".json"))
    notes, events = decode_stream(golden["tokens"])
    assert note_rows(notes) == golden["notes"]
    assert_each_note_on_then_its_off(events)
    if well_formed(golden["tokens"]):
        assert note_rows(played_notes(golden["tokens"])) == golden["notes"]


def assert_each_note_on_then_its_off(events) -> None:
    """The events alternate per pitch, on then off (played_notes would pass over a stray note-off)."""
    sounding: set[int] = set()
    for event in events:
        assert (event.pitch in sounding) == (event.kind == "note_off"), event
        sounding ^= {event.pitch}
    assert not sounding


def test_playback_events_pair_into_reference_notes_when_well_formed():
    checked = [tokens for tokens in DECODE_CASES + GOLDEN_TOKENS if well_formed(tokens)]
    assert len(checked) >= 20
    for tokens in checked:
        _, events = decode_stream(tokens)
        assert_each_note_on_then_its_off(events)
        assert note_rows(played_notes(tokens)) == note_rows(decode_notes(tokens))
        times = [event.time for event in events]
        assert times == sorted(times)


def test_playback_events_never_double_a_pitch():
    tokens = [60, vocab.TIME_SHIFT + 9, 60, vocab.TIME_SHIFT + 9, 188, 62, 190]  # restrike; zero-length 62
    notes, events = decode_stream(tokens)
    assert note_rows(notes) == note_rows(decode_notes(tokens)) == [[60, 0, 0.1, 0.2]]
    assert [(e.kind, e.pitch, round(e.time, 6)) for e in events] == [
        ("note_on", 60, 0.0),
        ("note_off", 60, 0.1),
        ("note_on", 60, 0.1),
        ("note_off", 60, 0.2),
    ]


def test_played_notes_are_what_the_scheduler_sounds():
    """A pitch struck again while it sounds is two notes to the ear (the first ends at the second
    strike), where the reference decoder keeps only the second; a note never closed ends with the
    stream. The continuations' figures count these."""
    tokens = [60, 64, vocab.TIME_SHIFT + 9, 60, vocab.TIME_SHIFT + 19, vocab.note_off(60), vocab.TIME_SHIFT + 9]
    assert note_rows(decode_notes(tokens)) == [[60, 0, 0.1, 0.3]]
    assert note_rows(played_notes(tokens)) == [[60, 0, 0.0, 0.1], [64, 0, 0.0, 0.4], [60, 0, 0.1, 0.3]]
    from liveperceiver.training.continuations import note_stats

    stats = note_stats(tokens)
    assert stats["notes"] == 3 and stats["polyphony"] == pytest.approx((2 + 2 + 2) / 3)
