"""VRAMKitAutoOptimize inside ComfyUI: plans the tiny models, applies nothing where they fit (bit-identical),
applies the rungs its plan names under a simulated small budget, and its safety net climbs on an injected
out-of-memory and finishes; the shared model stays intact throughout."""

from __future__ import annotations

import pytest
import torch
from helpers import sample

from vramkit.comfy import auto
from vramkit.comfy.nodes import VRAMKitAutoOptimize, VRAMKitReport

GB = 1024**3


def run_node(model, gb=0.0, preset="auto", safety_net=True, size=64, **optional):
    result = VRAMKitAutoOptimize().run(model, size, size, 1, 1, gb, preset, safety_net, **optional)
    out, text = result["result"]
    assert result["ui"]["text"] == [text]
    return out, text


def snapshot(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def unchanged(model, before) -> bool:
    """The shared weights as they were, once ComfyUI has unloaded the patched clone (while it is loaded the
    shared modules hold its object patches, as ComfyUI designs it)."""
    import comfy.model_management as mm

    mm.unload_all_models()
    state = model.model.state_dict()
    return all(torch.equal(state[k], v) for k, v in before.items())


def test_where_it_fits_nothing_is_applied_and_output_is_bit_identical(tiny, kind):
    reference = sample(tiny, kind)
    out, text = run_node(tiny)
    assert out is not tiny and out.model is tiny.model
    assert "Nothing to apply" in text and "Applied:" not in text
    assert not out.object_patches
    assert torch.equal(sample(out, kind), reference)
    assert torch.equal(sample(tiny, kind), reference)


def test_live_profile_reads_the_model(tiny, kind):
    profile = auto.live_profile(tiny)
    total = sum(b["bytes"][profile["weights_format"]] for b in profile["blocks"])
    assert total == tiny.model_size() or abs(total - tiny.model_size()) < 0.05 * tiny.model_size()
    assert profile["memory_usage_factor"] == pytest.approx(tiny.model.memory_usage_factor)
    names = [b["name"] for b in profile["blocks"]]
    if kind == "flux":
        assert "double_blocks.0" in names and "single_blocks.0" in names
    else:
        assert "middle_block" in names and "input_blocks.1" in names


def _budget_between(tiny, kind):
    """A budget below what the tiny model needs as it is, above the least it can need."""
    job = auto.job_from(tiny, None, 64, 64, 1, 1)
    full = auto.plan_for(tiny, None, None, job, 0.0, "auto")
    assert full.fits and not full.steps
    least = full.min_budget_bytes
    assert least < full.predicted_peak_bytes
    return (least + full.predicted_peak_bytes) // 2


def test_a_simulated_small_budget_applies_the_rungs_the_plan_names(tiny, kind):
    budget = _budget_between(tiny, kind)
    before = snapshot(tiny)
    reference = sample(tiny, kind)
    job = auto.job_from(tiny, None, 64, 64, 1, 1)
    plan = auto.plan_for(tiny, None, None, job, budget / GB, "auto")
    assert plan.fits and plan.steps, plan.text()
    assert plan.predicted_peak_bytes <= budget
    out, text = run_node(tiny, budget / GB)
    assert "Applied:" in text
    if "weights_8bit" in plan.rungs:
        assert out.object_patches, "the quantized layers are object patches"
    if "layer_streaming" in plan.rungs:
        from vramkit.comfy import budget as budget_mod
        from vramkit.comfy import compat, patch

        wrappers = out.model_options["transformer_options"]["wrappers"][compat.wrappers_mp().PREPARE_SAMPLING]
        assert patch.key(budget_mod.WRAPPER_NAME) in wrappers
    result = sample(out, kind)
    assert torch.isfinite(result).all()
    assert unchanged(tiny, before)
    assert torch.equal(sample(tiny, kind), reference)


def test_presets_fix_the_rungs(tiny, kind):
    out, text = run_node(tiny, preset="novram")
    assert "preset novram" in text and "Stream every layer" in text, text
    sample(out, kind)
    out, text = run_node(tiny, preset="gpu-only")
    assert "Nothing to apply" in text
    with pytest.raises(ValueError, match="preset"):
        run_node(tiny, preset="turbo")


class InjectedOOM:
    """A model function wrapper that simulates a memory cap: full attention does not fit it, so every call
    raises torch.OutOfMemoryError until the attention is sliced."""

    def __init__(self):
        self.raised = 0
        self.calls = 0

    def __call__(self, apply_model, args):
        self.calls += 1
        override = args["c"].get("transformer_options", {}).get("optimized_attention_override")
        if getattr(override, "vramkit_mode", None) != "sliced":
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected: simulated memory cap)")
        return apply_model(args["input"], args["timestep"], **args["c"])


def test_safety_net_climbs_on_out_of_memory_and_finishes(tiny, kind):
    before = snapshot(tiny)
    out, _ = run_node(tiny)
    injected = InjectedOOM()
    out.set_model_unet_function_wrapper(injected)
    result = sample(out, kind)
    assert injected.raised == 1 and injected.calls > 1
    assert torch.isfinite(result).all()
    record = auto.find(result)
    assert record is not None and len(record.events) == 1
    assert "attention sliced" in record.events[0] and "retry 1" in record.events[0]
    report = VRAMKitReport().run({"samples": result})["ui"]["text"][0]
    assert "Safety net" in report and "attention sliced" in report
    assert unchanged(tiny, before)


def test_safety_net_is_bounded(tiny, kind):
    out, _ = run_node(tiny)

    def always(apply_model, args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    out.set_model_unet_function_wrapper(always)
    with pytest.raises(torch.OutOfMemoryError):
        sample(out, kind)


def test_without_the_safety_net_oom_propagates(tiny, kind):
    out, _ = run_node(tiny, safety_net=False)
    out.set_model_unet_function_wrapper(InjectedOOM())
    with pytest.raises(torch.OutOfMemoryError):
        sample(out, kind)


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="vram_budget_gb"):
        run_node(tiny, -1.0)
    with pytest.raises(TypeError, match="model"):
        VRAMKitAutoOptimize().run("not a model", 64, 64, 1, 1, 0.0, "auto", True)
    with pytest.raises(TypeError, match="latent"):
        run_node(tiny, latent={"samples": "nope"})
