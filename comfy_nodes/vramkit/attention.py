"""Attention without the N x N matrix: `attention(q, k, v, heads=None, mask=None, scale=None, mode="auto")`.

Modes (the attention modes of the VRAM guide; they are alternatives, pick one):

- ``"sdpa"``: torch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels where torch has
  them).
- ``"chunked"``: memory-efficient attention. On CPU tensors, the Rust kernel (`vramkit._core.attention`:
  query and key blocks with an online softmax, faster than torch's SDPA on AVX-512 CPUs); on other devices
  the same math with torch ops over chunks of queries and keys (`attention_torch.chunked`). Block and chunk
  sizes come from the planner (`vramkit._core.plan_attention`) under `budget_bytes`.
- ``"sliced"``: attention slicing, the last resort: a few (batch, head) pairs at a time, each with its
  whole score matrix.
- ``"sage"``, ``"flash"``, ``"xformers"``: the external kernels when installed and usable for the call
  (CUDA, half precision, no mask); otherwise a warning is logged once and ``"auto"``'s choice runs.
- ``"auto"``: the fastest mode whose predicted extra memory fits `budget_bytes` on the tensors' device
  (CPU: chunked, sdpa, sliced; CUDA and others: sdpa, chunked, sliced).

Semantics (all modes): ``softmax(scale * q k^T + mask) v`` per batch and head, with q, k, v
(B, H, N, D) when `heads` is None and (B, N, H * D) when it is given; the output has q's layout and dtype
and v's head dim. `mask` is bool (True = attend) or an additive float, broadcastable to (B, H, Nq, Nk)
as in torch. `scale` defaults to 1/sqrt(D). A query row whose keys are all masked out gives zeros, and so
does every row when there are no keys; NaN in the inputs reaches the outputs it touches, as in torch.
Scores and the softmax are float32 in every mode but "sdpa", whose precision is torch's;
`attn_precision=torch.float32` runs "sdpa" on float32 copies of half-precision inputs.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _core, attention_torch
from .attention_measure import peak_bytes
from .errors import DtypeError

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("auto", "sdpa", "chunked", "sliced", "sage", "flash", "xformers")
EXTERNAL_MODES: tuple[str, ...] = ("sage", "flash", "xformers")
#: dtypes of q, k and v that every mode accepts.
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["DTYPES", "MODES", "attention", "choose_mode", "make_comfy_override", "measure_mode", "plan"]


@dataclass(frozen=True)
class Problem:
    """One validated call: q, k, v and the mask as (B, H, N, D) views, sizes, and the output layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    upcast: bool
    heads_layout: bool
    """True when the caller's tensors are (B, N, H * D)."""

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def v_head_dim(self) -> int:
        return self.v.shape[3]

    @property
    def device(self) -> torch.device:
        return self.q.device

    def new_output(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An empty output in the caller's layout and its (B, H, Nq, Dv) view."""
        b, h, n, dv = self.batch, self.heads, self.q_len, self.v_head_dim
        opts: dict[str, Any] = {"dtype": self.q.dtype, "device": self.device}
        if self.heads_layout:
            out = torch.empty((b, n, h * dv), **opts)
            return out, out.view(b, n, h, dv).transpose(1, 2)
        out = torch.empty((b, h, n, dv), **opts)
        return out, out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int | None = None,
              mask: torch.Tensor | None = None, scale: float | None = None, mode: str = "auto", *,
              budget_bytes: int | None = None, attn_precision: torch.dtype | None = None) -> torch.Tensor:
    """``softmax(scale * q k^T + mask) v`` in `mode` (see the module docs).

    `budget_bytes` bounds the extra memory (beyond inputs and output) that "auto" and "chunked" plan for;
    None means the memory currently free on the device.
    """
    p = prepare(q, k, v, heads, mask, scale, attn_precision)
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; accepted: {', '.join(MODES)}")
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                     or budget_bytes < 0):
        raise ValueError(f"budget_bytes must be a non-negative int or None; got {budget_bytes!r}")
    return _run(p, mode, budget_bytes)


