"""Widgets of the live UI: each one renders a `Snapshot` (plus a little UI-side history) as Rich text.

They never call the session: the app hands them the latest snapshot on its timer, so a slow
terminal only delays drawing, never the music.
"""

from __future__ import annotations

import datetime
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Static

from liveperceiver.inference.window import window_text
from liveperceiver.live.link import LINK, MIDI_CLOCK, LinkStatus, link_line
from liveperceiver.live.snapshot import Snapshot

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
PLAYER_STYLE = "bold #4fc3f7"
MODEL_STYLE = "bold #ffb74d"
AHEAD_STYLE = "#8d6e4a"
PEDAL_STYLE = "#81c784"
CURSOR_STYLE = "bold #e0e0e0"
GRID_STYLE = "#3a3f4b"
ZOOMS = (2.0, 4.0, 6.0, 8.0, 10.0)  # seconds of past shown; the session keeps 10 s of roll


@lru_cache(maxsize=32)
def _style(spec: str) -> Style | None:
    return Style.parse(spec) if spec else None


def note_name(pitch: int) -> str:
    return f"{NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}"


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    """A meter value, or an en dash while there is nothing to show yet."""
    return "–" if value is None else f"{value:{spec}}{unit}"


@dataclass
class ModelInfo:
    """Static facts about the loaded model, gathered once (not per frame)."""

    name: str = "default"
    parameters: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    max_prefix: int = 0
    max_latents: int = 1


