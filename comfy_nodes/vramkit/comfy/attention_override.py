"""The function ComfyUI calls instead of its attention backend, per model.

ComfyUI (without being imported here) looks up ``transformer_options["optimized_attention_override"]`` and
calls it as ``fn(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
skip_output_reshape=False, **kwargs)``, where `func` is the backend it chose. `make_comfy_override` builds
such a function running `vramkit.attention.attention` in a given mode; `make_backend_override` one running
a given ComfyUI backend instead of `func` (to pick ComfyUI's sdpa / sub_quad / split / sage / ... per model).
Both return a `ComfyOverride`.

- Layouts: q, k, v are (B, N, heads * dim_head), or (B, heads, N, dim_head) with ``skip_reshape=True``;
  the result is (B, N, heads * dim_head), or (B, heads, N, dim_head) with ``skip_output_reshape=True``.
- Masks: (Nq, Nk), (B, Nq, Nk) or (B, heads|1, Nq, Nk), bool (True = attend) or additive.
- kwargs: ``scale`` is honoured; ``attn_precision=torch.float32`` makes the torch paths compute scores in
  float32 (the Rust kernel always does). Everything else (``transformer_options``,
  ``_inside_attn_wrapper``, ...) is passed on untouched whenever `func` is called.
- What we do not support goes to `func` unchanged, with one log line per reason: grouped-query attention
  (k/v with fewer heads than q), dtypes other than float32/float16/bfloat16, inputs that are not plain
  tensors, and masks of other shapes.
- ``"auto"`` on a device other than the CPU (CUDA, where users run) keeps ComfyUI's backend, the `func` it
  hands the override (sage, flash, xformers, pytorch, ...: what ComfyUI was started with), for every call
  it is predicted to fit the memory budget (`vramkit.attention.planner.backend_fits`; the free memory when
  the budget is 0, read once per sampling step inside ``planner.sampling_step()``); only a call that does
  not fit runs VRAMKit's chunked or sliced attention, which honour the budget. Decisions are cached per call
  shape and budget (models make hundreds of calls per image), and each is logged once. On the CPU "auto" is
  `vramkit.attention`'s: the Rust kernel where its engine beats SDPA, else SDPA (`attention.engines`).
- Chaining (the whole contract; callers need no chaining logic of their own): pass the model's current
  override, whatever it is, as `previous`.
  - A foreign override (another pack's) is never replaced: each call goes through it, handing it ours as
    the backend (`func`) to call; it stays in charge of what it does.
  - An earlier VRAMKit override (`is_vramkit_override`) is not stacked but replaced: the new one chains to
    the foreign override the earlier one chained to (`foreign_previous`), so applying a mode twice changes
    the mode instead of nesting two.
  - The result exposes ``vramkit_mode`` (the mode, or the backend's name), ``vramkit_budget_bytes`` (None
    for a ComfyUI backend) and ``vramkit_previous`` (the foreign override it chains to, or None). The
    ``vramkit_`` prefix keeps these apart from other packs' attributes on the shared ComfyUI key, and
    `is_vramkit_override` recognizes an override by them (so one made by another copy of this module, e.g.
    after a custom-node reload, is recognized too).
  - It is immutable and `copy.deepcopy` returns it as is (ComfyUI 0.3.7x deep-copies ``model_options`` on
    every clone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .._log import log_once
from ..attention import planner
from ..attention.api import MODES, attention
from ..attention.problem import DTYPES, prepare

log = logging.getLogger(__name__)

Backend = Callable[..., torch.Tensor]
Override = Callable[..., torch.Tensor]

class ComfyOverride:
    """A ComfyUI ``optimized_attention_override`` made by `make_comfy_override` or `make_backend_override`
    (see the module docs for the call and the chaining contract)."""

    def __init__(self, mode: str, budget_bytes: int | None, previous: Override | None,
                 make_backend: Callable[[Backend], Backend]) -> None:
        self.vramkit_mode = mode
        self.vramkit_budget_bytes = budget_bytes
        self.vramkit_previous = foreign_previous(previous)
        self._make_backend = make_backend

    def __call__(self, func: Backend, q: Any, k: Any, v: Any, heads: int, mask: Any = None,
                 attn_precision: Any = None, skip_reshape: bool = False, skip_output_reshape: bool = False,
                 **kwargs: Any) -> torch.Tensor:
        backend = self._make_backend(func)
        # kwargs carry ComfyUI's `_inside_attn_wrapper` (and anything newer) to whichever backend runs.
        if self.vramkit_previous is not None:
            return self.vramkit_previous(backend, q, k, v, heads, mask=mask, attn_precision=attn_precision,
                                         skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                                         **kwargs)
        return backend(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                       skip_output_reshape=skip_output_reshape, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> ComfyOverride:
        return self  # immutable

    def __repr__(self) -> str:
        budget = "" if self.vramkit_budget_bytes is None else f", budget_bytes={self.vramkit_budget_bytes}"
        chained = ""
        if self.vramkit_previous is not None:
            chained = f", chained to {describe_callable(self.vramkit_previous, with_module=False)}"
        return f"ComfyOverride(mode={self.vramkit_mode!r}{budget}{chained})"


def make_comfy_override(mode: str = "chunked", budget_bytes: int = 0, previous: Override | None = None
                        ) -> ComfyOverride:
    """A ComfyUI ``optimized_attention_override`` running `vramkit.attention.attention` in `mode`.

    `budget_bytes` bounds the extra memory the planner gives "auto", "chunked" and "sliced"; 0 means the
    memory free on the device, as in `vramkit.attention.attention` (the ComfyUI node's "0 = auto"): read
    once per sampling step inside `vramkit.attention.planner.sampling_step()` (the node's wrapper enters one
    per step), at each call outside one. "auto" off the CPU keeps ComfyUI's `func` for the calls it fits
    (see the module docs). `previous` is the model's current override, if any (foreign ones keep being called, an
    earlier VRAMKit one is replaced: see the module docs). Calls this attention does not support go to
    ComfyUI's `func`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; accepted: {', '.join(MODES)}")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be a non-negative int (0 = the free memory); got "
                         f"{budget_bytes!r}")
    _check_previous(previous)
    auto = _AutoChoice(budget_bytes) if mode == "auto" else None
    return ComfyOverride(mode, budget_bytes, previous, lambda func: _backend(func, mode, budget_bytes, auto))


