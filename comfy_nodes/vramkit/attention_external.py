"""Pass-through to external attention kernels (SageAttention, flash-attn, xFormers) when installed and
usable for a call; otherwise one warning per reason, and the caller falls back."""

from __future__ import annotations

import logging
from collections.abc import Hashable

import torch

from .attention_problem import Problem

log = logging.getLogger("vramkit.attention")


_warned: set[Hashable] = set()


def log_once(key: Hashable, msg: str, *args: object) -> None:
    """Logs `msg % args` as a warning the first time `key` is seen in this process, and at debug level
    after that (attention runs hundreds of times per image: a warning per call would flood the log)."""
    if key in _warned:
        log.debug(msg, *args)
        return
    _warned.add(key)
    log.warning(msg, *args)


def warn_once(mode: str, reason: str, instead: str = "the 'auto' choice") -> None:
    """Says once per (mode, reason) that `mode` cannot run and what runs instead."""
    log_once(("unavailable", mode, reason), "attention mode %r unavailable (%s); using %s instead", mode, reason,
             instead)


def run_external(p: Problem, mode: str, out4: torch.Tensor) -> bool:
    """Runs an external kernel into `out4` and returns True, or logs why it cannot (once) and returns False."""
    if p.device.type != "cuda":
        warn_once(mode, f"needs a CUDA device, tensors are on {p.device.type}")
        return False
    if p.mask is not None:
        warn_once(mode, "no mask support")
        return False
    if p.q.dtype not in (torch.float16, torch.bfloat16):
        warn_once(mode, f"needs float16 or bfloat16, got {p.q.dtype}")
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
        warn_once(mode, f"not installed: {exc}")
        return False
    return True
