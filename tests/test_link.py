"""Ableton Link with real peers: a second `aalink.Link` in this process plays the DAW (tempo, beat,
start and stop) while a live session plays over real JACK ports.

Link finds peers by UDP multicast on every network interface, so nothing here may make a Link peer
in the machine's own network namespace. `test_link_peers_in_a_private_network_namespace` runs this
file again under `unshare --net`, in a namespace of its own whose only interface is loopback, with
LP_LINK_NETNS=1; pytest there collects the `netns_*` functions (the peer tests), and each of them
first checks that loopback is all there is. Where no namespace can be made (not root and no user
namespaces) that test skips with the reason, and fails in CI. The `test_*` functions here make no
peer: settings, presets, the command line without aalink, the grid arithmetic, the UI's line.

Times are measured as the test's keyboard heard them over JACK (the private server's period is 512
frames at 48 kHz, 10.7 ms), against the peer's own beat grid read from the peer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from liveperceiver.cli import main
from liveperceiver.core.errors import UserError
from liveperceiver.live.link import FREE, LINK, MIDI_CLOCK, LinkStatus, LinkTimeline, clock_source, link_line
from liveperceiver.live.settings import Settings
from liveperceiver.runtime import freeze_heap, thaw_heap
from tests.conftest import MODEL_GOLDEN, in_ci, missing, require_command
from tests.jack_fixture import Keyboard, jack_server, no_stuck_notes, wait_for  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
NETNS_FLAG = "LP_LINK_NETNS"
JACK_PERIOD = 512 / 48000  # tests/jack_fixture.py's private server
PEER_HEAD_START_S = 1.0  # Link keeps the older of two sessions' timelines (within 0.5 s it is a coin toss)


# --------------------------------------------------------------------------- the namespace runner


def unshare_prefix() -> list[str]:
    """`unshare` for a network namespace of our own: as root directly, else inside a user namespace."""
    unshare = require_command("unshare", "Debian/Ubuntu: apt install util-linux")
    require_command("ip", "Debian/Ubuntu: apt install iproute2")
    return [unshare, "--net"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--net"]


def test_link_peers_in_a_private_network_namespace(tmp_path):
    """Every test that makes a Link peer (`netns_*` below), run in a namespace with only loopback."""
    pytest.importorskip("aalink", reason="Ableton Link tests need the aalink package (pip install aalink)")
    prefix = unshare_prefix()
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"no private network namespace can be made here for the Link tests ({probe.stderr.strip()})")
    script = 'ip link set lo up && ip link set lo multicast on && exec "$@"'
    pytest_args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-o",
        "python_functions=netns_*",
    ]
    pytest_args += ["--basetemp", str(tmp_path / "inner"), str(Path(__file__))]
    env = {**os.environ, NETNS_FLAG: "1"}
    result = subprocess.run(
        [*prefix, "sh", "-c", script, "sh", *pytest_args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    summary = [line for line in output.splitlines() if " passed" in line][-1:]
    assert summary and "skipped" not in summary[0], output[-3000:]  # every peer test ran


@pytest.fixture(scope="module", autouse=True)
def only_loopback():
    """Inside the namespace run: refuse to make any peer unless loopback is the only interface."""
    if os.environ.get(NETNS_FLAG) == "1":
        names = [name for _, name in socket.if_nameindex()]
        assert names == ["lo"], f"the Link tests must run where loopback is the only interface, not {names}"
    yield


# --------------------------------------------------------------------------- the DAW: a second peer


@dataclass(frozen=True)
class Line:
    """The peer's beat grid from one reading: beat `beat` at monotonic `at`, `bpm` on."""

    at: float
    beat: float
    bpm: float

    def beat_at(self, when: float) -> float:
        return self.beat + (when - self.at) * self.bpm / 60


