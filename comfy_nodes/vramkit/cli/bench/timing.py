"""Timing helpers shared by the benchmarks: warm-up, interleaved repeats, medians, a table printer."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Timing:
    median_s: float
    runs: list[float]


def measure(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, Timing]:
    """Times each function `repeats` times, interleaving them so that all see the same machine state
    (page cache, other load, CPU clocks), and returns the median of each.

    Results are dropped before the clock stops, so freeing an output is counted like allocating it.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a whole number >= 1 (the median of the timed runs is shown), got "
                         f"{repeats!r}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(r), r) for name, r in runs.items()}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned numbers, for terminals and README pasting alike."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(values, widths, strict=True))
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(list(headers)), sep, *(line(r) for r in cells)])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == float("inf"):
            return "inf"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if value == 0 or abs(value) >= 0.1:
            return f"{value:.2f}"
        return f"{value:.2g}"  # small rates keep two significant digits rather than printing 0.00
    return str(value)


def _numeric(text: str) -> bool:
    stripped = text.rstrip("x%").replace(".", "", 1).replace("-", "", 1)
    return stripped.isdigit() or text == "inf"
