"""VRAMKitAttention inside ComfyUI: per-model attention modes, chained with other packs' overrides, the
summary, the fallback of a missing backend, free memory once per step, and auto keeping ComfyUI's backend."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from helpers import rel, sample

import vramkit._log
import vramkit.attention.planner
from vramkit.comfy import attention_modes, compat, patch
from vramkit.comfy.attention_override import is_vramkit_override
from vramkit.comfy.nodes import VRAMKitAttention

COMFY_MODES = ["sdpa", "sub_quad", "split"]


def run_node(model, mode, budget_mb=0):
    """The node's return value: {"ui": {"text": [summary]}, "result": (model, summary)}."""
    return VRAMKitAttention().run(model, mode, budget_mb)


def attend(model, mode, budget_mb=0):
    return run_node(model, mode, budget_mb)["result"][0]


class RecordingOverride:
    """Stands in for another pack's override: counts calls, remembers the backend it was handed."""

    def __init__(self):
        self.calls = 0
        self.backends = set()

    def __deepcopy__(self, memo):
        return self  # ComfyUI 0.3.7x deep-copies model_options on clone; keep one recorder

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        self.backends.add(func)
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", COMFY_MODES)
def test_comfy_modes_match_sdpa_and_leave_input_untouched(tiny, kind, mode):
    before = sample(tiny, kind)
    reference = sample(attend(tiny, "sdpa"), kind)
    patched = attend(tiny, mode)
    assert patched is not tiny and patched.model is tiny.model
    assert is_vramkit_override(patch.attention_override(patched))
    assert patch.attention_override(tiny) is None
    out = sample(patched, kind)
    assert torch.equal(sample(tiny, kind), before)
    assert rel(out, reference) < 1e-5


def test_override_is_used_by_the_model(tiny, kind):
    recorder = RecordingOverride()
    other = tiny.clone()
    patch.set_attention_override(other, recorder)
    patched = attend(other, "split")
    sample(patched, kind)
    assert recorder.calls > 0, "the earlier override was dropped instead of chained"
    assert recorder.backends == {compat.attention_function("split")}
    again = attend(patched, "sub_quad")  # re-running the node replaces VRAMKit's override, keeps the other
    override = patch.attention_override(again)
    assert override.vramkit_previous is recorder and override.vramkit_mode == "sub_quad"
    recorder.backends.clear()
    sample(again, kind)
    assert recorder.backends == {compat.attention_function("sub_quad")}


def test_unknown_mode_is_refused(tiny):
    with pytest.raises(ValueError, match="attention mode 'flashy' is not one of"):
        attend(tiny, "flashy")


def test_vramkit_modes_without_vramkit_attention_fail_clearly(tiny, monkeypatch):
    real_import = importlib.import_module

    def no_attention(name, *args, **kwargs):
        if name == "vramkit.attention":
            raise ImportError("No module named 'vramkit.attention'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_attention)
    with pytest.raises(ValueError, match=r"need vramkit\.attention"):
        attend(tiny, "chunked")


@pytest.mark.parametrize("mode", ["chunked", "sliced", "auto"])
def test_vramkit_modes_match_default_within_1e_5(tiny, kind, mode):
    pytest.importorskip("vramkit.attention", reason="vramkit.attention has not landed in this checkout")
    reference = sample(attend(tiny, "sdpa"), kind)
    out = sample(attend(tiny, mode, budget_mb=1), kind)
    assert out.dtype == torch.float32
    assert rel(out, reference) < 1e-5


def test_node_returns_its_summary_after_the_model(tiny):
    assert VRAMKitAttention.RETURN_TYPES == ("MODEL", "STRING")  # MODEL first: saved links stay valid
    assert VRAMKitAttention.RETURN_NAMES == ("model", "summary")
    ret = run_node(tiny, "chunked", 256)
    model, text = ret["result"]
    assert ret["ui"] == {"text": [text]}
    assert model is not tiny and is_vramkit_override(patch.attention_override(model))
    assert text.startswith("Attention: VRAMKit chunked") and "256 MB" in text
    assert "ComfyUI's split backend" in run_node(tiny, "split")["result"][1]
    auto = run_node(tiny, "auto")["result"][1]
    assert auto.startswith("Attention auto on cpu: ")  # the tests run ComfyUI on the CPU
    assert "free memory (read once per sampling step)" in auto


def test_auto_summary_names_the_launch_backend_on_a_gpu_model(tiny, monkeypatch):
    """For a model whose load device is a GPU, the summary says ComfyUI's launch backend runs."""
    monkeypatch.setattr(compat, "load_device", lambda patcher: torch.device("cuda", 0))
    fake = compat.attention_function("pytorch")
    real = compat.attention_function
    monkeypatch.setattr(compat, "attention_function", lambda name: fake if name == "optimized" else real(name))
    text = run_node(tiny, "auto", 512)["result"][1]
    assert text.startswith("Attention auto on cuda: ComfyUI's pytorch (the backend it was started with) runs")
    assert "memory budget of 512 MB" in text


def test_every_machine_offers_the_same_modes(monkeypatch):
    spec = VRAMKitAttention.INPUT_TYPES()["required"]["mode"][0]
    assert spec == list(attention_modes.NODE_MODES)
    assert {"sage", "flash", "xformers"} <= set(spec)
    monkeypatch.setattr(compat, "attention_function", lambda name: (lambda *a, **k: None))  # all installed
    assert VRAMKitAttention.INPUT_TYPES()["required"]["mode"][0] == spec


@pytest.mark.parametrize("mode", ["sage", "flash", "xformers"])
def test_a_missing_backend_falls_back_to_auto_with_a_warning(tiny, kind, mode, monkeypatch, caplog):
    real = compat.attention_function
    monkeypatch.setattr(compat, "attention_function",
                        lambda name: None if name == attention_modes.COMFY_BACKENDS[mode] else real(name))
    monkeypatch.setattr(vramkit._log, "_warned", set())
    with caplog.at_level(logging.INFO, logger="vramkit"):
        model, text = run_node(tiny, mode)["result"]
        again = run_node(tiny, mode)["result"][1]
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "not available" in r.getMessage()]
    assert len(warnings) == 1, warnings  # logged once, not once per run
    assert f"attention mode '{mode}' is not available" in warnings[0] and "using auto instead" in warnings[0]
    assert text.startswith(f"Attention mode '{mode}' is not available") and "using auto instead" in text
    assert again == text  # the summary says it every time
    override = patch.attention_override(model)
    assert override.vramkit_mode == "auto"
    reference = sample(attend(tiny, "sdpa"), kind)
    assert rel(sample(model, kind), reference) < 1e-5


