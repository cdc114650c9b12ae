"""Clones and keyed, reversible patches: the only ways VRAMKit changes a ComfyUI model.

Every ``ModelPatcher`` clone shares one ``nn.Module`` with its parent, so nothing here touches
``patcher.model``. Changes go through per-clone object patches (applied when that clone is loaded, undone
when it is unloaded), ``model_options``, and wrappers/callbacks registered under a ``vramkit.*`` key, which
makes re-running a node replace its own patch instead of stacking a second one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import compat

log = logging.getLogger("vramkit.comfy")

KEY_PREFIX = "vramkit"

#: Per-load state ComfyUI's loader puts on op instances; a fresh copy must not inherit another clone's.
LOAD_STATE = frozenset({
    "comfy_cast_weights", "prev_comfy_cast_weights", "comfy_force_cast_weights", "comfy_patched_weights",
    "weight_function", "bias_function", "weight_lowvram_function", "bias_lowvram_function", "seed_key",
    "_v", "_v_weight", "_v_bias", "_v_signature", "_prefetch", "_pin_state",
})


def key(name: str) -> str:
    return f"{KEY_PREFIX}.{name}"


def clone(model: Any, input_name: str = "model") -> Any:
    """A clone of a ComfyUI MODEL, with a clear error for anything else."""
    if not callable(getattr(model, "clone", None)) or not hasattr(model, "model_options"):
        raise TypeError(f"{input_name} must be a ComfyUI MODEL (a ModelPatcher), got {type(model).__name__}")
    return model.clone()


def original_module(model: Any, name: str) -> Any:
    """The module at `name` as this patcher sees it: its own object patch, else the unpatched original (even
    while another clone's object patch sits on the shared module), else the live attribute."""
    return model.get_model_object(name)


def pristine_weight(model: Any, name: str, module: torch.nn.Module) -> torch.Tensor:
    """`module.weight` without any LoRA a loaded clone may have merged into the shared module."""
    if name not in model.object_patches_backup:
        backup = model.backup.get(f"{name}.weight")
        if backup is not None:
            return backup.weight  # type: ignore[no-any-return]
    return module.weight  # type: ignore[return-value]


def copy_module(original: torch.nn.Module, cls: type | None = None,
                parameters: Mapping[str, torch.Tensor] | None = None,
                buffers: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A shallow copy of `original` (optionally re-classed) with some parameters or buffers replaced.

    Untouched tensors are shared, not copied; the dicts that hold them are copied, so replacing a tensor
    on the copy never reaches the original.
    """
    cls = cls or type(original)
    new = cls.__new__(cls)
    state = {k: v for k, v in original.__dict__.items() if k not in LOAD_STATE}
    new.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in state.items()})
    for name, tensor in (parameters or {}).items():
        new._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    for name, tensor in (buffers or {}).items():
        new._buffers[name] = tensor
    return new


def set_size(model: Any, size: int) -> None:
    """Clones inherit their parent's cached ``model_size()``; after swapping in smaller modules, fix it."""
    model.size = int(size)


def set_wrapper(model: Any, wrapper_type: str, name: str, wrapper: Callable[..., Any]) -> None:
    """Registers `wrapper` under ``vramkit.<name>``, replacing an earlier VRAMKit wrapper of that name."""
    model.remove_wrappers_with_key(wrapper_type, key(name))
    model.add_wrapper_with_key(wrapper_type, key(name), wrapper)


def set_callback(model: Any, call_type: str, name: str, callback: Callable[..., Any]) -> None:
    model.remove_callbacks_with_key(call_type, key(name))
    model.add_callback_with_key(call_type, key(name), callback)


def transformer_options(model: Any) -> dict[str, Any]:
    return model.model_options.setdefault("transformer_options", {})  # type: ignore[no-any-return]


def attention_override(model: Any) -> Callable[..., Any] | None:
    return transformer_options(model).get(compat.ATTENTION_OVERRIDE_KEY)


def set_attention_override(model: Any, override: Callable[..., Any]) -> None:
    transformer_options(model)[compat.ATTENTION_OVERRIDE_KEY] = override


def describe_callable(fn: object) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}"
