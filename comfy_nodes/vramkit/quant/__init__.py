"""FP8 and INT8 weight quantization of torch tensors, and of the Linear layers of plain torch models.

- `api`: `quantize`, `dequantize`, `error_stats`, `QTensor` (CPU tensors through the Rust core).
- `torch_math`: the torch twin of the Rust kernels (same bits), for tensors on CUDA and other devices.
- `formats`: the formats, granularities and dtype tables.
- `cast_rule`: the overflow rule of torch's plain fp8 cast, probed at import (`CAST_RULES`).
- `modules`: `QuantizedLinear` and `quantize_linears` for plain torch models (ComfyUI models go through
  `vramkit.comfy.quantize_model` instead).

Everything below is importable from `vramkit.quant` itself.
"""

from __future__ import annotations

from .api import QTensor, dequantize, error_stats, quantize
from .api import _dequantize_torch as _dequantize_torch  # the torch twin through QTensor (the tests use it)
from .api import _error_stats_torch as _error_stats_torch
from .api import _quantize_torch as _quantize_torch
from .cast_rule import CAST_RULES, CastRule
from .formats import (
    DEFAULT_GROUP_SIZE,
    FORMAT_MAX,
    FORMATS,
    GRANULARITIES,
    OUTPUT_DTYPES,
    SOURCE_DTYPES,
    TORCH_FP8,
    Format,
    Granularity,
)

#: The former private name of `TORCH_FP8` (kept for callers of the flat module).
_TORCH_FP8 = TORCH_FP8

__all__ = ["CAST_RULES", "DEFAULT_GROUP_SIZE", "FORMATS", "FORMAT_MAX", "GRANULARITIES", "OUTPUT_DTYPES",
           "SOURCE_DTYPES", "TORCH_FP8", "CastRule", "Format", "Granularity", "QTensor", "dequantize", "error_stats",
           "quantize"]
