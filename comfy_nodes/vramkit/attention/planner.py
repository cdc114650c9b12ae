"""Which attention mode and which chunk sizes: the Rust planner's answer for a call, the device's free
memory, and `choose_mode`, the fastest mode whose predicted extra memory fits a budget.

Budgets (`budget_bytes`) are the extra bytes a call may allocate beyond its inputs and output. None or 0
means the memory free on the tensors' device when the call is made (`available_bytes`); only where that is
unknown (devices other than CPU and CUDA) is there no limit."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .. import _core
from .._log import log_once
from .problem import Problem

log = logging.getLogger("vramkit.attention")


def budget_for(device: torch.device, budget_bytes: int | None) -> int:
    """The budget in bytes: `budget_bytes`, or for None or 0 the memory free on `device` now (0 where that
    is unknown, which the planner takes as no limit)."""
    return budget_bytes if budget_bytes else available_bytes(device)


def plan(p: Problem, budget_bytes: int | None = None) -> dict[str, Any]:
    """The planner's answer for this call (`vramkit._core.plan_attention`) under `budget_bytes` (None or
    0: the memory free on the device now; the budget used is the answer's ``"budget_bytes"``)."""
    budget = budget_for(p.device, budget_bytes)
    cpu = p.device.type == "cpu"
    return _core.plan_attention(p.batch, p.heads, p.q_len, p.kv_len, p.head_dim, p.q.element_size(), budget,
                                v_head_dim=p.v_head_dim, engine=_rust_engine(p.q.dtype) if cpu else None,
                                torch_threads=torch.get_num_threads() if cpu else 0)


def _rust_engine(dtype: torch.dtype) -> str:
    engines = _core.attention_engines()
    if dtype == torch.bfloat16 and "avx512-bf16" in engines:
        return "avx512-bf16"
    return "avx512" if "avx512" in engines else "portable"


def available_bytes(device: torch.device) -> int:
    """Memory free on `device` now, for new tensors: on CUDA the driver's free memory plus what torch's
    caching allocator has reserved but not handed out (free for torch, though not for the driver; inside
    ComfyUI often GBs), as ComfyUI's ``get_free_memory`` counts it; on CPU MemAvailable; elsewhere 0
    (unknown, which the planner takes as no limit)."""
    if device.type == "cuda":
        driver_free = int(torch.cuda.mem_get_info(device)[0])
        cached = int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
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


def choose_mode(p: Problem, budget_bytes: int | None = None, pl: dict[str, Any] | None = None) -> str:
    """The fastest mode whose predicted extra memory fits `budget_bytes` (None or 0: the memory free on the
    tensors' device now) on that device. `pl` is `plan(p, budget_bytes)` if already made."""
    if pl is None:
        pl = plan(p, budget_bytes)
    budget = pl["budget_bytes"]
    predicted = {
        "chunked": pl["kernel_peak_bytes"] if p.device.type == "cpu" else pl["torch_peak_bytes"],
        "sdpa": _sdpa_bytes(p),
        "sliced": pl["sliced_peak_bytes"],
    }
    order = ("chunked", "sdpa", "sliced") if p.device.type == "cpu" else ("sdpa", "chunked", "sliced")
    for mode in order:
        if budget == 0 or predicted[mode] <= budget:  # 0: the device's free memory is unknown
            log.debug("attention auto: %s (predicted %d bytes, budget %d)", mode, predicted[mode], budget)
            return mode
    smallest = min(order, key=lambda m: predicted[m])
    # Once per call shape and requested budget: a model makes the same call hundreds of times per image.
    key = ("no mode fits", p.device.type, str(p.q.dtype), p.batch, p.heads, p.q_len, p.kv_len, p.head_dim,
           p.v_head_dim, p.mask is not None, p.upcast, budget_bytes or None)
    log_once(log, key, "attention: no mode fits the budget of %.1f MiB (predicted: %s); using %s", budget / 2**20,
             ", ".join(f"{m} {predicted[m] / 2**20:.1f} MiB" for m in order), smallest)
    return smallest
