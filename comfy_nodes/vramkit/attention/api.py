"""Attention without the N x N matrix: `attention(q, k, v, heads=None, mask=None, scale=None, mode="auto")`.

Modes (the attention modes of the VRAM guide; they are alternatives, pick one):

- ``"sdpa"``: torch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels where torch has
  them).
- ``"chunked"``: memory-efficient attention. On CPU tensors, the Rust kernel (`vramkit._core.attention`:
  query and key blocks with an online softmax, faster than torch's SDPA on AVX-512 CPUs); on other devices
  the same math with torch ops over chunks of queries and keys (`torch_paths.chunked`). Block sizes
  (CPU) and chunk sizes (other devices) come from the planner (`vramkit._core.plan_attention`) under the
  budget: the largest, fastest ones whose predicted extra memory fits it (the smallest if none does).
- ``"sliced"``: attention slicing, the last resort: a few (batch, head) pairs at a time, each with its
  whole score matrix.
- ``"sage"``, ``"flash"``, ``"xformers"``: the external kernels when installed and usable for the call
  (CUDA, half precision, no mask; flash: v's head dim equal to q's, at most 256); otherwise, and when the
  kernel refuses the call (RuntimeError, NotImplementedError, ValueError or AssertionError, e.g. a head
  dim it lacks), a warning is logged once per reason and ``"auto"``'s choice runs.
- ``"auto"``: the fastest mode whose predicted extra memory fits the budget on the tensors' device
  (CPU: chunked, sdpa, sliced where the Rust kernel's engine beats SDPA, i.e. the AVX-512 engines, else
  sdpa, chunked, sliced (`vramkit.attention.engines`); CUDA and others: sdpa, chunked, sliced); if none
  fits, the one predicted to need the least (with one warning per call shape and budget). (Inside ComfyUI,
  the override's "auto" keeps ComfyUI's own backend on a GPU instead of "sdpa": see
  `vramkit.comfy.attention_override`.)

The budget (`budget_bytes`) bounds the extra memory a call allocates beyond its inputs and output, as
predicted by the planner; "auto", "chunked" and "sliced" follow it ("sdpa" and the external kernels size
their own memory). None or 0 means the memory free on the tensors' device when the call is made (CUDA: the
driver's free memory plus torch's cached, unallocated memory; CPU: MemAvailable; other devices: unknown,
so no limit), read once per device per sampling step inside `planner.sampling_step()` (ComfyUI's sampler
enters one per step through the node's wrapper). The ComfyUI override (`make_comfy_override`) means the
same by 0. Plans are cached per call shape and budget.

Semantics (all modes): ``softmax(scale * q k^T + mask) v`` per batch and head, with q, k, v
(B, H, N, D) when `heads` is None and (B, N, H * D) when it is given; the output has q's layout and dtype
and v's head dim. `mask` is bool (True = attend) or an additive float, broadcastable to (B, H, Nq, Nk)
as in torch. `scale` defaults to 1/sqrt(D). A query row whose keys are all masked out gives zeros, and so
does every row when there are no keys; NaN in the inputs reaches the outputs it touches, as in torch.
Only -inf masks a key out: a huge finite additive value such as ``torch.finfo(torch.float32).min`` is a
finite logit, so a row masked with it everywhere gives the average of V, as the float64 math does ("sdpa"
on half-precision inputs converts a float32 mask to their dtype, where such values become -inf and the row
gives zeros).
Scores and the softmax are float32 in every mode but "sdpa", whose precision is torch's;
`attn_precision=torch.float32` runs "sdpa" on float32 copies of half-precision inputs.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import torch

from .. import _core
from .._arrays import as_numpy
from . import torch_paths
from .external import run_external, warn_once
from .measure import peak_bytes
from .planner import choose_mode, plan
from .problem import DTYPES, Problem, needs_grad, prepare

MODES: tuple[str, ...] = ("auto", "sdpa", "chunked", "sliced", "sage", "flash", "xformers")
EXTERNAL_MODES: tuple[str, ...] = ("sage", "flash", "xformers")



def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int | None = None,
              mask: torch.Tensor | None = None, scale: float | None = None, mode: str = "auto", *,
              budget_bytes: int | None = None, attn_precision: torch.dtype | None = None) -> torch.Tensor:
    """``softmax(scale * q k^T + mask) v`` in `mode` (see the module docs).

    `heads`: None for (B, H, N, D) tensors, else the number of heads of (B, N, heads * D) tensors (a Python
    or numpy integer). `scale`: a real number (Python or numpy), default 1/sqrt(D).
    `budget_bytes`: the extra memory (beyond inputs and output) that "auto", "chunked" and "sliced" plan
    for; None or 0 means the memory free on the tensors' device now. On CPU, "chunked" runs the Rust
    kernel with the block sizes the planner picks under that budget.
    """
    p = prepare(q, k, v, heads, mask, scale, attn_precision)
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; accepted: {', '.join(MODES)}")
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                     or budget_bytes < 0):
        raise ValueError(f"budget_bytes must be a non-negative int (0 = the free memory) or None (the same); "
                         f"got {budget_bytes!r}")
    return _run(p, mode, budget_bytes)


def _run(p: Problem, mode: str, budget_bytes: int | None) -> torch.Tensor:
    if p.batch * p.heads * p.q_len * p.v_head_dim == 0 or p.kv_len == 0:
        return p.new_output()[0].zero_()
    if mode in EXTERNAL_MODES:
        out, out4 = p.new_output()
        if run_external(p, mode, out4):
            return out
        del out, out4
        mode = "auto"
    pl = None
    if mode == "auto":
        pl = plan(p, budget_bytes)
        mode = choose_mode(p, budget_bytes, pl)
    if mode != "sdpa" and needs_grad(p):
        # The Rust kernel has no backward and the torch paths work in place: SDPA is differentiable.
        warn_once(mode, "gradients are needed and only 'sdpa' has a backward pass", "'sdpa'")
        mode = "sdpa"
    if mode == "sdpa":
        out, out4 = p.new_output()
        torch_paths.sdpa(p.q, p.k, p.v, p.mask, p.scale, p.upcast, out4)
        return out
    if pl is None:
        pl = plan(p, budget_bytes)
    if mode == "chunked" and p.device.type == "cpu":
        return _rust(p, pl)
    out, out4 = p.new_output()
    if mode == "chunked":
        torch_paths.chunked(p.q, p.k, p.v, p.mask, p.scale, out4, pl["chunk_q"], pl["chunk_kv"])
    else:
        torch_paths.sliced(p.q, p.k, p.v, p.mask, p.scale, out4, pl["slice"])
    return out


# --- the Rust kernel (CPU) ----------------------------------------------------------------------------------

_local = threading.local()


def last_kernel_stats() -> dict[str, Any] | None:
    """What the Rust kernel reported for the last call on this thread (engine, blocks, scratch bytes)."""
    return getattr(_local, "stats", None)


def _rust(p: Problem, pl: dict[str, Any]) -> torch.Tensor:
    """The Rust kernel with the blocks of plan `pl`."""
    if p.heads_layout:
        q, k, v = (t.transpose(1, 2).flatten(2) for t in (p.q, p.k, p.v))
        heads: int | None = p.heads
    else:
        q, k, v, heads = p.q, p.k, p.v, None
    mask = None
    if p.mask is not None:
        # `prepare` collapsed expanded (stride-0) dims to size 1, which the kernel broadcasts: the copies
        # below hold the mask's distinct values only, never a full (B, H, Nq, Nk) tensor.
        m = p.mask if p.mask.dtype in (torch.bool, *DTYPES) else p.mask.float()
        mask = as_numpy(m)
    out, stats = _core.attention(as_numpy(q), as_numpy(k), as_numpy(v), heads, mask, p.scale,
                                 block_q=pl["block_q"], block_kv=pl["block_kv"],
                                 heads_per_group=pl["heads_per_group"])
    _local.stats = stats
    res = torch.from_numpy(out)
    return res.view(torch.bfloat16) if p.q.dtype == torch.bfloat16 else res


# --- measuring (for the demo and the bench) -----------------------------------------------------------------

def measure_mode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, *, heads: int | None = None,
                 mask: torch.Tensor | None = None, scale: float | None = None, repeats: int = 3,
                 budget_bytes: int | None = None) -> tuple[float, int]:
    """Times `attention(q, k, v, heads, mask, scale, mode)` and measures its memory.

    `budget_bytes` as in `attention` (None or 0: the free memory). Returns (median seconds over `repeats`
    runs after one untimed run, peak extra bytes): the most bytes
    the call had allocated at once beyond its inputs and its output (torch's allocator on CUDA, torch's
    profiler on CPU, plus the Rust kernel's own count of its scratch for "chunked" on CPU).
    """
    p = prepare(q, k, v, heads, mask, scale)
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; accepted: {', '.join(MODES)}")
    _local.stats = None
    out, peak = peak_bytes(lambda: _run(p, mode, budget_bytes), p.device)
    stats = last_kernel_stats()
    torch_out = 0 if stats is not None else out.numel() * out.element_size()
    extra = max(0, peak - torch_out) + (stats["peak_scratch_bytes"] if stats is not None else 0)
    del out
    times = []
    for _ in range(max(1, repeats)):
        if p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        start = time.perf_counter()
        res = _run(p, mode, budget_bytes)
        if p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        times.append(time.perf_counter() - start)
        del res
    return statistics.median(times), extra

