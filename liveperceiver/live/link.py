"""Ableton Link: tempo, beat phase and start/stop shared with DAWs, apps and phones on the network.

`LinkClock` owns one `aalink.Link` (the PyPI package `aalink`, a wrapper of Ableton's Link library)
on a thread of its own: aalink delivers its tempo, peer and start/stop callbacks through an asyncio
loop, and Link's state is easiest to reason about with one owner. Other threads never call the
Link object; they read `LinkClock.timeline`, an immutable `LinkTimeline` that the Link thread
replaces whole (a reference swap: no lock needed, never a torn read), and ask for changes
(enable, quantum, start/stop sync, a tempo proposal) through the loop.

A `LinkTimeline` is a reading of Link's beat at one `time.monotonic()` instant plus the tempo: Link's
beat is a straight line of time while the tempo holds, so the beat at any instant, the next beat or
bar line and a quantise grid follow from it without asking Link again. The Link thread re-reads it
every REFRESH_S and at once when a peer changes the tempo, joins or starts/stops (its callbacks).

Which clock times the session is decided in one place, `clock_source`: Link with peers, else the
MIDI clock, else Link alone (LivePerceiver's own Link timeline, the one a peer joining later shares),
else free time.

Link finds peers by UDP multicast on every network interface. It never sets the session's tempo on
its own: LivePerceiver's Link starts at DEFAULT_BPM, which only matters to a peer that joins a
session LivePerceiver started first (Link keeps the older session's timeline); `propose_tempo`
(`play --link-tempo`) is the one way LivePerceiver changes the tempo of a running session.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from liveperceiver.core.errors import UserError

DEFAULT_BPM = 120.0
MIN_BPM, MAX_BPM = 20.0, 999.0  # the tempo range Link accepts
REFRESH_S = 0.02  # the Link thread re-reads the timeline this often (callbacks refresh it sooner)
READ_SPREAD_S = 0.0002  # a beat reading bracketed by monotonic stamps further apart than this is retried
REANCHOR_S = 0.0002  # a reading this far (in time) off the published line replaces it (clock drift)
CLOSE_DRAIN_S = 0.15  # after disabling, the time Link's last callbacks get before the object goes
INSTALL = "pip install aalink"

LINK, MIDI_CLOCK, FREE = "link", "midi clock", "free"  # the clock sources, in the UI's words


def require_aalink():
    """The aalink module, or a one-line UserError saying how to install it."""
    try:
        import aalink
    except ImportError:
        raise UserError(f"Ableton Link needs the aalink package, which is not installed ({INSTALL})") from None
    return aalink


def check_tempo(bpm: float, flag: str = "--link-tempo") -> float:
    if not MIN_BPM <= bpm <= MAX_BPM:
        raise UserError(f"{flag} {bpm:g} is outside the tempo range Link accepts ({MIN_BPM:g} .. {MAX_BPM:g} BPM)")
    return float(bpm)


@dataclass(frozen=True)
class LinkStatus:
    """What the UI shows of Link at one instant."""

    peers: int
    bpm: float
    beat: float  # position in the bar: 0 <= beat < quantum
    quantum: int
    playing: bool


def link_line(status: LinkStatus) -> str:
    """'link: 2 peers, 120.0 BPM, beat 3/4' (the beat counted from 1, as a musician counts)."""
    peers = f"{status.peers} peer{'' if status.peers == 1 else 's'}"
    beat = min(status.quantum, int(status.beat) + 1)
    return f"link: {peers}, {status.bpm:.1f} BPM, beat {beat}/{status.quantum}"


@dataclass(frozen=True)
class LinkTimeline:
    """Link's beat grid as a line through one reading: beat `beat` at monotonic time `at`, `bpm` on."""

    at: float  # time.monotonic() of the reading
    beat: float  # Link's beat then; bar lines are at multiples of `quantum` (their phase is shared by every peer)
    bpm: float
    quantum: int
    peers: int
    playing: bool  # Link's start/stop state (shared only between peers with start/stop sync on)
    enabled: bool

    def beat_at(self, when: float) -> float:
        return self.beat + (when - self.at) * self.bpm / 60.0

    def time_at(self, beat: float) -> float:
        return self.at + (beat - self.beat) * 60.0 / self.bpm

    def next_boundary(self, after: float, every: float) -> float:
        """The first instant at or after `after` whose beat is a multiple of `every` beats (1: a beat,
        `quantum`: a bar line)."""
        target = math.ceil(self.beat_at(after) / every - 1e-9) * every
        return max(after, self.time_at(target))

    def quantize(self, when: float, every: float, not_before: float) -> float:
        """`when` snapped to the nearest multiple of `every` beats, never before `not_before`."""
        snapped = self.time_at(round(self.beat_at(when) / every) * every)
        return snapped if snapped >= not_before else self.next_boundary(not_before, every)

    def status(self, now: float) -> LinkStatus:
        return LinkStatus(self.peers, self.bpm, self.beat_at(now) % self.quantum, self.quantum, self.playing)


