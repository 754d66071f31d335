"""What the live session's threads share: the state under one lock (`SharedState`) and what times the
session (`Timekeeper`), read by every thread without a lock."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from liveperceiver.live.clock import ClockTracker
from liveperceiver.live.link import LinkClock, LinkTimeline, clock_source
from liveperceiver.live.settings import Settings

LOG_LINES = 200


class SharedState:
    """The state more than one thread writes, every field under `lock` (held briefly: copy, then work).

    Threads: the input thread writes the player's keys and pedal (`held`, `pedal_down`; `panic()` on
    the UI thread clears them, the engine thread reads them), `notes_in`, `suppressed` and the
    player's notes in `roll`; the engine thread writes the step statistics (`step_times`,
    `sample_seconds`, `music_seconds`), `reactions`, `pending_answer_start` and `errors`; the scheduler
    thread writes the model's notes in `roll`, `notes_out` and `answer_starts` (`model_sent`); any
    thread logs. The snapshot (UI thread) reads them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: set[tuple[int, int]] = set()  # (channel, pitch) of the player's keys down
        self.pedal_down = False
        self.notes_in = 0
        self.notes_out = 0
        self.suppressed = 0  # input notes recognised as our own echo
        self.errors = 0  # engine/input exceptions survived (details in the log)
        self.step_times: deque[float] = deque(maxlen=2048)
        self.reactions: deque[float] = deque(maxlen=2048)  # player's event stamped -> its tokens absorbed
        self.sample_seconds = 0.0  # time spent sampling
        self.music_seconds = 0.0  # music sampled in that time
        self.roll: deque[tuple[float, bool, int, str]] = deque(maxlen=4096)  # (time, is_on, pitch, who)
        self.answer_starts: deque[tuple[float, float]] = deque(maxlen=256)  # (silence threshold time, first note)
        self.pending_answer_start: float | None = None  # the threshold of the answer whose first note is awaited
        self.log_lines: deque[str] = deque(maxlen=LOG_LINES)
        self.log_count = 0  # lines ever logged (the deque keeps the last LOG_LINES)

    def keys_up(self) -> bool:
        """No key held and the pedal up: call mode may answer."""
        with self.lock:
            return not self.held and not self.pedal_down

    def model_sent(self, when: float, is_on: bool, pitch: int) -> None:
        """The scheduler thread sent a model note: the roll, the count, and an answer's first note."""
        with self.lock:
            self.roll.append((when, is_on, pitch, "model"))
            if is_on:
                self.notes_out += 1
                if self.pending_answer_start is not None:
                    self.answer_starts.append((self.pending_answer_start, when))
                    self.pending_answer_start = None

    def count_error(self) -> None:
        with self.lock:
            self.errors += 1

    def info(self, message: str) -> None:
        self._log(message)

    def warn(self, message: str) -> None:
        self._log(f"warning: {message}")

    def _log(self, line: str) -> None:
        with self.lock:
            self.log_lines.append(f"{time.strftime('%H:%M:%S')} {line}")
            self.log_count += 1

    def log_since(self, shown: int) -> tuple[list[str], int]:
        """The log lines added since `shown` lines were logged (those still kept), and the new count."""
        with self.lock:
            lines, total = list(self.log_lines), self.log_count
        return lines[max(0, len(lines) - (total - shown)) :], total


class Timekeeper:
    """What times the session (link.clock_source): Link while it is on, the MIDI clock, or free time.

    Threads: any reads it. `clock` (ClockTracker) is fed by the input thread, and its reads copy its
    state once (its docstring says why that suffices). `link` (a LinkClock, None until Link is first
    turned on) is set once, by the session's constructor or by `Session.update` under its
    `link_lock`, and never replaced; its Link object belongs to its own thread, and the others read
    its `timeline`, an immutable value swapped whole."""

    def __init__(self, clock: ClockTracker, settings: Callable[[], Settings]) -> None:
        self.clock = clock
        self._settings = settings  # the session's current settings (replaced whole by Session.update)
        self.link: LinkClock | None = None

    def link_timeline(self) -> LinkTimeline | None:
        """Link's latest timeline while Link is on; None while it is off (or never joined)."""
        link = self.link
        return link.timeline if link is not None and self._settings().link else None

    def source(self, now: float) -> tuple[str, LinkTimeline | None, float | None]:
        """(clock source, Link's timeline while Link is on, the MIDI clock's tempo)."""
        timeline = self.link_timeline()
        midi_bpm = self.clock.bpm(now)
        return clock_source(timeline, midi_bpm), timeline, midi_bpm
