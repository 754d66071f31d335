"""The timed output thread: the only writer to the output port and the keeper of sounding notes.

Every note-on the scheduler sends gets exactly one note-off, whatever happens: the note's own
off, a barge-in (`silence`), a mode switch, `panic`, a stop, an exception, a retrigger of the same
pitch, or the watchdog that cuts notes longer than `max_note_seconds`. The player's notes passed
thru end at `close`, and a sustain pedal passed thru is let up there. Other threads only queue
work here (under a short lock) and never wait for the port.

Timing: the thread sleeps on a condition until about 1.5 ms before an event is due, then spins
(yielding the GIL) until its time. `jitter()` reports actual minus scheduled send times. Where the
OS allows it (Linux with an rtprio limit, as JACK setups have), the thread runs at real-time
priority, so a busy core (the engine, the DAW) does not delay a note by a scheduler time slice.
While a session plays (runtime.freeze_heap) the thread also runs the process's garbage collections,
in the gaps between its events (GapCollector).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from liveperceiver.live.settings import Settings
from liveperceiver.runtime import freeze_asked, freeze_collected, heap_frozen

SPIN_S = 0.0015  # wake this long before an event and spin the rest
IDLE_WAKE_S = 0.1  # wake at least this often to run the watchdog
REALTIME_PRIORITY = 10  # SCHED_FIFO: before every normal thread, below JACK's own threads (60-95)

# The garbage collections' schedule (GapCollector): Python's thresholds
YOUNG_OBJECTS = 700  # more new tracked objects than this: a collection is due
MIDDLE_EVERY = 10  # more young collections than this since a middle one: the middle one is due
FULL_EVERY = 10  # more middle collections than this since a full one: the full one is due
FIRST_GUESS_S = (0.0005, 0.001, 0.01)  # what each generation's collection takes, until one is timed
GUESS_DECAY = 0.9  # per collection, a long one is forgotten this fast
LONGEST_GUESS_S = 0.02  # a collection that once took longer still gets a gap of 41 ms (rests have them)
GAP_MARGIN_S = 0.001  # left over after twice the collection's expected time, before the next event


def raise_thread_priority() -> str:
    """Run the calling thread before normal threads if the OS allows it; says what was granted.

    Linux only: real-time SCHED_FIFO needs root or an rtprio limit (`@audio - rtprio 95` in
    /etc/security/limits.d, as JACK setups have); else a nice value of -10 needs CAP_SYS_NICE or
    a nice limit. Without either the thread keeps normal priority and works the same, with more
    jitter when every core is busy."""
    if not sys.platform.startswith("linux"):
        return "normal priority"
    thread_id = threading.get_native_id()
    try:
        os.sched_setscheduler(thread_id, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
        return f"real-time priority (SCHED_FIFO {REALTIME_PRIORITY})"
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, -10)
        return "raised priority (nice -10)"
    except OSError:
        return "normal priority (no permission for real-time: see README, Troubleshooting)"


class GapCollector:
    """The process's garbage collections while a session plays, run by the scheduler thread when its
    next event is far enough away. Why: a collection holds the GIL, and one that falls on a note's
    time delays it; with the UI drawing (its cyclic garbage made one every 20 ms or so) notes went out
    up to 15 ms late (`bench --live`'s duet with the UI; README). runtime.freeze_heap raises the
    automatic thresholds to a rare safety net for this. A collection is due by Python's thresholds
    (YOUNG_OBJECTS, then the oldest generation past MIDDLE_EVERY or FULL_EVERY; without Python's rule
    that holds a full collection back until a quarter of the long-lived objects are new, so full ones
    come somewhat more often, over the objects made since the heap was frozen only), and runs only
    if more than twice what that generation took lately, plus GAP_MARGIN_S, is left before the
    next event or watchdog cut; else a younger generation that fits, or none. A freeze asked for
    (runtime.freeze_heap_soon: the UI's widgets once mounted) is a full collection, whatever the
    counts, in a gap that fits the longest one (LONGEST_GUESS_S), then gc.freeze. The engine and input
    threads wait for the GIL meanwhile, as they did for an automatic collection; the finalizers of
    collected cycles now run on this thread, so one that blocked would hold the output too.

    Threads: owned by the scheduler thread."""

    def __init__(self) -> None:
        self.expected_s = list(FIRST_GUESS_S)  # per generation
        self.collections = [0, 0, 0]  # run here, per generation
        self.busy = False  # the last collect() found another thread collecting: wait one turn

    def generation(self, gap_s: float, counts: tuple[int, int, int], freeze: bool = False) -> int | None:
        """The generation to collect with `gap_s` seconds left before the next event, from
        gc.get_count()'s `counts` (new objects, young collections since a middle one, middle since a
        full one), or None: nothing is due, or nothing due fits in the gap. `freeze`: a freeze is
        asked for (runtime.freeze_asked)."""
        if self.busy:
            self.busy = False
            return None
        if freeze and gap_s > 2 * LONGEST_GUESS_S + GAP_MARGIN_S:
            return 2
        if counts[0] <= YOUNG_OBJECTS:
            return None
        oldest = 2 if counts[2] > FULL_EVERY else 1 if counts[1] > MIDDLE_EVERY else 0
        for generation in range(oldest, -1, -1):
            if gap_s > 2 * self.expected_s[generation] + GAP_MARGIN_S:
                return generation
        return None

    def collect(self, generation: int) -> float | None:
        """Collect `generation` (and the younger ones) now; returns the seconds it took, or None when
        another thread was collecting (gc.collect then returns at once, the counts untouched)."""
        new_objects = gc.get_count()[0]  # above YOUNG_OBJECTS (generation())
        start = time.perf_counter()
        gc.collect(generation)
        took = time.perf_counter() - start
        if gc.get_count()[0] >= new_objects:  # every collection starts the count of new objects again
            self.busy = True
            return None
        self.expected_s[generation] = min(LONGEST_GUESS_S, max(took, GUESS_DECAY * self.expected_s[generation]))
        self.collections[generation] += 1
        return took


@dataclass(order=True)
class OutNote:
    """A model note event to send at `time` (monotonic seconds); pitch and velocity before output options."""

    time: float
    seq: int = field(default=0, compare=True)
    on: bool = field(default=True, compare=False)
    pitch: int = field(default=60, compare=False)
    velocity: int = field(default=64, compare=False)
    tag: int = field(default=-1, compare=False)  # the session's marker (engine length after this event)
    late: bool = field(default=False, compare=False)  # already due when scheduled (the sampler fell behind)


@dataclass
class Sounding:
    channel: int
    pitch: int  # as sent (after transpose)
    since: float


class Scheduler:
    """Start with `start()`, feed with `schedule()`, stop with `close()` (all notes off)."""

    def __init__(
        self,
        send: Callable[[list[int]], bool],
        settings: Settings,
        on_sent: Callable[[float, list[int], bool], None] | None = None,
        log: Callable[[str], None] = print,
        on_wake: Callable[[], None] | None = None,
    ):
        """`on_wake`: called on the scheduler's thread at every turn of its loop (at least every
        IDLE_WAKE_S), before anything is sent: the output's MidiOutput.catch_up."""
        self.send = send
        self.on_wake = on_wake
        self.settings = settings  # replaced whole by the session; read once per event
        self.on_sent = on_sent or (lambda time, message, model: None)  # model=False: thru
        self.log = log
        self.cond = threading.Condition()
        self.pending: list[OutNote] = []  # heap, guarded by cond
        self.raw: deque[list[int]] = deque()  # thru messages and panic CCs, sent as soon as possible
        self.off_requests = 0  # incremented by silence(); the thread answers with all notes off
        self.thru_release_requests = 0  # incremented by panic(); the thread lets the thru notes and pedal up
        self.wake_failed = False  # on_wake raised at the last turn (said once); thread-owned
        self.last_tag = -1  # highest tag of the events taken for sending (guarded by cond)
        self.epoch = 0  # bumped by silence(); schedule() drops notes planned in an older epoch
        self.sounding: dict[int, Sounding] = {}  # model pitch -> what was sent; thread-owned
        self.thru_sounding: set[tuple[int, int]] = set()  # (channel, pitch) of thru notes; thread-owned
        self.thru_pedal: set[int] = set()  # channels whose sustain pedal (CC64) went down thru; thread-owned
        self.seq = itertools.count()
        self.jitters: deque[float] = deque(maxlen=4096)  # sent - scheduled, events planned ahead
        self.lateness: deque[float] = deque(maxlen=4096)  # sent - scheduled, events already due when planned
        self.sent_on = 0
        self.sent_off = 0
        self.errors = 0
        self.running = False
        self.priority = ""  # what raise_thread_priority() granted the thread (set before start() returns)
        self.started = threading.Event()
        self.collector = GapCollector()  # while a session plays (runtime.heap_frozen); thread-owned
        self.thread = threading.Thread(target=self._run, name="lp-scheduler", daemon=True)

    # ----------------------------------------------------------------- called from other threads

    def start(self) -> None:
        self.running = True
        self.thread.start()
        self.started.wait(1.0)

    def schedule(self, notes: list[OutNote], epoch: int | None = None) -> bool:
        """Queue notes; with `epoch`, only if no silence() came since it was read (else False)."""
        now = time.monotonic()
        with self.cond:
            if epoch is not None and epoch != self.epoch:
                return False
            for note in notes:
                note.seq = next(self.seq)
                note.late = note.time < now
                heapq.heappush(self.pending, note)
            self.cond.notify()
            return True

    def silence(self, reset_tags: bool = False, notes_off: bool = True) -> tuple[int, list[OutNote]]:
        """Barge-in: drop every pending event and (unless `notes_off` is False) turn sounding notes off now.

        Returns the highest tag of the events sent (or taken for sending) and the dropped ones, so
        the caller can roll the unplayed part back out of the model's context. Notes left sounding
        still end by a later note-off, silence(), the watchdog or close().
        """
        with self.cond:
            dropped = sorted(self.pending)
            self.pending.clear()
            self.off_requests += notes_off
            self.epoch += 1
            tag = self.last_tag
            if reset_tags:
                self.last_tag = -1
            self.cond.notify()
            return tag, dropped

    def played_tag(self) -> int:
        with self.cond:
            return self.last_tag

    def panic(self) -> None:
        """All sounding notes off, the player's notes and pedal passed thru let up (panic is for a
        note-off lost on the way), plus CC123 (all notes off) on the output channel."""
        self.silence()
        with self.cond:
            self.thru_release_requests += 1
            self.raw.append([0xB0 | (self.settings.out_channel - 1), 123, 0])
            self.cond.notify()

    def send_raw(self, message: list[int]) -> None:
        """Send a message as soon as possible (MIDI thru)."""
        with self.cond:
            self.raw.append(message)
            self.cond.notify()

    def pending_count(self) -> int:
        with self.cond:
            return len(self.pending)

    def pending_notes(self) -> list[OutNote]:
        """A copy of the look-ahead (for the piano roll)."""
        with self.cond:
            return sorted(self.pending)

    def sounding_pitches(self) -> list[int]:
        return sorted(s.pitch for s in list(self.sounding.values()))

    def jitter(self) -> list[float]:
        """Send time minus scheduled time of the events that were planned ahead of their time."""
        return list(self.jitters)

    def jitter_late(self) -> list[float]:
        """The same for events that were already due when they were scheduled (the sampler's lag)."""
        return list(self.lateness)

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread after it has turned every sounding note off."""
        with self.cond:
            self.running = False
            self.pending.clear()
            self.cond.notify()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    # ----------------------------------------------------------------- the thread

    def _run(self) -> None:
        self.seen_off_requests = self.seen_thru_release_requests = 0
        self.priority = raise_thread_priority()
        self.started.set()
        try:
            while self._iteration():
                pass
        finally:
            self._all_off()
            self._release_thru()
            if self.sent_on:
                # A note-off lost on the way (an overloaded JACK drops messages) would leave the
                # synth holding a note that was closed here: all notes off on the output channel.
                self._emit([0xB0 | (self.settings.out_channel - 1), 123, 0], model=False)

    def _iteration(self) -> bool:
        """One turn of the loop; False once closed. An error costs the sounding notes, not the thread."""
        try:
            with self.cond:
                raw = list(self.raw)
                self.raw.clear()
                off_wanted = self.off_requests != self.seen_off_requests
                self.seen_off_requests = self.off_requests
                release_thru = self.thru_release_requests != self.seen_thru_release_requests
                self.seen_thru_release_requests = self.thru_release_requests
                running = self.running
                note = generation = None
                freeze = False
                if running and not raw and not off_wanted and not release_thru:
                    now = time.monotonic()
                    wake = self._watchdog_deadline(now)
                    if self.pending and self.pending[0].time - now <= SPIN_S:
                        note = heapq.heappop(self.pending)
                        self.last_tag = max(self.last_tag, note.tag)
                    else:
                        due = self.pending[0].time - SPIN_S if self.pending else now + IDLE_WAKE_S
                        gap = min(due, wake) - now  # until the next note or watchdog cut
                        if heap_frozen():
                            freeze = freeze_asked()
                            generation = self.collector.generation(gap, gc.get_count(), freeze)
                        if generation is None:
                            self.cond.wait(max(0.0, gap))
            if not running:
                return False
            if generation is not None:  # outside the lock: a collection holds the GIL for long enough
                took = self.collector.collect(generation)
                if freeze and generation == 2 and took is not None:
                    freeze_collected()
            if self.on_wake is not None:
                try:  # before the player's messages taken this turn: a failure must not lose them
                    self.on_wake()
                    self.wake_failed = False
                except Exception as error:
                    if not self.wake_failed:  # once, not at every turn
                        self.log(f"output catch-up failed: {error}")
                    self.wake_failed = True
            if off_wanted:
                self._all_off()
            if release_thru:
                self._release_thru()
            for message in raw:
                self._send_raw(message)
            self._watchdog(time.monotonic())
            if note is not None:
                self._play(note)
        except Exception:
            self.errors += 1
            self.log("scheduler error, all notes off:\n" + traceback.format_exc(limit=3))
            try:
                self._all_off()
            except Exception:
                self.sounding.clear()
            time.sleep(0.01)
        return True

    def _play(self, note: OutNote) -> None:
        while (left := note.time - time.monotonic()) > 0:
            time.sleep(0 if left < 0.0005 else left / 2)
        settings = self.settings
        if note.on:
            if note.pitch in self.sounding:
                self._off(note.pitch)  # retrigger: the old note ends first
            pitch = note.pitch + settings.transpose
            if note.pitch not in settings.played_pitches:
                return
            velocity = max(1, min(127, round(note.velocity * settings.velocity_scale)))
            channel = settings.out_channel - 1
            for model_pitch, sounding in list(self.sounding.items()):
                if (sounding.channel, sounding.pitch) == (channel, pitch):  # same key after a transpose change
                    self._off(model_pitch)
            sent = self._emit([0x90 | channel, pitch, velocity])
            self.sounding[note.pitch] = Sounding(channel, pitch, sent)
            self.sent_on += 1
        else:
            if note.pitch not in self.sounding:
                return  # already cut (watchdog, silence) or never sent (out of range)
            sent = self._off(note.pitch)
        (self.lateness if note.late else self.jitters).append(sent - note.time)

    def _release_thru(self) -> None:
        """The player's notes passed thru off, then their pedal up: a pedal left down would sustain
        the notes just ended (all notes off spares held notes)."""
        for channel, pitch in list(self.thru_sounding):
            self._emit([0x80 | channel, pitch, 0], model=False)
        self.thru_sounding.clear()
        for channel in sorted(self.thru_pedal):
            self._emit([0xB0 | channel, 64, 0], model=False)
        self.thru_pedal.clear()

    def _off(self, model_pitch: int) -> float:
        sounding = self.sounding.pop(model_pitch)
        self.sent_off += 1
        return self._emit([0x80 | sounding.channel, sounding.pitch, 0])

    def _all_off(self) -> None:
        for pitch in list(self.sounding):
            self._off(pitch)

    def _send_raw(self, message: list[int]) -> None:
        status = message[0] & 0xF0 if message else 0
        if status == 0x90 and len(message) == 3 and message[2] > 0:
            self.thru_sounding.add((message[0] & 0x0F, message[1]))
        elif status in (0x80, 0x90) and len(message) == 3:
            self.thru_sounding.discard((message[0] & 0x0F, message[1]))
        elif status == 0xB0 and len(message) == 3 and message[1] == 64:
            if message[2] >= 64:
                self.thru_pedal.add(message[0] & 0x0F)
            else:
                self.thru_pedal.discard(message[0] & 0x0F)
        self._emit(message, model=False)

    def _emit(self, message: list[int], model: bool = True) -> float:
        now = time.monotonic()
        try:
            self.send(message)
        except Exception as error:  # a vanished port must not kill the only output thread
            self.log(f"output send failed: {error}")
        try:
            self.on_sent(now, message, model)
        except Exception as error:  # nor may a listener's bug break the sounding-note bookkeeping
            self.errors += 1
            self.log(f"on_sent failed: {error!r}")
        return now

    def _watchdog_deadline(self, now: float) -> float:
        if not self.sounding:
            return now + IDLE_WAKE_S
        oldest = min(s.since for s in self.sounding.values())
        return min(now + IDLE_WAKE_S, oldest + self.settings.max_note_seconds)

    def _watchdog(self, now: float) -> None:
        limit = self.settings.max_note_seconds
        for pitch, sounding in list(self.sounding.items()):
            if now - sounding.since >= limit:
                self._off(pitch)
                self.log(f"watchdog: note {sounding.pitch} held over {limit:g} s, cut")
