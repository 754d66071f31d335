"""A private JACK server (dummy driver) and a scripted musician on it, for the tests and `bench --live`.

Neither belongs to a live session: a session uses whatever JACK server runs (live/ports.py); these
start one of our own, so a test or a benchmark never touches the user's, and play into and listen to
LivePerceiver's ports the way a keyboard and a DAW would.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import rtmidi

from liveperceiver.core.errors import UserError
from liveperceiver.live.input_reader import InputReader, StampedMessage
from liveperceiver.live.jack_server import jack_graph_changed, jack_server_running
from liveperceiver.live.ports import (
    VIRTUAL_IN,
    VIRTUAL_OUT,
    match_port,
    port_names,
    release,
)

JACK_SERVER_NAMES = 8  # JACK's registry holds 8 servers: private_jack_server's pool of names


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM when our process dies, even by a crash."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextmanager
def private_jack_server(prefix: str, period: int = 256) -> Iterator[str]:
    """A JACK dummy server of our own (bench --live, tests); JACK_DEFAULT_SERVER names it meanwhile.

    Names come from a small pool (`<prefix>-0`, `<prefix>-1`, ...), skipping servers that run: JACK's
    registry holds 8 servers and frees the entry of one that died uncleanly only when a server of that
    name starts again, so unique names per run would fill it for good after 8 crashes.
    """
    if shutil.which("jackd") is None:
        raise UserError("this needs a JACK server: install jackd2 (Debian/Ubuntu: apt install jackd2)")
    previous = os.environ.get("JACK_DEFAULT_SERVER")
    process = None
    try:
        for name in (f"{prefix}-{i}" for i in range(JACK_SERVER_NAMES)):
            os.environ["JACK_DEFAULT_SERVER"] = name
            if jack_server_running():
                continue
            process, output = _start_jackd(name, period)
            if process is not None:
                break
            if "Too many servers" in output:
                raise UserError(
                    f"jackd did not start: JACK's registry of {JACK_SERVER_NAMES} servers is full (entries of servers that "
                    "died); with no jackd running, `rm /dev/shm/jack-shm-registry` clears it"
                )
            if "already active" not in output:
                last = output.strip().splitlines()[-1] if output.strip() else "no output"
                raise UserError(f"jackd did not start: {last}")
        if process is None:
            raise UserError(f"no free JACK server name {prefix}-0..{JACK_SERVER_NAMES - 1}: stop some jackd")
        _running_servers[name] = process
        yield name
    finally:
        if process is not None:
            _running_servers.pop(name, None)
            killed = process.poll() == -signal.SIGKILL  # by stop_jack_server: a crash
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            if killed:  # its registry entry stays until a server of its name starts: start one, stop it cleanly
                again, _ = _start_jackd(name, period)
                if again is not None:
                    again.terminate()
                    again.wait(5)
        if previous is None:
            os.environ.pop("JACK_DEFAULT_SERVER", None)
        else:
            os.environ["JACK_DEFAULT_SERVER"] = previous


def stop_jack_server(name: str, signum: int = signal.SIGKILL, timeout: float = 5.0) -> None:
    """Stop a server `private_jack_server` started in this process as a crash (SIGKILL) or a
    user's stop (SIGTERM) would, and wait for it to end: tests of a session whose server goes away."""
    process = _private_server(name)
    process.send_signal(signum)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"the JACK server {name!r} still runs {timeout:g} s after signal {signum}") from None


@contextmanager
def paused_jack_server(name: str, limit_s: float = 30.0) -> Iterator[None]:
    """Stall a server `private_jack_server` started in this process (SIGSTOP: it still runs, but runs
    no process cycle, as a hung driver leaves it) until the block ends (SIGCONT, however it ends).

    A stopped process acts on no signal but SIGKILL, so if this process died inside the block (a run
    stopped by hand, a timeout), the server would stay stopped for good, its name taken, deaf to the
    SIGTERM it gets when we die (seen: a killed test run left one). A watchdog of its own session
    continues it after `limit_s` whatever happens here; the pending SIGTERM then ends it."""
    process = _private_server(name)
    watchdog = subprocess.Popen(
        ["sh", "-c", f"sleep {limit_s:g}; kill -CONT {process.pid}"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)
        os.killpg(watchdog.pid, signal.SIGKILL)  # its shell and its sleep: nothing is left behind
        watchdog.wait()


_running_servers: dict[str, subprocess.Popen] = {}  # private_jack_server's servers by name


def _private_server(name: str) -> subprocess.Popen:
    process = _running_servers.get(name)
    if process is None:
        raise UserError(f"no private JACK server {name!r} runs in this process")
    return process


def _start_jackd(name: str, period: int) -> tuple[subprocess.Popen | None, str]:
    """(the running jackd, "") or (None, what it printed before it failed)."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            ["jackd", "-n", name, "--no-realtime", "-d", "dummy", "-r", "48000", "-p", str(period)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal stops us, and we stop it
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 10
        while not jack_server_running():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait(5)
                log.seek(0)
                return None, log.read().decode(errors="replace")
            time.sleep(0.05)
    return process, ""


class JackPlayer:
    """A scripted musician on JACK: a client that plays into one port and records what another sends.

    The live benchmark and the tests drive LivePerceiver through it, over real ports. `heard` holds
    `(stamp, bytes)` as the client's `InputReader` stamped them (its own reader thread appends, under
    `lock`); `send` is called from the thread that plays."""

    def __init__(self, name: str, play_into: str | None = VIRTUAL_IN, listen_to: str | None = VIRTUAL_OUT):
        self.out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=f"{name}-keys")
        self.inp = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=f"{name}-ears")
        self.inp.ignore_types(sysex=True, timing=False, active_sense=True)
        jack_graph_changed()  # two clients opened
        self.heard: list[StampedMessage] = []
        self.lock = threading.Lock()
        self.reader = InputReader(self.inp, self._hear, name=f"{name}-ears")
        try:
            if play_into is not None:
                self.connect_out(play_into)
            if listen_to is not None:
                self.connect_in(listen_to)
        except BaseException:
            self.close()  # no JACK client or reader thread left behind
            raise

    def connect_out(self, name: str, timeout: float = 5.0) -> None:
        self.out.open_port(_wait_for_port(self.out, name, timeout))
        jack_graph_changed()

    def connect_in(self, name: str, timeout: float = 5.0) -> None:
        self.inp.open_port(_wait_for_port(self.inp, name, timeout))
        jack_graph_changed()

    def _hear(self, stamped: StampedMessage) -> None:
        with self.lock:
            self.heard.append(stamped)

    def send(self, message: list[int]) -> float:
        """Send now; returns the send time on the stamps' clock."""
        self.out.send_message(message)
        return time.monotonic()

    def messages(self, since: float = 0.0) -> list[StampedMessage]:
        with self.lock:
            return [(t, m) for t, m in self.heard if t >= since]

    def close(self) -> None:
        self.reader.stop()
        release(self.out)
        release(self.inp)


def _wait_for_port(port, name: str, timeout: float) -> int:
    """The index of the port matching `name`, waiting up to `timeout` s for it to appear."""
    deadline = time.monotonic() + timeout
    while (index := match_port(port_names(port), name)) is None:
        if time.monotonic() > deadline:
            raise UserError(f"MIDI port {name!r} did not appear within {timeout:g} s")
        time.sleep(0.005)
    return index
