"""Quantized stand-ins for ComfyUI's Linear/Conv ops, installed as per-clone object patches.

A stand-in is a new module holding the quantized weight; the original module, shared by every clone of the
model, is never touched. Three kinds:

- ``native`` (ComfyUI 0.29+, Linear layers whose scheme ComfyUI has: per-tensor fp8, per-tensor or per-row
  INT8): an instance of ComfyUI's own mixed-precision Linear (what its loader builds for a layer of a
  quantized checkpoint) whose weight is a QuantizedTensor of ComfyUI's layout (`layouts.native_weight`), with
  the ``quant_format``/``layout_type`` markers it reads. ComfyUI's code then does the rest: W8A8 matmuls
  through comfy-kitchen's kernels (compute "int8 matmul"), LoRA requantization, device moves, Dynamic VRAM
  and ``state_dict`` with ``comfy_quant`` markers (``ModelSave``). Compute "dequantize" sets
  ``full_precision_matrix_mult`` and is the one forward VRAMKit replaces: the weight is dequantized with
  `layouts.dequantize_to` (bounded temporaries, one rounding) and multiplied in the activations' dtype.
- ``comfy``: a copy of the original op (same class, plus a mixin) whose weight is a ComfyUI
  ``QuantizedTensor`` (`layouts.comfy_weight`: VRAMKit's layout, or 0.3.7x's fp8 one). ComfyUI's own forward
  (``cast_bias_weight``) dequantizes it, its lowvram loader streams it, and Dynamic VRAM pages it.
- ``module`` (for a ComfyUI without a quantized-tensor registry): the weight holds the 8-bit codes, a
  ``weight_scale`` buffer the scales, and the forward dequantizes. Works with the legacy lowvram streaming;
  Dynamic VRAM cannot page it (every ComfyUI that has Dynamic VRAM has the registry, so this never meets it).

The last two implement ComfyUI's ``convert_weight``/``set_weight`` hooks, so a LoRA merges into the
dequantized weight and is requantized with the same scheme (rounding to nearest; ComfyUI's stochastic-rounding
seed is not used); unloading restores the quantized original from ComfyUI's backup. Native layers are
requantized by ComfyUI itself (comfy-kitchen's math, with its stochastic-rounding seed).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import quant
from . import compat, layouts, patch

Route = Literal["comfy", "module"]
Compute = Literal["dequantize", "int8 matmul"]
COMPUTES: tuple[str, ...] = ("dequantize", "int8 matmul")


@dataclass(frozen=True)
class Scheme:
    """How a stand-in's weight is quantized, kept so a LoRA merge can requantize the same way."""

    format: str
    granularity: str
    group_size: int | None
    dtype: torch.dtype
    """What the weight dequantizes to (the compute dtype of the layer)."""
    route: Route
    compute: Compute = "dequantize"
    """Native layers only: dequantize the weight (weight-only) or run ComfyUI's INT8 W8A8 matmul."""


def default_route() -> Route:
    return "module" if compat.quant_backend() == "none" else "comfy"


def is_quantized_op(module: torch.nn.Module) -> bool:
    """A stand-in made by VRAMKit (any kind)."""
    return isinstance(module, (_ComfyQuantizedOp, _OwnQuantizedOp, _NativeQuantizedOp))


def native_copy(original: torch.nn.Module, weight: torch.Tensor, format_name: str, scheme: Scheme,
                parameters: Mapping[str, torch.Tensor | None],
                buffers: Mapping[str, torch.Tensor | None]) -> torch.nn.Module:
    """A stand-in for the Linear `original`: ComfyUI's mixed-precision Linear holding `weight` (a
    QuantizedTensor of ComfyUI's layout for `format_name`, e.g. ``int8_tensorwise``).

    `parameters` and `buffers` are the original's unpatched tensors; all but the weight go in as they are.
    Raises (TypeError, ValueError, AttributeError) when the original is not a Linear of the usual shape.
    """
    out_features, in_features = weight.shape
    if (getattr(original, "in_features", in_features), getattr(original, "out_features", out_features)) != (
            in_features, out_features):
        raise ValueError(f"{type(original).__name__} is not a Linear of weight shape {tuple(weight.shape)}")
    cls = _stand_in_class(_NativeQuantizedOp, compat.mixed_precision_linear(scheme.dtype))
    new = cls(in_features, out_features, bias=False, device="meta")
    new.factory_kwargs = {"device": weight.device, "dtype": scheme.dtype}
    new.quant_format = format_name
    new.layout_type = compat.quant_ops().QUANT_ALGOS[format_name]["comfy_tensor_layout"]
    weight_only = scheme.compute == "dequantize"
    new._full_precision_mm = weight_only
    new._full_precision_mm_config = weight_only  # written as "full_precision_matrix_mult" in comfy_quant
    new._parameters = {name: None if t is None else torch.nn.Parameter(t, requires_grad=False)
                       for name, t in {**parameters, "weight": weight}.items()}
    new._buffers = dict(buffers)
    new.train(original.training)
    new._vramkit_scheme = scheme
    return new


