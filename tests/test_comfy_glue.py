"""VRAMKit's ComfyUI glue that needs no ComfyUI: node declarations, bf16 capability, the offload budget
clamp, measurements (ComfyUI's objects replaced by small stand-ins where needed)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

import vramkit.comfy
from vramkit.comfy import attention_modes, measure, nodes, precision
from vramkit.comfy import budget as streaming

NODE_IDS = ["VRAMKitQuantize", "VRAMKitAttention", "VRAMKitOffload", "VRAMKitPrecision", "VRAMKitFreeAfter",
            "VRAMKitMeasure", "VRAMKitReport", "VRAMKitAutoOptimize", "VRAMKitLoadQuantized",
            "VRAMKitSaveQuantized"]


def test_node_declarations():
    assert list(vramkit.comfy.NODE_CLASS_MAPPINGS) == NODE_IDS
    assert set(vramkit.comfy.NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_IDS)
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "VRAMKit", node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert len(cls.DESCRIPTION) > 40, node_id
        spec = cls.INPUT_TYPES()  # must work without ComfyUI too (documentation, registries)
        assert spec["required"], node_id
        if hasattr(cls, "RETURN_NAMES"):
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), node_id
    quantize = nodes.VRAMKitQuantize.INPUT_TYPES()["required"]
    assert quantize["format"][1]["default"] == "int8" and quantize["granularity"][1]["default"] == "group"
    assert quantize["group_size"][1]["default"] == 64
    assert nodes.VRAMKitReport.OUTPUT_NODE is True
    mode = nodes.VRAMKitAttention.INPUT_TYPES()["required"]["mode"]
    assert mode[1]["default"] in mode[0]
    assert mode[1]["default"] == ("auto" if attention_modes.vramkit_modes_available() else "sdpa")


def test_quantize_node_keeps_old_workflows_loading():
    """New inputs are optional with defaults: a workflow saved with the six original inputs still validates
    and runs as before (weight-only dequantize, no rotation)."""
    spec = nodes.VRAMKitQuantize.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "format", "granularity", "group_size", "skip_patterns",
                                      "compute_dtype"]
    optional = spec["optional"]
    assert optional["compute"][0] == ["dequantize", "int8 matmul"]
    assert optional["compute"][1]["default"] == "dequantize"
    assert optional["rotation"][0] == ["none", "convrot"] and optional["rotation"][1]["default"] == "none"
    defaults = inspect.signature(nodes.VRAMKitQuantize.run).parameters
    assert defaults["compute"].default == "dequantize" and defaults["rotation"].default == "none"


def test_wildcard_type_matches_everything():
    ne = nodes.ANY.__ne__  # ComfyUI's validation asks `received != expected`
    assert ne("CONDITIONING") is False and ne("MODEL") is False
    assert nodes.ANY == "*"


def test_bf16_capability():
    cpu = torch.device("cpu")
    assert precision.bf16_problem(cpu) is None
    gpu = torch.device("cuda", 0)
    turing = precision.bf16_problem(gpu, capability=lambda d: (7, 5))
    assert turing is not None and "7.5" in turing and "8.0" in turing
    assert precision.bf16_problem(gpu, capability=lambda d: (8, 6)) is None
    assert precision.bf16_storage_problem(cpu) is None  # storage needs no bf16 arithmetic
    assert precision.bf16_storage_problem(torch.device("meta")) is not None  # a device that cannot run the probe


def test_precision_node_says_where_bf16_works():
    spec = nodes.VRAMKitPrecision.INPUT_TYPES()["required"]
    assert "any GPU" in spec["weight_dtype"][1]["tooltip"] and "Ampere" in spec["compute_dtype"][1]["tooltip"]
    assert "bf16 weights work on any GPU" in nodes.VRAMKitPrecision.DESCRIPTION


class StubPatcher:
    """The parts of a ModelPatcher the offload wrapper touches."""

    def __init__(self, dynamic=False, device="cuda:0", size=1000, loaded=0):
        self.dynamic, self.load_device, self.size, self.loaded = dynamic, torch.device(device), size, loaded
        self.loads: list[float] = []

    def is_dynamic(self):
        return self.dynamic

    def model_size(self):
        return self.size

    def loaded_size(self):
        return self.loaded

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        self.loads.append(extra_memory)
        self.loaded = max(0, int(min(self.size, self.loaded + extra_memory)))
        return extra_memory


def test_clamp_caps_growth_and_trims_overshoot():
    patcher = StubPatcher(loaded=100)
    with streaming.clamp_resident(patcher, 400):
        patcher.partially_load("cuda:0", 1e32)  # what ComfyUI asks for when everything fits
        assert patcher.loaded == 400
        patcher.loaded = 700  # e.g. loaded fully by an earlier run
        patcher.partially_load("cuda:0", 1e32)
    assert patcher.loads == [300, -300]
    assert "partially_load" not in vars(patcher), "the clamp must not outlive the load"


def test_clamp_puts_back_another_packs_instance_attribute():
    patcher = StubPatcher(loaded=100)
    calls = []

    def other_pack(device_to, extra_memory=0, force_patch_weights=False):
        calls.append(extra_memory)
        return StubPatcher.partially_load(patcher, device_to, extra_memory, force_patch_weights)

    patcher.partially_load = other_pack
    with streaming.clamp_resident(patcher, 400):
        patcher.partially_load("cuda:0", 1e32)
    assert calls == [300], "the clamp must call through the other pack's wrapper"
    assert vars(patcher)["partially_load"] is other_pack, "the other pack's wrapper must be put back"
    with pytest.raises(RuntimeError), streaming.clamp_resident(patcher, 400):
        raise RuntimeError("load failed")
    assert vars(patcher)["partially_load"] is other_pack


def test_clamp_resolves_a_lazy_budget_when_the_loader_asks():
    """The auto budget is a function the clamp calls inside ComfyUI's load (after its evictions), not before."""
    patcher = StubPatcher(loaded=0)
    asked: list[int] = []

    def budget() -> int:
        asked.append(patcher.loaded)
        return 300

    with streaming.clamp_resident(patcher, budget):
        assert asked == [], "nothing may be decided before the loader asks"
        patcher.partially_load("cuda:0", 1e32)
    assert asked == [0] and patcher.loaded == 300


