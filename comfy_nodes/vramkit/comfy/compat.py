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


# --- ComfyUI's native quantized layouts (0.29+: comfy-kitchen tensors and mixed-precision ops) ---------------

#: VRAMKit format -> ComfyUI's ``QUANT_ALGOS`` format string (the ``comfy_quant`` "format" of a layer).
NATIVE_FORMAT_NAMES = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "int8": "int8_tensorwise"}
_NATIVE_PARAM_FIELDS = {"int8_tensorwise": {"scale", "orig_dtype", "orig_shape", "is_weight", "convrot",
                                            "convrot_groupsize"},
                        "float8_e4m3fn": {"scale", "orig_dtype", "orig_shape"},
                        "float8_e5m2": {"scale", "orig_dtype", "orig_shape"}}


def quant_ops() -> Any:
    return importlib.import_module("comfy.quant_ops")


def comfy_ops() -> Any:
    return importlib.import_module("comfy.ops")


@functools.cache
def native_layout_problem() -> str | None:
    """Why this ComfyUI's native layouts (``float8_*``, ``int8_tensorwise`` in ComfyUI's mixed-precision
    Linear) cannot hold VRAMKit's weights, or None when they can.

    Checks the shape of the API VRAMKit relies on (comfy-kitchen's layout registry and Params fields, the
    ``QUANT_ALGOS`` entries, ``mixed_precision_ops``' Linear and its weight-only forward), so a ComfyUI or
    comfy-kitchen that changed it is detected up front and VRAMKit's own layout is used instead.
    """
    if quant_backend() != "comfy_kitchen":
        return f"ComfyUI {comfyui_version()} has no comfy-kitchen quantized tensors"
    try:
        import dataclasses

        qo, ops = quant_ops(), comfy_ops()
        for fmt, fields in _NATIVE_PARAM_FIELDS.items():
            algo = qo.QUANT_ALGOS.get(fmt)
            if algo is None:
                return f"ComfyUI's QUANT_ALGOS has no {fmt!r}"
            layout = qo.get_layout_class(algo["comfy_tensor_layout"])
            names = {f.name for f in dataclasses.fields(layout.Params)}
            if not fields <= names:
                return (f"{algo['comfy_tensor_layout']}.Params lacks {', '.join(sorted(fields - names))} "
                        "(comfy-kitchen changed)")
        if qo.QUANT_ALGOS["int8_tensorwise"].get("comfy_tensor_layout") != "TensorWiseINT8Layout":
            return "int8_tensorwise is no longer TensorWiseINT8Layout"
        for name in ("mixed_precision_ops", "cast_bias_weight", "uncast_bias_weight"):
            if not callable(getattr(ops, name, None)):
                return f"comfy.ops has no {name}"
        linear = mixed_precision_linear(torch.float32)
        init = inspect.signature(linear.__init__).parameters
        forward = inspect.signature(linear.forward_comfy_cast_weights).parameters
        if not {"in_features", "out_features", "bias", "device"} <= init.keys():
            return "mixed_precision_ops().Linear takes other constructor arguments"
        if "weight_only_quant" not in forward:
            return "mixed_precision_ops().Linear has no weight-only forward (weight_only_quant)"
        for method in ("set_weight", "convert_weight", "state_dict", "_apply"):
            if not callable(getattr(linear, method, None)):
                return f"mixed_precision_ops().Linear has no {method}"
    except Exception as exc:  # any surprise in a private API means: do not use it
        return f"unexpected comfy-kitchen/ComfyUI API: {type(exc).__name__}: {exc}"
    return None


@functools.cache
def mixed_precision_linear(compute_dtype: torch.dtype) -> Any:
    """ComfyUI's mixed-precision Linear (the class its loader builds for a layer of a quantized checkpoint)."""
    return comfy_ops().mixed_precision_ops({}, compute_dtype, full_precision_mm=False).Linear


def is_mixed_precision_linear(module: object) -> bool:
    """A ComfyUI mixed-precision Linear (any ``mixed_precision_ops`` call's class)."""
    return any(c.__qualname__.endswith("MixedPrecisionOps.Linear") for c in type(module).__mro__)


def native_layer_format(module: object) -> str | None:
    """The ComfyUI format (``comfy_quant`` "format") of a layer ComfyUI treats as quantized, else None."""
    fmt = getattr(module, "quant_format", None)
    if fmt is None or getattr(module, "layout_type", None) is None:
        return None
    return str(fmt)


def native_params(t: Any) -> Any:
    """The layout parameters of a comfy-kitchen QuantizedTensor (a Params dataclass); None for 0.3.7x's."""
    return getattr(t, "_params", None)


# ---------------------------------------------------------------------------------------------------------
# Memory managers and the per-model VRAM budget (comfy/budget.py)

