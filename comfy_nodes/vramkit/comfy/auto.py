"""Auto-optimize for my VRAM: plan the job with the Rust planner, apply only the rungs the plan names through
the existing nodes' code, and catch out-of-memory while sampling.

- Profiles: the live model's parameters (grouped into blocks like a checkpoint header), the text encoder and
  VAE sizes from their patchers, ComfyUI's own ``memory_usage_factor``; the device's free memory as the
  memory manager in charge sees it (`compat.free_memory`), ComfyUI's reserve, measured speeds.
- Apply: precision (`precision.apply_precision`), attention (`attention_modes.apply_attention`), 8-bit weights
  (`quantize_model.quantize_model`), layer streaming (`budget.apply_offload`), and freeing the text encoder /
  VAE once sampling starts (a ``PREPARE_SAMPLING`` wrapper calling `offload_encoders.free_models`). Nothing
  needed: the model is returned as it came (bit-identical output).
- Presets: ``gpu-only``, ``medvram``, ``lowvram``, ``novram`` fix the rungs like the launch flag would.
- Safety net: an ``OUTER_SAMPLE`` wrapper on the clone; on a device out-of-memory it frees caches, climbs one
  rung (sliced attention, then a resident budget halved each time), and retries, at most once per rung of the
  ladder. What happened is recorded for ``VRAM report`` and the plan text.
- Calibration: after a run on CUDA the measured peak and step time are compared with the prediction and
  cached per model, device and size (`vramkit.plan.calibration`); the next plan uses them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import plan as planner
from ..plan import calibration
from ..plan.profiles import TensorInfo, profile_from_tensors
from . import (
    attention_modes,
    budget,
    compat,
    display,
    measure,
    offload_encoders,
    patch,
    precision,
    quantize_model,
)

log = logging.getLogger("vramkit.comfy")

PRESETS = planner.PRESETS
GB = 1024**3
WRAPPER_FREE = "auto_free"
WRAPPER_SAFETY = "auto_safety_net"
_TORCH_TO_SAFETENSORS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
                         torch.uint8: "U8", torch.float64: "F64"}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _TORCH_TO_SAFETENSORS[getattr(torch, _name)] = "F8_E4M3" if _name.endswith("e4m3fn") else "F8_E5M2"


@dataclass
class AutoRecord:
    """What the Auto node decided and what its safety net did (read by VRAM report)."""

    plan_text: str
    applied: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    calibration: str = ""
    fingerprint: tuple[float, float] = (0.0, 0.0)
    #: The plan's predicted peak as a memory chart (`display`), shown on the node and beside the measurement.
    chart: dict[str, Any] | None = None

    def text(self) -> str:
        lines = [self.plan_text]
        if self.events:
            lines.append("Safety net: " + " ".join(self.events))
        if self.calibration:
            lines.append(self.calibration)
        return "\n".join(lines)


RECENT: deque[AutoRecord] = deque(maxlen=32)


def find(latent: torch.Tensor) -> AutoRecord | None:
    """The record of the Auto-optimized run that produced `latent`."""
    fp = measure.fingerprint(latent)
    for record in reversed(RECENT):
        if record.fingerprint == fp:
            return record
    return None


# ---- profiles -------------------------------------------------------------------------------------------

def _tensor_info(t: torch.Tensor) -> TensorInfo:
    plain = t
    if compat.is_comfy_quantized(t):
        plain, _ = compat.quantized_parts(t)
    return TensorInfo(_TORCH_TO_SAFETENSORS.get(plain.dtype, "BF16"), tuple(plain.shape))


def live_profile(model: Any, clip: Any = None, vae: Any = None) -> dict[str, Any]:
    """The planner's profile of a ComfyUI MODEL (and its text encoder and VAE, when given)."""
    diffusion = model.model.diffusion_model
    tensors = {name: _tensor_info(t) for name, t in [*diffusion.named_parameters(), *diffusion.named_buffers()]}
    config = getattr(model.model, "model_config", None)
    name = type(config).__name__ if config is not None else type(model.model).__name__
    profile = profile_from_tensors(tensors, name, f"the loaded {name}", generic=True)
    factor = getattr(model.model, "memory_usage_factor", None)
    if isinstance(factor, (int, float)) and factor > 0:
        profile["memory_usage_factor"] = float(factor)
    latent_format = getattr(model.model, "latent_format", None)
    channels = getattr(latent_format, "latent_channels", None)
    if isinstance(channels, int) and channels > 0:
        profile["latent_channels"] = channels
    if clip is not None:
        p = offload_encoders.patcher_of(clip, "clip")
        profile["text_encoders"] = [{"name": type(p.model).__name__, "bytes": int(p.model_size())}]
    else:
        profile["text_encoders"] = []
    if vae is not None:
        p = offload_encoders.patcher_of(vae, "vae")
        profile["vae"] = {"name": type(p.model).__name__, "bytes": int(p.model_size())}
    else:
        profile["vae"] = None
    return profile


