"""MIDI clock: tempo tracking at 24 pulses per quarter note, transport state and a quantise grid.

The DAW sends 0xF8 pulses while it plays (and often while stopped); the tempo is the slope of a
least-squares line through the last four beats of pulse times, which averages out the jitter of
single pulses. The tempo needs the pulses alone: LivePerceiver may start while the DAW is already
playing, and then no Start comes.

The grid's phase is the song position, counted in pulses, as a DAW's slave counts it:

- Start (0xFA): the next pulse is the song's first beat.
- Song Position (0xF2): the next pulse is at that position (16th notes, 6 pulses each). DAWs send it
  while stopped, before a Continue, and some while playing, when they jump (a loop).
- Continue (0xFB): the next pulse is at the position the transport stopped at, or the last Song
  Position received since.
- Stop (0xFC): the position holds while pulses may go on (for the tempo).

Until the first transport message the DAW is taken as playing and the position is counted from the
first pulse heard: the tempo and the grid's step are right, and its phase is right up to a whole
number of pulses (which pulse of a 16th LivePerceiver came in on cannot be known without a position).
The session starts and stops the model on Start, Continue and Stop.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

PPQN = 24
PULSES_PER_SIXTEENTH = PPQN // 4  # the unit of Song Position
CLOCK, START, CONTINUE, STOP, SONG_POSITION = 0xF8, 0xFA, 0xFB, 0xFC, 0xF2
GRID_BEATS = {"1/4": 1.0, "1/8": 0.5, "1/8t": 1 / 3, "1/16": 0.25, "1/16t": 1 / 6, "1/32": 0.125}
DEFAULT_BPM = 120.0
# A pulse stamped later than the fitted line's median by more than this many median absolute
# deviations of the residuals (and LATE_FLOOR_S) is late, not jitter: the tempo line leaves it out.
# Uniform jitter over a backend period P has a deviation of P/4 and reaches P/2 above the median.
LATE_MAD = 3.0
LATE_FLOOR_S = 0.003
LATE_PASSES = 3


@dataclass
class ClockState:
    bpm: float | None  # None: no clock in the last second
    running: bool  # playing: after Start/Continue and before Stop, or before any transport message
    pulses: int  # song position of the next pulse, in pulses (since Start or a Song Position)


class ClockTracker:
    """Fed by the input thread with clock and transport bytes; returns transport changes.

    Pulse times are stamped on arrival, so they jitter by the backend's buffering (a JACK period).
    A least-squares line through the recent (pulse number, time) pairs gives both the tempo and a
    steady beat grid for quantising; single late pulses move neither much. A gap in the pulses
    longer than `timeout_s` (a DAW that sends clock only while playing, stopped) starts a new line.
    A pulse the backend lost is counted anyway when the line shows it (`_repair_last_pulse`).

    Only the input thread calls `feed`; the other methods read a few attributes and copy the deque
    (one C call under CPython's GIL), so any thread may call them and see the state of one message
    earlier at worst.
    """

    def __init__(self, window: int = 4 * PPQN, timeout_s: float = 1.0):
        self.points: deque[tuple[int, float]] = deque(maxlen=window + 1)  # (pulse count, arrival time)
        self.repairable = False  # the last point is the pulse before the next: no transport message or gap since
        self.timeout_s = timeout_s
        self.playing = False  # the transport said so: after Start or Continue, before Stop
        self.transport_heard = False  # any Start/Continue/Stop: until then the pulses are taken as playing
        self.count = 0  # every pulse ever seen: the number the next pulse gets
        self.pulses = 0  # song position of the next pulse (advances only while running)
        self.resume_at: int | None = None  # a Song Position heard while stopped: where Continue resumes
        self.beat_count: int | None = None  # the pulse number (`count`) of a beat while the position advances
        self.last_pulse: float | None = None

    @property
    def running(self) -> bool:
        """Playing, as far as the clock tells: the transport said so, or no transport message came yet
        (LivePerceiver joined a DAW that plays). Pulses move the song position only while running."""
        return self.playing or not self.transport_heard

    def _anchor(self) -> None:
        """The next pulse (number `count`) is at song position `pulses`: place the beat grid on it."""
        self.beat_count = self.count - self.pulses % PPQN

    def feed(self, status: int, data: list[int], time: float) -> str | None:
        """Take one realtime/common message; returns "start", "stop" or "continue" on a change."""
        if status == CLOCK:
            if self.last_pulse is not None and not 0 <= time - self.last_pulse <= self.timeout_s:
                self.points.clear()  # the clock paused: the pulses before the gap do not fit a line with these
            self._repair_last_pulse(time)
            self.points.append((self.count, time))
            self.repairable = True
            self.last_pulse = time
            if self.beat_count is None and self.running:
                self._anchor()  # the first pulse heard without a Start: the grid's origin
            self.count += 1
            if self.running:
                self.pulses += 1
            return None
        self.repairable = False  # a transport message may renumber what comes next: repair within a run of pulses
        if status == START:
            self.playing = self.transport_heard = True
            self.pulses, self.resume_at = 0, None
            self._anchor()
            return "start"
        if status == CONTINUE:
            self.playing = self.transport_heard = True
            if self.resume_at is not None:
                self.pulses, self.resume_at = self.resume_at, None
            self._anchor()
            return "continue"
        if status == STOP:
            was_running = self.running  # before any transport message the clock was taken as playing
            self.playing, self.transport_heard, self.resume_at = False, True, None
            return "stop" if was_running else None
        if status == SONG_POSITION and len(data) >= 2:
            self.pulses = ((data[1] & 0x7F) << 7 | (data[0] & 0x7F)) * PULSES_PER_SIXTEENTH
            if self.playing:
                self._anchor()  # a jump while playing (a loop): the next pulse is there
            else:
                # stopped, or not known: Continue resumes here. Until then a clock that plays on
                # without a transport message heard moves the position from here.
                self.resume_at = self.pulses
                if self.running:
                    self._anchor()
        return None

    def _repair_last_pulse(self, time: float) -> None:
        """Renumber the previous pulse when it and the one arriving now both come a pulse late.

        An overloaded backend (a JACK client that missed its cycle) can lose a pulse; counted as they
        came, every later pulse would be numbered one short and the grid would move a pulse late (25 ms
        at 100 bpm) for good. Against the line through the pulses before it, a lost pulse shows as two
        pulses in a row one period later than their numbers say, each by as much as the others jitter
        around the line. A single late pulse is followed by one on time; a slower tempo falls further
        behind with every pulse and spreads the line's residuals. When the jitter (residuals' range)
        comes near a period the two cannot be told apart, and pulses are counted as they come.
        A repeated pulse is counted (the grid moves a pulse early): dropping one that came a period
        early, with the next on time without it, was tried and dropped genuine pulses where the
        backend's period is longer than a pulse (1024 frames at 120 bpm: two pulses share a stamp
        as a repeat and its original do, and the line hides the jitter that shows it).
        """
        if not self.repairable or len(self.points) < PPQN + 1:
            return
        points = list(self.points)
        line = self._line(points[:-1])  # the previous pulse itself may be the odd one
        if line is None:
            return
        intercept, period, low, high = line
        margin = (high - low) / 4
        if high - low + 2 * margin >= period:
            return

        def a_pulse_late(count: int, stamp: float) -> bool:
            return low + period - margin <= stamp - intercept - period * count <= high + period + margin

        count, stamp = points[-1]
        if a_pulse_late(count, stamp) and a_pulse_late(count + 1, time):
            self.points[-1] = (count + 1, stamp)  # the lost pulse came before it
            self.count += 1
            if self.running:
                self.pulses += 1

    @staticmethod
    def _line(points: list[tuple[int, float]]) -> tuple[float, float, float, float] | None:
        """(intercept, seconds per pulse, lowest and highest residual of all the points) of (count,
        time) points: a least-squares line through the points that are not late.

        A stamp is never early, but it is late by more than the backend's period when the thread
        that stamps it did not run in time (a busy machine: the model sampling ahead at a run's
        start held pulses back 20-95 ms in bunches), and a few such pulses bend a least-squares line
        for the four beats they stay in it: answers 30-70 ms off the DAW's grid. So the first line's
        residuals decide: stamps later than the median one by more than LATE_MAD times their median
        absolute deviation (a third of a uniform jitter's range) and LATE_FLOOR_S go, and the line is
        fitted again through the rest, up to LATE_PASSES times (late stamps at one end tilt the first
        line toward themselves, hiding some of their lateness from it)."""
        kept = points
        for _ in range(LATE_PASSES):
            line = _least_squares(kept)
            if line is None:
                return None
            intercept, slope = line
            residuals = [t - intercept - slope * c for c, t in kept]
            middle = statistics.median(residuals)
            deviation = statistics.median(abs(r - middle) for r in residuals)
            limit = middle + max(LATE_MAD * deviation, LATE_FLOOR_S)
            on_time = [point for point, r in zip(kept, residuals, strict=True) if r <= limit]
            if len(on_time) == len(kept):
                break
            kept = on_time
        residuals = [t - intercept - slope * c for c, t in points]  # the late ones too: all the jitter there is
        return intercept, slope, min(residuals), max(residuals)

    def _fit(self, now: float) -> tuple[float, float] | None:
        """(intercept, seconds per pulse) of the recent pulses; None without fresh pulses."""
        points = list(self.points)  # one copy: the input thread may clear the deque meanwhile
        last_pulse = self.last_pulse
        if last_pulse is None or now - last_pulse > self.timeout_s:
            return None
        line = self._line(points)
        return None if line is None else line[:2]

    def bpm(self, now: float) -> float | None:
        """Tempo from the recent pulses; None without at least half a beat of fresh pulses."""
        fit = self._fit(now)
        return None if fit is None else 60.0 / (fit[1] * PPQN)

    def grid(self, now: float) -> tuple[float, float] | None:
        """(time of a beat on the fitted line, seconds per beat) while a clock runs; None without one."""
        fit = self._fit(now)
        beat_count = self.beat_count
        if fit is None or beat_count is None:
            return None
        intercept, slope = fit
        return intercept + slope * beat_count, slope * PPQN

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


def _least_squares(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line through (count, time) points; None with too few
    points for a tempo (half a beat) or a line that does not go forward in time."""
    n = len(points)
    if n < PPQN // 2 + 1:
        return None
    mean_c = sum(c for c, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    slope = sum((c - mean_c) * (t - mean_t) for c, t in points) / sum((c - mean_c) ** 2 for c, _ in points)
    if slope <= 0:
        return None
    return mean_t - slope * mean_c, slope
