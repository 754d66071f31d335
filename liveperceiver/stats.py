"""The one percentile every figure uses (live meters, `bench`, `bench --live`): nearest rank, so a
reported p99 is a value that was measured, never an interpolation between two."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 99)) -> tuple[float | None, ...]:
    """Nearest-rank percentiles of `values` for each q in 0..100 (None when there are no values)."""
    data = sorted(values)
    if not data:
        return tuple(None for _ in qs)
    return tuple(data[min(len(data) - 1, max(0, round(q / 100 * len(data)) - 1))] for q in qs)


def percentile(values: Iterable[float], q: float) -> float:
    """One nearest-rank percentile (q in 0..100) of a non-empty collection."""
    (value,) = percentiles(values, (q,))
    if value is None:
        raise ValueError("percentile of no values")
    return value
