"""VRAMKitAttention inside ComfyUI: per-model attention modes, chained with other packs' overrides."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import rel, sample

from vramkit.comfy import compat, patch
from vramkit.comfy.attention_override import is_vramkit_override
from vramkit.comfy.nodes import VRAMKitAttention

COMFY_MODES = ["sdpa", "sub_quad", "split"]


def attend(model, mode, budget_mb=0):
    result = VRAMKitAttention().run(model, mode, budget_mb)
    (out,) = result["result"]
    assert mode in result["ui"]["text"][0]  # the node says which attention runs
    return out


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
