"""A per-model VRAM budget: at most this many bytes of one model's weights stay resident in VRAM, the rest is
streamed from RAM by ComfyUI itself, under either of ComfyUI's memory managers.

- **Dynamic VRAM** (``ModelPatcherDynamic``, comfy-aimdo; ComfyUI 0.29+'s default on NVIDIA): each model has a
  VBAR, a virtual address range whose 32 MiB pages fault into VRAM when a layer runs; pages above the VBAR's
  *watermark* fault "OOM" and the layer is streamed through aimdo's cast buffer instead. Every load calls
  ``vbar.prioritize()``, which resets the watermark to the whole model, then runs the ``ON_LOAD`` callbacks.
  The budget is an ``ON_LOAD`` callback on the clone that sets ``model.dynamic_vbars[device].set_watermark``
  to the budget (less the small weights ComfyUI loads as ordinary tensors, rounded down to whole pages), so it
  is applied again after every load that re-prioritises the model. Past the small modules, the largest layers
  sit at the lowest addresses, so they are the ones that stay.
- **Legacy loader** (``ModelPatcher``; ComfyUI 0.3.7x, ``--disable-dynamic-vram``, non-NVIDIA): ComfyUI sizes
  a model's resident part when it loads it (``partially_load(device, extra_memory)``). A ``PREPARE_SAMPLING``
  wrapper caps that number at the budget for the duration of the load (`clamp_resident`).

**Auto** (budget None or 0) is decided inside the load, after ``load_models_gpu`` has evicted what it will
evict: ComfyUI's own free-memory figure for the patcher (under Dynamic VRAM it counts the pages aimdo can
reclaim from other models) plus what this model already holds, less the reserve ComfyUI itself keeps for the
run, ``max(minimum_inference_memory(), memory_required + extra_reserved_memory())``, with ``memory_required``
the sampling run's activation estimate for the CFG batch (``estimate_memory``; ComfyUI's legacy loader sizes
the model against the single-batch minimum only, which is what runs out first at large sizes).

When comfy-aimdo's watermark API is missing or changed, `apply_vram_budget` switches the model to the legacy
loader with ``clone(disable_dynamic=True)`` where the loader allows it (``cached_patcher_init``), and otherwise
returns the model unbudgeted with a plan that says so (``applied=False`` and the reason).

The API the planner and the GPU check use (names kept stable):

- ``apply_vram_budget(model, budget_bytes) -> (clone, BudgetPlan)``: the budgeted clone and what it will do.
- ``residency(model) -> Residency``: after a load, who was in charge, the budget in force, the bytes resident
  and streamed, and whether the cap was applied (and why not).
- ``apply_offload(model, vram_budget_gb) -> (clone, summary)``: the node's entry (GB input, text summary).
- ``BudgetedPrepareSampling(budget_bytes)``: the same cap for one sampling run, as a ``PREPARE_SAMPLING``
  wrapper a caller puts into that run's model_options (the Auto node's out-of-memory safety net).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from . import compat, offload_plan, patch
from .display import format_bytes

log = logging.getLogger("vramkit.comfy")

GB = 1024**3
MB = 1024**2
#: The largest budget accepted (more memory than any device has).
_MAX_BUDGET_GB = 4096
#: The key (``vramkit.offload``) of the wrapper and callback on a budgeted clone.
WRAPPER_NAME = "offload"

Mechanism = Literal["vbar_watermark", "lowvram_clamp", "none"]
MANAGER_LABELS = {"dynamic": "Dynamic VRAM (comfy-aimdo)", "legacy": "ComfyUI's legacy loader"}


def budget_bytes(amount: float, unit: str, input_name: str) -> int:
    """A node's memory budget input (`amount` of "MB" or "GB") in bytes; 0 means auto. A value that is not a
    number, negative, or more memory than any device has gets a clear error naming `input_name`."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"{input_name} must be a number of {unit}, got {type(amount).__name__}")
    if amount < 0:
        raise ValueError(f"{input_name} must be 0 (auto) or a positive number of {unit}, got {amount}")
    size = {"MB": MB, "GB": GB}[unit]
    if amount * size > _MAX_BUDGET_GB * GB:
        raise ValueError(f"{input_name} = {amount} {unit} is more memory than any device has; 0 means auto")
    return int(amount * size)


