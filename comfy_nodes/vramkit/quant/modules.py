"""Weight-only quantized layers for plain torch models (ComfyUI models use `vramkit.comfy` instead).

`quantize_linears(model, ...)` swaps each `nn.Linear` for a `QuantizedLinear` that stores 8-bit codes and
scales and dequantizes to the input's dtype on every forward: the weights take 1 byte per value (plus scales)
while the math runs in bf16/fp16/fp32 as before.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .api import QTensor, quantize

log = logging.getLogger(__name__)


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is a `QTensor`, dequantized on the fly in forward."""

    def __init__(self, q: QTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        # Buffers, so that `.to(device)` and `state_dict()` carry the codes and scales.
        self.register_buffer("codes", q.data)
        self.register_buffer("scale", q.scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.format, self.granularity, self.group_size = q.format, q.granularity, q.group_size
        self.source_dtype = q.dtype
        self.out_features, self.in_features = q.shape

    def _apply(self, fn, recurse=True):
        # `.to(dtype)`, `.half()`, `.bfloat16()` cast every float buffer; the scales are part of the 8-bit
        # format (float32 by definition) and must only follow device moves. The codes are integers, which
        # dtype casts leave alone.
        scale = self.scale
        module = super()._apply(fn, recurse)
        if self.scale is not None and scale is not None and self.scale.dtype != torch.float32:
            self.scale = scale.to(device=self.scale.device)
        return module

    @property
    def qweight(self) -> QTensor:
        return QTensor(self.codes, self.scale, self.format, self.granularity, self.group_size,
                             self.codes.shape, self.source_dtype)

    @classmethod
    def from_linear(cls, layer: nn.Linear, format: str, granularity: str | None = None,
                    group_size: int | None = None) -> QuantizedLinear:
        return cls(quantize(layer.weight.detach(), format, granularity, group_size), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.dequantize(x.dtype, device=x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"granularity={self.granularity}{group}")


@dataclass
class LinearsReport:
    """What `quantize_linears` did, with the numbers behind it."""

    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def summary(self) -> str:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        return (f"quantized {len(self.quantized)} linear layers, kept {len(self.skipped)} in high precision; "
                f"their weights went from {self.bytes_before / 2**20:.1f} MiB to "
                f"{self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x smaller)")


def quantize_linears(model: nn.Module, format: str, granularity: str | None = None,
                     group_size: int | None = None, skip: Iterable[str] = (),
                     progress: Callable[[Iterable[tuple[str, nn.Linear]]], Iterable[tuple[str, nn.Linear]]]
                     | None = None) -> LinearsReport:
    """Replaces every `nn.Linear` of `model` (in place) by a `QuantizedLinear`, except those whose qualified
    name matches one of the `skip` glob patterns. `progress` may wrap the layer iterator (e.g. tqdm)."""
    patterns = list(skip)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    report = LinearsReport()
    for name, layer in progress(layers) if progress else layers:
        weight_bytes = layer.weight.numel() * layer.weight.element_size()
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            report.skipped.append(name)
            continue
        new = QuantizedLinear.from_linear(layer, format, granularity, group_size)
        _set_submodule(model, name, new)
        report.quantized.append(name)
        report.bytes_before += weight_bytes
        report.bytes_after += new.qweight.nbytes
    log.debug("%s", report.summary())
    return report


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
