"""The Textual UI: key bindings, resilience, snapshots of the main screen, and one run over real JACK ports.

Most tests drive a `ReplaySession`: the session's public surface with a fixed, recorded snapshot (a
phrase and the tiny model's answer), so the screen is the same on every run. The JACK tests drive a
real `Session` with the tiny model.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import time
from pathlib import Path
from types import SimpleNamespace

import mido
import pytest

from liveperceiver.live import ports
from liveperceiver.live.commands import PlayerNoteOff, PlayerNoteOn
from liveperceiver.live.session import Session
from liveperceiver.live.settings import Settings
from liveperceiver.live.snapshot import Snapshot
from liveperceiver.ui.app import HelpScreen, LivePerceiverApp, PortsScreen, SaveScreen
from liveperceiver.ui.widgets import CONTROLS, Panel, PianoRoll, in_time_order
from tests.conftest import MODEL_GOLDEN
from tests.jack_fixture import Keyboard, jack_server, wait_for  # noqa: F401

TINY = MODEL_GOLDEN / "tiny-a"
FROZEN = 1000.0

# (start, end, pitch, who), seconds ago: a phrase, the model's answer, and its unplayed look-ahead
ROLL = [
    (6.2, 5.9, 60, "player"),
    (5.9, 5.6, 64, "player"),
    (5.6, 5.3, 67, "player"),
    (5.3, 4.6, 72, "player"),
    (6.2, 4.6, 48, "player"),
    (3.9, 3.5, 71, "model"),
    (3.5, 3.2, 69, "model"),
    (3.2, 2.6, 67, "model"),
    (2.6, 2.2, 65, "model"),
    (2.2, 1.4, 64, "model"),
    (2.2, 0.9, 52, "model"),
    (1.4, 0.7, 62, "model"),
    (0.7, None, 60, "model"),
    (0.7, None, 55, "model"),
    (-0.1, None, 64, "ahead"),
    (-0.3, None, 67, "ahead"),
]
LOG = [
    "21:04:05 session started: jack, in 'LivePerceiver In', out 'LivePerceiver Out', mode call",
    "21:04:31 warning: output port busy for 3 ms",
]


class ReplaySession:
    """The session surface the UI uses (snapshot.LiveSession, plus the model and engine it reads once),
    replaying one recorded moment; it records every command."""

    def __init__(self, tiny_model, folder: Path) -> None:
        self.settings = Settings(seed=1, model=str(TINY))
        self.model = getattr(tiny_model, "model", tiny_model)
        self.engine = SimpleNamespace(device="cpu", precision="float32")
        self.api = "jack"
        self.midi_in = SimpleNamespace(connected_name="LivePerceiver In")
        self.midi_out = SimpleNamespace(connected_name="LivePerceiver Out")
        self.recorder = SimpleNamespace(dir=Path("~/.local/share/liveperceiver/sessions/20261121-210405"))
        self.folder = folder
        self.pedal_down = False
        self.paused = False
        self.calls: list[tuple] = []
        self.fail_snapshot = False

    def snapshot(self) -> Snapshot:
        if self.fail_snapshot:
            raise RuntimeError("model error: injected")
        return Snapshot(
            mode=self.settings.mode,
            state="paused" if self.paused else "answering",
            settings=self.settings,
            notes_in=5,
            notes_out=9,
            held=[],
            sounding=[55, 60],
            roll=list(ROLL),
            step_ms=1.9,
            reaction_ms=(0.4, 1.1),
            jitter_ms=(0.3, 0.9),
            realtime_factor=17.9,
            bpm=None,
            transport_running=False,
            context_tokens=412,
            context_window=1,
            recording=str(self.recorder.dir / "journal.lpj"),
            recorded=28,
            in_port="LivePerceiver In",
            out_port="LivePerceiver Out",
            log=list(LOG),
            in_connected=self.midi_in.connected_name is not None,
            out_connected=self.midi_out.connected_name is not None,
            api=self.api,
            session_dir=str(self.recorder.dir),
        )

    def update(self, **changes) -> Settings:
        self.settings = self.settings.updated(**changes)
        self.calls.append(("update", changes))
        return self.settings

    def pause(self, paused: bool = True) -> None:
        self.paused = paused
        self.calls.append(("pause", paused))

    def panic(self) -> None:
        self.calls.append(("panic",))

    def reset(self) -> None:
        self.calls.append(("reset",))

    def save(self, path=None) -> Path:
        path = self.folder / Path(path).name
        path.write_bytes(b"MThd")
        self.calls.append(("save", path))
        return path

    def close(self) -> Path:
        self.calls.append(("close",))
        return self.save("session.mid")


def replay_app(tiny_model, tmp_path, presets=None) -> tuple[LivePerceiverApp, ReplaySession]:
    session = ReplaySession(tiny_model, tmp_path)
    app = LivePerceiverApp(session, clock=lambda: FROZEN, presets=presets)
    app.started = FROZEN - 134  # 02:14 into the session
    return app, session


def changes(session: ReplaySession) -> list[dict]:
    return [call[1] for call in session.calls if call[0] == "update"]


# --------------------------------------------------------------------------- key bindings


def test_the_model_panel_and_the_window_keys_follow_a_model_switch(tiny_model, tmp_path):
    """A preset naming another model switches the session's model: the panel and the latent window's
    ladder are the new model's (auto stands for 16:32 with the tiny model, 32:64 with more latents)."""
    from liveperceiver.core.checkpoint import load_model

    app, session = replay_app(tiny_model, tmp_path)

    async def drive():
        async with app.run_test(size=(100, 30)) as pilot:
            app.refresh_view()
            assert "auto 16:32/32" in str(app.main.query_one("#model", Panel).render())
            session.model = load_model("random:small").model  # more latents: auto is 32:64
            session.settings = Settings(seed=1)
            app.refresh_view()
            await pilot.pause()
            most = session.model.config.max_latents
            assert most > 64 and f"auto 32:64/{most}" in str(app.main.query_one("#model", Panel).render())
            await pilot.press("right")
            assert session.settings.num_latents == "64:128"  # up from 32:64, the new model's ladder

    asyncio.run(drive())


