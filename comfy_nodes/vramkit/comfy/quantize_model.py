"""Quantize the Linear/Conv weights of a ComfyUI MODEL into a clone (the "Quantize weights" node's work)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import quant
from . import compat, dtypes, layouts, patch, quantized_ops, selection
from .display import format_bytes

log = logging.getLogger("vramkit.comfy")

NODE_FORMATS = ("int8", "fp8_e4m3fn", "fp8_e5m2")
NODE_GRANULARITIES = ("group", "channel", "tensor")
_OPS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_ROOT = "diffusion_model"


@dataclass
class QuantizeReport:
    format: str
    granularity: str
    group_size: int | None
    route: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Layer -> why it stays in high precision (a skip pattern, <first>/<last>, or a reason)."""
    channel_fallback: list[str] = field(default_factory=list)
    """Layers quantized per channel because the group size does not divide their rows."""
    unmatched_patterns: list[str] = field(default_factory=list)
    layouts: Counter[str] = field(default_factory=Counter)
    bytes_before: int = 0
    bytes_after: int = 0
    skipped_bytes: int = 0
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    seconds: float = 0.0

    def scheme(self) -> str:
        if self.granularity == "group":
            return f"{self.format} (one scale per {self.group_size} weights)"
        return f"{self.format} (one scale per {'output channel' if self.granularity == 'channel' else 'tensor'})"

    def summary(self) -> str:
        """For the user, on the node: what changed, the VRAM it saves, what it costs, what to try next."""
        total = len(self.quantized) + len(self.skipped)
        saved = self.model_bytes_before - self.model_bytes_after
        ratio = self.model_bytes_before / self.model_bytes_after if self.model_bytes_after else 1.0
        lines = [f"Quantized {len(self.quantized)} of {_layers(total)} to {self.scheme()}: the model's weights "
                 f"take {format_bytes(self.model_bytes_after)} instead of {format_bytes(self.model_bytes_before)} "
                 f"({format_bytes(saved)} less VRAM when loaded, {ratio:.2f}x smaller)."]
        cost = ("Cost: each quantized layer is turned back into full numbers as it runs (slightly slower steps) "
                "and the image changes a little; ")
        if self.granularity == "tensor":
            cost += "one scale per tensor keeps the least quality: granularity 'group' keeps more."
        elif self.format == "int8" and self.granularity == "group":
            cost += "int8 per group keeps the most quality of the 8-bit formats."
        else:
            cost += "int8 per group of 64 keeps the most quality of the 8-bit formats."
        lines.append(cost)
        if self.skipped:
            reasons = Counter(self.skipped.values())
            why = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
            kept = f"{_layers(len(self.skipped))} ({format_bytes(self.skipped_bytes)}; {why})"
            lines.append(f"Kept in high precision: {kept}.")
        lines.append("Not enough VRAM yet? Add 'Sequential offload' with a VRAM budget, and 'Offload text "
                     "encoder / VAE' after the prompt.")
        return "\n".join(lines)

    def details(self) -> str:
        """For the log: how the layers were stored and what the patterns matched."""
        before, after = format_bytes(self.bytes_before), format_bytes(self.bytes_after)
        text = (f"{_layers(len(self.quantized))} to {self.scheme()}, their weights {before} -> {after} (scales "
                f"included) in {self.seconds:.2f} s; route {self.route}")
        layouts_used = ", ".join(f"{name} x{n}" for name, n in sorted(self.layouts.items()))
        if layouts_used:
            text += f" ({layouts_used})"
        if self.channel_fallback:
            text += (f"; {_layers(len(self.channel_fallback))} per output channel because {self.group_size} does "
                     "not divide their rows")
        if self.unmatched_patterns:
            text += f"; skip patterns that matched nothing: {', '.join(self.unmatched_patterns)}"
        return text


def _layers(count: int) -> str:
    return f"{count} layer" if count == 1 else f"{count} layers"


def validate_scheme(format: str, granularity: str, group_size: int) -> None:
    if format not in NODE_FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(NODE_FORMATS)}")
    if granularity not in NODE_GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {', '.join(NODE_GRANULARITIES)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (32, 64 or 128 are usual), "
                         f"got {group_size!r}")


