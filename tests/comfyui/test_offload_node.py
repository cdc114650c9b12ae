"""VRAMKitOffload inside ComfyUI: ComfyUI's per-layer streaming held to a budget (run on the CPU device,
where the same legacy loader code decides what stays resident; Dynamic VRAM is covered with a stand-in VBAR
in test_vram_budget.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import sample

from vramkit.comfy import budget as streaming
from vramkit.comfy import compat
from vramkit.comfy.display import format_bytes
from vramkit.comfy.nodes import VRAMKitOffload

MB = 2**20


def offload(model, gb):
    result = VRAMKitOffload().run(model, gb)
    out, summary = result["result"]
    assert result["ui"]["text"] == [summary]
    return out, summary


@pytest.mark.parametrize("budget_mb", [0.25, 1.0, 2.0])
def test_budget_caps_resident_weights_and_output_is_identical(tiny, kind, budget_mb):
    before = sample(tiny, kind)
    streamed, summary = offload(tiny, budget_mb * MB / 2**30)
    assert streamed is not tiny and streamed.model is tiny.model
    out = sample(streamed, kind)
    assert 0 < streamed.loaded_size() <= budget_mb * MB or streamed.loaded_size() == 0
    assert streamed.loaded_size() <= budget_mb * MB
    assert streamed.model.model_lowvram, "nothing was left to stream"
    assert torch.equal(out, before), "streaming must not change the numbers"
    assert torch.equal(sample(tiny, kind), before)
    assert tiny.loaded_size() == tiny.model_size(), "the input model should load fully again"
    assert f"budget {format_bytes(budget_mb * MB)}:" in summary and "streamed each step" in summary
    assert "Sequential offload under ComfyUI's legacy loader" in summary
    res = streaming.residency(streamed)
    assert res.cap_applied and res.budget_bytes == int(budget_mb * MB)


@pytest.mark.parametrize("budget_mb", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("lora", [False, True], ids=["", "lora"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_plan_predicts_what_comfyui_streams(tiny, kind, budget_mb, quantized, lora):
    from helpers import apply_lora, lora_state_dict

    from vramkit.comfy import offload_plan, quantize_model

    model = tiny
    if quantized:  # quantized layers computing in bf16: ComfyUI 0.29+ counts their dequantized copy too
        model, _ = quantize_model.quantize_model(tiny, "int8", "group", 64, compute_dtype="bf16")
    if lora:  # a LoRA before the node: ComfyUI's loader adds its estimate of patching a streamed layer
        model = apply_lora(model, lora_state_dict(tiny))
        assert model.patches
    budget = int(budget_mb * MB)
    streamed, _ = streaming.apply_offload(model, budget / 2**30)
    predicted = offload_plan.plan(streamed, budget)
    sample(streamed, kind)
    live = dict(streamed.model.named_modules())
    # ComfyUI marks the layers it loaded completely; the other ComfyUI ops are streamed.
    actual = {name for name, m in live.items()
              if hasattr(m, "comfy_cast_weights") and not getattr(m, "comfy_patched_weights", False)}
    assert actual == set(predicted.streamed)
    expected = streamed.model_size() if predicted.full_load else predicted.resident_bytes
    assert streamed.loaded_size() == expected


def test_tiny_budget_streams_everything_and_says_so(tiny):
    _, summary = offload(tiny, 1 / 2**30)  # one byte
    assert "every layer streams" in summary


def test_larger_budget_keeps_more_resident(tiny, kind):
    small, _ = offload(tiny, 0.5 * MB / 2**30)
    sample(small, kind)
    small_resident = small.loaded_size()
    large, _ = offload(tiny, 2.5 * MB / 2**30)
    sample(large, kind)
    assert large.loaded_size() > small_resident


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto on a GPU depends on its free memory")
def test_auto_on_cpu_changes_nothing(tiny, kind):
    auto, summary = offload(tiny, 0)
    before = sample(tiny, kind)
    assert torch.equal(sample(auto, kind), before)
    assert auto.loaded_size() == auto.model_size()
    res = streaming.residency(auto)
    assert res.budget_bytes is None and not res.cap_applied and "CPU" in res.reason
    assert "auto budget" in summary and "after ComfyUI has freed what it will" in summary


def test_rerunning_the_node_replaces_its_wrapper_and_callback(tiny):
    once, _ = offload(tiny, 0.001)
    twice, _ = offload(once, 0.002)
    wrappers = twice.get_wrappers(compat.wrappers_mp().PREPARE_SAMPLING, "vramkit.offload")
    callbacks = twice.get_callbacks(compat.callbacks_mp().ON_LOAD, "vramkit.offload")
    assert len(wrappers) == 1 and len(callbacks) == 1
    assert streaming.budget_hook(twice).requested == int(0.002 * 2**30)
    assert not tiny.get_wrappers(compat.wrappers_mp().PREPARE_SAMPLING, "vramkit.offload")


def test_node_has_no_engine_input_and_runs_with_the_budget_alone(tiny):
    spec = VRAMKitOffload.INPUT_TYPES()["required"]
    assert list(spec) == ["model", "vram_budget_gb"]
    out, summary = offload(tiny, 0.001)
    assert out is not tiny and "Sequential offload under" in summary


@pytest.mark.parametrize(("gb", "error", "message"), [
    (-1.0, ValueError, "must be 0 \\(auto\\) or a positive"),
    (10_000.0, ValueError, "more memory than any device has"),
])
def test_bad_budget_is_refused(tiny, gb, error, message):
    with pytest.raises(error, match=message):
        streaming.apply_offload(tiny, gb)
