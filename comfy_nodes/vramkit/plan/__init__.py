"""Fit my VRAM: the cheapest rungs of the VRAM ladder that make a job fit, with reasons.

    from vramkit import plan
    p = plan.plan("flux-dev", plan.reference_device(12 * plan.GIB), width=1024, height=1024)
    print(p.text())

Python gathers the profiles (`profiles`: built-in or from a safetensors header; `device`: this GPU or a
reference one), the Rust core searches the ladder (`vramkit._core.plan_fit`), and `Plan` explains it.
Nothing here imports ComfyUI; the Auto node that applies a plan lives in `vramkit.comfy`.
"""

from __future__ import annotations

import os
from typing import Any

from .. import _core
from .device import GIB, device_profile, reference_device, system_ram_bytes
from .profiles import builtin_names, builtin_profile, model_profile, profile_from_safetensors
from .result import Plan, Step

PRESETS = ("auto", "gpu-only", "medvram", "lowvram", "novram")
RUNGS = ("precision_16bit", "efficient_attention", "offload_text_encoder", "offload_vae", "weights_8bit",
         "layer_streaming", "attention_slicing")

__all__ = ["GIB", "PRESETS", "RUNGS", "Plan", "Step", "builtin_names", "builtin_profile", "device_profile",
           "job", "model_profile", "plan", "plan_fit", "profile_from_safetensors", "reference_device",
           "system_ram_bytes"]


def job(width: int, height: int, frames: int = 1, batch: int = 1, **extra: Any) -> dict[str, Any]:
    """A job dict (`extra`: cfg, estimate, activation_scale, time_scale)."""
    return {"width": width, "height": height, "frames": frames, "batch": batch, **extra}


def plan_fit(model_profile: dict[str, Any], device: dict[str, Any], job: dict[str, Any], budget_bytes: int = 0,
             preset: str = "auto") -> Plan:
    """`_core.plan_fit` wrapped in a `Plan` (budget 0 = the device's free memory)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    result = _core.plan_fit(model_profile, device, job, budget_bytes, preset)  # type: ignore[arg-type]
    return Plan.from_core(dict(result), job)


def plan(model: str | os.PathLike[str] | dict[str, Any], device: dict[str, Any] | None = None, *,
         width: int, height: int, frames: int = 1, batch: int = 1, budget_bytes: int = 0,
         preset: str = "auto", **job_extra: Any) -> Plan:
    """Plans a built-in model, a safetensors file or a profile dict on `device` (default: this machine's)."""
    profile = model if isinstance(model, dict) else model_profile(model)
    return plan_fit(profile, device if device is not None else device_profile(),
                    job(width, height, frames, batch, **job_extra), budget_bytes, preset)
