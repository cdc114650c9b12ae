"""Bad input to the attention API and to the Rust binding gets a clear ValueError/TypeError, never a panic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vramkit import _core
from vramkit.attention import attention, measure_mode
from vramkit.errors import DtypeError


def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64,
                                   torch.complex64, torch.float8_e4m3fn])
def test_unaccepted_dtypes_are_dtype_errors_listing_the_accepted(dtype: torch.dtype) -> None:
    q = torch.zeros(1, 2, 3, 4).to(dtype)
    with pytest.raises(DtypeError, match="accepted dtypes: float32, float16, bfloat16"):
        attention(q, q, q)
    with pytest.raises(TypeError):
        attention(q, q, q, mode="sdpa")
    with pytest.raises(ValueError):
        attention(q, q, q, mode="sliced")


def test_mixed_dtypes_are_dtype_errors() -> None:
    with pytest.raises(DtypeError, match="same dtype"):
        attention(t(1, 2, 3, 4), t(1, 2, 3, 4, dtype=torch.bfloat16), t(1, 2, 3, 4))


@pytest.mark.parametrize(("q", "k", "v", "heads", "match"), [
    ((1, 2, 3, 4), (2, 2, 3, 4), (2, 2, 3, 4), None, "same batch size"),
    ((1, 2, 3, 4), (1, 3, 3, 4), (1, 3, 3, 4), None, "same number of heads"),
    ((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 6, 4), None, "same number of tokens"),
    ((1, 2, 3, 4), (1, 2, 5, 8), (1, 2, 5, 4), None, "same head dim"),
    ((1, 2, 3), (1, 2, 3), (1, 2, 3), None, r"4 dimensions \(batch, heads, tokens, head_dim\)"),
    ((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4), 2, r"3 dimensions \(batch, tokens, heads \* head_dim\)"),
    ((1, 3, 10), (1, 3, 10), (1, 3, 10), 4, "width 10 .* not a multiple of heads=4"),
    ((1, 3, 8), (1, 5, 8), (1, 5, 12), 4, None),  # valid: v has another head dim
    ((1, 3, 8), (1, 5, 12), (1, 5, 8), 4, "same head dim"),
    ((2, 3, 8), (1, 5, 8), (1, 5, 8), 4, "same batch size"),
    ((1, 2, 3, 0), (1, 2, 3, 0), (1, 2, 3, 4), None, "head dim must be positive"),
])
def test_shapes_that_do_not_fit_together_say_what(q: tuple, k: tuple, v: tuple, heads: int | None,
                                                   match: str | None) -> None:
    if match is None:
        assert attention(t(*q), t(*k), t(*v), heads).shape == (1, 3, 12)
        return
    with pytest.raises(ValueError, match=match):
        attention(t(*q), t(*k), t(*v), heads)


@pytest.mark.parametrize("heads", [0, -2, 2.0, True, "4", np.True_, np.float64(2.0), np.int64(-2)])
def test_heads_must_be_a_positive_int(heads: object) -> None:
    x = t(1, 3, 8)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        attention(x, x, x, heads)  # type: ignore[arg-type]


@pytest.mark.parametrize("heads", [np.int64(2), np.int32(2), np.uint8(2), torch.tensor(2)])
@pytest.mark.parametrize("scale", [None, np.float32(0.3), np.float64(0.3), np.float16(0.3), np.int64(1), 0.3])
def test_numpy_scalars_are_accepted_for_heads_and_scale(heads: object, scale: object) -> None:
    x = t(1, 3, 8)
    want = attention(x, x, x, 2, scale=None if scale is None else float(scale))  # type: ignore[arg-type]
    assert torch.equal(attention(x, x, x, heads, scale=scale), want)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", [True, np.True_, "0.5", torch.tensor(0.5), 1j])
def test_scale_must_be_a_real_number(scale: object) -> None:
    q = t(1, 2, 5, 8)
    with pytest.raises(TypeError, match=r"scale must be a float or None \(any real number"):
        attention(q, q, q, scale=scale)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"heads": -2}, "heads"), ({"heads": 0}, "heads"), ({"heads": 2**64}, "heads"),
    ({"block_q": -1}, "block_q"), ({"block_q": 0}, "block_q"), ({"block_kv": -64}, "block_kv"),
    ({"heads_per_group": -3}, "heads_per_group"), ({"heads_per_group": 2**70}, "heads_per_group"),
])
def test_the_binding_refuses_out_of_range_ints_with_value_errors(kwargs: dict, name: str) -> None:
    q = np_(t(1, 2, 5, 8))
    x = q.reshape(1, 5, 16) if "heads" in kwargs else q
    with pytest.raises(ValueError, match=rf"{name} must be a positive int \(1 to 18446744073709551615\); got -?\d+"):
        _core.attention(x, x, x, **kwargs)


@pytest.mark.parametrize("pos", range(7))
@pytest.mark.parametrize("value", [-1, 2**64])
def test_the_planner_refuses_out_of_range_ints_with_value_errors(pos: int, value: int) -> None:
    names = ["batch", "heads", "q_len", "kv_len", "head_dim", "dtype_bytes", "budget_bytes"]
    args = [1, 8, 64, 64, 64, 2, 0]
    args[pos] = value
    with pytest.raises(ValueError, match=rf"{names[pos]} must be a non-negative int \(0 to \d+\); got {value}"):
        _core.plan_attention(*args)
    for kw in ("v_head_dim", "threads", "torch_threads"):
        with pytest.raises(ValueError, match=f"{kw} must be a non-negative int"):
            _core.plan_attention(1, 8, 64, 64, 64, 2, 0, **{kw: value})


def test_the_bindings_refuse_bools_and_non_ints_as_sizes() -> None:
    q = np_(t(1, 5, 16))
    with pytest.raises(TypeError, match=r"heads must be a positive int .*got a bool"):
        _core.attention(q, q, q, True)
    with pytest.raises(TypeError, match=r"block_q must be a positive int .*got an object of type float"):
        _core.attention(q, q, q, 2, block_q=16.0)
    with pytest.raises(TypeError, match="batch must be a non-negative int"):
        _core.plan_attention("1", 8, 64, 64, 64, 2, 0)
    pl = _core.plan_attention(np.int64(1), np.int32(8), 64, 64, 64, np.uint8(2), np.int64(1 << 20))
    assert pl == _core.plan_attention(1, 8, 64, 64, 64, 2, 1 << 20)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 5, 3), (1, 1, 1, 5, 6), (4, 6), (3, 1, 6)])
def test_masks_that_do_not_broadcast_are_value_errors(shape: tuple[int, ...]) -> None:
    q, kv = t(1, 2, 5, 8), t(1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"does not broadcast to \(batch, heads, q_len, kv_len\) = \(1, 2, 5, 6\)"):
        attention(q, kv, kv, mask=torch.ones(shape, dtype=torch.bool))


def test_mask_type_dtype_and_device_are_checked() -> None:
    q = t(1, 2, 5, 8)
    with pytest.raises(DtypeError, match=r"bool .* or a float dtype"):
        attention(q, q, q, mask=torch.ones(5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"mask must be a torch\.Tensor"):
        attention(q, q, q, mask=np.ones((5, 5), bool))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask is on meta"):
        attention(q, q, q, mask=torch.ones(5, 5, device="meta"))


def test_other_arguments_are_checked() -> None:
    q = t(1, 2, 5, 8)
    with pytest.raises(ValueError, match="unknown attention mode 'fast'; accepted: auto, sdpa, chunked"):
        attention(q, q, q, mode="fast")
    with pytest.raises(ValueError, match="unknown attention mode"):
        measure_mode(q, q, q, "fast")
    with pytest.raises(ValueError, match="budget_bytes"):
        attention(q, q, q, budget_bytes=-1)
    with pytest.raises(TypeError, match="scale must be a float"):
        attention(q, q, q, scale="0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        attention(q.numpy(), q, q)  # type: ignore[arg-type]


def np_(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy()


def test_the_binding_rejects_bad_arrays_with_python_errors() -> None:
    q = np_(t(1, 2, 5, 8))
    with pytest.raises(TypeError, match="same dtype"):
        _core.attention(q, q.astype(np.float16), q)
    with pytest.raises(TypeError, match="float32, float16, or uint16"):
        _core.attention(q.astype(np.int32), q, q)
    for name, args in (("q", (np.asfortranarray(q), q, q)), ("k", (q, q[:, :, ::-1], q)), ("v", (q, q, q[..., ::2]))):
        with pytest.raises(ValueError, match=f"{name} must be C-contiguous"):
            _core.attention(*args)
    for mask in (np.asfortranarray(np.ones((1, 2, 5, 5), bool)), np.ones((1, 2, 5, 10), np.float32)[..., ::2]):
        with pytest.raises(ValueError, match="mask must be C-contiguous"):
            _core.attention(q, q, q, None, mask)
    with pytest.raises(ValueError, match="4 dimensions"):
        _core.attention(q[0], q, q)
    with pytest.raises(ValueError, match="3 dimensions"):
        _core.attention(q, q, q, 2)
    with pytest.raises(ValueError, match="not a multiple of heads=3"):
        _core.attention(q[0], q[0], q[0], 3)
    with pytest.raises(ValueError, match="unknown attention engine"):
        _core.attention(q, q, q, engine="gpu")
    with pytest.raises(ValueError, match="positive multiple of 64"):
        _core.attention(q, q, q, block_kv=100)
    with pytest.raises(ValueError, match="positive"):
        _core.attention(q, q, q, block_q=0)
    with pytest.raises(ValueError, match="4 dimensions"):
        _core.attention(q, q, q, None, np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="broadcast"):
        _core.attention(q, q, q, None, np.ones((1, 3, 5, 5), bool))
    with pytest.raises(TypeError, match="mask must be"):
        _core.attention(q, q, q, None, np.ones((1, 1, 5, 5), np.int64))
    if "avx512-bf16" in _core.attention_engines():
        with pytest.raises(TypeError, match="bfloat16 inputs only"):
            _core.attention(q, q, q, engine="avx512-bf16")


def test_an_unsupported_engine_is_a_value_error_naming_the_supported_ones() -> None:
    missing = {"avx512", "avx512-bf16"} - set(_core.attention_engines())
    q = np_(t(1, 2, 5, 8, dtype=torch.bfloat16))
    for engine in missing:
        with pytest.raises(ValueError, match="supported here: portable"):
            _core.attention(q, q, q, engine=engine)
