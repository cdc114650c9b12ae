"""Measure what a sampling run costs: peak memory and time per step ("Measure VRAM" / "VRAM report").

"Measure VRAM" adds an ``OUTER_SAMPLE`` wrapper (and an ``ON_PRE_RUN`` callback) to a clone. Each sampling
run with that model records the peak device memory (CUDA: ``torch.cuda.max_memory_allocated`` after a reset;
CPU: the process's peak resident memory), the load time, the time of every step, and the weights ComfyUI
kept resident. The record is filed under a fingerprint of the sampler's output latent; "VRAM report", fed
with that latent, looks it up and shows it. This is how a user turns on one optimization at a time and
watches what it changes.
"""

from __future__ import annotations

import collections
import itertools
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import budget, compat, display, patch
from .display import format_bytes

WRAPPER_NAME = "measure"
#: The report's last line.
COMPARE_HINT = "To compare: change one thing (a VRAMKit node), run again, and read this report again."
#: Recent measurements, newest last (a report looks them up by the latent they produced).
RECENT: collections.deque[Measurement] = collections.deque(maxlen=64)


@dataclass
class Measurement:
    label: str
    device: str
    peak_kind: str
    peak_bytes: int
    start_bytes: int
    steps: int
    step_seconds: list[float] = field(default_factory=list)
    load_seconds: float = 0.0
    total_seconds: float = 0.0
    model_bytes: int = 0
    resident_bytes: int = 0
    latent_shape: tuple[int, ...] = ()
    fingerprint: tuple[float, float] = (0.0, 0.0)
    #: This model's weights already resident when sampling started (loaded by an earlier run).
    resident_start_bytes: int = 0
    #: The device's memory (VRAM, or system RAM on a CPU); 0 when unknown.
    capacity_bytes: int = 0
    #: The VRAM budget a VRAMKit node held this model to, if any.
    budget_bytes: int | None = None

    @property
    def seconds_per_step(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else 0.0

    def summary(self) -> str:
        """For the user, on the report node: the peak, the speed, and where this model's weights were."""
        head = f"{self.label}: " if self.label else ""
        memory = "VRAM" if self.peak_kind.endswith("VRAM") else "RAM"
        lines = [f"{head}peak {self.peak_kind} {format_bytes(self.peak_bytes)} on {self.device} while sampling "
                 f"({format_bytes(max(self.peak_bytes - self.start_bytes, 0))} above what was in use before); "
                 f"{self.steps} steps at {self.seconds_per_step:.3f} s/step (median), {self.total_seconds:.2f} s "
                 f"in all, {self.load_seconds:.2f} s of it loading."]
        if self.model_bytes:
            where = "all of them" if self.resident_bytes >= self.model_bytes else "the rest streamed each step"
            lines.append(f"This model's weights: {format_bytes(self.resident_bytes)} of "
                         f"{format_bytes(self.model_bytes)} stayed in {memory} ({where}).")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds_per_step"] = self.seconds_per_step
        d["latent_shape"] = list(self.latent_shape)
        d["fingerprint"] = list(self.fingerprint)
        return d

    def chart(self) -> dict[str, Any]:
        """The peak split into what this model's weights, other memory and sampling took (display format).

        Measured as: other = what was in use before sampling less this model's weights already resident;
        weights = this model's resident weights after the run; working memory = the rest of the peak
        (activations, attention and streaming buffers, which one peak counter cannot tell apart).
        """
        other = max(self.start_bytes - self.resident_start_bytes, 0)
        resident = min(self.resident_bytes, max(self.peak_bytes - other, 0))
        working = max(self.peak_bytes - other - resident, 0)
        memory = "VRAM" if self.peak_kind.endswith("VRAM") else "RAM"
        other_label = "other memory in use (other models, ...)" if memory == "VRAM" else \
            "process before sampling (Python, torch, other models)"
        measured = display.bar("measured", {"other_models": other, "resident_weights": resident,
                                            "working": working},
                               labels={"other_models": other_label,
                                       "resident_weights": f"this model's weights in {memory}"})
        return display.memory_chart(
            f"{memory} at the sampling peak", [measured], device=self.device,
            capacity_bytes=self.capacity_bytes or None, budget_bytes=self.budget_bytes,
            capacity_label="capacity" if memory == "VRAM" else "system RAM", budget_label="weights budget")


def fingerprint(latent: torch.Tensor) -> tuple[float, float]:
    x = latent.detach().to("cpu", torch.float64)
    return float(x.sum()), float(x.abs().sum())


def find(latent: torch.Tensor) -> Measurement | None:
    """The newest measurement whose output is `latent` (same shape, same values to float32 rounding)."""
    shape = tuple(latent.shape)
    total, absolute = fingerprint(latent)
    for m in reversed(RECENT):
        if m.latent_shape != shape:
            continue
        tol = 1e-5 * max(absolute, 1e-12)
        if abs(m.fingerprint[0] - total) <= tol and abs(m.fingerprint[1] - absolute) <= tol:
            return m
    return None


# --- peak memory ---------------------------------------------------------------------------------------------

class PeakProbe:
    """Peak memory between `start` and `stop`: the CUDA allocator's peak, or the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "allocated VRAM" if device.type == "cuda" else "process RAM"
        self._sampler: _RssSampler | None = None
        self.start_bytes = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return
        self.start_bytes = _rss()
        if not _reset_peak_rss():
            self._sampler = _RssSampler()
            self._sampler.start()

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._sampler is not None:
            return self._sampler.stop()
        return max(_peak_rss(), self.start_bytes)


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int:
    value = _status_kb("VmRSS")
    if value is not None:
        return value
    import psutil  # a ComfyUI dependency

    return int(psutil.Process().memory_info().rss)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _peak_rss() -> int:
    return _status_kb("VmHWM") or _rss()


class _RssSampler(threading.Thread):
    """Polls RSS every 5 ms where the kernel cannot reset its peak counter."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="vramkit-rss")
        self.peak = _rss()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, _rss())


