"""Compatibility name: the quantized layers for plain torch models now live in `vramkit.quant.modules`.

`vramkit.qmodules.quantize_linears` and `vramkit.qmodules.QuantizedLinear` keep working.
"""

from __future__ import annotations

from .quant.modules import LinearsReport, QuantizedLinear, quantize_linears

__all__ = ["LinearsReport", "QuantizedLinear", "quantize_linears"]
