"""A private JACK server (dummy driver) for tests, and a test keyboard/listener over real JACK ports.

Import the fixture into a test module with `from tests.jack_fixture import jack_server  # noqa: F401`.
The server has its own name (`lp-test-<n>`, see `liveperceiver.testing.jack.private_jack_server`), set in
JACK_DEFAULT_SERVER for every client in this process and its children, so tests never touch a user's
JACK server.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from pathlib import Path

import pytest

from liveperceiver.live import ports
from liveperceiver.runtime import realtime_switch_interval
from liveperceiver.testing.jack import JackPlayer, private_jack_server
from tests.conftest import require_command


@pytest.fixture(scope="module")
def jack_server():
    """The name of a running private JACK server, one per test module (without jackd: skips the test,
    or fails it in CI). Module scope, not session: each module that imports the fixture gets its own
    instance anyway, and JACK_DEFAULT_SERVER names the one started last; with session scope a
    module's tests that ran after another module's (`pytest a.py::t1 b.py::t2 a.py::t3`) opened
    their ports on the other module's server while the fixture named their own."""
    yield from _private_jack()


@pytest.fixture
def fresh_jack_server():
    """A private JACK server for one test only: no clients or ports left over from earlier tests."""
    yield from _private_jack()


def _private_jack():
    require_command("jackd", "Debian/Ubuntu: apt install jackd2")  # skips here, fails in CI
    os.environ.setdefault("JACK_NO_START_SERVER", "1")
    # the GIL hand-over interval a session runs with under play (runtime.realtime_switch_interval)
    with private_jack_server("lp-test", period=512) as name, realtime_switch_interval():
        yield name


JACK_PERIOD = 512 / 48000  # the private server's period (_private_jack)


def play_timeline(keys: Keyboard, events: list[tuple[float, list[int]]]) -> None:
    """Send each (monotonic time, message) at its time, in time order: clock pulses and the player's
    notes on one timeline from one thread (a phrase played between pulses would hold them back and
    bend the session's tempo line)."""
    for due, message in sorted(events):
        while time.monotonic() < due:
            time.sleep(0.0005)
        keys.send(message)


def assert_onsets_on_grid(onsets: list[float], origin: float, step: float, pulse: float) -> None:
    """The model's note-ons, stamped as the scheduler sent them, land on the grid of `step` seconds
    through the first pulse sent (`origin`), a little after it: the pulses reach the session a JACK
    period late at most and the scheduler adds its jitter. Nine in ten within -3..+J+10 ms, the median
    within 0..J+3, none off by more than a pulse and a period (a grid counted a pulse off, or a tempo
    line bent by late pulses, fails these; unquantised onsets spread over the whole step). Why not every
    note within the tight bound: on a shared 2-core machine a thread now and then does not run in time."""
    assert len(onsets) >= 2, onsets
    residuals_ms = [((when - origin + step / 2) % step - step / 2) * 1000 for when in onsets]
    off_grid = [
        (round(when - origin, 3), round(r, 1))
        for when, r in zip(onsets, residuals_ms, strict=True)
        if not -3 <= r <= JACK_PERIOD * 1000 + 10
    ]
    report = (off_grid, len(onsets))  # (seconds after the first pulse, ms off the grid), of how many
    assert len(off_grid) <= len(onsets) / 10, report
    assert 0 <= statistics.median(residuals_ms) <= JACK_PERIOD * 1000 + 3, report
    assert all(abs(r) <= (pulse + JACK_PERIOD) * 1000 for r in residuals_ms), report


def wait_for(predicate, timeout: float = 5.0, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class Keyboard(JackPlayer):
    """The test's musician: a JACK client that plays into a port and listens to another."""

    def __init__(self, play_into: str | None = ports.VIRTUAL_IN, listen_to: str | None = ports.VIRTUAL_OUT):
        super().__init__("lp-test", play_into, listen_to)

    def note(self, pitch: int, velocity: int = 90, channel: int = 0) -> float:
        return self.send([0x90 | channel, pitch, velocity])

    def off(self, pitch: int, channel: int = 0) -> float:
        return self.send([0x80 | channel, pitch, 0])

    def phrase(self, pitches: list[int], step: float = 0.12, length: float = 0.1) -> float:
        """Play notes one after another; returns the time of the last note-off."""
        last = time.monotonic()
        for pitch in pitches:
            self.note(pitch)
            time.sleep(length)
            last = self.off(pitch)
            time.sleep(max(0.0, step - length))
        return last

    def note_ons(self, since: float = 0.0) -> list[tuple[float, list[int]]]:
        return [(t, m) for t, m in self.messages(since) if m[0] & 0xF0 == 0x90 and m[2] > 0]

    def balance(self) -> int:
        """Note-ons minus note-offs heard (per channel and pitch, summed); 0 means nothing stuck."""
        return note_balance([m for _, m in self.messages() if len(m) == 3 and m[0] & 0xF0 in (0x80, 0x90)])


def journal_notes(journal: Path) -> list[list[int]]:
    """The note messages LivePerceiver sent, from its session journal (M lines)."""
    notes = []
    for line in Path(journal).read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[1] == "M":
            message = list(bytes.fromhex(parts[2]))
            if len(message) == 3 and message[0] & 0xE0 == 0x80:
                notes.append(message)
    return notes


def note_balance(messages: list[list[int]]) -> int:
    """Note-ons minus note-offs (per channel and pitch, never below zero), summed."""
    sounding: dict[tuple[int, int], int] = {}
    for m in messages:
        key = (m[0] & 0x0F, m[1])
        if m[0] & 0xF0 == 0x90 and m[2] > 0:
            sounding[key] = sounding.get(key, 0) + 1
        else:
            sounding[key] = max(0, sounding.get(key, 0) - 1)
    return sum(sounding.values())


def no_stuck_notes(keys: Keyboard, journal: Path, timeout: float = 3.0) -> bool:
    """Every note LivePerceiver started has ended, as heard by `keys` and as sent (journal).

    On a CPU-starved machine the JACK dummy server can lose or repeat MIDI events of a late client.
    Then (and only then: the heard notes differ from the sent ones) the heard check is waived with a
    warning and the sent side must still balance; a stuck note that JACK delivered faithfully fails.
    """
    if wait_for(lambda: keys.balance() == 0, timeout):
        time.sleep(0.3)  # let the journal flush
        return note_balance(journal_notes(journal)) == 0
    time.sleep(0.3)
    sent = journal_notes(journal)
    if note_balance(sent) != 0:
        return False
    heard = [m for _, m in keys.messages() if len(m) == 3 and m[0] & 0xE0 == 0x80]
    if heard == sent:
        return False
    warnings.warn("JACK altered MIDI in transit on this loaded machine; only the sent side was checked", stacklevel=2)
    return True