class PianoRoll(Widget):
    """The last few seconds scrolling right to left: rows are pitches, the cursor is now.

    Player notes and model notes have their own colours, the look-ahead (sampled, not yet played)
    is drawn faintly right of the cursor, and the bottom row shows the sustain pedal.

    Drawn with Textual's line API (one Strip of styled runs per line, built once per frame): the
    roll is redrawn every frame, and turning it into Rich text that Textual then lays out again
    cost about 45 ms a frame on a slow CPU, on the GIL the engine needs.
    """

    DEFAULT_CSS = "PianoRoll { height: 1fr; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.snapshot: Snapshot | None = None
        self.zoom_index = 2
        self.pedal: deque[tuple[float, bool]] = deque(maxlen=1024)  # (UI time, down)
        self.now = 0.0
        self._strips: list[Strip] | None = None  # this frame's lines, built on first use
        self._strips_size = (0, 0)

    @property
    def seconds(self) -> float:
        return ZOOMS[self.zoom_index]

    def zoom(self, step: int) -> None:
        self.zoom_index = max(0, min(len(ZOOMS) - 1, self.zoom_index + step))
        self._strips = None
        self.refresh()

    def show(self, snapshot: Snapshot, now: float, pedal_down: bool) -> None:
        self.snapshot = snapshot
        self.now = now
        if not self.pedal or self.pedal[-1][1] != pedal_down:
            self.pedal.append((now, pedal_down))
        self._strips = None
        self.refresh()

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        if self._strips is None or self._strips_size != (width, height):
            base = self.rich_style  # the widget's CSS colours, under the roll's own (computed, so once)
            self._strips = [strip.apply_style(base) for strip in self.lines()]
            self._strips += [Strip.blank(width, base)] * max(0, height - len(self._strips))
            self._strips_size = (width, height)
        return self._strips[y]

    def text(self) -> str:
        """What the roll shows now, as plain text (one line per screen line)."""
        return "\n".join(strip.text for strip in self.lines())

    def _pitch_rows(self, rows: int) -> tuple[int, int]:
        """(top pitch, pitches per row): fit the notes on screen, centred, at least two octaves."""
        pitches = [n[2] for n in self.snapshot.roll] if self.snapshot else []
        low, high = (min(pitches), max(pitches)) if pitches else (48, 72)
        low, high = min(low, 48), max(high, 72)
        per_row = 1
        while (high - low + 1) > rows * per_row:
            per_row += 1
        span = rows * per_row
        top = min(127, (low + high) // 2 + span // 2)
        top = max(top, low + span - 1)
        return top, per_row

    def lines(self) -> list[Strip]:
        """The roll as one Strip per screen line, each exactly the widget's width."""
        width, height = self.size.width, self.size.height
        if width < 12 or height < 3:
            return []
        label_w = 5
        cols = width - label_w
        ahead_cols = max(2, cols // 7)
        now_col = cols - ahead_cols - 1
        per_col = self.seconds / max(1, now_col)  # seconds per column
        rows = height - 2  # pitch rows; then the pedal row and the time axis
        top, per_row = self._pitch_rows(rows)
        grid: list[list[tuple[str, str]]] = [[(" ", "")] * cols for _ in range(rows)]
        for row in range(rows):
            pitch = top - row * per_row
            if any((pitch - k) % 12 == 0 for k in range(per_row)):
                grid[row] = [("·", GRID_STYLE)] * cols
        rank = {"ahead": 0, "player": 1, "model": 2}
        notes = sorted(self.snapshot.roll if self.snapshot else [], key=lambda n: rank.get(n[3], 0))
        for start, end, pitch, who in notes:
            row = (top - pitch) // per_row
            if not 0 <= row < rows:
                continue
            if who == "ahead":
                first = now_col + round(-start / per_col)
                last = first + max(1, round(0.15 / per_col))
                char, style = "░", AHEAD_STYLE
            else:
                first = now_col - round(start / per_col)
                last = now_col - round((end or 0.0) / per_col)
                char, style = "█", PLAYER_STYLE if who == "player" else MODEL_STYLE
            for col in range(max(0, first), min(cols, max(last, first + 1))):
                if col != now_col:
                    grid[row][col] = (char, style)
        dim = _style("dim")
        lines: list[list[Segment]] = []
        for row in range(rows):
            pitch = top - row * per_row
            c_here = next((pitch - k for k in range(per_row) if (pitch - k) % 12 == 0), None)
            label = note_name(c_here) if c_here is not None else ""
            cells = grid[row]
            cells[now_col] = ("│", CURSOR_STYLE)
            lines.append([Segment(f"{label:>4} ", dim), *_runs(cells)])
        lines.append([Segment(" ped ", dim), *_runs(self._pedal_cells(cols, now_col, per_col))])
        axis = f"-{self.seconds:g}s"
        axis_line = [Segment(" " * label_w + axis + " " * max(0, now_col - len(axis) - 1) + "now", dim)]
        if ahead_cols >= 7:
            axis_line.append(Segment(" ahead", _style(AHEAD_STYLE)))
        lines.append(axis_line)
        return [Strip(segments).adjust_cell_length(width) for segments in lines]

    def _pedal_cells(self, cols: int, now_col: int, per_col: float) -> list[tuple[str, str]]:
        """The pedal as the UI saw it over time (Snapshot has only notes; see app.refresh_view)."""
        changes = list(self.pedal)
        cells: list[tuple[str, str]] = []
        for col in range(cols):
            if col >= now_col:
                cells.append(("│" if col == now_col else " ", CURSOR_STYLE))
                continue
            at = self.now - (now_col - col) * per_col
            down = False
            for when, state in changes:
                if when > at:
                    break
                down = state
            cells.append(("▀" if down else " ", PEDAL_STYLE))
        return cells


def _runs(cells: list[tuple[str, str]]) -> list[Segment]:
    """Cells as runs of one style: a few segments per line instead of one per column."""
    segments: list[Segment] = []
    start = 0
    for index in range(1, len(cells) + 1):
        if index == len(cells) or cells[index][1] != cells[start][1]:
            segments.append(Segment("".join(char for char, _ in cells[start:index]), _style(cells[start][1])))
            start = index
    return segments


class Panel(Static):
    """A titled box whose body is replaced when it changes, without a new layout.

    Why: drawing is most of the UI's cost (Textual renders widgets line by line in Python, on the
    GIL the engine and the output thread need). Most panels change rarely, and every panel has a
    fixed size in app.tcss, so a new body never needs a layout pass (which redraws every widget)."""

    def __init__(self, title: str, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.border_title = title
        self.shown: object = None

    def show(self, body: Text) -> None:
        if body != self.shown:  # Rich Text compares text and styles
            self.shown = body
            self.update(body, layout=False)


def _row(text: Text, key: str, value: str, style: str = "bold") -> None:
    text.append(f"{key:<10}", style="dim")
    text.append(value + "\n", style=style)


def ports_text(snapshot: Snapshot, api: str, in_ok: bool, out_ok: bool, in_lit: bool, out_lit: bool) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    for label, name, ok, lit in (("in ", snapshot.in_port, in_ok, in_lit), ("out", snapshot.out_port, out_ok, out_lit)):
        text.append("● " if lit else "○ ", style=(PLAYER_STYLE if label == "in " else MODEL_STYLE) if lit else "dim")
        text.append(f"{label} ", style="dim")
        text.append(name, style="bold" if ok else "bold red")
        text.append("\n" if ok else "  (disconnected)\n", style="red")
    text.append("api ", style="dim")
    text.append(api)
    return text


def model_text(snapshot: Snapshot, info: ModelInfo) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    _row(text, "model", info.name)
    _row(text, "params", f"{info.parameters / 1e6:.2f} M" if info.parameters >= 1e5 else f"{info.parameters:,}")
    _row(text, "device", f"{info.device} {info.dtype} ×{info.threads}")
    # the engine keeps every token heard; the model attends to the last max_prefix of them
    in_view = min(snapshot.context_tokens, info.max_prefix) if info.max_prefix else snapshot.context_tokens
    _row(text, "context", f"{in_view:,}/{info.max_prefix:,} of {snapshot.context_tokens:,}")
    latents = f"{window_text(snapshot.settings.num_latents, info.max_latents)}/{info.max_latents}"
    if snapshot.cache_weight is not None:  # how much it leans on the session now, learnt from your playing
        latents += f"  cache {snapshot.cache_weight:.2f}"
    _row(text, "latents", latents)
    text.rstrip()
    return text


# (label, Settings field, formatter): the controls the player can change from the keyboard
CONTROLS: tuple[tuple[str, str, str], ...] = (
    ("mode", "mode", "{}"),
    ("temp", "temperature", "{:.2f}"),
    ("top-p", "top_p", "{:.2f}"),
    ("top-k", "top_k", "{}"),
    ("key", "key_follow", "{:.2f}"),
    ("dynamics", "dynamics_follow", "{:.2f}"),
    ("density", "density_follow", "{:.2f}"),
    ("ratio", "density_ratio", "×{:.2f}"),
    ("adapt", "adapt", "{:.2f}"),
    ("latents", "num_latents", "{}"),
    ("prefix", "prefix_cap", "{}"),
    ("silence", "silence_ms", "{} ms"),
    ("answer", "response_seconds", "{:.1f} s"),
    ("ahead", "lookahead_ms", "{} ms"),
    ("channel", "out_channel", "{}"),
    ("transp", "transpose", "{:+d}"),
    ("velocity", "velocity_scale", "×{:.2f}"),
    ("quantise", "quantize", "{}"),
)


def controls_text(snapshot: Snapshot, selected: int, columns: int = 2, height: int = 0) -> Text:
    """The controls in `columns` columns; the selected one (changed by -/+) is highlighted. With a
    `height` (the panel's lines) smaller than the rows, the rows shown scroll with the selection,
    so a small terminal still reaches every control."""
    text = Text(no_wrap=True, overflow="ellipsis")
    settings = snapshot.settings
    rows = -(-len(CONTROLS) // columns)
    first = 0
    if 0 < height < rows:
        first = min(max(0, selected % rows - height + 1), rows - height)
    for row in range(first, first + height if 0 < height < rows else rows):
        for column in range(columns):
            index = column * rows + row
            if index >= len(CONTROLS):
                continue
            label, name, spec = CONTROLS[index]
            value = getattr(settings, name)
            shown = "max" if name == "prefix_cap" and value == 0 else spec.format(value)
            chosen = index == selected
            text.append(("▸" if chosen else " ") + f"{label:<9}", style="bold" if chosen else "dim")
            text.append(f"{shown:<7}", style="reverse bold" if chosen else "bold")
            text.append(" ")
        text.append("\n")
    text.rstrip()
    return text


def meters_text(snapshot: Snapshot) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    step_p99 = getattr(snapshot, "step_p99_ms", None)  # not in Snapshot yet: shown as – until it is
    _row(text, "step", f"{fmt(snapshot.step_ms)} / {fmt(step_p99)} ms")
    _row(text, "reaction", f"{fmt(snapshot.reaction_ms[0])} / {fmt(snapshot.reaction_ms[1])} ms")
    _row(text, "jitter", f"{fmt(snapshot.jitter_ms[0])} / {fmt(snapshot.jitter_ms[1])} ms")
    rtf = snapshot.realtime_factor
    tempo = "free" if snapshot.bpm is None else f"{snapshot.bpm:.1f} bpm" + ("" if snapshot.transport_running else " ■")
    text.append(f"{'rt factor':<10}", style="dim")
    text.append(fmt(rtf, ".2f"), style="bold red" if rtf is not None and rtf < 1.25 else "bold")
    text.append("  tempo ", style="dim")
    text.append(tempo + "\n", style="bold")
    sounding = " ".join(note_name(p) for p in snapshot.sounding[:4]) or "–"
    text.append(f"{'notes':<10}", style="dim")
    text.append(f"in {snapshot.notes_in} out {snapshot.notes_out} ", style="bold")
    text.append("♪ " + sounding, style=MODEL_STYLE)
    return text


def session_text(snapshot: Snapshot, elapsed: float, save_to: str, last_save: str, width: int = 40) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    state = snapshot.state
    style = {"paused": "bold yellow", "preparing": MODEL_STYLE, "answering": MODEL_STYLE, "playing": MODEL_STYLE}.get(
        state, "bold"
    )
    _row(text, "state", state, style)
    minutes, seconds = divmod(int(elapsed), 60)
    text.append(f"{'recording':<10}", style="dim")
    text.append(f"● {minutes:02d}:{seconds:02d}", style="bold red")
    text.append(f"  {snapshot.recorded} ev\n", style="dim")
    room = max(8, width - 10)
    shown = save_to if len(save_to) <= room else "…" + save_to[-(room - 1) :]  # the end is what tells files apart
    _row(text, "saves to", shown)
    _row(text, "last save", last_save)
    text.append(clock_line(snapshot, width), style="bold")
    text.rstrip()
    return text


def clock_line(snapshot: Snapshot, width: int = 40) -> str:
    """What times the session: "link: 2 peers, 120.0 BPM, beat 3/4", the MIDI clock, or free time.
    Link's line is shortened rather than cut when the panel is narrow: the beat is what moves."""
    source = getattr(snapshot, "clock_source", "free")
    link: LinkStatus | None = getattr(snapshot, "link", None)
    if source == LINK and link is not None:
        line = link_line(link)
        if len(line) > width:
            line = f"link {link.peers}p {link.bpm:.1f} BPM {min(link.quantum, int(link.beat) + 1)}/{link.quantum}"
        return line
    tempo = "" if snapshot.bpm is None else f" {snapshot.bpm:.1f} BPM"
    line = f"{'clock':<10}" + ("MIDI" + tempo if source == MIDI_CLOCK else "free")
    return line + ("  (link: 0 peers)" if link is not None else "")


SKEW_S = 60  # a line stamped up to this much after `now` is the newest, not a day old


def in_time_order(lines: list[str], now: datetime.datetime) -> list[str]:
    """Log lines stamped HH:MM:SS, oldest first, across midnight too: by how long before `now` each
    was stamped (modulo a day), not by the text (00:00:20 sorted above 23:59:40 and was hidden)."""
    today = now.hour * 3600 + now.minute * 60 + now.second

    def age(line: str) -> int:
        try:
            hours, minutes, seconds = (int(part) for part in line[:8].split(":"))
        except ValueError:
            return 0
        return (today - (hours * 3600 + minutes * 60 + seconds) + SKEW_S) % 86400 - SKEW_S

    return sorted(lines, key=age, reverse=True)