def clock_source(link: LinkTimeline | None, midi_bpm: float | None) -> str:
    """The one rule for which clock times the session: Link when it has peers, else a MIDI clock
    that is running, else Link alone (its own timeline: a peer that joins later shares it), else
    free time (ClockTracker's 120 BPM grid from the session start)."""
    link_on = link is not None and link.enabled
    if link_on and link.peers > 0:
        return LINK
    if midi_bpm is not None:
        return MIDI_CLOCK
    return LINK if link_on else FREE


def describe_source(source: str, link: LinkTimeline | None, midi_bpm: float | None, now: float) -> str:
    """The one-line log when the clock source changes."""
    if source == LINK and link is not None:
        return f"clock: Ableton Link ({link_line(link.status(now))[len('link: ') :]})"
    if source == MIDI_CLOCK and midi_bpm is not None:
        return f"clock: MIDI clock ({midi_bpm:.1f} BPM)"
    return "clock: free time (a 120 BPM grid from the session start)"


class LinkClock:
    """One Link peer, owned by the "lp-link" thread; see the module docstring.

    `on_transport(playing, when)` is called on the Link thread when the session's start/stop state
    changes (a peer pressed play or stop; only with start/stop sync on); `log` takes one-line notes."""

    def __init__(
        self,
        quantum: int = 4,
        start_stop: bool = True,
        bpm: float = DEFAULT_BPM,
        on_transport: Callable[[bool, float], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self._aalink = require_aalink()
        self.on_transport = on_transport
        self.log = log or (lambda line: None)
        self._start_stop = start_stop
        self._proposal: float | None = None  # a tempo to commit again when the first peer appears
        self.timeline = LinkTimeline(time.monotonic(), 0.0, bpm, quantum, 0, False, False)
        self._link = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, args=(bpm, quantum), name="lp-link", daemon=True)
        self._thread.start()
        if not self._ready.wait(5.0) or self._error is not None:
            self.close()
            raise UserError(f"Ableton Link did not start: {self._error or 'no answer from its thread in 5 s'}")

    # ------------------------------------------------------------------ any thread

    def set_enabled(self, enabled: bool) -> None:
        """Join (True) or leave (False) the Link session."""
        self._call(self._set_enabled, enabled)

    def configure(self, quantum: int, start_stop: bool) -> None:
        """Beats per bar (Link's quantum) and whether the start/stop state is shared."""
        self._call(self._configure, quantum, start_stop)

    def propose_tempo(self, bpm: float) -> None:
        """Set the session's tempo now, and once more when the first peer appears (joining a session
        that was there first would otherwise take its tempo instead)."""
        self._call(self._propose_tempo, check_tempo(bpm))

    def close(self) -> None:
        """Leave the session and stop the thread (waits at most about half a second)."""
        if self._thread.is_alive() and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._cancel)
            except RuntimeError:  # the loop already stopped
                pass
            self._thread.join(0.5)

    # ------------------------------------------------------------------ the Link thread

    def _call(self, function, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # closed: nothing to change any more
            pass

    def _run(self, bpm: float, quantum: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(bpm, quantum))
        except BaseException as error:  # reported by the constructor, or already running: keep it
            self._error = self._error or error
        finally:
            self._ready.set()
            # The loop stays open (never `close()`d): a Link callback still on its way posts to it,
            # and posting to a closed loop would raise inside Link's own thread.

    async def _main(self, bpm: float, quantum: int) -> None:
        self._task = asyncio.current_task()
        try:
            link = self._aalink.Link(bpm)  # picks up this thread's running loop for its callbacks
            link.quantum = quantum
            link.start_stop_sync_enabled = self._start_stop
            link.set_tempo_callback(self._on_tempo)
            link.set_num_peers_callback(self._on_peers)
            link.set_start_stop_callback(self._on_start_stop)
            link.enabled = True
        except Exception as error:
            self._error = error
            return
        self._link = link
        self._refresh()
        self._ready.set()
        try:
            while True:
                await asyncio.sleep(REFRESH_S)
                self._refresh()
        except asyncio.CancelledError:
            pass
        finally:
            link.enabled = False
            await asyncio.sleep(CLOSE_DRAIN_S)  # Link's last peer callback runs now, not mid-destruction
            self._link = None
            self.timeline = replace(self.timeline, enabled=False, peers=0)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _read(self) -> LinkTimeline:
        """A fresh reading: Link's beat, stamped by the monotonic clock on both sides of the call."""
        link = self._link
        best = None
        for _ in range(4):
            before = time.monotonic()
            beat = link.beat
            after = time.monotonic()
            if best is None or after - before < best[1] - best[0]:
                best = (before, after, beat)
            if after - before <= READ_SPREAD_S:
                break
        before, after, beat = best
        return LinkTimeline(
            at=(before + after) / 2,
            beat=beat,
            bpm=link.tempo,
            quantum=int(link.quantum),
            peers=link.num_peers,
            playing=link.playing,
            enabled=link.enabled,
        )

    def _refresh(self) -> None:
        """Publish a new reading when anything moved; keep the old line while it still predicts Link
        (re-anchoring on every reading would shake the grid by the reading's own jitter)."""
        if self._link is None:
            return
        new = self._read()
        old = self.timeline
        drift_s = abs(new.beat - old.beat_at(new.at)) * 60.0 / new.bpm
        same_grid = new.bpm == old.bpm and new.quantum == old.quantum and drift_s < REANCHOR_S
        same_state = (new.peers, new.playing, new.enabled) == (old.peers, old.playing, old.enabled)
        if not (same_grid and same_state):
            self.timeline = new

    def _set_enabled(self, enabled: bool) -> None:
        if self._link is not None:
            self._link.enabled = enabled
            if enabled and self._proposal is not None:
                self._link.tempo = self._proposal
            self._refresh()

    def _configure(self, quantum: int, start_stop: bool) -> None:
        if self._link is not None:
            self._start_stop = start_stop
            self._link.quantum = quantum
            self._link.start_stop_sync_enabled = start_stop
            self._refresh()

    def _propose_tempo(self, bpm: float) -> None:
        if self._link is not None:
            self._proposal = bpm if self._link.num_peers == 0 else None
            self._link.tempo = bpm
            self._refresh()
            self.log(f"link: proposed {bpm:.1f} BPM to the session")

    # aalink calls these on this thread's loop; an exception here would only reach asyncio's stderr
    def _on_tempo(self, bpm: float) -> None:
        self._guarded(self._refresh)

    def _on_peers(self, peers: int) -> None:
        def joined() -> None:
            if peers > 0 and self._proposal is not None and self._link is not None:
                self._link.tempo, self._proposal = self._proposal, None
            self._refresh()
            self.log(f"link: {peers} peer{'' if peers == 1 else 's'}")

        self._guarded(joined)

    def _on_start_stop(self, playing: bool) -> None:
        def changed() -> None:
            when = time.monotonic()
            self._refresh()
            if self._start_stop and self.on_transport is not None:
                self.on_transport(bool(playing), when)

        self._guarded(changed)

    def _guarded(self, function) -> None:
        try:
            function()
        except Exception as error:
            self.log(f"warning: link: {error!r}")
