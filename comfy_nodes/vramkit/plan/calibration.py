"""Calibration: after a measured run, how far the prediction was off, cached per model, device and job size
so that the next plan of the same job uses it (``job["activation_scale"]``, ``job["time_scale"]``).

The cache is ``$VRAMKIT_CACHE_DIR/calibration.json`` (default ``~/.cache/vramkit``), written whole or not
at all. Scales are clamped to [0.25, 4]: a measurement that far off says something else went wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .device import cache_path, write_json_atomic

_LIMITS = (0.25, 4.0)


@dataclass(frozen=True)
class Miss:
    """A measured run against its plan."""

    predicted_peak_bytes: int
    measured_peak_bytes: int
    predicted_step_seconds: float
    measured_step_seconds: float
    activation_scale: float
    time_scale: float

    def text(self) -> str:
        def pct(measured: float, predicted: float) -> str:
            return f"{100 * (measured / predicted - 1):+.0f}%" if predicted > 0 else "n/a"

        return (f"Calibration: peak {self.measured_peak_bytes / 2**30:.2f} GiB measured vs "
                f"{self.predicted_peak_bytes / 2**30:.2f} GiB predicted "
                f"({pct(self.measured_peak_bytes, self.predicted_peak_bytes)}), step "
                f"{self.measured_step_seconds:.3f} s vs {self.predicted_step_seconds:.3f} s "
                f"({pct(self.measured_step_seconds, self.predicted_step_seconds)}); the next plan of this job "
                f"scales activations x{self.activation_scale:.2f} and time x{self.time_scale:.2f}.")


def path() -> Path:
    return cache_path().with_name("calibration.json")


def key(model: str, device: str, job: dict[str, Any]) -> str:
    return (f"{model}|{device}|{job.get('width')}x{job.get('height')}x{job.get('frames', 1)}"
            f"|b{job.get('batch', 1)}")


def _clamp(x: float) -> float:
    return min(max(x, _LIMITS[0]), _LIMITS[1])


def _load() -> dict[str, Any]:
    try:
        data = json.loads(path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def lookup(cache_key: str) -> dict[str, float]:
    """``{"activation_scale", "time_scale"}`` for a job measured before, else {}."""
    hit = _load().get(cache_key)
    if not isinstance(hit, dict):
        return {}
    try:
        return {"activation_scale": _clamp(float(hit["activation_scale"])),
                "time_scale": _clamp(float(hit["time_scale"]))}
    except (KeyError, TypeError, ValueError):
        return {}


def record(cache_key: str, plan: dict[str, Any], measured_peak_bytes: int, measured_step_seconds: float,
           previous: dict[str, float] | None = None) -> Miss:
    """Compares a run with the plan it ran (`Plan.__dict__`-like: predicted_peak_bytes, components,
    predicted_step_seconds) and caches the corrected scales. The activation scale explains the whole peak
    miss by the activations (weights and reserve are known exactly); `previous` scales already applied to
    the plan are compounded."""
    previous = previous or {}
    predicted_peak = int(plan["predicted_peak_bytes"])
    activations = max(int(plan["components"].get("activations", 0)), 1)
    predicted_s = float(plan["predicted_step_seconds"])
    act = _clamp((activations + measured_peak_bytes - predicted_peak) / activations
                 * previous.get("activation_scale", 1.0))
    tim = _clamp((measured_step_seconds / predicted_s if predicted_s > 0 else 1.0) * previous.get("time_scale", 1.0))
    miss = Miss(predicted_peak, int(measured_peak_bytes), predicted_s, float(measured_step_seconds), act, tim)
    data = _load()
    data[cache_key] = asdict(miss)
    write_json_atomic(path(), data)
    return miss
