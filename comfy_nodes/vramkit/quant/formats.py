"""The 8-bit formats and granularities, and the shapes they give: the tables every other quant module and
the ComfyUI layer read. A new format starts here (see ARCHITECTURE.md)."""

from __future__ import annotations

import math
from typing import Literal

import torch

Format = Literal["fp8_e4m3fn", "fp8_e5m2", "int8"]
Granularity = Literal["none", "tensor", "channel", "group"]

FORMATS: tuple[str, ...] = ("fp8_e4m3fn", "fp8_e5m2", "int8")
GRANULARITIES: tuple[str, ...] = ("none", "tensor", "channel", "group")
#: The largest magnitude each format's scaled blocks are mapped onto.
FORMAT_MAX: dict[str, float] = {"fp8_e4m3fn": 448.0, "fp8_e5m2": 57344.0, "int8": 127.0}
#: Input dtypes the quantizers accept.
SOURCE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: Dtypes `QTensor.dequantize` can produce (float64 is the exact float32 result, widened).
OUTPUT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_GROUP_SIZE = 64
#: torch's dtype for each FP8 format (the codes are stored as uint8 bit patterns of these).
TORCH_FP8: dict[str, torch.dtype] = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def block_len(shape: torch.Size, granularity: str, group_size: int | None) -> int:
    """How many consecutive elements (row-major) share one scale."""
    numel = math.prod(shape)
    if granularity in ("none", "tensor"):
        return numel
    if granularity == "channel":
        return numel // shape[0]
    assert group_size is not None
    return group_size


def scale_shape(shape: torch.Size, granularity: str, group_size: int | None) -> tuple[int, ...]:
    """The shape of the scales: ``()`` (tensor), ``(out,)`` (channel), ``(out, row // group_size)`` (group)."""
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return (shape[0],)
    assert group_size is not None
    return (shape[0], math.prod(shape[1:]) // group_size)

