"""Importing a ComfyUI tree in-process the way its main.py would, under a chosen memory manager.

Used by the ComfyUI tests' conftest and by the GPU check (scripts/gpu/). The manager comes from
``VRAMKIT_TEST_MEMORY_MANAGER``: ``dynamic`` (ComfyUI 0.29+'s Dynamic VRAM through comfy-aimdo, the default
on NVIDIA; needs CUDA, and comfy-aimdo loaded before torch: scripts/gpu/gpu_first.py does that), ``legacy``
(``--disable-dynamic-vram``: the classic ModelPatcher), or unset (what ComfyUI itself would choose here,
which in-process means legacy, as main.py's Dynamic VRAM switch is not run). Without CUDA ComfyUI runs with
``--cpu``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

MANAGERS = ("dynamic", "legacy")


def requested_manager() -> str | None:
    manager = os.environ.get("VRAMKIT_TEST_MEMORY_MANAGER") or None
    if manager is not None and manager not in MANAGERS:
        raise ValueError(f"VRAMKIT_TEST_MEMORY_MANAGER={manager!r}; accepted: {', '.join(MANAGERS)}")
    return manager


def import_comfyui(root: Path) -> str | None:
    """Imports ComfyUI from `root`; returns why it cannot be used, or None."""
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        return f"{root} is not a ComfyUI folder (no main.py and comfy/)"
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    manager = requested_manager()
    try:
        from comfy.cli_args import args

        if not torch.cuda.is_available():
            args.cpu = True  # before comfy.model_management is imported
        if manager == "legacy":
            args.disable_dynamic_vram = True
        import comfy.model_management
        import comfy.sample
        import comfy.sd  # noqa: F401

        if manager == "dynamic":
            return _enable_dynamic_vram()
    except Exception as exc:  # any import failure means: skip, with the reason
        return f"cannot import ComfyUI from {root}: {type(exc).__name__}: {exc}"
    return None


def _enable_dynamic_vram() -> str | None:
    """What ComfyUI 0.29's main.py does when Dynamic VRAM is on (after comfy_aimdo.control.init())."""
    if not torch.cuda.is_available():
        return "Dynamic VRAM needs an NVIDIA GPU"
    if os.environ.get("VRAMKIT_AIMDO_PROBLEM"):
        return f"comfy-aimdo did not load: {os.environ['VRAMKIT_AIMDO_PROBLEM']}"
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "this ComfyUI has no Dynamic VRAM (ModelPatcherDynamic)"
    import comfy_aimdo.control

    if comfy_aimdo.control.lib is None:
        comfy_aimdo.control.init()  # late: main.py loads it before torch (scripts/gpu/gpu_first.py)
    devices = [(d.index, 0) for d in mm.get_all_torch_devices()]
    try:
        ok = comfy_aimdo.control.init_devices(devices)
    except TypeError:  # comfy-aimdo 0.4.9's protocol
        ok = comfy_aimdo.control.init_devices(d for d, _ in devices)
    if not ok:
        return "comfy-aimdo could not initialise the CUDA devices"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return None