class Peer:
    """A Link peer of its own, as a DAW is one: aalink calls back through an asyncio loop, so the
    peer gets a loop on a thread of its own. The test calls its Link directly (Link is thread-safe)."""

    def __init__(self, bpm: float = 100.0, quantum: int = 4) -> None:
        import aalink

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="test-peer", daemon=True).start()

        async def make():
            return aalink.Link(bpm)

        self.link = asyncio.run_coroutine_threadsafe(make(), self.loop).result(5)
        self.link.quantum = quantum
        self.link.start_stop_sync_enabled = True
        self.link.enabled = True
        self.born = time.monotonic()

    def line(self) -> Line:
        """A reading of the peer's beat, stamped on both sides by the monotonic clock."""
        best = None
        for _ in range(5):
            before = time.monotonic()
            beat = self.link.beat
            after = time.monotonic()
            if best is None or after - before < best[1] - best[0]:
                best = (before, after, beat)
        return Line((best[0] + best[1]) / 2, best[2], self.link.tempo)

    def wait_older(self) -> None:
        time.sleep(max(0.0, self.born + PEER_HEAD_START_S - time.monotonic()))

    def close(self) -> None:
        self.link.enabled = False
        time.sleep(0.15)  # Link's last callbacks (none are set here) before the object goes
        self.loop.call_soon_threadsafe(self.loop.stop)


def off_grid(line: Line, when: float, every: float = 1.0) -> float:
    """Seconds from `when` to the nearest multiple of `every` beats on the peer's grid (+: after it)."""
    beats = line.beat_at(when) / every
    return (beats - round(beats)) * every * 60 / line.bpm


@pytest.fixture
def peer():
    if os.environ.get(NETNS_FLAG) != "1":
        pytest.fail("a Link peer outside the private network namespace")  # never reached: see the runner
    daw = Peer()
    yield daw
    daw.close()


@pytest.fixture
def live(tmp_path, peer, jack_server):  # noqa: F811 - the imported fixture
    """Open sessions joined to Link, each with a keyboard on its ports; all closed afterwards."""
    from liveperceiver.live.session import Session

    sessions, keyboards = [], []

    def open_(link_tempo: float | None = None, **changes):
        settings = Settings(**{"seed": 1, "silence_ms": 300, "response_seconds": 2.0, "link": True, **changes})
        peer.wait_older()
        session = Session(
            settings, model=None, api="jack", session_dir=tmp_path / f"session{len(sessions)}", link_tempo=link_tempo
        )
        sessions.append(session)
        freeze_heap()  # as play runs a session (live/play.py realtime_process): no full collection stalls it
        session.start()
        keys = Keyboard()
        keyboards.append(keys)
        if settings.link:
            assert wait_for(lambda: session.snapshot().link.peers == 1, timeout=10), session.snapshot().log
        return session, keys

    yield open_
    for session in sessions:
        session.close(release_ports=True)
    for keys in keyboards:
        keys.close()
    thaw_heap()


# --------------------------------------------------------------------------- peer tests (netns_*)


def model_onsets_sent(session, since: float, until: float = float("inf")) -> list[float]:
    """The model's note-ons as the scheduler sent them onto LivePerceiver Out (a chord is one onset)."""
    with session.lock:
        times = sorted(
            when for when, is_on, _, who in session.roll if who == "model" and is_on and since <= when < until
        )
    return [t for i, t in enumerate(times) if i == 0 or t - times[i - 1] > 0.003]


def netns_the_answer_starts_on_a_beat_of_the_peer_then_on_its_bar_line(live, peer):
    """The answer's first note lands on LivePerceiver Out within one JACK period of the peer's beat
    (then bar line), and the test's keyboard hears it within one more (JACK's own period latency)."""
    peer.link.force_beat(0.37)  # the DAW's beats are somewhere the session cannot guess from the tempo
    session, keys = live()
    for every, answer_on in ((1.0, "beat"), (4.0, "bar")):
        session.update(mode="call", answer_on=answer_on)
        last_off = keys.phrase([60, 62, 64, 65])
        assert wait_for(lambda t=last_off: keys.note_ons(since=t), timeout=10), session.snapshot().log
        heard = keys.note_ons(since=last_off)[0][0]
        sent = model_onsets_sent(session, last_off)[0]
        line = peer.line()
        errors_ms = [off_grid(line, sent, every) * 1000, off_grid(line, heard, every) * 1000]
        assert -1 <= errors_ms[0] <= JACK_PERIOD * 1000 and errors_ms[1] <= 2 * JACK_PERIOD * 1000, errors_ms
        assert sent - last_off >= 0.3 - 0.01  # never before the silence threshold
        assert sent - last_off <= 0.3 + every * 60 / line.bpm + 0.01  # on the first beat (bar line) after it
        session.update(mode="listen")  # the answer ends here: every note it started has ended
        assert no_stuck_notes(keys, session.recorder.path)