@pytest.mark.parametrize("mode", ["auto", "chunked"])
def test_free_memory_is_read_once_per_sampling_step(tiny, kind, mode, monkeypatch):
    reads = []

    def reader(device):
        reads.append(str(device))
        return 16 << 30

    monkeypatch.setattr(vramkit.attention.planner, "available_bytes", reader)
    recorder = RecordingOverride()  # counts the attention calls (it chains in front of ours)
    other = tiny.clone()
    patch.set_attention_override(other, recorder)
    model = attend(other, mode)
    steps = 3
    sample(model, kind, steps=steps)
    assert recorder.calls >= 2 * steps, "too few attention calls to tell per-step from per-call"
    assert reads == ["cpu"] * steps
    # Outside a sampler (no step), the override reads at each call, as documented.
    reads.clear()
    again = attend(tiny, "sdpa")  # a ComfyUI backend: no budget, no reads, no step wrapper
    assert not again.get_wrappers(compat.wrappers_mp().PREDICT_NOISE, patch.key(attention_modes.STEP_WRAPPER))
    sample(again, kind, steps=steps)
    assert reads == []


def test_the_nodes_auto_keeps_comfyuis_backend_for_gpu_calls(tiny):
    """The override the node installs, called as ComfyUI's attention calls it, on tensors of a non-CPU device
    (meta: shapes only, like CUDA without a GPU): the call goes to the backend ComfyUI hands it, unchanged;
    with a budget too small for that backend, VRAMKit's chunked attention runs instead."""
    pytorch = compat.attention_function("pytorch")
    handed = []

    def backend(*args, **kwargs):
        handed.append((args, kwargs))
        return pytorch(*args, **kwargs)

    backend.__name__ = "attention_pytorch"
    q, k, v = (torch.empty(2, 1024, 8 * 64, device="meta", dtype=torch.float16) for _ in range(3))
    keep = patch.attention_override(attend(tiny, "auto"))
    out = keep(backend, q, k, v, 8, transformer_options={})
    assert len(handed) == 1 and handed[0][0][:4] == (q, k, v, 8) and out.shape == q.shape
    assert handed[0][1]["transformer_options"] == {}
    handed.clear()
    tight = patch.attention_override(attend(tiny, "auto", budget_mb=1))  # 1 MB: SDPA's 4+ MB does not fit
    out = tight(backend, q, k, v, 8, transformer_options={})
    assert handed == [] and out.shape == q.shape and out.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_auto_keeps_the_backend_comfyui_was_started_with(tiny, kind):
    """Real sampling on the GPU: every attention call of the auto override goes to ComfyUI's backend."""
    model = attend(tiny, "auto")
    ours = patch.attention_override(model)
    calls = {"all": 0, "backend": 0}

    def recording(func, *args, **kwargs):
        def backend(*a, **k):
            calls["backend"] += 1
            return func(*a, **k)

        calls["all"] += 1
        return ours(backend, *args, **kwargs)

    spied = model.clone()
    patch.set_attention_override(spied, recording)
    out = sample(spied, kind)
    assert calls["all"] > 0 and calls["backend"] == calls["all"]
    assert rel(out, sample(attend(tiny, "sdpa"), kind)) < 1e-2
    assert "ComfyUI's" in run_node(tiny, "auto")["result"][1]
