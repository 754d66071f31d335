"""The Textual UI: a window onto a running live session, never part of its real-time path.

The session runs its own threads. The app reads `session.snapshot()` on a timer (REFRESH_HZ) and
turns keys into the session's command methods: it knows the session only as a `LiveSession`
(live/snapshot.py), never the session module. Anything that may block (save, close, loading a
preset, listing ports) runs in a worker thread, so a slow terminal or disk never delays a note.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from rich.text import Text
from textual import events, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, Label, OptionList, Static

from liveperceiver.core.errors import unused_name
from liveperceiver.inference.window import next_window
from liveperceiver.live.settings import MODES, QUANTIZE_GRIDS
from liveperceiver.live.snapshot import LiveSession, Snapshot
from liveperceiver.runtime import freeze_heap_soon
from liveperceiver.ui.widgets import (
    CONTROLS,
    ModelInfo,
    Panel,
    PianoRoll,
    controls_text,
    in_time_order,
    meters_text,
    model_text,
    ports_text,
    session_text,
)

REFRESH_HZ = 15  # <= 30: enough for a scrolling roll, cheap for the session's lock
TEXT_EVERY = 3  # the text panels redraw every 3rd frame (5 Hz) unless a command changed something:
# each redraw costs the GIL (the engine's and the output thread's), and numbers are read at 5 Hz
ACTIVITY_S = 0.3  # how long an activity light stays on after a note
LOG_KEEP = 200

# per control: how one -/+ press changes it (a step, or a list of choices)
STEPS: dict[str, float | tuple] = {
    "mode": MODES,
    "temperature": 0.05,
    "top_p": 0.01,
    "top_k": 1,
    "key_follow": 0.25,
    "dynamics_follow": 1.0,  # 0 .. 16
    "density_follow": 0.25,
    "density_ratio": 0.25,  # 0.25 .. 4 times the player's note rate
    "adapt": 0.1,  # the session cache's highest weight (learnt up to it), 0 .. 1
    "num_latents": 0,  # steps through the latent windows (action_latents)
    "prefix_cap": 256,
    "silence_ms": 50,
    "response_seconds": 0.5,
    "lookahead_ms": 20,
    "out_channel": 1,
    "transpose": 1,
    "velocity_scale": 0.05,
    "quantize": QUANTIZE_GRIDS,
}

HELP = """\
[b]LivePerceiver[/b] — keys

  [b]space[/b]      pause / resume the model
  [b]m[/b]          next mode (call → duet → listen)
  [b]↑ ↓[/b]        temperature up / down
  [b]← →[/b]        latent window smaller / larger
  [b], .[/b]        select a control     [b]- +[/b]  change it
  [b]z x[/b]        piano roll zoom in / out
  [b]p[/b]          panic: all notes off
  [b]s[/b]          save the session now (asks for a name)
  [b]r[/b]          reset the model's context
  [b]1-9[/b]        load a preset (order of `liveperceiver presets`)
  [b]o[/b]          ports
  [b]l[/b]          Ableton Link on / off (tempo, beat and start/stop)
  [b]ctrl+p[/b]     command palette (every action)
  [b]?[/b]          this help
  [b]q[/b]          quit: all notes off, save, exit

Blue notes are yours, orange the model's; faint orange is what the
model has sampled but not yet played. The bar under the roll is the pedal.

[dim]any key closes this help[/dim]"""


class HelpScreen(ModalScreen[None]):
    """The key list; any key closes it."""

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")

    def on_key(self, event: events.Key) -> None:
        event.stop()  # the key only closes the help: `?` then `q` quit the session
        event.prevent_default()
        self.dismiss()

    def on_click(self) -> None:
        self.dismiss()


class SaveScreen(ModalScreen[str | None]):
    """Ask for a file name (default timestamped); Enter saves, Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, default: str) -> None:
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Save the session as (in the session folder):")
            yield Input(value=self.default, id="name")
            yield Label("[dim]enter: save   escape: cancel[/dim]")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or self.default)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PortsScreen(ModalScreen[None]):
    """The ports the MIDI API sees now (listed in a worker: the backend may be slow)."""

    BINDINGS = [Binding("escape,o,q", "close", "close")]

    def __init__(self, api: str, current: tuple[str, str]) -> None:
        super().__init__()
        self.api = api
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"MIDI ports ({self.api}); connected: in {self.current[0]!r}, out {self.current[1]!r}")
            yield OptionList("listing…", id="ports")
            yield Label(
                "[dim]Connect other apps to the LivePerceiver ports from your DAW or patchbay,\n"
                "or restart with --in/--out NAME to open another port.   escape: close[/dim]"
            )

    def on_mount(self) -> None:
        self.list_ports()

    @work(thread=True, exclusive=True)
    def list_ports(self) -> None:
        try:
            from liveperceiver.live.ports import list_ports

            inputs, outputs = list_ports(self.api)
            lines = [f"in   {name}" for name in inputs] + [f"out  {name}" for name in outputs]
        except Exception as error:  # a backend that fails must not take the UI down
            lines = [f"cannot list ports: {error}"]
        self.app.call_from_thread(self._show, lines or ["no ports"])

    def _show(self, lines: list[str]) -> None:
        options = self.query_one(OptionList)
        options.clear_options()
        options.add_options(lines)

    def action_close(self) -> None:
        self.dismiss()


