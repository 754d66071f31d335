"""MIDI ports: backend choice, virtual or named ports, listing, input stamping and reconnect.

Stage 1 of the live data flow (ports -> stream encoder -> engine -> scheduler -> ports). We talk to
python-rtmidi directly (raw byte lists, no message objects on the real-time path):

- `MidiInput` reads its port from a thread of ours (input_reader.py's `InputReader`), stamps every
  message with `time.monotonic()` as it arrives and puts `(time, bytes)` on a queue. The backend's own thread (JACK's
  process cycle) never runs Python: see `InputReader` for why.
- `MidiOutput.send()` is called by the scheduler thread only.
- A port attached by name (`--in/--out`) is checked with `check()` from the session's input thread; when
  it vanishes this is reported once, and when a port of that name returns it is reopened.
- On JACK a `JackServerWatch` (jack_server.py) hears the server stop or die (the ports themselves
  never tell); the output then sends nothing and the session's input thread reports it.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable

import rtmidi

from liveperceiver.core.errors import UserError
from liveperceiver.live.input_reader import InputReader, StampedMessage
from liveperceiver.live.jack_server import (
    JACK_GRACE_S,
    JackServerWatch,
    StallGuard,
    graph_lock,
    jack_graph_changed,
    jack_server_running,
    wait_for_quiet_jack_graph,
)

VIRTUAL_IN = "LivePerceiver In"
VIRTUAL_OUT = "LivePerceiver Out"
CLIENT_NAME = "LivePerceiver"
PROBE_S = 0.5  # how long the output check waits for its probe byte
PROBE_ATTEMPTS = 3  # reopenings of a silent JACK output at start (its client never ran a cycle)

API_IDS = {
    "alsa": rtmidi.API_LINUX_ALSA,
    "jack": rtmidi.API_UNIX_JACK,
    "coremidi": rtmidi.API_MACOSX_CORE,
    "windows": rtmidi.API_WINDOWS_MM,
}
API_CHOICES = ("auto", *API_IDS)

LISTING_ATTEMPTS = 5  # port_names(): listings tried while ports come and go
OPEN_ATTEMPTS = 5  # _Port._open_matching(): openings of a named port while ports come and go


# --------------------------------------------------------------------------- which APIs work here


def api_available(name: str) -> bool:
    """Compiled into python-rtmidi and usable right now on this machine."""
    if API_IDS[name] not in rtmidi.get_compiled_api():
        return False
    if name == "alsa":
        return os.path.exists("/dev/snd/seq")
    if name == "jack":
        return jack_server_running()
    return True


def available_apis() -> list[str]:
    return [name for name in API_IDS if api_available(name)]


def resolve_api(name: str = "auto") -> str:
    """The API to use: `auto` tries ALSA, JACK, CoreMIDI, Windows in that order."""
    if name != "auto":
        if name not in API_IDS:
            raise UserError(f"unknown MIDI API {name!r} (choose one of {', '.join(API_CHOICES)})")
        if not api_available(name):
            raise UserError(f"MIDI API {name!r} is not available here: {_install_hint(name)}")
        return name
    for candidate in API_IDS:
        if api_available(candidate):
            return candidate
    raise UserError("no MIDI system available: " + _install_hint("auto"))


def _install_hint(name: str) -> str:
    hints = {
        "alsa": "the ALSA sequencer needs /dev/snd/seq (load the snd-seq kernel module)",
        "jack": "start a JACK server (e.g. `jackd -d alsa` or `jackd --no-realtime -d dummy`)",
        "coremidi": "CoreMIDI exists only on macOS",
        "windows": "the Windows MIDI API exists only on Windows",
    }
    if name != "auto":
        return hints[name]
    if sys.platform.startswith("linux"):
        return "load the ALSA sequencer (modprobe snd-seq) or start a JACK server (`jackd -d alsa`)"
    return "install python-rtmidi with a MIDI backend for this system"


# --------------------------------------------------------------------------- listing and matching


def list_ports(api: str) -> tuple[list[str], list[str]]:
    """(input port names, output port names) that `api` sees now."""
    midi_in = rtmidi.MidiIn(API_IDS[api], name=f"{CLIENT_NAME} list")
    midi_out = rtmidi.MidiOut(API_IDS[api], name=f"{CLIENT_NAME} list")
    jack_graph_changed()  # two clients opened
    try:
        return port_names(midi_in), port_names(midi_out)
    finally:
        release(midi_in)
        release(midi_out)


def port_names(port) -> list[str]:
    """`port.get_ports()`, listed again when a port vanished mid-listing: python-rtmidi asks for the
    count, then for each name by number, and a JACK port can go in between (InvalidPortError; seen
    in a full test run while a starting session's probe port closed; a client with an error
    callback of its own, as a session's, gets None for that name instead)."""
    for _ in range(LISTING_ATTEMPTS - 1):
        try:
            names = port.get_ports()
            if None not in names:
                return names
        except rtmidi.InvalidPortError:
            pass
        time.sleep(0.01)
    return [name for name in port.get_ports() if name is not None]


def open_confirmed(port, names: list[str], index: int, port_name: str) -> list[str] | None:
    """Open `port` on names[index] (a listing of its own) by index, as rtmidi must, and list again:
    None when that index still holds that name, else (a port came or went since the listing, so
    another opened, or none) closed again, and the new listing to match anew."""
    try:
        port.open_port(index, port_name)
    except rtmidi.InvalidPortError:  # past the ports by then, for a client without an error callback of its own
        pass
    jack_graph_changed()
    listed = port_names(port)
    if index < len(listed) and listed[index] == names[index]:
        return None
    unregister(port)
    return listed


def match_port(names: list[str], wanted: str) -> int | None:
    """Index of the port named exactly `wanted`, else of the only port containing it; None if absent.

    Raises UserError when the substring is ambiguous (the user must say which).
    """
    if wanted in names:
        return names.index(wanted)
    hits = [i for i, name in enumerate(names) if wanted.lower() in name.lower()]
    if len(hits) > 1:
        raise UserError(f"port name {wanted!r} is ambiguous: {', '.join(names[i] for i in hits)}")
    return hits[0] if hits else None


# --------------------------------------------------------------------------- ports


def release(port) -> None:
    """Close and free an rtmidi MidiIn/MidiOut (again: nothing); never use it afterwards.

    Closing first unregisters the port (see `unregister`) right after a process cycle ends (rtmidi's
    JACK output waits for one), so later cycles return before touching anything. An open JACK output
    then gets JACK_GRACE_S before it is freed: RtMidi 5.0 (in python-rtmidi 1.5.8) frees its ring
    buffer before it stops the client's process thread, and a late cycle still reading that buffer
    would crash the process. Freeing closes the client: a graph change.
    """
    if port.is_deleted:
        return
    was_open = port.is_port_open()
    is_jack = port.get_current_api() == rtmidi.API_UNIX_JACK
    unregister(port)
    if was_open and is_jack and isinstance(port, rtmidi.MidiOut):
        time.sleep(JACK_GRACE_S)
    port.delete()
    if is_jack:
        jack_graph_changed()


def unregister(port) -> None:
    """`close_port()`; an open JACK port only once the graph has been quiet for JACK_GRACE_S.

    Why: libjack (JACK2, as python-rtmidi's wheel bundles it) removes a port from its client's list
    without a lock in jack_port_unregister, while the client's notification thread walks that list
    to recompute latencies after any graph change on the server (jack2 issue #216; gdb put a crash
    in JackClient::HandleLatencyCallback). The notifications come a cycle or two after a change, so
    a port closed right after another client closed (a test's or the bench's musician closing its
    two clients, a session its two ports) could remove it while they ran: a segfault, seen in CI.
    Changes by other processes cannot be timed this way; `_Port.close` leaves `play`'s ports to
    the process's exit for that reason. Registering a port adds to the same list unlocked; an
    append racing the walk frees nothing, and opens are not delayed.
    """
    if not port.is_port_open() or port.get_current_api() != rtmidi.API_UNIX_JACK:
        port.close_port()
        return
    with graph_lock:
        wait_for_quiet_jack_graph()
        port.close_port()
        jack_graph_changed()


LEFT_TO_EXIT: list = []  # JACK ports a closing session leaves open for its process's exit (_Port.close)


class _Port:
    """Shared open/check/close logic; `wanted` None means our own virtual port."""

    direction = ""
    virtual_name = ""  # our virtual port's name (and its client's)

    def __init__(
        self,
        api: str,
        wanted: str | None = None,
        log: Callable[[str], None] = print,
        lister=None,
        open_now: bool = True,
        server: JackServerWatch | None = None,
    ):
        """`wanted`: a port to attach to by name, None for our own virtual port; `lister`: the
        session's client of the other direction (open_virtual); `server`: the session's watch of its
        JACK server (None: not watched)."""
        self.api = api
        self.wanted = wanted
        self.server = server
        self.log = log
        self.lock = threading.Lock()  # guards self.port against check() reopening it during use
        self.connected_name: str | None = None
        self.registered_name: str | None = None  # our virtual port's full JACK name, when known
        self.closed = False  # set by close(): check() leaves the port alone from then on
        self.port = self._new_client()
        if open_now:
            self.open(lister)

    def open(self, lister=None) -> None:
        """Open our virtual port, or connect to the wanted one (UserError, leaving nothing open)."""
        if self.wanted is None:
            self.open_virtual(lister)
            return
        names = port_names(self.port)
        try:
            opened = self._open_matching(names)
        except UserError:  # an ambiguous name
            release(self.port)
            raise
        if not opened:
            names = port_names(self.port)
            release(self.port)  # never use the client after this
            if match_port(names, self.wanted) is not None:
                raise UserError(
                    f"MIDI {self.direction} ports kept changing while {self.wanted!r} was opened; try again"
                )
            available = ", ".join(names) or "none"
            raise UserError(f"no MIDI {self.direction} port matches {self.wanted!r}; available: {available}")

    def _new(self):
        raise NotImplementedError

    def _new_client(self):
        try:
            port = self._new()
            jack_graph_changed()  # a client opened
            return port
        except rtmidi.RtMidiError as error:  # e.g. the JACK server went away after resolve_api()
            raise UserError(
                f"cannot open a {self.api} MIDI {self.direction} client ({error}): {_install_hint(self.api)}"
            ) from None

    def open_virtual(self, lister=None) -> None:
        """Open our virtual port on this port's client (raises UserError, leaving nothing open).

        `lister`: the session's client of the other direction, whose `get_ports()` lists ports of
        our kind; the port that appears there is ours, under the name JACK registered (a second
        instance's client is renamed `LivePerceiver In-01`). No extra client is opened for it:
        every JACK client opened and closed is one more exposure to libjack's races (see close)."""
        try:
            before = port_names(lister) if lister is not None and self.api == "jack" else None
            self.port.open_virtual_port(self.virtual_name)
            jack_graph_changed()
            after = port_names(lister) if before is not None else []
        except rtmidi.RtMidiError as error:
            release(self.port)
            raise UserError(f"cannot create the virtual MIDI port {self.virtual_name!r} ({error})") from None
        new = [name for name in after if name not in (before or []) and name.endswith(":" + self.virtual_name)]
        self.registered_name = new[0] if len(new) == 1 else None
        renamed = (
            self.registered_name is not None and self.registered_name != f"{self.virtual_name}:{self.virtual_name}"
        )
        self.connected_name = self.registered_name if renamed else self.virtual_name

    def _open_matching(self, names: list[str]) -> bool:
        """Open the port `wanted` matches in `names` (a listing of this client's); False when none
        does, or when the ports kept changing (`open_confirmed`, OPEN_ATTEMPTS tries)."""
        for _ in range(OPEN_ATTEMPTS):
            index = match_port(names, self.wanted)
            if index is None:
                return False
            relisted = open_confirmed(self.port, names, index, self.virtual_name)
            if relisted is None:
                self.connected_name = names[index]
                return True
            names = relisted
        return False

    def _before_close(self) -> None:
        pass

    @property
    def name(self) -> str:
        return self.connected_name or f"{self.wanted} (disconnected)"

    @property
    def connected(self) -> bool:
        """Open and reaching its MIDI system: False while a named port is gone or the JACK server
        is stalled, and for good once the server is gone (JackServerWatch)."""
        return self.connected_name is not None and not self._server_down()

    def _server_down(self) -> bool:
        server = self.server
        return server is not None and (server.gone.is_set() or server.stalled())

    def check(self) -> str | None:
        """Notice a named port that vanished or came back; returns a log line on a change."""
        if self.wanted is None:
            return None
        with self.lock:
            if self.closed:
                return None
            names = port_names(self.port)
            lost = self.connected_name if self.connected_name is not None and self.connected_name not in names else None
            if lost is not None:
                self.connected_name = None  # send() drops from here on
            elif self.connected_name is None:
                try:
                    if self._open_matching(names):
                        return f"{self.direction} port {self.connected_name!r} reconnected"
                except UserError:  # ambiguous now: wait until the user's port is the only match
                    return None
        if lost is None:
            return None
        if self.api == "jack":
            jack_graph_changed()  # the port's removal: its notifications may still be arriving
            wait_for_quiet_jack_graph()  # here, not under self.lock, where send() would wait with it
        with self.lock:
            if not self.closed:  # a close meanwhile decided what happens to the port (left to the exit, say)
                unregister(self.port)
        return f"{self.direction} port {lost!r} vanished; waiting for it to return"

    def close(self, release_port: bool = True) -> None:
        """Stop using the port and close it; with `release_port` False a JACK port is left to the
        process's exit (the caller exits next: `liveperceiver play`).

        Why: an unregister races libjack's latency notifications (see `unregister`); this process's
        own graph changes are waited out there, a change made by another program at that moment
        (a DAW connecting) cannot be. A process that exits with its client open leaves the removal
        to the server, and nothing walks a list that changes."""
        with self.lock:
            self.closed = True
            self._before_close()
            if release_port or self.api != "jack":
                release(self.port)
            else:
                LEFT_TO_EXIT.append(self.port)  # referenced, so never freed (and unregistered) before the exit
            self.connected_name = None


class MidiInput(_Port):
    """An input port that its `InputReader` thread polls, stamps and queues (see module docstring); `get`
    is called by the session's input thread."""

    direction = "input"
    virtual_name = VIRTUAL_IN

    def __init__(self, *args, **kwargs) -> None:
        """_Port's arguments; the reader thread starts once the port is open."""
        self.queue: queue.SimpleQueue[StampedMessage] = queue.SimpleQueue()
        super().__init__(*args, **kwargs)
        self.reader = InputReader(self.port, self._deliver, name="midi-in")

    def _deliver(self, stamped: StampedMessage) -> None:
        """The reader thread's: queue a message, unless a named port is not (yet) the one its name
        matched (`_open_matching` sets connected_name once it is): what a wrongly opened port sent is
        not the player's."""
        if self.wanted is None or self.connected_name is not None:
            self.queue.put(stamped)

    def _new(self):
        port = rtmidi.MidiIn(API_IDS[self.api], name=VIRTUAL_IN if self.wanted is None else CLIENT_NAME)
        port.ignore_types(sysex=True, timing=False, active_sense=True)  # keep MIDI clock
        port.set_error_callback(self._error)
        return port

    def _before_close(self) -> None:
        self.reader.stop()

    def _error(self, kind, message, data=None) -> None:
        self.log(f"input port error: {message}")

    def get(self, timeout: float | None = None) -> StampedMessage | None:
        """The next stamped message, or None after `timeout` seconds."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


class MidiOutput(_Port):
    """An output port; `send` is called by the scheduler thread only."""

    direction = "output"
    virtual_name = VIRTUAL_OUT

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stall_guard = StallGuard(self.log)  # used when the JACK server is watched (send, catch_up)

    def _new(self):
        port = rtmidi.MidiOut(API_IDS[self.api], name=VIRTUAL_OUT if self.wanted is None else CLIENT_NAME)
        port.set_error_callback(lambda kind, message, data=None: self.log(f"output port error: {message}"))
        return port

    def send(self, message: list[int]) -> bool:
        """Send raw bytes now; False when the port is disconnected or its JACK server is gone or
        stalled (the message is dropped: RtMidi would spin once its buffer filled, JackServerWatch;
        after a stall, StallGuard ends what it left sounding). A disconnected port is told without
        the lock, which check() holds while it reopens a named port (a reopening that opened the
        wrong port waits out the graph before it closes it: up to 0.1 s a try), so the scheduler
        never waits on it; the test is made again under the lock."""
        if self.connected_name is None:
            return False
        with self.lock:
            if self.connected_name is None:
                return False
            if self.server is not None:
                if self.server.gone.is_set():
                    return False
                if self.server.stalled():
                    self.stall_guard.dropped_in_stall(message)
                    return False
                self._send_owed()  # first: an owed note-off after a new note-on of its pitch would cut it
                self.stall_guard.queued(message)
            self.port.send_message(message)
            return True

    def catch_up(self) -> None:
        """After a stall of the JACK server, once it runs again: the note-offs and pedal releases
        the stall dropped (StallGuard). The scheduler thread calls it whenever it wakes, so they go
        out even when nothing else is sent."""
        with self.lock:
            if self.stall_guard.stall_seen and self.connected:
                self._send_owed()

    def _send_owed(self) -> None:
        """What the last stall owes, if any (StallGuard.catch_up); under self.lock."""
        for owed in self.stall_guard.catch_up():
            self.port.send_message(owed)

    def delivers(self, timeout: float = PROBE_S) -> bool | None:
        """Whether our JACK virtual output reaches a listener now: a private probe client connects to
        it and must hear one Active Sensing byte (harmless: nothing sounds yet). None when it cannot
        tell (not our JACK virtual port, several ports of that name, e.g. a second instance, or ports
        that kept coming and going while the probe opened: `open_confirmed`)."""
        if self.api != "jack" or self.wanted is not None:
            return None
        for _ in range(OPEN_ATTEMPTS):  # a new probe each time: one opened on another port may hold what it sent
            heard = threading.Event()
            probe = rtmidi.MidiIn(API_IDS[self.api], name=f"{CLIENT_NAME} probe")
            jack_graph_changed()
            probe.ignore_types(sysex=True, timing=True, active_sense=False)
            reader = InputReader(
                probe, lambda stamped, heard=heard: heard.set() if stamped[1] == [0xFE] else None, "midi-probe"
            )
            try:
                names = port_names(probe)
                ours = [index for index, name in enumerate(names) if name.endswith(":" + self.virtual_name)]
                if len(ours) != 1:
                    return None if ours else False
                if open_confirmed(probe, names, ours[0], f"{CLIENT_NAME} probe") is not None:
                    continue
                deadline = time.monotonic() + timeout
                while not heard.is_set() and time.monotonic() < deadline:
                    self.send([0xFE])
                    heard.wait(0.05)
                return heard.is_set()
            finally:
                reader.stop()
                release(probe)
        return None

    def ensure_delivery(self, attempts: int = PROBE_ATTEMPTS) -> bool | None:
        """Check our JACK virtual output at start and reopen it while it delivers nothing.

        Why: a JACK client was seen to hang before its first cycle in about 1 start in 5 on a busy
        2-core machine (the server logs it as "not finished, state = Triggered" every period); its
        port then swallows every note. A new client usually starts fine."""
        try:
            for _ in range(attempts):
                ok = self.delivers()
                if ok is None or ok:
                    return ok
                self.log(
                    f"output port {self.virtual_name!r} delivers nothing (its JACK client runs no cycle); reopening it"
                )
                with self.lock:
                    release(self.port)
                    # a session cannot run without its output: UserError (one line) if this fails;
                    # no lister here, so a renamed port's JACK name is not looked up again
                    self.port = self._new_client()
                    self.open_virtual()
            ok = self.delivers()
        except rtmidi.RtMidiError as error:  # the server went away mid-check: the session reports it later
            self.log(f"output port check failed: {error}")
            return None
        if ok is False:
            self.log(f"output port {self.virtual_name!r} still delivers nothing after {attempts} reopenings")
        return ok


def open_ports(
    api: str,
    in_port: str | None,
    out_port: str | None,
    log: Callable[[str], None],
    server: JackServerWatch | None = None,
) -> tuple[MidiInput, MidiOutput]:
    """A session's two ports. Both clients first, then our virtual ports, each while the other's
    client lists its kind (so both know the names JACK registered: `_Port.open_virtual`), then the
    named ones (so a name that matches our own virtual port is seen: `feedback_loop`). Nothing is
    left open on error. `server`: the session's JackServerWatch (the output sends nothing once the
    server is gone, and neither port counts as connected)."""
    midi_in = MidiInput(api, in_port, log=log, open_now=False, server=server)
    midi_out = None
    try:
        midi_out = MidiOutput(api, out_port, log=log, open_now=False, server=server)
        for port, other in sorted(
            ((midi_in, midi_out), (midi_out, midi_in)), key=lambda pair: pair[0].wanted is not None
        ):
            port.open(lister=other.port)
    except BaseException:
        midi_in.close()
        if midi_out is not None:
            midi_out.close()
        raise
    return midi_in, midi_out


def feedback_loop(midi_in: _Port, midi_out: _Port) -> tuple[str, bool] | None:
    """(a one-line problem, whether it is certain) when our output is routed into our input: every
    note we play would come straight back in. Certain when one of them is our own virtual port (its
    name known); likely when a named port only looks like LivePerceiver's (another instance's, or
    an API that does not tell us our port's full name)."""
    for named, virtual, flag, ours in (
        (midi_out, midi_in, "--out", VIRTUAL_IN),
        (midi_in, midi_out, "--in", VIRTUAL_OUT),
    ):
        if named.wanted is None or named.connected_name is None:
            continue
        if virtual.wanted is None and named.connected_name == virtual.registered_name:
            return (
                f"{flag} {named.wanted!r} is LivePerceiver's own {virtual.direction} port {named.connected_name!r}: "
                f"every note would loop straight back; route LivePerceiver Out to an instrument and your keyboard to LivePerceiver In",
                True,
            )
        if ours in named.connected_name:
            return (
                f"{flag} {named.wanted!r} ({named.connected_name!r}) looks like a LivePerceiver {ours.split()[-1].lower()} port: "
                "if it leads back into this one, notes loop (echoes within 30 ms are ignored, a delayed loop is not)",
                False,
            )
    return None


def format_port_listing() -> str:
    """Every available API with its input and output ports (the `ports` subcommand)."""
    lines = []
    apis = available_apis()
    if not apis:
        return "no MIDI system available: " + _install_hint("auto")
    for api in apis:
        inputs, outputs = list_ports(api)
        lines.append(f"{api}:")
        lines.append("  inputs (play into LivePerceiver with --in NAME):")
        lines += [f"    {name}" for name in inputs] or ["    (none)"]
        lines.append("  outputs (send LivePerceiver's notes with --out NAME):")
        lines += [f"    {name}" for name in outputs] or ["    (none)"]
    return "\n".join(lines)


def run_ports(args) -> None:
    """`liveperceiver ports`; with no MIDI system at all, one line says what to install or start."""
    if not available_apis():
        raise UserError("no MIDI system available: " + _install_hint("auto"))
    print(format_port_listing())