def live_device(model: Any) -> dict[str, Any]:
    """The device profile of the model's load device as ComfyUI's memory manager sees it."""
    device = compat.load_device(model)
    mm = compat.model_management()
    dynamic = compat.is_dynamic(model)
    if device.type == "cpu":
        # No VRAM to reserve on a CPU: ComfyUI loads everything into RAM.
        profile = planner.device_profile(device, memory_manager="legacy", measure=False)
        profile.update(extra_reserved_bytes=0, minimum_inference_bytes=0)
        return profile
    free = compat.free_memory(model, device)
    profile = planner.device_profile(device, free_bytes=free, memory_manager="dynamic" if dynamic else "legacy")
    profile.update(extra_reserved_bytes=int(mm.extra_reserved_memory()),
                   minimum_inference_bytes=int(mm.minimum_inference_memory()))
    return profile


def job_from(model: Any, latent: dict[str, Any] | None, width: int, height: int, frames: int,
             batch: int) -> dict[str, Any]:
    """The job: from the latent when connected (its shape), else from the node's inputs."""
    for name, v in (("width", width), ("height", height), ("frames", frames), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if latent is None:
        return planner.job(width, height, frames, batch)
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() < 4:
        raise TypeError("latent must be a LATENT (a dict with a 'samples' tensor of 4 or 5 dimensions)")
    scale = 8
    profile_spatial = getattr(getattr(model.model, "latent_format", None), "spacial_downscale_ratio", None)
    if isinstance(profile_spatial, int) and profile_spatial > 0:
        scale = profile_spatial
    h, w = int(samples.shape[-2]) * scale, int(samples.shape[-1]) * scale
    t = int(samples.shape[2]) if samples.dim() == 5 else 1
    return planner.job(w, h, (t - 1) * 4 + 1 if t > 1 else 1, int(samples.shape[0]))


# ---- applying a plan -------------------------------------------------------------------------------------

class FreeEncoders:
    """``PREPARE_SAMPLING`` wrapper: the text encoder / VAE leave VRAM when sampling starts (after encoding)."""

    def __init__(self, clip: Any, vae: Any) -> None:
        self.targets = {"clip": clip, "vae": vae}
        self.last = ""

    def __call__(self, executor: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.last = offload_encoders.free_models(self.targets)
        return executor(*args, **kwargs)


def apply_plan(model: Any, plan: planner.Plan, clip: Any = None, vae: Any = None) -> tuple[Any, list[str]]:
    """A clone carrying the plan's rungs (a plain clone when the plan applies nothing)."""
    rungs = set(plan.rungs)
    out = patch.clone(model)  # always a clone: a plan that applies nothing samples bit-identically
    lines: list[str] = []
    cfg = plan.config
    if "precision_16bit" in rungs:
        out, text = precision.apply_precision(out, cfg["weights_format"] if cfg["precision"] == "keep"
                                              else cfg["precision"], "default")
        lines.append(text)
    if "weights_8bit" in rungs:
        fmt, granularity = ("fp8_e4m3fn", "tensor") if cfg["weights_format"] == "fp8" else ("int8", "channel")
        out, report = quantize_model.quantize_model(out, fmt, granularity, 64)
        lines.append(report.summary())
    if "efficient_attention" in rungs:
        mode = "sdpa" if "sdpa" in attention_modes.available_modes() else "chunked"
        out, text = attention_modes.apply_attention(out, mode)
        lines.append(text)
    if "attention_slicing" in rungs:
        out, text = attention_modes.apply_attention(out, "sliced", plan.components["attention"] / 2**20)
        lines.append(text)
    if "layer_streaming" in rungs:
        resident = int(cfg["resident_bytes"] or 0) + plan.components["streaming_buffers"]
        out, text = budget.apply_offload(out, max(resident, 1) / GB)
        lines.append(text)
    free_clip = clip if "offload_text_encoder" in rungs else None
    free_vae = vae if "offload_vae" in rungs else None
    if free_clip is not None or free_vae is not None:
        patch.set_wrapper(out, compat.wrappers_mp().PREPARE_SAMPLING, WRAPPER_FREE, FreeEncoders(free_clip, free_vae))
        what = " and ".join(n for n, v in (("text encoder", free_clip), ("VAE", free_vae)) if v is not None)
        lines.append(f"The {what} leave VRAM when sampling starts.")
    return out, lines


# ---- the safety net ---------------------------------------------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    try:
        return bool(compat.model_management().is_oom(exc))
    except (ImportError, AttributeError):
        return isinstance(exc, torch.cuda.OutOfMemoryError)


class SafetyNet:
    """``OUTER_SAMPLE`` wrapper: on out-of-memory, free caches, climb one rung, retry (bounded)."""

    def __init__(self, record: AutoRecord, plan: planner.Plan, max_retries: int = len(planner.RUNGS),
                 calibrate: bool = True) -> None:
        self.record = record
        self.plan = plan
        self.max_retries = max_retries
        self.calibrate = calibrate

    def _climb(self, guider: Any, attempt: int) -> str:
        """Changes this run's model options one rung up; returns what it did."""
        options = guider.model_options
        transformer = options.setdefault("transformer_options", {})
        current = transformer.get(compat.ATTENTION_OVERRIDE_KEY)
        if getattr(current, "vramkit_mode", None) != "sliced":
            transformer[compat.ATTENTION_OVERRIDE_KEY] = attention_modes.build_override("sliced", 0, current)
            return "attention sliced"
        patcher = guider.model_patcher
        size = int(patcher.model_size())
        resident = max(size >> attempt, 0)
        wrapper = budget.BudgetedPrepareSampling(resident)
        compat.set_model_options_wrapper(options, compat.wrappers_mp().PREPARE_SAMPLING,
                                         patch.key(budget.WRAPPER_NAME), wrapper)
        return f"resident weights capped at {resident / 2**20:.0f} MB"

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        guider = executor.class_obj  # ComfyUI's WrapperExecutor: the CFGGuider that samples
        device = compat.load_device(guider.model_patcher)
        calibrate = self.calibrate and device.type == "cuda"  # a CPU's peak RSS is no VRAM figure
        probe = measure.PeakProbe(device) if calibrate else None
        attempt = 0
        started = time.perf_counter()
        if probe is not None:
            probe.start()
        while True:
            try:
                output = executor(*args, **kwargs)
                break
            except Exception as exc:
                if not is_oom(exc) or attempt >= self.max_retries:
                    if is_oom(exc):
                        self.record.events.append(f"gave up after {attempt} retries.")
                    raise
                attempt += 1
                mm = compat.model_management()
                with contextlib.suppress(Exception):
                    mm.unload_all_models()
                mm.soft_empty_cache()
                did = self._climb(guider, attempt)
                self.record.events.append(f"out of memory ({type(exc).__name__}); freed caches, {did}, "
                                          f"retry {attempt}.")
                log.warning("VRAMKit Auto: out of memory while sampling; %s, retry %d", did, attempt)
        peak = probe.stop() if probe is not None else 0
        elapsed = time.perf_counter() - started
        self.record.fingerprint = measure.fingerprint(output)
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        steps = max(len(sigmas) - 1, 1) if sigmas is not None else 1
        if calibrate and attempt == 0:
            key = calibration.key(self.plan.model, self.plan.device, self.plan.job)
            miss = calibration.record(key, self.plan.__dict__, peak, elapsed / steps,
                                      {k: self.plan.job[k] for k in ("activation_scale", "time_scale")
                                       if k in self.plan.job})
            self.record.calibration = miss.text()
        RECENT.append(self.record)
        return output


# ---- the node's work --------------------------------------------------------------------------------------

def plan_for(model: Any, clip: Any, vae: Any, job: dict[str, Any], vram_budget_gb: float,
             preset: str) -> planner.Plan:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    budget_bytes = budget.budget_bytes(vram_budget_gb, "GB", "vram_budget_gb")
    profile = live_profile(model, clip, vae)
    device = live_device(model)
    scales = calibration.lookup(calibration.key(profile["name"], device["name"], job))
    return planner.plan_fit(profile, device, {**job, **scales}, budget_bytes, preset)


def auto_optimize(model: Any, clip: Any = None, vae: Any = None, latent: dict[str, Any] | None = None,
                  width: int = 1024, height: int = 1024, frames: int = 1, batch: int = 1,
                  vram_budget_gb: float = 0.0, preset: str = "auto", safety_net: bool = True
                  ) -> tuple[Any, str, AutoRecord]:
    """The node's work: (the model to sample with, the plan text, the record)."""
    if not callable(getattr(model, "clone", None)) or not hasattr(model, "model_options"):
        raise TypeError(f"model must be a ComfyUI MODEL (a ModelPatcher), got {type(model).__name__}")
    job = job_from(model, latent, width, height, frames, batch)
    plan = plan_for(model, clip, vae, job, vram_budget_gb, preset)
    out, lines = apply_plan(model, plan, clip, vae)
    text = plan.text()
    if lines:
        text += "\nApplied: " + " ".join(line.rstrip(".") + "." for line in lines)
    chart = display.memory_chart("VRAM while sampling, as planned", [display.plan_bar(plan.components)],
                                 device=plan.device, budget_bytes=plan.budget_bytes or None)
    record = AutoRecord(plan_text=text, applied=list(plan.rungs), chart=chart)
    if safety_net:
        patch.set_wrapper(out, compat.wrappers_mp().OUTER_SAMPLE, WRAPPER_SAFETY, SafetyNet(record, plan))
    return out, text, record


def report(latent: dict[str, Any]) -> str | None:
    """The Auto node's plan and safety-net record for the run that produced `latent`, if any."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        return None
    found = find(samples)
    return found.text() if found is not None else None