def _run(p: Problem, mode: str, budget_bytes: int | None) -> torch.Tensor:
    if p.batch * p.heads * p.q_len * p.v_head_dim == 0 or p.kv_len == 0:
        return p.new_output()[0].zero_()
    if mode in EXTERNAL_MODES:
        out, out4 = p.new_output()
        if _external(p, mode, out4):
            return out
        del out, out4
        mode = "auto"
    if mode == "auto":
        mode = choose_mode(p, budget_bytes)
    if mode != "sdpa" and _needs_grad(p):
        # The Rust kernel has no backward and the torch paths work in place: SDPA is differentiable.
        _warn_once(mode, "gradients are needed and only 'sdpa' has a backward pass", "'sdpa'")
        mode = "sdpa"
    if mode == "chunked" and p.device.type == "cpu":
        return _rust(p, budget_bytes)
    out, out4 = p.new_output()
    if mode == "sdpa":
        attention_torch.sdpa(p.q, p.k, p.v, p.mask, p.scale, p.upcast, out4)
    elif mode == "chunked":
        pl = plan(p, budget_bytes)
        attention_torch.chunked(p.q, p.k, p.v, p.mask, p.scale, out4, pl["chunk_q"], pl["chunk_kv"])
    else:
        pl = plan(p, budget_bytes)
        attention_torch.sliced(p.q, p.k, p.v, p.mask, p.scale, out4, pl["slice"])
    return out


# --- validation ---------------------------------------------------------------------------------------------

def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int | None, mask: torch.Tensor | None,
            scale: float | None, attn_precision: torch.dtype | None = None) -> Problem:
    """Checks a call and returns it as (B, H, N, D) views; raises ValueError/TypeError (DtypeError for
    dtypes) naming what is wrong and what is accepted."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise DtypeError(f"{name} has dtype {t.dtype}; accepted dtypes: {_dtype_names(DTYPES)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise DtypeError(f"q, k and v must have the same dtype; got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device} and {v.device}")
    if heads is None:
        form = "(batch, heads, tokens, head_dim) (heads=None)"
        _check_ndim(q, k, v, 4, form)
        q4, k4, v4 = q, k, v
    else:
        form = "(batch, tokens, heads * head_dim)"
        if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
            raise ValueError(f"heads must be a positive int (or None for (B, H, N, D) tensors); got {heads!r}")
        _check_ndim(q, k, v, 3, form)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[2] % heads:
                raise ValueError(f"{name} width {t.shape[2]} (shape {tuple(t.shape)}) is not a multiple of "
                                 f"heads={heads}")
        q4, k4, v4 = (t.view(t.shape[0], t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)
                      if t.is_contiguous() else
                      t.reshape(t.shape[0], t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)
                      for t in (q, k, v))
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} {form}"
    if not (q4.shape[0] == k4.shape[0] == v4.shape[0]):
        raise ValueError(f"q, k and v must have the same batch size; got {shapes}")
    if not (q4.shape[1] == k4.shape[1] == v4.shape[1]):
        raise ValueError(f"q, k and v must have the same number of heads; got {shapes}")
    if k4.shape[2] != v4.shape[2]:
        raise ValueError(f"k and v must have the same number of tokens; got {shapes}")
    if q4.shape[3] != k4.shape[3]:
        raise ValueError(f"q and k must have the same head dim; got {shapes}")
    if q4.shape[3] == 0:
        raise ValueError(f"the head dim must be positive; got {shapes}")
    if scale is None:
        scale = 1.0 / math.sqrt(q4.shape[3])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    upcast = attn_precision == torch.float32 and q.dtype != torch.float32
    mask4 = _check_mask(mask, (*q4.shape[:3], k4.shape[2]), q.device)
    return Problem(q4, k4, v4, mask4, float(scale), upcast, heads is not None)


def _check_ndim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, form: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {form}; got shape {tuple(t.shape)}")


def _check_mask(mask: torch.Tensor | None, full: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """The mask as a 4-D view broadcastable to `full` = (B, H, Nq, Nk) (torch's broadcasting rules)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None; got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise DtypeError(f"mask has dtype {mask.dtype}; accepted: bool (True = attend) or a float dtype "
                         "(added to the scores)")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but q, k, v are on {device}")
    ok = mask.dim() <= 4 and all(m in (1, f) for m, f in zip(reversed(mask.shape), reversed(full), strict=False))
    if not ok:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to (batch, heads, q_len, kv_len) = "
                         f"{full}; each size must be 1 or the full size (missing leading dims count as 1)")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _needs_grad(p: Problem) -> bool:
    tensors = (p.q, p.k, p.v) if p.mask is None else (p.q, p.k, p.v, p.mask)
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# --- planning and mode choice -------------------------------------------------------------------------------