def netns_a_peers_tempo_change_changes_the_spacing_of_quantised_notes(live, peer):
    peer.link.tempo = 120.0
    session, keys = live(mode="duet", quantize="1/8", lookahead_ms=300)
    assert wait_for(lambda: abs(session.snapshot().bpm - 120.0) < 0.01, timeout=2)
    played = keys.phrase([60, 64, 67, 72])
    time.sleep(4.0)
    before_line = peer.line()
    peer.link.tempo = 75.0
    after_line = peer.line()
    changed = after_line.at
    time.sleep(4.0)
    # the engine takes the new grid within a tick (5 ms); notes planned on the old one move with it.
    # Looked at from 50 ms on: under a full test run a tick came 20+ ms late once, and a note planned
    # on the old grid went out on it, 12 ms off the new one
    before = model_onsets_sent(session, played + 0.2, changed)
    after = model_onsets_sent(session, changed + 0.05)
    assert len(before) >= 3 and len(after) >= 3, (before, after, session.snapshot().log[-5:])
    errors_ms = [
        [round(off_grid(line, t, 0.5) * 1000, 2) for t in times]
        for line, times in ((before_line, before), (after_line, after))
    ]
    assert all(-1 <= error <= JACK_PERIOD * 1000 for errors in errors_ms for error in errors), errors_ms
    heard = [t for t, _ in keys.note_ons(since=changed + 0.05)]  # sent after the change: heard a period later
    assert all(-0.001 <= off_grid(after_line, t, 0.5) <= 2 * JACK_PERIOD for t in heard), heard
    # the spacing: eighths of 0.25 s before, of 0.4 s after (n x 0.4 s is a multiple of 0.25 s only
    # every 2 s: some gap after the change is not)
    gaps_after = [b - a for a, b in zip(after, after[1:], strict=False)]
    assert any(abs((gap / 0.25) - round(gap / 0.25)) * 0.25 > 0.05 for gap in gaps_after), gaps_after
    session.update(mode="listen")
    assert no_stuck_notes(keys, session.recorder.path)


def netns_a_peers_stop_silences_the_model_with_every_note_off_and_start_resumes_it(live, peer):
    session, keys = live(mode="duet")
    # Link shares start/stop changes: a peer that was playing before the session joined is taken as
    # playing only once it starts again (README, Sync with Ableton Link)
    peer.link.playing = True
    assert wait_for(lambda: any("transport start (link)" in line for line in session.snapshot().log), timeout=2)
    keys.phrase([60, 64, 67])
    assert wait_for(lambda: session.scheduler.sounding_pitches(), timeout=20), session.snapshot().log
    peer.link.playing = False
    stopped = time.monotonic()
    assert wait_for(lambda: session.snapshot().state == "stopped (transport)", timeout=2)
    assert no_stuck_notes(keys, session.recorder.path)  # every note-on heard has its note-off
    offs = [t for t, m in keys.messages(since=stopped) if m[0] & 0xF0 == 0x80]
    assert offs and offs[-1] - stopped < 0.1, offs  # at once (a JACK period or two)
    time.sleep(1.0)
    assert not keys.note_ons(since=stopped + 0.05), "the model played on after the peer's stop"
    assert any("transport stop (link)" in line for line in session.snapshot().log)
    # the peer starts again: the model plays on
    peer.link.playing = True
    started = time.monotonic()
    assert wait_for(lambda: keys.note_ons(since=started), timeout=20), session.snapshot().log[-5:]
    # start/stop ignored (the setting): a stop no longer stops the model
    session.update(link_start_stop=False)
    time.sleep(0.2)
    peer.link.playing = False
    ignored = time.monotonic()
    assert wait_for(lambda: keys.note_ons(since=ignored + 0.05), timeout=20)
    assert session.snapshot().state == "playing"
    session.update(mode="listen")
    assert no_stuck_notes(keys, session.recorder.path)