def test_every_binding_changes_the_session(tiny_model, tmp_path):
    preset_file = tmp_path / "warm.toml"
    preset_file.write_text('mode = "duet"\n[sampling]\ntemperature = 1.3\n')
    presets = [SimpleNamespace(name="warm", path=preset_file, description="")]
    app, session = replay_app(tiny_model, tmp_path, presets)

    async def drive():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("space")
            assert session.calls[-1] == ("pause", True)
            await pilot.pause()
            app.refresh_view()
            await pilot.press("space")
            assert session.calls[-1] == ("pause", False)
            await pilot.press("m")
            assert session.settings.mode == "duet"
            await pilot.press("up", "up")
            assert session.settings.temperature == pytest.approx(1.0)
            await pilot.press("down")
            assert session.settings.temperature == pytest.approx(0.95)
            assert session.settings.num_latents == "auto"  # the default window: 16:32 for this model
            await pilot.press("right")
            assert session.settings.num_latents == "16:32"  # the tiny model's largest (max_latents 32)
            await pilot.press("left", "left")
            assert session.settings.num_latents == "4:8"
            await pilot.press("right")
            assert session.settings.num_latents == "8:16"
            await pilot.press("p")
            assert session.calls[-1] == ("panic",)
            await pilot.press("r")
            assert session.calls[-1] == ("reset",)
            # every control is reachable with , . and changed with - +
            for index, (_, name, _) in enumerate(CONTROLS):
                app.selected = index
                before = getattr(session.settings, name)
                await pilot.press("plus")
                if getattr(session.settings, name) == before:  # at its top already (adapt's default is 1)
                    await pilot.press("minus")
                assert getattr(session.settings, name) != before, name
            await pilot.press("minus")
            await pilot.press("full_stop")
            assert app.selected == 0
            # zoom
            roll = app.main.query_one(PianoRoll)
            seconds = roll.seconds
            await pilot.press("z")
            assert roll.seconds < seconds
            # preset 1 from the list, loaded in a worker
            await pilot.press("1")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert session.settings.temperature == pytest.approx(1.3) and session.settings.mode == "duet"
            await pilot.press("9")  # no such preset: logged, nothing changes
            await app.workers.wait_for_complete()
            # save asks for a name (timestamped default), then saves in a worker
            await pilot.press("s")
            assert isinstance(app.screen, SaveScreen)
            assert app.screen.query_one("Input").value.startswith("session-")
            app.screen.query_one("Input").value = "take-1"
            await pilot.press("enter")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert ("save", tmp_path / "take-1.mid") in session.calls
            assert "take-1.mid" in app.last_save
            # help and ports screens open and close
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("a")
            await pilot.press("o")
            assert isinstance(app.screen, PortsScreen)
            await pilot.press("escape")
            assert not isinstance(app.screen, PortsScreen | HelpScreen)
            # quit: close() (notes off + save) in a worker, then exit with the saved file
            await pilot.press("q")
            for _ in range(100):  # the quit worker closes the session, then the app exits
                if app.return_value is not None:
                    break
                await asyncio.sleep(0.05)
        assert session.calls[-2][0] == "close"
        assert app.return_value == tmp_path / "session.mid"

    asyncio.run(drive())


