"""Dynamic VRAM without a GPU: ComfyUI's real ``ModelPatcherDynamic`` and ``load_models_gpu`` driving a
recording stand-in for comfy-aimdo's VBAR, on a simulated device.

- The models live on the ``meta`` device (load and offload device alike): ComfyUI's loaders run their real
  code (``ModelPatcherDynamic`` only reroutes a *CPU* load device to the legacy patcher), moving no data.
- `RecordingVBAR` has the methods ``ModelPatcherDynamic`` calls on ``comfy_aimdo.model_vbar.ModelVBAR``
  (``prioritize``, ``alloc``, ``set_watermark``, ``loaded_size``, ...), keeps aimdo's watermark rules (a
  byte count rounded up to whole pages, ``prioritize`` resets it to every page) and records every call with
  the functions it was called from.
- `SimulatedGPU` answers ComfyUI's free-memory questions for that device from what is loaded on it: the
  ordinary tensors of the models it tracks (as their loaders count them) plus the resident VBAR pages;
  comfy-aimdo's ``vbars_analyze`` (the reclaimable pages ``ModelPatcher.get_free_memory`` adds) sums the
  stand-in VBARs.
- comfy-aimdo's ``HostBuffer`` (pinned RAM, needs its C library) becomes an empty stand-in.

Use `install(monkeypatch, total_bytes)`; it also shrinks the VBAR page (``compat.AIMDO_PAGE_BYTES``) to 64 KiB
so the tiny test models span many pages.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

META = torch.device("meta")
PAGE = 64 * 1024


class FakeHostBuffer:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.size = 0

    def truncate(self, size: int, do_unregister: bool = True) -> None:
        self.size = int(size)


class RecordingVBAR:
    """comfy-aimdo's ModelVBAR as ModelPatcherDynamic uses it, recording every call."""

    def __init__(self, nr_pages: int, page: int = PAGE) -> None:
        self.nr_pages, self.page = nr_pages, page
        self.watermark = nr_pages
        self.offset = 0
        self.resident_pages = 0
        self.calls: list[tuple[Any, ...]] = []
        self.callers: list[list[str]] = []

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        self.callers.append([f.function for f in inspect.stack()[2:12]])

    def prioritize(self) -> None:
        self._record("prioritize")
        self.watermark = self.nr_pages

    def set_watermark(self, size_bytes: int) -> None:
        self._record("set_watermark", int(size_bytes))
        self.watermark = min(self.nr_pages, -(-int(size_bytes) // self.page))
        self.resident_pages = min(self.resident_pages, self.watermark)

    def get_watermark(self) -> int:
        return self.watermark

    def get_nr_pages(self) -> int:
        return self.nr_pages

    def alloc(self, num_bytes: int) -> tuple[Any, int, int]:
        self.offset = (self.offset + 511) & ~511
        at = self.offset
        self.offset += num_bytes
        return (self, at, num_bytes)

    def fault_all(self) -> None:
        """What a sampling step does: every allocated page under the watermark faults in."""
        self.resident_pages = min(self.watermark, -(-self.offset // self.page))

    def loaded_size(self) -> int:
        return self.resident_pages * self.page

    def free_memory(self, size_bytes: int) -> int:
        pages = min(self.resident_pages, -(-int(size_bytes) // self.page))
        self.resident_pages -= pages
        self.watermark = min(self.watermark, self.resident_pages) if pages else self.watermark
        return pages * self.page

    def set_watermark_limit(self, size_bytes: int) -> None:
        self._record("set_watermark_limit", int(size_bytes))

    def watermark_calls(self) -> list[int]:
        return [c[1] for c in self.calls if c[0] == "set_watermark"]


@dataclass
class SimulatedGPU:
    total: int
    vbars: list[RecordingVBAR] = field(default_factory=list)
    models: list[Any] = field(default_factory=list)

    def track(self, patcher: Any) -> Any:
        """Counts `patcher`'s model's ordinary tensors on the device (what its loader says it loaded)."""
        if not any(m is patcher.model for m in self.models):
            self.models.append(patcher.model)
        return patcher

    def tensor_bytes(self) -> int:
        return sum(int(m.model_loaded_weight_memory) for m in self.models)

    def used(self) -> int:
        return self.tensor_bytes() + self.vbar_bytes()

    def vbar_bytes(self) -> int:
        return sum(v.loaded_size() for v in self.vbars)

    def get_free_memory(self, dev: Any = None, torch_free_too: bool = False) -> Any:
        free = self.total - self.used()
        return (free, free) if torch_free_too else free

    def vbars_analyze(self, device: Any = None) -> int:
        return self.vbar_bytes()

    def vbar(self, patcher: Any, nr_pages: int = 4096) -> RecordingVBAR:
        """Gives `patcher`'s model a stand-in VBAR (what its first Dynamic VRAM load would create)."""
        v = RecordingVBAR(nr_pages)
        patcher.model.dynamic_vbars[patcher.load_device] = v
        self.vbars.append(v)
        self.track(patcher)
        return v


def has_dynamic_vram() -> str | None:
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "this ComfyUI has no Dynamic VRAM (ModelPatcherDynamic, 0.29+)"
    return None


def install(monkeypatch: pytest.MonkeyPatch, total_bytes: int, aimdo: bool = True) -> SimulatedGPU:
    """Simulated device memory for `META`; with `aimdo`, comfy-aimdo's stand-ins and ``aimdo_enabled``."""
    import comfy.model_management as mm

    from vramkit.comfy import compat

    gpu = SimulatedGPU(total_bytes)
    real = mm.get_free_memory

    def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
        if dev is not None and torch.device(dev) == META:
            return gpu.get_free_memory(dev, torch_free_too)
        return real(dev, torch_free_too)

    monkeypatch.setattr(mm, "get_free_memory", get_free_memory)
    monkeypatch.setattr(compat, "AIMDO_PAGE_BYTES", PAGE)
    if aimdo:
        import comfy.memory_management
        import comfy_aimdo.host_buffer
        import comfy_aimdo.model_vbar

        monkeypatch.setattr(comfy_aimdo.host_buffer, "HostBuffer", FakeHostBuffer)
        monkeypatch.setattr(comfy_aimdo.model_vbar, "vbars_analyze", gpu.vbars_analyze)
        monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", True)
    return gpu


def meta_patcher(kind: str, dynamic: bool, seed: int = 0) -> Any:
    """A freshly loaded tiny `kind` model moved to the meta device, under ModelPatcherDynamic or the legacy
    ModelPatcher (load and offload device: meta)."""
    import comfy.model_patcher as mp
    import tiny_models

    model = tiny_models.load(kind, seed).model.to(META)
    cls = mp.ModelPatcherDynamic if dynamic else mp.ModelPatcher
    return cls(model, META, META)


def unload_meta_models() -> None:
    import comfy.model_management as mm

    for lm in [lm for lm in mm.current_loaded_models if lm.device == META]:
        if lm.model is not None:  # None: the patcher is gone already
            lm.model_unload()
        mm.current_loaded_models.remove(lm)
