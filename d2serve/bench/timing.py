"""Timing primitives: a monotonic clock, warm-up + repeats, and percentile summaries.

All durations are seconds from ``time.perf_counter`` unless a key says ``_ms``.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

from d2serve.errors import InputError

PERCENTILES = (50, 90, 99)


def now() -> float:
    """Monotonic wall clock in seconds (``time.perf_counter``)."""
    return time.perf_counter()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` with linear interpolation (numpy's default method).

    Raises:
        ValueError: ``values`` is empty or ``q`` is outside [0, 100].
    """
    if not len(values):
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} outside [0, 100]")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict:
    """Summary statistics of a sample, each multiplied by ``scale`` (e.g. 1000 for s -> ms).

    Returns:
        ``{"n", "mean", "std", "min", "max", "p50", "p90", "p99"}``; ``std`` is the sample
        standard deviation (ddof=1; 0.0 for one value).

    Raises:
        ValueError: ``values`` is empty.
    """
    if not len(values):
        raise ValueError("summary of an empty sample")
    xs = [float(v) * scale for v in values]
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    out = {"n": n, "mean": mean, "std": std, "min": min(xs), "max": max(xs)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    return out


def median(values: Sequence[float]) -> float:
    """The median (50th percentile) of a non-empty sample."""
    return percentile(values, 50)


def time_call(fn: Callable[[], object], *, warmup: int, repeats: int) -> list[float]:
    """Run ``fn`` ``warmup`` times (discarded) then ``repeats`` times; return each timed duration in seconds.

    Raises:
        ValueError: ``warmup < 0`` or ``repeats < 1``.
    """
    if warmup < 0 or repeats < 1:
        raise InputError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = now()
        fn()
        out.append(now() - t0)
    return out
