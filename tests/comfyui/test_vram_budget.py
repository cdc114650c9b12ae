"""The per-model VRAM budget API (vramkit.comfy.budget) inside a real ComfyUI, under both memory managers.

Dynamic VRAM runs ComfyUI's real ``ModelPatcherDynamic`` and ``load_models_gpu`` against a recording stand-in
for comfy-aimdo's VBAR on a simulated device (aimdo_standin.py); the legacy loader runs for real (on the
simulated device for the auto budget, on the CPU for sampling). The GPU test at the end does it for real.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import aimdo_standin as standin
import pytest
import torch
from helpers import sample

from vramkit.comfy import budget, compat, offload_plan

MiB = 2**20


@pytest.fixture
def dynamic(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    problem = standin.has_dynamic_vram()
    if problem:
        pytest.skip(problem)
    yield lambda total=8 * 2**30: standin.install(monkeypatch, total)
    standin.unload_meta_models()


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield lambda total=8 * 2**30: standin.install(monkeypatch, total, aimdo=False)
    standin.unload_meta_models()


def _load(model: Any, memory_required: int = 0) -> None:
    import comfy.model_management as mm

    mm.load_models_gpu([model], memory_required=memory_required)


def _prepare(model: Any) -> None:
    """What a sampler does before its first step: ComfyUI's prepare_sampling (PREPARE_SAMPLING wrappers,
    then load_models_gpu with the activation estimate)."""
    import comfy.model_patcher
    import comfy.sampler_helpers

    options = comfy.model_patcher.create_model_options_clone(model.model_options)
    options.setdefault("transformer_options", {})
    conds = _conds(model)
    comfy.sampler_helpers.prepare_model_patcher(model, conds, options)  # the patcher's wrappers, as CFGGuider
    comfy.sampler_helpers.prepare_sampling(model, _NOISE, conds, options)


_NOISE = (1, 16, 32, 32)


def _conds(model: Any) -> dict[str, list[dict[str, Any]]]:
    return {"positive": [{}], "negative": [{}]}


def _estimate(model: Any) -> int:
    return compat.memory_estimate(model, _NOISE, _conds(model))


def _reserve(model: Any) -> int:
    """ComfyUI's reserve for this run in load_models_gpu (extra_mem), which the auto budget keeps free."""
    import comfy.model_management as mm

    return max(int(mm.minimum_inference_memory()), _estimate(model) + int(mm.extra_reserved_memory()))


# ---------------------------------------------------------------------------------------------------------
# Dynamic VRAM: the VBAR watermark through ON_LOAD


def test_dynamic_budget_caps_the_vbar_in_on_load_and_again_after_each_reprioritising_load(dynamic):
    gpu = dynamic()
    model = standin.meta_patcher("flux", dynamic=True)
    vbar = gpu.vbar(model)
    budget_bytes = 1 * MiB
    out, plan = budget.apply_vram_budget(model, budget_bytes)
    assert (plan.manager, plan.mechanism, plan.applied, plan.fell_back) == ("dynamic", "vbar_watermark", True, False)
    assert vbar.calls == [], "nothing may touch the VBAR before ComfyUI loads the model"
    forced = offload_plan.vbar_layout(out)[1]
    watermark = offload_plan.watermark_for(budget_bytes, sum(b for _, b in forced))
    assert watermark == plan.watermark_bytes and 0 < watermark <= budget_bytes and watermark % standin.PAGE == 0

    _load(out)
    assert vbar.calls == [("prioritize",), ("set_watermark", watermark)]
    callers = vbar.callers[1]
    assert "on_load" in callers and callers.index("on_load") < callers.index("load"), \
        "the cap must be set by the ON_LOAD callback, inside ModelPatcherDynamic.load"
    assert vbar.watermark == watermark // standin.PAGE

    # Another model loads (its VBAR is prioritised), then this one again: load() re-prioritises it, which
    # resets its watermark to every page; the ON_LOAD callback puts the cap back.
    other = standin.meta_patcher("sd15", dynamic=True)
    gpu.vbar(other)
    _load(other)
    _load(out)
    assert vbar.calls == [("prioritize",), ("set_watermark", watermark)] * 2
    vbar.fault_all()  # a sampling step: what fits under the watermark faults in
    res = budget.residency(out)
    assert (res.manager, res.cap_applied, res.loads, res.watermark_bytes) == ("dynamic", True, 2, watermark)
    assert res.budget_bytes == budget_bytes and res.requested_bytes == budget_bytes
    assert res.resident_bytes == out.loaded_size() <= budget_bytes
    assert res.streamed_bytes == out.model_size() - out.loaded_size() > 0
    assert "cap applied" in res.describe()

    # The input model carries no budget: loading it re-prioritises the shared VBAR and leaves it uncapped.
    _load(model)
    assert vbar.calls[-1] == ("prioritize",) and vbar.watermark == vbar.nr_pages
    assert budget.residency(model).reason == "this model has no VRAMKit budget"


