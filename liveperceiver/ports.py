"""MIDI ports: backend choice, virtual or named ports, listing, input stamping and reconnect.

Stage 1 of the live data flow (ports -> stream encoder -> engine -> scheduler -> ports). We talk to
python-rtmidi directly (raw byte lists, no message objects on the real-time path):

- `MidiInput` stamps every message with `time.monotonic()` inside the backend's callback and puts
  `(time, bytes)` on a queue; nothing else happens on the backend thread.
- `MidiOutput.send()` is called by the scheduler thread only.
- A port attached by name (`--in/--out`) is checked with `check()` from a housekeeping thread; when
  it vanishes this is reported once, and when a port of that name returns it is reopened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import sys
import threading
import time
from collections.abc import Callable

import rtmidi

from liveperceiver.errors import UserError

VIRTUAL_IN = "LivePerceiver In"
VIRTUAL_OUT = "LivePerceiver Out"
CLIENT_NAME = "LivePerceiver"

API_IDS = {
    "alsa": rtmidi.API_LINUX_ALSA,
    "jack": rtmidi.API_UNIX_JACK,
    "coremidi": rtmidi.API_MACOSX_CORE,
    "windows": rtmidi.API_WINDOWS_MM,
}
API_CHOICES = ("auto", *API_IDS)

StampedMessage = tuple[float, list[int]]  # (time.monotonic() seconds, raw MIDI bytes)


# --------------------------------------------------------------------------- which APIs work here


def jack_server_running() -> bool:
    """True when a JACK server answers (asks libjack directly, never starts a server)."""
    path = ctypes.util.find_library("jack")
    if path is None:
        return False
    try:
        jack = ctypes.CDLL(path)
    except OSError:
        return False
    silence = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(lambda message: None)
    jack.jack_set_error_function(silence)
    jack.jack_set_info_function(silence)
    jack.jack_client_open.restype = ctypes.c_void_p
    jack.jack_client_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    jack.jack_client_close.argtypes = [ctypes.c_void_p]
    status = ctypes.c_int(0)
    no_start_server = 0x01
    client = jack.jack_client_open(b"lp-probe", no_start_server, ctypes.byref(status))
    if not client:
        return False
    jack.jack_client_close(client)
    return True


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
    try:
        return midi_in.get_ports(), midi_out.get_ports()
    finally:
        midi_in.delete()
        midi_out.delete()


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


class _Port:
    """Shared open/check/close logic; `wanted` None means our own virtual port."""

    direction = ""

    def __init__(self, api: str, wanted: str | None, virtual_name: str, log: Callable[[str], None]):
        self.api = api
        self.wanted = wanted
        self.virtual_name = virtual_name
        self.log = log
        self.lock = threading.Lock()  # guards self.port against check() reopening it during use
        try:
            self.port = self._new()
        except rtmidi.RtMidiError as error:  # e.g. the JACK server went away after resolve_api()
            raise UserError(
                f"cannot open a {api} MIDI {self.direction} client ({error}): {_install_hint(api)}"
            ) from None
        self.connected_name: str | None = None
        if wanted is None:
            try:
                self.port.open_virtual_port(virtual_name)
            except rtmidi.RtMidiError as error:
                self.port.delete()
                raise UserError(f"cannot create the virtual MIDI port {virtual_name!r} ({error})") from None
            self.connected_name = virtual_name
        else:
            index = match_port(self.port.get_ports(), wanted)
            if index is None:
                available = ", ".join(self.port.get_ports()) or "none"
                self.port.delete()
                raise UserError(f"no MIDI {self.direction} port matches {wanted!r}; available: {available}")
            self._open(index)

    def _new(self):
        raise NotImplementedError

    def port_names(self) -> list[str]:
        with self.lock:
            return self.port.get_ports()

    def _open(self, index: int) -> None:
        name = self.port.get_ports()[index]
        self.port.open_port(index, self.virtual_name)
        self.connected_name = name
        self._after_open()

    def _after_open(self) -> None:
        pass

    @property
    def name(self) -> str:
        return self.connected_name or f"{self.wanted} (disconnected)"

    def check(self) -> str | None:
        """Notice a named port that vanished or came back; returns a log line on a change."""
        if self.wanted is None:
            return None
        with self.lock:
            names = self.port.get_ports()
            if self.connected_name is not None and self.connected_name not in names:
                self.port.close_port()
                lost, self.connected_name = self.connected_name, None
                return f"{self.direction} port {lost!r} vanished; waiting for it to return"
            if self.connected_name is None:
                try:
                    index = match_port(names, self.wanted)
                except UserError:
                    return None
                if index is not None:
                    self._open(index)
                    return f"{self.direction} port {self.connected_name!r} reconnected"
        return None

    def close(self) -> None:
        with self.lock:
            self.port.close_port()
            self.port.delete()
            self.connected_name = None


class MidiInput(_Port):
    """An input port whose callback only stamps and queues (see module docstring)."""

    direction = "input"

    def __init__(self, api: str, wanted: str | None = None, log: Callable[[str], None] = print):
        self.queue: queue.SimpleQueue[StampedMessage] = queue.SimpleQueue()
        super().__init__(api, wanted, VIRTUAL_IN, log)

    def _new(self):
        port = rtmidi.MidiIn(API_IDS[self.api], name=VIRTUAL_IN if self.wanted is None else CLIENT_NAME)
        port.ignore_types(sysex=True, timing=False, active_sense=True)  # keep MIDI clock
        port.set_callback(self._callback)
        port.set_error_callback(self._error)
        return port

    def _after_open(self) -> None:
        self.port.set_callback(self._callback)  # closing a port cancels its callback

    def _callback(self, event, data=None) -> None:
        self.queue.put((time.monotonic(), event[0]))

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

    def __init__(self, api: str, wanted: str | None = None, log: Callable[[str], None] = print):
        super().__init__(api, wanted, VIRTUAL_OUT, log)

    def _new(self):
        port = rtmidi.MidiOut(API_IDS[self.api], name=VIRTUAL_OUT if self.wanted is None else CLIENT_NAME)
        port.set_error_callback(lambda kind, message, data=None: self.log(f"output port error: {message}"))
        return port

    def send(self, message: list[int]) -> bool:
        """Send raw bytes now; False when the port is disconnected (the message is dropped)."""
        with self.lock:
            if self.connected_name is None:
                return False
            self.port.send_message(message)
            return True


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