def netns_the_session_shows_and_logs_link_and_follows_the_ui_toggle(live, peer, tmp_path):
    from types import SimpleNamespace

    from liveperceiver.ui.app import LivePerceiverApp

    session, _ = live()
    snap = session.snapshot()
    line = peer.line()
    assert snap.clock_source == LINK and snap.link is not None and snap.link.peers == 1
    assert snap.bpm == pytest.approx(100.0, abs=0.01) and snap.link.bpm == pytest.approx(100.0, abs=0.01)
    phase = (line.beat_at(time.monotonic()) - snap.link.beat) % 4
    assert min(phase, 4 - phase) < 0.05, (snap.link.beat, line)  # the peer's place in the bar
    assert wait_for(lambda: any("clock: Ableton Link" in entry for entry in session.snapshot().log), timeout=2)
    assert wait_for(lambda: any("link: 1 peer" in entry for entry in session.snapshot().log), timeout=2)
    preset = tmp_path / "duet.toml"  # a preset that says nothing of Link
    preset.write_text('mode = "duet"\n[link]\nlink_quantum = 3\n')
    app = LivePerceiverApp(session, presets=[SimpleNamespace(name="duet", path=preset, description="")])

    async def drive():
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause(0.3)
            panel = str(app.main.query_one("#session").render())
            assert "link: 1 peer, 100.0 BPM, beat " in panel and "/4" in panel, panel
            await pilot.press("l")  # leave the Link session
            for _ in range(40):
                await pilot.pause(0.05)
                if peer.link.num_peers == 0:
                    break
            assert peer.link.num_peers == 0 and not session.settings.link
            await pilot.pause(0.3)
            assert session.snapshot().clock_source == FREE and session.snapshot().link is None
            assert "clock     free" in str(app.main.query_one("#session").render())
            await pilot.press("l")  # and join it again
            for _ in range(100):
                await pilot.pause(0.05)
                if peer.link.num_peers == 1:
                    break
            assert peer.link.num_peers == 1 and session.settings.link
            await pilot.pause(0.3)
            assert "link: 1 peer" in str(app.main.query_one("#session").render())
            await pilot.press("1")  # a preset turns Link on, never off: the band's session stays joined
            await app.workers.wait_for_complete()
            await pilot.pause(0.3)
            assert session.settings.mode == "duet" and session.settings.link_quantum == 3 and session.settings.link
            assert "/3" in str(app.main.query_one("#session").render())

    asyncio.run(drive())
    assert wait_for(lambda: any("clock: free time" in entry for entry in session.snapshot().log), timeout=2)
    session.apply_preset(str(preset))  # the same through the session's own preset switch
    assert session.settings.link and peer.link.num_peers == 1


def netns_a_session_joins_when_link_is_turned_on_live(live, peer):
    session, _ = live(link=False)
    time.sleep(0.5)
    assert peer.link.num_peers == 0 and session.link is None and session.snapshot().clock_source == FREE
    session.update(link=True, link_quantum=3)  # the UI's l key, a preset with [link]
    assert wait_for(lambda: peer.link.num_peers == 1 and session.snapshot().clock_source == LINK, timeout=5)
    assert session.snapshot().link.quantum == 3
    log = session.snapshot().log
    assert sum("link: on" in line for line in log) == 1, log  # one line says it


def netns_link_never_sets_the_tempo_unless_told_to(live, peer):
    session, _ = live()
    time.sleep(0.5)
    assert peer.link.tempo == pytest.approx(100.0, abs=0.001)  # the session took the peer's tempo
    assert session.snapshot().bpm == pytest.approx(100.0, abs=0.001)
    session.close(release_ports=True)
    assert wait_for(lambda: peer.link.num_peers == 0, timeout=3)  # closing leaves the Link session
    proposing, _ = live(link_tempo=90.0)  # play --link-tempo 90
    assert wait_for(lambda: abs(peer.link.tempo - 90.0) < 0.01, timeout=3), peer.link.tempo
    assert wait_for(lambda: abs(proposing.snapshot().bpm - 90.0) < 0.01, timeout=2)
    peer.link.tempo = 110.0  # the DAW has the last word
    assert wait_for(lambda: abs(proposing.snapshot().bpm - 110.0) < 0.01, timeout=2)


