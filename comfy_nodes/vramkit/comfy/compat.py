"""What differs between the ComfyUI versions VRAMKit supports, in one place.

Supported: ComfyUI 0.3.7x (its own ``comfy.quant_ops`` registry, legacy ModelPatcher) and 0.29 or later
(quantized tensors from the comfy-kitchen package, Dynamic VRAM). Everything here imports ComfyUI lazily, so
importing this module outside ComfyUI is harmless; the functions need ComfyUI on ``sys.path``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch

log = logging.getLogger("vramkit.comfy")

#: Where ComfyUI's quantized tensors come from: comfy-kitchen (0.29+), ComfyUI's own ``comfy.quant_ops``
#: registry (0.3.7x), or nowhere (then VRAMKit uses its own quantized modules).
QuantBackend = Literal["comfy_kitchen", "comfy_quant_ops", "none"]

#: The ``transformer_options`` key ComfyUI's attention backends consult (since 0.3.64).
ATTENTION_OVERRIDE_KEY = "optimized_attention_override"

#: Per-load state ComfyUI's loader puts on op instances (0.29+ adds the ``_v*``, ``_prefetch`` and
#: ``_pin_state`` ones); a fresh copy of a module must not inherit another clone's.
LOAD_STATE = frozenset({
    "comfy_cast_weights", "prev_comfy_cast_weights", "comfy_force_cast_weights", "comfy_patched_weights",
    "weight_function", "bias_function", "weight_lowvram_function", "bias_lowvram_function", "seed_key",
    "_v", "_v_weight", "_v_bias", "_v_signature", "_prefetch", "_pin_state",
})


@functools.cache
def comfyui_version() -> str:
    """The ComfyUI version (``comfyui_version.__version__``), or "unknown" for trees without that file."""
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except (ImportError, AttributeError):
        return "unknown"


@functools.cache
def quant_backend() -> QuantBackend:
    """Which quantized-tensor registry this ComfyUI offers."""
    try:
        quant_ops = importlib.import_module("comfy.quant_ops")
    except ImportError:
        return "none"
    if getattr(quant_ops, "_CK_AVAILABLE", None) is True:
        return "comfy_kitchen"
    # 0.3.7x keeps a plain dict of layout classes and a string-keyed QuantizedTensor.
    if isinstance(getattr(quant_ops, "LAYOUTS", None), dict) and hasattr(quant_ops, "register_layout_op"):
        return "comfy_quant_ops"
    return "none"


def quantized_tensor_class() -> type | None:
    """ComfyUI's QuantizedTensor class, or None when this ComfyUI has no usable registry."""
    if quant_backend() == "none":
        return None
    return importlib.import_module("comfy.quant_ops").QuantizedTensor


def is_comfy_quantized(t: object) -> bool:
    cls = quantized_tensor_class()
    return cls is not None and isinstance(t, cls)


def is_dynamic(patcher: Any) -> bool:
    """True for a Dynamic VRAM patcher (0.29+ on NVIDIA), which pages weights itself."""
    probe = getattr(patcher, "is_dynamic", None)
    return bool(probe()) if callable(probe) else False


def model_management() -> Any:
    return importlib.import_module("comfy.model_management")


def sampler_helpers() -> Any:
    return importlib.import_module("comfy.sampler_helpers")


def wrappers_mp() -> Any:
    return importlib.import_module("comfy.patcher_extension").WrappersMP


def callbacks_mp() -> Any:
    return importlib.import_module("comfy.patcher_extension").CallbacksMP


def attention_function(name: str) -> Callable[..., torch.Tensor] | None:
    """ComfyUI's registered attention backend `name` ("pytorch", "sub_quad", "split", "sage", "flash",
    "xformers", ...), or None when this ComfyUI or this machine lacks it."""
    attention = importlib.import_module("comfy.ldm.modules.attention")
    getter = getattr(attention, "get_attention_function", None)
    if getter is None:
        return None
    return getter(name, default=None)


class _NoProgress:
    def update(self, value: int) -> None:
        pass


def progress_bar(total: int) -> Any:
    """ComfyUI's progress bar (shown on the running node), or a silent stand-in outside ComfyUI."""
    try:
        utils = importlib.import_module("comfy.utils")
    except ImportError:
        return _NoProgress()
    return utils.ProgressBar(total)


def offload_device(patcher: Any) -> torch.device:
    return torch.device(patcher.offload_device)


def load_device(patcher: Any) -> torch.device:
    return torch.device(patcher.load_device)


def describe() -> str:
    """One line for logs: the ComfyUI version and the quantized-tensor route it offers."""
    return f"ComfyUI {comfyui_version()}, quantized tensors: {quant_backend()}"


def torch_device(device: Any) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


@functools.cache
def offload_buffer_rule() -> str:
    """How the legacy loader sizes its streaming buffer: "next_layers" (0.29+: from the next layers in
    flight, its ``_load_list`` takes ``for_dynamic``) or "multiply" (0.3.7x: one layer's cost, multiplied)."""
    params = inspect.signature(model_patcher_class()._load_list).parameters
    return "next_layers" if "for_dynamic" in params else "multiply"


def quantized_parts(t: Any) -> tuple[torch.Tensor, Any]:
    """The codes and the layout parameters of a ComfyUI QuantizedTensor, the parameters readable as a
    mapping (``p["scale"]``): comfy-kitchen (0.29+) keeps a Params dataclass, 0.3.7x a dict."""
    params = getattr(t, "_params", None)
    if params is not None:
        return t._qdata, _AttrMapping(params)
    return t._qdata, t._layout_params


class _AttrMapping:
    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getitem__(self, name: str) -> Any:
        return getattr(self._obj, name)


def quantized_layout_name(t: Any) -> str:
    """The layout name of a ComfyUI QuantizedTensor (``_layout_cls`` on 0.29+, ``_layout_type`` on 0.3.7x)."""
    return str(getattr(t, "_layout_cls", None) or getattr(t, "_layout_type", None))


def model_patcher_class() -> type:
    """ComfyUI's legacy ModelPatcher class (the one whose loader honours a resident budget)."""
    return importlib.import_module("comfy.model_patcher").ModelPatcher  # type: ignore[no-any-return]


def free_memory(patcher: Any, device: torch.device) -> int:
    """Memory a model can have on `device` now. Under Dynamic VRAM `torch.cuda.mem_get_info` under-reports
    it: 0.29's ``ModelPatcher.get_free_memory`` adds what other models' VBARs give back; older ComfyUIs have
    only ``model_management.get_free_memory``."""
    probe = getattr(patcher, "get_free_memory", None)
    if callable(probe):
        return int(probe(device))
    return int(model_management().get_free_memory(device))


def set_model_options_wrapper(model_options: dict[str, Any], wrapper_type: str, key: str,
                              wrapper: Callable[..., Any]) -> None:
    """Puts `wrapper` under `key` in a model_options dict (a sampling run's own copy), replacing what was
    there: the same storage ``ModelPatcher.add_wrapper_with_key`` uses, on every supported version."""
    wrappers = model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
    wrappers.setdefault(wrapper_type, {})[key] = [wrapper]
