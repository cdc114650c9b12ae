"""The function ComfyUI calls instead of its attention backend, per model.

ComfyUI (without being imported here) looks up ``transformer_options["optimized_attention_override"]`` and
calls it as ``fn(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
skip_output_reshape=False, **kwargs)``, where `func` is the backend it chose. `make_comfy_override` builds
such a function running `vramkit.attention.attention` in a given mode.

- Layouts: q, k, v are (B, N, heads * dim_head), or (B, heads, N, dim_head) with ``skip_reshape=True``;
  the result is (B, N, heads * dim_head), or (B, heads, N, dim_head) with ``skip_output_reshape=True``.
- Masks: (Nq, Nk), (B, Nq, Nk) or (B, heads|1, Nq, Nk), bool (True = attend) or additive.
- kwargs: ``scale`` is honoured; ``attn_precision=torch.float32`` makes the torch paths compute scores in
  float32 (the Rust kernel always does). Everything else (``transformer_options``,
  ``_inside_attn_wrapper``, ...) is passed on untouched whenever `func` is called.
- What we do not support goes to `func` unchanged, with one log line per reason: grouped-query attention
  (k/v with fewer heads than q), dtypes other than float32/float16/bfloat16, inputs that are not plain
  tensors, and masks of other shapes.
- Chaining: if the model already had an override (`previous`), ours never replaces it. Each call goes
  through `previous`, handing it our attention as the backend (`func`) to call; `previous` stays in
  charge of what it does. An earlier override made by this function is not stacked but replaced (its own
  `previous` is kept), so applying the node twice changes the mode instead of nesting two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

Backend = Callable[..., torch.Tensor]
Override = Callable[..., torch.Tensor]

_logged: set[str] = set()


def _log_once(reason: str, func: Backend) -> None:
    if reason not in _logged:
        _logged.add(reason)
        name = getattr(func, "__name__", type(func).__name__)
        log.info("vramkit attention: delegating to %s for %s (not supported here)", name, reason)


def make_comfy_override(mode: str = "chunked", budget_bytes: int = 0, previous: Override | None = None) -> Override:
    """A ComfyUI ``optimized_attention_override`` running `vramkit.attention.attention` in `mode`.

    `budget_bytes` bounds the extra memory the planner gives "auto", "chunked" and "sliced"; 0 means the
    memory free on the device at each call, as in `vramkit.attention.attention` (the ComfyUI node's
    "0 = auto"). `previous` is the override the model had before, if any: it keeps being called (see the
    module docs).
    """
    from .attention import MODES

    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; accepted: {', '.join(MODES)}")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be a non-negative int (0 = the free memory at each call); got "
                         f"{budget_bytes!r}")
    if previous is not None and not callable(previous):
        raise TypeError(f"previous must be the model's earlier override (a callable) or None; got {previous!r}")
    inner = getattr(previous, "vramkit_previous", previous) if is_vramkit_override(previous) else previous

    def override(func: Backend, q: Any, k: Any, v: Any, heads: int, mask: Any = None,
                 attn_precision: Any = None, skip_reshape: bool = False, skip_output_reshape: bool = False,
                 **kwargs: Any) -> torch.Tensor:
        backend = _backend(func, mode, budget_bytes)
        if inner is not None:
            return inner(backend, q, k, v, heads, mask=mask, attn_precision=attn_precision,
                         skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, **kwargs)
        return backend(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                       skip_output_reshape=skip_output_reshape, **kwargs)

    override.vramkit_mode = mode  # type: ignore[attr-defined]
    override.vramkit_previous = inner  # type: ignore[attr-defined]
    return override


def is_vramkit_override(fn: object) -> bool:
    """Whether `fn` was made by `make_comfy_override`."""
    return callable(fn) and hasattr(fn, "vramkit_mode")


def _backend(func: Backend, mode: str, budget_bytes: int | None) -> Backend:
    """Our attention with ComfyUI's backend signature, handing what it does not support to `func`."""

    def backend(q: Any, k: Any, v: Any, heads: int, mask: Any = None, attn_precision: Any = None,
                skip_reshape: bool = False, skip_output_reshape: bool = False, **kwargs: Any) -> torch.Tensor:
        reason = _unsupported(q, k, v, heads, mask, skip_reshape)
        if reason is not None:
            _log_once(reason, func)
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        return run(q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape,
                   kwargs.get("scale"), mode, budget_bytes)

    backend.__name__ = f"vramkit_{mode}"
    return backend


def _unsupported(q: Any, k: Any, v: Any, heads: int, mask: Any, skip_reshape: bool) -> str | None:
    from .attention import DTYPES

    if not all(type(t) is torch.Tensor for t in (q, k, v)):
        return "inputs that are not plain torch tensors"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype}"
    if skip_reshape:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return "skip_reshape inputs that are not 4-D"
        if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
            return "grouped-query attention (k/v with fewer heads than q)"
    else:
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or not isinstance(heads, int) or heads <= 0:
            return "inputs that are not (B, N, heads * dim_head)"
        if q.shape[2] % heads or k.shape[2] % heads or v.shape[2] % heads:
            return "widths that are not a multiple of heads"
        if k.shape[2] != q.shape[2]:
            return "grouped-query attention (k/v with fewer heads than q)"
    if mask is not None:
        if type(mask) is not torch.Tensor or mask.dim() not in (2, 3, 4):
            return "masks that are not 2-, 3- or 4-D tensors"
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            return f"masks of dtype {mask.dtype}"
        m4 = _comfy_mask(mask)
        b, h, nq, nk = _dims(q, k, heads, skip_reshape)
        if any(m not in (1, f) for m, f in zip(m4.shape, (b, h, nq, nk), strict=True)):
            return f"mask shape {tuple(mask.shape)}"
    return None


def _dims(q: torch.Tensor, k: torch.Tensor, heads: int, skip_reshape: bool) -> tuple[int, int, int, int]:
    if skip_reshape:
        return q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    return q.shape[0], heads, q.shape[1], k.shape[1]


def _comfy_mask(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI's mask shapes as 4-D: (Nq, Nk) -> (1, 1, Nq, Nk); (B, Nq, Nk) -> (B, 1, Nq, Nk)."""
    if mask.dim() == 2:
        return mask.reshape(1, 1, *mask.shape)
    if mask.dim() == 3:
        return mask.unsqueeze(1)
    return mask


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None,
        attn_precision: torch.dtype | None, skip_reshape: bool, skip_output_reshape: bool,
        scale: float | None, mode: str, budget_bytes: int | None) -> torch.Tensor:
    """Our attention on ComfyUI's layouts (inputs already checked by `_unsupported`)."""
    from .attention import attention

    m4 = None if mask is None else _comfy_mask(mask)
    if skip_reshape:
        out = attention(q, k, v, None, m4, scale, mode, budget_bytes=budget_bytes, attn_precision=attn_precision)
        if skip_output_reshape:
            return out
        b, h, n, dv = out.shape
        return out.transpose(1, 2).reshape(b, n, h * dv)
    out = attention(q, k, v, heads, m4, scale, mode, budget_bytes=budget_bytes, attn_precision=attn_precision)
    if not skip_output_reshape:
        return out
    b, n, width = out.shape
    return out.view(b, n, heads, width // heads).transpose(1, 2).contiguous()
