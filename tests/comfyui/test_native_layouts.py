"""VRAMKitQuantize emits ComfyUI's own layouts where ComfyUI has them (0.29+: float8_* and int8_tensorwise in
ComfyUI's mixed-precision Linear; 0.3.7x: its fp8 layout), and ComfyUI treats them as native: the outputs
match VRAMKit's own layout, LoRA still works, ModelSave writes comfy_quant markers a stock ComfyUI loads, and
the bounded dequantize holds in every ComfyUI path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import apply_lora, lora_state_dict, rel, sample

from vramkit import quant
from vramkit.comfy import budget as streaming
from vramkit.comfy import compat, layouts, quantize_model, quantized_ops
from vramkit.comfy.nodes import VRAMKitQuantize
from vramkit.quant import api

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: alloc_tracer
from alloc_tracer import AllocationTracer

MiB = 1 << 20
NATIVE_LAYOUT = {("int8", "channel"): ("TensorWiseINT8Layout", "int8_tensorwise"),
                 ("int8", "tensor"): ("TensorWiseINT8Layout", "int8_tensorwise"),
                 ("fp8_e4m3fn", "tensor"): ("TensorCoreFP8E4M3Layout", "float8_e4m3fn"),
                 ("fp8_e5m2", "tensor"): ("TensorCoreFP8E5M2Layout", "float8_e5m2")}
#: W8A8 against the unquantized run, measured on the tiny models (sd15 / flux): per-row 0.6% / 1.0%,
#: per-tensor 0.8% / 1.6%, per-row + ConvRot about per-row's.
W8A8_TOLERANCE = 0.05


def has_native() -> bool:
    return compat.native_layout_problem() is None


def quantize(model, fmt, granularity, **kwargs):
    return quantize_model.quantize_model(model, fmt, granularity, 64, **kwargs)


def stand_ins(model):
    return {name.removeprefix("diffusion_model."): m for name, m in model.object_patches.items()
            if isinstance(m, torch.nn.Module)}


def test_this_comfyui_offers_what_it_should(comfy_version):
    """0.29+ ships comfy-kitchen with the layouts VRAMKit maps to; 0.3.7x has only its fp8 layout."""
    if tuple(int(p) for p in comfy_version.split(".")[:2]) >= (0, 29):
        assert compat.native_layout_problem() is None
    else:
        assert "no comfy-kitchen" in str(compat.native_layout_problem())


@pytest.mark.parametrize("scheme", [*NATIVE_LAYOUT, ("int8", "group"), ("fp8_e4m3fn", "channel")],
                         ids=lambda s: "-".join(s))
def test_native_layouts_are_emitted_where_comfyui_has_them(tiny, scheme):
    fmt, granularity = scheme
    out, report = quantize(tiny, fmt, granularity)
    patched = stand_ins(out)
    assert set(patched) == set(report.quantized)
    native = has_native() and scheme in NATIVE_LAYOUT
    for name, module in patched.items():
        weight = module.weight
        assert compat.is_comfy_quantized(weight)
        linear = isinstance(tiny.get_model_object(f"diffusion_model.{name}"), torch.nn.Linear)
        if native and linear:
            layout, fmt_name = NATIVE_LAYOUT[scheme]
            assert compat.is_mixed_precision_linear(module) and quantized_ops.is_quantized_op(module)
            assert layouts.layout_name(weight) == layout
            assert module.quant_format == fmt_name and module.layout_type == layout
            assert module._full_precision_mm_config is True  # compute "dequantize" = weight-only
            qdata, params = compat.quantized_parts(weight)
            assert qdata.dtype == compat.quant_ops().QUANT_ALGOS[fmt_name]["storage_t"]
            expected = (weight.shape[0], 1) if granularity == "channel" else ()
            assert tuple(params["scale"].shape) == expected and params["scale"].dtype == torch.float32
            assert name in report.native
        elif fmt != "int8" and granularity == "tensor":
            assert layouts.layout_name(weight) in ("TensorCoreFP8Layout", "TensorCoreFP8E4M3Layout",
                                                   "TensorCoreFP8E5M2Layout")
        else:
            assert layouts.layout_name(weight) == layouts.LAYOUT_NAME
            assert name not in report.native
    assert bool(report.native) == native
    if native:
        assert "ComfyUI's own layouts" in report.summary()
    assert not tiny.object_patches


@pytest.mark.parametrize("scheme", list(NATIVE_LAYOUT), ids=lambda s: "-".join(s))
def test_native_weight_only_output_equals_our_layouts(tiny, kind, scheme):
    """Same codes, same formula (``float32(code) * scale``, one rounding): the native layers' weight-only
    forward gives VRAMKit's layout's output, and the input model is untouched."""
    before = sample(tiny, kind)
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    native, _ = quantize(tiny, *scheme)
    ours, ours_report = quantize(tiny, *scheme, native=False)
    assert not ours_report.native
    out = sample(native, kind)
    assert 0 < rel(out, before) < 0.12
    assert rel(out, sample(ours, kind)) < 1e-6
    assert torch.equal(sample(tiny, kind), before)
    assert not tiny.object_patches
    after = tiny.model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize(("granularity", "rotation"), [("channel", "none"), ("tensor", "none"),
                                                       ("channel", "convrot")])
def test_int8_matmul_runs_comfyuis_w8a8_close_to_weight_only(tiny, kind, granularity, rotation):
    base = sample(tiny, kind)
    weight_only, _ = quantize(tiny, "int8", granularity)
    ref = sample(weight_only, kind)
    out_model, report = quantize(tiny, "int8", granularity, compute="int8 matmul", rotation=rotation)
    out = sample(out_model, kind)
    text = report.summary()
    assert "Compute: int8 matmul" in text
    assert all(f"{v:.5f}" in text for v in (0.99941, 0.99592, 0.99956, 0.99980)), text
    if not has_native():
        assert not report.int8_matmul and "INT8 matmul is not available" in text
        assert torch.equal(out, ref)
        return
    linears = [n for n, m in stand_ins(out_model).items() if compat.is_mixed_precision_linear(m)]
    assert report.int8_matmul and sorted(report.int8_matmul) == sorted(linears)
    for name in linears:
        module = stand_ins(out_model)[name]
        assert module._full_precision_mm is False and module._full_precision_mm_config is False
    assert 0 < rel(out, base) < W8A8_TOLERANCE
    assert not torch.equal(out, ref), "W8A8 quantizes the activations: it cannot equal weight-only"
    if rotation == "convrot":
        assert sum(report.convrot_groups.values()) > 0
        rotated = [m for m in stand_ins(out_model).values() if getattr(m.weight, "_params", None) is not None
                   and getattr(m.weight._params, "convrot", False)]
        assert len(rotated) == sum(report.convrot_groups.values())
        assert {m.weight._params.convrot_groupsize for m in rotated} <= set(quantize_model.CONVROT_GROUPS)


def test_int8_matmul_calls_comfy_kitchens_int8_linear(tiny, kind, monkeypatch):
    if not has_native():
        pytest.skip(f"no native layouts: {compat.native_layout_problem()}")
    import comfy_kitchen.tensor.int8 as kitchen_int8

    calls = []
    real = torch.ops.comfy_kitchen.int8_linear

    class Spy:
        def __call__(self, *args, **kwargs):
            calls.append(args[1].shape)
            return real(*args, **kwargs)

    monkeypatch.setattr(kitchen_int8.torch.ops.comfy_kitchen, "int8_linear", Spy(), raising=False)
    out_model, _ = quantize(tiny, "int8", "channel", compute="int8 matmul")
    sample(out_model, kind)
    assert calls, "no INT8 matmul ran"
    weight_only, _ = quantize(tiny, "int8", "channel")
    calls.clear()
    sample(weight_only, kind)
    assert not calls, "compute 'dequantize' must not run W8A8 (ComfyUI's full_precision_matrix_mult alone does)"


@pytest.mark.parametrize(("scheme", "compute", "budget_gb"), [
    (("int8", "channel"), "dequantize", 0.0), (("int8", "channel"), "dequantize", 0.0004),
    (("int8", "channel"), "int8 matmul", 0.0), (("fp8_e4m3fn", "tensor"), "dequantize", 0.0),
    (("int8", "tensor"), "int8 matmul", 0.0004)], ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
def test_lora_after_native_quantize_changes_output_like_unquantized(tiny, kind, scheme, compute, budget_gb):
    """ComfyUI requantizes a LoRA merged into its own layouts (comfy-kitchen's math, stochastic rounding);
    streamed layers apply it on the fly. The LoRA's effect must match the unquantized model's as closely as
    with VRAMKit's layout. Measured (sd15 / flux), native vs VRAMKit's layout: int8 per row 0.070 / 0.035 vs
    0.067 / 0.028; fp8 per tensor 0.338 / 0.127 vs 0.298 / 0.116 (3 mantissa bits lose much of the LoRA)."""
    lora = lora_state_dict(tiny)
    base = sample(tiny, kind)
    effect = sample(apply_lora(tiny, lora), kind) - base
    quantized, _ = quantize(tiny, *scheme, compute=compute)
    q_out = sample(quantized, kind)
    with_lora = apply_lora(quantized, lora)
    if budget_gb:
        with_lora, _ = streaming.apply_offload(with_lora, budget_gb)
    q_effect = sample(with_lora, kind) - q_out
    if budget_gb:
        assert with_lora.model.model_lowvram, "the budget should have left layers streamed"
    assert rel(effect, base) > 0.02, "the test LoRA is too weak to tell anything"
    tolerance = 0.12 if scheme[0] == "int8" else 0.45
    assert rel(q_effect, effect) < tolerance, f"LoRA effect differs by {rel(q_effect, effect):.3f}"
    # Unloading the LoRA clone restored the quantized weights and the original model.
    assert torch.equal(sample(quantized, kind), q_out)
    assert torch.equal(sample(tiny, kind), base)


@pytest.mark.parametrize(("scheme", "compute"), [(("int8", "channel"), "dequantize"),
                                                 (("int8", "channel"), "int8 matmul"),
                                                 (("fp8_e4m3fn", "tensor"), "dequantize")],
                         ids=["int8-channel", "int8-channel-w8a8", "fp8-tensor"])
def test_modelsave_writes_comfy_quant_markers_that_stock_comfyui_loads(tiny, kind, scheme, compute, tmp_path):
    if not has_native():
        pytest.skip(f"ComfyUI {compat.comfyui_version()} writes no per-layer comfy_quant markers "
                    f"({compat.native_layout_problem()})")
    import comfy.sd
    import comfy.utils

    quantized, report = quantize(tiny, *scheme, compute=compute)
    expected_out = sample(quantized, kind)
    path = tmp_path / "saved.safetensors"
    comfy.sd.save_checkpoint(str(path), quantized)  # what ModelSave does
    sd = comfy.utils.load_torch_file(str(path))
    prefix = next(k[: -len(report.native[0]) - len(".comfy_quant")] for k in sd
                  if k.endswith(f"{report.native[0]}.comfy_quant"))
    fmt_name = NATIVE_LAYOUT[scheme][1]
    for name in report.native:
        marker = json.loads(bytes(sd[f"{prefix}{name}.comfy_quant"].tolist()).decode())
        assert marker["format"] == fmt_name
        assert marker.get("full_precision_matrix_mult", False) is (compute == "dequantize")
        assert sd[f"{prefix}{name}.weight"].dtype == compat.quant_ops().QUANT_ALGOS[fmt_name]["storage_t"]
        assert sd[f"{prefix}{name}.weight_scale"].dtype == torch.float32
    markers = {k for k in sd if k.endswith(".comfy_quant")}
    assert len(markers) == len(report.native)
    if kind != "flux":
        return  # the tiny UNet's conv layers keep VRAMKit's layout, which stock ComfyUI cannot load
    # Stock ComfyUI loads the file as a quantized checkpoint and computes what the clone computed (its own
    # int8_tensorwise forward runs W8A8 even under full_precision_matrix_mult, hence the tolerance).
    unet = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    loaded = comfy.sd.load_diffusion_model_state_dict(unet)
    assert loaded is not None
    layer = loaded.get_model_object(f"diffusion_model.{report.native[0]}")
    assert compat.is_comfy_quantized(layer.weight) and layer.quant_format == fmt_name
    assert rel(sample(loaded, kind), expected_out) < (1e-6 if scheme[0] != "int8" else W8A8_TOLERANCE)


def test_a_second_quantize_skips_native_layers_and_says_so(tiny):
    once, first = quantize(tiny, "int8", "channel")
    twice, second = quantize(once, "fp8_e4m3fn", "tensor")
    assert not second.quantized and set(second.already_quantized) == set(first.quantized)
    assert "not quantized a second time" in second.summary()
    assert stand_ins(twice).keys() == stand_ins(once).keys()
    assert all(stand_ins(twice)[n] is m for n, m in stand_ins(once).items())


def test_unexpected_kitchen_api_falls_back_to_vramkits_layout(tiny, kind, monkeypatch):
    """A ComfyUI/comfy-kitchen whose API changed: the node still quantizes (VRAMKit's layout) and says why."""
    monkeypatch.setattr(compat, "native_layout_problem", lambda: "TensorWiseINT8Layout.Params lacks convrot")
    result = VRAMKitQuantize().run(tiny, "int8", "channel", 64, "none", "default", "int8 matmul", "none")
    out, text = result["result"]
    assert "INT8 matmul is not available (TensorWiseINT8Layout.Params lacks convrot)" in text
    assert {layouts.layout_name(m.weight) for m in stand_ins(out).values()} <= {layouts.LAYOUT_NAME,
                                                                                "VRAMKit module"}
    assert sample(out, kind).isfinite().all()


def test_a_failing_native_layer_falls_back_per_layer(tiny, kind, monkeypatch):
    if not has_native():
        pytest.skip(f"no native layouts: {compat.native_layout_problem()}")

    def broken(q, dtype):
        raise TypeError("Params.__init__() got an unexpected keyword argument 'orig_shape'")

    monkeypatch.setattr(layouts, "native_weight", broken)
    out, report = quantize(tiny, "int8", "channel")
    assert report.quantized and not report.native
    assert any("ComfyUI's layout failed (TypeError" in note for note in report.notes)
    assert {layouts.layout_name(m.weight) for m in stand_ins(out).values()} == {layouts.LAYOUT_NAME}
    assert sample(out, kind).isfinite().all()


@pytest.mark.parametrize(("args", "message"), [
    (("int8", "group", "int8 matmul", "none"), "compute 'int8 matmul' runs ComfyUI's int8_tensorwise"),
    (("fp8_e4m3fn", "tensor", "int8 matmul", "none"), "use format int8"),
    (("int8", "channel", "dequantize", "convrot"), "rotation 'convrot'"),
    (("int8", "tensor", "int8 matmul", "convrot"), "granularity 'channel'"),
    (("int8", "channel", "fast", "none"), "compute 'fast' is not one of"),
    (("int8", "channel", "dequantize", "quarot"), "rotation 'quarot' is not one of"),
])
def test_contradictory_choices_are_refused_clearly(tiny, args, message):
    fmt, granularity, compute, rotation = args
    with pytest.raises(ValueError, match=message):
        quantize(tiny, fmt, granularity, compute=compute, rotation=rotation)


# --- bounded dequantize in every ComfyUI path ------------------------------------------------------------

FLUX_LINEAR1 = (21504, 3072)


@pytest.fixture(scope="module")
def flux_weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(FLUX_LINEAR1, generator=g) * 0.02).to(torch.bfloat16)


@pytest.fixture
def torch_path(monkeypatch):
    """Dequantize through the torch twin (what CUDA runs) even on the CPU, where the Rust kernel would."""
    monkeypatch.setattr(api, "_dequantize_rust", api._dequantize_torch)


def _traced(fn):
    with AllocationTracer() as tracer:
        out = fn()
    return out, tracer.peak - out.nbytes


@pytest.mark.parametrize(("fmt", "granularity"), [("int8", "group"), ("int8", "channel"), ("fp8_e4m3fn", "tensor")])
def test_comfyui_paths_dequantize_within_output_plus_64_mib(flux_weight, torch_path, fmt, granularity):
    if compat.quant_backend() == "none":
        pytest.skip("this ComfyUI has no QuantizedTensor registry")
    q = quant.quantize(flux_weight, fmt, granularity, 64 if granularity == "group" else None)
    expected = q.dequantize(torch.bfloat16)
    x = torch.zeros(1, FLUX_LINEAR1[1], dtype=torch.bfloat16)
    paths = {
        "VRAMKit layout": lambda: layouts._weight_for(x, layouts.ours(q, torch.bfloat16)),
        "dequantize_to (VRAMKit layout)": lambda: layouts.dequantize_to(layouts.ours(q, torch.bfloat16),
                                                                        torch.bfloat16),
        "module route": lambda: quantized_ops._OwnQuantizedOp._dequantized(
            _Holder(quantized_ops.Scheme(fmt, granularity, q.group_size, torch.bfloat16, "module")),
            layouts.storage_codes(q), q.scale, torch.bfloat16),
    }
    if has_native() and layouts.native_format(fmt, granularity):
        native, _ = layouts.native_weight(q, torch.bfloat16)
        paths["dequantize_to (ComfyUI's layout)"] = lambda: layouts.dequantize_to(native, torch.bfloat16)
    for label, fn in paths.items():
        out, extra = _traced(fn)
        assert extra <= 64 * MiB, f"{label}: {extra / MiB:.1f} MiB beyond the output"
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), label


class _Holder:
    def __init__(self, scheme: quantized_ops.Scheme) -> None:
        self._vramkit_scheme = scheme


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("fmt", "granularity"), [("int8", "channel"), ("int8", "group"), ("fp8_e4m3fn", "tensor")])
def test_cuda_weight_only_forward_dequantizes_within_output_plus_64_mib(flux_weight, fmt, granularity):
    """On the device: the weight a layer's weight-only forward dequantizes (ComfyUI's layout where it has
    one, else VRAMKit's) costs its output plus at most 64 MiB (torch.cuda.max_memory_allocated)."""
    q = quant.quantize(flux_weight.cuda(), fmt, granularity, 64 if granularity == "group" else None)
    if has_native() and layouts.native_format(fmt, granularity):
        qt, _ = layouts.native_weight(q, torch.bfloat16)
    else:
        qt = layouts.comfy_weight(q, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = layouts.dequantize_to(qt, torch.bfloat16)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out.nbytes
    assert extra <= 64 * MiB, f"{layouts.layout_name(qt)}: {extra / MiB:.1f} MiB beyond the output"
    assert torch.equal(out.cpu().view(torch.int16), q.to("cpu").dequantize(torch.bfloat16).view(torch.int16))
