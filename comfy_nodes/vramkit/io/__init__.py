"""Checkpoint files through the Rust core: safetensors models quantized into new files ("quantize once,
load fast") and profiled from their headers, whole or not at all. Nothing here imports ComfyUI.

- `quantize`: `quantize_file(src, dst, format=..., granularity=...)` streams a model through the quantizers
  into a new file (bounded memory, temp file + fsync + rename) and returns a `FileQuantizeReport`.
- `inspect`: `inspect_file(path)`, the JSON-serialisable profile of a file (tensors by block, dtypes,
  quantization markers), which the planner and `vramkit inspect` read.
- `formats`: what a quantized file holds (markers, scales, header metadata) and which loaders read it.
"""

from __future__ import annotations

from .inspect import PROFILE_VERSION, format_profile, inspect_file
from .quantize import FILE_GRANULARITIES, FileQuantizeReport, LayerStats, choose_layers, quantize_file, save_quantized

__all__ = ["FILE_GRANULARITIES", "PROFILE_VERSION", "FileQuantizeReport", "LayerStats", "choose_layers",
           "format_profile", "inspect_file", "quantize_file", "save_quantized"]
