"""FP8 and INT8 weight quantization of torch tensors.

CPU tensors go through the Rust core (`vramkit._core`) without copies; tensors on other devices use the torch
twin (`torch_math`) with exactly the same math, so both paths give the same bits (the tests prove it on CPU).
The format tables live in `formats`.

Exact semantics, reproducible anywhere:

- ``granularity="none"`` (fp8 only): ``t.to(torch.float8_e4m3fn)`` (or e5m2) viewed as uint8, exactly as the
  installed torch casts on CPU, NaN, Inf and overflow included: its overflow rule (NaN or saturation to ±448
  for e4m3fn, depending on the torch version) is probed at import (`cast_rule.CAST_RULES`) and followed on
  every device.
- Scaled fp8: ``scale = amax / fmt_max`` in float32 (fmt_max 448 for e4m3fn, 57344 for e5m2) and
  ``data = (t.float() / scale).clamp(-fmt_max, fmt_max).to(fp8)``.
- INT8: ``scale = amax / 127`` in float32 and ``data = torch.round(t.float() / scale).clamp(-127, 127)``.
- A block whose scale would be 0 (all zeros, or an amax so small that ``amax / fmt_max`` underflows) gets
  scale 1.
- ``dequantize``: ``(data as float32 * scale).to(dtype)``.

``amax`` is taken over the whole tensor ("tensor"), over each output channel = dim 0 ("channel"), or over
groups of ``group_size`` consecutive elements along everything after dim 0, flattened ("group"; conv
weights too).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import _core
from .._arrays import as_numpy
from ..errors import DtypeError, dtype_names
from . import torch_math
from .cast_rule import CAST_RULES, CastRule
from .formats import DEFAULT_GROUP_SIZE, FORMATS, GRANULARITIES, OUTPUT_DTYPES, SOURCE_DTYPES, block_len, scale_shape

if TYPE_CHECKING:
    import numpy as np

_RUST_OUT_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized tensor: 8-bit codes plus float32 scales, and what is needed to undo it."""

    data: torch.Tensor
    """``torch.uint8`` (fp8 bit patterns) or ``torch.int8`` codes, in the logical shape of the original."""
    scale: torch.Tensor | None
    """float32: shape ``[]`` (tensor), ``[out]`` (channel), ``[out, in // group_size]`` (group); None for "none"."""
    format: str
    granularity: str
    group_size: int | None
    shape: torch.Size
    dtype: torch.dtype
    """The dtype of the tensor that was quantized (the default of `dequantize`)."""

    @property
    def block_len(self) -> int:
        """How many consecutive elements (row-major) share one scale."""
        return block_len(self.shape, self.granularity, self.group_size)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes plus scales."""
        scale_bytes = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.data.numel() * self.data.element_size() + scale_bytes

    def to(self, device: torch.device | str) -> QTensor:
        """The same quantized tensor with codes and scales on `device`."""
        scale = None if self.scale is None else self.scale.to(device)
        return QTensor(self.data.to(device), scale, self.format, self.granularity, self.group_size,
                       self.shape, self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
                   ) -> torch.Tensor:
        """``(data as float32 * scale).to(dtype)``, on `device` (default: where the codes are)."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in OUTPUT_DTYPES:
            raise DtypeError(f"cannot dequantize to {dtype}; accepted: {dtype_names(OUTPUT_DTYPES)}")
        target = self.data.device if device is None else torch.device(device)
        if target.type == "cpu" and self.data.device.type == "cpu":
            return _dequantize_rust(self, dtype)
        # Move the small codes, not the wide result.
        return _dequantize_torch(self.to(target), dtype)

    def __repr__(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (f"QTensor(format={self.format!r}, granularity={self.granularity!r}{group}, "
                f"shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})")


def quantize(t: torch.Tensor, format: str, granularity: str | None = None,
             group_size: int | None = None) -> QTensor:
    """Quantizes `t` to `format` ("fp8_e4m3fn", "fp8_e5m2", "int8").

    `granularity` is "none" (fp8 only: a plain cast), "tensor", "channel" (dim 0) or "group" (`group_size`
    consecutive elements along everything after dim 0; default 64). When omitted it is "none" for fp8 and
    "group" (64, or "channel" when 64 does not divide a row) for int8.
    """
    _check_tensor(t)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; accepted: {', '.join(FORMATS)}")
    granularity, group_size = _resolve_granularity(t, format, granularity, group_size)
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.device.type == "cpu":
        return _quantize_rust(t, format, granularity, group_size)
    return _quantize_torch(t, format, granularity, group_size)


def dequantize(q: QTensor, dtype: torch.dtype | None = None, device: torch.device | str | None = None
               ) -> torch.Tensor:
    """`q` back to floats: ``q.dequantize(dtype, device)`` (see `QTensor.dequantize`)."""
    if not isinstance(q, QTensor):
        raise TypeError(f"expected a vramkit.quant.QTensor, got {type(q).__name__}")
    return q.dequantize(dtype, device)


def error_stats(t: torch.Tensor, q: QTensor) -> dict[str, float]:
    """How far `q` is from `t`: ``{"max_abs", "rmse", "snr_db"}`` of ``q.dequantize(float32) - t``.

    snr_db is ``10 log10(sum t^2 / sum error^2)``, infinite for an exact quantization.
    """
    _check_tensor(t)
    if tuple(t.shape) != tuple(q.shape):
        raise ValueError(f"tensor shape {tuple(t.shape)} does not match the quantized shape {tuple(q.shape)}")
    t = t.detach()
    if t.device.type == "cpu" and q.device.type == "cpu":
        t = t.contiguous()
        codes, scales = _rust_codes(q)
        return dict(_core.error_stats(as_numpy(t), codes, q.format, scales, q.block_len))
    return _error_stats_torch(t, q)


def _error_stats_torch(t: torch.Tensor, q: QTensor) -> dict[str, float]:
    return torch_math.error_stats(t, q.dequantize(torch.float32, device=t.device))


# --- validation -------------------------------------------------------------------------------------------

def _check_tensor(t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SOURCE_DTYPES:
        raise DtypeError(f"cannot quantize a {t.dtype} tensor; accepted dtypes: {dtype_names(SOURCE_DTYPES)}")
    if t.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(t.shape)})")
    if t.device.type == "meta":
        raise ValueError("cannot quantize a tensor on the meta device: it has a shape but no values")