def budget_from_gb(gb: float, input_name: str = "vram_budget_gb") -> int | None:
    """The offload node's budget in bytes; None for 0 (auto)."""
    return budget_bytes(gb, "GB", input_name) or None


def check_budget(budget: int | None, input_name: str = "budget_bytes") -> int | None:
    """`budget` as the API takes it: a whole number of bytes, None or 0 for auto (returned as None)."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"{input_name} must be a whole number of bytes or None (auto), got "
                        f"{type(budget).__name__}")
    if budget < 0:
        raise ValueError(f"{input_name} must be None or 0 (auto) or a positive number of bytes, got {budget}")
    if budget > _MAX_BUDGET_GB * GB:
        raise ValueError(f"{input_name} = {budget} is more memory than any device has; None or 0 means auto")
    return budget or None


def _mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


@dataclass(frozen=True)
class BudgetPlan:
    """What `apply_vram_budget` set up, known before anything loads."""

    manager: compat.MemoryManager
    """The memory manager that will load the clone: "dynamic" or "legacy"."""
    device: str
    budget_bytes: int | None
    """The budget asked for; None: auto, decided inside each load."""
    model_bytes: int
    mechanism: Mechanism
    """"vbar_watermark" (Dynamic VRAM), "lowvram_clamp" (legacy loader) or "none" (the cap cannot be applied)."""
    applied: bool
    """Whether a cap will be applied when the model loads."""
    reason: str
    """Why the cap cannot be applied, or how it is applied when VRAMKit had to switch loaders; "" otherwise."""
    fell_back: bool
    """The model was moved from Dynamic VRAM to the legacy loader (``clone(disable_dynamic=True)``)."""
    prediction: offload_plan.OffloadPlan | None
    """For a fixed budget: the layers that will stay and those that will stream (None for auto)."""
    watermark_bytes: int | None
    """Dynamic VRAM, fixed budget: the VBAR cap the budget becomes (whole pages)."""

    def describe(self) -> str:
        """The node's summary, for users: the memory manager in charge, the budget, what stays in VRAM and what
        streams, what it costs, what to try next; or, plainly, that the budget cannot be applied and why.
        (The mechanics, e.g. the VBAR cap in pages, go to the log.)"""
        manager = MANAGER_LABELS[self.manager]
        size = format_bytes(self.model_bytes)
        if not self.applied:
            asked = "auto" if self.budget_bytes is None else format_bytes(self.budget_bytes)
            return "\n".join([
                f"Sequential offload under {manager}: the VRAM budget ({asked}) could NOT be applied: "
                f"{self.reason}.",
                f"ComfyUI loads this {size} model as it would without the node (Dynamic VRAM still streams "
                "what does not fit).",
                "To hold it to a budget: load it with a core loader (Load Diffusion Model, Load Checkpoint), so "
                "VRAMKit can move it to the legacy loader, or start ComfyUI with --disable-dynamic-vram."])
        lines: list[str] = []
        if self.budget_bytes is None:
            lines.append(f"Sequential offload under {manager}, auto budget: when sampling starts, after ComfyUI "
                         f"has freed what it will (e.g. the text encoder), this {size} model keeps in VRAM what "
                         "fits beside the activations of this image size and ComfyUI's reserve, largest layers "
                         "first; the rest streams from RAM each step.")
            streams: bool | None = None
        else:
            p = self.prediction
            assert p is not None
            budget = format_bytes(self.budget_bytes)
            if self.mechanism == "vbar_watermark":
                if p.full_load:
                    what = f"the whole {size} model fits and stays in VRAM"
                else:
                    total = len(p.resident) + len(p.streamed)
                    what = (f"{len(p.resident)} of {total} layers ({format_bytes(p.resident_bytes)}: the small "
                            f"ones, then the largest) stay in VRAM; {len(p.streamed)} "
                            f"({format_bytes(p.streamed_bytes)}) stream from RAM each step")
                    if self.watermark_bytes == 0:
                        what += " (a budget under 32 MB holds no large layer: they all stream)"
            else:
                what = p.describe(self.device)
            lines.append(f"Sequential offload under {manager}, budget {budget}: {what}.")
            streams = bool(p.streamed)
        if self.fell_back:
            lines.append("VRAMKit moved this model from Dynamic VRAM to ComfyUI's legacy loader "
                         f"(clone(disable_dynamic=True)): {self.reason}.")
        if streams is False:
            lines.append("Nothing streams, so steps run at full speed; lower vram_budget_gb to free VRAM for "
                         "larger images.")
        else:
            if streams:
                assert self.prediction is not None
                lines.append(f"That keeps {format_bytes(self.prediction.streamed_bytes)} of weights out of VRAM. "
                             "Cost: they are copied from RAM every step, so steps are slower the more streams.")
            else:
                lines.append("Cost: streamed layers are copied every step, so steps get slower the more streams.")
            lines.append("Still out of memory? Lower vram_budget_gb; 'Quantize weights (FP8/INT8)' first halves "
                         "what there is to stream.")
        if self.device == "cpu":
            lines.append("(This device is the CPU: the weights are in RAM either way.)")
        return "\n".join(lines)


@dataclass
class Residency:
    """What the last load of a budgeted model did, read live: `residency(model)`."""

    manager: compat.MemoryManager
    """The memory manager that loaded the model."""
    device: str
    requested_bytes: int | None
    """The budget asked for (None: auto)."""
    budget_bytes: int | None
    """The budget in force at the last load (auto resolved there); None before a load or where none applies."""
    resident_bytes: int
    """ComfyUI's ``loaded_size()`` now: VRAM pages and tensors the model holds."""
    streamed_bytes: int
    """The model's bytes that are not resident (``model_size() - loaded_size()``): streamed when they run."""
    model_bytes: int
    cap_applied: bool
    """The cap was in force after the last load."""
    reason: str
    """Why the cap was not applied (or the caveat that came with it); "" otherwise."""
    watermark_bytes: int | None = None
    """Dynamic VRAM: the VBAR cap set at the last load."""
    loads: int = 0
    """Loads that went through the budget so far (each re-applies the cap)."""
    free_bytes: int | None = None
    """Auto: ComfyUI's free-memory figure read inside the load."""
    reserve_bytes: int | None = None
    """Auto: what was kept free for the run (ComfyUI's reserve with this run's CFG-batch activation estimate)."""
    loaded: bool = False
    """False until the model has loaded with the budget."""

    def describe(self) -> str:
        manager = MANAGER_LABELS[self.manager]
        if not self.loaded:
            return f"{manager}: not loaded yet with the budget"
        asked = "auto" if self.requested_bytes is None else f"{_mb(self.requested_bytes)}"
        budget = "none" if self.budget_bytes is None else _mb(self.budget_bytes)
        text = (f"{manager}: budget {budget} (asked: {asked}); resident {_mb(self.resident_bytes)} of "
                f"{_mb(self.model_bytes)}, {_mb(self.streamed_bytes)} streams")
        if self.watermark_bytes is not None:
            text += f"; VBAR cap {_mb(self.watermark_bytes)}"
        text += "; cap applied" if self.cap_applied else f"; cap NOT applied: {self.reason}"
        return text


