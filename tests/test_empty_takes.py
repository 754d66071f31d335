"""A take with nothing in it says so in one line: `render` of a session without notes refuses (no
silent WAV), `recover` of a journal of junk exits 2 without writing anything or touching the journal,
and a journal with a few unreadable lines is recovered with a warning naming them."""

from __future__ import annotations

import mido
from conftest import cli, one_line_error

from liveperceiver.live.recorder import Recorder

HEADER = "LPJ1 2026-01-01T12:00:00+00:00\n"


def test_render_of_a_session_without_notes_is_refused(tmp_path):
    # What a session where nobody played saves: a tempo track and two named tracks, a pedal, no notes.
    recorder = Recorder(tmp_path / "session", origin=0.0)
    recorder.record("P", 0.5, [0xB0, 64, 127])
    recorder.record("P", 1.5, [0xB0, 64, 0])
    session = recorder.save()
    recorder.close()
    out = tmp_path / "out" / "session.wav"
    message = one_line_error(cli("render", str(session), "-o", str(out), cwd=tmp_path))
    assert "no notes to render" in message and str(session) in message
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


def test_recover_of_a_journal_of_junk_exits_2_and_keeps_the_journal(tmp_path):
    journal = tmp_path / "session" / "journal.txt"
    journal.parent.mkdir()
    text = HEADER + "hello world\n12 P zz\n\x00\x01\x02 garbage\n40 Q 904040\n50 P 9040"  # junk, torn last line
    journal.write_text(text)
    out = tmp_path / "recovered.mid"
    message = one_line_error(cli("recover", str(journal.parent), "-o", str(out), cwd=tmp_path))
    assert "no notes to recover" in message and "4 lines are not journal events" in message and "line 2" in message
    assert str(journal) in message and "left as it is" in message
    assert not out.exists() and journal.read_text() == text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["session"], "nothing written"


def test_recover_of_an_empty_journal_says_nothing_was_played(tmp_path):
    journal = tmp_path / "journal.txt"
    journal.write_text(HEADER + "100.000 T 120.000\n")
    message = one_line_error(cli("recover", str(journal), "-o", str(tmp_path / "r.mid"), cwd=tmp_path))
    assert "no notes to recover" in message and "nothing was played" in message
    assert not (tmp_path / "r.mid").exists()


def test_recover_warns_about_unreadable_lines_and_keeps_the_notes(tmp_path):
    journal = tmp_path / "journal.txt"
    journal.write_text(HEADER + "10.000 P 903c5a\nnot an event\n510.000 P 803c00\n1000.000 M 904850\n1200.000 M 80")
    result = cli("recover", str(journal), "-o", str(tmp_path / "r.mid"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"warning: {journal}: 1 line is not journal events (the first is line 3), skipped"
    assert "Player 1 notes, LivePerceiver 1 notes" in result.stdout
    notes = [m.note for m in mido.MidiFile(tmp_path / "r.mid") if m.type == "note_on" and m.velocity > 0]
    assert sorted(notes) == [60, 72]