def netns_play_headless_joins_link_and_stops_on_sigint(tmp_path, peer, jack_server):  # noqa: F811
    peer.wait_older()
    command = [sys.executable, "-m", "liveperceiver", "play", "--headless", "--link", "--link-quantum", "3"]
    command += ["--midi-api", "jack", "--session-dir", str(tmp_path / "headless")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        wanted = ("link: on, 3 beats per bar", "link: 1 peer", "clock: Ableton Link (")
        while time.monotonic() < deadline and not all(any(w in line for line in lines) for w in wanted):
            time.sleep(0.1)
        assert all(any(w in line for line in lines) for w in wanted), "".join(lines)
        assert wait_for(lambda: peer.link.num_peers == 1, timeout=5)  # each side discovers the other on its own time
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
        reader.join(5)
    assert code == 0, lines


def netns_bench_live_link_phase_measures_onsets_against_the_peer_grid(tmp_path, jack_server):  # noqa: F811
    """`bench --live`'s Link row on two calls: its own peer, the session on its beat, a tempo change."""
    import random

    from liveperceiver.tools.link_bench import link_phase
    from liveperceiver.tools.live_bench import _link_rows

    result = link_phase(None, random.Random(3), 2, tmp_path)
    assert result["answered"] >= 1, result
    first, every = result["first_note_sent"], result["onsets_sent"]
    assert first["n"] == result["answered"] and every["n"] >= first["n"]
    assert -1 <= first["p50_ms"] <= JACK_PERIOD * 1000 and -1 <= every["p50_ms"] <= JACK_PERIOD * 1000, result
    rows = _link_rows(result)
    assert rows[0].startswith("Ableton Link, a peer at 100 -> 128 BPM") and len(rows) == 5, rows


# --------------------------------------------------------------------------- without a peer (test_*)


def test_link_settings_in_presets_flags_and_their_mistakes(tmp_path):
    from liveperceiver.live.presets import load_preset, preset_to_toml

    good = tmp_path / "band.toml"
    good.write_text(
        'mode = "call"\n[link]\nlink = true\nlink_quantum = 3\nlink_start_stop = false\nanswer_on = "bar"\n'
    )
    settings = load_preset(good)
    assert (settings.link, settings.link_quantum, settings.link_start_stop, settings.answer_on) == (
        True,
        3,
        False,
        "bar",
    )
    again = tmp_path / "again.toml"
    again.write_text(preset_to_toml(settings))
    assert load_preset(again) == settings
    assert Settings().link is False and Settings().link_quantum == 4 and Settings().answer_on == "threshold"
    mistakes = {
        "[link]\nlink_quantum = 0\n": "link.link_quantum = 0 is outside the allowed values (1 .. 16 beats per bar)",
        '[link]\nanswer_on = "downbeat"\n': "one of threshold, beat, bar",
        '[link]\nlink = "yes"\n': 'link.link = "yes" has the wrong type: expected true or false',
        "[timing]\nlink = true\n": "timing.link belongs in the [link] section, not in [timing]",
        "link_quantum = 4\n": "link_quantum belongs in the [link] section, not at the top level",
    }
    for text, expected in mistakes.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(UserError) as error:
            load_preset(bad)
        assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--link"], "Ableton Link needs the aalink package, which is not installed (pip install aalink)"),
        (["--link-quantum", "0"], "--link-quantum = 0 is outside the allowed values (1 .. 16 beats per bar)"),
        (["--link", "--link-tempo", "5"], "--link-tempo 5 is outside the tempo range Link accepts (20 .. 999 BPM)"),
        (["--link-tempo", "100"], "--link-tempo proposes a tempo to the Link session: it needs --link"),
    ],
)
def test_play_link_flags_fail_in_one_line_before_any_port_opens(monkeypatch, capsys, flags, expected):
    """Without aalink, `play --link` says how to install it; bad --link-tempo/--link-quantum values
    are named. None of this needs a MIDI system: nothing opens a port (or joins Link) first."""
    if "--link-tempo" not in flags:
        monkeypatch.setitem(sys.modules, "aalink", None)  # `import aalink` fails as when it is not installed
    assert main(["play", "--headless", "--midi-api", "jack", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


@pytest.mark.jack
def test_turning_link_on_without_aalink_is_refused_and_the_settings_stay(monkeypatch, tmp_path, jack_server):  # noqa: F811
    """The UI's `l` key calls update(link=True): without aalink that is a ValueError the UI logs."""
    from liveperceiver.live.session import Session

    session = Session(Settings(seed=1), model=str(MODEL_GOLDEN / "tiny-a"), api="jack", session_dir=tmp_path / "s")
    try:
        monkeypatch.setitem(sys.modules, "aalink", None)
        with pytest.raises(ValueError, match=r"aalink package, which is not installed \(pip install aalink\)"):
            session.update(link=True)
        assert session.settings.link is False and session.link is None
    finally:
        session.close(release_ports=True)


def test_the_link_grid_beats_bars_and_quantise():
    line = LinkTimeline(at=10.0, beat=5.5, bpm=120.0, quantum=4, peers=1, playing=True, enabled=True)
    assert line.beat_at(11.0) == pytest.approx(7.5)
    assert line.next_boundary(10.0, 1) == pytest.approx(10.25)  # beat 6
    assert line.next_boundary(10.25, 1) == pytest.approx(10.25)  # on a beat: that beat
    assert line.next_boundary(10.0, 4) == pytest.approx(11.25)  # bar line: beat 8
    assert line.quantize(10.3, 0.5, not_before=0.0) == pytest.approx(10.25)
    assert line.quantize(10.3, 0.5, not_before=10.28) == pytest.approx(10.5)  # never before not_before
    status = line.status(11.0)
    assert status.beat == pytest.approx(3.5) and link_line(status) == "link: 1 peer, 120.0 BPM, beat 4/4"
    assert link_line(LinkStatus(2, 99.95, 0.0, 3, False)) == "link: 2 peers, 100.0 BPM, beat 1/3"


def test_clock_source_precedence():
    alone = LinkTimeline(0.0, 0.0, 120.0, 4, peers=0, playing=False, enabled=True)
    joined = LinkTimeline(0.0, 0.0, 120.0, 4, peers=2, playing=False, enabled=True)
    off = LinkTimeline(0.0, 0.0, 120.0, 4, peers=0, playing=False, enabled=False)
    assert clock_source(joined, midi_bpm=98.0) == LINK  # Link with peers first
    assert clock_source(alone, midi_bpm=98.0) == MIDI_CLOCK  # then a running MIDI clock
    assert clock_source(alone, midi_bpm=None) == LINK  # then Link's own timeline
    assert clock_source(off, midi_bpm=None) == FREE and clock_source(None, None) == FREE


def test_the_ui_line_for_each_clock_source():
    from liveperceiver.live.session import Snapshot
    from liveperceiver.ui.widgets import clock_line

    base = dict(mode="call", state="waiting", settings=Settings(), notes_in=0, notes_out=0, held=[], sounding=[])
    base |= dict(roll=[], step_ms=None, reaction_ms=(None, None), jitter_ms=(None, None), realtime_factor=None)
    base |= dict(context_tokens=0, context_window=1, recording="", recorded=0, in_port="", out_port="")
    linked = Snapshot(
        **base, bpm=120.0, transport_running=True, clock_source=LINK, link=LinkStatus(2, 120.0, 2.3, 4, True)
    )
    assert clock_line(linked, width=60) == "link: 2 peers, 120.0 BPM, beat 3/4"
    assert clock_line(linked, width=24) == "link 2p 120.0 BPM 3/4"  # a narrow panel keeps the beat
    midi = Snapshot(**base, bpm=98.0, transport_running=True, clock_source=MIDI_CLOCK)
    assert clock_line(midi) == "clock     MIDI 98.0 BPM"
    free = Snapshot(**base, bpm=None, transport_running=False)
    assert clock_line(free) == "clock     free"


def test_bench_live_says_why_its_link_row_is_skipped(monkeypatch):
    from types import SimpleNamespace

    from liveperceiver.tools.live_bench import _link_rows, link_in_namespace

    monkeypatch.setitem(sys.modules, "aalink", None)
    result = link_in_namespace(SimpleNamespace(calls=1, weights="auto", threads=1, model=None))
    assert _link_rows(result) == [
        "Ableton Link: skipped (Ableton Link needs the aalink package, which is not installed (pip install aalink))"
    ]


def test_ci_installs_what_the_link_tests_need():
    """CI must run the Link tests, not skip them: aalink is a dependency, unshare and ip are installed."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"aalink>=0.2.3"' in pyproject
    assert "iproute2" in (REPO / ".ci" / "setup").read_text()
    if in_ci():
        assert shutil.which("unshare") and shutil.which("ip")
