"""VRAMKitQuantize inside ComfyUI, on the tiny SD1.5 UNet and the tiny Flux."""

from __future__ import annotations

import pytest
import torch
from helpers import apply_lora, lora_state_dict, rel, sample

from vramkit.comfy import budget as streaming
from vramkit.comfy import quantize_model
from vramkit.comfy.nodes import VRAMKitQuantize
from vramkit.quant import selection

#: Worst relative output error allowed against the unquantized run (2 euler steps, CFG 2). Measured on the
#: tiny models (sd15 / flux): int8 group 0.34% / 0.55%, channel 0.32% / 0.64%, tensor 0.44% / 1.0%;
#: fp8_e4m3fn tensor 1.3% / 2.6%, channel 1.4% / 2.5%; fp8_e5m2 about twice e4m3fn.
TOLERANCE = {
    ("int8", "group"): 0.015, ("int8", "channel"): 0.02, ("int8", "tensor"): 0.03,
    ("fp8_e4m3fn", "tensor"): 0.06, ("fp8_e4m3fn", "channel"): 0.06, ("fp8_e4m3fn", "group"): 0.06,
    ("fp8_e5m2", "tensor"): 0.12, ("fp8_e5m2", "channel"): 0.12, ("fp8_e5m2", "group"): 0.12,
}
SCHEMES = sorted(TOLERANCE)


def quantize(model, fmt="int8", granularity="group", group_size=64, skip=selection.DEFAULT_SKIP,
             compute_dtype="default", **optional):
    result = VRAMKitQuantize().run(model, fmt, granularity, group_size, skip, compute_dtype, **optional)
    out, summary = result["result"]
    assert result["ui"]["text"] == [summary]
    return out, summary


@pytest.mark.parametrize("scheme", SCHEMES, ids=["-".join(s) for s in SCHEMES])
def test_output_within_tolerance_and_input_untouched(tiny, kind, scheme):
    fmt, granularity = scheme
    before = sample(tiny, kind)
    quantized, summary = quantize(tiny, fmt, granularity)
    assert quantized is not tiny and quantized.model is tiny.model  # a clone sharing the nn.Module
    out = sample(quantized, kind)
    after = sample(tiny, kind)
    assert torch.equal(before, after), "the input model's output changed after the quantized clone ran"
    error = rel(out, before)
    assert 0 < error < TOLERANCE[scheme], f"{scheme}: relative error {error:.4f}"
    assert not tiny.object_patches, "the input patcher gained object patches"
    assert fmt in summary


@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
def test_model_size_drops_by_storage_ratio(tiny, kind, granularity):
    _, report = quantize_model.quantize_model(tiny, "int8", granularity, 64)
    quantized, _ = quantize(tiny, "int8", granularity)
    size_before = tiny.model_size()
    # Every quantized layer: 4 bytes (fp32) -> 1 byte per weight + one 4-byte scale per block.
    expected_layers = 0
    expected_comfy = 0  # what ComfyUI's module_size counts: codes, plus scales for its own layouts
    for name in report.quantized:
        weight = tiny.get_model_object(f"diffusion_model.{name}").weight
        rows, row_len = weight.shape[0], weight.numel() // weight.shape[0]
        blocks = {"tensor": 1, "channel": rows}.get(granularity, rows * row_len // 64)
        if granularity == "group" and name in report.channel_fallback:
            blocks = rows
        expected_layers += weight.numel() + 4 * blocks
        expected_comfy += weight.numel() + (4 * blocks if name in report.native else 0)
    assert report.bytes_after == expected_layers
    assert quantized.model_size() == size_before - report.bytes_before + report.bytes_after
    # fp32 -> 8 bits is 4x, less the scales: at most one 4-byte scale per 32 weights in these models.
    assert report.bytes_before / report.bytes_after > 4 / (1 + 4 / 32)
    # ComfyUI's own accounting of the patched modules agrees (module_size sums the state_dict: codes only
    # for a QuantizedTensor parameter; codes, scale and comfy_quant marker for its own quantized Linear).
    import comfy.model_management as mm

    patched = 0
    for module in quantized.object_patches.values():
        sd = module.state_dict()
        patched += mm.module_size(module) - sum(sd[k].nbytes for k in ("bias", "comfy_quant") if k in sd)
    assert patched == expected_comfy


@pytest.mark.parametrize("route", ["comfy", "module"])
@pytest.mark.parametrize("budget_gb", [0.0, 0.0004], ids=["resident", "streamed"])
def test_lora_after_quantize_changes_output_like_unquantized(tiny, kind, route, budget_gb):
    lora = lora_state_dict(tiny)
    base = sample(tiny, kind)
    effect = sample(apply_lora(tiny, lora), kind) - base
    quantized, _ = quantize_model.quantize_model(tiny, "int8", "group", 64, route=route)
    q_out = sample(quantized, kind)
    with_lora = apply_lora(quantized, lora)
    if budget_gb:
        with_lora, _ = streaming.apply_offload(with_lora, budget_gb)
    q_effect = sample(with_lora, kind) - q_out
    if budget_gb:
        assert with_lora.model.model_lowvram, "the budget should have left layers streamed"
    assert rel(effect, base) > 0.02, "the test LoRA is too weak to tell anything"
    assert rel(q_effect, effect) < 0.1, f"LoRA effect differs by {rel(q_effect, effect):.3f}"
    # Unloading the LoRA clone restored the quantized weights and the original model.
    assert torch.equal(sample(quantized, kind), q_out)
    assert torch.equal(sample(tiny, kind), base)


def test_default_skips_keep_stem_head_and_embeddings(tiny, kind):
    _, report = quantize_model.quantize_model(tiny, "int8", "group", 64)
    kept = set(report.skipped)
    if kind == "sd15":
        assert {"input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2"} <= kept
    else:
        assert {"img_in", "final_layer.linear", "time_in.in_layer", "vector_in.in_layer",
                "guidance_in.in_layer"} <= kept
    assert not kept & set(report.quantized)
    _, everything = quantize_model.quantize_model(tiny, "int8", "group", 64, skip_patterns="none")
    assert len(everything.quantized) == len(report.quantized) + len(report.skipped)


def test_progress_bar_reports_every_layer(tiny, monkeypatch):
    import comfy.utils

    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        calls.append((value, total)))
    _, report = quantize_model.quantize_model(tiny, "int8", "group", 64)
    layers = len(report.quantized) + len(report.skipped)
    # Newer ComfyUI throttles what reaches the UI to the first, the last and a few per second.
    assert calls[0] == (1, layers)
    assert calls[-1] == (layers, layers)
    assert [value for value, _ in calls] == sorted(value for value, _ in calls)


