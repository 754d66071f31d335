"""A stress loop for libjack's unregister race (`ports.unregister`): `python -m liveperceiver.testing.jack_stress`.

Each round opens a client with no port and a client whose input port is connected to a sink, then
closes the first client and at once the second's port: what a test's musician (`JackPlayer.close`)
or a session's two ports do. With `--raw` the port is closed straight through rtmidi, as before the
quiet rule. The finding is a crash of the process itself (a segfault), so run it as a process of its
own, with `python -X faulthandler`; it prints the rounds done as it goes.
"""

from __future__ import annotations

import argparse
import os
import time

import rtmidi

from liveperceiver.live.jack_server import jack_graph_changed
from liveperceiver.live.ports import release
from liveperceiver.testing.jack import private_jack_server


def stress(seconds: float, raw: bool, report_every: int = 500) -> int:
    """Rounds of open-open-close-close on a private JACK server for `seconds`; returns the rounds."""
    os.environ.setdefault("JACK_NO_START_SERVER", "1")
    with private_jack_server("lp-stress", period=512):
        sink = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name="lp-stress-sink")
        sink.open_virtual_port("sink")
        rounds = 0
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                idle = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name="lp-stress-idle")
                listener = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name="lp-stress-ears")
                listener.open_port(0)
                jack_graph_changed()
                if raw:
                    idle.delete()
                    listener.close_port()
                    listener.delete()
                else:
                    release(idle)
                    release(listener)
                rounds += 1
                if rounds % report_every == 0:
                    print(f"{rounds} rounds", flush=True)
        finally:
            release(sink)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--raw", action="store_true", help="close ports straight through rtmidi (no quiet rule)")
    args = parser.parse_args()
    rounds = stress(args.seconds, args.raw)
    print(f"done: {rounds} rounds in {args.seconds:g} s ({'raw' if args.raw else 'quiet rule'}), no crash")


if __name__ == "__main__":
    main()
