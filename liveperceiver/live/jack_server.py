"""The JACK server as libjack shows it to us: whether one runs, a watch that hears it go, and the
bookkeeping of this process's graph changes that `ports.unregister` waits out (its docstring says why).

Our own clients (the probe, the watch) use the system's libjack through ctypes; python-rtmidi's ports
use the copy its wheel bundles, which never tells them the server went away (JackServerWatch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

WATCH_CLIENT = b"LivePerceiver watch"  # the watch's JACK client (it has no ports)
JACK_GRACE_S = 0.1  # time JACK work in flight gets to finish: a process cycle, a graph change's notifications
JACK_NO_START_SERVER = 0x01
# No process cycle for this long and the server is stalled (hung, or stopped by SIGSTOP), not gone.
# Above a starved dummy driver's gaps on a loaded 2-core machine; below what a listener waits out.
STALL_S = 0.5

# --------------------------------------------------------------------------- graph changes

graph_lock = threading.Lock()  # one JACK port unregistered at a time in this process (ports.unregister)
_last_graph_change = 0.0  # time.monotonic() of this process's last JACK graph change; any thread sets it


def jack_graph_changed() -> None:
    """Note a JACK graph change this process made or saw: a client opened or closed, a port
    registered, connected or gone. `ports.unregister` waits until JACK_GRACE_S after the last one."""
    global _last_graph_change
    _last_graph_change = time.monotonic()


def wait_for_quiet_jack_graph() -> None:
    """Sleep until JACK_GRACE_S has passed since this process's last JACK graph change (one noted
    meanwhile by another thread, the UI's port listing say, moves the end)."""
    while (left := _last_graph_change + JACK_GRACE_S - time.monotonic()) > 0:
        time.sleep(left)


# --------------------------------------------------------------------------- our own clients


_LibjackMessage = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_LibjackShutdown = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def _message_sink() -> _LibjackMessage:
    """What libjack gets as its message functions: libc's strlen, a C function that reads the
    message and does nothing else. Why not a Python callback: libjack calls it on its own threads up
    to the process's exit (`play` leaves its ports to the exit), where a Python thunk would need the
    GIL of an interpreter that may be finalizing; and a thunk freed after one call crashed the next
    client's open in this process. Without a C library to look in (Windows), a Python no-op."""
    try:
        return ctypes.cast(ctypes.CDLL(None).strlen, _LibjackMessage)  # the process's symbols: libc's
    except (OSError, TypeError, AttributeError):
        return _LibjackMessage(lambda message: None)


_SILENCE = _message_sink()  # kept for the life of the process: libjack keeps the pointer it is given


@functools.cache
def _libjack() -> ctypes.CDLL | None:
    """The system's libjack (not the copy python-rtmidi's wheel bundles: our own clients only), its
    messages silenced, or None without one. The bundled copy's messages are silenced too."""
    _silence_bundled_libjack()
    path = ctypes.util.find_library("jack")
    if path is None:
        return None
    try:
        jack = ctypes.CDLL(path)
    except OSError:
        return None
    jack.jack_set_error_function(_SILENCE)
    jack.jack_set_info_function(_SILENCE)
    jack.jack_client_open.restype = ctypes.c_void_p
    jack.jack_client_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    jack.jack_client_close.argtypes = [ctypes.c_void_p]
    jack.jack_on_info_shutdown.argtypes = [ctypes.c_void_p, _LibjackShutdown, ctypes.c_void_p]
    for frames in (jack.jack_frame_time, jack.jack_last_frame_time, jack.jack_get_sample_rate):
        frames.restype = ctypes.c_uint32
        frames.argtypes = [ctypes.c_void_p]
    return jack


def _silence_bundled_libjack() -> None:
    """Silence the libjack python-rtmidi's wheel bundles for its ports. Why: it prints to stderr,
    and when the server goes away it prints six lines ("Cannot read socket fd = 10 ...",
    "JackSocketClientChannel read fail") across the terminal UI just as the session's own line says
    what happened (JackServerWatch). A python-rtmidi built against the system's libjack has no
    bundled copy: `_libjack` silences that one. libjack's message functions are process-wide, with
    no per-client hook: they are set once, on the first use of JACK (`_libjack`), not per session."""
    import rtmidi

    site = Path(rtmidi.__file__).resolve().parent.parent  # the wheel's libraries: python_rtmidi.libs, or python_rtmidi.
    for path in sorted(site.glob("python_rtmidi*/libjack*.so*")):
        try:  # only the copy rtmidi loaded (RTLD_NOLOAD: a leftover file is not loaded for nothing)
            jack = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            jack.jack_set_error_function(_SILENCE)
            jack.jack_set_info_function(_SILENCE)
        except (OSError, AttributeError):
            continue


