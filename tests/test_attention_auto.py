"""Attention "auto": ComfyUI's backend kept off the CPU unless the budget forces chunked/sliced, free memory
read once per sampling step, plans and decisions cached per call shape, and the CPU engine table. No
ComfyUI and no GPU needed: CUDA-typed problems are CPU tensors that claim CUDA, or meta tensors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import vramkit._core
import vramkit._log
import vramkit.attention.planner as planner
from vramkit.attention import engines, make_comfy_override, prepare
from vramkit.comfy.attention_override import backend_label

B, H, N, D = 2, 8, 1024, 64


class Backend:
    """Stands in for the backend ComfyUI hands the override: records each call, returns a marker."""

    def __init__(self, name: str = "attention_sage") -> None:
        self.__name__ = name
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((args, kwargs))
        return torch.full((1,), 7.0)


@pytest.fixture
def claim_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Makes tensors marked with ``claim(t)`` report a CUDA device (their data stays on the CPU)."""
    real = torch.Tensor.device

    @property  # type: ignore[misc]
    def device(self: torch.Tensor) -> torch.device:
        return torch.device("cuda", 0) if getattr(self, "_claims_cuda", False) else real.__get__(self)

    monkeypatch.setattr(torch.Tensor, "device", device)

    def claim(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for t in ts:
            t._claims_cuda = True  # type: ignore[attr-defined]
        return ts

    yield claim


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the free-memory reads (the device asked), answering 8 GiB."""
    seen: list[str] = []

    def reader(device: torch.device) -> int:
        seen.append(str(device))
        return 8 << 30

    monkeypatch.setattr(planner, "available_bytes", reader)
    return seen


def comfy_qkv(device: str = "cpu", dtype: torch.dtype = torch.float16, n: int = N) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    if device == "meta":
        return tuple(torch.empty(B, n, H * D, dtype=dtype, device="meta") for _ in range(3))
    return tuple(torch.randn(B, n, H * D, generator=g).to(dtype) for _ in range(3))


def test_auto_calls_the_backend_comfyui_handed_it_on_a_cuda_problem(claim_cuda: Any, reads: list[str]) -> None:
    q, k, v = claim_cuda(*comfy_qkv())
    assert q.device.type == "cuda"
    func = Backend("attention_sage")
    fn = make_comfy_override("auto")
    opts = {"sigmas": torch.ones(1)}
    for _ in range(5):
        out = fn(func, q, k, v, H, mask=None, transformer_options=opts, _inside_attn_wrapper=True)
        assert out.item() == 7.0
    assert len(func.calls) == 5
    args, kwargs = func.calls[0]
    assert args[0] is q and args[1] is k and args[2] is v and args[3] == H
    assert kwargs == {"mask": None, "attn_precision": None, "skip_reshape": False, "skip_output_reshape": False,
                      "transformer_options": opts, "_inside_attn_wrapper": True}
    assert reads == ["cuda:0"] * 5  # outside a sampling step: at each call, as documented
    reads.clear()
    with planner.sampling_step():
        for _ in range(5):
            fn(func, q, k, v, H)
    assert reads == ["cuda:0"]  # inside one: once


@pytest.mark.parametrize("name", ["attention_pytorch", "attention_sage", "attention_flash", "attention_xformers",
                                  "attention3_sage"])
def test_a_budget_the_backend_does_not_fit_forces_chunked(name: str, caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """meta tensors: a non-CPU device with shapes only. The fused kernels need ~6 MiB here (their O(N) state
    and the output in float32 and in a copy); a budget of 2 MiB does not fit them, the torch chunked path
    does."""
    monkeypatch.setattr(vramkit._log, "_warned", set())
    q, k, v = comfy_qkv("meta")
    p = prepare(q, k, v, H, None, None)
    assert planner.backend_bytes(p, "fused") > 2 << 20 >= planner.plan(p, 2 << 20)["torch_peak_bytes"]
    func = Backend(name)
    with caplog.at_level(logging.INFO, logger="vramkit"):
        out = make_comfy_override("auto", budget_bytes=2 << 20)(func, q, k, v, H)
    assert func.calls == [] and out.shape == q.shape and out.device.type == "meta"
    line = next(r.getMessage() for r in caplog.records if "because ComfyUI's" in r.getMessage())
    assert f"VRAMKit chunked for calls of (batch, heads, q_len, kv_len, head_dim) ({B}, {H}, {N}, {N}, {D})" in line
    assert f"because ComfyUI's {backend_label(func)} is predicted to need" in line
    assert "over the memory budget of 2.0 MiB" in line
    # A budget it fits: the backend runs.
    out = make_comfy_override("auto", budget_bytes=64 << 20)(func, q, k, v, H)
    assert len(func.calls) == 1 and out.item() == 7.0


def test_forced_chunked_gives_the_right_numbers(claim_cuda: Any) -> None:
    """A CUDA-claiming call whose backend does not fit runs VRAMKit's attention (here on the CPU data)."""
    q, k, v = comfy_qkv(dtype=torch.float32, n=64)
    func = Backend("attention_pytorch")
    fn = make_comfy_override("auto", budget_bytes=1)  # nothing fits 1 byte: the smallest of chunked/sliced
    p = prepare(q, k, v, H, None, None)
    want = torch.nn.functional.scaled_dot_product_attention(p.q, p.k, p.v).transpose(1, 2).reshape(q.shape)
    claim_cuda(q, k, v)
    assert q.device.type == "cuda"
    out = fn(func, q, k, v, H)
    assert func.calls == []
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_backend_kinds_and_labels() -> None:
    q, k, v = comfy_qkv("meta")
    p = prepare(q, k, v, H, None, None)
    fused, full = planner.backend_bytes(p, "fused"), planner.backend_bytes(p, "full")
    assert full >= 2 * B * H * N * N * 4 > fused
    assert planner.backend_fits(p, "fused", 0, explicit=False) == (True, None)  # unknown free memory
    assert planner.backend_fits(p, "self-sizing", 1 << 20, explicit=False) == (True, None)  # sizes itself
    assert planner.backend_fits(p, "self-sizing", 1 << 20, explicit=True) == (False, full)
    assert planner.backend_fits(p, "fused", fused, explicit=True) == (True, fused)
    with pytest.raises(ValueError, match="unknown backend kind 'tiled'; accepted: fused, full, self-sizing"):
        planner.backend_bytes(p, "tiled")
    assert [backend_label(Backend(n)) for n in ("attention_pytorch", "attention3_sage", "attention_split", "x")] \
        == ["pytorch", "sage3", "split", "x"]


def test_attention_basic_may_get_sdpa_and_split_fits_the_free_memory() -> None:
    """ComfyUI's attention_basic holds the whole score matrix: over budget, VRAMKit's own choice (SDPA
    first) runs. sub_quad and split size their chunks to the free memory: kept when the budget is auto."""
    q, k, v = comfy_qkv("meta")
    basic = Backend("attention_basic")
    make_comfy_override("auto", budget_bytes=64 << 20)(basic, q, k, v, H)
    assert basic.calls == []
    split = Backend("attention_split")
    make_comfy_override("auto")(split, q, k, v, H)  # meta: free memory unknown
    assert len(split.calls) == 1


def test_plans_and_decisions_are_cached_per_shape_and_budget(claim_cuda: Any, reads: list[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[Any, ...]] = []
    real_plan = vramkit._core.plan_attention

    def counting_plan(*args: Any, **kwargs: Any) -> Any:
        asked.append(args)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(vramkit._core, "plan_attention", counting_plan)
    monkeypatch.setattr(planner, "_PLANS", {})
    decided: list[str] = []
    real_fits = planner.backend_fits

    def counting_fits(p: Any, kind: str, budget: int, *, explicit: bool) -> Any:
        decided.append(kind)
        return real_fits(p, kind, budget, explicit=explicit)

    monkeypatch.setattr(planner, "backend_fits", counting_fits)
    # CPU: "auto" and "chunked" plan once per shape and budget.
    q, k, v = comfy_qkv(dtype=torch.float32, n=128)
    cpu_auto, cpu_chunked = make_comfy_override("auto"), make_comfy_override("chunked", budget_bytes=1 << 20)
    with planner.sampling_step():
        for _ in range(20):
            cpu_auto(Backend(), q, k, v, H)
            cpu_chunked(Backend(), q, k, v, H)
    assert len(asked) == 2 and reads == ["cpu"]
    # A CUDA problem: one decision per shape and budget, then none.
    qc, kc, vc = claim_cuda(*comfy_qkv(n=128))
    func, fn = Backend(), make_comfy_override("auto")
    with planner.sampling_step():
        for _ in range(20):
            fn(func, qc, kc, vc, H)
    assert decided == ["fused"] and len(func.calls) == 20


def test_sampling_steps_read_each_device_once_and_nest(reads: list[str]) -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert planner.free_bytes(cpu) == 8 << 30 and planner.free_bytes(cpu) == 8 << 30
    assert reads == ["cpu", "cpu"]
    reads.clear()
    with planner.sampling_step():
        for _ in range(3):
            planner.free_bytes(cpu)
            planner.free_bytes(meta)
        with planner.sampling_step():  # a nested step reads afresh
            planner.free_bytes(cpu)
        planner.free_bytes(cpu)
    assert reads == ["cpu", "meta", "cpu"]
    assert planner.budget_for(cpu, 123) == 123 and len(reads) == 3  # an explicit budget reads nothing


def test_cuda_free_memory_that_cannot_be_read_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(device: object = None) -> tuple[int, int]:
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    assert planner.available_bytes(torch.device("cuda", 0)) == 0


_PROBE = """
import json, torch
from vramkit import _core
from vramkit.attention import choose_mode, engines, prepare
q = torch.randn(1, 8, 512, 64)
p = prepare(q, q, q, None, None, None)
pb = prepare(q.bfloat16(), q.bfloat16(), q.bfloat16(), None, None, None)
print(json.dumps({"engines": _core.attention_engines(),
                  "f32": [_core.attention_engine("float32"), engines.rust_engine(torch.float32),
                          choose_mode(p, 1 << 30)],
                  "bf16": [_core.attention_engine("bfloat16"), engines.rust_engine(torch.bfloat16),
                           choose_mode(pb, 1 << 30)],
                  "tight": choose_mode(p, 300 << 10)}))
"""


def _probe(level: str) -> dict[str, Any]:
    env = {**os.environ, "VRAMKIT_SIMD": level}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_cpu_auto_picks_the_rust_kernel_only_where_its_engine_beats_sdpa() -> None:
    portable = _probe("portable")
    assert portable["engines"] == ["portable"]
    assert portable["f32"] == ["portable", "portable", "sdpa"]  # 164 vs 182 GFLOP/s: SDPA first
    assert portable["bf16"] == ["portable", "portable", "sdpa"]
    full = _probe("avx512")
    if "avx512" not in full["engines"]:
        pytest.skip(f"this CPU has no AVX-512 (engines: {full['engines']})")
    assert full["f32"] == ["avx512", "avx512", "chunked"]  # 411 vs 182 GFLOP/s: the Rust kernel first
    want_bf16 = "avx512-bf16" if "avx512-bf16" in full["engines"] else "avx512"
    assert full["bf16"] == [want_bf16, want_bf16, "chunked"]


def test_the_engine_table() -> None:
    assert {"avx512", "avx512-bf16"} == engines.FASTER_THAN_SDPA
    for engine, gflops in engines.ENGINE_GFLOPS.items():
        assert engines.beats_sdpa(engine) == (gflops > max(engines.SDPA_GFLOPS.values()))
    assert engines.rust_engine(torch.float32) == vramkit._core.attention_engine("float32")
    assert engines.rust_first(torch.float32) == (engines.rust_engine(torch.float32) in engines.FASTER_THAN_SDPA)
    assert "GFLOP/s measured" in engines.why(torch.float32)
    with pytest.raises(TypeError, match=r"float32, float16 or bfloat16; got torch\.float64"):
        engines.rust_engine(torch.float64)
    with pytest.raises(ValueError, match="unknown float type \"float64\"; accepted: float32, float16, bfloat16"):
        vramkit._core.attention_engine("float64")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype must be a str"):
        vramkit._core.attention_engine(torch.float32)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_auto_runs_the_handed_backend_and_chunks_over_budget() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, N, H * D, generator=g, device="cuda").half() for _ in range(3))
    ran: list[int] = []

    def attention_pytorch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, **kwargs: Any
                          ) -> torch.Tensor:
        ran.append(1)
        b, n, _ = q.shape
        q4, k4, v4 = (t.view(b, -1, heads, D).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q4, k4, v4).transpose(1, 2).reshape(b, n, -1)

    want = attention_pytorch(q, k, v, H)
    ran.clear()
    with planner.sampling_step():
        out = make_comfy_override("auto")(attention_pytorch, q, k, v, H)
    assert ran == [1] and torch.equal(out, want)
    out = make_comfy_override("auto", budget_bytes=1 << 20)(attention_pytorch, q, k, v, H)
    assert ran == [1]
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
