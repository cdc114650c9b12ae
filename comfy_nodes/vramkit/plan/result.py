"""The plan as Python sees it: a frozen dataclass built from `_core.plan_fit`'s dict, with `.text()` for
users and `.to_json()` for machines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3

_COMPONENT_LABELS = {
    "weights": "weights on the GPU",
    "streaming_buffers": "streaming/cast buffers",
    "activations": "activations",
    "attention": "attention",
    "text_encoder": "text encoder",
    "vae": "VAE",
    "reserve": "ComfyUI's reserve",
}


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def size(n: float) -> str:
    """GiB, MiB below one GiB, KiB below one MiB."""
    if n >= GIB:
        return gib(n)
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1000:.0f} ms"


@dataclass(frozen=True)
class Step:
    rung: str
    """The ladder rung: precision_16bit, efficient_attention, offload_text_encoder, offload_vae, weights_8bit,
    layer_streaming or attention_slicing."""
    action: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """What `plan_fit` decided, with the numbers behind it. ``predicted_peak_bytes`` is the peak while
    sampling (the sum of ``components``); the text-encode and VAE-decode phases are in ``phases``."""

    fits: bool
    steps: tuple[Step, ...]
    predicted_peak_bytes: int
    predicted_step_seconds: float
    components: dict[str, int]
    model: str
    device: str
    preset: str
    budget_bytes: int
    requested_budget_bytes: int
    min_budget_bytes: int
    ram_needed_bytes: int
    config: dict[str, Any]
    activations: dict[str, Any]
    phases: dict[str, int]
    time: dict[str, float]
    notes: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()
    job: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_core(cls, d: dict[str, Any], job: dict[str, Any]) -> Plan:
        return cls(
            fits=bool(d["fits"]),
            steps=tuple(Step(s["rung"], s["action"], s["reason"]) for s in d["steps"]),
            predicted_peak_bytes=int(d["predicted_peak_bytes"]),
            predicted_step_seconds=float(d["predicted_step_seconds"]),
            components={k: int(v) for k, v in d["components"].items()},
            model=d["model"], device=d["device"], preset=d["preset"],
            budget_bytes=int(d["budget_bytes"]), requested_budget_bytes=int(d["requested_budget_bytes"]),
            min_budget_bytes=int(d["min_budget_bytes"]), ram_needed_bytes=int(d["ram_needed_bytes"]),
            config=dict(d["config"]), activations=dict(d["activations"]), phases=dict(d["phases"]),
            time=dict(d["time"]), notes=tuple(d["notes"]), suggestions=tuple(d["suggestions"]), job=dict(job),
        )

    @property
    def rungs(self) -> tuple[str, ...]:
        return tuple(s.rung for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        """Exactly ``{"fits", "steps": [{"action", "reason"}], "predicted_peak_bytes",
        "predicted_step_seconds", "components"}``."""
        return {
            "fits": self.fits,
            "steps": [{"action": s.action, "reason": s.reason} for s in self.steps],
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_step_seconds": self.predicted_step_seconds,
            "components": dict(self.components),
        }

    def job_label(self) -> str:
        j = self.job
        size = f"{j.get('width', '?')}x{j.get('height', '?')}"
        if int(j.get("frames", 1)) > 1:
            size += f"x{j['frames']} frames"
        if int(j.get("batch", 1)) > 1:
            size += f", batch {j['batch']}"
        return size

    def text(self) -> str:
        """The plan for a user: verdict, steps with reasons, memory by component, time, notes."""
        head = f"{self.model} at {self.job_label()} on {size(self.budget_bytes)} ({self.device})"
        if self.preset != "auto":
            head += f", preset {self.preset}"
        lines = []
        if self.fits:
            lines.append(f"{head}: fits, ~{seconds(self.predicted_step_seconds)} per step, "
                         f"peak {size(self.predicted_peak_bytes)} while sampling.")
        else:
            lines.append(f"{head}: does NOT fit. The leanest plan peaks at {size(self.predicted_peak_bytes)} "
                         f"while sampling and needs a budget of {size(self.min_budget_bytes)}.")
        if not self.steps:
            lines.append("Nothing to apply: it fits as loaded, and every optimization would only cost speed."
                         if self.fits else "No step of the ladder applies.")
        else:
            lines.append("Steps (the least of the ladder that fits, in ladder order):" if self.fits
                         else "Steps of the leanest plan:")
            for i, s in enumerate(self.steps, 1):
                lines.append(f"  {i}. {s.action}.")
                lines.append(f"     {s.reason}")
        parts = [f"{_COMPONENT_LABELS.get(k, k)} {size(v)}" for k, v in self.components.items() if v]
        lines.append("Memory while sampling: " + ", ".join(parts) + ".")
        a = self.activations
        used = "ours" if a["used"] == "first_principles" else "ComfyUI's"
        lines.append(f"Activations: first-principles {size(a['first_principles'])} ({a['tokens']} tokens, "
                     f"batch {a['batch']}); ComfyUI's estimate {size(a['comfy'])}, "
                     f"{size(a['comfy_dynamic'])} under Dynamic VRAM (x1.3 + 1 GiB); the fit uses {used}.")
        t = self.time
        cost = [f"compute {seconds(t['compute'] + t['attention'])}"]
        if t["dequantize"]:
            cost.append(f"dequantize {seconds(t['dequantize'])}")
        if t["transfer"]:
            cost.append(f"streaming {seconds(t['transfer'])}")
        lines.append("Step time: " + " + ".join(cost) + " (predicted).")
        lines.extend(self.notes)
        lines.extend(self.suggestions)
        return "\n".join(lines)

    def summary(self) -> str:
        """One line for a node's title area."""
        if not self.fits:
            return f"does not fit: needs {gib(self.min_budget_bytes)}"
        if not self.steps:
            return f"fits as is (peak {gib(self.predicted_peak_bytes)})"
        return (f"{', '.join(self.rungs)} (peak {gib(self.predicted_peak_bytes)}, "
                f"~{seconds(self.predicted_step_seconds)}/step)")