def _candidates(model: Any) -> tuple[list[patch.Layer], dict[str, str], list[str]]:
    """Quantizable layers in model order (with their unpatched tensors); layers that look quantizable but
    cannot be, with the reason; and the names of the model's block lists."""
    found: list[patch.Layer] = []
    refused: dict[str, str] = {}
    lists: list[str] = []
    for layer in patch.layers(model, _ROOT):
        name, module, weight = layer.name, layer.module, layer.weight
        if layer.is_list:
            lists.append(name)
        if not isinstance(module, _OPS):
            continue
        if quantized_ops.is_quantized_op(module):
            refused[name] = "already quantized by VRAMKit"
        elif not hasattr(module, "comfy_cast_weights"):
            refused[name] = "not a ComfyUI op (cannot dequantize on the fly)"
        elif compat.is_comfy_quantized(weight):
            refused[name] = "already quantized"
        elif weight is None or weight.dtype not in quant.SOURCE_DTYPES:
            refused[name] = f"stored as {None if weight is None else weight.dtype}"
        else:
            found.append(layer)
    return found, refused, lists


def quantize_model(model: Any, format: str = "int8", granularity: str = "group",
                   group_size: int = quant.DEFAULT_GROUP_SIZE, skip_patterns: str = selection.DEFAULT_SKIP,
                   compute: str = "default", route: str | None = None) -> tuple[Any, QuantizeReport]:
    """A clone of `model` whose selected Linear/Conv weights are quantized, and a report of what happened.

    `route` forces "comfy" (ComfyUI QuantizedTensor) or "module" (VRAMKit's own modules); by default the
    ComfyUI route is used wherever this ComfyUI has a quantized-tensor registry.
    """
    validate_scheme(format, granularity, group_size)
    rules = selection.parse_skip_patterns(skip_patterns)
    dtype_override = dtypes.parse(compute, "compute_dtype")
    route = route or quantized_ops.default_route()
    if route not in ("comfy", "module"):
        raise ValueError(f"route {route!r} is not 'comfy' or 'module'")
    if route == "comfy" and compat.quant_backend() == "none":
        raise ValueError(f"{compat.describe()}: the 'comfy' route needs a QuantizedTensor registry")

    started = time.perf_counter()
    out = patch.clone(model)
    candidates, refused, lists = _candidates(model)
    names = [layer.name for layer in candidates]
    skips = selection.skip_reasons(names, rules, lists)
    route_label = (f"ComfyUI QuantizedTensor via {compat.quant_backend()}" if route == "comfy"
                   else "VRAMKit modules (this ComfyUI has no QuantizedTensor registry)"
                   if compat.quant_backend() == "none" else "VRAMKit modules (forced)")
    report = QuantizeReport(format, granularity, group_size if granularity == "group" else None, route_label,
                            skipped=dict(refused), unmatched_patterns=selection.unmatched_globs(names, rules))
    offload = compat.offload_device(model)
    progress = compat.progress_bar(max(len(candidates), 1))
    for layer in candidates:
        name, weight = layer.name, layer.weight
        assert weight is not None  # _candidates refuses layers without one
        if name in skips:
            report.skipped[name] = skips[name]
            report.skipped_bytes += weight.nbytes
            progress.update(1)
            continue
        layer_granularity, layer_group = granularity, (group_size if granularity == "group" else None)
        if layer_granularity == "group" and (weight.numel() // weight.shape[0]) % group_size:
            layer_granularity, layer_group = "channel", None
            report.channel_fallback.append(name)
        q = quant.quantize(weight, format, layer_granularity, layer_group).to(offload)
        scheme = quantized_ops.Scheme(format, layer_granularity, layer_group, dtype_override or weight.dtype,
                                 route)  # type: ignore[arg-type]
        others = {k: None if t is None else t.to(offload) for k, t in layer.params.items() if k != "weight"}
        stand_in = quantized_ops.quantized_copy(layer.module, q, scheme, others, layer.buffers)
        patch.add_module_patch(out, f"{_ROOT}.{name}", stand_in)
        report.layouts[layouts.layout_name(stand_in.weight) if route == "comfy" else "VRAMKit module"] += 1
        report.quantized.append(name)
        report.bytes_before += weight.nbytes
        report.bytes_after += q.nbytes
        progress.update(1)
    if dtype_override is not None:
        out.set_model_compute_dtype(dtype_override)
    report.model_bytes_before = model.model_size()
    report.model_bytes_after = report.model_bytes_before - report.bytes_before + report.bytes_after
    patch.set_size(out, report.model_bytes_after)
    report.seconds = time.perf_counter() - started
    log.info("VRAMKit quantize: %s", report.details())
    return out, report