@dataclass
class _LoadFacts:
    manager: compat.MemoryManager = "legacy"
    budget_bytes: int | None = None
    watermark_bytes: int | None = None
    cap_applied: bool = False
    reason: str = ""
    loads: int = 0
    free_bytes: int | None = None
    reserve_bytes: int | None = None


@dataclass(eq=False)
class BudgetHook:
    """The state behind one budgeted clone: its ``PREPARE_SAMPLING`` wrapper and ``ON_LOAD`` callback (bound
    methods of this object, registered under ``vramkit.offload``; clones of the clone inherit them) and, per
    patcher that loaded with it, what the last load did."""

    requested: int | None
    """The cap in bytes (0 is a cap: nothing resident); None: auto, decided inside each load."""
    mechanism: Mechanism
    reason: str = ""
    """Why the cap cannot be applied (mechanism "none")."""
    _estimates: weakref.WeakKeyDictionary[Any, int] = field(default_factory=weakref.WeakKeyDictionary)
    _facts: weakref.WeakKeyDictionary[Any, _LoadFacts] = field(default_factory=weakref.WeakKeyDictionary)

    def facts(self, patcher: Any) -> _LoadFacts | None:
        return self._facts.get(patcher)

    # -- the wrapper: remembers the activation estimate for the load; on the legacy loader, caps it -------

    def prepare_sampling(self, executor: Callable[..., Any], model: Any, noise_shape: Any, conds: Any,
                         *args: Any, **kwargs: Any) -> Any:
        try:
            self._estimates[model] = compat.memory_estimate(model, noise_shape, conds)
        except Exception as exc:  # an estimate we cannot make must not stop sampling: reserve the minimum
            log.warning("VRAMKit budget: no activation estimate (%s: %s); reserving ComfyUI's minimum only",
                        type(exc).__name__, exc)
            self._estimates.pop(model, None)
        try:
            if compat.is_dynamic(model) or self.mechanism == "none":
                return executor(model, noise_shape, conds, *args, **kwargs)  # the ON_LOAD callback does it
            with clamp_resident(model, lambda: self._legacy_budget(model)):
                return executor(model, noise_shape, conds, *args, **kwargs)
        finally:
            self._estimates.pop(model, None)

    def _legacy_budget(self, model: Any) -> int | None:
        """The legacy cap, resolved when ComfyUI's loader asks (after its evictions)."""
        facts = self._facts.setdefault(model, _LoadFacts())
        facts.manager = "legacy"
        budget = self.requested
        facts.free_bytes = facts.reserve_bytes = None
        if budget is None:
            device = compat.load_device(model)
            if device.type == "cpu":
                facts.budget_bytes, facts.cap_applied = None, False
                facts.reason = "the device is the CPU: the weights are in RAM either way, nothing to cap"
                return None
            free, reserve = compat.free_memory(model, device), self._reserve(model)
            budget = max(0, free + int(model.loaded_size()) - reserve)
            facts.free_bytes, facts.reserve_bytes = free, reserve
        facts.budget_bytes, facts.cap_applied, facts.reason = budget, True, ""
        facts.loads += 1
        return budget

    def _reserve(self, model: Any) -> int:
        """What a sampling run needs besides the weights: ComfyUI's own reserve in ``load_models_gpu``
        (``max(minimum_inference_memory(), memory_required + extra_reserved_memory())``) with the CFG-batch
        activation estimate of this run; outside sampling (no estimate), the minimum."""
        mm = compat.model_management()
        required = self._estimates.get(model)
        minimum = int(mm.minimum_inference_memory())
        if required is None:
            return minimum
        return max(minimum, int(required) + int(mm.extra_reserved_memory()))

    # -- the ON_LOAD callback: under Dynamic VRAM, caps the VBAR after prioritize() -----------------------

    def on_load(self, patcher: Any, device_to: Any = None, *args: Any) -> None:
        if not compat.is_dynamic(patcher):
            return  # the legacy cap happened inside the load (clamp_resident)
        facts = self._facts.setdefault(patcher, _LoadFacts())
        facts.manager = "dynamic"
        try:
            self._cap_vbar(patcher, facts)
        except Exception as exc:  # never break ComfyUI's load: say what went wrong instead
            facts.cap_applied, facts.watermark_bytes = False, None
            facts.reason = f"capping the VBAR failed: {type(exc).__name__}: {exc}"
            log.warning("VRAMKit budget: %s", facts.reason)

    def _cap_vbar(self, patcher: Any, facts: _LoadFacts) -> None:
        forced = compat.forced_resident_bytes(patcher)
        budget = self.requested
        facts.free_bytes = facts.reserve_bytes = None
        if budget is None:
            free, reserve = compat.free_memory(patcher, compat.load_device(patcher)), self._reserve(patcher)
            # `free` already counts this model's own VBAR pages (aimdo can reclaim them); its ordinary
            # tensors were allocated by this load, so they are added back.
            budget = max(0, free + forced - reserve)
            facts.free_bytes, facts.reserve_bytes = free, reserve
        facts.budget_bytes = budget
        if self.mechanism != "vbar_watermark":
            facts.cap_applied, facts.reason = False, self.reason
            return
        watermark = offload_plan.watermark_for(budget, forced)
        effective, problem = compat.set_vbar_watermark(patcher, watermark)
        facts.loads += 1
        if problem is not None:
            facts.cap_applied, facts.watermark_bytes, facts.reason = False, effective, problem
            log.warning("VRAMKit budget: the VBAR cap could not be applied: %s", problem)
            return
        facts.cap_applied, facts.watermark_bytes = True, effective
        facts.reason = ""
        if forced > budget:
            facts.reason = (f"ComfyUI keeps {_mb(forced)} of small weights and buffers resident outside the VBAR, "
                            f"more than the budget; every large layer streams")
        log.info("VRAMKit budget: %s VBAR capped at %s (budget %s%s)", type(patcher.model).__name__,
                 _mb(watermark), _mb(budget), ", auto" if self.requested is None else "")


