"""The input thread: what the player plays, filtered and passed on.

Each incoming message is classified: MIDI clock and transport feed the ClockTracker, notes of other
channels and echoes of our own output are dropped, the player's notes and pedal are journaled, passed
thru (if asked) and queued for the engine thread as typed commands (commands.py). A note-on in call
or duet mode barges in: `scheduler.silence()` at once, before the engine thread hears of it, so the
model's notes stop within a scheduler wake-up rather than after an engine step.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from liveperceiver.live.commands import (
    Command,
    Pause,
    PlayerEvent,
    PlayerNoteOff,
    PlayerNoteOn,
    PlayerPedal,
    Rollback,
    Transport,
)
from liveperceiver.live.link import FREE, LINK, MIDI_CLOCK, describe_source
from liveperceiver.live.recorder import PLAYER
from liveperceiver.live.settings import Settings
from liveperceiver.live.shared import SharedState, Timekeeper

if TYPE_CHECKING:
    from liveperceiver.live.jack_server import JackServerWatch
    from liveperceiver.live.ports import MidiInput, MidiOutput
    from liveperceiver.live.recorder import Recorder
    from liveperceiver.live.scheduler import Scheduler

FEEDBACK_WINDOW_S = 0.030  # an input note matching one we sent this recently is our own echo
PORT_CHECK_S = 0.5
TEMPO_LOG_S = 2.0  # the journal gets the tempo at most this often


class EchoMemory:
    """The notes we sent in the last FEEDBACK_WINDOW_S, to recognise their routed-back copies.

    Threads: the scheduler thread calls `sent`, the input thread calls `is_echo`; `self.lock` guards
    the deque (iterating it while the other thread appends raised "deque mutated during iteration")."""

    def __init__(self, window_s: float = FEEDBACK_WINDOW_S, size: int = 256) -> None:
        self.window_s = window_s
        self.lock = threading.Lock()
        # (time, is_on, channel, pitch, velocity)
        self.recent: deque[tuple[float, bool, int, int, int]] = deque(maxlen=size)

    def sent(self, when: float, is_on: bool, channel: int, pitch: int, velocity: int) -> None:
        with self.lock:
            self.recent.append((when, is_on, channel, pitch, velocity))

    def is_echo(self, when: float, is_on: bool, channel: int, pitch: int, velocity: int) -> bool:
        """A routed-back copy of a note we sent: same channel, pitch and kind within the window, and
        for a note-on the same velocity (a player striking that key right then almost never matches
        it). Each note sent explains one echo at most. The caller never asks it about the release of
        a key the player holds (InputFilter.hear): that note-off is the player's."""
        with self.lock:
            for index, (sent, sent_on, sent_channel, sent_pitch, sent_velocity) in enumerate(self.recent):
                same_note = sent_channel == channel and sent_pitch == pitch and sent_on == is_on
                same_velocity = sent_velocity == velocity or not is_on
                if same_note and same_velocity and 0 <= when - sent <= self.window_s:
                    del self.recent[index]
                    return True
        return False


