"""pytest plugin for the GPU check (``-p gpu_first``): loads comfy-aimdo before torch when the run is for
ComfyUI's Dynamic VRAM (VRAMKIT_TEST_MEMORY_MANAGER=dynamic), as ComfyUI's main.py does; the ComfyUI test
conftest then initialises the devices and switches ComfyUI to ModelPatcherDynamic (see
tests/comfyui/conftest.py). Does nothing for the legacy manager or when comfy-aimdo is missing."""

import os

if os.environ.get("VRAMKIT_TEST_MEMORY_MANAGER") == "dynamic":
    try:
        import comfy_aimdo.control

        comfy_aimdo.control.init()
    except Exception as exc:  # the conftest reports what is missing
        os.environ["VRAMKIT_AIMDO_PROBLEM"] = f"{type(exc).__name__}: {exc}"