def test_clamp_with_no_budget_leaves_the_load_alone():
    patcher = StubPatcher(loaded=0)
    with streaming.clamp_resident(patcher, lambda: None):
        patcher.partially_load("cuda:0", 1e32)
    assert patcher.loads == [1e32] and patcher.loaded == patcher.size


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, None), (1, 1), (5 * 2**30, 5 * 2**30)])
def test_check_budget(value, expected):
    assert streaming.check_budget(value) == expected


@pytest.mark.parametrize(("value", "error", "message"), [
    (-1, ValueError, "budget_bytes must be None or 0 \\(auto\\) or a positive"),
    (2.5, TypeError, "budget_bytes must be a whole number of bytes"),
    (False, TypeError, "whole number of bytes"), ("1", TypeError, "got str"),
    (5000 * 2**30, ValueError, "more memory than any device has"),
])
def test_check_budget_refuses_nonsense(value, error, message):
    with pytest.raises(error, match=message):
        streaming.check_budget(value)


@pytest.mark.parametrize(("budget", "forced", "pages"), [
    (0, 0, 0), (32 * 2**20 - 1, 0, 0), (32 * 2**20, 0, 1), (100 * 2**20, 4 * 2**20, 3), (2**20, 2 * 2**20, 0),
])
def test_watermark_is_whole_pages_under_the_budget(budget, forced, pages):
    from vramkit.comfy import offload_plan

    assert offload_plan.watermark_for(budget, forced) == pages * 32 * 2**20


@pytest.mark.parametrize(("gb", "expected"), [(0, None), (0.5, 2**29), (2, 2 * 2**30)])
def test_budget_from_gb(gb, expected):
    assert streaming.budget_from_gb(gb) == expected


def test_budget_from_gb_refuses_nonsense():
    with pytest.raises(TypeError, match="vram_budget_gb must be a number"):
        streaming.budget_from_gb("6")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0 \\(auto\\) or a positive"):
        streaming.budget_from_gb(-0.5)


def test_peak_probe_sees_a_temporary_allocation():
    probe = measure.PeakProbe(torch.device("cpu"))
    probe.start()
    block = bytearray(256 * 2**20)
    block[:: 4096] = b"\x01" * len(block[:: 4096])  # touch every page so it is resident
    del block
    peak = probe.stop()
    assert peak - probe.start_bytes >= 200 * 2**20