class InputFilter:
    """The input thread's work: `listen` is its loop, `hear` handles one message. Never waits on the
    model or the disk.

    Threads: owned by the input thread, which alone writes `last_activity` (a float the engine
    thread only reads), `midi_gone` (set once; the caller's thread reads it through
    Session.midi_gone), `last_port_check`, `last_tempo_log`, `clock_source_shown`, `pedals_down`,
    `thru_keys` and `thru_pedals`. It feeds
    `timekeeper.clock`; the player's keys, pedal and counters go to `shared` under its lock;
    `echoes` has a lock of its own (the scheduler thread writes it)."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        scheduler: Scheduler,
        recorder: Recorder,
        shared: SharedState,
        timekeeper: Timekeeper,
        commands: queue.SimpleQueue[Command],
        jack_server: JackServerWatch | None = None,
    ) -> None:
        self._settings = settings  # the session's current settings (replaced whole by Session.update)
        self.scheduler = scheduler
        self.recorder = recorder
        self.shared = shared
        self.timekeeper = timekeeper
        self.commands = commands
        self.echoes = EchoMemory()  # what we sent: an input note matching one is our own echo
        self.last_activity = 0.0  # when the player last played (monotonic seconds)
        self.last_port_check = 0.0
        self.last_tempo_log = 0.0
        self.clock_source_shown = FREE  # the clock source last logged
        self.jack_server = jack_server  # the session's watch of its JACK server (None: not on JACK)
        self.midi_gone: str | None = None  # the line that said the MIDI system went away, once logged
        # What was taken down and must be let up whatever the settings say now (thru turned off, or
        # another input channel, while a key or the pedal is down): see `_ends_what_was_taken`, `_thru`
        self.pedals_down: set[int] = set()  # channels whose pedal went down through this filter
        self.thru_keys: set[tuple[int, int]] = set()  # (channel, pitch) passed thru, not released yet
        self.thru_pedals: set[int] = set()  # channels whose pedal went down thru

    @property
    def settings(self) -> Settings:
        return self._settings()

    def listen(self, midi_in: MidiInput, midi_out: MidiOutput, stopping: threading.Event) -> None:
        """The input thread: poll the input, check the ports now and then, hear every message."""
        while not stopping.is_set():
            item = midi_in.get(timeout=0.05)
            now = time.monotonic()
            if now - self.last_port_check > PORT_CHECK_S:
                self.last_port_check = now
                self._check_ports(now, (midi_in, midi_out))
            if item is None:
                continue
            try:
                self.hear(*item)
            except Exception:
                self.shared.count_error()
                self.shared.warn("input error: " + traceback.format_exc(limit=2).strip().splitlines()[-1])

    def _check_ports(self, now: float, ports: tuple[MidiInput, MidiOutput]) -> None:
        """The MIDI system gone, a port that vanished or came back, a change of clock source
        (logged), the tempo (journaled)."""
        if self.midi_gone is not None:
            return
        if self.jack_server is not None and self.jack_server.gone.is_set():
            self._midi_system_gone(self.jack_server.reason)
            return
        for port in ports:
            try:
                line = port.check()
            except Exception as error:  # a backend hiccup must not end input
                line = f"port check failed: {error}"
            if line:
                self.shared.warn(line)
        source, timeline, midi_bpm = self.timekeeper.source(now)
        if source != self.clock_source_shown:
            self.clock_source_shown = source
            self.shared.info(describe_source(source, timeline, midi_bpm, now))
        bpm = timeline.bpm if source == LINK else midi_bpm
        if bpm is not None and now - self.last_tempo_log > TEMPO_LOG_S:
            self.last_tempo_log = now
            self.recorder.record_tempo(now, bpm)

    def _midi_system_gone(self, reason: str) -> None:
        """The JACK server stopped or died: nothing comes in or goes out any more (its ports never
        say so: jack_server.JackServerWatch). The model's sounding notes are ended in the take (the output
        sends nothing now) and the model pauses, so the take ends with what was heard; the line
        goes to the log once, and headless play saves and exits on it (Session.midi_gone)."""
        self.scheduler.silence()  # at once, as a barge-in does (the engine thread's pause does it again)
        self.commands.put(Pause(True))
        line = (
            f"the JACK server went away ({reason or 'no reason given'}): no MIDI in or out from here on, "
            "the model is paused; the take so far is kept (quitting saves it): start JACK, then LivePerceiver again"
        )
        self.shared.warn(line)
        self.midi_gone = line

    def hear(self, when: float, message: list[int]) -> None:
        """One incoming message: classify, filter, and pass on. Anything unknown is ignored."""
        if not message:
            return
        status = message[0]
        if status >= 0xF0:
            change = self.timekeeper.clock.feed(status, message[1:], when)
            if change == "stop":
                self.scheduler.silence()
                self.commands.put(Transport(running=False, when=when, source=MIDI_CLOCK))
            elif change in ("start", "continue"):
                self.commands.put(Transport(running=True, when=when, source=MIDI_CLOCK))
            return
        kind, channel = status & 0xF0, status & 0x0F
        if len(message) < 3 or kind not in (0x80, 0x90, 0xB0) or any(b > 127 for b in message[1:3]):
            return
        settings = self.settings
        number, value = message[1], message[2]
        if settings.in_channel and channel != settings.in_channel - 1:
            if not self._ends_what_was_taken(kind, channel, number, value):
                return
        shared = self.shared
        if kind == 0xB0:
            if number == 64:
                (self.pedals_down.add if value >= 64 else self.pedals_down.discard)(channel)
                self._player(when, message, PlayerPedal(when, value, channel))
                with shared.lock:
                    shared.pedal_down = value >= 64
            elif number in (120, 123):  # all sound/notes off from the player's side
                tag, _ = self.scheduler.silence()
                self.commands.put(Rollback(cut_at=when, tag=tag, keep_sounding=False))
                with shared.lock:
                    released = sorted(shared.held)
                    shared.held.clear()
                for held_channel, pitch in released:
                    self._player(when, [0x80 | held_channel, pitch, 0], PlayerNoteOff(when, pitch, held_channel))
            return
        is_on = kind == 0x90 and value > 0
        if is_on or not self._holds(channel, number):  # the release of a held key is the player's
            if self.echoes.is_echo(when, is_on, channel, number, value):
                with shared.lock:
                    shared.suppressed += 1
                return
        if is_on:
            if settings.mode == "call":  # barge-in: the answer stops at once
                tag, _ = self.scheduler.silence()
                self.commands.put(Rollback(cut_at=when, tag=tag, keep_sounding=False))
            elif settings.mode == "duet":  # the look-ahead goes; what sounds rings on
                tag, _ = self.scheduler.silence(notes_off=False)
                self.commands.put(Rollback(cut_at=when, tag=tag, keep_sounding=True))
            with shared.lock:
                shared.held.add((channel, number))
            self._player(when, message, PlayerNoteOn(when, number, channel, value))
        else:
            with shared.lock:
                shared.held.discard((channel, number))
            self._player(when, message, PlayerNoteOff(when, number, channel))

    def _holds(self, channel: int, pitch: int) -> bool:
        with self.shared.lock:
            return (channel, pitch) in self.shared.held

    def _ends_what_was_taken(self, kind: int, channel: int, number: int, value: int) -> bool:
        """The release of a key or pedal taken before the input channel changed: it still ends (else
        the key stays held, and call mode waits for it forever)."""
        if kind == 0xB0:
            return number == 64 and value < 64 and channel in self.pedals_down
        return (kind == 0x80 or value == 0) and self._holds(channel, number)

    def _thru(self, message: list[int]) -> bool:
        """Whether to pass `message` thru: when asked, and always the release of a key or pedal that
        went thru (thru turned off meanwhile, by hand or by a preset, would leave it held)."""
        kind, channel = message[0] & 0xF0, message[0] & 0x0F
        down = message[2] >= 64 if kind == 0xB0 else kind == 0x90 and message[2] > 0
        taken, item = (self.thru_pedals, channel) if kind == 0xB0 else (self.thru_keys, (channel, message[1]))
        if self.settings.thru:
            (taken.add if down else taken.discard)(item)
            return True
        if not down and item in taken:
            taken.discard(item)
            return True
        return False

    def _player(self, when: float, message: list[int], event: PlayerEvent) -> None:
        """The player's note or pedal: journal, thru, the roll and the count, then the engine thread."""
        self.last_activity = when
        self.recorder.record(PLAYER, when, message)
        if self._thru(message):
            self.scheduler.send_raw(list(message))
        if not isinstance(event, PlayerPedal):
            is_on = isinstance(event, PlayerNoteOn)
            with self.shared.lock:
                self.shared.roll.append((when, is_on, event.pitch, "player"))
                self.shared.notes_in += is_on
        self.commands.put(event)
