"""The ComfyUI override (`make_comfy_override`) with a fake backend: layouts, masks, kwargs, delegation and
chaining. No ComfyUI needed."""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
from typing import Any

import pytest
import torch

from vramkit.attention import ComfyOverride, is_vramkit_override, make_backend_override, make_comfy_override
from vramkit.comfy.attention_override import foreign_previous

B, H, NQ, NK, D = 2, 4, 37, 29, 16


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def bhnd(n: int, dtype: torch.dtype = torch.float32, heads: int = H, d: int = D) -> torch.Tensor:
    return torch.randn(B, heads, n, d, generator=gen()).to(dtype)


def flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H * D), ComfyUI's default layout."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1).contiguous()


def ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
        scale: float | None = None) -> torch.Tensor:
    """float64 attention on (B, H, N, D); mask already 4-D."""
    s = q.double() @ k.double().transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, -1) @ v.double()


class FakeBackend:
    """Stands in for ComfyUI's chosen backend: records its calls and returns a marker tensor."""

    __name__ = "attention_fake"

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((args, kwargs))
        return torch.full((1,), 42.0)


@pytest.mark.parametrize("mode", ["chunked", "sdpa", "sliced", "auto"])
@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_both_layout_flags_are_honoured(mode: str, skip_reshape: bool, skip_output_reshape: bool) -> None:
    q, k, v = bhnd(NQ), bhnd(NK), bhnd(NK)
    func = FakeBackend()
    fn = make_comfy_override(mode)
    args = (q, k, v) if skip_reshape else (flat(q), flat(k), flat(v))
    out = fn(func, *args, H, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
             transformer_options={}, _inside_attn_wrapper=True)
    want = ref(q, k, v)
    if not skip_output_reshape:
        want = flat(want)
    assert out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert func.calls == []