def test_command_palette_offers_every_action(tiny_model, tmp_path):
    app, _ = replay_app(tiny_model, tmp_path, presets=[])

    async def drive():
        async with app.run_test(size=(100, 30)):
            titles = [command.title for command in app.get_system_commands(app.screen)]
        for wanted in ("Pause", "Next mode", "Temperature up", "Latent window", "Panic", "Save", "Reset", "Ports"):
            assert any(title.startswith(wanted) for title in titles), wanted
        assert any(title.startswith("Quit") for title in titles)

    asyncio.run(drive())


def test_snapshot_error_is_shown_and_the_ui_keeps_running(tiny_model, tmp_path):
    app, session = replay_app(tiny_model, tmp_path)

    async def drive():
        async with app.run_test(size=(80, 24)) as pilot:
            session.fail_snapshot = True
            await pilot.pause(0.2)
            session.fail_snapshot = False
            await pilot.pause(0.2)
            assert any("injected" in line for line in app.ui_log)
            await pilot.press("m")
            assert session.settings.mode == "duet"
            app._update(temperature=99.0)
            assert any("temperature" in line for line in app.ui_log)

    asyncio.run(drive())


def test_the_key_that_closes_the_help_does_nothing_else(tiny_model, tmp_path):
    """`?` then `q` quit the session (the help's key went on to the app), `r` reset it, space paused."""
    app, session = replay_app(tiny_model, tmp_path)

    async def drive():
        async with app.run_test(size=(100, 30)) as pilot:
            for key in ("q", "r", "space", "s", "p"):
                await pilot.press("question_mark")
                assert isinstance(app.screen, HelpScreen)
                await pilot.press(key)
                await pilot.pause()
                assert not isinstance(app.screen, HelpScreen | SaveScreen), key
            assert session.calls == [] and not app.quitting

    asyncio.run(drive())


def test_a_save_name_never_replaces_a_file_and_a_name_of_no_file_is_one_warning(tiny_model, tmp_path):
    app, session = replay_app(tiny_model, tmp_path)
    folder = session.recorder.dir = tmp_path  # where the session saves (the replay writes there too)
    (folder / "take-1.mid").write_bytes(b"an earlier take")

    async def save_as(pilot, name: str) -> None:
        await pilot.press("s")
        app.screen.query_one("Input").value = name
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()

    async def drive():
        async with app.run_test(size=(100, 30)) as pilot:
            await save_as(pilot, "take-1")  # taken: numbered beside it
            await save_as(pilot, "take-1.5")  # a dot in the name is not its suffix
            await save_as(pilot, "/")  # crashed the UI (ValueError from with_suffix)
            await save_as(pilot, "..")
            saved = [call[1].name for call in session.calls if call[0] == "save"]
            assert saved == ["take-1-2.mid", "take-1.5.mid"]
            assert sum("names no file; nothing saved" in line for line in app.ui_log) == 2
            assert app.is_running

    asyncio.run(drive())
    assert (folder / "take-1.mid").read_bytes() == b"an earlier take"


