"""`liveperceiver play --headless` as a real process on JACK: SIGTERM, kill -9 + recover, fuzzing, vanishing ports."""

from __future__ import annotations

import fcntl
import os
import pty
import random
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import mido
import pytest
import rtmidi

from liveperceiver.cli import main
from liveperceiver.core.errors import UserError
from liveperceiver.live import ports
from liveperceiver.live.jack_server import jack_graph_changed
from liveperceiver.live.play import EXIT_MIDI_GONE
from liveperceiver.live.session import Session
from liveperceiver.live.settings import Settings
from liveperceiver.testing.jack import stop_jack_server
from tests.conftest import MODEL_GOLDEN
from tests.jack_fixture import Keyboard, fresh_jack_server, jack_server, no_stuck_notes, wait_for  # noqa: F401

pytestmark = [pytest.mark.jack, pytest.mark.usefixtures("jack_server")]

TINY = str(MODEL_GOLDEN / "tiny-a")


def hangup_as_default() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_play(session_dir, *extra: str) -> subprocess.Popen:
    """`liveperceiver play --headless` in duet mode with a seeded preset and the shipped default model
    (the random tiny model can sample nothing but silence for many seconds); output goes to files."""
    session_dir.mkdir(parents=True, exist_ok=True)
    preset = session_dir.parent / "seeded.toml"
    preset.write_text('mode = "duet"\n[sampling]\nseed = 5\n')
    command = [sys.executable, "-m", "liveperceiver", "play", "--headless", "--midi-api", "jack"]
    command += ["--preset", str(preset), "--session-dir", str(session_dir), "--silence-ms", "200", *extra]
    stdout = open(session_dir.parent / "play.out", "w")  # noqa: SIM115 - a pipe nobody reads could block it
    # as from a terminal, whatever runs the tests (nohup gives its children SIGHUP ignored, which play keeps)
    process = subprocess.Popen(
        command, stdout=stdout, stderr=subprocess.STDOUT, text=True, preexec_fn=hangup_as_default
    )
    # every poll opens and closes two JACK clients (libjack's races): poll every 50 ms, not 5
    if not wait_for(lambda: ports.VIRTUAL_OUT in " ".join(ports.list_ports("jack")[0]), timeout=30, step=0.05):
        process.kill()  # seen once in a full run: say what play printed, it is gone with the tmp dir later
        process.wait(10)
        stdout.close()
        said = (session_dir.parent / "play.out").read_text()[-3000:]
        raise AssertionError(f"play's output port did not appear within 30 s (exit {process.returncode}): {said}")
    return process


