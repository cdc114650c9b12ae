"""VRAMKitPrecision inside ComfyUI: storage and compute dtypes per model, bf16 refused where unsupported."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from helpers import rel, sample

from vramkit.comfy import dtypes, precision
from vramkit.comfy.nodes import VRAMKitPrecision


def set_precision(model, weight_dtype, compute_dtype="default"):
    out, summary = VRAMKitPrecision().run(model, weight_dtype, compute_dtype)["result"]
    return out, summary


@pytest.mark.parametrize(("storage", "tolerance"), [("fp16", 2e-3), ("bf16", 2e-2)])
def test_storage_dtype_halves_the_weights(tiny, kind, storage, tolerance):
    before = sample(tiny, kind)
    stored, summary = set_precision(tiny, storage)
    assert stored is not tiny and stored.model is tiny.model
    patched = {k: p for k, p in stored.object_patches.items() if isinstance(p, torch.nn.Module)}
    assert patched and all(p.weight.dtype == dtypes.FLOATS[storage] for p in patched.values())
    old = sum(sum(t.nbytes for t in tiny.get_model_object(k).parameters()) for k in patched)
    new = sum(sum(t.nbytes for t in p.parameters()) for p in patched.values())
    assert new * 2 == old
    assert stored.model_size() == tiny.model_size() - old + new <= 0.51 * tiny.model_size()
    out = sample(stored, kind)
    assert torch.equal(sample(tiny, kind), before)
    assert 0 < rel(out, before) < tolerance
    assert storage in summary


def test_compute_dtype_only(tiny, kind):
    before = sample(tiny, kind)
    fp16, summary = set_precision(tiny, "default", "fp16")
    assert not fp16.object_patches.keys() - {"manual_cast_dtype"}
    assert fp16.get_model_object("manual_cast_dtype") == torch.float16
    assert fp16.model_size() == tiny.model_size()
    assert rel(sample(fp16, kind), before) < 5e-3
    assert torch.equal(sample(tiny, kind), before)
    assert "computing in float16" in summary


def test_default_default_is_a_plain_clone(tiny, kind):
    same, summary = set_precision(tiny, "default", "default")
    assert same is not tiny and not same.object_patches
    assert torch.equal(sample(same, kind), sample(tiny, kind))
    assert "nothing to change" in summary


def test_bf16_compute_refused_where_the_device_cannot(tiny, monkeypatch):
    monkeypatch.setattr(precision, "bf16_problem", lambda device: "the GPU cuda:0 has compute capability 7.5")
    for args in (("default", "bf16"), ("bf16", "bf16"), ("fp16", "bf16")):
        with pytest.raises(ValueError, match=r"compute_dtype = bf16 refused: the GPU cuda:0 has compute "
                                             r"capability 7\.5\. Compute in fp16 .* storing the weights as bf16"):
            set_precision(tiny, *args)


@pytest.mark.parametrize("compute", ["default", "fp16", "fp32"])
def test_bf16_storage_allowed_where_only_bf16_compute_is_missing(tiny, kind, monkeypatch, compute):
    """Pre-Ampere GPUs cannot compute in bf16 but can hold bf16 weights and cast them as layers run."""
    monkeypatch.setattr(precision, "bf16_problem", lambda device: "the GPU cuda:0 has compute capability 7.5")
    stored, summary = set_precision(tiny, "bf16", compute)
    patched = [p for p in stored.object_patches.values() if isinstance(p, torch.nn.Module)]
    assert patched and all(p.weight.dtype == torch.bfloat16 for p in patched)
    assert stored.get_model_object("manual_cast_dtype") != torch.bfloat16
    assert sample(stored, kind).isfinite().all()
    assert "stored" in summary and "bf16" in summary


def test_bf16_storage_refused_where_the_device_cannot_hold_it(tiny, monkeypatch):
    monkeypatch.setattr(precision, "bf16_storage_problem", lambda device: "mps cannot hold bf16 tensors (old OS)")
    with pytest.raises(ValueError, match=r"weight_dtype = bf16 refused: mps cannot hold bf16 tensors \(old OS\)"):
        set_precision(tiny, "bf16", "fp16")


def test_overflow_check_builds_no_graph_on_trainable_weights(kind):
    """Parameters that require grad (a model built outside inference mode): no autograd graph, no warning."""
    import warnings

    with torch.inference_mode(False):
        model = tiny_models.load(kind, seed=6)
        for p in model.model.diffusion_model.parameters():
            p.requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stored, _ = set_precision(model, "fp16")
    assert any(isinstance(p, torch.nn.Module) for p in stored.object_patches.values())


def test_fp16_overflow_is_refused(kind):
    model = tiny_models.load(kind, seed=5)
    name, weight = next((n, p) for n, p in model.model.diffusion_model.named_parameters() if p.dim() == 2)
    weight[0, 0] = 1e6  # a private copy of the tiny model: nobody else shares it
    with pytest.raises(ValueError, match=f"fp16 would overflow: {name.removesuffix('.weight')}"):
        set_precision(model, "fp16")


def test_unknown_dtype_is_refused(tiny):
    with pytest.raises(ValueError, match="weight_dtype 'fp8' is not one of"):
        set_precision(tiny, "fp8")