def make_backend_override(backend: Backend, previous: Override | None = None, name: str | None = None
                          ) -> ComfyOverride:
    """A ComfyUI ``optimized_attention_override`` running `backend` (a ComfyUI attention backend, called
    like ComfyUI's `func`: ``backend(q, k, v, heads, mask=..., attn_precision=..., skip_reshape=...,
    skip_output_reshape=..., **kwargs)``) instead of the backend ComfyUI chose, chained to `previous`
    exactly as `make_comfy_override` is. `name` (default: the backend's ``__name__``) is its
    ``vramkit_mode``."""
    if not callable(backend):
        raise TypeError(f"backend must be a ComfyUI attention function (a callable); got {backend!r}")
    _check_previous(previous)
    label = name if name is not None else describe_callable(backend, with_module=False)
    return ComfyOverride(label, None, previous, lambda func: backend)


def is_vramkit_override(fn: object) -> bool:
    """Whether `fn` was made by `make_comfy_override` or `make_backend_override` (of any copy of this
    module: recognized by its ``vramkit_mode`` and ``vramkit_previous`` attributes)."""
    return callable(fn) and hasattr(fn, "vramkit_mode") and hasattr(fn, "vramkit_previous")


def foreign_previous(previous: Override | None) -> Override | None:
    """The override a new VRAMKit override chains to: `previous` itself, or, when `previous` is a VRAMKit
    override, the foreign override that one chains to (VRAMKit overrides replace each other)."""
    return getattr(previous, "vramkit_previous", None) if is_vramkit_override(previous) else previous


def _check_previous(previous: object) -> None:
    if previous is not None and not callable(previous):
        raise TypeError(f"previous must be the model's earlier override (a callable) or None; got {previous!r}")


def describe_callable(fn: object, *, with_module: bool = True) -> str:
    """How a callable (an override, a backend) is named in summaries and reprs: ``module.qualname``, or the
    qualified name alone."""
    name = str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__)
    if not with_module:
        return name
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}"


