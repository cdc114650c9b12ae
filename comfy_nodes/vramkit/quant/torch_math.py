"""The torch twin of the Rust quantizers: the same math with torch ops, for tensors that are not on the CPU
(CUDA and other devices). It gives the same bits as `vramkit._core` (tests/test_quant_exact.py compares the
two on CPU); a change to one is a change to both."""

from __future__ import annotations

import math

import torch

from .cast_rule import CAST_RULES, OVERFLOW_FROM, CastRule
from .formats import FORMAT_MAX, TORCH_FP8


def cast_fp8(t: torch.Tensor, format: str, rule: CastRule | None = None) -> torch.Tensor:
    """The unscaled cast viewed as uint8: ``t.to(fp8)`` of the installed torch's CPU cast (`rule`, default
    `CAST_RULES[format]`), on any device. The device's own cast only sees values it can represent (clamped to
    ±fmt_max); finite overflow, ±inf and NaN are then written from the rule, with the input's sign, so a
    device whose cast saturates (or not) differently cannot change the result."""
    rule = CAST_RULES[format] if rule is None else rule
    over_code, inf_code = rule.codes(format)
    fmt_max = FORMAT_MAX[format]
    codes = t.clamp(-fmt_max, fmt_max).to(TORCH_FP8[format]).view(torch.uint8)
    sign = torch.signbit(t).to(torch.uint8) << 7
    magnitude = t.abs()
    threshold, inclusive = OVERFLOW_FROM[format]
    overflow = magnitude >= threshold if inclusive else magnitude > threshold  # ±inf included, NaN not
    codes = torch.where(overflow, sign | over_code, codes)
    codes = torch.where(magnitude == float("inf"), sign | inf_code, codes)
    return torch.where(torch.isnan(t), sign | 0x7F, codes)


def quantize_blocks(t: torch.Tensor, format: str, block_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (shaped like `t`) and one float32 scale per block of `block_len` consecutive elements
    (flat); ValueError naming the flat index of the first NaN/Inf."""
    blocks = t.float().reshape(-1, block_len)
    amax = blocks.abs().amax(dim=1)
    bad = ~torch.isfinite(amax)
    if bool(bad.any()):
        block = int(bad.nonzero()[0, 0])
        offset = int((~torch.isfinite(blocks[block])).nonzero()[0, 0])
        value = float(blocks[block, offset])
        raise ValueError(f"the tensor holds {value} at flat index {block * block_len + offset}; a {format} "
                         'scale needs finite values (replace NaN/Inf, or use granularity "none" for fp8, '
                         "which casts them as torch does)")
    fmt_max = FORMAT_MAX[format]
    scale = amax / fmt_max
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scaled = blocks / scale[:, None]
    if format == "int8":
        data = torch.round(scaled).clamp(-127, 127).to(torch.int8)
    else:
        data = scaled.clamp(-fmt_max, fmt_max).to(TORCH_FP8[format]).view(torch.uint8)
    return data.reshape(t.shape), scale


def codes_as_float(data: torch.Tensor, format: str) -> torch.Tensor:
    """The codes' values as float32 (int8 as integers, FP8 bit patterns decoded)."""
    if format == "int8":
        return data.float()
    return data.view(TORCH_FP8[format]).float()


def dequantize(data: torch.Tensor, format: str, scale: torch.Tensor | None, block_len: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``(codes as float32 * scale).to(dtype)``, shaped like `data`."""
    values = codes_as_float(data, format)
    if scale is None:
        return values.to(dtype)
    blocks = values.reshape(-1, block_len) * scale.to(torch.float32).reshape(-1, 1)
    return blocks.reshape(data.shape).to(dtype)


def error_stats(t: torch.Tensor, dequantized: torch.Tensor) -> dict[str, float]:
    """``{"max_abs", "rmse", "snr_db"}`` of ``dequantized - t``, in float64."""
    deq = dequantized.double()
    ref = t.double()
    err = deq - ref
    sum_err = float((err * err).sum())
    return {
        "max_abs": float(err.abs().max()),
        "rmse": math.sqrt(sum_err / t.numel()),
        "snr_db": math.inf if sum_err == 0 else 10 * math.log10(float((ref * ref).sum()) / sum_err),
    }
