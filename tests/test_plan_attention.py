"""The attention planner: its predicted peaks bound the measured ones, and budgets are kept.

Measured on CPU: the Rust kernel counts every byte it allocates (`peak_scratch_bytes`); the torch paths
are measured with torch's profiler, which records every allocation of torch's CPU allocator
(`vramkit.attention.measure`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import torch

from vramkit import _core
from vramkit.attention import attention, measure_mode, plan, prepare
from vramkit.attention import torch_paths as attention_torch
from vramkit.attention.measure import peak_bytes

CASES = [
    # (batch, heads, q_len, kv_len, head_dim, v_head_dim, dtype, heads_layout, mask)
    (1, 8, 1024, 1024, 64, 64, torch.float32, False, None),
    (2, 3, 333, 517, 40, 24, torch.bfloat16, True, "bool"),
    (1, 4, 700, 77, 128, 128, torch.float16, True, "float"),
    (3, 2, 129, 1000, 16, 48, torch.float32, False, "keys"),
]
BUDGETS = [None, 8 << 20, 1 << 20, 256 << 10]


def make(case: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None, torch.Tensor | None]:
    b, h, nq, nk, d, dv, dtype, heads_layout, mask_kind = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, nq, d, generator=g).to(dtype)
    k = torch.randn(b, h, nk, d, generator=g).to(dtype)
    v = torch.randn(b, h, nk, dv, generator=g).to(dtype)
    heads = None
    if heads_layout:
        q, k, v = (t.transpose(1, 2).reshape(b, t.shape[2], h * t.shape[3]).contiguous() for t in (q, k, v))
        heads = h
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, h, nq, nk, generator=g) > 0.5
    elif mask_kind == "float":
        mask = torch.randn(nq, nk, generator=g).to(dtype)
    elif mask_kind == "keys":
        mask = torch.where(torch.rand(b, 1, 1, nk, generator=g) > 0.2, 0.0, -math.inf)
    return q, k, v, heads, mask


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", CASES)
def test_rust_kernel_peak_is_bounded_by_the_plan(case: tuple, budget: int | None) -> None:
    q, k, v, heads, mask = make(case)
    p = prepare(q, k, v, heads, mask, None)
    pl = plan(p, budget)
    _, extra = measure_mode(q, k, v, "chunked", heads=heads, mask=mask, repeats=1, budget_bytes=budget)
    assert 0 < extra <= pl["kernel_peak_bytes"], pl["summary"]
    if budget is not None and pl["kernel_fits"]:
        assert extra <= budget


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", CASES)
def test_torch_chunked_peak_is_bounded_by_the_plan(case: tuple, budget: int | None) -> None:
    q, k, v, heads, mask = make(case)
    p = prepare(q, k, v, heads, mask, None)
    pl = plan(p, budget)
    out4 = p.new_output()[1]

    def run() -> None:
        attention_torch.chunked(p.q, p.k, p.v, p.mask, p.scale, out4, pl["chunk_q"], pl["chunk_kv"])

    _, peak = peak_bytes(run, p.device)
    assert 0 < peak <= pl["torch_peak_bytes"], pl["summary"]
    if budget is not None and pl["torch_fits"]:
        assert peak <= budget


@pytest.mark.parametrize("budget", [None, 4 << 20])
@pytest.mark.parametrize("case", CASES)
def test_slicing_peak_is_bounded_by_the_plan(case: tuple, budget: int | None) -> None:
    q, k, v, heads, mask = make(case)
    p = prepare(q, k, v, heads, mask, None)
    pl = plan(p, budget)
    out4 = p.new_output()[1]
    _, peak = peak_bytes(lambda: attention_torch.sliced(p.q, p.k, p.v, p.mask, p.scale, out4, pl["slice"]),
                         p.device)
    assert 0 < peak <= pl["sliced_peak_bytes"], pl["summary"]


def test_the_kernel_at_4096_tokens_needs_under_a_sixteenth_of_the_score_matrix() -> None:
    for dtype_bytes in (4, 2):
        pl = _core.plan_attention(1, 8, 4096, 4096, 64, dtype_bytes, 0)
        assert pl["kernel_peak_bytes"] * 16 < pl["scores_bytes"], pl["summary"]


def test_smaller_budgets_give_smaller_plans_and_say_when_nothing_fits() -> None:
    last = None
    for budget in (0, 1 << 30, 64 << 20, 8 << 20, 1 << 20):
        pl = _core.plan_attention(2, 16, 4096, 4096, 64, 2, budget)
        if last is not None:
            assert pl["kernel_peak_bytes"] <= last["kernel_peak_bytes"]
            assert pl["torch_peak_bytes"] <= last["torch_peak_bytes"]
        if budget:
            assert pl["torch_fits"] == (pl["torch_peak_bytes"] <= budget)
        last = pl
    tiny = _core.plan_attention(2, 16, 4096, 4096, 64, 2, 1000)
    assert not tiny["kernel_fits"] and not tiny["torch_fits"] and not tiny["sliced_fits"]
    assert "over budget" in tiny["summary"]


def test_auto_follows_the_budget() -> None:
    q, k, v, heads, mask = make(CASES[0])
    p = prepare(q, k, v, heads, mask, None)
    from vramkit.attention import choose_mode, engines

    # CPU: the Rust kernel first where its engine beats SDPA (AVX-512), else SDPA; both fit the free memory.
    fastest = "chunked" if engines.rust_first(q.dtype) else "sdpa"
    assert choose_mode(p, None) == fastest
    assert choose_mode(p, 0) == fastest
    out = attention(q, k, v, heads, mask, mode="auto", budget_bytes=512 << 10)
    assert out.shape == q.shape


@pytest.mark.parametrize("budget", [None, 0])
def test_none_and_0_mean_the_free_memory_everywhere(budget: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """budget_bytes None or 0 = the memory free on the device, for plan, choose_mode, "chunked" on CPU (the
    Rust kernel's blocks are planned under it) and the ComfyUI override's 0."""
    import vramkit.attention.planner
    from vramkit.attention import choose_mode, last_kernel_stats, make_comfy_override

    q, k, v, heads, mask = make(CASES[0])
    p = prepare(q, k, v, heads, mask, None)
    free = 300 << 10
    monkeypatch.setattr(vramkit.attention.planner, "available_bytes", lambda device: free)
    pl = plan(p, budget)
    assert pl["budget_bytes"] == free and pl == plan(p, free)
    unlimited = _core.plan_attention(1, 8, 1024, 1024, 64, 4, 0)
    assert (pl["block_q"], pl["heads_per_group"]) != (unlimited["block_q"], unlimited["heads_per_group"])

    def blocks(stats: dict | None) -> tuple[int, int, int]:
        assert stats is not None
        return stats["block_q"], stats["block_kv"], stats["heads_per_group"]

    want = (pl["block_q"], pl["block_kv"], pl["heads_per_group"])
    attention(q, k, v, heads, mask, mode="chunked", budget_bytes=budget)
    assert blocks(last_kernel_stats()) == want
    attention(q, k, v, heads, mask, mode="auto", budget_bytes=budget)
    assert blocks(last_kernel_stats()) == want
    monkeypatch.setattr(vramkit.attention.planner, "available_bytes", lambda device: 1000)
    assert choose_mode(p, budget) == choose_mode(p, 1000)  # nothing fits 1000 bytes: the smallest plan
    monkeypatch.setattr(vramkit.attention.planner, "available_bytes", lambda device: 64 << 30)
    assert choose_mode(p, budget) == ("chunked" if vramkit.attention.engines.rust_first(q.dtype) else "sdpa")

    monkeypatch.setattr(vramkit.attention.planner, "available_bytes", lambda device: free)
    flat = [t.transpose(1, 2).reshape(1, 1024, 8 * 64) for t in (q, k, v)]
    make_comfy_override("chunked", budget_bytes=0)(lambda *a, **kw: None, *flat, 8)
    assert blocks(last_kernel_stats()) == want


def test_no_mode_fits_is_logged_once_per_shape_and_budget(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import vramkit._log

    monkeypatch.setattr(vramkit._log, "_warned", set())
    q, k, v, heads, mask = make(CASES[0])
    small = q[:, :, :100]

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "no mode fits" in r.getMessage()]

    with caplog.at_level(logging.DEBUG, logger="vramkit"):
        for _ in range(5):
            attention(q, k, v, heads, mask, mode="auto", budget_bytes=1000)
        assert len(lines()) == 1 and "budget of 0.0 MiB" in lines()[0]
        debug = [r for r in caplog.records if r.levelname == "DEBUG" and "no mode fits" in r.getMessage()]
        assert len(debug) == 4  # the repeats still reach the debug log
        attention(q, k, v, heads, mask, mode="auto", budget_bytes=2000)  # another budget
        attention(small, k, v, heads, mask, mode="auto", budget_bytes=1000)  # another shape
        attention(small, k, v, heads, mask, mode="auto", budget_bytes=1000)
    assert len(lines()) == 3


def test_cuda_free_memory_counts_what_torch_has_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free for a new tensor on CUDA = the driver's free memory + reserved-but-unallocated cache (as
    ComfyUI's get_free_memory), not mem_get_info alone. Tested with the torch.cuda calls replaced."""
    from vramkit.attention import available_bytes

    dev = torch.device("cuda", 1)
    seen: list[object] = []

    def fake(value: object) -> Callable[..., object]:
        def f(device: object = None) -> object:
            seen.append(device)
            return value
        return f

    monkeypatch.setattr(torch.cuda, "mem_get_info", fake((3 << 30, 24 << 30)))  # (free, total)
    monkeypatch.setattr(torch.cuda, "memory_reserved", fake(10 << 30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", fake(4 << 30))
    assert available_bytes(dev) == (3 << 30) + (6 << 30)
    assert seen == [dev, dev, dev]
    monkeypatch.setattr(torch.cuda, "memory_allocated", fake(11 << 30))  # never below the driver's number
    assert available_bytes(dev) == 3 << 30
    assert available_bytes(torch.device("cpu")) > 0
    assert available_bytes(torch.device("meta")) == 0


@pytest.mark.parametrize("bad", [
    dict(dtype_bytes=0), dict(dtype_bytes=16), dict(batch=2**62, heads=2**62),
])
def test_bad_planner_arguments_are_value_errors(bad: dict) -> None:
    args = dict(batch=1, heads=8, q_len=64, kv_len=64, head_dim=64, dtype_bytes=2, budget_bytes=0)
    args.update(bad)
    with pytest.raises(ValueError):
        _core.plan_attention(**args)


@pytest.mark.parametrize("sizes", [
    (1, 1, 2**32, 2**32, 1),       # q_len * kv_len = 2^64
    (1, 1, 1, 1, 2**62),           # head_dim bytes
    (2**31, 2**31, 1, 2**40, 1),   # batch * heads * kv_len
    (1, 1, 2**40, 2**40, 2**20),
])
def test_absurd_sizes_never_fit(sizes: tuple[int, ...]) -> None:
    """Byte counts saturate instead of wrapping around to a small number that fits (release builds)."""
    b, h, nq, nk, d = sizes
    try:
        pl = _core.plan_attention(b, h, nq, nk, d, 2, 300 << 30, threads=2**40)
    except ValueError as e:  # sizes whose tensors could not exist at all
        assert "overflow" in str(e)
        return
    assert not pl["sliced_fits"], pl["summary"]
    for mode in ("kernel", "torch", "sliced"):
        assert pl[f"{mode}_fits"] == (pl[f"{mode}_peak_bytes"] <= 300 << 30), (mode, pl["summary"])
    assert pl["sliced_peak_bytes"] == 2**64 - 1
    huge = _core.plan_attention(1, 1, 2**32, 2**32, 1, 2, 300 << 30)
    assert not huge["sliced_fits"] and huge["sliced_peak_bytes"] == 2**64 - 1


def test_unknown_engine_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="accepted: auto, portable"):
        _core.plan_attention(1, 8, 64, 64, 64, 2, 0, engine="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
def test_cuda_chunked_peak_is_bounded_by_the_plan(case: tuple) -> None:
    q, k, v, heads, mask = (None if t is None else t.cuda() if isinstance(t, torch.Tensor) else t
                            for t in make(case))
    p = prepare(q, k, v, heads, mask, None)
    pl = plan(p, 8 << 20)
    # Warm up first: cuBLAS takes its workspace from the caching allocator on first use, once.
    attention(q, k, v, heads, mask, mode="chunked", budget_bytes=8 << 20)
    _, extra = measure_mode(q, k, v, "chunked", heads=heads, mask=mask, repeats=1, budget_bytes=8 << 20)
    assert extra <= pl["torch_peak_bytes"]
