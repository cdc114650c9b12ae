"""Which attention mode and which chunk sizes: the Rust planner's answer for a call, the device's free
memory, and `choose_mode`, the fastest mode whose predicted extra memory fits a budget.

Budgets (`budget_bytes`) are the extra bytes a call may allocate beyond its inputs and output. None or 0
means the memory free on the tensors' device (`free_bytes`); only where that is unknown (devices other
than CPU and CUDA) is there no limit.

Costs per call, for models that make hundreds of attention calls per image:
- Free memory is read once per device per sampling step inside `sampling_step()` (ComfyUI's sampler
  enters one per step through VRAMKit's wrapper), and at each call outside one.
- `plan` answers from a cache keyed by the call's sizes, dtype, device, threads and budget (the Rust
  planner is asked once per shape and budget).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from .. import _core
from .._log import log_once
from . import engines
from .problem import Problem

log = logging.getLogger("vramkit.attention")

#: Free bytes per device read in the current sampling step (None outside a step).
_STEP: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("vramkit_attention_step",
                                                                              default=None)


@contextlib.contextmanager
def sampling_step() -> Iterator[None]:
    """One sampling step: inside it, `free_bytes` reads each device's free memory once (at the first call
    that needs it) and returns that value to every later call of the step. Steps nest (an inner one reads
    afresh) and are per thread/context."""
    token = _STEP.set({})
    try:
        yield
    finally:
        _STEP.reset(token)


def free_bytes(device: torch.device) -> int:
    """The memory free on `device` (`available_bytes`), read once per sampling step inside
    `sampling_step()`, at every call outside one."""
    cache = _STEP.get()
    if cache is None:
        return available_bytes(device)
    key = str(device)
    value = cache.get(key)
    if value is None:
        value = cache[key] = available_bytes(device)
    return value


def budget_for(device: torch.device, budget_bytes: int | None) -> int:
    """The budget in bytes: `budget_bytes`, or for None or 0 the memory free on `device` (`free_bytes`:
    once per sampling step inside `sampling_step()`; 0 where it is unknown, which the planner takes as no
    limit)."""
    return budget_bytes if budget_bytes else free_bytes(device)


#: Plans by (sizes, element size, device type, engine, torch threads, budget); cleared when full.
_PLANS: dict[tuple[Any, ...], dict[str, Any]] = {}
_PLANS_MAX = 1024


def plan(p: Problem, budget_bytes: int | None = None) -> dict[str, Any]:
    """The planner's answer for this call (`vramkit._core.plan_attention`) under `budget_bytes` (None or
    0: the memory free on the device; the budget used is the answer's ``"budget_bytes"``). Cached per call
    shape and budget; each caller gets its own copy."""
    budget = budget_for(p.device, budget_bytes)
    cpu = p.device.type == "cpu"
    engine = engines.rust_engine(p.q.dtype) if cpu else None
    threads = torch.get_num_threads() if cpu else 0
    key = (p.batch, p.heads, p.q_len, p.kv_len, p.head_dim, p.v_head_dim, p.q.element_size(), cpu, engine,
           threads, budget)
    cached = _PLANS.get(key)
    if cached is None:
        cached = dict(_core.plan_attention(p.batch, p.heads, p.q_len, p.kv_len, p.head_dim, p.q.element_size(),
                                           budget, v_head_dim=p.v_head_dim, engine=engine, torch_threads=threads))
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = cached
    return dict(cached)


def available_bytes(device: torch.device) -> int:
    """Memory free on `device` now, for new tensors: on CUDA the driver's free memory plus what torch's
    caching allocator has reserved but not handed out (free for torch, though not for the driver; inside
    ComfyUI often GBs), as ComfyUI's ``get_free_memory`` counts it; on CPU MemAvailable; elsewhere, and
    where CUDA cannot be asked, 0 (unknown, which the planner takes as no limit). Each call asks the
    driver or the OS: `free_bytes` is the once-per-sampling-step reader the planner uses."""
    if device.type == "cuda":
        try:
            driver_free = int(torch.cuda.mem_get_info(device)[0])
            cached = int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
        except (RuntimeError, AssertionError) as exc:  # no usable CUDA (a torch built without it, no driver)
            log_once(log, ("cuda free memory", str(device)), "attention: cannot read the free memory of %s (%s); "
                     "planning without a limit", device, exc)
            return 0
        return driver_free + max(0, cached)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 0
    return 0


def _sdpa_bytes(p: Problem) -> int:
    """A rough upper bound of SDPA's extra memory: torch's CPU flash kernel keeps 256 x 512 score blocks and
    a 256-row accumulator per thread; CUDA's flash and memory-efficient kernels keep a logsumexp per row;
    a mask may be converted to q's dtype and expanded to (B, H, Nq, Nk)."""
    e = p.q.element_size()
    if p.device.type == "cpu":
        base = torch.get_num_threads() * (256 * 512 * (4 + e) + 256 * (p.v_head_dim + 4) * 4)
    else:
        base = p.batch * p.heads * p.q_len * 4 * 2
    if p.upcast:
        base += 4 * p.batch * p.heads * ((p.q_len + p.kv_len) * p.head_dim + p.kv_len * p.v_head_dim)
    if p.mask is not None:
        base += p.batch * p.heads * p.q_len * p.kv_len * e
    return base + p.batch * p.heads * p.q_len * p.v_head_dim * (4 + e)


