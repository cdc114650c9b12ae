"""Sequential offload: ComfyUI's own per-layer weight streaming, held to a VRAM budget per model.

ComfyUI's legacy loader already keeps part of a model on the GPU and streams the rest layer by layer from
(pinned) RAM, but it sizes the resident part from free memory, globally. The "Sequential offload" node adds a
``PREPARE_SAMPLING`` wrapper to one clone: while ComfyUI loads that clone for sampling, the extra memory its
loader may take is clamped so the resident weights never exceed the budget (ComfyUI's own streaming buffer
included). Nothing else changes: the same modules, casts and side streams do the work.

Under Dynamic VRAM (``patcher.is_dynamic()``, the default on NVIDIA since ComfyUI 0.29) ComfyUI pages weights
on demand and ignores resident budgets by design, so the wrapper steps aside and says so.

Engines: only ``comfy`` exists today; VRAMKit's own block streamer will be a second entry in `ENGINES`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import compat, offload_plan, patch
from .display import format_bytes

log = logging.getLogger("vramkit.comfy")

ENGINES = ("comfy",)
ENGINE_LABELS = {"comfy": "ComfyUI per-layer streaming"}
GB = 1024**3
#: The largest budget a node accepts (more memory than any device has).
_MAX_BUDGET_GB = 4096
WRAPPER_NAME = "offload"


@dataclass
class LoadRecord:
    """What the last budgeted load did (read back by the node summary and by tests)."""

    budget_bytes: int | None = None
    resident_bytes: int = 0
    model_bytes: int = 0
    dynamic: bool = False
    note: str = ""


def budget_bytes(amount: float, unit: str, input_name: str) -> int:
    """A node's memory budget input (`amount` of "MB" or "GB") in bytes; 0 means auto. A value that is not a
    number, negative, or more memory than any device has gets a clear error naming `input_name`."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"{input_name} must be a number of {unit}, got {type(amount).__name__}")
    if amount < 0:
        raise ValueError(f"{input_name} must be 0 (auto) or a positive number of {unit}, got {amount}")
    size = {"MB": 2**20, "GB": GB}[unit]
    if amount * size > _MAX_BUDGET_GB * GB:
        raise ValueError(f"{input_name} = {amount} {unit} is more memory than any device has; 0 means auto")
    return int(amount * size)


def budget_from_gb(gb: float, input_name: str = "vram_budget_gb") -> int | None:
    """The offload node's budget in bytes; None for 0 (auto)."""
    return budget_bytes(gb, "GB", input_name) or None


class BudgetedPrepareSampling:
    """The ``PREPARE_SAMPLING`` wrapper; `last` records what the latest load did."""

    def __init__(self, budget_bytes: int | None, engine: str = "comfy") -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.budget_bytes = budget_bytes
        self.engine = engine
        self.last = LoadRecord(budget_bytes)

    def __call__(self, executor: Callable[..., Any], model: Any, noise_shape: Any, conds: Any,
                 *args: Any, **kwargs: Any) -> Any:
        record = LoadRecord(self.budget_bytes, model_bytes=model.model_size())
        self.last = record
        if compat.is_dynamic(model):
            record.dynamic = True
            record.note = ("Dynamic VRAM is active: ComfyUI pages this model's weights on demand, so no "
                           "resident budget is applied (this is ComfyUI working as designed, not a failure)")
            log.info("VRAMKit offload: %s", record.note)
            return executor(model, noise_shape, conds, *args, **kwargs)
        budget = self.budget_bytes
        if budget is None:
            budget = auto_budget(model, noise_shape, conds)
            record.budget_bytes = budget
        if budget is None:
            record.note = "weights live in RAM on this device (CPU): nothing to stream"
            return executor(model, noise_shape, conds, *args, **kwargs)
        with clamp_resident(model, budget):
            result = executor(model, noise_shape, conds, *args, **kwargs)
        record.resident_bytes = int(model.loaded_size())
        log.info("VRAMKit offload: %.1f of %.1f MB resident on %s (budget %.1f MB); ComfyUI streams the rest "
                 "per layer", record.resident_bytes / 2**20, record.model_bytes / 2**20, model.load_device,
                 budget / 2**20)
        return result