#: comfy-aimdo's VBAR page (``VBAR_PAGE_SIZE`` in its C source, 32 MiB): the unit in which a Dynamic VRAM
#: model is resident, and in which its watermark is counted (``vbar_set_watermark`` rounds a byte count up to
#: whole pages, so a cap given in whole pages is exact).
AIMDO_PAGE_BYTES = 32 << 20
#: Python ``ModelVBAR.alloc`` aligns every slice to this many bytes.
AIMDO_ALLOC_ALIGN = 512
#: ``ModelPatcherDynamic.load`` gives a module a VBAR slice only above this size (smaller ones are loaded as
#: ordinary tensors), and sorts modules below ``_DYNAMIC_SMALL`` first.
DYNAMIC_FORCE_LOAD_BYTES = 16 * 1024
DYNAMIC_SMALL_BYTES = 64 * 1024

MemoryManager = Literal["dynamic", "legacy"]


def memory_manager(patcher: Any) -> MemoryManager:
    """Which ComfyUI memory manager loads `patcher`: "dynamic" (``ModelPatcherDynamic``, comfy-aimdo pages
    the weights on demand; 0.29+ on NVIDIA) or "legacy" (``ModelPatcher``: resident part sized at load)."""
    return "dynamic" if is_dynamic(patcher) else "legacy"


def memory_estimate(patcher: Any, noise_shape: Any, conds: Any) -> int:
    """ComfyUI's activation estimate for one sampling run (``sampler_helpers.estimate_memory``: the CFG
    batch, twice the latent batch)."""
    required, _minimum = sampler_helpers().estimate_memory(patcher, noise_shape, conds)
    return int(required)


def _model_vbar_class() -> type | None:
    try:
        return importlib.import_module("comfy_aimdo.model_vbar").ModelVBAR  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        return None


