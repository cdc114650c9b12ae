"""Bit-exactness of vramkit.quant against torch's casts, the documented formulas, and float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vramkit import quant
from vramkit.quant import cast_rule

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of `t` as a signed integer tensor, so NaN payloads compare too."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def all_16bit(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def random_f32_bits(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)


F32_EDGES = torch.tensor(
    [0.0, -0.0, 1.0, -1.0, 448.0, 464.0, 464.0001, 465.0, 480.0, -480.0, 57344.0, 61439.0, 61440.0, 65536.0,
     2.0**-6, 2.0**-9, 2.0**-10, 2.0**-10 * 1.0000001, 2.0**-14, 2.0**-16, 2.0**-17, 1e-45, -1e-45,
     float("inf"), float("-inf"), float("nan"), -float("nan"), 3.4e38, -3.4e38],
    dtype=torch.float32,
)


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_cast_equals_torch_on_every_16bit_value(fmt: str, dtype: torch.dtype) -> None:
    """Both paths (Rust, and the torch twin forced onto CPU tensors) equal the installed torch's own cast."""
    x = all_16bit(dtype)
    q = quant.quantize(x, fmt, "none")
    assert q.data.dtype == torch.uint8 and q.scale is None
    expected = x.to(FP8[fmt]).view(torch.uint8)
    assert torch.equal(q.data, expected)
    assert torch.equal(quant._quantize_torch(x, fmt, "none", None).data, expected)


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_cast_equals_torch_on_random_f32_bit_patterns_and_edges(fmt: str) -> None:
    x = torch.cat([random_f32_bits(1 << 20), F32_EDGES])
    q = quant.quantize(x, fmt, "none")
    expected = x.to(FP8[fmt]).view(torch.uint8)
    assert torch.equal(q.data, expected)
    assert torch.equal(quant._quantize_torch(x, fmt, "none", None).data, expected)


def test_the_probed_rule_is_the_installed_torchs() -> None:
    """`CAST_RULES` describes what this torch's CPU cast does at the edges (the exhaustive tests above check
    everything else)."""
    for fmt, rule in quant.CAST_RULES.items():
        over, inf = rule.codes(fmt)
        x = torch.tensor([1e6, -1e6, float("inf"), float("-inf"), float("nan")])
        got = x.to(FP8[fmt]).view(torch.uint8).tolist()
        assert got[:4] == [over, over | 0x80, inf, inf | 0x80], (fmt, rule, got)
        assert got[4] & 0x7F == 0x7F
        assert cast_rule.probe(fmt) == rule


def _every_rule(fmt: str) -> list[cast_rule.CastRule]:
    names = cast_rule.OUTCOME_CODES[fmt]
    return [cast_rule.CastRule(o, i) for o in names for i in names]  # type: ignore[arg-type]


def _reference_cast(x: torch.Tensor, fmt: str, rule: cast_rule.CastRule) -> torch.Tensor:
    """The installed torch's cast, with its codes for finite overflow and ±inf replaced as `rule` says:
    independent of how vramkit applies the rule (its rounding of everything else is torch's)."""
    codes = x.to(FP8[fmt]).view(torch.uint8).clone()
    over, inf = rule.codes(fmt)
    xf = x.float()
    a = xf.abs()
    sign = (xf.view(torch.int32) < 0).to(torch.uint8) * 0x80
    finite_over = torch.isfinite(xf) & ((a > 464) if fmt == "fp8_e4m3fn" else (a >= 61440))
    codes[finite_over] = sign[finite_over] | over
    infinite = torch.isinf(xf)
    codes[infinite] = sign[infinite] | inf
    return codes


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("source", ["float16", "bfloat16", "float32"])
def test_every_overflow_rule_rust_and_torch_twin_agree(fmt: str, source: str) -> None:
    """Injecting each rule (not only the installed one): the Rust kernel and the torch twin give the same bits,
    and both are torch's cast with exactly the overflow and ±inf codes replaced."""
    x = torch.cat([random_f32_bits(1 << 18, seed=7), F32_EDGES]) if source == "float32" else \
        all_16bit(getattr(torch, source))
    for rule in _every_rule(fmt):
        rust = quant.api._quantize_rust(x, fmt, "none", None, rule=rule).data
        twin = quant._quantize_torch(x, fmt, "none", None, rule=rule).data
        assert torch.equal(rust, twin), rule
        assert torch.equal(rust, _reference_cast(x, fmt, rule)), rule


def test_rules_a_format_cannot_write_are_refused() -> None:
    bad = cast_rule.CastRule("inf", "nan")
    x = torch.ones(4)
    with pytest.raises(ValueError, match="cannot write 'inf'"):
        quant._quantize_torch(x, "fp8_e4m3fn", "none", None, rule=bad)
    with pytest.raises(ValueError, match="no infinity"):
        quant.api._quantize_rust(x, "fp8_e4m3fn", "none", None, rule=bad)


