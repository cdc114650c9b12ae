"""Quantized stand-ins for ComfyUI's Linear/Conv ops, installed as per-clone object patches.

A stand-in is a copy of the original op (same class, plus a mixin) whose ``weight`` is quantized; the
original module, shared by every clone of the model, is never touched. Two routes:

- ``comfy``: the weight is a ComfyUI ``QuantizedTensor`` (`layouts.comfy_weight`). ComfyUI's own forward
  (``cast_bias_weight``) dequantizes it, its lowvram loader streams it, and Dynamic VRAM pages it.
- ``module`` (for a ComfyUI without a quantized-tensor registry): the weight holds the 8-bit codes, a
  ``weight_scale`` buffer the scales, and the forward dequantizes. Works with the legacy lowvram streaming;
  Dynamic VRAM cannot page it (every ComfyUI that has Dynamic VRAM has the registry, so this never meets it).

Both implement ComfyUI's ``convert_weight``/``set_weight`` hooks, so a LoRA merges into the dequantized weight
and is requantized with the same scheme (rounding to nearest; ComfyUI's stochastic-rounding seed is not
used); unloading restores the quantized original from ComfyUI's backup.
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


@dataclass(frozen=True)
class Scheme:
    """How a stand-in's weight is quantized, kept so a LoRA merge can requantize the same way."""

    format: str
    granularity: str
    group_size: int | None
    dtype: torch.dtype
    """What the weight dequantizes to (the compute dtype of the layer)."""
    route: Route


def default_route() -> Route:
    return "module" if compat.quant_backend() == "none" else "comfy"


def is_quantized_op(module: torch.nn.Module) -> bool:
    return isinstance(module, (_ComfyQuantizedOp, _OwnQuantizedOp))


def quantized_copy(original: torch.nn.Module, q: quant.QTensor, scheme: Scheme,
                   parameters: Mapping[str, torch.Tensor | None],
                   buffers: Mapping[str, torch.Tensor | None]) -> torch.nn.Module:
    """A stand-in for `original` whose weight is `q` (the codes already on the device it should live on).

    `parameters` and `buffers` are the original's unpatched tensors (`patch.pristine_tensors`); all but the
    weight go into the stand-in as they are.
    """
    if scheme.route == "comfy":
        cls = _stand_in_class(_ComfyQuantizedOp, type(original))
        weight = layouts.comfy_weight(q, scheme.dtype)
        new = patch.copy_module(original, cls, parameters={**parameters, "weight": weight}, buffers=buffers)
    else:
        assert q.scale is not None
        cls = _stand_in_class(_OwnQuantizedOp, type(original))
        new = patch.copy_module(original, cls, parameters={**parameters, "weight": layouts.storage_codes(q)},
                                buffers={**buffers, "weight_scale": q.scale})
    new._vramkit_scheme = scheme
    return new


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
        requantized = layouts.comfy_weight(q, s.dtype)
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
