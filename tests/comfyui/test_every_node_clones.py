"""Every MODEL-returning VRAMKit node returns a clone and leaves its input model bit-identical."""

from __future__ import annotations

import pytest
import torch
from helpers import sample

from vramkit.comfy import nodes

CALLS = {
    "VRAMKitQuantize": ("int8", "group", 64, "*norm*, *emb*, <first>, <last>", "default"),
    "VRAMKitAttention": ("sub_quad", 0),
    "VRAMKitOffload": (0.001,),
    "VRAMKitPrecision": ("fp16", "default"),
    "VRAMKitMeasure": ("",),
    "VRAMKitAutoOptimize": (64, 64, 1, 1, 0.0, "auto", True),
}


#: MODEL-returning nodes that take no model (loaders).
LOADERS = {"VRAMKitLoadQuantized"}


def test_calls_cover_every_model_node():
    model_nodes = {name for name, cls in nodes.NODE_CLASS_MAPPINGS.items() if "MODEL" in cls.RETURN_TYPES}
    assert model_nodes == set(CALLS) | LOADERS


@pytest.mark.parametrize("node_id", sorted(CALLS))
def test_node_returns_a_clone_and_input_stays_identical(tiny, kind, node_id):
    before = sample(tiny, kind)
    snapshot = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    options = repr(tiny.model_options)
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    result = getattr(cls(), cls.FUNCTION)(tiny, *CALLS[node_id])
    out = (result["result"] if isinstance(result, dict) else result)[0]
    assert out is not tiny and out.model is tiny.model, "not a clone of the input"
    sample(out, kind)
    assert torch.equal(sample(tiny, kind), before)
    assert repr(tiny.model_options) == options and not tiny.object_patches
    state = tiny.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items()), "shared weights were modified"


def _sibling_with_lora(model):
    """A clone of `model` whose patches shift every diffusion-model weight and bias by 0.5 (a "diff" LoRA)."""
    sibling = model.clone()
    state = sibling.model.state_dict()
    sibling.add_patches({k: ("diff", (torch.full_like(v, 0.5),)) for k, v in state.items()
                         if k.startswith("diffusion_model.") and v.is_floating_point()})
    return sibling


@pytest.mark.parametrize("input_kind", ["plain", "precision-patched"])
@pytest.mark.parametrize("node_id", sorted(CALLS))
def test_node_ignores_what_a_loaded_lora_sibling_merged(tiny, kind, node_id, input_kind):
    """While a LoRA'd clone is loaded, ComfyUI has merged its weight and bias patches into the shared modules
    (or into this input's own object patches, which the sibling inherits); a node running then must build
    its copies from the unpatched tensors, or the LoRA leaks into its clone for good."""
    import comfy.model_management as mm

    model = tiny
    if input_kind == "precision-patched":  # the input's layers are object patches themselves
        model = nodes.VRAMKitPrecision().run(tiny, "bf16", "default")["result"][0]
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]

    def run_node():
        result = getattr(cls(), cls.FUNCTION)(model, *CALLS[node_id])
        return (result["result"] if isinstance(result, dict) else result)[0]

    reference = sample(run_node(), kind)  # nothing else loaded
    mm.unload_all_models()
    snapshot = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    sibling = _sibling_with_lora(model)
    mm.load_models_gpu([sibling])
    merged = sibling.model.state_dict()
    assert any(not torch.equal(merged[k], v) for k, v in snapshot.items() if k.endswith(".bias")), \
        "the sibling's bias patches were not merged; the test would prove nothing"
    out = run_node()
    mm.unload_all_models()
    state = tiny.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items()), "unloading did not restore the model"
    for name, patched in out.object_patches.items():
        if isinstance(patched, torch.nn.Module) and name not in model.object_patches:
            for pname, param in patched.named_parameters(recurse=False):
                live = model.get_model_object(name)._parameters[pname]
                if pname == "bias" and live.dtype == param.dtype:
                    assert torch.equal(param, live), f"{name}.{pname} kept the sibling's LoRA"
    assert torch.equal(sample(out, kind), reference), "the sibling's LoRA leaked into the node's clone"


@pytest.mark.parametrize("node_id", sorted(CALLS))
def test_node_after_a_loaded_lora_reloads_cleanly(tiny, kind, node_id):
    """A LoRA'd model has sampled (its patches stay merged into the shared modules), then the node runs on it
    and its clone samples. ComfyUI swaps object patches without re-patching weights when the clone keeps the
    LoRA clone's ``patches_uuid``: a node that swaps weight-holding modules must give its clone a new one,
    or its layers run without the LoRA and unloading writes the backups into them, leaving the LoRA merged
    into the shared model for good."""
    import comfy.model_management as mm
    from helpers import apply_lora, lora_state_dict

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]

    def run_node(model):
        result = getattr(cls(), cls.FUNCTION)(model, *CALLS[node_id])
        return (result["result"] if isinstance(result, dict) else result)[0]

    base_out = sample(tiny, kind)
    snapshot = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with_lora = apply_lora(tiny, lora_state_dict(tiny))
    fresh = sample(run_node(with_lora), kind)  # loaded after the plain model: a full load
    mm.unload_all_models()
    sample(with_lora, kind)
    after_lora = sample(run_node(with_lora), kind)
    mm.unload_all_models()
    state = tiny.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items()), "the LoRA stayed merged into the model"
    assert torch.equal(sample(tiny, kind), base_out)
    assert torch.equal(after_lora, fresh), "the clone ran differently after the LoRA'd model was loaded"