def _resolve_granularity(t: torch.Tensor, format: str, granularity: str | None,
                         group_size: int | None) -> tuple[str, int | None]:
    if granularity is None:
        if format != "int8":
            granularity = "none"
        else:
            row = t.numel() // t.shape[0] if t.dim() >= 2 else 0
            fits = group_size is not None or (row and row % DEFAULT_GROUP_SIZE == 0)
            granularity = "group" if t.dim() >= 2 and fits else ("channel" if t.dim() >= 2 else "tensor")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; accepted: {', '.join(GRANULARITIES)}")
    if granularity == "none" and format == "int8":
        raise ValueError('granularity "none" (an unscaled cast) exists only for fp8; int8 needs '
                         '"tensor", "channel" or "group"')
    if granularity in ("channel", "group") and t.dim() < 2:
        raise ValueError(f'granularity "{granularity}" needs a tensor of at least 2 dimensions (dim 0 is the '
                         f'output channel); got shape {tuple(t.shape)}. Use "tensor" for 1-D tensors')
    if granularity != "group":
        return granularity, None
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    if isinstance(group_size, bool):
        raise TypeError("group_size must be an int, got bool")
    try:
        group_size = operator.index(group_size)  # ints and numpy integers, not floats
    except TypeError:
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}") from None
    row = t.numel() // t.shape[0]
    if group_size <= 0:
        raise ValueError(f"group_size must be positive (32, 64 or 128 are usual); got {group_size}")
    if row % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the row length {row} (the product of "
                         f"dims after dim 0 of shape {tuple(t.shape)}); pick a divisor or use \"channel\"")
    return granularity, group_size


# --- the Rust path (CPU) ------------------------------------------------------------------------------------

def _quantize_rust(t: torch.Tensor, format: str, granularity: str, group_size: int | None,
                   rule: CastRule | None = None) -> QTensor:
    # The Rust core allocates the outputs (huge-page backed when large) and torch adopts them, no copy.
    if granularity == "none":
        rule = CAST_RULES[format] if rule is None else rule
        data = torch.from_numpy(_core.fp8_cast(as_numpy(t), format, overflow=rule.overflow, inf=rule.inf))
        return QTensor(data, None, format, granularity, None, t.shape, t.dtype)
    codes, scales = _core.quantize(as_numpy(t), format, block_len(t.shape, granularity, group_size))
    scale = torch.from_numpy(scales).reshape(scale_shape(t.shape, granularity, group_size))
    return QTensor(torch.from_numpy(codes), scale, format, granularity, group_size, t.shape, t.dtype)


def _rust_codes(q: QTensor) -> tuple[np.ndarray, np.ndarray | None]:
    codes = q.data.contiguous().numpy()
    # float32 by definition; a module's `.to(dtype)` may have widened the buffer (exactly) to float64.
    scales = None if q.scale is None else q.scale.to(torch.float32).contiguous().reshape(-1).numpy()
    return codes, scales


def _dequantize_rust(q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    rust_dtype = dtype if dtype in _RUST_OUT_DTYPE else torch.float32
    codes, scales = _rust_codes(q)
    out = torch.from_numpy(_core.dequantize(codes, q.format, scales, q.block_len, _RUST_OUT_DTYPE[rust_dtype]))
    if rust_dtype == torch.bfloat16:
        out = out.view(torch.bfloat16)
    return out if rust_dtype == dtype else out.to(dtype)


# --- the torch path (CUDA and other devices; the same math: `torch_math`) -----------------------------------

def _quantize_torch(t: torch.Tensor, format: str, granularity: str, group_size: int | None,
                    rule: CastRule | None = None) -> QTensor:
    if granularity == "none":
        return QTensor(torch_math.cast_fp8(t, format, rule), None, format, granularity, None, t.shape, t.dtype)
    data, scale = torch_math.quantize_blocks(t, format, block_len(t.shape, granularity, group_size))
    return QTensor(data, scale.reshape(scale_shape(t.shape, granularity, group_size)), format, granularity,
                   group_size, t.shape, t.dtype)


def _dequantize_torch(q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    return torch_math.dequantize(q.data, q.format, q.scale, q.block_len, dtype)