#: How an outside attention kernel (a ComfyUI backend) uses memory, for `backend_bytes`:
#: - "fused": a fused kernel keeping O(N) state (torch SDPA's flash / memory-efficient kernels, SageAttention,
#:   flash-attn, xFormers): predicted like "sdpa".
#: - "full": the whole (B, H, Nq, Nk) score matrix in float32 and its softmax (ComfyUI's attention_basic).
#: - "self-sizing": sizes its chunks to the device's free memory itself (ComfyUI's sub_quad and split).
BACKEND_KINDS: tuple[str, ...] = ("fused", "full", "self-sizing")


def backend_bytes(p: Problem, kind: str) -> int:
    """Predicted extra bytes of this call in an outside kernel of `kind` (`BACKEND_KINDS`). A
    "self-sizing" one is predicted as "full" (what it allocates when memory is plentiful)."""
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; accepted: {', '.join(BACKEND_KINDS)}")
    if kind == "fused":
        return _sdpa_bytes(p)
    scores = p.batch * p.heads * p.q_len * p.kv_len * 4
    return 2 * scores + p.batch * p.heads * p.q_len * p.v_head_dim * 4


def backend_fits(p: Problem, kind: str, budget: int, *, explicit: bool) -> tuple[bool, int | None]:
    """Whether an outside kernel of `kind` fits `budget` bytes (already resolved by `budget_for`; 0 = the
    free memory is unknown, no limit) for this call: (fits, predicted bytes, or None when not predicted).
    `explicit`: whether the user gave the budget (else it is the free memory). It fits when the budget is
    unknown, and a "self-sizing" kernel fits the free memory by construction."""
    if budget == 0 or (kind == "self-sizing" and not explicit):
        return True, None
    predicted = backend_bytes(p, kind)
    return predicted <= budget, predicted


def mode_order(p: Problem) -> tuple[str, ...]:
    """The modes "auto" tries, fastest first, on the call's device. CPU: the Rust kernel ("chunked") first
    where its engine beats SDPA (`engines.FASTER_THAN_SDPA`: the AVX-512 engines), else SDPA first. Other
    devices: SDPA, then the torch chunked path, then slicing."""
    if p.device.type == "cpu" and engines.rust_first(p.q.dtype):
        return ("chunked", "sdpa", "sliced")
    return ("sdpa", "chunked", "sliced")


def predicted_bytes(p: Problem, pl: dict[str, Any]) -> dict[str, int]:
    """Each mode's predicted extra bytes for this call under plan `pl`."""
    return {
        "chunked": pl["kernel_peak_bytes"] if p.device.type == "cpu" else pl["torch_peak_bytes"],
        "sdpa": _sdpa_bytes(p),
        "sliced": pl["sliced_peak_bytes"],
    }


def choose_mode(p: Problem, budget_bytes: int | None = None, pl: dict[str, Any] | None = None,
                candidates: tuple[str, ...] | None = None) -> str:
    """The fastest mode whose predicted extra memory fits `budget_bytes` (None or 0: the memory free on the
    tensors' device) on that device, among `candidates` (default: all, in `mode_order`). `pl` is
    `plan(p, budget_bytes)` if already made."""
    if pl is None:
        pl = plan(p, budget_bytes)
    budget = pl["budget_bytes"]
    predicted = predicted_bytes(p, pl)
    order = tuple(m for m in mode_order(p) if candidates is None or m in candidates)
    if not order:
        raise ValueError(f"candidates must name at least one of {', '.join(mode_order(p))}; got {candidates!r}")
    for mode in order:
        if budget == 0 or predicted[mode] <= budget:  # 0: the device's free memory is unknown
            log.debug("attention auto: %s (predicted %d bytes, budget %d)", mode, predicted[mode], budget)
            return mode
    smallest = min(order, key=lambda m: predicted[m])
    # Once per call shape and requested budget: a model makes the same call hundreds of times per image.
    key = ("no mode fits", p.device.type, str(p.q.dtype), p.batch, p.heads, p.q_len, p.kv_len, p.head_dim,
           p.v_head_dim, p.mask is not None, p.upcast, budget_bytes or None, order)
    log_once(log, key, "attention: no mode fits the budget of %.1f MiB (predicted: %s); using %s", budget / 2**20,
             ", ".join(f"{m} {predicted[m] / 2**20:.1f} MiB" for m in order), smallest)
    return smallest