def vbar_watermark_problem(patcher: Any) -> str | None:
    """Why a Dynamic VRAM patcher's VBAR cannot be capped (comfy-aimdo's API is missing or not what VRAMKit
    was written against: ``model.dynamic_vbars[device].set_watermark(bytes)`` applied from an ``ON_LOAD``
    callback), or None when it can. Only the shape of the API is checked here; `set_vbar_watermark` reads the
    watermark back after setting it."""
    if not is_dynamic(patcher):
        return "this model is not loaded by Dynamic VRAM"
    vbars = getattr(getattr(patcher, "model", None), "dynamic_vbars", None)
    if not isinstance(vbars, dict):
        return "ComfyUI's model has no dynamic_vbars table (ComfyUI's Dynamic VRAM internals changed)"
    if not hasattr(callbacks_mp(), "ON_LOAD") or not callable(getattr(patcher, "add_callback_with_key", None)):
        return "this ComfyUI has no ON_LOAD model callbacks"
    cls = _model_vbar_class()
    if cls is None:
        return "comfy_aimdo.model_vbar.ModelVBAR is missing (comfy-aimdo not installed or changed)"
    setter = getattr(cls, "set_watermark", None)
    if not callable(setter):
        return (f"this comfy-aimdo ({_aimdo_version()}) has no ModelVBAR.set_watermark: the per-model cap "
                "needs comfy-aimdo 0.4.x")
    try:
        params = [p for p in inspect.signature(setter).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return None
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1:
        return (f"comfy-aimdo {_aimdo_version()} changed ModelVBAR.set_watermark (it takes "
                f"{', '.join(p.name for p in params) or 'no argument'}; VRAMKit passes one byte count)")
    return None


def _aimdo_version() -> str:
    try:
        return str(importlib.import_module("comfy_aimdo._version").__version__)
    except (ImportError, AttributeError):
        return "version unknown"


def model_vbar(patcher: Any) -> Any | None:
    """The VBAR of `patcher`'s model on its load device (created by its first Dynamic VRAM load), or None."""
    vbars = getattr(getattr(patcher, "model", None), "dynamic_vbars", None)
    if not isinstance(vbars, dict):
        return None
    return vbars.get(patcher.load_device)


def set_vbar_watermark(patcher: Any, nbytes: int) -> tuple[int | None, str | None]:
    """Caps the resident pages of `patcher`'s VBAR at `nbytes` (a multiple of `AIMDO_PAGE_BYTES` is exact;
    comfy-aimdo rounds up to whole pages and frees the pages above at once). Returns the cap now in force in
    bytes (read back from the VBAR when it can say) and None, or None and why it could not be set."""
    vbar = model_vbar(patcher)
    if vbar is None:
        return None, f"the model has no VBAR on {patcher.load_device} (not loaded by Dynamic VRAM)"
    try:
        vbar.set_watermark(int(nbytes))
    except Exception as exc:  # a changed aimdo API shows up here: report it, never fail the load
        return None, f"ModelVBAR.set_watermark failed: {type(exc).__name__}: {exc}"
    pages = -(-int(nbytes) // AIMDO_PAGE_BYTES)
    getter, count = getattr(vbar, "get_watermark", None), getattr(vbar, "get_nr_pages", None)
    if not callable(getter):
        return pages * AIMDO_PAGE_BYTES, None
    try:
        now = int(getter())
        total = int(count()) if callable(count) else None
    except Exception as exc:
        return pages * AIMDO_PAGE_BYTES, f"set, but could not read the watermark back ({type(exc).__name__})"
    expected = pages if total is None else min(pages, total)
    if now != expected:
        return None, (f"comfy-aimdo did not take the cap: its watermark reads {now} pages after asking for "
                      f"{expected} (aimdo's VBAR semantics changed)")
    return now * AIMDO_PAGE_BYTES, None


def forced_resident_bytes(patcher: Any) -> int:
    """Bytes of `patcher`'s model loaded as ordinary tensors: everything under the legacy loader; under
    Dynamic VRAM the small weights and buffers ComfyUI keeps resident outside the VBAR."""
    return int(getattr(patcher.model, "model_loaded_weight_memory", 0))


def legacy_clone(patcher: Any) -> tuple[Any | None, str]:
    """A clone of a Dynamic VRAM patcher on the legacy loader (``clone(disable_dynamic=True)``, what core's
    ``SelectModelDevice`` does: ComfyUI re-creates the model from its loader, ``cached_patcher_init``), or
    None and why not."""
    try:
        names = set(inspect.signature(patcher.clone).parameters)
    except (TypeError, ValueError):
        names = set()
    if "disable_dynamic" not in names:
        return None, "this ComfyUI's ModelPatcher.clone has no disable_dynamic"
    if getattr(patcher, "cached_patcher_init", None) is None:
        return None, ("the loader that made this model cannot re-create it (no cached_patcher_init; core's "
                      "UNETLoader and CheckpointLoaderSimple can)")
    try:
        return patcher.clone(disable_dynamic=True), ""
    except Exception as exc:
        return None, f"clone(disable_dynamic=True) failed: {type(exc).__name__}: {exc}"


def vbar_slot_bytes(t: Any, dtype: torch.dtype | None) -> int:
    """The VBAR bytes ``ModelPatcherDynamic.load`` reserves for one weight or bias `t` (``vram_aligned_size``
    of the tensor in the model dtype `dtype`; a QuantizedTensor's inner tensors as they are)."""
    if t is None:
        return 0
    mem = importlib.import_module("comfy.memory_management")
    if is_comfy_quantized(t):
        return int(mem.vram_aligned_size(t))
    geometry = mem.TensorGeometry(shape=t.shape, dtype=dtype or t.dtype)
    return int(mem.vram_aligned_size(geometry))

def native_quant_formats() -> frozenset[str]:
    """The ``comfy_quant`` marker formats this ComfyUI's stock loader reads (``QUANT_ALGOS``): ``float8_e4m3fn``
    on 0.3.7x (header form only); fp8, ``int8_tensorwise`` (with ConvRot) and more on 0.29+."""
    try:
        quant_ops = importlib.import_module("comfy.quant_ops")
    except ImportError:
        return frozenset()
    return frozenset(getattr(quant_ops, "QUANT_ALGOS", {}) or {})


def reads_convrot() -> bool:
    """Whether this ComfyUI undoes a ConvRot rotation (``"convrot": true`` on ``int8_tensorwise``; 0.29+)."""
    return "int8_tensorwise" in native_quant_formats()


def operations_base() -> type:
    """ComfyUI's op set that casts weights to the input's dtype at each call (``comfy.ops.manual_cast``),
    the base of custom operations handed to the loader as ``model_options["custom_operations"]``."""
    return importlib.import_module("comfy.ops").manual_cast  # type: ignore[no-any-return]


def load_diffusion_model(path: str, model_options: dict[str, Any]) -> Any:
    """A MODEL from a diffusion-model file through ComfyUI's own loader (what UNETLoader calls)."""
    return importlib.import_module("comfy.sd").load_diffusion_model(path, model_options=model_options)


def diffusion_model_files() -> list[str]:
    """The files in ComfyUI's ``diffusion_models`` folders; none outside ComfyUI (node declarations are read
    there too, e.g. by tests and tools, and must not fail)."""
    try:
        folder_paths = importlib.import_module("folder_paths")
    except ModuleNotFoundError:
        return []
    return folder_paths.get_filename_list("diffusion_models")  # type: ignore[no-any-return]


def diffusion_model_path(name: str) -> str:
    return importlib.import_module("folder_paths").get_full_path_or_raise("diffusion_models", name)  # type: ignore[no-any-return]


def models_directory() -> str:
    return importlib.import_module("folder_paths").models_dir  # type: ignore[no-any-return]


def temp_directory() -> str:
    return importlib.import_module("folder_paths").get_temp_directory()  # type: ignore[no-any-return]


def output_save_path(filename_prefix: str) -> tuple[str, str, int]:
    """(folder, file name stem, counter) for a new output file, as ComfyUI's save nodes number them."""
    folder_paths = importlib.import_module("folder_paths")
    folder, stem, counter, _, _ = folder_paths.get_save_image_path(filename_prefix,
                                                                   folder_paths.get_output_directory())
    return folder, stem, counter


def throw_if_interrupted() -> None:
    """Raises ComfyUI's interruption exception when the user pressed Cancel (outside ComfyUI: nothing)."""
    try:
        mm = importlib.import_module("comfy.model_management")
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def patch_weights_for_saving(patcher: Any) -> None:
    """Loads `patcher` with its weight patches (LoRA) merged into the weights, as ComfyUI's ModelSave does."""
    importlib.import_module("comfy.model_management").load_models_gpu([patcher], force_patch_weights=True)
