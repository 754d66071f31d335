"""The offline tokenizer reproduces perceiver-io 0.11.0's encode_midi/decode_midi exactly."""

from __future__ import annotations

import pytest
from conftest import SHARED_REFERENCE, TOKENIZER_GOLDEN, golden_midi_files, load_json

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError
from liveperceiver.core.tokenizer import decode_midi, decode_notes, encode_file, read_midi


def note_rows(notes):
    rows = [[n.pitch, n.velocity, round(n.start, 6), round(n.end, 6)] for n in notes]
    return sorted(rows, key=lambda row: (row[2], row[0], row[3]))


def test_real_reference_files_are_checked_when_present():
    if not SHARED_REFERENCE.is_dir():
        pytest.skip("../shared/reference is not on this machine; only the copied synthetic cases run")
    assert any(path.name.startswith("v_real_") for path in golden_midi_files())


@pytest.mark.parametrize("path", golden_midi_files(), ids=lambda p: p.stem)
def test_encode_matches_reference(path):
    expected = load_json(path.with_suffix(".json"))
    assert encode_file(path) == expected["tokens"]


@pytest.mark.parametrize("path", golden_midi_files(), ids=lambda p: p.stem)
def test_decode_matches_reference(path):
    expected = load_json(path.with_suffix(".json"))
    assert note_rows(decode_notes(expected["tokens"])) == expected["notes"]


def test_decode_cases_match_reference():
    cases = load_json(TOKENIZER_GOLDEN / "decode_cases.json")
    assert len(cases) == 40
    for case in cases:
        assert note_rows(decode_notes(case["tokens"])) == case["notes"]


def test_decoded_midi_round_trips_through_a_file(tmp_path):
    tokens = load_json(TOKENIZER_GOLDEN / "v_chords.json")["tokens"]
    path = tmp_path / "out.mid"
    decode_midi(tokens).write(str(path))
    midi = read_midi(path)
    assert len(midi.instruments) == 1
    written = [[n.pitch, n.velocity, round(n.start, 3), round(n.end, 3)] for n in midi.instruments[0].notes]
    decoded = [[n.pitch, n.velocity, round(n.start, 3), round(n.end, 3)] for n in decode_notes(tokens)]
    assert sorted(written) == sorted(decoded)


def test_pad_and_high_velocity_tokens_decode_without_error(tmp_path):
    tokens = [vocab.PAD, 60, 300, 188, vocab.VELOCITY + 31, 62, 300, 190]
    notes = decode_notes(tokens)
    assert [n.velocity for n in notes] == [128, 124]  # the reference decodes pad as velocity bin 32
    decode_midi(tokens).write(str(tmp_path / "x.mid"))  # clipped to 127 when written


@pytest.mark.parametrize(
    "content, message",
    [(b"not a midi file", "not a MIDI file"), (b"MThd\x00\x00\x00\x06\x00\x01", "corrupt MIDI file")],
)
def test_bad_midi_files_raise_one_line_user_errors(tmp_path, content, message):
    path = tmp_path / "bad.mid"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        encode_file(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_empty_midi_file_is_refused(tmp_path):
    import pretty_midi

    path = tmp_path / "empty.mid"
    pretty_midi.PrettyMIDI().write(str(path))
    with pytest.raises(UserError, match="no notes"):
        encode_file(path)
