"""Every MODEL-returning VRAMKit node returns a clone and leaves its input model bit-identical."""

from __future__ import annotations

import pytest
import torch
from helpers import sample

from vramkit.comfy import nodes

CALLS = {
    "VRAMKitQuantize": ("int8", "group", 64, "*norm*, *emb*, <first>, <last>", "default"),
    "VRAMKitAttention": ("sub_quad", 0),
    "VRAMKitOffload": (0.001, "comfy"),
    "VRAMKitPrecision": ("fp16", "default"),
    "VRAMKitMeasure": ("",),
}


def test_calls_cover_every_model_node():
    model_nodes = {name for name, cls in nodes.NODE_CLASS_MAPPINGS.items() if "MODEL" in cls.RETURN_TYPES}
    assert model_nodes == set(CALLS)


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