def test_space_pauses_and_resumes_by_what_it_asked_last(tiny_model, tmp_path):
    """The snapshot says "paused" only once the engine thread applied it, and "stopped" while the
    DAW's transport is: two quick presses sent pause(True) twice, and a stopped transport never resumed."""
    app, session = replay_app(tiny_model, tmp_path)
    session.pause = lambda paused=True: session.calls.append(("pause", paused))  # applied later, elsewhere

    async def drive():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("space", "space", "space")
            assert [call for call in session.calls if call[0] == "pause"] == [
                ("pause", True),
                ("pause", False),
                ("pause", True),
            ]

    asyncio.run(drive())


def test_the_arrow_keys_change_the_temperature_on_a_short_terminal(tiny_model, tmp_path):
    """At 80x18 the side panel scrolls, and it took the arrow keys (the temperature never moved)."""
    app, session = replay_app(tiny_model, tmp_path)
    before = session.settings.temperature

    async def drive():
        async with app.run_test(size=(80, 18)) as pilot:
            await pilot.press("up")
            await pilot.pause()

    asyncio.run(drive())
    assert session.settings.temperature == pytest.approx(before + 0.05)


def test_the_log_stays_in_time_order_across_midnight():
    lines = ["23:59:40 before midnight", "00:00:20 after midnight", "23:58:00 earlier", "not stamped"]
    now = datetime.datetime(2026, 12, 6, 0, 0, 30)
    assert in_time_order(lines, now) == [
        "23:58:00 earlier",
        "23:59:40 before midnight",
        "00:00:20 after midnight",
        "not stamped",
    ]
    assert in_time_order(["12:00:05 a moment later"], datetime.datetime(2026, 12, 6, 12, 0, 0)) == [
        "12:00:05 a moment later"
    ]


# --------------------------------------------------------------------------- snapshots


def _prepare(pilot) -> None:
    """Show a pedal held for the last two seconds (the UI's own history, at the frozen clock)."""
    roll = pilot.app.main.query_one(PianoRoll)
    roll.pedal.clear()
    roll.pedal.extend([(FROZEN - 6.3, True), (FROZEN - 4.5, False), (FROZEN - 2.2, True)])
    pilot.app.refresh_view()


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_main_screen_snapshot(snap_compare, tiny_model, tmp_path, size):
    app, _ = replay_app(tiny_model, tmp_path, presets=[])
    assert snap_compare(app, terminal_size=size, run_before=_prepare)


# --------------------------------------------------------------------------- real JACK ports


@pytest.fixture
def live_ui(tmp_path, jack_server):  # noqa: F811
    sessions: list[Session] = []

    def open_(**kwargs) -> Session:
        settings = Settings(seed=1, silence_ms=300, response_seconds=2.0)
        session = Session(settings, model=str(TINY), api="jack", session_dir=tmp_path / "session", **kwargs)
        session.start()
        sessions.append(session)
        return session

    yield open_
    for session in sessions:
        session.close(release_ports=True)
        release_left_ports(session)


def release_left_ports(session: Session) -> None:
    """A session closed the live way leaves its JACK ports to the process's exit; this test process
    goes on, so free them for the next test."""
    for port in (session.midi_in.port, session.midi_out.port):
        if any(port is kept for kept in ports.LEFT_TO_EXIT):
            ports.LEFT_TO_EXIT[:] = [kept for kept in ports.LEFT_TO_EXIT if kept is not port]
            ports.release(port)


