"""Attention mode per model: an ``optimized_attention_override`` on a clone, chained with any earlier one.

ComfyUI calls ``transformer_options["optimized_attention_override"](func, q, k, v, heads, ...)`` from every
attention backend of diffusion models (SD1.x/SDXL UNets, SD3, Flux, Wan, Qwen-Image, HunyuanVideo, LTX, ...;
not VAEs or text encoders), where ``func`` is the backend it would have used. Modes:

- ComfyUI's own backends, picked per model instead of by a launch flag: ``sdpa`` (``--use-pytorch-cross-
  attention``), ``sub_quad`` (``--use-quad-cross-attention``), ``split`` (``--use-split-cross-attention``),
  and ``sage`` / ``flash`` / ``xformers`` where installed.
- VRAMKit's ``auto`` / ``chunked`` / ``sliced`` (from `vramkit.attention`), which honour a memory budget.

Another pack may have set an override already (the key is shared). VRAMKit does not replace it: that
override still runs, with the chosen backend as the ``func`` it delegates to.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

from . import compat, patch
from .attention_override import ComfyOverride, describe_callable, make_backend_override
from .budget import budget_bytes

log = logging.getLogger("vramkit.comfy")

#: Node mode -> ComfyUI's registered backend name.
COMFY_BACKENDS = {"sdpa": "pytorch", "sub_quad": "sub_quad", "split": "split", "sage": "sage",
                  "flash": "flash", "xformers": "xformers"}
VRAMKIT_MODES = ("auto", "chunked", "sliced")
_ALWAYS = ("auto", "sdpa", "chunked", "sliced", "sub_quad", "split")
_OPTIONAL = ("sage", "flash", "xformers")


def available_modes() -> list[str]:
    """The modes to offer: the always-present ones, plus sage/flash/xformers where ComfyUI registered them."""
    try:
        optional = [m for m in _OPTIONAL if compat.attention_function(COMFY_BACKENDS[m]) is not None]
    except ImportError:  # outside ComfyUI (documentation, unit tests)
        optional = []
    return [*_ALWAYS, *optional]


def vramkit_modes_available() -> bool:
    """Whether `vramkit.attention` (auto/chunked/sliced) is installed."""
    return importlib.util.find_spec("vramkit.attention") is not None


def default_mode() -> str:
    return "auto" if vramkit_modes_available() else "sdpa"


def _vramkit_override_factory() -> Callable[..., Any]:
    try:
        attention = importlib.import_module("vramkit.attention")
    except ImportError as exc:
        raise ValueError("attention modes auto/chunked/sliced need vramkit.attention, which this install "
                         f"lacks ({exc}); use sdpa, sub_quad or split, or update VRAMKit") from exc
    factory = getattr(attention, "make_comfy_override", None)
    if factory is None:
        raise ValueError("this vramkit.attention has no make_comfy_override; attention modes auto/chunked/"
                         "sliced are unavailable; use sdpa, sub_quad or split")
    return factory  # type: ignore[no-any-return]


def build_override(mode: str, budget_bytes: int, previous: Callable[..., Any] | None) -> ComfyOverride:
    """The override for `mode`, chained to `previous` by `vramkit.comfy.attention_override`'s contract: a foreign
    override keeps running (with our mode as the backend it calls), an earlier VRAMKit one is replaced."""
    if mode in VRAMKIT_MODES:
        return _vramkit_override_factory()(mode=mode, budget_bytes=budget_bytes, previous=previous)
    if mode not in COMFY_BACKENDS:
        raise ValueError(f"attention mode {mode!r} is not one of {', '.join(available_modes())}")
    backend = compat.attention_function(COMFY_BACKENDS[mode])
    if backend is None:
        raise ValueError(f"attention mode {mode!r} is not available in this ComfyUI ({compat.describe()}): "
                         f"its package is not installed; available: {', '.join(available_modes())}")
    return make_backend_override(backend, previous, name=mode)


def apply_attention(model: Any, mode: str, memory_budget_mb: float = 0) -> tuple[Any, str]:
    """A clone of `model` whose diffusion model uses attention `mode`; and a one-line summary."""
    budget = budget_bytes(memory_budget_mb, "MB", "memory_budget_mb")
    out = patch.clone(model)
    override = build_override(mode, budget, patch.attention_override(out))
    patch.set_attention_override(out, override)
    previous = override.vramkit_previous  # a foreign override that still runs (never an earlier VRAMKit one)
    lines = [describe(mode, budget, compat.load_device(model))]
    if budget and mode not in VRAMKIT_MODES:
        lines.append("(memory_budget_mb applies to auto, chunked and sliced only; ComfyUI sizes its own chunks.)")
    if previous is not None:
        lines.append(f"Another attention override was already set ({describe_callable(previous)}); it still runs "
                     f"and now calls {mode} as its backend.")
    log.info("VRAMKit attention: %s", " ".join(lines))
    return out, "\n".join(lines)


#: What runs for each mode, for the node's summary.
_BACKENDS = {
    "sdpa": "PyTorch's fused attention (scaled_dot_product_attention; ComfyUI's --use-pytorch-cross-attention)",
    "sub_quad": "ComfyUI's sub-quadratic attention (--use-quad-cross-attention)",
    "split": "ComfyUI's split attention (--use-split-cross-attention)",
    "sage": "SageAttention",
    "flash": "FlashAttention",
    "xformers": "xformers",
    "sliced": "attention slicing: a few heads at a time, each with its whole score matrix",
}


def describe(mode: str, budget: int, device: Any) -> str:
    """For the user: which attention runs on `device` in `mode`, what it saves and what it costs."""
    limit = "what is free when it runs" if budget == 0 else f"{budget / 2**20:.0f} MB"
    kind = getattr(device, "type", str(device))
    if mode == "chunked":
        engine = "VRAMKit's Rust kernel" if kind == "cpu" else "torch operations"
        return (f"Attention: chunked ({engine}), sized to {limit}: memory grows with the image size instead of "
                "its square, which lets large images fit.\nCost: usually a little slower than PyTorch's fused "
                "attention on a GPU.")
    if mode == "auto":
        order = ("VRAMKit's chunked kernel, else PyTorch's fused attention, else slicing" if kind == "cpu" else
                 "PyTorch's fused attention, else chunked, else slicing")
        return (f"Attention: auto on {device}: each call runs the fastest that fits in {limit}: {order}.\n"
                "If large images still run out of memory, set memory_budget_mb or choose chunked.")
    text = f"Attention: {mode}: {_BACKENDS.get(mode, mode)} on {device}."
    if mode in ("sage", "flash", "xformers"):
        text += " Calls it cannot take (masks, CPU tensors, unusual head sizes) run auto's choice."
    if mode == "sliced":
        text += "\nCost: the slowest mode and still quadratic memory per head: a last resort; chunked saves more."
    return text