@contextlib.contextmanager
def clamp_resident(model: Any, budget: int | Callable[[], int | None]) -> Iterator[None]:
    """While ComfyUI's legacy loader loads `model`, cap what it may keep resident at `budget` bytes.

    ComfyUI grows a model's resident part through ``partially_load(device, extra_memory)`` (and trims it when
    ``extra_memory`` is negative); the cap is applied to that one number, on this patcher object only, for
    the duration of the load. `budget` may be a function, called when ComfyUI's loader asks (after
    ``load_models_gpu`` evicted other models); it returning None leaves the load alone. An instance attribute
    of that name that was there before (another pack's wrapper) is called through and put back afterwards.
    """
    had_own = "partially_load" in vars(model)
    previous = vars(model).get("partially_load")
    original = model.partially_load

    def partially_load(device_to: Any, extra_memory: float = 0, force_patch_weights: bool = False) -> Any:
        cap = budget() if callable(budget) else budget
        if cap is not None:
            extra_memory = min(extra_memory, cap - model.loaded_size())
        return original(device_to, extra_memory, force_patch_weights=force_patch_weights)

    model.partially_load = partially_load
    try:
        yield
    finally:
        if had_own:
            model.partially_load = previous
        else:
            del model.partially_load


def apply_vram_budget(model: Any, budget_bytes: int | None) -> tuple[Any, BudgetPlan]:
    """A clone of `model` whose resident weights are held to `budget_bytes` (None or 0: auto, decided inside
    each load) under whichever memory manager loads it, and the plan saying how (or why it cannot be).

    The input model is not changed. Calling it on a clone it returned replaces the earlier budget.
    """
    requested = check_budget(budget_bytes)
    out = patch.clone(model)
    device = compat.load_device(out)
    mechanism: Mechanism = "lowvram_clamp"
    reason, fell_back = "", False
    if compat.is_dynamic(out):
        mechanism = "vbar_watermark"
        problem = compat.vbar_watermark_problem(out)
        if problem is not None:
            legacy, why = compat.legacy_clone(model)
            if legacy is not None:
                out, mechanism, fell_back = legacy, "lowvram_clamp", True
                reason = f"{problem}; the legacy loader honours the budget (ComfyUI re-created the model from its file)"
            else:
                mechanism = "none"
                reason = f"{problem}, and VRAMKit cannot switch it to the legacy loader ({why})"
            log.warning("VRAMKit budget: %s", reason)
    manager = compat.memory_manager(out)
    prediction = watermark = None
    if requested is not None and mechanism == "lowvram_clamp":
        prediction = offload_plan.plan(out, requested)
    elif requested is not None and mechanism == "vbar_watermark":
        prediction, watermark = offload_plan.plan_dynamic_budget(out, requested)
    plan = BudgetPlan(manager=manager, device=str(device), budget_bytes=requested, model_bytes=int(out.model_size()),
                      mechanism=mechanism, applied=mechanism != "none", reason=reason, fell_back=fell_back,
                      prediction=prediction, watermark_bytes=watermark)
    hook = BudgetHook(requested, mechanism, reason if mechanism == "none" else "")
    patch.set_wrapper(out, compat.wrappers_mp().PREPARE_SAMPLING, WRAPPER_NAME, hook.prepare_sampling)
    patch.set_callback(out, compat.callbacks_mp().ON_LOAD, WRAPPER_NAME, hook.on_load)
    return out, plan


