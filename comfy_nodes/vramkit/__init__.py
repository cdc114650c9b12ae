"""VRAMKit: run diffusion models that do not fit your GPU.

Plain torch APIs: FP8/INT8 weight quantization (`vramkit.quant`, with `vramkit.quant.modules` for whole
models) and memory-efficient attention (`vramkit.attention`). ComfyUI nodes live in `vramkit.comfy`, the only
package that knows ComfyUI; they add per-model offloading, precision and measurement. `vramkit.cli` is the
command line. The numeric core and the planners (attention chunk sizes, which layers stay on the GPU) are the
Rust extension `vramkit._core`. ARCHITECTURE.md (repository root) maps the whole tree.
"""

from __future__ import annotations

import logging
import os

from ._core import __version__

__all__ = ["__version__"]

_SIMD_LEVELS = ("portable", "avx2", "avx512")
if os.environ.get("VRAMKIT_SIMD", _SIMD_LEVELS[-1]) not in _SIMD_LEVELS:
    logging.getLogger(__name__).warning(
        "VRAMKIT_SIMD=%r is not one of %s; it is ignored (the kernels use the best level this CPU has)",
        os.environ["VRAMKIT_SIMD"], ", ".join(_SIMD_LEVELS))