def device_capacity(device: torch.device) -> int:
    """Total memory of `device`: VRAM for CUDA, system RAM for the CPU; 0 when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[1])
        if device.type == "cpu":
            import psutil  # a ComfyUI dependency

            return int(psutil.virtual_memory().total)
    except Exception:  # a display nicety: never fail a measurement over it
        return 0
    return 0


def _budget(patcher: Any) -> int | None:
    """The resident budget a VRAMKit offload wrapper applied to `patcher` in this run, if any."""
    try:
        wrappers = patcher.get_wrappers(compat.wrappers_mp().PREPARE_SAMPLING, patch.key(budget.WRAPPER_NAME))
    except Exception:
        return None
    for wrapper in wrappers:
        last = getattr(wrapper, "last", None)
        applied = getattr(last, "budget_bytes", None)
        if isinstance(applied, int) and applied > 0:
            return applied
    return None


# --- the wrapper -------------------------------------------------------------------------------------------

class MeasureSampling:
    """``OUTER_SAMPLE`` wrapper + ``ON_PRE_RUN`` callback recording one `Measurement` per sampling run."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self._pre_run: float | None = None

    def on_pre_run(self, patcher: Any) -> None:
        self._pre_run = time.perf_counter()

    def __call__(self, executor: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        guider = executor.class_obj
        patcher = guider.model_patcher
        device = compat.load_device(patcher)
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        stamps: list[float] = []
        callback_at = 5
        user_callback = args[callback_at] if len(args) > callback_at else kwargs.get("callback")

        def timed(step: int, x0: Any, x: Any, total: int) -> Any:
            stamps.append(time.perf_counter())
            if user_callback is not None:
                return user_callback(step, x0, x, total)
            return None

        if len(args) > callback_at:
            args = (*args[:callback_at], timed, *args[callback_at + 1:])
        else:
            kwargs["callback"] = timed
        probe = PeakProbe(device)
        self._pre_run = None
        resident_start = int(patcher.loaded_size())
        probe.start()
        started = time.perf_counter()
        output = executor(*args, **kwargs)
        ended = time.perf_counter()
        peak = probe.stop()
        pre_run = self._pre_run or started
        edges = [pre_run, *stamps]
        record = Measurement(
            label=self.label, device=str(device), peak_kind=probe.kind, peak_bytes=peak,
            start_bytes=probe.start_bytes, steps=max(len(sigmas) - 1, 0),
            step_seconds=[b - a for a, b in itertools.pairwise(edges)], load_seconds=pre_run - started,
            total_seconds=ended - started, model_bytes=int(patcher.model_size()),
            resident_bytes=int(patcher.loaded_size()), latent_shape=tuple(output.shape),
            fingerprint=fingerprint(output), resident_start_bytes=resident_start,
            capacity_bytes=device_capacity(device),
            budget_bytes=_budget(patcher) if device.type == "cuda" else None)
        RECENT.append(record)
        return output


def apply_measure(model: Any, label: str = "") -> Any:
    """A clone of `model` whose sampling runs are measured."""
    out = patch.clone(model)
    wrapper = MeasureSampling(label.strip())
    patch.set_wrapper(out, compat.wrappers_mp().OUTER_SAMPLE, WRAPPER_NAME, wrapper)
    patch.set_callback(out, compat.callbacks_mp().ON_PRE_RUN, WRAPPER_NAME, wrapper.on_pre_run)
    return out


def report(latent: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """The text and numbers for the measurement that produced `latent` (a LATENT dict); the chart is
    ``find(...).chart()``."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise TypeError(f"samples must be a LATENT (a dict with a 'samples' tensor), got {type(latent).__name__}")
    found = find(latent["samples"])
    if found is None:
        return ("No measurement matches this latent: put 'Measure VRAM' between the model and the sampler that "
                "produced it, and run the sampler again.", None)
    return found.summary(), found.as_dict()
