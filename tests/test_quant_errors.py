"""Bad input gets a clear Python exception; odd but valid input gets the right answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vramkit import _core, quant
from vramkit.errors import DtypeError


def weights(shape: tuple[int, ...] = (8, 64), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool,
                                   torch.float8_e4m3fn, torch.complex64])
def test_wrong_dtype_is_a_type_error_that_lists_accepted_dtypes(dtype: torch.dtype) -> None:
    t = torch.zeros(4, 8).to(dtype)
    with pytest.raises(TypeError, match=r"accepted dtypes: float32, float16, bfloat16"):
        quant.quantize(t, "int8", "channel")
    with pytest.raises(ValueError):  # DtypeError is both, for callers that catch either
        quant.quantize(t, "int8", "channel")


def test_not_a_tensor_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        quant.quantize(np.zeros((4, 4), np.float32), "int8", "tensor")  # type: ignore[arg-type]


@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("shape", [(64,), ()])
def test_channel_and_group_need_two_dimensions(granularity: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        quant.quantize(torch.ones(shape), "int8", granularity)


@pytest.mark.parametrize("shape", [(0,), (0, 16), (16, 0)])
@pytest.mark.parametrize("granularity", ["none", "tensor", "channel"])
def test_empty_tensor_is_a_value_error(shape: tuple[int, ...], granularity: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        quant.quantize(torch.ones(shape), "fp8_e4m3fn", granularity)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_values_where_a_scale_is_computed_say_where(fmt: str, granularity: str, bad: float,
                                                                dtype: torch.dtype) -> None:
    t = weights((8, 64), dtype)
    t[5, 17] = bad
    with pytest.raises(ValueError, match=r"flat index 337\b"):
        quant.quantize(t, fmt, granularity)
    with pytest.raises(ValueError, match=r"flat index 337\b"):
        quant._quantize_torch(t, fmt, granularity, 64 if granularity == "group" else None)


def test_non_finite_values_cast_like_torch_with_granularity_none() -> None:
    t = torch.tensor([float("nan"), float("inf"), -1e6, 1.0])
    q = quant.quantize(t, "fp8_e4m3fn", "none")
    assert torch.equal(q.data, t.to(torch.float8_e4m3fn).view(torch.uint8))


def test_unknown_format_and_granularity() -> None:
    with pytest.raises(ValueError, match=r"unknown format 'int4'.*fp8_e4m3fn, fp8_e5m2, int8"):
        quant.quantize(weights(), "int4")
    with pytest.raises(ValueError, match="unknown granularity 'row'"):
        quant.quantize(weights(), "int8", "row")
    with pytest.raises(ValueError, match=r'"none".*only for fp8'):
        quant.quantize(weights(), "int8", "none")


@pytest.mark.parametrize("group_size", [0, -64])
def test_group_size_must_be_positive(group_size: int) -> None:
    with pytest.raises(ValueError, match="group_size must be positive"):
        quant.quantize(weights(), "int8", "group", group_size)


def test_group_size_must_divide_the_row() -> None:
    with pytest.raises(ValueError, match="group_size 48 does not divide the row length 64"):
        quant.quantize(weights(), "int8", "group", 48)
    with pytest.raises(TypeError, match="group_size must be an int"):
        quant.quantize(weights(), "int8", "group", 32.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_dequantize_to_a_non_float_dtype_is_refused(dtype: torch.dtype) -> None:
    q = quant.quantize(weights(), "int8", "channel")
    with pytest.raises(DtypeError, match="cannot dequantize to"):
        q.dequantize(dtype)


def test_error_stats_shape_mismatch() -> None:
    q = quant.quantize(weights(), "int8", "channel")
    with pytest.raises(ValueError, match="does not match"):
        quant.error_stats(weights((8, 32)), q)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_non_contiguous_and_transposed_inputs_give_correct_results(fmt: str, granularity: str) -> None:
    base = weights((128, 64))
    for view in (base.t(), base[:, ::2], base[::2].t()):
        assert not view.is_contiguous()
        group = 16 if granularity == "group" else None
        q = quant.quantize(view, fmt, granularity, group)
        ref = quant.quantize(view.contiguous(), fmt, granularity, group)
        assert q.shape == view.shape
        assert torch.equal(q.data, ref.data) and torch.equal(q.scale, ref.scale)
        stats = quant.error_stats(view, q)
        assert stats == quant.error_stats(view.contiguous(), ref)


def test_conv_weights_group_along_flattened_input_dims() -> None:
    w = weights((16, 8, 3, 3))  # 72 inputs per output channel
    q = quant.quantize(w, "int8", "group", 24)
    assert tuple(q.scale.shape) == (16, 3) and q.data.shape == w.shape
    flat = quant.quantize(w.reshape(16, 72), "int8", "group", 24)
    assert torch.equal(q.data.reshape(16, 72), flat.data) and torch.equal(q.scale, flat.scale)
    assert q.dequantize().shape == w.shape


def test_default_granularity() -> None:
    assert quant.quantize(weights(), "fp8_e4m3fn").granularity == "none"
    q = quant.quantize(weights(), "int8")
    assert (q.granularity, q.group_size) == ("group", 64)
    assert quant.quantize(weights((8, 48)), "int8").granularity == "channel"  # 64 does not divide 48
    assert quant.quantize(torch.ones(10), "int8").granularity == "tensor"


def test_zero_dim_and_requires_grad_tensors() -> None:
    q = quant.quantize(torch.tensor(3.0), "int8", "tensor")
    assert q.data.shape == () and q.dequantize().item() == pytest.approx(3.0)
    w = weights().requires_grad_()
    assert quant.quantize(w, "fp8_e5m2", "channel").data.shape == w.shape


def test_inference_mode_tensors() -> None:
    with torch.inference_mode():
        w = weights((32, 64), torch.bfloat16)
        q = quant.quantize(w, "int8", "group", 32)
        assert q.dequantize().dtype == torch.bfloat16


def test_qtensor_reports_its_storage() -> None:
    q = quant.quantize(weights((8, 64)), "int8", "group", 32)
    assert q.nbytes == 8 * 64 + 8 * 2 * 4
    assert "group_size=32" in repr(q) and q.device.type == "cpu"


# --- the Rust module's own checks (callers that use vramkit._core directly) --------------------------------

def test_core_refuses_non_contiguous_and_fortran_ordered_arrays() -> None:
    for a in (np.zeros((8, 8), np.float32)[:, ::2], np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))):
        with pytest.raises(ValueError, match="C-contiguous"):
            _core.fp8_cast(a, "fp8_e4m3fn")
        with pytest.raises(ValueError, match="C-contiguous"):
            _core.quantize(a, "int8", 4)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.fp8_cast(np.ones((3, 4), np.float32), "fp8_e4m3fn", out=np.zeros((3, 4), np.uint8, order="F"))


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int8])
def test_core_refuses_other_dtypes(dtype: type) -> None:
    with pytest.raises(TypeError, match="float32, float16, or uint16"):
        _core.quantize(np.zeros(16, dtype), "int8", 16)


def test_core_checks_sizes_and_names() -> None:
    x = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="do not split into blocks of 48"):
        _core.quantize(x, "int8", 48)
    with pytest.raises(ValueError, match="block length must be positive"):
        _core.quantize(x, "int8", 0)
    with pytest.raises(ValueError, match="unknown format"):
        _core.fp8_cast(x, "fp4")
    with pytest.raises(ValueError, match="only for the fp8 formats"):
        _core.fp8_cast(x, "int8")
    with pytest.raises(ValueError, match=r"overflow must be one of nan, inf, saturate; got .clamp."):
        _core.fp8_cast(x, "fp8_e4m3fn", overflow="clamp")
    with pytest.raises(ValueError, match="fp8_e4m3fn has no infinity"):
        _core.fp8_cast(x, "fp8_e4m3fn", inf="inf")
    codes, scales = _core.quantize(x, "int8", 32)
    with pytest.raises(ValueError, match="scales has 2 elements, expected 4"):
        _core.dequantize(codes, "int8", scales, 16, "float32")
    with pytest.raises(ValueError, match="need their scales"):
        _core.dequantize(codes, "int8", None, 64, "float32")
    with pytest.raises(ValueError, match=r"out_dtype .float64. is not supported"):
        _core.dequantize(codes, "int8", scales, 32, "float64")
    with pytest.raises(ValueError, match="shape"):
        _core.fp8_cast(x, "fp8_e4m3fn", out=np.zeros(63, np.uint8))
    with pytest.raises(ValueError, match="empty"):
        _core.quantize(np.zeros(0, np.float32), "int8", 1)


def test_core_refuses_negative_sizes_with_a_value_error() -> None:
    x = np.ones(8, np.float32)
    with pytest.raises(ValueError, match=r"block_len must be a non-negative int .*; got -1"):
        _core.quantize(x, "int8", -1)
    codes, scales = _core.quantize(x, "int8", 8)
    with pytest.raises(ValueError, match="block_len must be a non-negative int"):
        _core.dequantize(codes, "int8", scales, -8, "float32")
    with pytest.raises(ValueError, match="block_len must be a non-negative int"):
        _core.error_stats(x, codes, "int8", scales, -8)


def test_an_output_that_cannot_be_allocated_is_a_memory_error() -> None:
    # 65536 queries with values of head dim 2^24: a 4 TiB output, refused by the allocator, not a panic.
    q = np.zeros((1, 1, 65536, 1), np.float32)
    k = np.zeros((1, 1, 1, 1), np.float32)
    v = np.zeros((1, 1, 1, 2**24), np.float32)
    with pytest.raises(MemoryError, match="could not be allocated"):
        _core.attention(q, k, v)


def test_meta_tensors_and_numpy_group_sizes() -> None:
    with pytest.raises(ValueError, match="meta device"):
        quant.quantize(torch.empty(4, 64, device="meta"), "int8", "channel")
    q = quant.quantize(weights(), "int8", "group", np.int64(32))
    assert q.group_size == 32 and isinstance(q.group_size, int)


def test_core_writes_into_given_outputs() -> None:
    x = np.linspace(-3, 3, 128, dtype=np.float32)
    out = np.zeros(128, np.int8)
    scales = np.zeros(4, np.float32)
    codes, got_scales = _core.quantize(x, "int8", 32, out=out, scales_out=scales)
    assert codes is out and got_scales is scales
    assert np.abs(out).max() == 127 and np.all(scales > 0)
