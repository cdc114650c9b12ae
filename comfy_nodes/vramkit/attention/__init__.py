"""Attention without the N x N matrix, for plain torch tensors: ``attention(q, k, v, heads, mask, scale,
mode)`` (the modes and semantics are documented in `vramkit.attention.api`).

- `api`: `attention`, `measure_mode`, the modes; dispatches to the paths below.
- `problem`: checks a call and brings it to (B, H, N, D) views (`prepare`, `Problem`).
- `planner`: the Rust planner's block and chunk sizes under a memory budget (cached per shape and budget),
  `choose_mode` ("auto"), the free memory read once per sampling step (`sampling_step`, `free_bytes`), and
  the memory of outside kernels (`backend_fits`).
- `engines`: which Rust engine runs a CPU call and whether it beats SDPA (measured), for "auto" on CPU.
- `torch_paths`: SDPA, the chunked online-softmax path and slicing in torch (every device).
- `external`: SageAttention, flash-attn and xFormers when installed and usable.
- `measure`: peak extra memory of a call, measured.

The ComfyUI calling contract (`make_comfy_override`, `ComfyOverride`, ...) lives in
`vramkit.comfy.attention_override`; it is importable from here too, loaded on first use (it imports this
package, so importing it eagerly here would be a circle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import engines
from .api import EXTERNAL_MODES, MODES, attention, last_kernel_stats, measure_mode
from .planner import available_bytes, budget_for, choose_mode, free_bytes, plan, sampling_step
from .problem import DTYPES, Problem, prepare

if TYPE_CHECKING:
    from ..comfy.attention_override import (
        ComfyOverride,
        is_vramkit_override,
        make_backend_override,
        make_comfy_override,
    )

_FROM_COMFY = ("ComfyOverride", "is_vramkit_override", "make_backend_override", "make_comfy_override")

__all__ = ["DTYPES", "EXTERNAL_MODES", "MODES", "ComfyOverride", "Problem", "attention", "available_bytes",
           "budget_for", "choose_mode", "engines", "free_bytes", "is_vramkit_override", "last_kernel_stats",
           "make_backend_override", "make_comfy_override", "measure_mode", "plan", "prepare", "sampling_step"]


def __getattr__(name: str) -> Any:
    if name in _FROM_COMFY:
        from ..comfy import attention_override

        return getattr(attention_override, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
