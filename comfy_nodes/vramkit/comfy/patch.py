"""Clones and keyed, reversible patches: the only ways VRAMKit changes a ComfyUI model.

Every ``ModelPatcher`` clone shares one ``nn.Module`` with its parent, so nothing here touches
``patcher.model``. Changes go through per-clone object patches (applied when that clone is loaded, undone
when it is unloaded), ``model_options``, and wrappers/callbacks registered under a ``vramkit.*`` key, which
makes re-running a node replace its own patch instead of stacking a second one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import compat

log = logging.getLogger("vramkit.comfy")

KEY_PREFIX = "vramkit"


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


def _live(model: Any, name: str) -> Any:
    """What sits at `name` in the shared module tree right now (another clone's object patch, perhaps)."""
    obj = model.model
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def pristine_tensors(model: Any, name: str, module: torch.nn.Module | None = None
                     ) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor | None]]:
    """The parameters and buffers of the module at `name` (as this patcher sees it, or `module`), without
    anything a loaded clone has merged into them.

    While a clone with weight patches (a LoRA) is loaded, and after, until ComfyUI unpatches it, its patches
    are merged into whatever module sits at `name` in the shared tree: the original, or an object patch
    that clone inherited (possibly this patcher's own). ComfyUI keeps the tensor it replaced in
    ``backup[key]`` (``hook_backup`` for hook patches, ``backup_buffers`` for buffers Dynamic VRAM cast);
    those are the values to use, for every parameter, bias included. A module that is not in the tree
    (this patcher's object patch while another is installed, or the original while an object patch covers
    it) was not merged into, so its own tensors are the pristine ones.
    """
    if module is None:
        module = original_module(model, name)
    merged_into = module is _live(model, name)
    backup = getattr(model, "backup", {}) if merged_into else {}
    hook_backup = getattr(model, "hook_backup", {}) if merged_into else {}
    buffer_backup = getattr(model, "backup_buffers", {}) if merged_into else {}
    params: dict[str, torch.Tensor | None] = {}
    for pname, param in module._parameters.items():
        key = f"{name}.{pname}"
        if param is not None and key in backup:
            param = backup[key].weight
        elif param is not None and key in hook_backup:
            param = hook_backup[key][0]
        params[pname] = param
    buffers: dict[str, torch.Tensor | None] = {}
    for bname, buf in module._buffers.items():
        key = f"{name}.{bname}"
        buffers[bname] = buffer_backup[key] if buf is not None and key in buffer_backup else buf
    return params, buffers


@dataclass(frozen=True)
class Layer:
    """One submodule of a patcher's diffusion model, as `layers` finds it."""

    name: str
    """The path inside the root module (e.g. ``double_blocks.0.img_attn.qkv``)."""
    module: torch.nn.Module
    """The module as the patcher sees it (its own object patch, else the original)."""
    params: dict[str, torch.Tensor | None]
    """The module's own parameters, unpatched (`pristine_tensors`): build copies from these only."""
    buffers: dict[str, torch.Tensor | None]
    is_list: bool
    """A ``ModuleList`` in the live tree (a list of blocks)."""

    @property
    def weight(self) -> torch.Tensor | None:
        return self.params.get("weight")


def layers(model: Any, root: str = "diffusion_model") -> list[Layer]:
    """Every submodule under `root`, in model order, with its pristine parameters."""
    found = []
    for name, live in original_module(model, root).named_modules():
        if not name:
            continue
        full = f"{root}.{name}"
        module = original_module(model, full)
        params, buffers = pristine_tensors(model, full, module)
        found.append(Layer(name, module, params, buffers, isinstance(live, torch.nn.ModuleList)))
    return found


def copy_module(original: torch.nn.Module, cls: type | None = None, *,
                parameters: Mapping[str, torch.Tensor | None],
                buffers: Mapping[str, torch.Tensor | None]) -> torch.nn.Module:
    """A shallow copy of `original` (optionally re-classed) holding exactly the given parameters and buffers.

    Every parameter and buffer slot of `original` must be given (None keeps a slot empty), so nothing of the
    original's current tensors is carried over by accident: while a LoRA'd clone is loaded they may hold its
    patches (see `pristine_tensors`). Extra names add slots. Tensors are shared, not copied.
    """
    missing = (original._parameters.keys() - parameters.keys()) | (original._buffers.keys() - buffers.keys())
    if missing:
        raise ValueError(f"copy_module needs every parameter and buffer of {type(original).__name__}; "
                         f"missing: {', '.join(sorted(missing))}")
    cls = cls or type(original)
    new = cls.__new__(cls)
    state = {k: v for k, v in original.__dict__.items() if k not in compat.LOAD_STATE}
    new.__dict__.update({k: (type(v)(v) if isinstance(v, (dict, set)) else v) for k, v in state.items()})
    new._parameters = {name: None if tensor is None else torch.nn.Parameter(tensor, requires_grad=False)
                       for name, tensor in parameters.items()}
    new._buffers = dict(buffers)
    return new


def add_module_patch(model: Any, name: str, module: torch.nn.Module) -> None:
    """Installs `module` at `name` on this clone only (an object patch), and gives the clone new weights'
    identity (``patches_uuid``).

    ComfyUI decides whether loading a clone must restore and re-merge the weights by comparing that uuid with
    the one last loaded: a clone of a LoRA'd model that kept its uuid would get our modules swapped in
    without the LoRA merged into them, and unloading would then write ComfyUI's backups into our modules,
    leaving the LoRA merged into the shared originals. ComfyUI's own ``set_model_compute_dtype`` renews the
    uuid for the same reason.
    """
    model.add_object_patch(name, module)
    model.patches_uuid = uuid.uuid4()


def set_size(model: Any, size: int) -> None:
    """Clones inherit their parent's cached ``model_size()``; after swapping in smaller modules, fix it."""
    model.size = int(size)


def set_wrapper(model: Any, wrapper_type: str, name: str, wrapper: Callable[..., Any]) -> None:
    """Registers `wrapper` under ``vramkit.<name>``, replacing an earlier VRAMKit wrapper of that name."""
    model.remove_wrappers_with_key(wrapper_type, key(name))
    model.add_wrapper_with_key(wrapper_type, key(name), wrapper)


def remove_wrapper(model: Any, wrapper_type: str, name: str) -> None:
    """Removes the VRAMKit wrapper ``vramkit.<name>`` of `wrapper_type`, if any."""
    model.remove_wrappers_with_key(wrapper_type, key(name))


def set_callback(model: Any, call_type: str, name: str, callback: Callable[..., Any]) -> None:
    model.remove_callbacks_with_key(call_type, key(name))
    model.add_callback_with_key(call_type, key(name), callback)


def transformer_options(model: Any) -> dict[str, Any]:
    return model.model_options.setdefault("transformer_options", {})  # type: ignore[no-any-return]


def attention_override(model: Any) -> Callable[..., Any] | None:
    return transformer_options(model).get(compat.ATTENTION_OVERRIDE_KEY)


def set_attention_override(model: Any, override: Callable[..., Any]) -> None:
    transformer_options(model)[compat.ATTENTION_OVERRIDE_KEY] = override