def budget_hook(model: Any) -> BudgetHook | None:
    """The budget a model carries (its own or inherited from the clone it was made from), or None."""
    for callback in model.get_callbacks(compat.callbacks_mp().ON_LOAD, patch.key(WRAPPER_NAME)):
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, BudgetHook):
            return owner
    return None


def residency(model: Any) -> Residency:
    """What the last load of `model` did under its budget, with ComfyUI's live resident bytes: the manager in
    charge, the budget in force (auto resolved), resident and streamed bytes, and whether the cap was
    applied and why not. Read it right after sampling; a model without a budget reports none."""
    manager = compat.memory_manager(model)
    size = int(model.model_size())
    resident = int(model.loaded_size())
    hook = budget_hook(model)
    base = Residency(manager=manager, device=str(compat.load_device(model)), requested_bytes=None,
                     budget_bytes=None, resident_bytes=resident, streamed_bytes=max(0, size - resident),
                     model_bytes=size, cap_applied=False, reason="this model has no VRAMKit budget")
    if hook is None:
        return base
    base.requested_bytes = hook.requested
    facts = hook.facts(model)
    if facts is None:
        base.reason = hook.reason or "not loaded with the budget yet"
        return base
    base.manager = facts.manager
    base.budget_bytes, base.watermark_bytes = facts.budget_bytes, facts.watermark_bytes
    base.cap_applied, base.reason, base.loads = facts.cap_applied, facts.reason, facts.loads
    base.free_bytes, base.reserve_bytes, base.loaded = facts.free_bytes, facts.reserve_bytes, True
    return base