def _open_jack_client(name: bytes) -> int | None:
    """A JACK client of our own with no ports, on a running server only (None if none answers)."""
    jack = _libjack()
    if jack is None:
        return None
    status = ctypes.c_int(0)
    client = jack.jack_client_open(name, JACK_NO_START_SERVER, ctypes.byref(status))
    if client:
        jack_graph_changed()  # a client came
    return client or None


def _close_jack_client(client: int) -> None:
    _libjack().jack_client_close(client)
    jack_graph_changed()  # a client went


def jack_server_running() -> bool:
    """True when a JACK server answers (asks libjack directly, never starts a server)."""
    client = _open_jack_client(b"lp-probe")
    if client is None:
        return False
    _close_jack_client(client)
    return True


class JackServerWatch:
    """Notices the JACK server going away while a session runs on it.

    Why: python-rtmidi's JACK clients never hear of it. Their port listings stay as they were (our
    virtual ports included), and a send goes into a ring buffer that no process cycle empties any
    more; once it is full (about 2,300 notes) RtMidi spins in `send_message` for good, and the
    session's output thread with it. So the session keeps a client of its own, with no ports, whose
    shutdown callback libjack calls on its own thread when the server stops or dies (within a few
    milliseconds here); the output stops sending and the input thread reports it (`gone`).

    Tested with JACK2 (jackd2 and the system's libjack): its client thread hears the server go
    without the client being activated, so the watch never joins the process graph. Other JACK
    implementations may tell only an activated client (not tried here).

    It also tells a server that still runs but has stopped running process cycles (`stalled`):
    libjack's frame time goes on with the clock, the frame time of the last cycle does not.

    Threads: libjack's thread sets `gone`; any thread reads it and asks `stalled`; the session's
    closing thread calls `close` (or leaves the watch to the process's exit: `leave_to_exit`).
    Without libjack or a server it watches nothing (`watching` False)."""

    def __init__(self) -> None:
        self.gone = threading.Event()
        self.reason = ""
        self._key = next(_watch_keys)
        self._lock = threading.Lock()  # no libjack call on the client while close() frees it
        self._client = _open_jack_client(WATCH_CLIENT)
        self._stall_frames: int | None = None  # None: stalls are not told (see _cycles_seen)
        if self._client is not None:
            _watches[self._key] = self
            jack = _libjack()
            jack.jack_on_info_shutdown(self._client, _ON_SHUTDOWN, self._key)
            if self._cycles_seen():
                self._stall_frames = round(jack.jack_get_sample_rate(self._client) * STALL_S)

    def _cycles_seen(self, timeout: float = 0.25) -> bool:
        """Whether this (never activated) client sees the server's cycles go by: the frame time of
        the last cycle moves within `timeout`. JACK2 shows it to every client; an implementation
        that showed it only to active clients would look stalled for good and silence the output,
        so without it stalls are not told (a server that runs no cycle now could not be used either)."""
        jack = _libjack()
        first = jack.jack_last_frame_time(self._client)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.005)
            if jack.jack_last_frame_time(self._client) != first:
                return True
        return False

    @property
    def watching(self) -> bool:
        return self._client is not None

    def _shutdown(self, reason: bytes | None) -> None:
        """libjack's thread: the server stopped or died (reason: its words, e.g. "JACK server has been closed")."""
        self.reason = (reason or b"").decode(errors="replace").strip()
        self.gone.set()

    def stalled(self) -> bool:
        """True while the server runs but has run no process cycle for STALL_S: hung (a stuck
        driver), or stopped (SIGSTOP). Nothing sent reaches a listener then, and RtMidi's queue only
        fills (StallGuard). Two reads of the server's shared memory: cheap enough for every send."""
        with self._lock:
            client = self._client
            if client is None or self._stall_frames is None or self.gone.is_set():
                return False
            jack = _libjack()
            last = jack.jack_last_frame_time(client)
            behind = (jack.jack_frame_time(client) - last) & 0xFFFFFFFF  # 32-bit frame counters, wrapping
        # Read as signed: a cycle that began before its predicted time, or one published between the
        # two reads, puts the estimate a little behind the last cycle; after a stall it lags far behind.
        return self._stall_frames < behind < 1 << 31

    def close(self) -> None:
        """Close the watching client (on a server that went away too: libjack frees it). Safe twice."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            _close_jack_client(client)
            _watches.pop(self._key, None)

    def leave_to_exit(self) -> None:
        """Keep the client open until the process exits, which must follow (`play`). Why: closing a
        JACK2 client cancels its thread, the one that runs the shutdown callback; a server stopping
        at that moment (a logout stops JACK and LivePerceiver together) would have the thread
        cancelled inside Python."""
        with self._lock:
            self._client = None  # registered in _watches, so nothing is freed before the exit


_watches: dict[int, JackServerWatch] = {}  # by key: the watches whose clients are open
_watch_keys = itertools.count(1)


def _on_shutdown(code: int, reason: bytes | None, key: int | None) -> None:
    """libjack's thread: the server of the watch registered under `key` went away."""
    watch = _watches.get(key or 0)
    if watch is not None:
        watch._shutdown(reason)


