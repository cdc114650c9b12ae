"""Pass-through to external attention kernels (SageAttention, flash-attn, xFormers) when installed and
usable for a call; otherwise one warning per reason, and the caller falls back."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .._log import log_once
from .problem import Problem

log = logging.getLogger("vramkit.attention")


def warn_once(mode: str, reason: str, instead: str = "the 'auto' choice") -> None:
    """Says once per (mode, reason) that `mode` cannot run and what runs instead."""
    log_once(log, ("unavailable", mode, reason), "attention mode %r unavailable (%s); using %s instead", mode, reason,
             instead)


#: What an external kernel raises for a call it does not support (flash-attn: RuntimeError for head dims it
#: lacks; xFormers: NotImplementedError "No operator found"; SageAttention: ValueError or an assert on the
#: head dim, depending on its version). The call is then left to the "auto" choice, with one warning.
_REFUSALS = (RuntimeError, NotImplementedError, ValueError, AssertionError)

#: flash-attn's largest head dim.
FLASH_MAX_HEAD_DIM = 256


def _unusable(p: Problem, mode: str) -> str | None:
    """Why `mode` cannot run this call, as far as can be told before calling it; None if it may."""
    if p.device.type != "cuda":
        return f"needs a CUDA device, tensors are on {p.device.type}"
    if p.mask is not None:
        return "no mask support"
    if p.q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16, got {p.q.dtype}"
    d, dv = p.q.shape[-1], p.v.shape[-1]
    if mode == "flash" and (dv != d or d > FLASH_MAX_HEAD_DIM):
        return (f"flash-attn needs v's head dim equal to q's and at most {FLASH_MAX_HEAD_DIM}; got q/k {d}, "
                f"v {dv}")
    return None


def _kernel(mode: str) -> Callable[[Problem], torch.Tensor]:
    """The external kernel for `mode` as a function of the call returning (B, H, Nq, Dv); ImportError if
    its package is missing."""
    if mode == "sage":
        from sageattention import sageattn  # type: ignore[import-not-found]

        return lambda p: sageattn(p.q, p.k, p.v, tensor_layout="HND", is_causal=False, sm_scale=p.scale)
    if mode == "flash":
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]

        return lambda p: flash_attn_func(*(t.transpose(1, 2) for t in (p.q, p.k, p.v)),
                                         softmax_scale=p.scale).transpose(1, 2)
    if mode == "xformers":
        from xformers.ops import memory_efficient_attention  # type: ignore[import-not-found]

        return lambda p: memory_efficient_attention(*(t.transpose(1, 2) for t in (p.q, p.k, p.v)),
                                                    scale=p.scale).transpose(1, 2)
    raise ValueError(f"unknown external attention mode {mode!r}; accepted: sage, flash, xformers")


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}" if line else type(exc).__name__


def run_external(p: Problem, mode: str, out4: torch.Tensor) -> bool:
    """Runs an external kernel into `out4` and returns True, or logs why it cannot (once per reason) and
    returns False: the caller then runs the "auto" choice. Reasons: not CUDA, a mask, not half precision,
    head dims flash-attn lacks, the package missing, or the kernel refusing the call (`_REFUSALS`)."""
    reason = _unusable(p, mode)
    if reason is not None:
        warn_once(mode, reason)
        return False
    try:
        kernel = _kernel(mode)
    except ImportError as exc:
        warn_once(mode, f"not installed: {exc}")
        return False
    try:
        res = kernel(p)
    except _REFUSALS as exc:
        warn_once(mode, f"it refused the call: {_first_line(exc)}")
        return False
    out4.copy_(res)
    return True
