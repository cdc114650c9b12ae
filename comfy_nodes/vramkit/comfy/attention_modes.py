"""Attention mode per model: an ``optimized_attention_override`` on a clone, chained with any earlier one.

ComfyUI calls ``transformer_options["optimized_attention_override"](func, q, k, v, heads, ...)`` from every
attention backend of diffusion models (SD1.x/SDXL UNets, SD3, Flux, Wan, Qwen-Image, HunyuanVideo, LTX, ...;
not VAEs or text encoders), where ``func`` is the backend it would have used. Modes:

- VRAMKit's ``auto`` / ``chunked`` / ``sliced`` (from `vramkit.attention`), which honour a memory budget.
  ``auto`` keeps ComfyUI's own backend (the one it was started with: sage, flash, xformers, pytorch, ...) on
  a GPU and takes over only the calls that backend is predicted not to fit the budget; on the CPU it runs
  the Rust kernel where its engine beats SDPA (AVX-512), else SDPA.
- ComfyUI's own backends, picked per model instead of by a launch flag: ``sdpa`` (``--use-pytorch-cross-
  attention``), ``sub_quad`` (``--use-quad-cross-attention``), ``split`` (``--use-split-cross-attention``),
  and ``sage`` / ``flash`` / ``xformers``.

The node lists every mode on every machine (`NODE_MODES`), so a workflow saved where sage is installed
loads everywhere; where a backend is missing the node falls back to ``auto`` with a warning (logged once,
and said in the summary) instead of failing.

With a budget of 0 (the free memory), the free memory is read once per sampling step: a ``PREDICT_NOISE``
wrapper on the clone runs each model evaluation of the sampler inside `planner.sampling_step()`.

Another pack may have set an override already (the key is shared). VRAMKit does not replace it: that
override still runs, with the chosen backend as the ``func`` it delegates to.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import torch

from .._log import log_once
from . import compat, patch, precision
from .attention_override import ComfyOverride, backend_label, describe_callable, make_backend_override
from .budget import budget_bytes

log = logging.getLogger("vramkit.comfy")

#: Node mode -> ComfyUI's registered backend name.
COMFY_BACKENDS = {"sdpa": "pytorch", "sub_quad": "sub_quad", "split": "split", "sage": "sage",
                  "flash": "flash", "xformers": "xformers"}
VRAMKIT_MODES = ("auto", "chunked", "sliced")
#: Every mode the node offers, on every machine (a saved workflow must load anywhere).
NODE_MODES = ("auto", "sdpa", "chunked", "sliced", "sub_quad", "split", "sage", "flash", "xformers")
_ALWAYS = ("auto", "sdpa", "chunked", "sliced", "sub_quad", "split")
_OPTIONAL = ("sage", "flash", "xformers")
#: The key of the wrapper that marks sampling steps (`vramkit.attention_step`).
STEP_WRAPPER = "attention_step"


def node_modes() -> list[str]:
    """The node's mode list: the same on every machine (`NODE_MODES`)."""
    return list(NODE_MODES)


def available_modes() -> list[str]:
    """The modes this machine runs as asked: the always-present ones, plus sage/flash/xformers where ComfyUI
    registered them (the others fall back to auto)."""
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


def resolve_mode(mode: str) -> tuple[str, str | None]:
    """The mode that runs for the node's `mode`, and why it differs (None when it does not): a ComfyUI
    backend this ComfyUI lacks (sage, flash or xformers not installed) falls back to `default_mode()`, with
    a warning logged once per mode."""
    if mode not in NODE_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {', '.join(NODE_MODES)}")
    if mode in VRAMKIT_MODES or compat.attention_function(COMFY_BACKENDS[mode]) is not None:
        return mode, None
    fallback = default_mode()
    if fallback == mode:
        raise ValueError(f"attention mode {mode!r} is not available in this ComfyUI ({compat.describe()}) and "
                         f"neither is VRAMKit's auto; available: {', '.join(available_modes())}")
    reason = (f"attention mode {mode!r} is not available in this ComfyUI {compat.comfyui_version()} (its package "
              f"is not installed, or ComfyUI did not register it); using {fallback} instead")
    log_once(log, ("attention mode missing", mode), "VRAMKit %s", reason)
    return fallback, reason