def quantized_copy(original: torch.nn.Module, q: quant.QTensor, scheme: Scheme,
                   parameters: Mapping[str, torch.Tensor | None],
                   buffers: Mapping[str, torch.Tensor | None], weight: torch.Tensor | None = None
                   ) -> torch.nn.Module:
    """A stand-in for `original` whose weight is `q` (the codes already on the device it should live on).

    `parameters` and `buffers` are the original's unpatched tensors (`patch.pristine_tensors`); all but the
    weight go into the stand-in as they are. On the "comfy" route `weight` is the QuantizedTensor to hold
    (default: `layouts.comfy_weight`).
    """
    if scheme.route == "comfy":
        cls = _stand_in_class(_ComfyQuantizedOp, type(original))
        weight = layouts.comfy_weight(q, scheme.dtype) if weight is None else weight
        new = patch.copy_module(original, cls, parameters={**parameters, "weight": weight}, buffers=buffers)
    else:
        assert q.scale is not None
        cls = _stand_in_class(_OwnQuantizedOp, type(original))
        new = patch.copy_module(original, cls, parameters={**parameters, "weight": layouts.storage_codes(q)},
                                buffers={**buffers, "weight_scale": q.scale})
    new._vramkit_scheme = scheme
    return new


def make_quantized_in_place(module: torch.nn.Module, q: quant.QTensor, scheme: Scheme) -> None:
    """Turns `module`, a layer being built by ComfyUI's loader (owned by no other model, so no clone or patch
    is involved), into the same quantized stand-in `quantized_copy` makes, holding `q`."""
    if scheme.route == "comfy":
        module.__class__ = _stand_in_class(_ComfyQuantizedOp, type(module))
        module.weight = _as_param(layouts.comfy_weight(q, scheme.dtype))
    else:
        assert q.scale is not None
        module.__class__ = _stand_in_class(_OwnQuantizedOp, type(module))
        module.weight = _as_param(layouts.storage_codes(q))
        module.register_buffer("weight_scale", q.scale)
    module._vramkit_scheme = scheme  # type: ignore[assignment]


@functools.cache
def _stand_in_class(mixin: type, base: type) -> type:
    return type(f"VRAMKitQuantized{base.__name__}", (mixin, base), {"__module__": __name__})


def _as_param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


class _ComfyQuantizedOp:
    """Mixin over a ComfyUI op whose weight is a ComfyUI QuantizedTensor."""

    comfy_cast_weights = True  # always take ComfyUI's cast path, which dequantizes
    _vramkit_scheme: Scheme
    weight: torch.nn.Parameter

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs: Any) -> torch.Tensor:
        # Called with the stored weight (LoRA merge) or, on 0.3.7x lowvram, with the dequantized one.
        return layouts.dequantize(weight) if compat.is_comfy_quantized(weight) else weight

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None,
                   return_weight: bool = False, **kwargs: Any) -> torch.Tensor | None:
        s = self._vramkit_scheme
        q = quant.quantize(weight, s.format, s.granularity, s.group_size)
        forced_ours = layouts.layout_name(self.weight) == layouts.LAYOUT_NAME  # keep the layout it had
        requantized = layouts.ours(q, s.dtype) if forced_ours else layouts.comfy_weight(q, s.dtype)
        if return_weight:
            return requantized
        self.weight = _as_param(requantized)
        return None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # nn.Module._apply swaps `.data` of each Parameter, which a tensor subclass cannot take; re-wrap
        # instead (as ComfyUI's own quantized ops do) so `.to(device)` moves the codes and scales.
        if recurse:
            for child in self.children():  # type: ignore[attr-defined]
                child._apply(fn)
        for key, param in self._parameters.items():  # type: ignore[attr-defined]
            if param is not None:
                moved = fn(param)
                if not torch.is_inference_mode_enabled() and moved.is_inference():
                    moved = moved.clone()
                self._parameters[key] = _as_param(moved)  # type: ignore[attr-defined]
        for key, buf in self._buffers.items():  # type: ignore[attr-defined]
            if buf is not None:
                self._buffers[key] = fn(buf)  # type: ignore[attr-defined]
        return self


