"""Peak extra memory of a call, measured: torch's allocator on CUDA, torch's profiler on CPU.

tracemalloc cannot see torch's or Rust's allocations, so:
- CUDA: `torch.cuda.max_memory_allocated` after resetting the peak (what the caching allocator handed out).
- CPU: the profiler with `profile_memory=True` records every allocation and free of torch's CPU allocator
  (all CPU tensors, including torch's own kernel workspaces) with a timestamp; the running sum of the
  sizes in time order gives the peak. Allocations made by the Rust core are not torch's: the Rust kernel
  counts its own and `vramkit.attention` adds them.
- Other devices: unknown (0).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

R = TypeVar("R")


def peak_bytes(fn: Callable[[], R], device: torch.device) -> tuple[R, int]:
    """Runs `fn` and returns its result with the most bytes it had allocated at once on `device`
    (counting its result if it allocated it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        res = fn()
        torch.cuda.synchronize(device)
        return res, max(0, torch.cuda.max_memory_allocated(device) - base)
    if device.type == "cpu":
        return _cpu_peak(fn)
    return fn(), 0


def _cpu_peak(fn: Callable[[], R]) -> tuple[R, int]:
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet the "no GPU" notice of the profiler backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            res = fn()
        results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        return res, 0
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    current = peak = 0
    for _, n in events:
        current += n
        peak = max(peak, current)
    return res, peak
