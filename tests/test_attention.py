"""Every attention mode against a float64 reference: odd and cross-attention lengths, masks, both layouts,
all dtypes, every Rust engine, and the torch chunked path (on CPU here; the same code runs on CUDA)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import types
from typing import Any

import pytest
import torch

import vramkit._log
import vramkit.attention.external
from vramkit import _core
from vramkit.attention import attention, choose_mode, measure_mode, prepare
from vramkit.attention import torch_paths as attention_torch

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = list(TOL)
MODES = ["sdpa", "chunked", "sliced", "auto"]

# (batch, heads, q_len, kv_len, head_dim, v_head_dim)
SHAPES = [
    (1, 1, 1, 1, 8, 8),
    (2, 3, 37, 37, 16, 16),
    (1, 2, 130, 77, 64, 64),  # cross-attention, lengths that are no multiple of any block
    (2, 1, 65, 513, 40, 24),
    (1, 4, 257, 129, 128, 128),
    (3, 2, 5, 300, 17, 33),
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qkv(shape: tuple[int, ...], dtype: torch.dtype, heads_layout: bool = False, seed: int = 0
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    b, h, nq, nk, d, dv = shape
    g = gen(seed)
    q = torch.randn(b, h, nq, d, generator=g).to(dtype)
    k = torch.randn(b, h, nk, d, generator=g).to(dtype)
    v = torch.randn(b, h, nk, dv, generator=g).to(dtype)
    if heads_layout:
        q, k, v = (t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h * t.shape[3]).contiguous() for t in (q, k, v))
        return q, k, v, h
    return q, k, v, None


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int | None = None,
              mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(scale q k^T + mask) v in float64; rows with every key masked are 0."""
    p = prepare(q, k, v, heads, mask, scale)
    s = torch.einsum("bhqd,bhkd->bhqk", p.q.double(), p.k.double()) * p.scale
    if p.mask is not None:
        s = s.masked_fill(~p.mask, -math.inf) if p.mask.dtype == torch.bool else s + p.mask.double()
    dead = (s == -math.inf).all(dim=-1, keepdim=True)
    w = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    o = torch.einsum("bhqk,bhkd->bhqd", w, p.v.double())
    if heads is not None:
        o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
    return o


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("heads_layout", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_modes_match_float64(mode: str, heads_layout: bool, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    q, k, v, heads = qkv(shape, dtype, heads_layout)
    out = attention(q, k, v, heads, mode=mode)
    assert out.dtype == dtype
    assert rel_err(out, reference(q, k, v, heads)) < TOL[dtype]


@pytest.mark.parametrize("engine", _core.attention_engines())
@pytest.mark.parametrize("shape", SHAPES)
def test_every_rust_engine_matches_float64(engine: str, shape: tuple[int, ...]) -> None:
    dtypes = [torch.bfloat16] if engine == "avx512-bf16" else DTYPES
    for dtype in dtypes:
        for heads_layout in (False, True):
            q, k, v, heads = qkv(shape, dtype, heads_layout, seed=3)
            np_ = [t.view(torch.uint16).numpy() if dtype == torch.bfloat16 else t.numpy() for t in (q, k, v)]
            res, stats = _core.attention(*np_, heads, None, 0.37, engine=engine, block_q=29, block_kv=128)
            out = torch.from_numpy(res)
            out = out.view(torch.bfloat16) if dtype == torch.bfloat16 else out
            assert stats["engine"] == engine
            assert rel_err(out, reference(q, k, v, heads, scale=0.37)) < TOL[dtype], (dtype, heads_layout)


def masks(b: int, h: int, nq: int, nk: int) -> list[torch.Tensor]:
    g = gen(7)
    keep = torch.rand(b, h, nq, nk, generator=g) > 0.3
    keep[:, :, 1] = False  # a fully masked row in every head
    bias = torch.randn(1, nk, generator=g)
    bias[0, ::5] = -math.inf
    return [
        keep,                                   # bool, full shape
        keep[:1, :1],                           # bool (1, 1, Nq, Nk)
        keep[:, :1, :1],                        # bool key padding (B, 1, 1, Nk)
        torch.randn(nq, nk, generator=g),       # additive (Nq, Nk)
        bias,                                   # additive (1, Nk) with -inf, broadcast over queries
        torch.where(keep, 0.0, -math.inf)[:, :1].half(),  # additive half (B, 1, Nq, Nk) with dead rows
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads_layout", [False, True])
@pytest.mark.parametrize("mode", ["sdpa", "chunked", "sliced"])
def test_masks_broadcast_and_fully_masked_rows_give_zeros(mode: str, heads_layout: bool, dtype: torch.dtype) -> None:
    shape = (2, 3, 45, 150, 32, 32)
    q, k, v, heads = qkv(shape, dtype, heads_layout, seed=1)
    for i, mask in enumerate(masks(2, 3, 45, 150)):
        out = attention(q, k, v, heads, mask=mask, mode=mode)
        want = reference(q, k, v, heads, mask)
        assert rel_err(out, want) < TOL[dtype], i
        if i in (0, 1):
            rows = out[:, 1] if heads_layout else out[:, :, 1]
            assert bool((rows == 0).all()), "a query whose keys are all masked gives zeros"


def _bool_with_bytes(keep: torch.Tensor, *true_bytes: int) -> torch.Tensor:
    """`keep` as a bool tensor whose True elements hold the bytes `true_bytes` (cycled), not 1: what
    `.view(torch.bool)` of uint8 data gives (numpy and torch read every nonzero byte as True)."""
    codes = torch.tensor(true_bytes, dtype=torch.uint8).repeat(keep.numel() // len(true_bytes) + 1)
    raw = torch.where(keep.flatten(), codes[:keep.numel()], 0).reshape(keep.shape)
    return raw.view(torch.bool)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads_layout", [False, True])
def test_bool_masks_holding_bytes_other_than_1_read_nonzero_as_attend(heads_layout: bool, dtype: torch.dtype
                                                                        ) -> None:
    q, k, v, heads = qkv((2, 3, 45, 150, 32, 32), dtype, heads_layout, seed=11)
    for i, keep in enumerate(masks(2, 3, 45, 150)[:3]):
        odd = _bool_with_bytes(keep, 2, 255, 1, 0x80)
        assert odd.view(torch.uint8).max() == 255 and torch.equal(odd, keep)
        want = reference(q, k, v, heads, keep)
        for mode in ("sdpa", "chunked", "sliced", "auto"):
            plain = attention(q, k, v, heads, mask=keep, mode=mode)
            got = attention(q, k, v, heads, mask=odd, mode=mode)
            assert torch.equal(got, plain), (mode, i)
            assert rel_err(got, want) < TOL[dtype], (mode, i)
        # The torch chunked path (CUDA's "chunked") with small chunks, on both masks.
        outs = []
        for m in (keep, odd):
            p = prepare(q, k, v, heads, m, None)
            outs.append(torch.empty(2, 3, 45, 32, dtype=dtype))
            attention_torch.chunked(p.q, p.k, p.v, p.mask, p.scale, outs[-1], 16, 64)
        assert torch.equal(outs[0], outs[1]), i


@pytest.mark.parametrize("engine", _core.attention_engines())
def test_every_rust_engine_reads_bool_mask_bytes_as_nonzero(engine: str) -> None:
    dtype = torch.bfloat16 if engine == "avx512-bf16" else torch.float32
    q, k, v, _ = qkv((2, 3, 45, 150, 32, 32), dtype, seed=12)
    np_ = [t.view(torch.uint16).numpy() if dtype == torch.bfloat16 else t.numpy() for t in (q, k, v)]
    for keep in masks(2, 3, 45, 150)[:3]:
        keep4 = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape)).contiguous()
        for true_byte in (2, 3, 0x80, 0xFF):
            odd = _bool_with_bytes(keep4, true_byte).numpy()
            assert odd.dtype == bool and odd.view("uint8").max() == true_byte
            plain, _ = _core.attention(*np_, None, keep4.numpy(), engine=engine, block_q=16, block_kv=64)
            got, _ = _core.attention(*np_, None, odd, engine=engine, block_q=16, block_kv=64)
            assert (got == plain).all(), true_byte


def huge_negative_masks(nq: int, nk: int, mask_dtype: torch.dtype) -> list[torch.Tensor]:
    """Additive masks using `torch.finfo(mask_dtype).min` (the usual "masked out" value) instead of -inf."""
    lo = torch.finfo(mask_dtype).min
    m = torch.randn(1, 1, nq, nk, generator=gen(13)).to(mask_dtype)
    m[..., 0, :] = lo                    # every key at the minimum: the float64 reference averages V
    m[..., 1, ::2] = lo                  # half the keys
    m[..., 2, :] = -math.inf
    m[..., 2, 1::3] = lo                 # -inf and the minimum: the minimum keys share the weight
    m[..., 3, :] = -math.inf             # all -inf: zeros
    per_row = torch.zeros(1, 1, nq, 1, dtype=mask_dtype)
    per_row[..., 0, :] = lo              # broadcast over the keys
    per_row[..., 4, :] = -math.inf
    return [m, per_row]


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads_layout", [False, True])
def test_finfo_min_masks_match_float64(heads_layout: bool, dtype: torch.dtype, mask_dtype: torch.dtype) -> None:
    """`finfo.min` is finite: a row masked with it averages V in float64, so it must not turn into -inf
    (zeros) in the Rust kernel's log2 scaling."""
    q, k, v, heads = qkv((2, 3, 45, 150, 32, 32), dtype, heads_layout, seed=14)
    for i, mask in enumerate(huge_negative_masks(45, 150, mask_dtype)):
        want = reference(q, k, v, heads, mask)
        rows = want[:, 0] if heads_layout else want[:, :, 0]
        assert float(rows.abs().max()) > 0.01  # the fully "masked" row is V's average, not zeros
        p = prepare(q, k, v, heads, mask, None)
        # "auto" runs SDPA first where the Rust engine is slower (VRAMKIT_SIMD=portable); SDPA converts the
        # mask to half-precision inputs' dtype, where finfo(float32).min becomes -inf (documented).
        auto_is_half_sdpa = choose_mode(p) == "sdpa" and dtype != torch.float32
        for mode in ("chunked", "sliced") if auto_is_half_sdpa else ("chunked", "sliced", "auto"):
            out = attention(q, k, v, heads, mask=mask, mode=mode)
            assert rel_err(out, want) < TOL[dtype], (mode, i)
        want4 = reference(p.q, p.k, p.v, None, p.mask)
        for chunk_q, chunk_kv in ((16, 64), (45, 150)):
            out = torch.empty(2, 3, 45, 32, dtype=dtype)
            attention_torch.chunked(p.q, p.k, p.v, p.mask, p.scale, out, chunk_q, chunk_kv)
            assert rel_err(out, want4) < TOL[dtype], ("torch chunked", i)


@pytest.mark.parametrize("engine", _core.attention_engines())
def test_every_rust_engine_keeps_finfo_min_finite(engine: str) -> None:
    dtype = torch.bfloat16 if engine == "avx512-bf16" else torch.float32
    q, k, v, _ = qkv((1, 2, 45, 150, 32, 32), dtype, seed=15)
    np_ = [t.view(torch.uint16).numpy() if dtype == torch.bfloat16 else t.numpy() for t in (q, k, v)]
    for mask_dtype in (torch.float32, torch.bfloat16):
        for mask in huge_negative_masks(45, 150, mask_dtype):
            m = mask.view(torch.uint16).numpy() if mask_dtype == torch.bfloat16 else mask.numpy()
            res, _ = _core.attention(*np_, None, m, engine=engine, block_q=16, block_kv=64)
            out = torch.from_numpy(res)
            out = out.view(torch.bfloat16) if dtype == torch.bfloat16 else out
            assert rel_err(out, reference(q, k, v, None, mask)) < TOL[dtype], mask_dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_chunked_path_matches_float64_with_small_chunks(dtype: torch.dtype) -> None:
    shape = (2, 3, 61, 97, 24, 40)
    q, k, v, _ = qkv(shape, dtype, seed=5)
    for mask in [None, *masks(2, 3, 61, 97)]:
        p = prepare(q, k, v, None, mask, None)
        want = reference(q, k, v, None, mask)
        for chunk_q, chunk_kv in [(16, 32), (61, 97), (7, 128), (64, 5)]:
            out = torch.empty(2, 3, 61, 40, dtype=dtype)
            attention_torch.chunked(p.q, p.k, p.v, p.mask, p.scale, out, chunk_q, chunk_kv)
            assert rel_err(out, want) < TOL[dtype]
        for size in (1, 2, 4, 6):
            out = torch.empty(2, 3, 61, 40, dtype=dtype)
            attention_torch.sliced(p.q, p.k, p.v, p.mask, p.scale, out, size)
            assert rel_err(out, want) < TOL[dtype]


def test_expanded_masks_are_not_materialized(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stride-0 (expanded) mask is collapsed to its distinct values: the Rust kernel gets the small
    array (it broadcasts size-1 dims), not a (B, H, Nq, Nk) copy, and every mode gives the same result."""
    b, h, nq, nk = 2, 3, 45, 150
    q, k, v, _ = qkv((b, h, nq, nk, 32, 32), torch.float32, seed=16)
    keys = masks(b, h, nq, nk)[2]  # (B, 1, 1, Nk) bool
    bias = torch.randn(nq, 1, generator=gen(17)).expand(nq, nk)  # 2-D, expanded over the keys
    cases = [
        (keys, keys.expand(b, h, nq, nk), (b, 1, 1, nk)),
        (torch.where(keys, 0.0, -math.inf), torch.where(keys, 0.0, -math.inf).expand(b, h, nq, nk), (b, 1, 1, nk)),
        (bias[:, :1].contiguous(), bias, (1, 1, nq, 1)),
        (keys[:1, :, :, :1], keys[:1, :, :, :1].expand(b, h, nq, nk), (1, 1, 1, 1)),
    ]
    seen: list[tuple[int, ...]] = []
    real = _core.attention

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(args[4].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_core, "attention", spy)
    for small, expanded, collapsed in cases:
        assert prepare(q, k, v, None, expanded, None).mask.shape == collapsed
        for mode in ("chunked", "sdpa", "sliced"):
            seen.clear()
            got = attention(q, k, v, mask=expanded, mode=mode)
            assert torch.equal(got, attention(q, k, v, mask=small, mode=mode)), mode
            assert rel_err(got, reference(q, k, v, None, small)) < 1e-5, mode
            if mode == "chunked":
                assert seen[0] == collapsed  # the array handed to _core, not (B, H, Nq, Nk)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sdpa", "chunked", "sliced"])
def test_upcast_attention_is_at_least_as_accurate(mode: str, dtype: torch.dtype) -> None:
    q, k, v, _ = qkv((1, 2, 100, 90, 64, 64), dtype, seed=2)
    q = q * 4  # large logits: where half-precision scores lose accuracy
    want = reference(q, k, v)
    up = attention(q, k, v, mode=mode, attn_precision=torch.float32)
    assert rel_err(up, want) < TOL[dtype]


@pytest.mark.parametrize("heads_layout", [False, True])
def test_modes_agree_with_each_other(heads_layout: bool) -> None:
    q, k, v, heads = qkv((2, 4, 200, 333, 64, 64), torch.float32, heads_layout, seed=9)
    mask = masks(2, 4, 200, 333)[2]
    outs = {m: attention(q, k, v, heads, mask, scale=0.2, mode=m) for m in ("sdpa", "chunked", "sliced")}
    for m in ("chunked", "sliced"):
        torch.testing.assert_close(outs[m], outs["sdpa"], rtol=1e-5, atol=1e-5)


def test_scale_is_honoured() -> None:
    q, k, v, _ = qkv((1, 2, 20, 30, 16, 16), torch.float32)
    for mode in ("sdpa", "chunked", "sliced"):
        for scale in (0.0, 0.05, 1.7, -0.5):
            assert rel_err(attention(q, k, v, scale=scale, mode=mode), reference(q, k, v, scale=scale)) < 1e-5


@pytest.mark.parametrize("mode", ["sdpa", "chunked", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_sequences_give_empty_or_zero_outputs(mode: str, dtype: torch.dtype) -> None:
    q, k, v, _ = qkv((2, 3, 0, 5, 8, 8), dtype)
    assert attention(q, k, v, mode=mode).shape == (2, 3, 0, 8)
    q, k, v, _ = qkv((2, 3, 4, 0, 8, 6), dtype)
    out = attention(q, k, v, mode=mode)
    assert out.shape == (2, 3, 4, 6) and bool((out == 0).all())
    q, k, v, heads = qkv((0, 3, 4, 5, 8, 8), dtype, heads_layout=True)
    assert attention(q, k, v, heads, mode=mode).shape == (0, 4, 24)


@pytest.mark.parametrize("mode", ["chunked", "sliced"])
def test_nan_propagates_as_in_torch(mode: str) -> None:
    q, k, v, _ = qkv((1, 2, 20, 90, 8, 8), torch.float32, seed=4)
    for t, idx in ((q, (0, 0, 3, 2)), (k, (0, 1, 50, 0)), (v, (0, 0, 70, 5))):
        bad = t.clone()
        bad[idx] = math.nan
        args = [bad if x is t else x for x in (q, k, v)]
        want = torch.nn.functional.scaled_dot_product_attention(*args)
        got = attention(*args, mode=mode)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert bool(torch.isnan(got).any())


def test_non_contiguous_inputs_and_grad_fall_back_correctly() -> None:
    q, k, v, _ = qkv((2, 3, 33, 44, 16, 16), torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D) memory
    assert rel_err(attention(qt, k, v, mode="chunked"), reference(q, k, v)) < 1e-5
    qg = q.clone().requires_grad_(True)
    out = attention(qg, k, v, mode="chunked")  # the torch path: differentiable
    out.sum().backward()
    assert qg.grad is not None and bool(torch.isfinite(qg.grad).all())


def test_measure_mode_reports_time_and_linear_memory() -> None:
    q, k, v, _ = qkv((1, 4, 1024, 1024, 64, 64), torch.float32)
    scores = 4 * 1024 * 1024 * 4
    for mode in ("chunked", "sdpa", "sliced"):
        seconds, extra = measure_mode(q, k, v, mode, repeats=1)
        assert seconds > 0 and extra >= 0
        if mode == "chunked":
            assert 0 < extra < scores / 8  # 1/16 at 4096 tokens: see test_plan_attention.py
        if mode == "sliced":
            assert extra >= 1024 * 1024 * 4  # at least one full score matrix: the point of slicing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_modes_match_float64(dtype: torch.dtype) -> None:
    q, k, v, heads = qkv((2, 4, 300, 257, 64, 64), dtype, heads_layout=True)
    mask = masks(2, 4, 300, 257)[2]
    want = reference(q, k, v, heads, mask)
    for mode in ("sdpa", "chunked", "sliced", "auto"):
        out = attention(q.cuda(), k.cuda(), v.cuda(), heads, mask.cuda(), mode=mode, budget_bytes=64 << 20)
        assert rel_err(out.cpu(), want) < TOL[dtype], mode


@pytest.mark.parametrize("mode", ["sage", "flash", "xformers"])
def test_external_modes_fall_back_with_one_warning(mode: str, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vramkit._log, "_warned", set())
    q, k, v, _ = qkv((1, 2, 30, 40, 16, 16), torch.float32)
    with caplog.at_level(logging.WARNING, logger="vramkit"):
        for _ in range(3):
            assert rel_err(attention(q, k, v, mode=mode), reference(q, k, v)) < 1e-5
    warnings = [r for r in caplog.records if f"mode {mode!r} unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "needs a CUDA device" in warnings[0].getMessage()


def _fake_backends(monkeypatch: pytest.MonkeyPatch, kernel: Any) -> None:
    """Installs stand-ins for sageattention, flash_attn and xformers.ops whose kernel is `kernel`."""
    mods = {"sageattention": {"sageattn": kernel}, "flash_attn": {"flash_attn_func": kernel},
            "xformers": {}, "xformers.ops": {"memory_efficient_attention": kernel}}
    for name, attrs in mods.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))


def _cuda_like(d: int = 64, dv: int = 64) -> Any:
    """A call that passes the device and dtype checks (CPU tensors standing in for CUDA ones)."""
    g = gen(18)
    q, k = (torch.randn(1, 2, 8, d, generator=g).half() for _ in range(2))
    v = torch.randn(1, 2, 8, dv, generator=g).half()
    return types.SimpleNamespace(q=q, k=k, v=v, mask=None, scale=d ** -0.5, device=torch.device("cuda"))


REFUSALS = {
    "flash": RuntimeError("FlashAttention forward only supports head dimension at most 256\nmore text"),
    "xformers": NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:"),
    "sage": ValueError("Unsupported head_dim: 72"),
}


@pytest.mark.parametrize("mode", ["sage", "flash", "xformers"])
def test_external_kernels_that_refuse_a_call_fall_back_with_one_warning(
        mode: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vramkit._log, "_warned", set())
    calls: list[int] = []

    def refuse(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        raise REFUSALS[mode]

    _fake_backends(monkeypatch, refuse)
    p = _cuda_like()
    out4 = torch.zeros(1, 2, 8, 64, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="vramkit"):
        for _ in range(3):
            assert vramkit.attention.external.run_external(p, mode, out4) is False
        # Through `attention`, with the CUDA check waived for these CPU tensors: the "auto" choice runs.
        monkeypatch.setattr(vramkit.attention.external, "_unusable", lambda p, mode: None)
        q, k, v, _ = qkv((1, 2, 30, 40, 16, 16), torch.float16)
        assert rel_err(attention(q, k, v, mode=mode), reference(q, k, v)) < TOL[torch.float16]
    assert len(calls) == 4 and bool((out4 == 0).all())
    warnings = [r.getMessage() for r in caplog.records if f"mode {mode!r} unavailable" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert type(REFUSALS[mode]).__name__ in warnings[0] and "more text" not in warnings[0]
    assert "using the 'auto' choice instead" in warnings[0]


@pytest.mark.parametrize(("d", "dv"), [(64, 32), (320, 320), (288, 64)])
def test_flash_is_not_called_with_head_dims_it_lacks(d: int, dv: int, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vramkit._log, "_warned", set())
    calls: list[int] = []

    def flash(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        raise AssertionError("must not be called")

    _fake_backends(monkeypatch, flash)
    out4 = torch.zeros(1, 2, 8, dv, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="vramkit"):
        assert vramkit.attention.external.run_external(_cuda_like(d, dv), "flash", out4) is False
    assert calls == []
    assert "at most 256" in caplog.text and f"q/k {d}, v {dv}" in caplog.text


@pytest.mark.parametrize("mode", ["sage", "flash", "xformers"])
def test_a_working_external_kernel_writes_the_output(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        scale = kwargs.get("sm_scale", kwargs.get("softmax_scale", kwargs.get("scale")))
        if mode == "sage":
            assert kwargs["tensor_layout"] == "HND"
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        bhnd = (t.transpose(1, 2) for t in (q, k, v))  # flash and xFormers take (B, N, H, D)
        return torch.nn.functional.scaled_dot_product_attention(*bhnd, scale=scale).transpose(1, 2)

    _fake_backends(monkeypatch, kernel)
    p = _cuda_like()
    out4 = torch.zeros(1, 2, 8, 64, dtype=torch.float16)
    assert vramkit.attention.external.run_external(p, mode, out4) is True
    assert rel_err(out4, reference(p.q, p.k, p.v)) < TOL[torch.float16]


@pytest.mark.parametrize("level", ["portable", "avx2"])
def test_the_portable_engine_alone_under_capped_simd_levels(level: str) -> None:
    """`VRAMKIT_SIMD` caps the level: only the portable engine remains, in its AVX2+FMA copy or its
    baseline copy (no FMA); both must pass the accuracy tests."""
    if os.environ.get("VRAMKIT_SIMD"):
        pytest.skip("already running under a capped SIMD level")
    env = {**os.environ, "VRAMKIT_SIMD": level}
    probe = subprocess.run([sys.executable, "-c", "import vramkit._core as c; print(*c.attention_engines())"],
                           env=env, capture_output=True, text=True, timeout=120, check=True)
    assert probe.stdout.split() == ["portable"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
         "-k", "modes_match or rust_engine or masks or nan"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
