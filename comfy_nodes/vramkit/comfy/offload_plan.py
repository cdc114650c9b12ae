"""What a VRAM budget will do to a model, before anything loads: the layers ComfyUI's legacy loader keeps
resident and those it streams. The sizes are read from the patcher as ComfyUI's ``_load_list`` reads them
(this clone's object patches included, e.g. quantized layers, and the room its LoRA patches need); the walk
itself is the Rust planner's (`vramkit._core.plan_offload`, a port of ``ModelPatcher.load``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from .. import _core
from . import compat


@dataclass(frozen=True)
class OffloadPlan:
    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    unplaced: tuple[str, ...]
    """Layers that cannot stream and do not fit: ComfyUI leaves them on the offload device."""
    resident_bytes: int
    streamed_bytes: int
    buffer_bytes: int
    full_load: bool

    def describe(self, device: str) -> str:
        mb = 2**20
        if self.full_load or not self.streamed:
            return f"all {len(self.resident)} layers ({self.resident_bytes / mb:.1f} MB) fit and stay on {device}"
        total = len(self.resident) + len(self.streamed) + len(self.unplaced)
        text = (f"{len(self.resident)} of {total} layers "
                f"({self.resident_bytes / mb:.1f} MB) stay on {device}; {len(self.streamed)} "
                f"({self.streamed_bytes / mb:.1f} MB) are streamed each step through a "
                f"{self.buffer_bytes / mb:.1f} MB buffer")
        if not self.resident:
            text += (" (the budget does not cover that buffer plus one layer, so every layer streams: the "
                     "least VRAM and the slowest steps, like --novram)")
        return text


def _patch_estimate(model: Any, module: Any, param: str, compute: Any) -> int:
    """ComfyUI's ``low_vram_patch_estimate_vram`` for `param` of `module` as it will be once this clone's
    object patches are installed: the scratch memory its loader reserves for merging a LoRA into a streamed
    weight (0.3.7x: float32 x 3; 0.29+: the compute dtype, else the weight's, x 2). ComfyUI's own function is
    called on a view of just that module, so each version's rule applies as it is."""
    estimate = importlib.import_module("comfy.model_patcher").low_vram_patch_estimate_vram
    view = SimpleNamespace(layer=module, manual_cast_dtype=compute)
    return int(estimate(view, f"layer.{param}"))


def loader_layers(model: Any, rule: str) -> list[tuple[str, int, int, bool]]:
    """(name, bytes, cast bytes, streamable) for every layer ComfyUI's loader places, in name order.

    The cast bytes are ComfyUI's ``module_offload_mem``: the layer plus, for a weight or bias with patches
    (a LoRA), the loader's estimate of merging them while streaming, and on 0.29+, for an unpatched one, the
    compute-dtype copy of weights it must convert on the fly.
    """
    mm = compat.model_management()
    compute = model.get_model_object("manual_cast_dtype")
    layers = []
    for name, live in model.model.named_modules():
        module = model.get_model_object(name) if name else live
        own = {n for n, _ in module.named_parameters(recurse=False)}
        if any(n not in own for n, _ in module.named_parameters(recurse=True)):
            continue  # a container: its children are placed one by one
        streamable = hasattr(module, "comfy_cast_weights")
        if not (streamable or own):
            continue
        size = int(mm.module_size(module))
        cast = size
        if streamable:
            for pname in ("weight", "bias"):
                if f"{name}.{pname}" in model.patches:
                    cast += _patch_estimate(model, module, pname, compute)
                    continue
                param = getattr(module, pname, None)
                if rule == "next_layers" and compute is not None and param is not None and (
                        param.dtype != compute or compat.is_comfy_quantized(param)):
                    cast += param.numel() * compute.itemsize
        layers.append((name, size, cast, streamable))
    return sorted(layers)


def plan(model: Any, budget_bytes: int) -> OffloadPlan:
    rule = compat.offload_buffer_rule()
    layers = loader_layers(model, rule)
    result = _core.plan_offload([b for _, b, _, _ in layers], [c for _, _, c, _ in layers],
                                [s for _, _, _, s in layers], int(budget_bytes), int(model.model_size()),
                                int(compat.model_management().NUM_STREAMS), rule)
    placed = list(zip(layers, result["resident"], strict=True))
    return OffloadPlan(
        resident=tuple(name for (name, _, _, _), keep in placed if keep),
        streamed=tuple(name for (name, _, _, streams), keep in placed if streams and not keep),
        unplaced=tuple(name for (name, _, _, streams), keep in placed if not streams and not keep),
        resident_bytes=result["resident_bytes"], streamed_bytes=result["streamed_bytes"],
        buffer_bytes=result["buffer_bytes"], full_load=result["full_load"])
