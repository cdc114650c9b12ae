"""A validated attention call: q, k, v and the mask as (B, H, N, D) views (`prepare`), with clear errors
for what is not accepted."""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DtypeError, dtype_names

#: dtypes of q, k and v that every mode accepts.
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


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


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int | None, mask: torch.Tensor | None,
            scale: float | None, attn_precision: torch.dtype | None = None) -> Problem:
    """Checks a call and returns it as (B, H, N, D) views; raises ValueError/TypeError (DtypeError for
    dtypes) naming what is wrong and what is accepted."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise DtypeError(f"{name} has dtype {t.dtype}; accepted dtypes: {dtype_names(DTYPES)}")
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
        heads = _positive_int(heads)
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
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None (any real number: int, numpy floating or integer "
                        f"scalar; not bool); got {type(scale).__name__}")
    upcast = attn_precision == torch.float32 and q.dtype != torch.float32
    mask4 = _check_mask(mask, (*q4.shape[:3], k4.shape[2]), q.device)
    return Problem(q4, k4, v4, mask4, float(scale), upcast, heads is not None)


def _positive_int(heads: object) -> int:
    """`heads` as an int: Python and numpy integers (anything with ``__index__``), not bools."""
    value = 0
    if not isinstance(heads, (bool, np.bool_)):
        with contextlib.suppress(TypeError):
            value = operator.index(heads)  # type: ignore[call-overload]
    if value <= 0:
        raise ValueError(f"heads must be a positive int (or None for (B, H, N, D) tensors); got {heads!r}")
    return value


def _check_ndim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, form: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {form}; got shape {tuple(t.shape)}")


def _check_mask(mask: torch.Tensor | None, full: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """The mask as a 4-D view broadcastable to `full` = (B, H, Nq, Nk) (torch's broadcasting rules), with
    every stride-0 (expanded) dimension collapsed to size 1.

    An expanded mask (``mask.expand(B, H, Nq, Nk)``) repeats one value along such a dimension; every path
    broadcasts size-1 dimensions, so keeping it at size 1 means a later ``.contiguous()`` or dtype
    conversion copies only the distinct values, never a full (B, H, Nq, Nk) tensor."""
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
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if any(st == 0 and n > 1 for n, st in zip(m4.shape, m4.stride(), strict=True)):
        m4 = m4[tuple(slice(0, 1) if st == 0 else slice(None) for st in m4.stride())]
    return m4


def needs_grad(p: Problem) -> bool:
    """Whether autograd is recording for any input (then only "sdpa" can run: it has a backward)."""
    tensors = (p.q, p.k, p.v) if p.mask is None else (p.q, p.k, p.v, p.mask)
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
