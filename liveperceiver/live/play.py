"""`liveperceiver play`: the entry point of a live session, headless or with an injected front end.

The process-wide settings are made here, once, and nowhere in the session (runtime.py says why each
one matters): torch's threads and kernels before the engine is built, the GIL switch interval and
the heap freeze while the session runs, the stop signals and the final exit. The Textual
UI is a front end the command line passes in (`front_end=liveperceiver.ui.run_ui`): live never
imports ui.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from liveperceiver.core.errors import UserError
from liveperceiver.live.session import Session
from liveperceiver.live.settings import Settings
from liveperceiver.live.snapshot import LiveSession
from liveperceiver.runtime import (
    checked_device,
    configure_inference,
    exit_now,
    freeze_heap,
    realtime_switch_interval,
    stop_event_on_signals,
    thaw_heap,
)

# Signals that stop a session cleanly (notes off, the take saved): a terminal closed or an ssh
# connection lost sends SIGHUP. The UI reads its own Ctrl-C (the terminal is in raw mode).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
UI_STOP_SIGNALS = tuple(signum for signum in STOP_SIGNALS if signum != signal.SIGINT)
EXIT_NOT_SAVED = 4  # play's exit status when the take's MIDI file could not be written (the journal stays)
LIVE_THREADS = 1  # torch threads for live inference (runtime.set_torch_threads says why one)
LOG_POLL_S = 0.05  # headless: how often the session's new log lines are printed
EXIT_MIDI_GONE = 3  # headless play's exit status when the MIDI system went away (2 is a user's mistake)


def settings_from_args(args) -> Settings:
    """The preset (or the defaults) with the command-line flags that were given on top."""
    from liveperceiver.live import presets

    settings = presets.load_preset(args.preset, default_model=args.model) if args.preset else Settings()
    in_channel = None
    if args.in_channel is not None:
        in_channel = 0 if args.in_channel == "all" else _int_flag("--in-channel", args.in_channel)
    flags = dict(
        mode=args.mode,
        model=args.model,
        silence_ms=args.silence_ms,
        response_seconds=args.response_seconds,
        temperature=args.temperature,
        top_p=args.top_p,
        num_latents=args.num_latents,
        key_follow=args.key_follow,
        adapt=getattr(args, "adapt", None),
        dynamics_follow=getattr(args, "dynamics_follow", None),
        density_follow=getattr(args, "density_follow", None),
        density_ratio=getattr(args, "density_ratio", None),
        in_channel=in_channel,
        out_channel=args.out_channel,
        link=True if getattr(args, "link", False) else None,
        link_quantum=getattr(args, "link_quantum", None),
    )
    return presets.apply_overrides(settings, **flags)


def _int_flag(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} {text!r} must be a number or 'all'") from None


@contextmanager
def realtime_process() -> Iterator[None]:
    """The process-wide settings while a session runs: the GIL handed over sooner, the heap frozen
    (runtime.realtime_switch_interval and runtime.freeze_heap say why); undone afterwards, so that a
    closed session becomes garbage again. `bench --live` runs its sessions the same way."""
    with realtime_switch_interval():
        freeze_heap()
        try:
            yield
        finally:
            thaw_heap()


def _print_new_log_lines(session: Session, shown: int) -> int:
    """Print the log lines added since `shown` lines were printed; returns the new count."""
    lines, total = session.log_since(shown)
    for line in lines:
        print(line, flush=True)
    return total


def run_play(args, front_end: Callable[[LiveSession, threading.Event], object] | None = None) -> NoReturn:
    """Open the ports and play until the front end returns (the UI quits), or headless until
    SIGINT/SIGTERM/SIGHUP or the MIDI system goes away (the JACK server stopped); SIGTERM and SIGHUP
    make the UI quit too. Then the one way out of a live session: close it (notes off, take saved,
    JACK ports left open), say where the take is, and exit: 0, EXIT_MIDI_GONE when the MIDI system
    went away, EXIT_NOT_SAVED when no MIDI file could be written (the journal keeps the take)."""
    code = 0
    stop = stop_event_on_signals(STOP_SIGNALS if front_end is None else UI_STOP_SIGNALS)
    settings = settings_from_args(args)
    configure_inference(threads=LIVE_THREADS, device=checked_device(args.device).type, dtype=args.dtype)
    session = Session(
        settings,
        model=settings.model,
        api=args.midi_api,
        in_port=args.in_port,
        out_port=args.out_port,
        session_dir=args.session_dir,
        record_path=args.record,
        device=args.device,
        weights=args.weights,
        dtype=args.dtype,
        link_tempo=getattr(args, "link_tempo", None),
    )
    with realtime_process():
        try:
            if front_end is None:
                session.start()
                print(
                    f"LivePerceiver {settings.mode}: in {session.midi_in.name!r}, out {session.midi_out.name!r}",
                    flush=True,
                )
                print(f"journal: {session.recorder.path}  (Ctrl-C to stop and save)", flush=True)
                shown = 0  # headless, the session's log goes to stdout (port lost, model errors, ...)
                while not stop.wait(LOG_POLL_S):
                    gone = session.midi_gone()  # read before printing: its line is in the log by then
                    shown = _print_new_log_lines(session, shown)
                    if gone:
                        code = EXIT_MIDI_GONE
                        break
            else:
                session.start()
                front_end(session, stop)  # its quit closes the session the same way (Session.close's default)
        finally:
            saved = session.close()
    for line in session.close_warnings:  # the UI that showed them is gone; headless stopped printing
        print(f"warning: {line}", file=sys.stderr, flush=True)
    if saved:
        print(f"saved {saved}", flush=True)
    else:
        journal = session.recorder.path
        print(
            f"no MIDI file saved: the take is in {journal} (`liveperceiver recover {journal.parent} -o take.mid`)",
            file=sys.stderr,
            flush=True,
        )
        code = EXIT_NOT_SAVED
    exit_now(code)
