"""Dequantizing one layer on the device costs its output plus at most 64 MiB, and stays bit-exact.

The torch path (what CUDA runs) is traced on the CPU with `alloc_tracer.AllocationTracer`, on Flux's largest
layer (``single_blocks.*.linear1``: 21504x3072, bf16); the GPU test measures the same with
``torch.cuda.max_memory_allocated``. The ComfyUI paths (quantized modules, VRAMKit's layout, the native
layouts' forward) are traced in tests/comfyui/test_native_layouts.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alloc_tracer import AllocationTracer

from vramkit import quant
from vramkit.quant import api, torch_math

MiB = 1 << 20
BOUND = 64 * MiB
FLUX_LINEAR1 = (21504, 3072)
SCHEMES = [("int8", "group"), ("int8", "channel"), ("int8", "tensor"), ("fp8_e4m3fn", "tensor"),
           ("fp8_e4m3fn", "group"), ("fp8_e5m2", "channel"), ("fp8_e5m2", "none")]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.fixture(scope="module")
def flux_weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(FLUX_LINEAR1, generator=g) * 0.02).to(torch.bfloat16)


def test_tracer_counts_what_the_one_shot_formula_allocates(flux_weight: torch.Tensor) -> None:
    """The naive ``(codes.float() * scale).to(dtype)`` holds two float32 copies at once (8 bytes a weight),
    then the product and the output: the tracer must see that, or a passing bound below would prove
    nothing."""
    q = quant.quantize(flux_weight, "int8", "group", 64)
    assert q.scale is not None
    with AllocationTracer() as tracer:
        values = q.data.float().reshape(-1, 64) * q.scale.reshape(-1, 1)
        out = values.reshape(q.shape).to(torch.bfloat16)
        del values
    n = flux_weight.numel()
    assert tracer.peak >= 2 * 4 * n > out.nbytes + BOUND
    assert tracer.live == out.nbytes, "the float32 copies were freed: live bytes must drop back"


@pytest.mark.parametrize(("fmt", "granularity"), SCHEMES, ids=["-".join(s) for s in SCHEMES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_path_peak_is_output_plus_at_most_64_mib(flux_weight: torch.Tensor, fmt: str, granularity: str,
                                                       dtype: torch.dtype) -> None:
    q = quant.quantize(flux_weight, fmt, granularity, 64 if granularity == "group" else None)
    with AllocationTracer() as tracer:
        out = api._dequantize_torch(q, dtype)
    assert out.shape == flux_weight.shape and out.dtype == dtype
    extra = tracer.peak - out.nbytes
    assert extra <= BOUND, f"{fmt} {granularity} -> {dtype}: {extra / MiB:.1f} MiB beyond the output"
    assert torch.equal(bits(out), bits(q.dequantize(dtype))), "the bounded path changed the bits"


CHUNKS = [64, 1000, 4096, torch_math.DEQUANT_CHUNK_BYTES]


@pytest.mark.parametrize("chunk_bytes", CHUNKS)
@pytest.mark.parametrize(("fmt", "granularity", "group_size"), [
    ("int8", "tensor", None), ("int8", "channel", None), ("int8", "group", 32), ("int8", "group", 128),
    ("fp8_e4m3fn", "none", None), ("fp8_e4m3fn", "tensor", None), ("fp8_e4m3fn", "channel", None),
    ("fp8_e4m3fn", "group", 64), ("fp8_e5m2", "none", None), ("fp8_e5m2", "channel", None),
    ("fp8_e5m2", "group", 32),
])
def test_chunked_dequantize_is_bit_exact_with_the_rust_path(fmt: str, granularity: str, group_size: int | None,
                                                             chunk_bytes: int) -> None:
    """Chunks smaller than a block, chunks that straddle blocks, several blocks per chunk, one chunk: every
    output dtype gives the Rust kernel's bits (``float32(code) * scale``, one rounding)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, 128, generator=g) * torch.logspace(-3, 2, 48)[:, None, None]
    x[5, 1, 7] = 0.0
    x[7] = 0.0  # an all-zero channel: scale 1
    for src in (torch.bfloat16, torch.float32):
        q = quant.quantize(x.to(src), fmt, granularity, group_size)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            expected = q.dequantize(dtype)  # the Rust kernel (CPU)
            got = torch_math.dequantize(q.data, q.format, q.scale, q.block_len, dtype, chunk_bytes=chunk_bytes)
            assert got.shape == expected.shape and got.dtype == dtype
            assert torch.equal(bits(got), bits(expected)), f"{src} -> {dtype}"


def test_fp8_cast_codes_dequantize_bit_exact_in_chunks() -> None:
    """Every fp8 code (NaN and Inf included) through small chunks equals the Rust path."""
    for fmt in ("fp8_e4m3fn", "fp8_e5m2"):
        q = quant.QTensor(torch.arange(256, dtype=torch.uint8).reshape(16, 16), None, fmt, "none", None,
                          torch.Size((16, 16)), torch.float32)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = torch_math.dequantize(q.data, fmt, None, q.block_len, dtype, chunk_bytes=40)
            assert torch.equal(bits(got), bits(q.dequantize(dtype)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("fmt", "granularity"), SCHEMES, ids=["-".join(s) for s in SCHEMES])
def test_cuda_peak_is_output_plus_at_most_64_mib(flux_weight: torch.Tensor, fmt: str, granularity: str) -> None:
    q = quant.quantize(flux_weight.cuda(), fmt, granularity, 64 if granularity == "group" else None)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = q.dequantize(torch.bfloat16)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out.nbytes
    assert extra <= BOUND, f"{fmt} {granularity}: {extra / MiB:.1f} MiB beyond the output"
    cpu = quant.quantize(flux_weight, fmt, granularity, 64 if granularity == "group" else None)
    assert torch.equal(bits(out.cpu()), bits(cpu.dequantize(torch.bfloat16)))
