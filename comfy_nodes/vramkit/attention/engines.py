"""Which Rust engine runs a CPU call, and whether it beats torch's SDPA there ("auto" on CPU asks this).

The kernel picks its engine by the element type and the CPU (`vramkit._core.attention_engine`, the Rust
`Engine::for_type`): "avx512-bf16" for bfloat16 on CPUs with AVX-512 BF16, "avx512" on CPUs with
AVX-512F, else "portable" (plain Rust loops vectorized for AVX2+FMA, or for the baseline target).
``VRAMKIT_SIMD=portable`` (or ``avx2``) caps the level, so only "portable" remains: that is how the tests
exercise a CPU without AVX-512 on one that has it.

Measured end to end (`_core.attention` against `torch.nn.functional.scaled_dot_product_attention` in the
same run, both cores of a 2-core Zen 5, 4096 tokens, 8 heads, head dim 64; `ENGINE_GFLOPS`,
`SDPA_GFLOPS`): the AVX-512 engines are 2.3x (f32) and 3.8x (bf16) SDPA's speed, the portable one is
slower than SDPA (164 vs 182 GFLOP/s). So "auto" on CPU prefers the Rust kernel only for the engines in
`FASTER_THAN_SDPA`; on other CPUs (most desktop Intel parts: no AVX-512) it prefers SDPA and keeps the
kernel for when SDPA does not fit the memory budget.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from .. import _core

if TYPE_CHECKING:
    from .._core import AttentionEngine

#: GFLOP/s of each engine, end to end, measured as above (4 * B * H * N^2 * D flops per call).
ENGINE_GFLOPS: dict[str, float] = {"avx512": 411.0, "avx512-bf16": 660.0, "portable": 164.0}
#: GFLOP/s of torch's SDPA on the same CPU and shape, by dtype (float16 was not measured: like float32).
SDPA_GFLOPS: dict[str, float] = {"float32": 182.0, "bfloat16": 175.0}

#: The engines measured faster than SDPA: "auto" on CPU tries the Rust kernel first only with these.
FASTER_THAN_SDPA: frozenset[str] = frozenset({"avx512", "avx512-bf16"})

_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@functools.cache
def rust_engine(dtype: torch.dtype) -> AttentionEngine:
    """The engine the Rust kernel runs for inputs of `dtype` on this CPU (fixed for the process: the SIMD
    level is read once)."""
    name = _NAMES.get(dtype)
    if name is None:
        raise TypeError(f"the Rust attention kernel takes float32, float16 or bfloat16; got {dtype}")
    return _core.attention_engine(name)  # type: ignore[arg-type]  # a checked name of the Literal


def beats_sdpa(engine: str) -> bool:
    """Whether `engine` was measured faster than torch's SDPA (see the module docs)."""
    return engine in FASTER_THAN_SDPA


def rust_first(dtype: torch.dtype) -> bool:
    """Whether "auto" on CPU tries the Rust kernel ("chunked") before SDPA for inputs of `dtype`."""
    return beats_sdpa(rust_engine(dtype))


def why(dtype: torch.dtype) -> str:
    """One clause for summaries: which engine runs and how it compares with SDPA (measured)."""
    engine = rust_engine(dtype)
    sdpa = SDPA_GFLOPS.get(_NAMES[dtype], SDPA_GFLOPS["float32"])
    ours = ENGINE_GFLOPS.get(engine)
    numbers = f" ({ours:.0f} vs {sdpa:.0f} GFLOP/s measured)" if ours is not None else ""
    if beats_sdpa(engine):
        return f"the Rust kernel's {engine} engine, the one this CPU runs for {_NAMES[dtype]}, beats SDPA{numbers}"
    return (f"the Rust kernel's {engine} engine, the one this CPU runs for {_NAMES[dtype]}, is slower than "
            f"SDPA{numbers}")
