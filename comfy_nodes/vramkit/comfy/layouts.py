"""VRAMKit's quantized weights as ComfyUI ``QuantizedTensor`` layouts.

Where ComfyUI has a layout of its own, the weight goes into it, so ComfyUI treats it as it treats a quantized
checkpoint (its kernels, LoRA requantization, Dynamic VRAM, ``ModelSave``):

- 0.29+ (comfy-kitchen): per-tensor fp8 -> ``float8_e4m3fn`` / ``float8_e5m2`` (``TensorCoreFP8E4M3Layout``,
  ``TensorCoreFP8E5M2Layout``); per-tensor and per-channel (per-row) INT8 -> ``int8_tensorwise``
  (``TensorWiseINT8Layout``, a scalar or ``[out, 1]`` float32 scale), optionally ConvRot-rotated by
  comfy-kitchen's own functions (`native_convrot_weight`). `native_weight` builds them; the module that holds
  one is ComfyUI's mixed-precision Linear (`quantized_ops`).
- 0.3.7x (``comfy.quant_ops``): per-tensor fp8 -> ``TensorCoreFP8Layout``, its only layout.

ComfyUI has no per-group INT8 (nor per-channel or per-group fp8). For those this module registers one more
layout, ``VRAMKitBlockScaledLayout`` (8-bit codes, one float32 scale per tensor, output channel or group of
consecutive elements), into whichever registry the running ComfyUI has:

- 0.29+: comfy-kitchen's ``register_layout_class`` (typed ``Params`` dataclass) and ``register_layout_op``;
- 0.3.7x: ``comfy.quant_ops.LAYOUTS`` (params in a dict) and its string-keyed ``register_layout_op``.

Either way a module whose ``weight`` is such a tensor goes through ComfyUI's own cast path
(``comfy.ops.cast_bias_weight`` dequantizes it), its lowvram streaming and, on 0.29+, Dynamic VRAM, which
moves quantized tensors through ``__tensor_flatten__``. The numbers are `vramkit.quant`'s: quantizing and
dequantizing here call it, so the Rust core does the work on CPU tensors, and `dequantize_to` (the
weight-only forward of every layout but ConvRot's) keeps its temporaries bounded on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import torch

from .. import quant
from ..quant import TORCH_FP8 as _TORCH_FP8
from . import compat

LAYOUT_NAME = "VRAMKitBlockScaledLayout"



def storage_codes(q: quant.QTensor) -> torch.Tensor:
    """The codes as ComfyUI stores them: int8, or the float8 dtype for fp8 (same bytes as vramkit's uint8)."""
    return q.data.view(_TORCH_FP8[q.format]) if q.format in _TORCH_FP8 else q.data


def as_qtensor(qdata: torch.Tensor, scale: torch.Tensor, format: str, granularity: str, group_size: int,
               dtype: torch.dtype) -> quant.QTensor:
    """A `vramkit.quant.QTensor` over ComfyUI-stored codes (no copy)."""
    codes = qdata.view(torch.uint8) if format in _TORCH_FP8 else qdata
    return quant.QTensor(codes.contiguous(), scale, format, granularity, group_size or None, qdata.shape,
                         dtype)


def _dequantize(qdata: torch.Tensor, scale: torch.Tensor, format: str, granularity: str, group_size: int,
                dtype: torch.dtype) -> torch.Tensor:
    if scale.device != qdata.device:
        scale = scale.to(qdata.device)
    return as_qtensor(qdata, scale, format, granularity, group_size, dtype).dequantize(dtype)


def _quantize(tensor: torch.Tensor, format: str, granularity: str, group_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    q = quant.quantize(tensor, format, granularity, group_size or None)
    assert q.scale is not None
    return storage_codes(q), q.scale


def _scheme(weight: Any) -> tuple[torch.Tensor, torch.Tensor, str, str, int]:
    """Codes, scale, format, granularity and group size of a VRAMKitBlockScaledLayout tensor (either
    version's QuantizedTensor)."""
    qdata, p = compat.quantized_parts(weight)
    return qdata, p["scale"], p["format"], p["granularity"], p["group_size"]


def _weight_for(input: torch.Tensor, weight: Any) -> torch.Tensor:
    """The weight dequantized straight into the activation's dtype on its device: ``(codes * scale)`` in
    float32, rounded once to ``input.dtype`` (not to orig_dtype first and then again)."""
    qdata, scale, format, granularity, group_size = _scheme(weight)
    if qdata.device != input.device:
        qdata = qdata.to(input.device)  # move the small codes, not the wide result
    return _dequantize(qdata, scale, format, granularity, group_size, input.dtype)


# --- comfy-kitchen (ComfyUI 0.29+) -------------------------------------------------------------------------

@functools.cache
def _kitchen_layout() -> type:
    tensor_api = importlib.import_module("comfy_kitchen.tensor")
    base_params = tensor_api.BaseLayoutParams

    @dataclasses.dataclass(frozen=True)
    class Params(base_params):  # type: ignore[misc, valid-type]
        format: str = "int8"
        granularity: str = "group"
        group_size: int = 0

        def _tensor_fields(self) -> list[str]:
            return ["scale"]

    class VRAMKitBlockScaledLayout(tensor_api.QuantizedLayout):  # type: ignore[misc, name-defined]
        """8-bit codes with one float32 scale per tensor, output channel or group (vramkit.quant math)."""

        @classmethod
        def quantize(cls, tensor: torch.Tensor, scale: Any = None, stochastic_rounding: int = 0,
                     inplace_ops: bool = False, format: str = "int8", granularity: str = "group",
                     group_size: int = quant.DEFAULT_GROUP_SIZE, **kwargs: Any) -> tuple[torch.Tensor, Any]:
            # Scales are always recomputed and rounding is to nearest: requantizing after a LoRA merge is
            # then bit-reproducible. `scale`/`stochastic_rounding` are accepted for ComfyUI's call sites.
            group_size = group_size if granularity == "group" else 0
            qdata, qscale = _quantize(tensor, format, granularity, group_size)
            return qdata, Params(scale=qscale, orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape),
                                 format=format, granularity=granularity, group_size=group_size)

        @classmethod
        def dequantize(cls, qdata: torch.Tensor, params: Any) -> torch.Tensor:
            return _dequantize(qdata, params.scale, params.format, params.granularity, params.group_size,
                               params.orig_dtype)

        @classmethod
        def get_plain_tensors(cls, qtensor: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return qtensor._qdata, qtensor._params.scale

        @classmethod
        def state_dict_tensors(cls, qdata: torch.Tensor, params: Any) -> dict[str, torch.Tensor]:
            return {"": qdata, "_scale": params.scale}

        @classmethod
        def requantize_kwargs(cls, qtensor: Any) -> dict[str, Any]:
            p = qtensor._params
            return {"format": p.format, "granularity": p.granularity, "group_size": p.group_size}

    VRAMKitBlockScaledLayout.Params = Params
    tensor_api.register_layout_class(LAYOUT_NAME, VRAMKitBlockScaledLayout)

    def linear(qt: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        input, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return torch.nn.functional.linear(input, _weight_for(input, weight), bias)

    def convolution(qt: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        input, weight, *rest = args
        return torch.ops.aten.convolution.default(input, _weight_for(input, weight), *rest, **kwargs)

    tensor_api.register_layout_op(torch.ops.aten.linear.default, VRAMKitBlockScaledLayout)(linear)
    tensor_api.register_layout_op(torch.ops.aten.convolution.default, VRAMKitBlockScaledLayout)(convolution)
    return VRAMKitBlockScaledLayout


def _kitchen_tensor(q: quant.QTensor, dtype: torch.dtype) -> torch.Tensor:
    quant_ops = importlib.import_module("comfy.quant_ops")
    tensor_api = importlib.import_module("comfy_kitchen.tensor")
    qdata, shape = storage_codes(q), tuple(q.shape)
    assert q.scale is not None
    if q.granularity == "tensor" and q.format in _TORCH_FP8:
        name = "TensorCoreFP8E4M3Layout" if q.format == "fp8_e4m3fn" else "TensorCoreFP8E5M2Layout"
        params = tensor_api.get_layout_class(name).Params(scale=q.scale, orig_dtype=dtype, orig_shape=shape)
        return quant_ops.QuantizedTensor(qdata, name, params)
    return _kitchen_ours(q, dtype)


def _kitchen_ours(q: quant.QTensor, dtype: torch.dtype) -> torch.Tensor:
    quant_ops = importlib.import_module("comfy.quant_ops")
    assert q.scale is not None
    params = _kitchen_layout().Params(scale=q.scale, orig_dtype=dtype, orig_shape=tuple(q.shape),
                                      format=q.format, granularity=q.granularity, group_size=q.group_size or 0)
    return quant_ops.QuantizedTensor(storage_codes(q), LAYOUT_NAME, params)


# --- comfy.quant_ops (ComfyUI 0.3.7x) ---------------------------------------------------------------------

@functools.cache
def _legacy_layout() -> type:
    quant_ops = importlib.import_module("comfy.quant_ops")

    class VRAMKitBlockScaledLayout(quant_ops.QuantizedLayout):  # type: ignore[misc, name-defined]
        """8-bit codes with one float32 scale per tensor, output channel or group (vramkit.quant math)."""

        @classmethod
        def quantize(cls, tensor: torch.Tensor, format: str = "int8", granularity: str = "group",
                     group_size: int = quant.DEFAULT_GROUP_SIZE, **kwargs: Any
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
            group_size = group_size if granularity == "group" else 0
            qdata, scale = _quantize(tensor, format, granularity, group_size)
            return qdata, {"scale": scale, "orig_dtype": tensor.dtype, "format": format,
                           "granularity": granularity, "group_size": group_size}

        @staticmethod
        def dequantize(qdata: torch.Tensor, scale: torch.Tensor, orig_dtype: torch.dtype, format: str,
                       granularity: str, group_size: int, **kwargs: Any) -> torch.Tensor:
            return _dequantize(qdata, scale, format, granularity, group_size, orig_dtype)

        @classmethod
        def get_plain_tensors(cls, qtensor: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return qtensor._qdata, qtensor._layout_params["scale"]

    quant_ops.LAYOUTS[LAYOUT_NAME] = VRAMKitBlockScaledLayout

    def linear(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        input, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return torch.nn.functional.linear(input, _weight_for(input, weight), bias)

    def convolution(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        input, weight, *rest = args
        return func(input, _weight_for(input, weight), *rest, **kwargs)

    quant_ops.register_layout_op(torch.ops.aten.linear.default, LAYOUT_NAME)(linear)
    quant_ops.register_layout_op(torch.ops.aten.convolution.default, LAYOUT_NAME)(convolution)
    return VRAMKitBlockScaledLayout


def _legacy_tensor(q: quant.QTensor, dtype: torch.dtype) -> torch.Tensor:
    quant_ops = importlib.import_module("comfy.quant_ops")
    assert q.scale is not None
    if q.granularity == "tensor" and q.format in _TORCH_FP8:
        # The native fp8 layout dequantizes ``codes.to(orig_dtype) * scale`` for either fp8 dtype.
        return quant_ops.QuantizedTensor(storage_codes(q), "TensorCoreFP8Layout",
                                         {"scale": q.scale, "orig_dtype": dtype})
    return _legacy_ours(q, dtype)


def _legacy_ours(q: quant.QTensor, dtype: torch.dtype) -> torch.Tensor:
    quant_ops = importlib.import_module("comfy.quant_ops")
    assert q.scale is not None
    _legacy_layout()
    return quant_ops.QuantizedTensor(storage_codes(q), LAYOUT_NAME, {
        "scale": q.scale, "orig_dtype": dtype, "format": q.format, "granularity": q.granularity,
        "group_size": q.group_size or 0})


# --- ComfyUI's own layouts (0.29+, comfy-kitchen) ---------------------------------------------------------

#: fp8 storage dtype -> VRAMKit format name.
_FP8_FORMAT = {dtype: fmt for fmt, dtype in _TORCH_FP8.items()}


def native_format(format: str, granularity: str) -> str | None:
    """ComfyUI's format string for `format` at `granularity` (``"int8_tensorwise"``, ``"float8_e4m3fn"``,
    ...), or None where ComfyUI has no such layout (per-group scales, per-channel fp8)."""
    if format == "int8" and granularity in ("tensor", "channel"):
        return compat.NATIVE_FORMAT_NAMES[format]
    if format in _TORCH_FP8 and granularity == "tensor":
        return compat.NATIVE_FORMAT_NAMES[format]
    return None


def native_weight(q: quant.QTensor, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    """`q` (VRAMKit's codes and scales, unchanged) as a QuantizedTensor of ComfyUI's own layout, and that
    layout's format string. A per-channel INT8 scale ``[out]`` becomes the per-row ``[out, 1]`` comfy-kitchen
    expects; the dequantized values are the same: ``float32(code) * scale``."""
    fmt = native_format(q.format, q.granularity)
    if fmt is None or q.scale is None:
        raise ValueError(f"ComfyUI has no layout for {q.format} per {q.granularity}")
    qo = compat.quant_ops()
    algo = qo.QUANT_ALGOS[fmt]
    layout = algo["comfy_tensor_layout"]
    scale = q.scale.to(torch.float32)
    scale = scale.reshape(-1, 1) if q.granularity == "channel" else scale.reshape(())
    codes = storage_codes(q)
    if codes.dtype != algo["storage_t"]:
        raise TypeError(f"{fmt} stores {algo['storage_t']}, VRAMKit's codes are {codes.dtype}")
    params = qo.get_layout_class(layout).Params(scale=scale, orig_dtype=dtype, orig_shape=tuple(q.shape))
    return qo.QuantizedTensor(codes, layout, params), fmt


def native_convrot_weight(weight: torch.Tensor, dtype: torch.dtype, group_size: int) -> torch.Tensor:
    """`weight` rotated by ConvRot (block Hadamard of `group_size`) and quantized to per-row INT8 by
    comfy-kitchen itself (``TensorWiseINT8Layout.quantize(convrot=True)``), as a ComfyUI QuantizedTensor that
    dequantizes (and un-rotates) to `dtype`. The rotation is computed in float32."""
    qo = compat.quant_ops()
    qt = qo.QuantizedTensor.from_float(weight.float(), "TensorWiseINT8Layout", is_weight=True, per_channel=True,
                                       convrot=True, convrot_groupsize=group_size)
    params = dataclasses.replace(qt._params, orig_dtype=dtype)
    return qo.QuantizedTensor(qt._qdata, "TensorWiseINT8Layout", params)  # type: ignore[no-any-return]


def quantized_bytes(t: torch.Tensor) -> int:
    """Bytes a ComfyUI QuantizedTensor stores: codes plus scales."""
    qdata, p = compat.quantized_parts(t)
    scale = p["scale"]
    return int(qdata.nbytes + (scale.nbytes if isinstance(scale, torch.Tensor) else 0))


def dequantize_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ComfyUI QuantizedTensor dequantized into `dtype` with VRAMKit's formula and bounded temporaries
    (``float32(code) * scale``, rounded once; the output plus at most 64 MiB on a device).

    For VRAMKit's layout, ComfyUI's per-tensor fp8 and its un-rotated ``int8_tensorwise`` the codes and scales
    are read as they are (for INT8 these are exactly comfy-kitchen's own dequantized values); a ConvRot weight
    or any other layout goes through its layout's own ``dequantize``.
    """
    name = compat.quantized_layout_name(t)
    if name == LAYOUT_NAME:
        qdata, scale, format, granularity, group_size = _scheme(t)
        return _dequantize(qdata, scale, format, granularity, group_size, dtype)
    qdata, p = compat.quantized_parts(t)
    scale, params = p["scale"], compat.native_params(t)
    plain = isinstance(scale, torch.Tensor) and not getattr(params, "transposed", False)
    if plain and name == "TensorWiseINT8Layout" and not getattr(params, "convrot", False):
        granularity = "tensor" if scale.numel() == 1 else "channel"
        return _dequantize(qdata, scale.reshape(-1) if granularity == "channel" else scale.reshape(()),
                           "int8", granularity, 0, dtype)
    if plain and qdata.dtype in _FP8_FORMAT and scale.numel() == 1 and name.startswith("TensorCoreFP8"):
        return _dequantize(qdata, scale.reshape(()), _FP8_FORMAT[qdata.dtype], "tensor", 0, dtype)
    return t.to(dtype=dtype).dequantize()  # type: ignore[no-any-return, operator]


# --- the one entry point -----------------------------------------------------------------------------------

def comfy_weight(q: quant.QTensor, dtype: torch.dtype) -> torch.Tensor:
    """`q` as a ComfyUI ``QuantizedTensor`` that dequantizes to `dtype`, for a module that is not ComfyUI's
    mixed-precision Linear (a Conv, or any layer on 0.3.7x).

    Per-tensor fp8 uses ComfyUI's fp8 layout; everything else, per-tensor INT8 included, uses
    ``VRAMKitBlockScaledLayout``: ComfyUI's ``TensorWiseINT8Layout`` also quantizes the activations when its
    weight reaches ``F.linear`` (W8A8), which only the mixed-precision Linear controls (`native_weight`).
    Raises RuntimeError when this ComfyUI has no quantized-tensor registry
    (check `compat.quant_backend()` first and use `quantized_ops`' own modules instead).
    """
    backend = compat.quant_backend()
    if backend == "comfy_kitchen":
        return _kitchen_tensor(q, dtype)
    if backend == "comfy_quant_ops":
        return _legacy_tensor(q, dtype)
    raise RuntimeError(f"{compat.describe()}: no QuantizedTensor registry to hold a {q.format} weight")


def ours(q: quant.QTensor, dtype: torch.dtype) -> torch.Tensor:
    """`q` in ``VRAMKitBlockScaledLayout`` whatever its scheme (even where ComfyUI has a layout of its own)."""
    backend = compat.quant_backend()
    if backend == "comfy_kitchen":
        _kitchen_layout()
        return _kitchen_ours(q, dtype)
    if backend == "comfy_quant_ops":
        _legacy_layout()
        return _legacy_ours(q, dtype)
    raise RuntimeError(f"{compat.describe()}: no QuantizedTensor registry to hold a {q.format} weight")


def layout_name(t: torch.Tensor) -> str:
    """The layout of a ComfyUI QuantizedTensor (either version's attribute name)."""
    return compat.quantized_layout_name(t)


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a ComfyUI QuantizedTensor, in the dtype it reports as original."""
    return t.dequantize()  # type: ignore[no-any-return, operator]
