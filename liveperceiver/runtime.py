"""Process-wide settings, made once by an entry point (`play`, `bench`, `eval`, `train`, `continue`),
never by a library class: torch's thread count, the garbage collector, the GIL switch interval, stop
signals and the final exit. Each of these changes the whole process, so a library that set them would
surprise whoever embeds it (evaluate once built an Engine per piece, and each one reset the threads).
The entry points also check their `--device` flag here (`checked_device`), once, before any work.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch

REALTIME_SWITCH_INTERVAL_S = 0.0005  # GIL hand-over interval while a live session runs (Python's default: 5 ms)


def set_torch_threads(threads: int) -> None:
    """Torch's intra-op thread count. One is the live default: per-token matrices are small, and on a
    2-core machine a second OpenMP thread is slower and, under load (a DAW, the MIDI thread), its
    spin-waits made steps 10x slower."""
    import torch

    most = 4 * (os.cpu_count() or 1)  # far more crashed torch (100,000: a segfault)
    if not 1 <= threads <= most:
        raise ValueError(f"threads {threads} must be 1 .. {most} (4 per processor here)")
    torch.set_num_threads(threads)


_heap_frozen = False  # between freeze_heap and thaw_heap: a session plays
_thresholds_before: tuple[int, int, int] | None = None  # the collector's thresholds before freeze_heap
_freeze_asked = False  # freeze_heap_soon while a session plays: the scheduler freezes in a gap

# While a session plays, the scheduler thread collects the garbage in the gaps between its events
# (scheduler.GapCollector); the collector's own automatic collections stay as a safety net, far
# rarer than Python's (every 700 new objects): they come only when 50,000 objects were made between
# two turns of the scheduler's loop (a model loading) or the scheduler is not running.
SESSION_GC_THRESHOLDS = (50_000, 10, 10)


def freeze_heap() -> None:
    """Move every object alive now (torch, the model, the UI's widgets) out of the garbage collector's
    reach: a full collection otherwise scans them all while holding the GIL, and stalled the
    scheduler thread for 80-120 ms with the UI running (measured by `bench --live`). And leave the
    collections of what comes after to the scheduler's gaps (SESSION_GC_THRESHOLDS): with the UI
    drawing, the automatic ones came every 20 ms or so and delayed a note by up to 15 ms when one
    fell on its time (`bench --live`'s duet with the UI, output jitter max). Calling it again (the UI
    freezes its widgets once mounted) freezes what came since."""
    global _heap_frozen, _thresholds_before
    gc.collect()
    gc.freeze()
    if not _heap_frozen:
        _thresholds_before = gc.get_threshold()
        gc.set_threshold(*SESSION_GC_THRESHOLDS)
    _heap_frozen = True


def freeze_heap_soon() -> None:
    """`freeze_heap` for what came since a session froze the heap (the UI's widgets, once mounted),
    without stalling the music: its full collection held the GIL for 8-16 ms (`bench --live`), so
    while a session plays the scheduler thread runs it in a gap between its events
    (scheduler.GapCollector) and then freezes (`freeze_collected`); with no session playing, now."""
    global _freeze_asked
    if _heap_frozen:
        _freeze_asked = True
    else:
        freeze_heap()


def freeze_asked() -> bool:
    """Whether `freeze_heap_soon` waits for the scheduler's full collection."""
    return _freeze_asked


def freeze_collected() -> None:
    """Called by the scheduler thread after the full collection `freeze_heap_soon` asked for:
    freeze what survived it (unless the session closed meanwhile: frozen objects would stay)."""
    global _freeze_asked
    if _heap_frozen and _freeze_asked:
        gc.freeze()
    _freeze_asked = False


def thaw_heap() -> None:
    """Undo `freeze_heap` when a session closes: frozen objects are never collected, so without this
    every closed session (its engine buffers, its threads' cycles) would stay in memory for good
    (`bench --live` grew by 50 MB per fault session); the automatic collections come back."""
    global _heap_frozen, _thresholds_before, _freeze_asked
    _freeze_asked = False
    gc.unfreeze()
    if _thresholds_before is not None:
        gc.set_threshold(*_thresholds_before)
        _thresholds_before = None
    _heap_frozen = False


def heap_frozen() -> bool:
    """Whether `freeze_heap` holds now (the scheduler then collects in its gaps). Not
    gc.get_freeze_count(): it counts the frozen objects one by one, milliseconds holding the GIL
    (asked at every collection, it stalled the music by 10 ms)."""
    return _heap_frozen


@contextmanager
def realtime_switch_interval(interval_s: float = REALTIME_SWITCH_INTERVAL_S) -> Iterator[None]:
    """The scheduler and input threads wait for the GIL behind the engine thread; Python's default
    5 ms switch interval would delay each note by up to 5 ms, so hand the GIL over sooner while a
    session runs, then restore the interval."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, interval_s))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def stop_event_on_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> threading.Event:
    """An event set by any of `signums`, for a loop (headless play) or a front end (the UI) that then
    stops cleanly: notes off, the take saved (only the main thread may install handlers, so only an
    entry point calls this). A SIGHUP the process was started ignoring stays ignored: `nohup
    liveperceiver play --headless` must outlive its terminal. (SIGINT is ignored too in a job a
    script starts in the background, and there it must still stop the session.)"""
    done = threading.Event()
    for signum in signums:
        if signum != getattr(signal, "SIGHUP", None) or signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, lambda *_: done.set())
    return done


def exit_now(code: int = 0) -> NoReturn:
    """Exit once everything is saved and every note is off, skipping interpreter teardown: with torch
    loaded it can take longer than the one second a SIGTERM allows on a loaded machine, and it would
    free (and so unregister) the JACK ports the session left open."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def configure_inference(threads: int = 1, device: str = "cpu", dtype: str = "float32") -> None:
    """Set up the process for streaming inference, once, before the first engine step: torch's
    threads, and oneDNN off for float32 on a CPU, where the engine's one-row matmuls and GELU run
    faster on torch's own kernels (results differ only by rounding: GELU's two kernels by about 5e-7).
    Other dtypes and devices keep oneDNN (bfloat16 needs it)."""
    import torch

    set_torch_threads(threads)
    if device == "cpu" and dtype == "float32":
        torch.backends.mkldnn.enabled = False


def checked_device(requested: str = "auto") -> torch.device:
    """The torch.device a `--device` flag names (auto: cuda, then mps, then the CPU, as the engine's
    pick_device), or one line saying this machine has no such device, before any model is loaded
    (torch would otherwise fail deep inside the first `.to(device)`, with a traceback)."""
    import torch

    from liveperceiver.core.errors import UserError
    from liveperceiver.inference.engine import pick_device

    try:
        device = pick_device(requested)
    except RuntimeError as error:
        raise UserError(f"--device {requested}: not a device ({str(error).splitlines()[0]})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            sees = f"sees {count} CUDA device{'s' if count != 1 else ''}" if count else "sees no CUDA device"
            raise UserError(f"--device {requested}: torch {torch.__version__} {sees} here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {requested}: torch {torch.__version__} sees no Apple GPU (MPS) here")
    return device