def test_a_cast_no_rule_describes_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    # A "cast" whose codes fit no rule: e4m3fn probed through the e5m2 dtype.
    monkeypatch.setitem(cast_rule.TORCH_FP8, "fp8_e4m3fn", torch.float8_e5m2)
    with pytest.raises(cast_rule.UnknownCastRule, match="fp8_e4m3fn"):
        cast_rule.probe("fp8_e4m3fn")
    rules = cast_rule._probe_cpu()  # import-time probing falls back instead of failing the import
    assert rules["fp8_e4m3fn"] == cast_rule.CastRule.unsaturated("fp8_e4m3fn")


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fp8_dequantize_every_code_equals_torch(fmt: str, dtype: torch.dtype) -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(3)
    q = quant.QTensor(codes, None, fmt, "none", None, codes.shape, torch.float32)
    expected = codes.view(FP8[fmt]).float().to(dtype)
    assert torch.equal(bits(q.dequantize(dtype)), bits(expected))


def torch_formula(t: torch.Tensor, fmt: str, block_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula the issue documents, written independently of vramkit.quant."""
    blocks = t.float().reshape(-1, block_len)
    fmt_max = quant.FORMAT_MAX[fmt]
    scale = blocks.abs().amax(dim=1) / fmt_max
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = blocks / scale[:, None]
    if fmt == "int8":
        data = torch.round(y).clamp(-127, 127).to(torch.int8)
    else:
        data = y.clamp(-fmt_max, fmt_max).to(FP8[fmt]).view(torch.uint8)
    return data.reshape(t.shape), scale


def heavy_tailed(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    return t.to(dtype)


GRANULARITY_CASES = [("tensor", None), ("channel", None), ("group", 32), ("group", 64), ("group", 128)]


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITY_CASES)
def test_scaled_quantize_equals_documented_formula(fmt: str, dtype: torch.dtype, granularity: str,
                                                   group_size: int | None) -> None:
    t = heavy_tailed((48, 256), dtype)
    t[3] = 0  # an all-zero row: scale 1, data 0
    q = quant.quantize(t, fmt, granularity, group_size)
    data, scale = torch_formula(t, fmt, q.block_len)
    assert torch.equal(bits(q.data), bits(data))
    assert torch.equal(bits(q.scale.reshape(-1)), bits(scale))
    expected_scale_shape = {"tensor": (), "channel": (48,), "group": (48, 256 // (group_size or 1))}
    assert tuple(q.scale.shape) == expected_scale_shape[granularity]
    assert q.data.dtype == (torch.int8 if fmt == "int8" else torch.uint8)
    if granularity != "tensor":
        zero_blocks = q.scale.reshape(48, -1)[3]
        assert torch.all(zero_blocks == 1) and torch.all(q.data[3].view(torch.uint8) == 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_matches_a_float64_reference(dtype: torch.dtype) -> None:
    t = heavy_tailed((64, 512), dtype, seed=3)
    q = quant.quantize(t, "int8", "group", 64)
    x = t.double().reshape(-1, 64)
    amax = x.abs().amax(dim=1)
    scale64 = (amax.float() / 127).double()  # the scale is defined in float32
    exact = x / scale64[:, None]
    ref = torch.round(exact).clamp(-127, 127)
    got = q.data.reshape(-1, 64).double()
    differ = got != ref
    # float32 division may round a quotient onto (or off) a .5 tie; nothing else may differ, and only by 1.
    near_tie = (exact.abs() - exact.abs().floor() - 0.5).abs() < 1e-5
    assert torch.all(~differ | near_tie)
    assert torch.all((got - ref).abs() <= 1)
    np.testing.assert_array_equal(q.scale.reshape(-1).numpy(), (amax / 127).float().numpy())


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITY_CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dequantize_equals_documented_formula(fmt: str, granularity: str, group_size: int | None,
                                              out_dtype: torch.dtype) -> None:
    t = heavy_tailed((32, 384), torch.bfloat16, seed=1)
    q = quant.quantize(t, fmt, granularity, group_size)
    values = q.data.float() if fmt == "int8" else q.data.view(FP8[fmt]).float()
    expected = (values.reshape(-1, q.block_len) * q.scale.reshape(-1, 1)).reshape(t.shape).to(out_dtype)
    got = q.dequantize(out_dtype)
    assert got.dtype == out_dtype and got.shape == t.shape
    assert torch.equal(bits(got), bits(expected))
    assert q.dequantize().dtype == torch.bfloat16  # default: the original dtype


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("granularity", "group_size"), [("none", None), *GRANULARITY_CASES])
def test_rust_and_torch_paths_agree_bit_for_bit(fmt: str, dtype: torch.dtype, granularity: str,
                                                group_size: int | None) -> None:
    if granularity == "none" and fmt == "int8":
        pytest.skip("int8 has no unscaled cast")
    t = heavy_tailed((24, 640), dtype, seed=2)
    if granularity == "none":  # the cast path must agree on specials and overflow too
        t.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e5, -500.0]).to(dtype)
    rust = quant.quantize(t, fmt, granularity, group_size)
    torch_path = quant._quantize_torch(t.contiguous(), fmt, granularity, group_size)
    assert torch.equal(bits(rust.data), bits(torch_path.data))
    if granularity != "none":
        assert torch.equal(bits(rust.scale), bits(torch_path.scale))
    for out in FLOAT_DTYPES:
        assert torch.equal(bits(rust.dequantize(out)), bits(quant._dequantize_torch(rust, out)))


def test_large_tensors_take_the_huge_page_and_split_paths() -> None:
    # 2^22 elements: outputs over the huge-page threshold and per-tensor blocks split across threads.
    t = heavy_tailed((1024, 4096), torch.float32, seed=4)
    for fmt, gran in [("int8", "tensor"), ("fp8_e4m3fn", "channel"), ("fp8_e5m2", "none")]:
        q = quant.quantize(t, fmt, gran)
        ref = quant._quantize_torch(t, fmt, gran, None)
        assert torch.equal(bits(q.data), bits(ref.data))
        assert torch.equal(bits(q.dequantize(torch.bfloat16)), bits(quant._dequantize_torch(q, torch.bfloat16)))


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITY_CASES)
def test_error_stats_match_numpy(fmt: str, granularity: str, group_size: int | None) -> None:
    t = heavy_tailed((16, 512), torch.float16, seed=5)
    q = quant.quantize(t, fmt, granularity, group_size)
    stats = quant.error_stats(t, q)
    x = t.numpy().astype(np.float64)
    err = q.dequantize(torch.float32).numpy().astype(np.float64) - x
    assert stats["max_abs"] == pytest.approx(np.abs(err).max(), rel=1e-12)
    assert stats["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-9)
    assert stats["snr_db"] == pytest.approx(10 * np.log10(np.sum(x**2) / np.sum(err**2)), rel=1e-9)
    torch_stats = quant._error_stats_torch(t, q)
    for key in stats:
        assert torch_stats[key] == pytest.approx(stats[key], rel=1e-9)


def test_error_stats_of_an_exact_quantization_is_infinite_snr() -> None:
    t = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    q = quant.quantize(t, "fp8_e4m3fn", "none")
    assert quant.error_stats(t, q) == {"max_abs": 0.0, "rmse": 0.0, "snr_db": float("inf")}


def test_quality_ranks_as_expected_on_heavy_tailed_weights() -> None:
    t = heavy_tailed((128, 1024), torch.bfloat16, seed=6)
    snr = {
        (fmt, gran): quant.error_stats(t, quant.quantize(t, fmt, gran, 64 if gran == "group" else None))["snr_db"]
        for fmt in ("int8", "fp8_e4m3fn")
        for gran in ("tensor", "channel", "group")
    }
    assert snr[("int8", "group")] > snr[("int8", "channel")] > snr[("int8", "tensor")]
    assert snr[("int8", "group")] > snr[("fp8_e4m3fn", "group")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", FP8)
def test_cuda_plain_cast_follows_the_cpu_rule_bit_for_bit(fmt: str) -> None:
    """On CUDA the torch twin gives the Rust path's bits (the installed CPU cast's rule, and every injected
    rule), whatever rule torch's own CUDA cast follows."""
    for x in (all_16bit(torch.float16), all_16bit(torch.bfloat16), torch.cat([random_f32_bits(1 << 20), F32_EDGES])):
        assert torch.equal(quant.quantize(x.cuda(), fmt, "none").data.cpu(), quant.quantize(x, fmt, "none").data)
        for rule in _every_rule(fmt):
            rust = quant.api._quantize_rust(x, fmt, "none", None, rule=rule).data
            assert torch.equal(quant._quantize_torch(x.cuda(), fmt, "none", None, rule=rule).data.cpu(), rust), rule


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITY_CASES)
def test_cuda_scaled_quantize_equals_the_rust_path(fmt: str, granularity: str, group_size: int | None) -> None:
    t = heavy_tailed((96, 512), torch.bfloat16, seed=8)
    rust = quant.quantize(t, fmt, granularity, group_size)
    cuda = quant.quantize(t.cuda(), fmt, granularity, group_size)
    assert torch.equal(bits(rust.data), bits(cuda.data.cpu()))
    assert torch.equal(bits(rust.scale), bits(cuda.scale.cpu()))
    for out in FLOAT_DTYPES:
        assert torch.equal(bits(rust.dequantize(out)), bits(cuda.dequantize(out).cpu()))
