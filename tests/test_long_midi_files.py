"""Long MIDI files load (music21 writes 10,080 ticks per quarter, a session recording one per ms:
past pretty_midi's 10^7-tick limit), while pretty_midi's own limit stays as it was for everyone else."""

from __future__ import annotations

import mido
import pretty_midi
import pytest

from liveperceiver.core.tokenizer import decode_notes, encode_file, read_midi

TICKS_PER_QUARTER = 10080  # music21's MIDI export
LATE_TEMPO_TICK = 10_500_000  # past pretty_midi's MAX_TICK (10^7)
LATE_NOTE_TICK = 11_000_000


def long_file(path):
    """Two notes ten minutes apart and a tempo change (120 -> 60 BPM) between them, all in ticks."""
    midi = mido.MidiFile(ticks_per_beat=TICKS_PER_QUARTER)
    track = mido.MidiTrack()
    events = [
        (0, mido.MetaMessage("set_tempo", tempo=500_000)),
        (0, mido.Message("note_on", note=60, velocity=80)),
        (TICKS_PER_QUARTER, mido.Message("note_off", note=60, velocity=0)),
        (LATE_TEMPO_TICK, mido.MetaMessage("set_tempo", tempo=1_000_000)),
        (LATE_NOTE_TICK, mido.Message("note_on", note=64, velocity=80)),
        (LATE_NOTE_TICK + TICKS_PER_QUARTER, mido.Message("note_off", note=64, velocity=0)),
    ]
    previous = 0
    for tick, message in events:
        track.append(message.copy(time=tick - previous))
        previous = tick
    midi.tracks.append(track)
    midi.save(path)
    return path


def test_a_file_past_pretty_midis_tick_limit_loads_and_tokenizes(tmp_path):
    path = long_file(tmp_path / "long.mid")
    midi = read_midi(path)
    late = LATE_TEMPO_TICK / TICKS_PER_QUARTER * 0.5 + (LATE_NOTE_TICK - LATE_TEMPO_TICK) / TICKS_PER_QUARTER * 1.0
    starts = [note.start for note in midi.instruments[0].notes]
    assert starts == pytest.approx([0.0, late])
    times, tempi = midi.get_tempo_changes()  # converts the late tempo change's tick too
    assert times == pytest.approx([0.0, LATE_TEMPO_TICK / TICKS_PER_QUARTER * 0.5])
    assert tempi == pytest.approx([120.0, 60.0])
    decoded = decode_notes(encode_file(path))  # the tokens hold both notes, ten minutes apart
    assert [note.start for note in decoded] == pytest.approx([0.0, late], abs=0.02)


def test_reading_one_leaves_pretty_midis_own_limit_alone(tmp_path):
    """The limit is raised around our reads only: importing or using the tokenizer changes nothing
    for other code in the process that reads MIDI with pretty_midi."""
    path = long_file(tmp_path / "long.mid")
    read_midi(path)
    assert pretty_midi.pretty_midi.MAX_TICK == 1e7
    with pytest.raises(ValueError, match="likely corrupt"):
        pretty_midi.PrettyMIDI(str(path))
