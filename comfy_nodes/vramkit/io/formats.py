"""What a quantized safetensors file written by VRAMKit contains (the Rust core writes it; this names it).

A quantized layer ``<layer>.weight`` is stored as three tensors:

- ``<layer>.weight``: the 8-bit codes (``F8_E4M3``, ``F8_E5M2`` or ``I8``) in the weight's shape;
- ``<layer>.weight_scale``: float32 scales, shape ``[]`` (per tensor), ``[out, 1]`` (per output channel) or
  ``[out, row // group_size]`` (per group);
- ``<layer>.comfy_quant``: uint8, the layer's marker as UTF-8 JSON.

Markers are ComfyUI's own where ComfyUI has the scheme, so stock ComfyUI loads those files:

==========================  =============================================================  ==================
scheme                      marker                                                         stock ComfyUI
==========================  =============================================================  ==================
fp8_e4m3fn per tensor       ``{"format": "float8_e4m3fn"}``                                0.3.7x and 0.29+
fp8_e5m2 per tensor         ``{"format": "float8_e5m2"}``                                  0.29+
int8 per tensor / channel   ``{"format": "int8_tensorwise"}`` (+ ``"convrot": true,``       0.29+
                            ``"convrot_groupsize": 256`` when rotated)
anything else               ``{"format": "vramkit_block_scaled", "codes": "int8",          VRAMKit's loader
                            "granularity": "group", "group_size": 64, "version": 1}``      only
==========================  =============================================================  ==================

VRAMKit's marker means: dequantized value = ``decode(code) * scale`` in float32 (``decode`` = the fp8 value of
the bits, or the int8 integer), where the scales ``[out, k]`` cover ``row / k`` consecutive elements of a row
each (``row`` = the product of the dims after the first).

The header's ``__metadata__`` keeps the input's entries and gains ``_quantization_metadata``, the same markers
keyed by layer name without the model prefix (ComfyUI 0.3.7x reads only this form; 0.29+ reads both), plus
``vramkit.quantize`` (JSON: the options used). A ComfyUI that does not know a marker's format fails the load
with an error instead of loading codes as weights.
"""

from __future__ import annotations

import json
from typing import Any

MARKER_SUFFIX = ".comfy_quant"
SCALE_SUFFIX = ".weight_scale"
WEIGHT_SUFFIX = ".weight"
QUANT_METADATA_KEY = "_quantization_metadata"
VRAMKIT_METADATA_KEY = "vramkit.quantize"
VRAMKIT_FORMAT = "vramkit_block_scaled"

#: Format strings of ComfyUI's markers, by the (format, granularity) VRAMKit writes them for.
COMFY_FORMATS = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "int8": "int8_tensorwise"}
#: Key prefixes ComfyUI strips before it builds a diffusion model (``unet_prefix_from_state_dict``).
MODEL_PREFIXES = ("model.diffusion_model.", "model.model.", "net.")
#: safetensors dtypes the quantizer reads.
SOURCE_DTYPES = ("F32", "F16", "BF16")
#: Bytes per element of each safetensors dtype (sub-byte dtypes as fractions).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
               "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "C64": 8, "F64": 8, "I64": 8, "U64": 8, "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75}


def is_native(format: str, granularity: str) -> bool:
    """Whether (format, granularity) is written with one of ComfyUI's own markers."""
    return granularity == "tensor" or (format == "int8" and granularity == "channel")


def model_prefix(names: list[str]) -> str:
    """The prefix ComfyUI strips from these keys before building the model ("" when none), as the core does."""
    counts = {p: sum(1 for n in names if n.startswith(p)) for p in MODEL_PREFIXES}
    best = max(MODEL_PREFIXES, key=lambda p: counts[p])
    return best if counts[best] else ""


def parse_marker(raw: bytes | str, where: str) -> dict[str, Any]:
    """A marker's JSON object, or a ValueError naming `where`."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: the quantization marker is not JSON ({exc})") from None
    if not isinstance(value, dict) or not isinstance(value.get("format"), str):
        raise ValueError(f"{where}: a quantization marker must be a JSON object with a \"format\"; got {value!r}")
    return value
