"""`bench --live`'s Ableton Link phase, in the child process that `live_bench.link_in_namespace` starts
inside a private network namespace (Link multicasts on every interface; loopback alone keeps the
measurement to this machine): a second Link peer stands in for the DAW and changes its tempo halfway,
and each answer's onsets are measured against that peer's beat grid, as sent and as heard.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from liveperceiver.core.errors import UserError
from liveperceiver.live.settings import Settings
from liveperceiver.runtime import configure_inference, realtime_switch_interval, thaw_heap
from liveperceiver.testing.jack import private_jack_server
from liveperceiver.tools.host_load import with_host_load
from liveperceiver.tools.live_bench import BenchEngine, Player, is_note_on, ms, wait_until

LINK_HEAD_START_S = 1.0  # the peer's session is the older one: Link keeps its timeline (and tempo)
LINK_TEMPI = (100.0, 128.0)  # the peer's tempo, changed halfway through the calls


class LinkPeer:
    """The DAW: a Link peer of its own in this process, with the asyncio loop aalink calls back through."""

    def __init__(self, bpm: float, quantum: int = 4) -> None:
        from liveperceiver.live.link import require_aalink

        aalink = require_aalink()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="lp-bench-peer", daemon=True).start()

        async def make():
            return aalink.Link(bpm)

        self.link = asyncio.run_coroutine_threadsafe(make(), self.loop).result(5)
        self.link.quantum = quantum
        self.link.enabled = True

    def line(self) -> tuple[float, float, float]:
        """(monotonic time, the peer's beat then, its tempo): its grid until the tempo changes."""
        before = time.monotonic()
        beat = self.link.beat
        after = time.monotonic()
        return (before + after) / 2, beat, self.link.tempo

    def close(self) -> None:
        self.link.enabled = False
        time.sleep(0.15)
        self.loop.call_soon_threadsafe(self.loop.stop)


def off_grid(lines: list[tuple[float, float, float]], when: float, every: float) -> float:
    """Seconds from `when` to the nearest multiple of `every` beats of the peer's grid then (+: after)."""
    at, beat, bpm = next(line for line in reversed(lines) if line[0] <= when)
    beats = (beat + (when - at) * bpm / 60) / every
    return (beats - round(beats)) * every * 60 / bpm


def link_phase(model, rng: random.Random, calls: int, workdir: Path, engine: BenchEngine = BenchEngine()) -> dict:
    """Calls answered on the peer's beat (answer_on beat, quantise 1/8); the peer changes tempo halfway."""
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        raise UserError(f"the Link phase runs only where loopback is the one network interface, not {names}")
    peer = LinkPeer(LINK_TEMPI[0])
    time.sleep(LINK_HEAD_START_S)
    session = engine.session(
        model,
        workdir / "link",
        mode="call",
        silence_ms=300,
        response_seconds=1.5,
        quantize="1/8",
        link=True,
        answer_on="beat",
        seed=rng.randrange(1 << 30),
    )
    settings = session.settings
    player = Player()
    first_sent, first_heard, answered = [], [], 0
    try:
        if not wait_until(lambda: session.snapshot().link.peers == 1, 10):
            raise UserError("bench --live: the session's Link did not find the peer within 10 s")
        lines = [peer.line()]
        started = time.monotonic()
        for index in range(calls):
            if index == calls // 2:
                peer.link.tempo = LINK_TEMPI[1]
                lines.append(peer.line())
            last_off = player.phrase(rng, rng.randrange(3, 7))
            if not wait_until(lambda t=last_off: player.first_on_after(t) is not None, settings.response_seconds + 2):
                continue
            answered += 1
            with session.lock:
                sent = min(w for w, on, _, who in session.roll if who == "model" and on and w >= last_off)
            first_sent.append(off_grid(lines, sent, 1.0))
            first_heard.append(off_grid(lines, player.first_on_after(last_off), 1.0))
            wait_until(lambda: session.runs.decoder is None and not session.scheduler.pending_count(), 3)
            time.sleep(0.2)
        with session.lock:
            sent_onsets = [w for w, on, _, who in session.roll if who == "model" and on and w >= started]
        heard_onsets = [t for t, m in player.messages(started) if is_note_on(m)]
        result = {
            "calls": calls,
            "answered": answered,
            "tempi_bpm": list(LINK_TEMPI),
            "first_note_sent": ms(first_sent),
            "first_note_heard": ms(first_heard),
            "onsets_sent": ms([off_grid(lines, t, 0.5) for t in sent_onsets]),
            "onsets_heard": ms([off_grid(lines, t, 0.5) for t in heard_onsets]),
        }
    finally:
        session.close(release_ports=True)
        thaw_heap()
        player.close()
        peer.close()
    return result


def link_phase_main(argv: list[str]) -> int:
    """The child of `link_in_namespace`: its own private JACK server, the model, the Link phase."""
    from liveperceiver.core.checkpoint import load_model
    from liveperceiver.inference.engine import pick_device

    parser = argparse.ArgumentParser(prog="python -m liveperceiver.tools.link_bench")
    parser.add_argument("--link-phase", action="store_true", required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--num-latents", default=Settings.num_latents)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model")
    args = parser.parse_args(argv)
    faulthandler.enable()
    configure_inference(threads=args.threads, device=pick_device().type)  # as play: the session's device
    model = load_model(args.model).model
    engine = BenchEngine(args.weights, args.num_latents)
    try:
        with (
            private_jack_server("lp-bench-link"),
            tempfile.TemporaryDirectory(prefix="lp-bench-") as tmp,
            realtime_switch_interval(),
        ):
            result = with_host_load(lambda: link_phase(model, random.Random(1), args.calls, Path(tmp), engine))
    except UserError as error:
        print(f"bench --live, Link phase: {error}", file=sys.stderr)
        return 2
    args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(link_phase_main(sys.argv[1:]))
