"""What a VRAMKit node shows on itself in the ComfyUI frontend: a summary, and a memory chart.

A node returns ``node_output(text, *result, chart=...)``: ``{"ui": {"text": [text], "vramkit_chart": [chart]},
"result": result}``. ComfyUI sends the ``ui`` dict to the frontend when the node has run and files it under
``/history``; the extension ``web/vramkit.js`` shows the text in a box on the node and draws the chart as SVG.
Neither is ever an input, so the display does not break ComfyUI's cache.

The chart format (version 1), also what the Auto node sends for its plan::

    {
      "kind": "vramkit.memory_chart", "version": 1,
      "title": "VRAM at the sampling peak",       # shown above the bars
      "device": "cuda:0",                          # where the bytes are
      "capacity_bytes": 25769803776 | null,        # the device's memory (solid line)
      "capacity_label": "capacity",                # what the solid line is ("capacity", "system RAM")
      "budget_bytes": 12884901888 | null,          # the budget in force (dashed line)
      "budget_label": "budget",                    # what the dashed line is ("budget", "weights budget")
      "bars": [                                    # one stacked bar each, drawn top to bottom
        {"label": "predicted", "segments": [{"key": "resident_weights", "bytes": 123, "label": "..."}, ...]},
        {"label": "measured", "segments": [...]}
      ]
    }

Segment keys (`COMPONENTS`, in stacking order): ``resident_weights`` (weights kept in VRAM),
``streamed_weights`` (streaming buffers: weights in flight), ``activations``, ``attention``, ``other_models``
(text encoder, VAE, other models loaded), ``working`` (what a measurement cannot split: activations, attention
and streaming together) and ``other``. A segment's optional ``label`` replaces the key's default legend text.
Predicted and measured bars sit side by side when both exist. `chart_lines` gives the same numbers as text,
which the nodes append to their summary so ``/history`` readers get them without the chart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CHART_KIND = "vramkit.memory_chart"
CHART_VERSION = 1

#: Segment keys in stacking order, with the text the legend shows for each.
COMPONENTS: dict[str, str] = {
    "resident_weights": "weights kept in VRAM",
    "streamed_weights": "streamed weights (in flight)",
    "activations": "activations",
    "attention": "attention",
    "other_models": "other models (text encoder, VAE...)",
    "working": "sampling working memory",
    "other": "other",
}


def format_bytes(n: float) -> str:
    """Bytes for people: GB from 1 GiB up, else MB (binary units, as ComfyUI logs them); about three
    significant digits, decided after rounding (9.999 GB reads "10.0 GB"). The frontend formats the same."""
    gb = abs(n) / 2**30
    sign = "-" if n < 0 else ""
    if gb >= 0.9995:
        return f"{sign}{gb:.{0 if gb >= 99.95 else 1 if gb >= 9.995 else 2}f} GB"
    mb = abs(n) / 2**20
    return f"{sign}{mb:.{0 if mb >= 9.95 else 1}f} MB"


def _bytes(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of bytes, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0 bytes, got {value}")
    return int(value)


def bar(label: str, segments: Mapping[str, float], labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One stacked bar: `segments` maps component keys (see `COMPONENTS`) to bytes; zero segments are kept
    out; `labels` optionally overrides a segment's legend text."""
    unknown = [key for key in segments if key not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown chart segment {unknown[0]!r}; known: {', '.join(COMPONENTS)}")
    out = []
    for key in COMPONENTS:  # stacking order, whatever order the caller used
        if key not in segments:
            continue
        size = _bytes(segments[key], f"segment {key}")
        if size == 0:
            continue
        segment: dict[str, Any] = {"key": key, "bytes": size}
        if labels and key in labels:
            segment["label"] = str(labels[key])
        out.append(segment)
    return {"label": str(label), "segments": out}


def memory_chart(title: str, bars: Sequence[Mapping[str, Any]], *, device: str = "",
                 capacity_bytes: float | None = None, budget_bytes: float | None = None,
                 capacity_label: str = "capacity", budget_label: str = "budget") -> dict[str, Any]:
    """A chart in the documented format (bars from `bar`)."""
    if not bars:
        raise ValueError("a memory chart needs at least one bar")
    return {
        "kind": CHART_KIND, "version": CHART_VERSION, "title": str(title), "device": str(device),
        "capacity_bytes": None if capacity_bytes is None else _bytes(capacity_bytes, "capacity_bytes"),
        "capacity_label": str(capacity_label),
        "budget_bytes": None if budget_bytes is None else _bytes(budget_bytes, "budget_bytes"),
        "budget_label": str(budget_label),
        "bars": [dict(b) for b in bars],
    }


def bar_total(b: Mapping[str, Any]) -> int:
    return sum(int(s["bytes"]) for s in b["segments"])


def chart_lines(chart: Mapping[str, Any]) -> list[str]:
    """The chart's numbers as text, one line per bar, then the capacity and budget."""
    lines = []
    for b in chart["bars"]:
        parts = ", ".join(f"{s.get('label', COMPONENTS[s['key']])} {format_bytes(s['bytes'])}"
                          for s in b["segments"])
        lines.append(f"{b['label']}: {format_bytes(bar_total(b))} ({parts})" if parts else
                     f"{b['label']}: nothing")
    limits = []
    if chart.get("capacity_bytes"):
        limits.append(f"{chart.get('capacity_label', 'capacity')} {format_bytes(chart['capacity_bytes'])}")
    if chart.get("budget_bytes"):
        limits.append(f"{chart.get('budget_label', 'budget')} {format_bytes(chart['budget_bytes'])}")
    if limits:
        lines.append(", ".join(limits) + (f" on {chart['device']}" if chart.get("device") else ""))
    return lines


#: The planner's peak components (`vramkit.plan`: ``Plan.components``) as chart segments, with their labels.
PLAN_SEGMENTS: dict[str, tuple[str, str]] = {
    "weights": ("resident_weights", "weights kept in VRAM"),
    "streaming_buffers": ("streamed_weights", "streaming / cast buffers"),
    "activations": ("activations", "activations"),
    "attention": ("attention", "attention"),
    "text_encoder": ("other_models", "text encoder / VAE"),
    "vae": ("other_models", "text encoder / VAE"),
    "reserve": ("other", "ComfyUI's reserve"),
}


def plan_bar(components: Mapping[str, float], label: str = "predicted") -> dict[str, Any]:
    """A bar from a plan's predicted peak components (unknown ones count as "other")."""
    segments: dict[str, float] = {}
    labels: dict[str, str] = {}
    for name, size in components.items():
        key, text = PLAN_SEGMENTS.get(name, ("other", str(name)))
        segments[key] = segments.get(key, 0) + _bytes(size, f"component {name}")
        labels[key] = text
    return bar(label, segments, labels)


def with_prediction(measured: Mapping[str, Any], predicted: Mapping[str, Any]) -> dict[str, Any]:
    """`measured` with `predicted`'s bars drawn above its own (and its budget where `measured` has none)."""
    chart = dict(measured)
    chart["bars"] = [*predicted["bars"], *measured["bars"]]
    if not chart.get("budget_bytes") and predicted.get("budget_bytes"):
        chart["budget_bytes"] = predicted["budget_bytes"]
        chart["budget_label"] = predicted.get("budget_label", "budget")
    return chart


def node_output(text: str, *result: Any, chart: Mapping[str, Any] | None = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A node's return value with its display: the summary (and chart) in ``ui``, the outputs in ``result``.

    Every value in ``ui`` is a list (ComfyUI concatenates them across list runs); `extra` adds more keys
    (each value wrapped in a list).
    """
    ui: dict[str, list[Any]] = {"text": [text]}
    if chart is not None:
        ui["vramkit_chart"] = [dict(chart)]
    for name, value in (extra or {}).items():
        ui[name] = [value]
    return {"ui": ui, "result": result}
