"""VRAMKit: run diffusion models that do not fit your GPU.

FP8/INT8 weight quantization (`vramkit.quant`), chunked attention (`vramkit.attention`), block offloading
and a memory planner, usable from plain torch and as ComfyUI nodes (`vramkit.comfy`, imported only inside
ComfyUI). The numeric core is the Rust extension `vramkit._core`.
"""

from __future__ import annotations

from ._core import __version__

__all__ = ["__version__"]
