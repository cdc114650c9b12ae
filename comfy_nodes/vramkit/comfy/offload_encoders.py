"""Move text encoders and VAEs out of VRAM once they are no longer needed (the "Offload" node's work).

Text encoders run once, at the start; keeping them on the GPU while the diffusion model samples only costs
VRAM. ComfyUI frees them lazily, when it runs short. This frees them right away, through ComfyUI's own
loaded-model list, the way ComfyUI unloads models itself: they go back to their offload device and come
back automatically the next time something encodes or decodes.
"""

from __future__ import annotations

import logging
from typing import Any

from . import compat

log = logging.getLogger("vramkit.comfy")


def patcher_of(obj: Any, input_name: str) -> Any:
    """The ModelPatcher behind a CLIP or VAE (or a MODEL), with a clear error for anything else."""
    patcher = getattr(obj, "patcher", obj)
    if not callable(getattr(patcher, "is_clone", None)) or not hasattr(patcher, "model"):
        raise TypeError(f"{input_name} must be a ComfyUI CLIP or VAE (something holding a ModelPatcher), got "
                        f"{type(obj).__name__}")
    return patcher


def free_models(targets: dict[str, Any]) -> str:
    """Unloads every loaded copy of the `targets` ({input name: CLIP/VAE}) from its device; a summary."""
    mm = compat.model_management()
    patchers = {name: patcher_of(obj, name) for name, obj in targets.items() if obj is not None}
    if not patchers:
        return "Nothing to free: connect a text encoder (clip) or a VAE."
    lines = []
    total_unloaded = 0
    for name, patcher in patchers.items():
        freed = 0
        unloaded = 0
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            loaded = mm.current_loaded_models[i]
            if loaded.model is not patcher and not patcher.is_clone(loaded.model):
                continue
            on_cpu = loaded.device is None or compat.torch_device(loaded.device).type == "cpu"
            size = 0 if on_cpu else loaded.model_loaded_memory()
            if loaded.model_unload():
                mm.current_loaded_models.pop(i)
                freed += size
                unloaded += 1
        kind = type(getattr(patcher, "model", patcher)).__name__
        label = {"clip": "text encoder", "vae": "vae"}.get(name, name)
        log.info("VRAMKit free after use: %s (%s): %d copies unloaded, %d bytes of VRAM", name, kind, unloaded,
                 freed)
        if unloaded == 0:
            lines.append(f"the {label} was not loaded (nothing to free)")
        elif freed == 0:
            lines.append(f"the {label} unloaded; it lived in RAM (CPU), so no VRAM was freed")
        else:
            lines.append(f"the {label} unloaded, {freed / 2**20:.0f} MB of VRAM freed for sampling")
        total_unloaded += unloaded
    mm.soft_empty_cache()
    text = "Freed after use: " + "; ".join(lines) + "."
    if total_unloaded:
        text += ("\nCost: none while sampling; it loads again by itself the next time it is needed (the next "
                 "prompt or decode).")
    return text
