"""The input reader thread: polls an rtmidi MidiIn and stamps each message as it arrives (ports.py's
`MidiInput` runs one per input port, the test musician of testing/jack.py one for its ears).

Threads: each `InputReader` owns its thread, which alone reads the port until `stop()` returns.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

StampedMessage = tuple[float, list[int]]  # (time.monotonic() seconds, raw MIDI bytes)
POLL_S = 0.0005  # how often an input is read when idle: adds at most this to a message's stamp
POLLER_NICE = 10  # the input readers' nice value (lower_thread_priority)


def lower_thread_priority(nice: int) -> None:
    """Give the calling thread a nice value (Linux; lowering priority needs no permission).

    Why for the input readers: a normal-priority thread that wakes every POLL_S on a 2-core machine
    made the real-time output thread wait for the GIL for up to 20-30 ms at p99 (measured with a
    busy engine thread; niced, 1.5-3 ms). The price: with both cores busy a niced reader can wake
    later, and a message's stamp lags by that much. The live bench's reaction and barge-in rows start
    at the stamp, so they do not show it; its barge-in "heard" row, timed from the player's send, does."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass


class InputReader:
    """Reads an rtmidi MidiIn from a thread of ours and stamps each message as it arrives.

    Why not python-rtmidi's callback: it runs Python on the backend's thread, so JACK's process cycle
    waits for the GIL and runs late (a late client reads port buffers the next cycle has rewritten:
    lost or repeated MIDI), and cancelling the callback while a message is in flight frees the data
    that thread is about to use (a segfault on close, seen in CI). Polling keeps the backend thread in
    C, where rtmidi only queues the message; the price is at most POLL_S added to a stamp.
    """

    def __init__(self, midi_in, deliver: Callable[[StampedMessage], None], name: str):
        self._midi_in = midi_in
        self._deliver = deliver
        self._running = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lower_thread_priority(POLLER_NICE)
        read = self._midi_in.get_message
        while self._running:
            message = read()
            if message is None:
                time.sleep(POLL_S)
            else:
                self._deliver((time.monotonic(), message[0]))

    def stop(self) -> None:
        """Returns once the thread no longer touches the port: call it before closing or deleting it."""
        self._running = False
        self._thread.join()