class LivePerceiverApp(App):
    """The live UI over one session (a LiveSession: a Session, or a replay of one in the tests).

    Threads: the Textual event loop's; save, close and preset loading run in its worker threads."""

    CSS_PATH = "app.tcss"
    TITLE = "LivePerceiver"
    ENABLE_COMMAND_PALETTE = True
    BINDINGS = [
        Binding("space", "pause", "pause", key_display="space"),
        Binding("m", "mode", "mode"),
        Binding("up", "temperature(1)", "temp+", show=False),
        Binding("down", "temperature(-1)", "temp−", show=False),
        Binding("right", "latents(1)", "latents+", show=False),
        Binding("left", "latents(-1)", "latents−", show=False),
        Binding("comma", "select(-1)", "prev control", show=False),
        Binding("full_stop", "select(1)", "next control", show=False),
        Binding("minus", "adjust(-1)", "less", show=False),
        Binding("plus,equals_sign", "adjust(1)", "more", show=False),
        Binding("z", "zoom(-1)", "zoom in", show=False),
        Binding("x", "zoom(1)", "zoom out", show=False),
        Binding("p", "panic", "panic"),
        Binding("s", "save", "save"),
        Binding("r", "reset", "reset"),
        Binding("o", "ports", "ports", show=False),
        Binding("l", "link", "link", show=False),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
        *[Binding(str(n), f"preset({n})", f"preset {n}", show=False) for n in range(1, 10)],
    ]

    def __init__(
        self,
        session: LiveSession,
        clock: Callable[[], float] = time.monotonic,
        presets: list | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """`stop`: set by the entry point's signal handlers (SIGTERM, SIGHUP: a closed terminal or
        ssh connection); the next frame quits as `q` does (notes off, saved)."""
        super().__init__()
        self.session = session
        self.stop = stop
        self.clock = clock
        self.started = clock()
        self.presets = presets
        self.selected = 1  # the control -/+ change: temperature
        self.ui_log: deque[str] = deque(maxlen=LOG_KEEP)
        self.last_save = "–"
        self.snap: Snapshot | None = None
        self.counts = (0, 0)
        self.lit = [-1e9, -1e9]  # when the in/out lights last turned on
        self.quitting = False
        self.paused = False  # what space asked last (action_pause)
        self.last_warning = ""
        self.saved: Path | None = None
        self.info = self._model_info()
        self._info_model = getattr(self.session, "model", None)  # the model `info` describes

    # ------------------------------------------------------------------ layout and refresh

    def compose(self) -> ComposeResult:
        with Horizontal(id="top"):
            yield Panel("Ports", id="ports")
            yield Panel("Model", id="model")
            yield Panel("Session", id="session")
        with Horizontal(id="middle"):
            with Vertical(id="roll-box"):
                yield PianoRoll(id="roll")
            with VerticalScroll(id="side", can_focus=False):  # else, scrollable, it takes the arrow keys
                yield Panel("Controls  , . select  - + change", id="controls")
                yield Panel("Meters  p50 / p99", id="meters")
        yield Panel("Log", id="log")
        yield Footer()

    def on_mount(self) -> None:
        freeze_heap_soon()  # the widgets are long-lived: keep full collections from stalling the music
        self.query_one("#roll-box").border_title = "Piano roll  [#4fc3f7]■[/] you  [#ffb74d]■[/] model  z x zoom"
        self.refresh_view()
        self.set_interval(1 / REFRESH_HZ, self._frame)

    @property
    def main(self) -> Screen:
        """The screen holding the panels (it stays drawn under a dialog)."""
        return self.screen_stack[0]

    def _current_info(self) -> ModelInfo:
        """`info`, read again once the session has switched models (a preset naming another model):
        its name and size, and the latent ladder and the window `auto` stands for, are the new model's."""
        model = getattr(self.session, "model", None)
        if model is not self._info_model:
            self.info, self._info_model = self._model_info(), model
        return self.info

    def _model_info(self) -> ModelInfo:
        """Facts that do not change while playing, read once from the session's model and engine."""
        info = ModelInfo()
        model = getattr(self.session, "model", None)
        engine = getattr(self.session, "engine", None)
        settings = self.session.settings
        info.name = Path(str(settings.model)).name if settings.model else "default"
        if model is not None:
            info.parameters = sum(p.numel() for p in model.parameters())
            info.max_prefix = model.config.max_prefix_len
            info.max_latents = model.config.max_latents
        if engine is not None:
            info.device = str(getattr(engine, "device", "cpu"))
            info.dtype = getattr(engine, "precision", "float32")
        try:
            import torch

            info.threads = torch.get_num_threads()
        except ImportError:
            pass
        return info

    def log_line(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        self.ui_log.append(f"{stamp} {message}")

    frames = 0

    def _frame(self) -> None:
        """The timer's frame: the roll always, the text panels every TEXT_EVERY frames."""
        self.frames += 1
        if self.stop is not None and self.stop.is_set() and not self.quitting:
            self.run_worker(self.action_quit())
        self.refresh_view(text_panels=self.frames % TEXT_EVERY == 0)

    def refresh_view(self, text_panels: bool = True) -> None:
        """One frame: read the snapshot and redraw. A failing snapshot is logged, never raised."""
        try:
            snap = self.session.snapshot()
        except Exception as error:
            self._warn_once(f"snapshot failed: {error}")
            snap = self.snap
            if snap is None:
                return
        self.snap = snap
        now = self.clock()
        if snap.notes_in != self.counts[0] and self.snap_seen:
            self.lit[0] = now
        if snap.notes_out != self.counts[1] and self.snap_seen:
            self.lit[1] = now
        self.counts = (snap.notes_in, snap.notes_out)
        self.snap_seen = True
        try:
            self._draw(snap, now, text_panels)
        except NoMatches:  # the panels are gone: the app is shutting down
            return
        except Exception as error:  # a drawing bug must not stop the UI (the music never waits on it)
            self._warn_once(f"display error: {error!r}")

    def _warn_once(self, message: str) -> None:
        """Log a repeating per-frame problem once, not 15 times a second."""
        if message != self.last_warning:
            self.last_warning = message
            self.log_line("warning: " + message)

    def _draw(self, snap: Snapshot, now: float, text_panels: bool = True) -> None:
        screen = self.main
        screen.query_one(PianoRoll).show(snap, now, snap.pedal_down)
        if not text_panels:
            return
        lights = (now - self.lit[0] < ACTIVITY_S, now - self.lit[1] < ACTIVITY_S)
        ports = ports_text(snap, snap.api or "?", snap.in_connected, snap.out_connected, *lights)
        screen.query_one("#ports", Panel).show(ports)
        screen.query_one("#model", Panel).show(model_text(snap, self._current_info()))
        save_to = str(Path(snap.session_dir) / "session.mid") if snap.session_dir else snap.recording
        panel = screen.query_one("#session", Panel)
        width = panel.content_size.width or 40
        panel.show(session_text(snap, now - self.started, save_to, self.last_save, width))
        controls = screen.query_one("#controls", Panel)
        controls.show(controls_text(snap, self.selected, height=controls.content_size.height))
        screen.query_one("#meters", Panel).show(meters_text(snap))
        log = screen.query_one("#log", Panel)
        lines = in_time_order([*snap.log[-20:], *list(self.ui_log)[-20:]], datetime.datetime.now())
        shown = lines[-max(1, log.content_size.height) :]
        log.show(Text("\n".join(shown), no_wrap=True, overflow="ellipsis", style="#9aa3b5"))

    snap_seen = False

    # ------------------------------------------------------------------ commands

    def _update(self, **changes) -> bool:
        """Apply settings live; an invalid value is logged, not raised."""
        try:
            self.session.update(**changes)
        except (ValueError, TypeError) as error:
            self.log_line(f"warning: {error}")
            return False
        self.refresh_view()
        return True

    def action_pause(self) -> None:
        """Pause or resume by what was asked last, not by the snapshot: the engine thread applies
        a pause a moment later, and a stopped transport shows as "stopped", not "paused"."""
        self.paused = not self.paused
        self.session.pause(self.paused)
        self.log_line("model paused" if self.paused else "model resumed")

    def action_mode(self) -> None:
        mode = self.session.settings.mode
        self._update(mode=MODES[(MODES.index(mode) + 1) % len(MODES)])

    def action_temperature(self, direction: int) -> None:
        value = round(self.session.settings.temperature + 0.05 * direction, 2)
        self._update(temperature=min(5.0, max(0.05, value)))

    def action_latents(self, direction: int) -> None:
        """Up or down the latent windows 1, 4:8, 8:16, ... (inference/window.py's ladder)."""
        max_latents = self._current_info().max_latents
        window = next_window(self.session.settings.latent_window(max_latents), direction, max_latents)
        self._update(num_latents=window.setting)

    def action_select(self, direction: int) -> None:
        self.selected = (self.selected + direction) % len(CONTROLS)
        self.refresh_view()

    def action_adjust(self, direction: int) -> None:
        name = CONTROLS[self.selected][1]
        if name == "num_latents":
            self.action_latents(direction)
            return
        current = getattr(self.session.settings, name)
        step = STEPS[name]
        if isinstance(step, tuple):
            value = step[(step.index(current) + direction) % len(step)]
        else:
            value = type(current)(round(current + step * direction, 2))
        self._update(**{name: value})

    def action_zoom(self, step: int) -> None:
        self.main.query_one(PianoRoll).zoom(step)

    def action_panic(self) -> None:
        self.session.panic()
        self.log_line("panic: all notes off")

    def action_reset(self) -> None:
        self.session.reset()
        self.log_line("context reset")

    def action_link(self) -> None:
        """Join or leave the Ableton Link session (without the aalink package: a warning in the log)."""
        if self._update(link=not self.session.settings.link):
            self.log_line("link on" if self.session.settings.link else "link off")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_ports(self) -> None:
        snap = self.snap
        current = (snap.in_port, snap.out_port) if snap else ("?", "?")
        self.push_screen(PortsScreen(snap.api if snap and snap.api else "auto", current))

    def action_save(self) -> None:
        default = "session-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.push_screen(SaveScreen(default), self._save_named)

    def _save_named(self, name: str | None) -> None:
        """The name typed in the save dialog: in the session folder unless a path, `.mid` added to
        the whole name (`take-1.5` is `take-1.5.mid`); a name that names no file is one warning."""
        if name is None:
            return
        snap = self.snap
        folder = Path(snap.session_dir) if snap is not None and snap.session_dir else Path.cwd()
        typed = Path(name.strip()).expanduser()
        if typed.name in ("", ".", ".."):
            self.log_line(f"warning: save: {name!r} names no file; nothing saved")
            return
        path = typed if typed.is_absolute() else folder / typed
        self.save_in_background(
            path if path.suffix.lower() in (".mid", ".midi") else path.with_name(path.name + ".mid")
        )

    @work(thread=True, group="save")
    def save_in_background(self, path: Path) -> None:
        """Save off the event loop; a file of that name already there (an earlier take) is kept and
        this one numbered beside it."""
        path = unused_name(path)
        try:
            saved = self.session.save(path)
        except Exception as error:
            self.call_from_thread(self.log_line, f"warning: save failed: {error}")
            return
        self.call_from_thread(self._saved, saved)

    def _saved(self, path: Path) -> None:
        self.saved = Path(path)
        self.last_save = f"{datetime.datetime.now():%H:%M:%S} {Path(path).name}"
        self.log_line(f"saved {path}")

    def action_preset(self, number: int) -> None:
        self.load_preset_in_background(number)

    @work(thread=True, group="preset", exclusive=True)
    def load_preset_in_background(self, number: int) -> None:
        """Read the preset file off the event loop; apply what differs from the current settings."""
        try:
            from liveperceiver.live.presets import list_presets, load_preset

            presets = self.presets if self.presets is not None else list_presets()
            if number > len(presets):
                self.call_from_thread(self.log_line, f"no preset {number} ({len(presets)} presets)")
                return
            info = presets[number - 1]
            model = self.session.settings.model
            settings = load_preset(info.path, default_model=model if isinstance(model, str) else None)
        except Exception as error:
            self.call_from_thread(self.log_line, f"warning: preset {number}: {error}")
            return
        current = self.session.settings
        # a preset turns Link on, never off: leaving the band's session mid-set takes the `l` key
        changes = {
            name: value
            for name, value in settings.to_dict().items()
            if name != "seed" and getattr(current, name) != value and not (name in ("model", "link") and not value)
        }
        self.call_from_thread(self._apply_preset, info.name, changes)

    def _apply_preset(self, name: str, changes: dict) -> None:
        if self._update(**changes):
            self.log_line(f"preset {name} loaded")

    async def action_quit(self) -> None:
        """All notes off, save, exit: `session.close()` does all three, in a worker thread. It leaves
        the JACK ports to the process's exit, which `play.run_play` makes next (Session.close)."""
        if self.quitting:
            return
        self.quitting = True
        self.log_line("quitting: notes off, saving…")
        self.close_in_background()

    class SessionClosed(Message):
        """The quit worker has silenced and saved the session; the app may exit."""

        def __init__(self, saved: Path | None) -> None:
            super().__init__()
            self.saved = saved

    @work(thread=True, group="quit")
    def close_in_background(self) -> None:
        # post_message is thread-safe and does not wait, so this worker ends on its own
        # instead of blocking on an exit that cancels it.
        saved = None
        try:
            saved = self.session.close()
        except Exception as error:
            self.call_from_thread(self.log_line, f"warning: close failed: {error}")
        self.post_message(self.SessionClosed(Path(saved) if saved else self.saved))

    def on_live_perceiver_app_session_closed(self, message: SessionClosed) -> None:
        self.saved = message.saved
        self.exit(self.saved)

    # ------------------------------------------------------------------ command palette

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Pause / resume the model", "space", self.action_pause)
        yield SystemCommand("Next mode", "call, duet, listen", self.action_mode)
        yield SystemCommand("Temperature up", "↑", lambda: self.action_temperature(1))
        yield SystemCommand("Temperature down", "↓", lambda: self.action_temperature(-1))
        yield SystemCommand("Latent window larger", "→", lambda: self.action_latents(1))
        yield SystemCommand("Latent window smaller", "←", lambda: self.action_latents(-1))
        yield SystemCommand("Panic", "all notes off (p)", self.action_panic)
        yield SystemCommand("Save session now", "s", self.action_save)
        yield SystemCommand("Reset context", "forget what the model heard (r)", self.action_reset)
        yield SystemCommand("Ports", "the MIDI ports (o)", self.action_ports)
        yield SystemCommand("Ableton Link on / off", "tempo, beat and start/stop shared (l)", self.action_link)
        yield SystemCommand("Help", "the keys (?)", self.action_help)
        yield SystemCommand("Quit LivePerceiver", "notes off, save, exit (q)", self.action_quit)
        for name, _, _ in CONTROLS:
            index = [c[0] for c in CONTROLS].index(name)
            yield SystemCommand(f"Select control: {name}", "then - / +", lambda i=index: self._select(i))
        presets = self.presets
        if presets is None:
            try:
                from liveperceiver.live.presets import list_presets

                presets = list_presets()
            except Exception:
                presets = []
        for number, info in enumerate(presets[:9], start=1):
            yield SystemCommand(
                f"Preset {number}: {info.name}", info.description or "", lambda n=number: self.action_preset(n)
            )

    def _select(self, index: int) -> None:
        self.selected = index
        self.refresh_view()


# --------------------------------------------------------------------------- entry point


def run_ui(session: LiveSession, stop: threading.Event | None = None) -> Path | None:
    """Run the UI over a started session until the player quits, or `stop` is set; returns the
    saved MIDI file.

    `liveperceiver` and `liveperceiver play` (without --headless) pass this to `play.run_play` as
    its front end: it builds and starts the session, sets `stop` on SIGTERM and SIGHUP, calls this,
    then leaves through its one exit (closing twice is safe).
    """
    return LivePerceiverApp(session, stop=stop).run()