def test_measurements_are_found_by_the_latent_they_produced():
    latent = torch.randn(1, 4, 8, 8)
    record = measure.Measurement("run", "cpu", "process RAM", 3 * 2**20, 2**20, 2, [0.5, 0.25], 1.0, 2.0,
                                 4 * 2**20, 4 * 2**20, tuple(latent.shape), measure.fingerprint(latent))
    measure.RECENT.append(record)
    assert measure.find(latent.clone()) is record
    assert measure.find(latent + 1e-3) is None and measure.find(torch.randn(1, 4, 8, 9)) is None
    text, numbers = measure.report({"samples": latent})
    assert text == record.summary() and numbers is not None and numbers["seconds_per_step"] == 0.375
    assert "peak process RAM 3.0 MB on cpu" in text and "2 steps" in text


def test_free_after_refuses_a_string():
    from vramkit.comfy import offload_encoders as unload

    with pytest.raises(TypeError, match="vae must be a ComfyUI CLIP or VAE"):
        unload.patcher_of("ae.safetensors", "vae")
    assert unload.patcher_of(SimpleNamespace(patcher=SimpleNamespace(is_clone=len, model=1)), "clip").model == 1


def test_offload_planner_binding():
    from vramkit import _core

    plan = _core.plan_offload([100, 400, 200, 300], [100, 400, 200, 300], [True] * 4, 1000, 1000, 0, "next_layers")
    assert plan["resident"] == [False, True, True, False]
    assert (plan["resident_bytes"], plan["streamed_bytes"], plan["buffer_bytes"]) == (600, 400, 300)
    assert _core.plan_offload([5], [5], [True], 6, 5, 2, "multiply")["full_load"] is True
    with pytest.raises(ValueError, match="equally long"):
        _core.plan_offload([1, 2], [1], [True, True], 10, 3, 0, "multiply")
    with pytest.raises(ValueError, match="unknown buffer rule"):
        _core.plan_offload([1], [1], [True], 10, 1, 0, "lifo")
    with pytest.raises(ValueError, match="bytes must be a list of non-negative ints"):
        _core.plan_offload([-1], [1], [True], 10, 1, 0, "multiply")
    with pytest.raises(ValueError, match="budget must be a non-negative int"):
        _core.plan_offload([1], [1], [True], -10, 1, 0, "multiply")
    with pytest.raises(ValueError, match="cast_bytes 1 is smaller"):
        _core.plan_offload([2], [1], [True], 10, 2, 0, "multiply")


class TreePatcher:
    """The parts of a ModelPatcher `patch.pristine_tensors` reads: the shared tree, object patches, backups."""

    def __init__(self, model, object_patches=None, backup=None, hook_backup=None, backup_buffers=None):
        self.model, self.object_patches = model, object_patches or {}
        self.backup, self.hook_backup, self.backup_buffers = backup or {}, hook_backup or {}, backup_buffers or {}

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj


def _tree():
    root = torch.nn.Module()
    root.layer = torch.nn.Linear(4, 3)
    root.layer.register_buffer("stat", torch.zeros(3))
    return root


def test_pristine_tensors_read_the_backups_of_a_merged_module():
    from collections import namedtuple

    from vramkit.comfy import patch

    root = _tree()
    layer = root.layer
    weight, bias, stat = layer.weight.detach().clone(), layer.bias.detach().clone(), layer.stat.clone()
    dim = namedtuple("Dimension", ["weight", "inplace_update"])
    patcher = TreePatcher(root, backup={"layer.weight": dim(weight, False)},
                          hook_backup={"layer.bias": (bias, torch.device("cpu"))},
                          backup_buffers={"layer.stat": stat})
    with torch.no_grad():  # what a loaded LoRA'd sibling did to the shared module
        layer.weight.add_(5.0)
        layer.bias.add_(5.0)
        layer.stat.add_(5.0)
    params, buffers = patch.pristine_tensors(patcher, "layer")
    assert params["weight"] is weight and params["bias"] is bias and buffers["stat"] is stat


