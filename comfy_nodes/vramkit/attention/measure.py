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

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silences what native code writes to the process's stdout and stderr (file descriptors 1 and 2) meanwhile.

    torch's profiler backend (kineto) logs from C++ when a profile starts and stops, below Python's reach:
    "no GPU" notices, and on newer torch a "USDT: ... profiler_start" line per profile (kineto emits USDT
    logger messages on start/stop). Only the profiler's start and stop run inside this, never the measured
    function, so nothing else is hidden.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    saved: list[tuple[int, int]] = []
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
            except OSError:
                continue
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def _cpu_peak(fn: Callable[[], R]) -> tuple[R, int]:
    # The autograd profiler is what torch.profiler.profile drives; used directly, it does not import
    # torch._inductor first (torch.profiler checks a compiler setting: ~3 s of imports on the first call).
    from torch.autograd.profiler import profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet the "no GPU" notice of the profiler backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = profile(use_cpu=True, profile_memory=True, use_kineto=True)
        with _quiet_native_output():
            prof.__enter__()
        try:
            res = fn()
        finally:
            with _quiet_native_output():
                prof.__exit__(None, None, None)
        results = prof.kineto_results
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