def apply_offload(model: Any, vram_budget_gb: float) -> tuple[Any, str]:
    """The "Sequential offload" node: `apply_vram_budget` with the budget in GB (0 = auto), and a summary."""
    out, plan = apply_vram_budget(model, budget_from_gb(vram_budget_gb))
    text = plan.describe()
    cap = ("" if plan.watermark_bytes is None
           else f"; VBAR cap {plan.watermark_bytes // compat.AIMDO_PAGE_BYTES} pages of 32 MiB")
    log.info("VRAMKit offload: manager %s, mechanism %s, budget %s%s%s", plan.manager, plan.mechanism,
             "auto" if plan.budget_bytes is None else _mb(plan.budget_bytes), cap,
             f"; {plan.reason}" if plan.reason else "")
    return out, text


class BudgetedPrepareSampling:
    """The budget for one sampling run: a ``PREPARE_SAMPLING`` wrapper for a caller that puts wrappers into
    that run's model_options (the Auto node's safety net caps the resident weights when it retries after an
    out-of-memory). Under the legacy loader it caps ComfyUI's load like `apply_vram_budget`; under Dynamic
    VRAM it adds the ``ON_LOAD`` cap to the patcher for the duration of the run's load. `budget_bytes` is
    taken as is (0: nothing resident); None is auto. `hook` keeps what the loads did (`BudgetHook.facts`)."""

    RUN_KEY = "offload.run"

    def __init__(self, budget_bytes: int | None) -> None:
        if budget_bytes is not None:
            budget_bytes = check_budget(budget_bytes) or 0
        self.budget_bytes = budget_bytes
        self.hook = BudgetHook(budget_bytes, "lowvram_clamp")

    def __call__(self, executor: Callable[..., Any], model: Any, noise_shape: Any, conds: Any,
                 *args: Any, **kwargs: Any) -> Any:
        if not compat.is_dynamic(model):
            self.hook.mechanism, self.hook.reason = "lowvram_clamp", ""
            return self.hook.prepare_sampling(executor, model, noise_shape, conds, *args, **kwargs)
        problem = compat.vbar_watermark_problem(model)
        self.hook.mechanism, self.hook.reason = ("none", problem) if problem else ("vbar_watermark", "")
        callbacks = compat.callbacks_mp()
        patch.set_callback(model, callbacks.ON_LOAD, self.RUN_KEY, self.hook.on_load)
        try:
            return self.hook.prepare_sampling(executor, model, noise_shape, conds, *args, **kwargs)
        finally:
            model.remove_callbacks_with_key(callbacks.ON_LOAD, patch.key(self.RUN_KEY))