def test_pristine_tensors_of_a_module_outside_the_tree_are_its_own():
    from collections import namedtuple

    from vramkit.comfy import patch

    root = _tree()
    own = torch.nn.Linear(4, 3)  # this patcher's object patch, while another module is installed
    dim = namedtuple("Dimension", ["weight", "inplace_update"])
    patcher = TreePatcher(root, object_patches={"layer": own},
                          backup={"layer.weight": dim(torch.zeros(3, 4), False)})
    params, _ = patch.pristine_tensors(patcher, "layer")
    assert params["weight"] is own.weight and params["bias"] is own.bias


def test_copy_module_takes_every_tensor_explicitly():
    from vramkit.comfy import patch

    layer = _tree().layer
    with pytest.raises(ValueError, match="missing: bias"):
        patch.copy_module(layer, parameters={"weight": torch.ones(3, 4)}, buffers={"stat": layer.stat})
    new_bias = torch.full((3,), 2.0)
    copy = patch.copy_module(layer, parameters={"weight": torch.ones(3, 4), "bias": new_bias},
                             buffers={"stat": torch.ones(3)})
    assert copy.bias is not layer.bias and torch.equal(copy.bias, new_bias)
    assert torch.equal(copy.weight, torch.ones(3, 4)) and torch.equal(copy.stat, torch.ones(3))
    assert torch.equal(layer.stat, torch.zeros(3)) and not torch.equal(layer.weight, torch.ones(3, 4))
    copy.register_buffer("extra", torch.ones(1), persistent=False)
    assert "extra" not in layer._non_persistent_buffers_set and "extra" not in layer._buffers


def test_one_dtype_table_for_every_node():
    from vramkit import quant
    from vramkit.comfy import dtypes, layouts

    assert layouts._TORCH_FP8 is quant._TORCH_FP8
    assert tuple(dtypes.FLOATS.values()) == quant.SOURCE_DTYPES
    choices = [nodes.VRAMKitQuantize.INPUT_TYPES()["required"]["compute_dtype"][0],
               nodes.VRAMKitPrecision.INPUT_TYPES()["required"]["weight_dtype"][0],
               nodes.VRAMKitPrecision.INPUT_TYPES()["required"]["compute_dtype"][0]]
    assert all(c == ["default", "fp32", "fp16", "bf16"] for c in choices)
    assert dtypes.parse("default", "compute_dtype") is None and dtypes.parse("bf16", "x") is torch.bfloat16


@pytest.mark.parametrize(("value", "error", "message"), [
    ("fp8", ValueError, "compute_dtype 'fp8' is not one of default, fp32, fp16, bf16"),
    (torch.float16, TypeError, "compute_dtype must be one of default, fp32, fp16, bf16 \\(a string\\), got dtype"),
    (["fp16"], TypeError, "got list"),
])
def test_dtype_names_refused_clearly(value, error, message):
    from vramkit.comfy import dtypes

    with pytest.raises(error, match=message):
        dtypes.parse(value, "compute_dtype")


@pytest.mark.parametrize("rule", ["next_layers", "multiply"])
@pytest.mark.parametrize("streams", [0, 2])
def test_offload_planner_sizes_that_would_wrap_never_fit(rule: str, streams: int):
    """2^63 + 2^63 wraps to 0 in 64-bit arithmetic: such layers must stream, not be marked resident."""
    from vramkit import _core

    plan = _core.plan_offload([2**63] * 2, [2**63] * 2, [True] * 2, 10**6, 2**64 - 1, streams, rule)
    assert plan["resident"] == [False, False] and plan["resident_bytes"] == 0
    assert plan["streamed_layers"] == 2 and plan["streamed_bytes"] == 2**64 - 1


def test_attention_node_lists_every_mode_without_comfyui_and_returns_a_summary():
    """Outside ComfyUI (no backend registry at all) the list is the same as inside with every backend."""
    spec = nodes.VRAMKitAttention.INPUT_TYPES()["required"]["mode"][0]
    assert spec == list(attention_modes.NODE_MODES) == ["auto", "sdpa", "chunked", "sliced", "sub_quad", "split",
                                                        "sage", "flash", "xformers"]
    assert nodes.VRAMKitAttention.RETURN_TYPES == ("MODEL", "STRING")
    assert len(nodes.VRAMKitAttention.OUTPUT_TOOLTIPS) == 2