def build_override(mode: str, budget_bytes: int, previous: Callable[..., Any] | None) -> ComfyOverride:
    """The override for `mode` (already resolved by `resolve_mode`), chained to `previous` by
    `vramkit.comfy.attention_override`'s contract: a foreign override keeps running (with our mode as the
    backend it calls), an earlier VRAMKit one is replaced."""
    if mode in VRAMKIT_MODES:
        return _vramkit_override_factory()(mode=mode, budget_bytes=budget_bytes, previous=previous)
    if mode not in COMFY_BACKENDS:
        raise ValueError(f"attention mode {mode!r} is not one of {', '.join(NODE_MODES)}")
    backend = compat.attention_function(COMFY_BACKENDS[mode])
    if backend is None:
        raise ValueError(f"attention mode {mode!r} is not available in this ComfyUI ({compat.describe()}): "
                         f"its package is not installed; available: {', '.join(available_modes())}")
    return make_backend_override(backend, previous, name=mode)


def _sampling_step(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """The ``PREDICT_NOISE`` wrapper: one model evaluation of the sampler is one step, in which free memory
    is read once (`vramkit.attention.planner.sampling_step`)."""
    from ..attention import planner

    with planner.sampling_step():
        return executor(*args, **kwargs)


def apply_attention(model: Any, mode: str, memory_budget_mb: float = 0) -> tuple[Any, str]:
    """A clone of `model` whose diffusion model uses attention `mode`; and a summary for users."""
    budget = budget_bytes(memory_budget_mb, "MB", "memory_budget_mb")
    out = patch.clone(model)
    run_mode, fallback = resolve_mode(mode)
    override = build_override(run_mode, budget, patch.attention_override(out))
    patch.set_attention_override(out, override)
    step_type = compat.wrappers_mp().PREDICT_NOISE
    if run_mode in VRAMKIT_MODES:
        patch.set_wrapper(out, step_type, STEP_WRAPPER, _sampling_step)
    else:
        patch.remove_wrapper(out, step_type, STEP_WRAPPER)  # a VRAMKit mode applied before
    text = describe_mode(out, run_mode, budget)
    if fallback is not None:
        text = f"{fallback[0].upper()}{fallback[1:]}. {text}"
    previous = override.vramkit_previous  # a foreign override that still runs (never an earlier VRAMKit one)
    if previous is not None:
        text += (f". Another attention override was already set ({describe_callable(previous)}); it "
                 f"still runs and now calls {run_mode} as its backend")
    log.info("VRAMKit %s", text)
    return out, text + "."


def launch_backend() -> str:
    """The attention backend ComfyUI was started with (sage, flash, xformers, pytorch, split, sub_quad, ...)."""
    func = compat.attention_function("optimized")
    return backend_label(func) if func is not None else "default"


def describe_mode(model: Any, mode: str, budget: int) -> str:
    """What runs the attention of `model` in `mode` with a budget of `budget` bytes (0 = the free memory),
    in words for the node's summary."""
    limit = (f"the memory budget of {budget / 2**20:.0f} MB" if budget
             else "the free memory (read once per sampling step)")
    if mode == "auto":
        device = compat.load_device(model)
        if device.type != "cpu":
            launch = launch_backend()
            return (f"Attention auto on {device.type}: ComfyUI's {launch} (the backend it was started with) runs; "
                    f"VRAMKit's chunked or sliced attention takes over only calls {launch} is predicted not to "
                    f"fit in {limit}")
        return f"Attention auto on cpu: {_cpu_auto(model, limit)}"
    if mode == "chunked":
        return (f"Attention: VRAMKit chunked (memory-efficient; the Rust kernel on the CPU, chunks of torch ops "
                f"on a GPU), held to {limit}")
    if mode == "sliced":
        return f"Attention: VRAMKit sliced (a few heads at a time, the last resort), held to {limit}"
    text = f"Attention: ComfyUI's {mode} backend for this model"
    if budget:
        text += " (the memory budget applies to auto/chunked/sliced only; ComfyUI sizes its own chunks)"
    return text


def _cpu_auto(model: Any, limit: str) -> str:
    from ..attention import engines

    try:
        dtype = precision.current_compute_dtype(model)
    except (AttributeError, TypeError):
        dtype = torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float32
    why = engines.why(dtype)
    if engines.rust_first(dtype):
        return f"VRAMKit chunked (the Rust kernel), because {why}; SDPA or sliced when it does not fit in {limit}"
    return (f"PyTorch SDPA, because {why}; VRAMKit chunked or sliced only for calls SDPA does not fit in "
            f"{limit}")