def test_dynamic_budget_follows_clones_and_is_replaced_when_set_again(dynamic):
    gpu = dynamic()
    model = standin.meta_patcher("flux", dynamic=True)
    vbar = gpu.vbar(model)
    once, _ = budget.apply_vram_budget(model, 1 * MiB)
    twice, plan = budget.apply_vram_budget(once, 2 * MiB)
    child = twice.clone()  # e.g. a LoRA loader after the node
    _load(child)
    assert vbar.watermark_calls() == [plan.watermark_bytes], "one budget, the latest, applied once"
    assert budget.residency(child).budget_bytes == 2 * MiB


def test_dynamic_plan_predicts_comfyuis_vbar_layout_and_what_stays(dynamic):
    gpu = dynamic()
    model = standin.meta_patcher("flux", dynamic=True)
    vbar = gpu.vbar(model)
    slots, forced = offload_plan.vbar_layout(model)
    out, plan = budget.apply_vram_budget(model, 2 * MiB)
    _load(out)
    live = dict(out.model.named_modules())
    placed = {name: m._v for name, m in live.items() if hasattr(m, "_v")}
    assert {s.name: (s.offset, s.size) for s in slots} == {n: (at, size) for n, (_, at, size) in placed.items()}
    assert sum(b for _, b in forced) == compat.forced_resident_bytes(out)
    pages = vbar.watermark
    stays = {n for n, (_, at, size) in placed.items() if -(-(at + size) // standin.PAGE) <= pages}
    assert plan.prediction is not None
    assert stays == set(plan.prediction.resident) - {n for n, _ in forced}
    text = plan.describe()
    assert text.startswith("Sequential offload under Dynamic VRAM (comfy-aimdo), budget 2.0 MB: ")
    assert f"{len(plan.prediction.resident)} of " in text and "stream from RAM each step" in text
    assert "Cost:" in text and "NOT" not in text
    assert set(plan.prediction.streamed) == set(placed) - stays and stays and plan.prediction.streamed
    # past the small modules ComfyUI puts first, the largest layers are the ones that stay
    size = {n: s for n, (_, _, s) in placed.items()}
    large_stays = [size[n] for n in stays if size[n] >= compat.DYNAMIC_SMALL_BYTES]
    assert large_stays and min(large_stays) >= max(size[n] for n in set(placed) - stays)


def test_dynamic_auto_budget_is_taken_inside_the_load_after_eviction(dynamic):
    """A resident legacy "text encoder" that load_models_gpu evicts, and another model's reclaimable VBAR
    pages: the auto figure is read inside the load and includes both."""

    gpu = dynamic()
    te = standin.meta_patcher("sd15", dynamic=False, seed=5)
    model = standin.meta_patcher("flux", dynamic=True)
    vae = standin.meta_patcher("sd15", dynamic=True, seed=7)
    out, plan = budget.apply_vram_budget(model, None)
    vbar = gpu.vbar(model)
    vae_vbar = gpu.vbar(vae)
    gpu.track(te)
    _load(vae)
    vae_vbar.fault_all()
    _load(te)
    assert te.loaded_size() == te.model_size() and gpu.vbar_bytes() > 0
    gpu.total = gpu.used() + _reserve(out) + out.model_size() // 2  # tight: ComfyUI must evict the TE
    free_before = gpu.get_free_memory()
    seen: dict[str, int] = {}
    original = out.get_free_memory

    def spy(device: Any) -> int:
        seen["free"] = original(device)
        seen["te_loaded"] = te.loaded_size()
        return seen["free"]

    out.get_free_memory = spy  # ComfyUI's own figure, read through the patcher
    _prepare(out)
    assert te.loaded_size() < te.model_size(), "load_models_gpu should have evicted (part of) the text encoder"
    assert seen["te_loaded"] == te.loaded_size(), "the auto budget must be read after the eviction"
    res = budget.residency(out)
    forced = compat.forced_resident_bytes(out)
    reserve = _reserve(out)
    assert res.reserve_bytes == reserve and res.free_bytes == seen["free"]
    assert res.free_bytes == gpu.get_free_memory() + gpu.vbar_bytes(), "ComfyUI's figure counts aimdo's pages"
    assert res.budget_bytes == max(0, res.free_bytes + forced - reserve)
    before_eviction = max(0, free_before + gpu.vbar_bytes() + forced - reserve)
    assert res.budget_bytes > before_eviction, "the freed text-encoder memory must be part of the auto budget"
    assert vbar.watermark_calls() == [offload_plan.watermark_for(res.budget_bytes, forced)]
    assert res.cap_applied and plan.budget_bytes is None and "auto budget" in plan.describe()


def _prepare_with(model: Any, wrapper: Any) -> None:
    """prepare_sampling with `wrapper` put into the run's own model_options (not onto the patcher)."""
    import comfy.model_patcher
    import comfy.sampler_helpers

    options = comfy.model_patcher.create_model_options_clone(model.model_options)
    compat.set_model_options_wrapper(options, compat.wrappers_mp().PREPARE_SAMPLING, "vramkit.offload", wrapper)
    comfy.sampler_helpers.prepare_sampling(model, _NOISE, _conds(model), options)


def test_one_run_budget_caps_the_vbar_for_that_run_only(dynamic):
    """BudgetedPrepareSampling (what the Auto node's safety net adds to a retry's model_options)."""
    gpu = dynamic()
    model = standin.meta_patcher("flux", dynamic=True)
    vbar = gpu.vbar(model)
    wrapper = budget.BudgetedPrepareSampling(1 * MiB)
    _prepare_with(model, wrapper)
    forced = compat.forced_resident_bytes(model)
    assert vbar.watermark_calls() == [offload_plan.watermark_for(1 * MiB, forced)]
    assert not model.get_callbacks(compat.callbacks_mp().ON_LOAD, "vramkit.offload.run"), "left behind"
    facts = wrapper.hook.facts(model)
    assert facts is not None and facts.cap_applied and facts.manager == "dynamic"
    _load(model)  # a later load without the wrapper: uncapped
    assert vbar.watermark_calls() == [offload_plan.watermark_for(1 * MiB, forced)]


def test_one_run_budget_clamps_the_legacy_loader(simulated):
    simulated()
    model = standin.meta_patcher("flux", dynamic=False)
    wrapper = budget.BudgetedPrepareSampling(1 * MiB)
    _prepare_with(model, wrapper)
    assert 0 < model.loaded_size() <= 1 * MiB
    facts = wrapper.hook.facts(model)
    assert facts is not None and facts.cap_applied and facts.budget_bytes == MiB


def test_one_run_budget_of_zero_keeps_nothing_resident(simulated):
    simulated()
    model = standin.meta_patcher("flux", dynamic=False)
    _prepare_with(model, budget.BudgetedPrepareSampling(0))
    assert model.loaded_size() <= compat.forced_resident_bytes(model) and model.model.model_lowvram


# ---------------------------------------------------------------------------------------------------------
# When comfy-aimdo's API is missing or changed


class _OldVBAR(standin.RecordingVBAR):
    """A comfy-aimdo whose VBAR accepts the call but keeps its watermark (semantics changed)."""

    def set_watermark(self, size_bytes: int) -> None:
        self._record("set_watermark", int(size_bytes))


def test_missing_watermark_api_falls_back_to_the_legacy_loader(dynamic, monkeypatch):
    import comfy.model_patcher as mp
    import comfy_aimdo.model_vbar

    dynamic()
    monkeypatch.delattr(comfy_aimdo.model_vbar.ModelVBAR, "set_watermark")
    made: list[Any] = []

    def reload(kind: str, disable_dynamic: bool = False) -> Any:  # what a core loader's factory does
        m = standin.meta_patcher(kind, dynamic=not disable_dynamic)
        made.append(m)
        return m

    model = standin.meta_patcher("flux", dynamic=True)
    model.cached_patcher_init = (reload, ("flux",))
    out, plan = budget.apply_vram_budget(model, 2 * MiB)
    assert type(out) is mp.ModelPatcher and made and out.model is made[0].model
    assert (plan.manager, plan.mechanism, plan.fell_back, plan.applied) == ("legacy", "lowvram_clamp", True, True)
    assert "set_watermark" in plan.reason and "legacy loader honours the budget" in plan.reason
    text = plan.describe()
    assert "under ComfyUI's legacy loader" in text and "stay on meta" in text
    assert "moved this model from Dynamic VRAM to ComfyUI's legacy loader (clone(disable_dynamic=True))" in text
    _prepare(out)
    assert 0 < out.loaded_size() <= 2 * MiB
    res = budget.residency(out)
    assert (res.manager, res.cap_applied, res.budget_bytes) == ("legacy", True, 2 * MiB)


def test_missing_watermark_api_without_a_reloadable_loader_says_it_plainly(dynamic, monkeypatch):
    import comfy_aimdo.model_vbar

    gpu = dynamic()
    monkeypatch.setattr(comfy_aimdo.model_vbar.ModelVBAR, "set_watermark", lambda self: None)  # changed API
    model = standin.meta_patcher("flux", dynamic=True)
    vbar = gpu.vbar(model)
    out, plan = budget.apply_vram_budget(model, 2 * MiB)
    assert (plan.mechanism, plan.applied, plan.fell_back) == ("none", False, False)
    assert "changed ModelVBAR.set_watermark" in plan.reason and "cached_patcher_init" in plan.reason
    assert "could NOT be applied" in plan.describe()
    _load(out)
    assert vbar.watermark_calls() == []
    res = budget.residency(out)
    assert not res.cap_applied and "set_watermark" in res.reason


def test_a_vbar_that_ignores_the_cap_is_reported(dynamic):
    gpu = dynamic()
    model = standin.meta_patcher("flux", dynamic=True)
    old = _OldVBAR(4096)
    model.model.dynamic_vbars[model.load_device] = old
    gpu.vbars.append(old)
    out, _ = budget.apply_vram_budget(model, 1 * MiB)
    _load(out)
    res = budget.residency(out)
    assert old.watermark_calls() and not res.cap_applied and "did not take the cap" in res.reason
    assert "cap NOT applied" in res.describe()


def test_a_failing_set_watermark_never_breaks_the_load(dynamic):
    gpu = dynamic()
    model = standin.meta_patcher("flux", dynamic=True)
    vbar = gpu.vbar(model)

    def broken(size_bytes: int) -> None:
        raise RuntimeError("aimdo said no")

    vbar.set_watermark = broken  # type: ignore[method-assign]
    out, _ = budget.apply_vram_budget(model, 1 * MiB)
    _load(out)  # must not raise
    res = budget.residency(out)
    assert not res.cap_applied and "aimdo said no" in res.reason


# ---------------------------------------------------------------------------------------------------------
# Legacy loader


def test_legacy_auto_budget_is_taken_inside_the_load_after_eviction(simulated):

    te = standin.meta_patcher("sd15", dynamic=False, seed=5)
    model = standin.meta_patcher("flux", dynamic=False)
    out, plan = budget.apply_vram_budget(model, None)
    assert (plan.manager, plan.mechanism) == ("legacy", "lowvram_clamp")
    gpu = simulated()
    gpu.track(te)
    gpu.track(model)
    _load(te)
    gpu.total = gpu.used() + _reserve(out) + out.model_size() // 2  # tight: ComfyUI must evict the TE
    free_before = gpu.get_free_memory()
    _prepare(out)
    assert te.loaded_size() < te.model_size(), "load_models_gpu should have evicted (part of) the text encoder"
    res = budget.residency(out)
    reserve = _reserve(out)
    assert res.reserve_bytes == reserve and res.free_bytes is not None and res.free_bytes > free_before
    assert res.budget_bytes == max(0, res.free_bytes - reserve)  # nothing of the model was resident before
    assert res.budget_bytes > max(0, free_before - reserve), "the freed memory must be part of the auto budget"
    assert res.cap_applied and out.loaded_size() <= res.budget_bytes
    assert res.manager == "legacy" and res.loaded


def test_legacy_clamp_holds_the_budget_on_the_simulated_device(simulated):
    simulated()
    model = standin.meta_patcher("flux", dynamic=False)
    out, plan = budget.apply_vram_budget(model, 2 * MiB)
    _prepare(out)
    assert 0 < out.loaded_size() <= 2 * MiB and out.model.model_lowvram
    assert plan.prediction is not None and out.loaded_size() == plan.prediction.resident_bytes
    res = budget.residency(out)
    assert (res.cap_applied, res.budget_bytes, res.watermark_bytes) == (True, 2 * MiB, None)
    assert res.streamed_bytes == out.model_size() - out.loaded_size()


@pytest.mark.parametrize("budget_mb", [0.5, 2.0])
def test_legacy_clamp_on_cpu_with_real_sampling(tiny, kind, budget_mb):
    """The real legacy loader on the CPU device (the same code decides what stays resident)."""
    before = sample(tiny, kind)
    out, plan = budget.apply_vram_budget(tiny, int(budget_mb * MiB))
    assert out is not tiny and out.model is tiny.model and plan.manager == "legacy"
    assert torch.equal(sample(out, kind), before)
    res = budget.residency(out)
    assert res.cap_applied and res.resident_bytes == out.loaded_size() <= budget_mb * MiB
    assert res.streamed_bytes == out.model_size() - out.loaded_size() > 0


def test_auto_on_the_cpu_caps_nothing_and_says_why(tiny, kind):
    out, plan = budget.apply_vram_budget(tiny, 0)
    assert plan.budget_bytes is None
    sample(out, kind)
    res = budget.residency(out)
    assert not res.cap_applied and "CPU" in res.reason and res.resident_bytes == out.model_size()


@pytest.mark.parametrize(("value", "error", "message"), [
    (-1, ValueError, "budget_bytes must be None or 0"), (1.5, TypeError, "whole number of bytes"),
    (True, TypeError, "whole number of bytes"), (2**60, ValueError, "more memory than any device"),
])
def test_bad_budget_is_refused(tiny, value, error, message):
    with pytest.raises(error, match=message):
        budget.apply_vram_budget(tiny, value)


def test_not_a_model_is_refused():
    with pytest.raises(TypeError, match="model must be a ComfyUI MODEL"):
        budget.apply_vram_budget(object(), 1)


def test_residency_of_a_model_not_loaded_yet(tiny):
    out, _ = budget.apply_vram_budget(tiny, 1 * MiB)
    res = budget.residency(out)
    assert not res.loaded and not res.cap_applied and res.requested_bytes == MiB
    assert "not loaded yet" in res.describe()


# ---------------------------------------------------------------------------------------------------------
# The real thing (GPU check)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_budget_holds_on_the_gpu_and_output_is_unchanged(tmp_path):
    """Under the memory manager the GPU check chose (VRAMKIT_TEST_MEMORY_MANAGER): a ~250 MiB Flux-shaped model
    (the tiny width, 120 double and 240 single blocks; detected alike by every supported ComfyUI) loaded from a
    file, a 128 MiB budget: ComfyUI's loaded_size() stays within it (+ one 32 MiB page under Dynamic VRAM), the
    budget API reports the same, and the output equals the plain run."""
    import comfy.model_management as mm
    import comfy.sd
    import helpers
    import safetensors.torch
    import tiny_models

    sd = _deep_flux(double=120, single=240)
    path = tmp_path / "flux-deep.safetensors"
    safetensors.torch.save_file(sd, str(path))
    tiny_models.register("flux", sd)
    model = comfy.sd.load_diffusion_model(str(path))
    wanted = os.environ.get("VRAMKIT_TEST_MEMORY_MANAGER")
    if wanted:
        assert compat.memory_manager(model) == wanted
    ref = helpers.sample(model, "flux", size=32)
    mm.unload_all_models()
    limit = 128 * MiB
    assert model.model_size() > 1.5 * limit
    out, plan = budget.apply_vram_budget(model, limit)
    assert plan.applied and not plan.fell_back, plan.reason
    got = helpers.sample(out, "flux", size=32)
    res = budget.residency(out)
    page = compat.AIMDO_PAGE_BYTES if res.manager == "dynamic" else 0
    assert res.cap_applied, res.reason
    assert 0 < out.loaded_size() <= limit + page, res.describe()
    assert res.resident_bytes == out.loaded_size() and res.streamed_bytes > 0
    assert torch.equal(got, ref)
    mm.unload_all_models()


def _deep_flux(double: int, single: int) -> dict[str, torch.Tensor]:
    """A bf16 state dict of the tiny Flux's width with `double` + `single` blocks (fan-in scaled weights)."""
    import dataclasses
    import math

    import comfy.ldm.flux.model as flux
    import comfy.ops
    import tiny_models

    params = dict(tiny_models.FLUX_PARAMS, depth=double, depth_single_blocks=single)
    accepted = {f.name for f in dataclasses.fields(flux.FluxParams)}
    with torch.device("meta"):
        net = flux.Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="meta",
                        **{k: v for k, v in params.items() if k in accepted})
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, p in net.state_dict().items():
        std = 1.0 / math.sqrt(math.prod(p.shape[1:])) if p.dim() >= 2 else 0.1
        out[name] = (torch.randn(p.shape, generator=g) * std).to(torch.bfloat16)
    return out
