"""Custom operations that load VRAMKit's quantized files through ComfyUI's own loader.

Handed to ``comfy.sd.load_diffusion_model`` as ``model_options["custom_operations"]`` (the way ComfyUI-GGUF
plugs in its formats), so each quantized Linear is built quantized while the state dict loads: nothing is
patched after the load, and the model ComfyUI returns is an ordinary one whose Linear weights are ComfyUI
``QuantizedTensor``s (`layouts.comfy_weight`), which its cast path dequantizes, its loaders stream and Dynamic
VRAM pages.

A layer with a ``<layer>.comfy_quant`` marker (see `vramkit.io.formats`) becomes the same quantized stand-in
the Quantize node makes (`quantized_ops`), so LoRA merges and requantizes the same way. Read here:
``vramkit_block_scaled`` (per-group / per-channel codes), ``float8_e4m3fn`` / ``float8_e5m2`` per tensor and
``int8_tensorwise`` without ConvRot (for a ComfyUI whose stock loader lacks them); any other marker is an
error naming the layer. Layers without a marker load as ComfyUI's ``manual_cast`` Linear.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .. import quant
from ..io import formats
from . import compat, quantized_ops

#: Marker formats these operations read.
READS = frozenset({formats.VRAMKIT_FORMAT, "float8_e4m3fn", "float8_e5m2", "int8_tensorwise"})
_COMFY_TO_VRAMKIT = {"float8_e4m3fn": "fp8_e4m3fn", "float8_e5m2": "fp8_e5m2", "int8_tensorwise": "int8"}


def qtensor_from_file(layer: str, marker: dict[str, Any], codes: torch.Tensor, scale: torch.Tensor | None,
                      dtype: torch.dtype) -> quant.QTensor:
    """The `vramkit.quant.QTensor` a file's codes, scales and marker describe (no copy of the codes)."""
    kind = marker.get("format")
    if kind == formats.VRAMKIT_FORMAT:
        fmt, granularity = marker.get("codes"), marker.get("granularity")
        group = marker.get("group_size") if granularity == "group" else None
    elif kind in _COMFY_TO_VRAMKIT:
        if marker.get("convrot"):
            raise ValueError(f"layer {layer}: ConvRot INT8 needs ComfyUI 0.29 or later (its stock loader undoes "
                             "the rotation); VRAMKit's loader does not")
        fmt = _COMFY_TO_VRAMKIT[kind]
        granularity = "tensor" if scale is None or scale.numel() == 1 else "channel"
        group = None
    else:
        raise ValueError(f"layer {layer}: quantization format {kind!r} is not one VRAMKit reads "
                         f"({', '.join(sorted(READS))})")
    if fmt not in quant.FORMATS or granularity not in ("tensor", "channel", "group"):
        raise ValueError(f"layer {layer}: the marker {marker} names codes {fmt!r} / granularity {granularity!r}")
    if scale is None:
        raise ValueError(f"layer {layer}: the file has no {layer}{formats.SCALE_SUFFIX}")
    expected = torch.int8 if fmt == "int8" else quant.TORCH_FP8[fmt]
    if codes.dtype != expected:
        raise ValueError(f"layer {layer}: codes are {codes.dtype}, the marker says {fmt}")
    rows = codes.shape[0]
    row = math.prod(codes.shape[1:])
    blocks = {"tensor": 1, "channel": rows, "group": rows * (row // group) if group else -1}[granularity]
    if granularity == "group" and (not isinstance(group, int) or group < 1 or row % group):
        raise ValueError(f"layer {layer}: group_size {group!r} does not divide the rows of {tuple(codes.shape)}")
    if scale.numel() != blocks:
        raise ValueError(f"layer {layer}: {scale.numel()} scales for {blocks} blocks of {tuple(codes.shape)}")
    shape = {"tensor": (), "channel": (rows,), "group": (rows, blocks // rows)}[granularity]
    data = codes.view(torch.uint8) if fmt in quant.TORCH_FP8 else codes
    return quant.QTensor(data, scale.to(torch.float32).reshape(shape), fmt, granularity, group, codes.shape,
                         dtype)


@functools.cache
def operations() -> type:
    """The custom operations class (built once per process, on ComfyUI's ``manual_cast``)."""
    base = compat.operations_base()

    class Linear(base.Linear):  # type: ignore[misc, name-defined]
        def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                                  strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                                  error_msgs: list[str]) -> None:
            raw = state_dict.pop(f"{prefix}comfy_quant", None)
            if raw is None:
                return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                     unexpected_keys, error_msgs)
            layer = prefix.rstrip(".")
            marker = formats.parse_marker(bytes(raw.to(torch.uint8).tolist()), f"layer {layer}")
            codes = state_dict.pop(f"{prefix}weight", None)
            if codes is None:
                raise ValueError(f"layer {layer}: the file has a marker but no {prefix}weight")
            scale = state_dict.pop(f"{prefix}weight_scale", None)
            dtype = getattr(self, "weight_comfy_model_dtype", None) or (
                self.weight.dtype if isinstance(getattr(self, "weight", None), torch.Tensor) else torch.float32)
            if dtype not in quant.OUTPUT_DTYPES:
                dtype = torch.float32
            q = qtensor_from_file(layer, marker, codes, scale, dtype)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            for key in (f"{prefix}weight",):
                if key in missing_keys:
                    missing_keys.remove(key)
            scheme = quantized_ops.Scheme(q.format, q.granularity, q.group_size, dtype, quantized_ops.default_route())
            quantized_ops.make_quantized_in_place(self, q, scheme)

    class VRAMKitFileOps(base):  # type: ignore[misc, valid-type]
        """ComfyUI's manual_cast ops whose Linear reads VRAMKit's quantized files."""

    VRAMKitFileOps.Linear = Linear
    return VRAMKitFileOps