@pytest.mark.parametrize("shape", ["qk", "bqk", "b1qk", "bhqk"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_comfyui_mask_shapes(shape: str, kind: str) -> None:
    q, k, v = bhnd(NQ), bhnd(NK), bhnd(NK)
    full = torch.rand(B, H, NQ, NK, generator=gen()) > 0.3
    full[..., 0] = True  # no fully masked rows: the reference softmax would give NaN there
    m4 = {"qk": full[:1, :1], "bqk": full[:, :1], "b1qk": full[:, :1], "bhqk": full}[shape]
    comfy = {"qk": m4[0, 0], "bqk": m4[:, 0], "b1qk": m4, "bhqk": m4}[shape]
    if kind == "float":
        m4 = torch.where(m4, 0.0, -1e4)
        comfy = torch.where(comfy, 0.0, -1e4)
    out = make_comfy_override()(FakeBackend(), flat(q), flat(k), flat(v), H, mask=comfy)
    torch.testing.assert_close(out.double(), flat(ref(q, k, v, m4)), rtol=1e-5, atol=1e-5)


def test_scale_and_attn_precision_are_honoured() -> None:
    q, k, v = bhnd(NQ), bhnd(NK), bhnd(NK)
    out = make_comfy_override("chunked")(FakeBackend(), q, k, v, H, skip_reshape=True, skip_output_reshape=True,
                                         scale=0.3)
    torch.testing.assert_close(out.double(), ref(q, k, v, scale=0.3), rtol=1e-5, atol=1e-5)
    qh, kh, vh = (x.half() for x in (q, k, v))
    for mode in ("sdpa", "chunked", "sliced"):
        out = make_comfy_override(mode)(FakeBackend(), qh, kh, vh, H, attn_precision=torch.float32,
                                        skip_reshape=True, skip_output_reshape=True)
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.double(), ref(qh, kh, vh), rtol=1e-2, atol=1e-2)


def test_unsupported_calls_go_to_func_with_every_argument_and_one_log_line(caplog: pytest.LogCaptureFixture
                                                                            ) -> None:
    q = bhnd(NQ)
    k_gqa, v_gqa = bhnd(NK, heads=2), bhnd(NK, heads=2)
    func = FakeBackend()
    fn = make_comfy_override("chunked")
    opts = {"patches": {}}
    with caplog.at_level(logging.INFO, logger="vramkit"):
        for _ in range(3):
            out = fn(func, q, k_gqa, v_gqa, H, mask=None, attn_precision=torch.float32, skip_reshape=True,
                     skip_output_reshape=False, enable_gqa=True, transformer_options=opts,
                     _inside_attn_wrapper=True)
            assert out.item() == 42.0
    assert len(func.calls) == 3
    args, kwargs = func.calls[0]
    assert args[0] is q and args[1] is k_gqa and args[3] == H
    assert kwargs == {"mask": None, "attn_precision": torch.float32, "skip_reshape": True,
                      "skip_output_reshape": False, "enable_gqa": True, "transformer_options": opts,
                      "_inside_attn_wrapper": True}
    lines = [r for r in caplog.records if "delegating to attention_fake" in r.getMessage()]
    assert len(lines) == 1 and "grouped-query" in lines[0].getMessage()


@pytest.mark.parametrize("case", ["float64", "mask5d", "badmask", "notensor", "intmask"])
def test_other_unsupported_inputs_are_delegated(case: str) -> None:
    q, k, v = flat(bhnd(NQ)), flat(bhnd(NK)), flat(bhnd(NK))
    mask = None
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "mask5d":
        mask = torch.ones(1, 1, 1, NQ, NK, dtype=torch.bool)
    elif case == "badmask":
        mask = torch.ones(3, NQ, NK, dtype=torch.bool)
    elif case == "intmask":
        mask = torch.ones(NQ, NK, dtype=torch.int32)
    else:
        q = q.numpy()  # type: ignore[assignment]
    func = FakeBackend()
    assert make_comfy_override()(func, q, k, v, H, mask=mask).item() == 42.0
    assert len(func.calls) == 1


def test_an_existing_override_is_chained_not_replaced() -> None:
    q, k, v = flat(bhnd(NQ)), flat(bhnd(NK)), flat(bhnd(NK))
    seen: list[str] = []

    def previous(func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(getattr(func, "__name__", "?"))
        return func(*args, **kwargs) * 2  # another pack's override, calling the backend it is given

    comfy_backend = FakeBackend()
    fn = make_comfy_override("chunked", previous=previous)
    out = fn(comfy_backend, q, k, v, H, transformer_options={})
    assert seen == ["vramkit_chunked"]  # `previous` ran and got our attention as its backend
    torch.testing.assert_close(out.double(), 2 * flat(ref(*(x.view(B, -1, H, D).transpose(1, 2) for x in (q, k, v)))),
                               rtol=1e-5, atol=1e-5)
    assert comfy_backend.calls == []
    # What we do not support still reaches ComfyUI's backend through `previous`.
    out = fn(comfy_backend, q.double(), k.double(), v.double(), H)
    assert out.item() == 84.0 and len(comfy_backend.calls) == 1


def test_applying_the_override_twice_replaces_ours_and_keeps_the_foreign_one() -> None:
    def previous(func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return func(*args, **kwargs)

    first = make_comfy_override("sliced", previous=previous)
    second = make_comfy_override("chunked", previous=first)
    assert second.vramkit_previous is previous
    assert second.vramkit_mode == "chunked" and second.vramkit_budget_bytes == 0
    # Either kind replaces the other: a VRAMKit mode after a ComfyUI backend and the reverse.
    backend = make_backend_override(FakeBackend(), previous=second, name="sub_quad")
    assert backend.vramkit_previous is previous and backend.vramkit_mode == "sub_quad"
    assert make_comfy_override("auto", previous=backend).vramkit_previous is previous
    assert make_comfy_override("auto", previous=make_backend_override(FakeBackend())).vramkit_previous is None
    assert foreign_previous(backend) is previous and foreign_previous(previous) is previous
    assert foreign_previous(None) is None


def test_a_comfyui_backend_override_runs_that_backend_and_chains_the_same_way() -> None:
    q, k, v = flat(bhnd(NQ)), flat(bhnd(NK)), flat(bhnd(NK))
    chosen, comfy_default = FakeBackend(), FakeBackend()
    fn = make_backend_override(chosen)
    assert fn.vramkit_mode == "attention_fake" and fn.vramkit_budget_bytes is None
    out = fn(comfy_default, q, k, v, H, mask=None, transformer_options={}, _inside_attn_wrapper=True)
    assert out.item() == 42.0 and comfy_default.calls == [] and len(chosen.calls) == 1
    args, kwargs = chosen.calls[0]
    assert args[0] is q and args[3] == H
    assert kwargs == {"mask": None, "attn_precision": None, "skip_reshape": False, "skip_output_reshape": False,
                      "transformer_options": {}, "_inside_attn_wrapper": True}
    seen: list[Any] = []

    def previous(func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(func)
        return func(*args, **kwargs) + 1

    assert make_backend_override(chosen, previous, "split")(comfy_default, q, k, v, H).item() == 43.0
    assert seen == [chosen] and comfy_default.calls == []


def test_overrides_are_recognized_immutable_and_described() -> None:
    def foreign(func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return func(*args, **kwargs)

    fn = make_comfy_override("sliced", 1 << 20, previous=foreign)
    assert isinstance(fn, ComfyOverride) and is_vramkit_override(fn)
    assert not is_vramkit_override(foreign) and not is_vramkit_override(None)
    assert copy.deepcopy(fn) is fn and copy.deepcopy({"o": fn})["o"] is fn
    assert repr(fn) == ("ComfyOverride(mode='sliced', budget_bytes=1048576, chained to "
                        "test_overrides_are_recognized_immutable_and_described.<locals>.foreign)")
    assert repr(make_backend_override(FakeBackend(), name="sdpa")) == "ComfyOverride(mode='sdpa')"
    # One made by another copy of the module (a custom-node reload) is recognized by its attributes.
    class Twin:
        def __init__(self) -> None:
            self.vramkit_mode, self.vramkit_previous = "auto", foreign

        def __call__(self, *args: Any) -> None:
            return None

    assert is_vramkit_override(Twin()) and foreign_previous(Twin()) is foreign


def test_bad_override_arguments() -> None:
    with pytest.raises(ValueError, match="unknown attention mode"):
        make_comfy_override("fastest")
    with pytest.raises(ValueError, match="budget_bytes"):
        make_comfy_override("chunked", budget_bytes=-5)
    with pytest.raises(TypeError, match="previous must be"):
        make_comfy_override("chunked", previous=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="previous must be"):
        make_backend_override(FakeBackend(), previous="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backend must be a ComfyUI attention function"):
        make_backend_override(None)  # type: ignore[arg-type]


def test_a_budget_reaches_the_planner() -> None:
    q, k, v = flat(bhnd(NQ)), flat(bhnd(NK)), flat(bhnd(NK))
    out = make_comfy_override("auto", budget_bytes=64 << 10)(FakeBackend(), q, k, v, H)
    want = flat(ref(*(x.view(B, -1, H, D).transpose(1, 2) for x in (q, k, v))))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_vramkit_attention_does_not_import_comfyui() -> None:
    # In a fresh interpreter: with COMFYUI_PATH set, the ComfyUI integration tests import ComfyUI into this one.
    code = ("import sys, vramkit.attention\n"
            "print(sorted(n for n in sys.modules if n == 'comfy' or n.startswith('comfy.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
