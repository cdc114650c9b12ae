"""What a VRAM budget will do to a model, before anything loads: the layers ComfyUI keeps resident and those
it streams, under either memory manager.

- `plan` (legacy ``ModelPatcher``): the sizes are read from the patcher as ComfyUI's ``_load_list`` reads them
  (this clone's object patches included, e.g. quantized layers, and the room its LoRA patches need); the walk
  itself is the Rust planner's (`vramkit._core.plan_offload`, a port of ``ModelPatcher.load``).
- `plan_dynamic` (Dynamic VRAM, ``ModelPatcherDynamic``): the layout ``ModelPatcherDynamic.load`` gives the
  model's VBAR (small modules first, then the larger ones by descending size, each a 512-byte aligned slice)
  against a watermark: a module whose last page lies under the watermark faults in and stays; the others
  fault "OOM" and are streamed from RAM each step.
"""

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
    """What ComfyUI's legacy loader keeps resident under `budget_bytes` (its streaming buffer included)."""
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


@dataclass(frozen=True)
class VbarSlot:
    """One module's slice of a Dynamic VRAM model's VBAR, as ``ModelPatcherDynamic.load`` lays it out."""

    name: str
    offset: int
    size: int

    @property
    def end_page(self) -> int:
        """The page count the slice needs resident (comfy-aimdo faults whole 32 MiB pages)."""
        return -(-(self.offset + self.size) // compat.AIMDO_PAGE_BYTES)


def vbar_layout(model: Any) -> tuple[list[VbarSlot], list[tuple[str, int]]]:
    """The VBAR slices a fresh Dynamic VRAM load gives `model`'s modules, in address order, and the modules
    (name, bytes) it loads as ordinary tensors instead (at most 16 KB, or not a ComfyUI op), buffers
    included. Read from the patcher as ``_load_list(for_dynamic=True)`` reads it, object patches included.
    (A LoRA that changes a weight's shape makes ComfyUI force-load that module too; not predicted here.)"""
    order = []
    forced: list[tuple[str, int]] = []
    for name, size, cast, streamable in loader_layers(model, "next_layers"):
        module = model.get_model_object(name) if name else model.model
        if not streamable or size <= compat.DYNAMIC_FORCE_LOAD_BYTES:
            forced.append((name, size))
            continue
        slot = 0
        for pname in ("weight", "bias"):
            param = getattr(module, pname, None)
            slot += compat.vbar_slot_bytes(param, getattr(module, f"{pname}_comfy_model_dtype", None))
        order.append(((cast >= compat.DYNAMIC_SMALL_BYTES, -cast, size, name), slot))
    buffers = sum(b.numel() * b.element_size() for b in model.model.buffers())
    if buffers:
        forced.append(("<buffers>", int(buffers)))
    slots, offset = [], 0
    for (*_, name), slot in sorted(order):
        offset = -(-offset // compat.AIMDO_ALLOC_ALIGN) * compat.AIMDO_ALLOC_ALIGN
        slots.append(VbarSlot(name, offset, slot))
        offset += slot
    return slots, forced


def plan_dynamic(model: Any, watermark_bytes: int) -> OffloadPlan:
    """What Dynamic VRAM keeps resident when `model`'s VBAR is capped at `watermark_bytes` (rounded up to
    whole pages, as comfy-aimdo does). ``resident_bytes`` counts whole pages plus the ordinary tensors, like
    ComfyUI's ``loaded_size()``; ``buffer_bytes`` is 0 (streamed weights go through comfy-aimdo's shared cast
    buffer, not a per-model one)."""
    slots, forced = vbar_layout(model)
    pages = -(-max(0, int(watermark_bytes)) // compat.AIMDO_PAGE_BYTES)
    resident = [s for s in slots if s.end_page <= pages]
    streamed = [s for s in slots if s.end_page > pages]
    used_pages = max((s.end_page for s in resident), default=0)
    return OffloadPlan(
        resident=tuple(sorted([s.name for s in resident] + [n for n, _ in forced if n != "<buffers>"])),
        streamed=tuple(sorted(s.name for s in streamed)), unplaced=(),
        resident_bytes=used_pages * compat.AIMDO_PAGE_BYTES + sum(b for _, b in forced),
        streamed_bytes=sum(s.size for s in streamed), buffer_bytes=0, full_load=not streamed)


def watermark_for(budget_bytes: int, forced_bytes: int) -> int:
    """The VBAR cap that holds a Dynamic VRAM model's resident bytes (whole pages plus the `forced_bytes` of
    ordinary tensors ComfyUI loads outside the VBAR) to `budget_bytes`: whole pages, rounded down."""
    room = max(0, int(budget_bytes) - int(forced_bytes))
    return room // compat.AIMDO_PAGE_BYTES * compat.AIMDO_PAGE_BYTES


def plan_dynamic_budget(model: Any, budget_bytes: int) -> tuple[OffloadPlan, int]:
    """`plan_dynamic` for a budget: the plan, and the VBAR cap (`watermark_for`) the budget becomes."""
    _slots, forced = vbar_layout(model)
    watermark = watermark_for(budget_bytes, sum(b for _, b in forced))
    return plan_dynamic(model, watermark), watermark