@contextlib.contextmanager
def clamp_resident(model: Any, budget: int) -> Iterator[None]:
    """While ComfyUI loads `model`, cap what its loader may keep resident at `budget` bytes.

    ComfyUI grows a model's resident part through ``partially_load(device, extra_memory)`` (and trims it when
    ``extra_memory`` is negative); the cap is applied to that one number, on this patcher object only, for
    the duration of the load. An instance attribute of that name that was there before (another pack's
    wrapper) is called through and put back afterwards.
    """
    had_own = "partially_load" in vars(model)
    previous = vars(model).get("partially_load")
    original = model.partially_load

    def partially_load(device_to: Any, extra_memory: float = 0, force_patch_weights: bool = False) -> Any:
        room = budget - model.loaded_size()
        return original(device_to, min(extra_memory, room), force_patch_weights=force_patch_weights)

    model.partially_load = partially_load
    try:
        yield
    finally:
        if had_own:
            model.partially_load = previous
        else:
            del model.partially_load


def auto_budget(model: Any, noise_shape: Any, conds: Any) -> int | None:
    """Free memory after room for the full (CFG-batched) activation estimate and ComfyUI's reserve.

    ComfyUI itself only reserves the single-batch minimum, which is what runs out first at large sizes.
    None on a CPU device, where there is no VRAM to budget.
    """
    device = compat.load_device(model)
    if device.type == "cpu":
        return None
    mm = compat.model_management()
    helpers = compat.sampler_helpers()
    memory_required, _minimum = helpers.estimate_memory(model, noise_shape, conds)
    free = mm.get_free_memory(device) + (model.loaded_size() if is_loaded(model) else 0)
    return max(0, int(free - memory_required - mm.minimum_inference_memory()))


def is_loaded(model: Any) -> bool:
    mm = compat.model_management()
    return any(lm.model is model for lm in mm.current_loaded_models)


def apply_offload(model: Any, vram_budget_gb: float, engine: str = "comfy") -> tuple[Any, str]:
    """A clone of `model` whose sampling-time load is held to the budget; and a summary."""
    budget = budget_from_gb(vram_budget_gb)
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    out = patch.clone(model)
    wrapper = BudgetedPrepareSampling(budget, engine)
    patch.set_wrapper(out, compat.wrappers_mp().PREPARE_SAMPLING, WRAPPER_NAME, wrapper)
    return out, summary(out, budget, engine)


def summary(model: Any, budget: int | None, engine: str) -> str:
    """For the user, on the node: what stays in VRAM, what streams, what it costs, what to try next."""
    size = format_bytes(model.model_size())
    device = compat.load_device(model)
    how = f"Sequential offload ({ENGINE_LABELS[engine]})"
    if compat.is_dynamic(model):
        return (f"{how}: Dynamic VRAM is active on {device}, so ComfyUI already keeps in VRAM only what fits of "
                f"this {size} model and streams the rest on demand; the budget is not applied (nothing to do "
                "here).\nTo need less VRAM: 'Quantize weights (FP8/INT8)' halves the weights.")
    if budget is None:
        return (f"{how}, auto budget: when sampling starts, this {size} model keeps in VRAM what fits after the "
                "activations of this image size and ComfyUI's reserve; the rest is streamed from RAM per layer "
                "each step.\nCost: streamed layers are copied every step, so steps get slower the more streams."
                "\nStill out of memory? Set vram_budget_gb lower, or quantize the weights first.")
    plan = offload_plan.plan(model, budget)
    lines = [f"{how}, budget {budget / GB:.2f} GB: {plan.describe(str(device))}."]
    if plan.streamed:
        lines.append(f"That keeps {format_bytes(plan.streamed_bytes)} of weights out of VRAM. Cost: they are "
                     "copied from RAM every step, so steps are slower the more streams.")
        lines.append("Still out of memory? Lower vram_budget_gb; 'Quantize weights (FP8/INT8)' first halves "
                     "what there is to stream.")
    else:
        lines.append("Nothing streams, so steps run at full speed; lower vram_budget_gb to free VRAM for "
                     "larger images.")
    if device.type == "cpu":
        lines.append("(This device is the CPU: the weights are in RAM either way.)")
    return "\n".join(lines)