@pytest.mark.parametrize(("first_scheme", "second_scheme"), [
    (("int8", "group"), ("fp8_e4m3fn", "tensor")), (("int8", "channel"), ("int8", "group"))])
def test_requantizing_a_quantized_model_keeps_its_layers_and_says_so(tiny, first_scheme, second_scheme):
    once, first = quantize_model.quantize_model(tiny, *first_scheme, 64)
    twice, second = quantize_model.quantize_model(once, *second_scheme, 64)
    assert not second.quantized
    assert set(second.already_quantized) == set(first.quantized)
    assert set(second.already_quantized.values()) == {"by VRAMKit"}
    assert not set(second.skipped) & set(first.quantized)
    assert twice.model_size() == once.model_size()
    text = second.summary()
    assert f"{len(first.quantized)} layers were already quantized (by VRAMKit: {len(first.quantized)})" in text
    assert "not quantized a second time" in text


@pytest.mark.parametrize(("args", "message"), [
    (("int8", "group", 64, ""), "skip_patterns is empty"),
    (("int8", "group", 64, "*norm*,,<last>"), "pattern #2 is empty"),
    (("int8", "group", 64, "<middle>"), "unknown placeholder"),
    (("int8", "group", 64, "double blocks"), "characters no layer name contains"),
    (("int8", "group", 0, selection.DEFAULT_SKIP), "group_size must be a positive integer"),
    (("int4", "group", 64, selection.DEFAULT_SKIP), "format 'int4' is not one of"),
    (("int8", "row", 64, selection.DEFAULT_SKIP), "granularity 'row' is not one of"),
])
def test_bad_input_is_refused_clearly(tiny, args, message):
    with pytest.raises(ValueError, match=message):
        quantize_model.quantize_model(tiny, *args)


def test_compute_dtype_sets_the_dequantized_dtype(tiny, kind):
    quantized, _ = quantize(tiny, "int8", "group", compute_dtype="bf16")
    assert quantized.get_model_object("manual_cast_dtype") == torch.bfloat16
    # Compare with the unquantized model computing in bf16 too (bf16 alone moves the tiny Flux by ~30%).
    reference = tiny.clone()
    reference.set_model_compute_dtype(torch.bfloat16)
    out = sample(quantized, kind)
    assert out.isfinite().all()
    assert rel(out, sample(reference, kind)) < 0.05


@pytest.mark.parametrize("route", ["comfy", "module"])
def test_quantized_layers_move_between_devices_whole(tiny, route):
    """ComfyUI's loader moves fully loaded layers with `module.to(device)`: codes and scales must follow."""
    from vramkit.comfy import compat, layouts

    quantized, _ = quantize_model.quantize_model(tiny, "int8", "group", 64, route=route)
    layer = next(m for m in quantized.object_patches.values() if isinstance(m, torch.nn.Module))
    layer.to("meta")  # a private stand-in of this local clone
    assert layer.weight.device.type == "meta"
    if route == "comfy":
        assert compat.is_comfy_quantized(layer.weight)
        assert layouts.layout_name(layer.weight) == layouts.LAYOUT_NAME
        params = layer.weight._params.scale if hasattr(layer.weight, "_params") else layer.weight._layout_params
        scale = params["scale"] if isinstance(params, dict) else params
        assert scale.device.type == "meta"
    else:
        assert layer.weight_scale.device.type == "meta" and layer.weight.dtype == torch.int8


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("fmt", "granularity"), [("int8", "group"), ("int8", "channel"), ("int8", "tensor"),
                                                  ("fp8_e4m3fn", "group")])
def test_linear_dequantizes_once_into_the_input_dtype(fmt, granularity, input_dtype):
    """bf16 weights computing in fp32/fp16: F.linear on VRAMKit's layout uses ``(codes * scale).to(input
    dtype)``, one rounding, not a detour through the weight's original dtype."""
    from vramkit import quant
    from vramkit.comfy import compat, layouts

    if compat.quant_backend() == "none":
        pytest.skip("this ComfyUI has no QuantizedTensor registry")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 128, generator=g).to(torch.bfloat16)
    q = quant.quantize(weight, fmt, granularity, 64 if granularity == "group" else None)
    qt = layouts.comfy_weight(q, torch.bfloat16)
    assert layouts.layout_name(qt) == layouts.LAYOUT_NAME
    x = torch.randn(4, 128, generator=g).to(input_dtype)
    expected = q.dequantize(input_dtype)
    twice = q.dequantize(torch.bfloat16).to(input_dtype)
    assert not torch.equal(expected, twice), "rounding twice would change nothing: the test proves nothing"
    assert torch.equal(layouts._weight_for(x, qt), expected)
    assert torch.equal(torch.nn.functional.linear(x, qt), torch.nn.functional.linear(x, expected))
