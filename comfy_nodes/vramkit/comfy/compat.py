"""What differs between the ComfyUI versions VRAMKit supports, in one place.

Supported: ComfyUI 0.3.7x (its own ``comfy.quant_ops`` registry, legacy ModelPatcher) and 0.29 or later
(quantized tensors from the comfy-kitchen package, Dynamic VRAM). Everything here imports ComfyUI lazily, so
importing this module outside ComfyUI is harmless; the functions need ComfyUI on ``sys.path``.
"""

from __future__ import annotations

import functools
import importlib
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


def model_patcher_class() -> type:
    """ComfyUI's legacy ModelPatcher class (the one whose loader honours a resident budget)."""
    return importlib.import_module("comfy.model_patcher").ModelPatcher  # type: ignore[no-any-return]
