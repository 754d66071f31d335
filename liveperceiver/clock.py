"""MIDI clock: tempo tracking at 24 pulses per quarter note, transport state and a quantise grid.

The DAW sends 0xF8 pulses while it plays (and often while stopped); the tempo is the slope of a
least-squares line through the last four beats of pulse times, which averages out the jitter of
single pulses. Start/Continue/Stop/Song Position set the transport; the session starts and stops
the model on them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

PPQN = 24
CLOCK, START, CONTINUE, STOP, SONG_POSITION = 0xF8, 0xFA, 0xFB, 0xFC, 0xF2
GRID_BEATS = {"1/4": 1.0, "1/8": 0.5, "1/8t": 1 / 3, "1/16": 0.25, "1/16t": 1 / 6, "1/32": 0.125}
DEFAULT_BPM = 120.0


@dataclass
class ClockState:
    bpm: float | None  # None: no clock in the last second
    running: bool  # transport playing (after Start/Continue, before Stop)
    pulses: int  # pulses since Start (or the song position)


class ClockTracker:
    """Fed by the input thread with clock and transport bytes; returns transport changes.

    Pulse times are stamped on arrival, so they jitter by the backend's buffering (a JACK period).
    A least-squares line through the recent (pulse number, time) pairs gives both the tempo and a
    steady beat grid for quantising; single late pulses move neither much.
    """

    def __init__(self, window: int = 4 * PPQN, timeout_s: float = 1.0):
        self.points: deque[tuple[int, float]] = deque(maxlen=window + 1)  # (pulse count, arrival time)
        self.timeout_s = timeout_s
        self.running = False
        self.count = 0  # every pulse ever seen
        self.pulses = 0  # pulses since Start (or the song position): the song position in pulses
        self.beat_count: int | None = None  # `count` of the latest pulse that began a beat
        self.last_pulse: float | None = None

    def feed(self, status: int, data: list[int], time: float) -> str | None:
        """Take one realtime/common message; returns "start", "stop" or "continue" on a change."""
        if status == CLOCK:
            self.points.append((self.count, time))
            self.last_pulse = time
            if self.running:
                if self.pulses % PPQN == 0:
                    self.beat_count = self.count
                self.pulses += 1
            self.count += 1
            return None
        if status == START:
            self.running, self.pulses = True, 0
            self.beat_count = None
            return "start"
        if status == CONTINUE:
            self.running = True
            return "continue"
        if status == STOP:
            was_running, self.running = self.running, False
            return "stop" if was_running else None
        if status == SONG_POSITION and len(data) >= 2:
            self.pulses = ((data[1] << 7) | data[0]) * 6  # song position counts sixteenths
        return None

    def _fit(self, now: float) -> tuple[float, float] | None:
        """(intercept, seconds per pulse) of the recent pulses; None without fresh pulses."""
        if self.last_pulse is None or now - self.last_pulse > self.timeout_s or len(self.points) < PPQN // 2 + 1:
            return None
        points = list(self.points)
        n = len(points)
        mean_c = sum(c for c, _ in points) / n
        mean_t = sum(t for _, t in points) / n
        slope = sum((c - mean_c) * (t - mean_t) for c, t in points) / sum((c - mean_c) ** 2 for c, _ in points)
        if slope <= 0:
            return None
        return mean_t - slope * mean_c, slope

    def bpm(self, now: float) -> float | None:
        """Tempo from the recent pulses; None without at least half a beat of fresh pulses."""
        fit = self._fit(now)
        return None if fit is None else 60.0 / (fit[1] * PPQN)

    def grid(self, now: float) -> tuple[float, float] | None:
        """(time of the latest beat on the fitted line, seconds per beat) while a clock runs."""
        fit = self._fit(now)
        if fit is None or self.beat_count is None:
            return None
        intercept, slope = fit
        return intercept + slope * self.beat_count, slope * PPQN

    def state(self, now: float) -> ClockState:
        return ClockState(self.bpm(now), self.running, self.pulses)

    def quantize(self, time: float, grid: str, now: float, fallback_origin: float) -> float:
        """Snap `time` to the nearest grid point (never before `now`); off, or no grid: unchanged.

        Without a clock the grid runs at 120 bpm from `fallback_origin` (the session start).
        """
        beats = GRID_BEATS.get(grid)
        if beats is None:
            return time
        beat_grid = self.grid(now)
        origin, beat = beat_grid if beat_grid is not None else (fallback_origin, 60.0 / DEFAULT_BPM)
        step = beats * beat
        snapped = origin + round((time - origin) / step) * step
        if snapped < now:
            snapped = origin + math.ceil((now - origin) / step) * step
        return snapped
