"""MIDI clock: tempo tracking at 24 pulses per quarter note, transport state and a quantise grid.

The DAW sends 0xF8 pulses while it plays (and often while stopped); the tempo is the slope of a
least-squares line through the last two beats of pulse times, which averages out the jitter of
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
    """Fed by the input thread with clock and transport bytes; returns transport changes."""

    def __init__(self, window: int = 2 * PPQN, timeout_s: float = 1.0):
        self.times: deque[float] = deque(maxlen=window + 1)
        self.timeout_s = timeout_s
        self.running = False
        self.pulses = 0
        self.origin: float | None = None  # the time of pulse 0 (a beat), for the quantise grid
        self.last_pulse: float | None = None

    def feed(self, status: int, data: list[int], time: float) -> str | None:
        """Take one realtime/common message; returns "start", "stop" or "continue" on a change."""
        if status == CLOCK:
            self.times.append(time)
            self.last_pulse = time
            if self.running:
                if self.pulses % PPQN == 0:
                    self.origin = time
                self.pulses += 1
            return None
        if status == START:
            self.running, self.pulses = True, 0
            self.origin = None
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

    def bpm(self, now: float) -> float | None:
        """Tempo from the recent pulses; None without at least half a beat of fresh pulses."""
        if self.last_pulse is None or now - self.last_pulse > self.timeout_s or len(self.times) < PPQN // 2 + 1:
            return None
        times = list(self.times)
        n = len(times)
        mean_i = (n - 1) / 2
        mean_t = sum(times) / n
        slope = sum((i - mean_i) * (t - mean_t) for i, t in enumerate(times)) / sum((i - mean_i) ** 2 for i in range(n))
        return 60.0 / (slope * PPQN) if slope > 0 else None

    def state(self, now: float) -> ClockState:
        return ClockState(self.bpm(now), self.running, self.pulses)

    def quantize(self, time: float, grid: str, now: float, fallback_origin: float) -> float:
        """Snap `time` to the nearest grid point (never before `now`); off, or no grid: unchanged.

        Without a clock the grid runs at 120 bpm from `fallback_origin` (the session start).
        """
        beats = GRID_BEATS.get(grid)
        if beats is None:
            return time
        bpm = self.bpm(now) or DEFAULT_BPM
        origin = self.origin if self.origin is not None and self.bpm(now) else fallback_origin
        step = beats * 60.0 / bpm
        snapped = origin + round((time - origin) / step) * step
        if snapped < now:
            snapped = origin + math.ceil((now - origin) / step) * step
        return snapped
