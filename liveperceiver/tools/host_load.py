"""What the host did while a benchmark phase ran, beside our own timings: the share of CPU time
the hypervisor took (steal: on a shared VM the p99 rows move with it, so a reader can tell a slow run
from slow code), and the garbage collector's pauses (each holds the GIL, so every thread of a live
session, the scheduler's too, waits it out). Used by `bench --live` (live_bench.py), its entry point.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from liveperceiver.runtime import heap_frozen


@contextmanager
def collection_pauses() -> Iterator[dict]:
    """Times every garbage collection while it is open (gc.callbacks, process-wide: this entry
    point's); the dict it yields is filled on exit, per generation: count and longest pause (ms) of
    the collections that ran while a session's heap was frozen (runtime.freeze_heap: while it
    plays), and of those between sessions (`between_sessions`: loading, closing, a closed session
    becoming garbage), which no note waits for."""
    pauses: dict[bool, dict[int, list[float]]] = {True: {0: [], 1: [], 2: []}, False: {0: [], 1: [], 2: []}}
    started = [0.0, False]

    def timing(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = time.perf_counter(), heap_frozen()
        else:
            pauses[started[1]][info["generation"]].append((time.perf_counter() - started[0]) * 1000)

    def counted(by_generation: dict[int, list[float]]) -> dict:
        return {
            f"generation_{generation}": {"count": len(times), "longest_ms": round(max(times, default=0.0), 3)}
            for generation, times in by_generation.items()
        }

    summary: dict = {}
    gc.callbacks.append(timing)
    try:
        yield summary
    finally:
        gc.callbacks.remove(timing)
        summary.update(counted(pauses[True]), between_sessions=counted(pauses[False]))


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) CPU time of all cores in clock ticks, from /proc/stat; None off Linux."""
    try:
        first_line = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(value) for value in first_line[1:9]]  # user .. steal (guest time is inside user)
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def with_host_load(phase) -> dict:
    """Run a phase; its result gains `cpu_steal_share`, the share of CPU time the hypervisor took,
    and `garbage_collections` (collection_pauses) while it ran."""
    before = cpu_times()
    with collection_pauses() as collections:
        result = phase()
    after = cpu_times()
    total = None if before is None or after is None else after[1] - before[1]
    result["cpu_steal_share"] = round((after[0] - before[0]) / total, 4) if total else None
    result["garbage_collections"] = collections
    return result