@pytest.mark.jack
def test_phrase_and_answer_on_the_roll_then_quit_saves_silences_and_leaves_the_ports(live_ui):
    """`q` is the default way out: every note off, the take saved, exit 0, and the JACK ports left to
    the process's exit like `play --headless` (unregistering them races libjack: ports._Port.close)."""
    session = live_ui()
    keys = Keyboard()
    app = LivePerceiverApp(session)

    async def drive():
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.pause(0.3)
            for _attempt in range(3):  # the tiny model may answer a phrase with silence: play again
                last_off = await asyncio.to_thread(keys.phrase, [60, 62, 64, 65, 67])
                for _ in range(40):
                    await pilot.pause(0.1)
                    if keys.note_ons(since=last_off) and any(n[3] == "model" for n in app.snap.roll):
                        break
                if keys.note_ons(since=last_off):
                    break
            roll = app.main.query_one(PianoRoll)
            whos = {note[3] for note in roll.snapshot.roll}
            assert "player" in whos and "model" in whos, app.snap.log
            assert {60, 62, 64, 65, 67} <= {n[2] for n in roll.snapshot.roll if n[3] == "player"}
            assert "█" in roll.text()
            # the session cache's weight as learnt now is shown (it moves as the model plays on)
            shown = re.search(r"cache (\d\.\d\d)", str(app.main.query_one("#model", Panel).shown))
            assert shown is not None and 0.0 <= float(shown.group(1)) <= session.settings.adapt
            assert app.snap.cache_weight is not None
            await pilot.press("space")  # pause while notes may be sounding, then quit
            await pilot.press("q")
            for _ in range(100):  # the quit worker closes the session, then the app exits
                if app.return_value is not None:
                    break
                await asyncio.sleep(0.05)

    try:
        asyncio.run(drive())
        saved = app.return_value
        assert app.return_code == 0
        assert saved is not None and Path(saved).exists()
        assert wait_for(lambda: keys.balance() == 0, timeout=2)
        notes = [m.note for m in mido.MidiFile(saved).tracks[1] if m.type == "note_on" and m.velocity > 0]
        assert notes[:5] == [60, 62, 64, 65, 67] and len(notes) % 5 == 0
        left = [session.midi_in.port, session.midi_out.port]
        assert all(any(port is kept for kept in ports.LEFT_TO_EXIT) for port in left)
        assert not any(port.is_deleted for port in left)
        names = [name for listed in ports.list_ports("jack") for name in listed]
        assert any(name.endswith(":" + ports.VIRTUAL_IN) for name in names)  # still registered
        assert any(name.endswith(":" + ports.VIRTUAL_OUT) for name in names)
    finally:
        keys.close()


@pytest.mark.jack
def test_port_vanishing_and_engine_error_are_shown(live_ui):
    import rtmidi

    source = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name="lp-test-source")
    source.open_virtual_port("vanishing")
    session = live_ui(in_port="vanishing", out_port=None)
    app = LivePerceiverApp(session)

    async def drive():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.2)
            assert "(disconnected)" not in str(app.main.query_one("#ports").render())
            ports.release(source)
            for _ in range(40):
                await pilot.pause(0.1)
                if any("vanished" in line for line in app.snap.log):
                    break
            await pilot.pause(0.2)
            assert "disconnected" in str(app.main.query_one("#ports").render())
            assert any("vanished" in line for line in app.snap.log)
            # an engine fault: logged, shown, and the UI goes on
            session.update(mode="duet")
            session.engine.step = lambda **_: (_ for _ in ()).throw(RuntimeError("injected engine fault"))
            session.commands.put(PlayerNoteOn(when=time.monotonic(), pitch=60, channel=0, velocity=90))
            await pilot.pause(0.2)
            session.commands.put(PlayerNoteOff(when=time.monotonic(), pitch=60, channel=0))
            for _ in range(30):
                await pilot.pause(0.1)
                if session.shared.errors:
                    break
            await pilot.pause(0.2)
            assert "injected engine fault" in str(app.main.query_one("#log").render())
            await pilot.press("m")
            assert session.settings.mode == "listen"

    start = time.monotonic()
    asyncio.run(drive())
    assert time.monotonic() - start < 20