_RUST_ENGINE_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def plan(p: Problem, budget_bytes: int | None = None) -> dict[str, Any]:
    """The planner's answer for this call (`vramkit._core.plan_attention`) under `budget_bytes` (None:
    the device's free memory)."""
    budget = available_bytes(p.device) if budget_bytes is None else budget_bytes
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
    """Memory free on `device` now (CUDA: the driver's free memory; CPU: MemAvailable; else 0 = no limit)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
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


def choose_mode(p: Problem, budget_bytes: int | None = None) -> str:
    """The fastest mode whose predicted extra memory fits the budget on the tensors' device."""
    pl = plan(p, budget_bytes)
    budget = available_bytes(p.device) if budget_bytes is None else budget_bytes
    predicted = {
        "chunked": pl["kernel_peak_bytes"] if p.device.type == "cpu" else pl["torch_peak_bytes"],
        "sdpa": _sdpa_bytes(p),
        "sliced": pl["sliced_peak_bytes"],
    }
    order = ("chunked", "sdpa", "sliced") if p.device.type == "cpu" else ("sdpa", "chunked", "sliced")
    for mode in order:
        if budget == 0 or predicted[mode] <= budget:
            log.debug("attention auto: %s (predicted %d bytes, budget %d)", mode, predicted[mode], budget)
            return mode
    smallest = min(order, key=lambda m: predicted[m])
    log.warning("attention: no mode fits the budget of %.1f MiB (predicted: %s); using %s", budget / 2**20,
                ", ".join(f"{m} {predicted[m] / 2**20:.1f} MiB" for m in order), smallest)
    return smallest


# --- the Rust kernel (CPU) ----------------------------------------------------------------------------------

_local = threading.local()


def last_kernel_stats() -> dict[str, Any] | None:
    """What the Rust kernel reported for the last call on this thread (engine, blocks, scratch bytes)."""
    return getattr(_local, "stats", None)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _rust(p: Problem, budget_bytes: int | None) -> torch.Tensor:
    if p.heads_layout:
        q, k, v = (t.transpose(1, 2).flatten(2) for t in (p.q, p.k, p.v))
        heads: int | None = p.heads
    else:
        q, k, v, heads = p.q, p.k, p.v, None
    mask = None
    if p.mask is not None:
        m = p.mask if p.mask.dtype in (torch.bool, *DTYPES) else p.mask.float()
        mask = _as_numpy(m)
    blocks: dict[str, int] = {}
    if budget_bytes is not None:
        pl = plan(p, budget_bytes)
        blocks = {"block_q": pl["block_q"], "block_kv": pl["block_kv"], "heads_per_group": pl["heads_per_group"]}
    out, stats = _core.attention(_as_numpy(q), _as_numpy(k), _as_numpy(v), heads, mask, p.scale, **blocks)
    _local.stats = stats
    res = torch.from_numpy(out)
    return res.view(torch.bfloat16) if p.q.dtype == torch.bfloat16 else res


# --- external kernels ---------------------------------------------------------------------------------------

_warned: set[tuple[str, str]] = set()


def _warn_once(mode: str, reason: str, instead: str = "the 'auto' choice") -> None:
    if (mode, reason) not in _warned:
        _warned.add((mode, reason))
        log.warning("attention mode %r unavailable (%s); using %s instead", mode, reason, instead)


def _external(p: Problem, mode: str, out4: torch.Tensor) -> bool:
    """Runs an external kernel into `out4` and returns True, or logs why it cannot (once) and returns False."""
    if p.device.type != "cuda":
        _warn_once(mode, f"needs a CUDA device, tensors are on {p.device.type}")
        return False
    if p.mask is not None:
        _warn_once(mode, "no mask support")
        return False
    if p.q.dtype not in (torch.float16, torch.bfloat16):
        _warn_once(mode, f"needs float16 or bfloat16, got {p.q.dtype}")
        return False
    try:
        if mode == "sage":
            from sageattention import sageattn  # type: ignore[import-not-found]

            res = sageattn(p.q, p.k, p.v, tensor_layout="HND", is_causal=False, sm_scale=p.scale)
            out4.copy_(res)
        elif mode == "flash":
            from flash_attn import flash_attn_func  # type: ignore[import-not-found]

            res = flash_attn_func(*(t.transpose(1, 2) for t in (p.q, p.k, p.v)), softmax_scale=p.scale)
            out4.copy_(res.transpose(1, 2))
        else:
            from xformers.ops import memory_efficient_attention  # type: ignore[import-not-found]

            res = memory_efficient_attention(*(t.transpose(1, 2) for t in (p.q, p.k, p.v)), scale=p.scale)
            out4.copy_(res.transpose(1, 2))
    except ImportError as exc:
        _warn_once(mode, f"not installed: {exc}")
        return False
    return True


# --- measuring (for the demo and the bench) -----------------------------------------------------------------

def measure_mode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, *, heads: int | None = None,
                 mask: torch.Tensor | None = None, scale: float | None = None, repeats: int = 3,
                 budget_bytes: int | None = None) -> tuple[float, int]:
    """Times `attention(q, k, v, heads, mask, scale, mode)` and measures its memory.

    Returns (median seconds over `repeats` runs after one untimed run, peak extra bytes): the most bytes
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


from .attention_override import make_comfy_override  # noqa: E402  (it calls back into this module)