# One callback for every watch, kept for the life of the process (libjack keeps the pointer: a
# watch dropped without close() must not free it); the watch is found by the key libjack passes back.
_ON_SHUTDOWN = _LibjackShutdown(_on_shutdown)


class StallGuard:
    """Drops MIDI out while the JACK server is stalled, and ends afterwards what that left sounding.

    Why: RtMidi queues each message for the next process cycle, and a stalled server runs none.
    Once RtMidi's ring buffer is full (about 2,300 notes) `send_message` spins, holding the GIL,
    until the server runs again (measured: a SIGSTOPped jackd held the sender for as long as it
    was stopped), and the whole session with it: no UI, no save. Messages queued meanwhile would
    also all sound at once, late, when it runs again (those of the STALL_S before the stall is told
    still do). So the output sends nothing while the watch says `stalled` (MidiOutput.send); when
    the server runs again, each note whose note-on went out before the stall and whose note-off was
    dropped during it gets its note-off, and each sustain pedal left down likewise its release
    (`catch_up`), so nothing is left sounding.

    Threads: the scheduler thread's (MidiOutput.send and catch_up run under the output's lock)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.stall_seen = False  # messages were dropped in a stall that catch_up has not ended yet
        self.dropped = 0
        self._queued: tuple[set, set] = (set(), set())  # (channel, pitch) sounding, channels pedalled
        self._intended: tuple[set, set] = (set(), set())  # as every message sent or dropped leaves them

    def queued(self, message: list[int]) -> None:
        """`message` goes to RtMidi."""
        _follow(self._queued, message)
        _follow(self._intended, message)

    def dropped_in_stall(self, message: list[int]) -> None:
        """`message` is dropped: the server is stalled."""
        if not self.stall_seen:
            self.stall_seen, self.dropped = True, 0
            self.log(
                f"the JACK server has run no process cycle for {STALL_S:g} s: MIDI out is dropped until it runs again"
            )
        self.dropped += 1
        _follow(self._intended, message)

    def catch_up(self) -> list[list[int]]:
        """After a stall, with the server running again: the note-offs and pedal releases the
        stall dropped for what had gone out before it (to send now: they count as queued)."""
        if not self.stall_seen:
            return []
        self.stall_seen = False
        (notes, pedals), (wanted_notes, wanted_pedals) = self._queued, self._intended
        owed = [[0x80 | channel, pitch, 0] for channel, pitch in sorted(notes - wanted_notes)]
        owed += [[0xB0 | channel, 64, 0] for channel in sorted(pedals - wanted_pedals)]
        for message in owed:
            _follow(self._queued, message)
        self.log(
            f"the JACK server runs again: MIDI out goes on ({self.dropped} messages were dropped, "
            f"{len(owed)} notes and pedals ended)"
        )
        return owed


def _follow(state: tuple[set, set], message: list[int]) -> None:
    """Update (notes sounding, pedals down) by one channel message."""
    if len(message) != 3:
        return
    notes, pedals = state
    status, channel = message[0] & 0xF0, message[0] & 0x0F
    if status == 0x90 and message[2] > 0:
        notes.add((channel, message[1]))
    elif status in (0x80, 0x90):
        notes.discard((channel, message[1]))
    elif status == 0xB0 and message[1] == 64:
        (pedals.add if message[2] >= 64 else pedals.discard)(channel)
    elif status == 0xB0 and message[1] in (120, 123):  # all sound off, all notes off
        notes.difference_update({note for note in notes if note[0] == channel})
    elif status == 0xB0 and message[1] == 121:  # reset all controllers: the pedal too
        pedals.discard(channel)