def until_heard(keys: Keyboard, journal) -> bool:
    """Tap a probe note (A0) until the player process has journaled it: it is up and listening."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        keys.note(21, velocity=1)
        keys.off(21)
        if wait_for(lambda: journal.exists() and " P 901501" in journal.read_text(), timeout=0.5):
            # JACK's dummy driver can drop an event while clients start up on a busy machine; a lost
            # probe note-off would leave A0 held (the model then waits), so release every key
            keys.send([0xB0, 123, 0])
            time.sleep(0.05)
            return True
    return False


def diagnose(tmp_path, server: str) -> str:
    graph = subprocess.run(["jack_lsp", "-s", server, "-c"], capture_output=True, text=True).stdout
    journal = (tmp_path / "s" / "journal.txt").read_text()[-2000:]
    return f"{(tmp_path / 'play.out').read_text()[-2000:]}\nJACK graph:\n{graph}\njournal:\n{journal}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])  # SIGHUP: the terminal closed
def test_sigterm_turns_every_note_off_saves_and_exits_zero_fast(tmp_path, fresh_jack_server, signum):  # noqa: F811
    process = start_play(tmp_path / "s", "--record", str(tmp_path / "take.mid"))
    keys = None
    try:
        keys = Keyboard()  # in the try: if it fails, play is still stopped (left running, it loaded later tests)
        assert until_heard(keys, tmp_path / "s" / "journal.txt"), diagnose(tmp_path, fresh_jack_server)
        keys.phrase([60, 64, 67, 72])
        if not wait_for(lambda: keys.note_ons(), timeout=20):
            # Seen in about 1 start in 5 on the 2-core machine while inputs used python-rtmidi's callback
            # (0 in 12 starts of the same loop since they are polled; the cause is not pinned down): the play
            # process journals the player and sends the model's notes, but its "LivePerceiver Out" JACK
            # client never runs a cycle (jackd logs "LivePerceiver Out was not finished, state =
            # Triggered" every period; gdb shows the client thread waiting in JackClient::DummyCycle).
            # The same with python-rtmidi built against the system's libjack, so not a version mismatch.
            # The session checks its output at start and reopens a stalled one
            # (MidiOutput.ensure_delivery); this skip stays for a stall after that check. The SIGTERM
            # guarantees below need model notes heard; other tests cover duet output.
            pytest.skip("the model stayed silent for 20 s; " + diagnose(tmp_path, fresh_jack_server))
        sigterm_at = time.monotonic()
        process.send_signal(signum)
        process.wait(10)
        jack_graph_changed()  # the server removes play's ports now: keys.close() waits that out
        elapsed = time.monotonic() - sigterm_at
        assert process.returncode == 0, (tmp_path / "play.out").read_text()
        assert elapsed < 1.5  # the 1 s bound (about 0.2 s here), with a CI margin
        assert no_stuck_notes(keys, tmp_path / "s" / "journal.txt")
        midi = mido.MidiFile(tmp_path / "take.mid")
        assert [t.name for t in midi.tracks] == ["Tempo", "Player", "LivePerceiver"]
        assert [m.note for m in midi.tracks[1] if m.type == "note_on" and m.velocity > 1] == [60, 64, 67, 72]
        heard = [m[1] for _, m in keys.note_ons()]
        assert [m.note for m in midi.tracks[2] if m.type == "note_on" and m.velocity] == heard
        assert (tmp_path / "s" / "session.mid").is_file()
    finally:
        if process.poll() is None:
            process.kill()
        if keys is not None:
            keys.close()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "stop"])
def test_jack_server_gone_is_one_line_then_the_take_is_saved_and_play_exits_with_its_status(
    tmp_path,
    fresh_jack_server,  # noqa: F811 - this test stops it
    signum,
):
    process = start_play(tmp_path / "s", "--record", str(tmp_path / "take.mid"))  # duet: the model plays too
    keys = None
    try:
        keys = Keyboard()
        assert until_heard(keys, tmp_path / "s" / "journal.txt"), diagnose(tmp_path, fresh_jack_server)
        keys.phrase([60, 64, 67])
        assert wait_for(lambda: " P 90435a" in (tmp_path / "s" / "journal.txt").read_text())  # 67 journaled
        wait_for(keys.note_ons, timeout=5)  # the model answering, mostly (the take is checked either way)
        stop_jack_server(fresh_jack_server, signum)
        stopped_at = time.monotonic()
        process.wait(10)
        elapsed = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if keys is not None:
            keys.close()  # on a server that is gone: frees its clients, nothing else
    said = (tmp_path / "play.out").read_text()
    assert process.returncode == EXIT_MIDI_GONE, said
    # the watch hears it in milliseconds, the input thread looks every 0.5 s, close joins for up to 0.5 s
    assert elapsed < 5.0, said
    assert said.count("the JACK server went away") == 1, said
    assert "Traceback" not in said and f"saved {tmp_path / 'take.mid'}" in said, said
    midi = mido.MidiFile(tmp_path / "take.mid")  # the take up to the loss, as played
    assert [m.note for m in midi.tracks[1] if m.type == "note_on" and m.velocity > 1] == [60, 64, 67]
    model_notes = [m for m in midi.tracks[2] if m.type in ("note_on", "note_off")]
    sounding = sum(1 if m.type == "note_on" and m.velocity else -1 for m in model_notes)
    assert sounding == 0, model_notes  # every note the model began ends in the take


class Terminal:
    """A pseudo-terminal of 120x40 for `liveperceiver play` with its UI; a thread reads what it draws
    (a terminal nobody reads would block the UI once its buffer is full)."""

    def __init__(self) -> None:
        self.controller, self.device = pty.openpty()
        fcntl.ioctl(self.device, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.output = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.controller, 65536)
            except OSError:  # closed
                return
            if not data:
                return
            self.output += data

    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")

    def close(self) -> None:
        os.close(self.device)
        os.close(self.controller)


def test_sigterm_stops_the_ui_as_its_quit_does_and_a_file_that_cannot_be_written_keeps_the_others(
    tmp_path,
    fresh_jack_server,  # noqa: F811
):
    """With its terminal UI (the default), `play` must not die on SIGTERM or SIGHUP (a closed terminal
    or ssh connection) with the model's notes sounding and the take unsaved: the UI quits as `q` does.
    A --record file that cannot be written keeps neither session.mid nor the exit status from the rest."""
    session_dir = tmp_path / "s"
    session_dir.mkdir()
    (tmp_path / "seeded.toml").write_text('mode = "duet"\n[sampling]\nseed = 5\n')
    (tmp_path / "file").write_text("")  # --record below names a folder that is a file
    terminal = Terminal()
    command = [
        sys.executable,
        "-m",
        "liveperceiver",
        "play",
        "--midi-api",
        "jack",
        "--preset",
        str(tmp_path / "seeded.toml"),
    ]
    command += [
        "--session-dir",
        str(session_dir),
        "--silence-ms",
        "200",
        "--record",
        str(tmp_path / "file" / "take.mid"),
    ]
    environment = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    process = subprocess.Popen(
        command,
        stdin=terminal.device,
        stdout=terminal.device,
        stderr=terminal.device,
        env=environment,
        start_new_session=True,
    )
    keys = None
    try:
        assert wait_for(lambda: ports.VIRTUAL_OUT in " ".join(ports.list_ports("jack")[0]), timeout=30, step=0.05), (
            terminal.text()[-2000:]
        )
        keys = Keyboard()
        assert until_heard(keys, session_dir / "journal.txt"), terminal.text()[-2000:]
        keys.phrase([60, 64, 67, 72])
        if not wait_for(lambda: keys.note_ons(), timeout=20):
            pytest.skip("the model stayed silent for 20 s (see the headless SIGTERM test)")
        process.send_signal(signal.SIGTERM)
        process.wait(15)
        jack_graph_changed()
        said = terminal.text()
        assert process.returncode == 0, said[-3000:]
        assert no_stuck_notes(keys, session_dir / "journal.txt")
        assert "Traceback" not in said, said[-3000:]
        assert f"saved {session_dir / 'session.mid'}" in said, said[-3000:]
        assert "take.mid: " in said and "file is a file, not a folder" in said, said[-3000:]
        midi = mido.MidiFile(session_dir / "session.mid")
        assert [m.note for m in midi.tracks[1] if m.type == "note_on" and m.velocity > 1] == [60, 64, 67, 72]
        assert [m.note for m in midi.tracks[2] if m.type == "note_on" and m.velocity] == [
            m[1] for _, m in keys.note_ons()
        ]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if keys is not None:
            keys.close()
        terminal.close()


def test_kill_9_then_recover_rebuilds_the_take(tmp_path, capsys):
    process = start_play(tmp_path / "s", "--mode", "listen")
    keys = None
    try:
        keys = Keyboard()
        assert until_heard(keys, tmp_path / "s" / "journal.txt")
        keys.phrase([60, 62, 64, 65, 67, 69])
        time.sleep(0.4)  # more than the 250 ms flush bound
    finally:
        process.kill()
        process.wait(10)
        jack_graph_changed()  # the server removes the dead client now: keys.close() waits that out
        if keys is not None:
            keys.close()
    assert main(["recover", str(tmp_path / "s"), "-o", str(tmp_path / "r.mid")]) == 0
    assert "Player " in capsys.readouterr().out
    midi = mido.MidiFile(tmp_path / "r.mid")
    assert [m.note for m in midi.tracks[1] if m.type == "note_on" and m.velocity > 1] == [60, 62, 64, 65, 67, 69]
    assert main(["recover", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.mid")]) == 2


def test_unavailable_api_is_one_line_and_exit_2(capsys):
    """A MIDI API this system cannot have (CoreMIDI off macOS, the Windows API on macOS): one line, exit 2."""
    api, why = ("windows", "only on Windows") if sys.platform == "darwin" else ("coremidi", "only on macOS")
    assert main(["play", "--headless", "--midi-api", api]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"MIDI API {api!r} is not available here" in err and why in err, err


def test_jack_server_gone_when_the_port_opens_is_one_line(monkeypatch):
    """resolve_api() saw a server, but it is gone when the client opens: a UserError, not a traceback."""
    monkeypatch.setenv("JACK_DEFAULT_SERVER", f"lp-no-such-server-{os.getpid()}")
    monkeypatch.setenv("JACK_NO_START_SERVER", "1")
    with pytest.raises(UserError, match="cannot open a jack MIDI input client") as raised:
        ports.MidiInput("jack")
    assert "\n" not in str(raised.value)


def random_message(rng: random.Random) -> list[int]:
    """Valid, truncated, overlong and nonsense MIDI byte lists."""
    kind = rng.random()
    if kind < 0.4:
        return [rng.choice([0x80, 0x90, 0xB0]) | rng.randrange(16), rng.randrange(128), rng.randrange(128)]
    if kind < 0.5:
        return [rng.choice([0xB0]) | rng.randrange(16), rng.choice([64, 120, 123]), rng.randrange(128)]
    if kind < 0.6:
        return [rng.choice([0xF8, 0xFA, 0xFB, 0xFC, 0xFE, 0xF6])]
    if kind < 0.7:
        return [0xF2, rng.randrange(128), rng.randrange(128)]
    if kind < 0.8:
        return [rng.randrange(0x80, 0xF0)] + [rng.randrange(128) for _ in range(rng.randrange(0, 3))]
    if kind < 0.9:
        return [rng.randrange(256) for _ in range(rng.randrange(1, 4))]
    return [rng.choice([0xA0, 0xC0, 0xD0, 0xE0]) | rng.randrange(16), rng.randrange(128), rng.randrange(128)]


@pytest.mark.slow
def test_100k_random_and_malformed_messages(tmp_path):
    session = Session(Settings(seed=3, mode="duet"), model=TINY, api="jack", session_dir=tmp_path / "s")
    session.start()
    keys = Keyboard()
    rng = random.Random(7)
    try:
        sent = 0
        for _ in range(100_000):
            message = random_message(rng)
            try:
                keys.send(message)
            except (ValueError, rtmidi.RtMidiError):
                continue  # the sending side refuses some garbage; the rest reaches the session
            sent += 1
            if sent % 250 == 0:
                time.sleep(0.01)  # JACK's MIDI ring buffers are finite
        # the player lets go of everything: all-notes-off on every channel and pedal up
        for channel in range(16):
            keys.send([0xB0 | channel, 64, 0])
            keys.send([0xB0 | channel, 123, 0])
        time.sleep(1.0)
        assert all(thread.is_alive() for thread in session.threads)
        assert session.scheduler.thread.is_alive()
        session.update(mode="listen")
        scheduler = session.scheduler
        assert wait_for(lambda: scheduler.sent_on == scheduler.sent_off and not scheduler.sounding, timeout=3)
        assert no_stuck_notes(keys, session.recorder.path)
        assert sent > 90_000
        assert session.snapshot().notes_in > 2_000  # the garbage really reached the session (JACK drops some)
        assert session.shared.errors == 0
    finally:
        session.close(release_ports=True)
        keys.close()
    assert no_stuck_notes(keys, session.recorder.path)


def test_named_port_vanishes_and_is_reconnected(tmp_path):
    piano = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name="lp-test-stage")
    piano.open_virtual_port("keys")
    session = Session(Settings(mode="listen"), model=TINY, api="jack", in_port="lp-test-stage", session_dir=tmp_path)
    session.start()
    try:
        piano.send_message([0x90, 60, 100])
        assert wait_for(lambda: session.snapshot().notes_in == 1, timeout=3)
        ports.release(piano)
        assert wait_for(lambda: any("vanished" in line for line in session.snapshot().log), timeout=5)
        piano = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name="lp-test-stage")
        piano.open_virtual_port("keys")
        assert wait_for(lambda: any("reconnected" in line for line in session.snapshot().log), timeout=5)
        piano.send_message([0x90, 62, 100])
        assert wait_for(lambda: session.snapshot().notes_in == 2, timeout=3)
    finally:
        session.close(release_ports=True)
        ports.release(piano)


def test_ports_lists_the_jack_ports(capsys):
    session_like = ports.MidiInput("jack")
    try:
        assert main(["ports"]) == 0
    finally:
        session_like.close()
    out = capsys.readouterr().out
    assert "jack:" in out and ports.VIRTUAL_IN in out
