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


#: The most float32 working memory one `dequantize` call holds (besides its output): 32 MiB, far under the
#: 64 MiB the documentation promises, so a caching allocator's rounding never crosses it.
DEQUANT_CHUNK_BYTES = 32 << 20


def dequantize(data: torch.Tensor, format: str, scale: torch.Tensor | None, block_len: int,
               dtype: torch.dtype, chunk_bytes: int = DEQUANT_CHUNK_BYTES) -> torch.Tensor:
    """``(codes as float32 * scale).to(dtype)``, shaped like `data`, with bounded temporaries.

    The output is allocated once; the codes are widened to float32 and scaled a chunk of whole scale blocks
    at a time (at most `chunk_bytes` of float32, reused), each chunk rounded once into its slice of the
    output. A float32 output is its own workspace. The bits are those of the one-shot formula: every
    element is still ``float32(code) * float32(scale)`` rounded once to `dtype`.
    """
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    n = data.numel()
    if n == 0:
        return out
    codes = data.reshape(-1)
    if format != "int8":
        codes = codes.view(TORCH_FP8[format])
    flat_out = out.view(-1)
    scales = None if scale is None else scale.to(device=data.device, dtype=torch.float32).reshape(-1)
    limit = max(1, chunk_bytes // 4)
    # Chunks hold whole blocks when a block fits (one scale per row of the chunk), else parts of blocks.
    step = limit if scales is None or block_len > limit else (limit // block_len) * block_len
    work = None if dtype == torch.float32 else torch.empty(min(step, n), dtype=torch.float32,
                                                           device=data.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        dst = flat_out[start:stop] if work is None else work[: stop - start]
        dst.copy_(codes[start:stop])  # exact: every 8-bit code is a float32
        if scales is not None:
            if block_len > limit:
                _scale_ranges(dst, scales, block_len, start, stop)
            else:
                dst.view(-1, block_len).mul_(scales[start // block_len: stop // block_len, None])
        if work is not None:
            flat_out[start:stop].copy_(dst)  # the one rounding
    return out


def _scale_ranges(dst: torch.Tensor, scales: torch.Tensor, block_len: int, start: int, stop: int) -> None:
    """Scales `dst` (elements `start:stop` of the flat tensor) block by block, for blocks longer than a chunk."""
    pos = start
    while pos < stop:
        block = pos // block_len
        end = min(stop, (block + 1) * block_len)
        dst[pos - start: end - start].mul_(scales[block])
        pos = end


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
