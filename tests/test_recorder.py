"""The recorder never loses a take: a journal write that fails (a full disk) keeps what the disk
refused and writes it later, a save writes every file it can, a held note or pedal ends where the
take ends, a session directory used again keeps every earlier file, two recorders never share a
directory, and a closed terminal (SIGHUP) stops `play` so that it saves, unless run under nohup.
Real files throughout; the full disk is a real file-size limit in a child process."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import mido
import pytest

from liveperceiver.core.errors import UserError
from liveperceiver.live.recorder import JOURNAL, SESSION_MIDI, Recorder, read_journal


def note_spans(track: mido.MidiTrack) -> list[tuple[int, int, int]]:
    """(pitch, on tick, off tick) of a track's notes."""
    now, started, spans = 0, {}, []
    for message in track:
        now += message.time
        if message.type == "note_on" and message.velocity:
            started[message.note] = now
        elif message.type in ("note_on", "note_off") and message.note in started:
            spans.append((message.note, started.pop(message.note), now))
    return spans


def test_a_note_held_when_the_take_is_saved_ends_at_the_save_not_at_its_own_start(tmp_path):
    recorder = Recorder(tmp_path / "s", origin=0.0)
    try:
        recorder.record("P", 1.0, [0x90, 60, 90])  # the last event: the final chord, still held
        recorder.record("P", 1.0, [0x90, 64, 90])
        midi = mido.MidiFile(recorder.save(at=4.0))
    finally:
        recorder.close()
    assert note_spans(midi.tracks[1]) == [(60, 1000, 4000), (64, 1000, 4000)]


def test_a_save_writes_session_mid_even_when_another_target_cannot_be_written(tmp_path):
    recorder = Recorder(tmp_path / "s", origin=0.0)
    try:
        recorder.record("M", 0.5, [0x90, 72, 80])
        recorder.record("M", 0.9, [0x80, 72, 0])
        not_a_folder = tmp_path / "file"
        not_a_folder.write_text("")
        written, failures = recorder.save_all([None, not_a_folder / "take.mid"], at=1.0)
    finally:
        recorder.close()
    assert written == [tmp_path / "s" / SESSION_MIDI]
    assert len(failures) == 1 and "take.mid" in failures[0] and "is a file, not a folder" in failures[0]
    assert note_spans(mido.MidiFile(written[0]).tracks[2]) == [(72, 500, 900)]
    with pytest.raises(UserError, match="take.mid"):
        Recorder(tmp_path / "t", origin=0.0).save(not_a_folder / "take.mid")


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys, time
    from pathlib import Path
    import mido
    from liveperceiver.live.recorder import Recorder, read_journal

    folder = Path(sys.argv[1])
    said = []
    recorder = Recorder(folder / "s", origin=0.0, warn=said.append)
    recorder.start()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1500, hard))  # the journal's disk is full
    for index in range(200):  # about 5 KB of journal
        recorder.record("P", index * 0.01, [0x90 if index % 2 == 0 else 0x80, 60 + index // 2 % 24, 90])
    time.sleep(0.5)  # the recorder thread tries, and tries again
    assert recorder.thread.is_alive(), "the recorder thread died"
    assert len(said) == 1 and "cannot write the session journal" in said[0], said
    assert recorder.unwritten, "nothing held back"
    # saved while the disk is still full: the file (under 1.5 KB) holds what the journal could not
    midi = mido.MidiFile(recorder.save(folder / "take.mid", at=3.0))
    saved = sum(1 for message in midi.tracks[1] if message.type == "note_on")
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    time.sleep(0.5)
    recorder.close()
    events, _ = read_journal(recorder.path)
    print(saved, len(events["P"]), len(said), said[-1])
    """
)


def test_a_journal_write_that_fails_loses_nothing_and_the_thread_keeps_going(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    saved, journaled, warnings, last = result.stdout.split(maxsplit=3)
    assert (saved, journaled, warnings) == ("100", "200", "2")  # every note in the file, every event in the journal
    assert "written again, nothing lost" in last


def test_the_export_reads_what_the_disk_has_not_taken_yet(tmp_path):
    recorder = Recorder(tmp_path / "s", origin=0.0)
    recorder.close()
    tail = "500.000 P 903c50\n900.000 P 803c00\n"
    events, _ = read_journal(recorder.path, tail)
    assert events["P"] == [(500.0, [0x90, 60, 80]), (900.0, [0x80, 60, 0])]


def test_a_session_folder_used_again_keeps_every_earlier_file(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "take-1.mid").write_text("an earlier take whose journal was deleted")
    (folder / SESSION_MIDI).write_text("the last take, saved without a journal beside it")
    Recorder(folder, origin=0.0).close()
    assert (folder / "take-1.mid").read_text() == "an earlier take whose journal was deleted"
    assert (folder / "take-2.mid").read_text() == "the last take, saved without a journal beside it"
    assert not (folder / "take-2.txt").exists() and not (folder / SESSION_MIDI).exists()
    Recorder(folder, origin=0.0).close()  # its journal moves aside, to a number free for both files
    assert (folder / "take-3.txt").read_text().startswith("LPJ1")
    assert sorted(path.name for path in folder.iterdir()) == [JOURNAL, "take-1.mid", "take-2.mid", "take-3.txt"]


def test_two_recorders_never_share_a_session_folder(tmp_path):
    first = Recorder(tmp_path / "s", origin=0.0)
    try:
        with pytest.raises(UserError, match="another LivePerceiver is recording into this session directory"):
            Recorder(tmp_path / "s", origin=0.0)
        assert (tmp_path / "s" / JOURNAL).exists() and not (tmp_path / "s" / "take-1.txt").exists()
    finally:
        first.close()
    Recorder(tmp_path / "s", origin=0.0).close()  # free again once the first is closed
    assert (tmp_path / "s" / "take-1.txt").exists()


STOP_SIGNALS = textwrap.dedent(
    """
    import signal
    from liveperceiver.live.play import STOP_SIGNALS
    from liveperceiver.runtime import stop_event_on_signals

    stop = stop_event_on_signals(STOP_SIGNALS)
    signal.raise_signal(signal.SIGHUP)
    hangup = stop.is_set()
    signal.raise_signal(signal.SIGINT)
    print(hangup, stop.is_set())
    """
)


@pytest.mark.parametrize("ignored", [False, True], ids=["in a terminal", "under nohup"])
def test_sighup_stops_play_cleanly_unless_it_was_started_ignoring_it(ignored):
    """SIGHUP (a closed terminal) stops `play` as Ctrl-C does, but `nohup liveperceiver play` must
    outlive its terminal: a SIGHUP ignored at start stays ignored. SIGINT stops it even when ignored
    at start (a job a script starts in the background)."""

    def start() -> None:  # whatever this test runs under (nohup gives its children SIGHUP ignored)
        signal.signal(signal.SIGHUP, signal.SIG_IGN if ignored else signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job: SIGINT still stops play

    result = subprocess.run(
        [sys.executable, "-c", STOP_SIGNALS], capture_output=True, text=True, timeout=60, preexec_fn=start
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False" if ignored else "True", "True"]
