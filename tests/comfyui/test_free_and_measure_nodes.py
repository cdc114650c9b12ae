"""VRAMKitFreeAfter, VRAMKitMeasure and VRAMKitReport inside ComfyUI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import STEPS, sample

from vramkit.comfy import compat, measure
from vramkit.comfy.nodes import VRAMKitFreeAfter, VRAMKitMeasure, VRAMKitReport


def test_free_after_unloads_and_passes_through(tiny):
    mm = compat.model_management()
    mm.load_models_gpu([tiny])
    assert any(lm.model is tiny for lm in mm.current_loaded_models)
    conditioning = [[torch.zeros(1, 2, 3), {}]]
    result = VRAMKitFreeAfter().run(conditioning, vae=SimpleNamespace(patcher=tiny))
    assert result["result"][0] is conditioning
    assert not any(lm.model is tiny for lm in mm.current_loaded_models)
    text = result["ui"]["text"][0]
    assert "vae" in text and ("no VRAM was freed" in text or "MB of VRAM freed" in text)


def test_free_after_also_frees_loaded_clones(tiny):
    mm = compat.model_management()
    clone = tiny.clone()
    mm.load_models_gpu([clone])
    VRAMKitFreeAfter().run("x", clip=SimpleNamespace(patcher=tiny))
    assert not any(lm.model is clone for lm in mm.current_loaded_models)


def test_free_after_reports_what_was_not_loaded(tiny):
    text = VRAMKitFreeAfter().run(1, clip=SimpleNamespace(patcher=tiny))["ui"]["text"][0]
    assert "was not loaded" in text
    assert "Nothing to free" in VRAMKitFreeAfter().run(1)["ui"]["text"][0]


def test_free_after_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="clip must be a ComfyUI CLIP or VAE"):
        VRAMKitFreeAfter().run(1, clip="clip_l.safetensors")


def test_measure_records_a_run_and_report_finds_it(tiny, kind):
    before = sample(tiny, kind)
    (measured,) = VRAMKitMeasure().run(tiny, "int8 test")
    assert measured is not tiny and not tiny.get_wrappers(compat.wrappers_mp().OUTER_SAMPLE, "vramkit.measure")
    out = sample(measured, kind)
    assert torch.equal(out, before), "measuring must not change the numbers"
    assert torch.equal(sample(tiny, kind), before)
    report = VRAMKitReport().run({"samples": out})
    assert report["result"][0]["samples"] is out
    numbers = report["ui"]["vramkit_measurement"][0]
    assert numbers["steps"] == STEPS and len(numbers["step_seconds"]) == STEPS
    assert all(s > 0 for s in numbers["step_seconds"])
    assert numbers["peak_bytes"] >= numbers["start_bytes"] > 0
    assert numbers["model_bytes"] == tiny.model_size()
    assert numbers["total_seconds"] >= sum(numbers["step_seconds"])
    text = report["ui"]["text"][0]
    kind_of_peak = "allocated VRAM" if torch.cuda.is_available() else "process RAM"
    assert text.startswith(f"int8 test: peak {kind_of_peak}") and "s/step" in text


def test_report_without_measurement_says_how_to_get_one(kind, tiny):
    text = VRAMKitReport().run({"samples": sample(tiny, kind, seed=123)})["ui"]["text"][0]
    assert "No measurement matches this latent" in text


def test_report_refuses_what_is_not_a_latent():
    with pytest.raises(TypeError, match="samples must be a LATENT"):
        measure.report(torch.zeros(1))