def _backend(func: Backend, mode: str, budget_bytes: int | None, auto: _AutoChoice | None = None) -> Backend:
    """Our attention with ComfyUI's backend signature, handing what it does not support to `func` (and, for
    "auto" off the CPU, every call `func` fits the budget for: `_AutoChoice`)."""

    def backend(q: Any, k: Any, v: Any, heads: int, mask: Any = None, attn_precision: Any = None,
                skip_reshape: bool = False, skip_output_reshape: bool = False, **kwargs: Any) -> torch.Tensor:
        reason = _unsupported(q, k, v, heads, mask, skip_reshape)
        if reason is not None:
            log_once(log, ("delegate", reason), "vramkit attention: delegating to %s for %s (not supported here)",
                     getattr(func, "__name__", type(func).__name__), reason, level=logging.INFO)
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        run_mode, budget = mode, budget_bytes
        if auto is not None and q.device.type != "cpu":
            choice = auto.choose(func, q, k, v, heads, mask, attn_precision, skip_reshape)
            if choice is None:
                return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                            skip_output_reshape=skip_output_reshape, **kwargs)
            run_mode, budget = choice
        return run(q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape,
                   kwargs.get("scale"), run_mode, budget)

    backend.__name__ = f"vramkit_{mode}"
    return backend


#: How ComfyUI's backends use memory (`planner.BACKEND_KINDS`), by function name; others count as "fused"
#: (SDPA, sage, sage3, flash, xformers: O(N) state).
_BACKEND_KINDS = {"attention_basic": "full", "attention_sub_quad": "self-sizing", "attention_split": "self-sizing"}


def backend_label(func: object) -> str:
    """A ComfyUI backend as users know it: ``attention_sage`` -> ``sage``, ``attention3_sage`` -> ``sage3``,
    ``attention_pytorch`` -> ``pytorch``; other callables by their name."""
    name = str(getattr(func, "__name__", None) or type(func).__name__)
    if name == "attention3_sage":
        return "sage3"
    return name.removeprefix("attention_")


class _AutoChoice:
    """"auto" off the CPU: per call, None to keep ComfyUI's backend, or (VRAMKit mode, budget in bytes)
    when the backend is predicted not to fit the budget. Cached per (backend, call shape, budget)."""

    _MAX = 1024

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._cache: dict[tuple[Any, ...], tuple[str, int] | None] = {}

    def choose(self, func: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Any,
               attn_precision: Any, skip_reshape: bool) -> tuple[str, int] | None:
        budget = planner.budget_for(q.device, self.budget_bytes)  # 0 = the free memory (once per step)
        key = (func, q.device, q.dtype, q.shape, k.shape, v.shape, heads, skip_reshape,
               None if mask is None else (mask.shape, mask.dtype), attn_precision, budget)
        try:
            return self._cache[key]
        except KeyError:
            pass
        choice = self._decide(func, q, k, v, heads, mask, attn_precision, skip_reshape, budget)
        if len(self._cache) >= self._MAX:
            self._cache.clear()
        self._cache[key] = choice
        return choice

    def _decide(self, func: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Any,
                attn_precision: Any, skip_reshape: bool, budget: int) -> tuple[str, int] | None:
        p = prepare(q, k, v, None if skip_reshape else heads, None if mask is None else _comfy_mask(mask), None,
                    attn_precision)
        kind = _BACKEND_KINDS.get(getattr(func, "__name__", ""), "fused")
        fits, predicted = planner.backend_fits(p, kind, budget, explicit=bool(self.budget_bytes))
        label = backend_label(func)
        if fits:
            log_once(log, ("auto keeps", label), "vramkit attention auto: ComfyUI's %s runs this model's attention "
                     "(the backend ComfyUI chose; VRAMKit's chunked/sliced only for calls it is predicted not to "
                     "fit in the memory budget)", label, level=logging.INFO)
            return None
        assert predicted is not None  # backend_fits predicts whenever a kernel does not fit
        mode = planner.choose_mode(p, budget, candidates=None if kind == "full" else ("chunked", "sliced"))
        shape = (p.batch, p.heads, p.q_len, p.kv_len, p.head_dim)
        log_once(log, ("auto forced", label, shape, str(q.dtype), self.budget_bytes or None),
                 "vramkit attention auto: VRAMKit %s for calls of (batch, heads, q_len, kv_len, head_dim) %s "
                 "because ComfyUI's %s is predicted to need %.1f MiB, over the memory budget of %.1f MiB%s",
                 mode, shape, label, predicted / 2**20, budget / 2**20,
                 "" if self.budget_bytes else " (the free memory)", level=logging.INFO)
        return mode, budget


def _unsupported(q: Any, k: Any, v: Any, heads: int, mask: Any, skip_reshape: bool) -> str | None:
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