class _NativeQuantizedOp:
    """Mixin over ComfyUI's mixed-precision Linear holding a weight in ComfyUI's own layout.

    Everything is ComfyUI's (forward dispatch, W8A8, LoRA requantization, ``_apply``, ``state_dict``), except
    the weight-only forward: ComfyUI's ``full_precision_matrix_mult`` hands an ``int8_tensorwise`` weight to
    ``F.linear`` still quantized whenever its dtype already matches the activations', which runs W8A8
    anyway. Here the weight is fetched quantized (ComfyUI's cast: streaming, Dynamic VRAM, LoRA patches) and
    dequantized with `layouts.dequantize_to` into the activations' dtype, once.
    """

    _vramkit_scheme: Scheme
    weight: torch.nn.Parameter
    weight_function: list[Any]
    bias_function: list[Any]

    def forward_comfy_cast_weights(self, input: torch.Tensor, compute_dtype: torch.dtype | None = None,
                                   want_requant: bool = False, weight_only_quant: bool = False) -> torch.Tensor:
        if self._vramkit_scheme.compute != "dequantize":
            return super().forward_comfy_cast_weights(  # type: ignore[misc, no-any-return]
                input, compute_dtype, want_requant=want_requant, weight_only_quant=weight_only_quant)
        ops = compat.comfy_ops()
        # With LoRA functions ComfyUI dequantizes (into the activations' dtype) and patches; else the weight
        # comes as it is stored and is dequantized here.
        patched = len(self.weight_function) > 0 or len(self.bias_function) > 0
        weight, bias, stream = ops.cast_bias_weight(
            self, input=None, dtype=input.dtype if patched else self.weight.dtype, device=input.device,
            bias_dtype=input.dtype, offloadable=True, compute_dtype=input.dtype, want_requant=False)
        if compat.is_comfy_quantized(weight):
            dense = layouts.dequantize_to(weight, input.dtype)
        else:
            dense = weight if weight.dtype == input.dtype else weight.to(input.dtype)
        out = torch.nn.functional.linear(input, dense, bias)
        ops.uncast_bias_weight(self, weight, bias, stream)
        return out


class _OwnQuantizedOp:
    """Mixin over a ComfyUI op whose weight holds 8-bit codes and whose ``weight_scale`` holds the scales.

    A LoRA merge stores new codes with new scales (so nothing clips); the new scales are looked up by the
    identity of the codes Parameter they belong to. When ComfyUI restores its backup it installs a fresh
    Parameter over the original codes, which finds no entry and falls back to ``weight_scale``.
    """

    comfy_cast_weights = True
    _vramkit_scheme: Scheme
    weight: torch.nn.Parameter
    weight_scale: torch.Tensor
    bias: torch.nn.Parameter | None
    weight_function: list[Any]
    bias_function: list[Any]

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward_comfy_cast_weights(input, *args, **kwargs)

    def forward_comfy_cast_weights(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = self._dequantized(self.weight.to(input.device), self._scale(), input.dtype)
        weight._vramkit_dequantized = True  # type: ignore[attr-defined]  # see convert_weight
        for f in self.weight_function:
            weight = f(weight)
        bias = None
        if self.bias is not None:
            bias = self.bias.to(device=input.device, dtype=input.dtype)
            for f in self.bias_function:
                bias = f(bias)
        if isinstance(self, torch.nn.Linear):
            return torch.nn.functional.linear(input, weight, bias)
        return self._conv_forward(input, weight, bias, *args, **kwargs)  # type: ignore[attr-defined]

    def _scale(self) -> torch.Tensor:
        merged = self.__dict__.get("_vramkit_merged_scales")
        found = None if merged is None else merged.get(self.weight)
        return self.weight_scale if found is None else found

    def _dequantized(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        s = self._vramkit_scheme
        return layouts.as_qtensor(codes, scale.to(codes.device), s.format, s.granularity, s.group_size or 0,
                                  dtype).dequantize(dtype)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs: Any) -> torch.Tensor:
        if getattr(weight, "_vramkit_dequantized", False):  # 0.3.7x lowvram LoRA: already dequantized
            return weight
        # ComfyUI hands over the stored codes cast to a float dtype; casting back to the code dtype is exact.
        return self._dequantized(weight.to(self.weight.dtype), self._scale(), weight.dtype)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None,
                   return_weight: bool = False, **kwargs: Any) -> torch.Tensor | None:
        s = self._vramkit_scheme
        q = quant.quantize(weight, s.format, s.granularity, s.group_size)
        assert q.scale is not None
        if return_weight:
            result = q.dequantize(weight.dtype)
            result._vramkit_dequantized = True  # type: ignore[attr-defined]
            return result
        if inplace_update:
            raise ValueError("VRAMKit's quantized layers cannot take an in-place weight update; ComfyUI uses "
                             "one only with weight_inplace_update, which quantized models do not support")
        codes = _as_param(layouts.storage_codes(q))
        if "_vramkit_merged_scales" not in self.__dict__:
            self.__dict__["_vramkit_merged_scales"] = WeakIdKeyDictionary()
        self.__dict__["_vramkit_merged_scales"][codes] = q.scale
        self.weight = codes
        return None
