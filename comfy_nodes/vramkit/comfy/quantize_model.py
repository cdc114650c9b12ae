"""Quantize the Linear/Conv weights of a ComfyUI MODEL into a clone (the "Quantize weights" node's work)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import quant
from ..quant import selection
from . import compat, dtypes, layouts, patch, quantized_ops
from .display import format_bytes

log = logging.getLogger("vramkit.comfy")

NODE_FORMATS = ("int8", "fp8_e4m3fn", "fp8_e5m2")
NODE_GRANULARITIES = ("group", "channel", "tensor")
_OPS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_ROOT = "diffusion_model"


#: What ComfyUI's INT8 ``int8_tensorwise`` matmul (W8A8) and the weight-only route measured on real weights:
#: all-MiniLM-L6-v2, every Linear quantized, sentence-embedding cosine against float32 (issue 8, torch oracle).
QUALITY = {"per-row weight-only": 0.99941, "per-row W8A8": 0.99592, "W8A8 + Hadamard": 0.99956,
           "per-group-64 weight-only": 0.99980}
ROTATIONS = ("none", "convrot")
#: ConvRot's block-Hadamard sizes (powers of 4, as comfy-kitchen builds them), largest first: 256 is
#: ComfyUI's default; smaller ones serve layers whose input width 256 does not divide.
CONVROT_GROUPS = (256, 64, 16)


@dataclass
class QuantizeReport:
    format: str
    granularity: str
    group_size: int | None
    route: str
    compute: str = "dequantize"
    rotation: str = "none"
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Layer -> why it stays in high precision (a skip pattern, <first>/<last>, or a reason)."""
    already_quantized: dict[str, str] = field(default_factory=dict)
    """Layer -> what it already was (left as it is: quantizing twice would only add error)."""
    channel_fallback: list[str] = field(default_factory=list)
    """Layers quantized per channel because the group size does not divide their rows."""
    unmatched_patterns: list[str] = field(default_factory=list)
    layouts: Counter[str] = field(default_factory=Counter)
    native: list[str] = field(default_factory=list)
    """Layers in ComfyUI's own layouts (treated as a quantized checkpoint's layers)."""
    int8_matmul: list[str] = field(default_factory=list)
    """Layers whose matmul runs in INT8 (W8A8) through ComfyUI's kernels."""
    convrot_groups: Counter[int] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    """Fallbacks and what was done instead, one sentence each."""
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
        if self.already_quantized:
            kinds = Counter(self.already_quantized.values())
            lines.append(f"{_layers(len(self.already_quantized))} were already quantized ("
                         + ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
                         + "): left as they are, not quantized a second time.")
        if self.native:
            lines.append(f"{_layers(len(self.native))} are in ComfyUI's own layouts, so ComfyUI's kernels, "
                         "LoRA, Dynamic VRAM and ModelSave treat them as a quantized checkpoint's.")
        lines.append(self._compute_text())
        lines.extend(self.notes)
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

    def _compute_text(self) -> str:
        q = QUALITY
        trade = (f"(sentence-embedding cosine vs fp32 on all-MiniLM-L6-v2: per-row weight-only "
                 f"{q['per-row weight-only']:.5f}, per-row W8A8 {q['per-row W8A8']:.5f}, W8A8 + Hadamard "
                 f"{q['W8A8 + Hadamard']:.5f}, per-group-64 weight-only {q['per-group-64 weight-only']:.5f})")
        if self.compute == "int8 matmul":
            text = (f"Compute: int8 matmul: {_layers(len(self.int8_matmul))} multiply in INT8 (W8A8: "
                    "activations quantized per row on the fly) through ComfyUI's kernels, the fastest on "
                    "NVIDIA sm >= 7.5, at some quality " + trade + ".")
            if self.convrot_groups:
                groups = ", ".join(f"{g} x{n}" for g, n in sorted(self.convrot_groups.items(), reverse=True))
                text += (f" ConvRot (comfy-kitchen's block-Hadamard rotation) on "
                         f"{_layers(sum(self.convrot_groups.values()))} (group sizes: {groups}).")
            rest = len(self.quantized) - len(self.int8_matmul)
            if rest:
                text += f" The other {_layers(rest)} dequantize their weights (no INT8 matmul for them)."
            return text
        return ("Compute: dequantize (weight-only): each weight is dequantized to the compute dtype for its "
                "matmul, the best quality " + trade + "; 'int8 matmul' trades some of it for ComfyUI's "
                "faster W8A8 kernels.")


def _layers(count: int) -> str:
    return f"{count} layer" if count == 1 else f"{count} layers"


def validate_scheme(format: str, granularity: str, group_size: int, compute: str = "dequantize",
                    rotation: str = "none") -> None:
    if format not in NODE_FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(NODE_FORMATS)}")
    if granularity not in NODE_GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {', '.join(NODE_GRANULARITIES)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (32, 64 or 128 are usual), "
                         f"got {group_size!r}")
    if compute not in quantized_ops.COMPUTES:
        raise ValueError(f"compute {compute!r} is not one of {', '.join(quantized_ops.COMPUTES)}")
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation {rotation!r} is not one of {', '.join(ROTATIONS)}")
    if compute == "int8 matmul" and (format != "int8" or granularity == "group"):
        raise ValueError(f"compute 'int8 matmul' runs ComfyUI's int8_tensorwise kernels, which take one scale "
                         f"per output channel or per tensor: use format int8 with granularity 'channel' (best "
                         f"for W8A8) or 'tensor', or compute 'dequantize' for {format} per {granularity}")
    if rotation != "none" and (compute != "int8 matmul" or granularity != "channel"):
        raise ValueError(f"rotation {rotation!r} (ConvRot) rotates the activations of INT8 matmuls and needs "
                         f"per-row scales: use it with compute 'int8 matmul' and granularity 'channel' "
                         f"(got compute {compute!r}, granularity {granularity!r})")


def _candidates(model: Any) -> tuple[list[patch.Layer], dict[str, str], dict[str, str], list[str]]:
    """Quantizable layers in model order (with their unpatched tensors); layers that look quantizable but
    cannot be, with the reason; layers that are already quantized, with what they are; and the names of the
    model's block lists."""
    found: list[patch.Layer] = []
    refused: dict[str, str] = {}
    already: dict[str, str] = {}
    lists: list[str] = []
    for layer in patch.layers(model, _ROOT):
        name, module, weight = layer.name, layer.module, layer.weight
        if layer.is_list:
            lists.append(name)
        if quantized_ops.is_quantized_op(module):
            already[name] = "by VRAMKit"
        elif compat.is_comfy_quantized(weight):
            fmt = compat.native_layer_format(module)
            already[name] = f"ComfyUI {fmt}" if fmt else f"ComfyUI {compat.quantized_layout_name(weight)}"
        elif not isinstance(module, _OPS):
            if compat.is_mixed_precision_linear(module):
                refused[name] = "a ComfyUI mixed-precision layer (a quantized checkpoint's), left as loaded"
            continue
        elif not hasattr(module, "comfy_cast_weights"):
            refused[name] = "not a ComfyUI op (cannot dequantize on the fly)"
        elif weight is None or weight.dtype not in quant.SOURCE_DTYPES:
            refused[name] = f"stored as {None if weight is None else weight.dtype}"
        else:
            found.append(layer)
    return found, refused, already, lists


def quantize_model(model: Any, format: str = "int8", granularity: str = "group",
                   group_size: int = quant.DEFAULT_GROUP_SIZE, skip_patterns: str = selection.DEFAULT_SKIP,
                   compute_dtype: str = "default", route: str | None = None, compute: str = "dequantize",
                   rotation: str = "none", native: bool = True) -> tuple[Any, QuantizeReport]:
    """A clone of `model` whose selected Linear/Conv weights are quantized, and a report of what happened.

    `compute` is "dequantize" (weight-only: each weight is dequantized for its matmul) or "int8 matmul"
    (ComfyUI's W8A8 kernels; int8 per channel or per tensor only), `rotation` "none" or "convrot" (with int8
    matmul per channel: comfy-kitchen's block-Hadamard rotation). Where this ComfyUI has a layout for the
    scheme (0.29+: per-tensor fp8, per-tensor and per-row INT8 in Linear layers), the layer becomes ComfyUI's
    own quantized Linear unless `native` is False; everything else keeps VRAMKit's layout. `route` forces
    "comfy" (ComfyUI QuantizedTensor) or "module" (VRAMKit's own modules); by default the ComfyUI route is
    used wherever this ComfyUI has a quantized-tensor registry.
    """
    validate_scheme(format, granularity, group_size, compute, rotation)
    rules = selection.parse_skip_patterns(skip_patterns)
    dtype_override = dtypes.parse(compute_dtype, "compute_dtype")
    route = route or quantized_ops.default_route()
    if route not in ("comfy", "module"):
        raise ValueError(f"route {route!r} is not 'comfy' or 'module'")
    if route == "comfy" and compat.quant_backend() == "none":
        raise ValueError(f"{compat.describe()}: the 'comfy' route needs a QuantizedTensor registry")

    started = time.perf_counter()
    out = patch.clone(model)
    candidates, refused, already, lists = _candidates(model)
    names = [layer.name for layer in candidates]
    skips = selection.skip_reasons(names, rules, lists)
    route_label = (f"ComfyUI QuantizedTensor via {compat.quant_backend()}" if route == "comfy"
                   else "VRAMKit modules (this ComfyUI has no QuantizedTensor registry)"
                   if compat.quant_backend() == "none" else "VRAMKit modules (forced)")
    report = QuantizeReport(format, granularity, group_size if granularity == "group" else None, route_label,
                            compute, rotation, skipped=dict(refused), already_quantized=already,
                            unmatched_patterns=selection.unmatched_globs(names, rules))
    native_problem = _native_problem(route, native, format, granularity)
    if native_problem and compute == "int8 matmul":
        report.notes.append(f"INT8 matmul is not available ({native_problem}): the weights are dequantized "
                            "for their matmuls instead (compute 'dequantize').")
        log.warning("VRAMKit quantize: int8 matmul unavailable, dequantizing instead: %s", native_problem)
    offload = compat.offload_device(model)
    # ConvRot's rotation is a matmul per layer: on the load device when it is a GPU, one layer at a time.
    rotate_on = compat.load_device(model) if rotation != "none" else offload
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
        others = {k: None if t is None else t.to(offload) for k, t in layer.params.items() if k != "weight"}
        target = dtype_override or weight.dtype
        stand_in, nbytes = None, 0
        if native_problem is None and isinstance(layer.module, torch.nn.Linear):
            try:
                stand_in, nbytes = _native_stand_in(layer, weight, others, target, layer_granularity, offload,
                                                    rotate_on, report)
            except Exception as exc:  # an unexpected ComfyUI/comfy-kitchen API: fall back, never fail
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("VRAMKit quantize: %s: ComfyUI's layout failed (%s); using VRAMKit's", name, reason)
                report.notes.append(f"{name}: ComfyUI's layout failed ({reason}); VRAMKit's layout used.")
        if stand_in is None:
            q = quant.quantize(weight, format, layer_granularity, layer_group).to(offload)
            stand_in = _own_stand_in(layer, q, others, target, route, native, report)
            nbytes = q.nbytes
        patch.add_module_patch(out, f"{_ROOT}.{name}", stand_in)
        report.quantized.append(name)
        report.bytes_before += weight.nbytes
        report.bytes_after += nbytes
        progress.update(1)
    if dtype_override is not None:
        out.set_model_compute_dtype(dtype_override)
    report.model_bytes_before = model.model_size()
    report.model_bytes_after = report.model_bytes_before - report.bytes_before + report.bytes_after
    patch.set_size(out, report.model_bytes_after)
    report.seconds = time.perf_counter() - started
    log.info("VRAMKit quantize: %s", report.details())
    return out, report


def _native_problem(route: str, native: bool, format: str, granularity: str) -> str | None:
    """Why no layer can take ComfyUI's own layout in this call, or None."""
    if route != "comfy":
        return "VRAMKit's own modules were asked for"
    if not native:
        return "VRAMKit's layout was asked for"
    if layouts.native_format(format, granularity) is None:
        return f"ComfyUI has no layout for {format} per {granularity}"
    problem = compat.native_layout_problem()
    if problem is not None and compat.quant_backend() == "comfy_kitchen":
        log.warning("VRAMKit quantize: ComfyUI's native layouts are not usable (%s); using VRAMKit's", problem)
    return problem


def _native_stand_in(layer: patch.Layer, weight: torch.Tensor, others: dict[str, torch.Tensor | None],
                     target: torch.dtype, granularity: str, offload: torch.device, rotate_on: torch.device,
                     report: QuantizeReport) -> tuple[torch.nn.Module | None, int]:
    """ComfyUI's own quantized Linear for `layer`, or (None, 0) when its scheme has no native layout.
    Rotated by ConvRot with the largest of `CONVROT_GROUPS` that divides its inputs (none: not rotated)."""
    fmt = layouts.native_format(report.format, granularity)
    if fmt is None:
        return None, 0
    group = 0
    if report.rotation == "convrot":
        in_features = weight.shape[1]
        group = next((g for g in CONVROT_GROUPS if in_features % g == 0), 0)
        if not group:
            report.notes.append(f"{layer.name}: no ConvRot group ({'/'.join(map(str, CONVROT_GROUPS))}) "
                                f"divides its {in_features} inputs; quantized per row without rotation.")
    if group:
        qt = layouts.native_convrot_weight(weight.to(rotate_on), target, group).to(offload)
        report.convrot_groups[group] += 1
    else:
        q = quant.quantize(weight, report.format, granularity, None).to(offload)
        qt, fmt = layouts.native_weight(q, target)
    scheme = quantized_ops.Scheme(report.format, granularity, None, target, "comfy",
                                  report.compute)  # type: ignore[arg-type]
    stand_in = quantized_ops.native_copy(layer.module, qt, fmt, scheme, others, layer.buffers)
    report.layouts[f"{layouts.layout_name(qt)} ({fmt})"] += 1
    report.native.append(layer.name)
    if report.compute == "int8 matmul":
        report.int8_matmul.append(layer.name)
    return stand_in, layouts.quantized_bytes(qt)


def _own_stand_in(layer: patch.Layer, q: quant.QTensor, others: dict[str, torch.Tensor | None],
                  target: torch.dtype, route: str, native: bool, report: QuantizeReport) -> torch.nn.Module:
    """A stand-in in VRAMKit's layout (or 0.3.7x's fp8 one), or VRAMKit's own module without a registry."""
    scheme = quantized_ops.Scheme(q.format, q.granularity, q.group_size, target, route)  # type: ignore[arg-type]
    if route == "comfy":
        try:
            weight = layouts.comfy_weight(q, target) if native else layouts.ours(q, target)
            stand_in = quantized_ops.quantized_copy(layer.module, q, scheme, others, layer.buffers, weight)
            report.layouts[layouts.layout_name(weight)] += 1
            return stand_in
        except Exception as exc:  # an unexpected registry API: VRAMKit's modules need none
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("VRAMKit quantize: %s: ComfyUI QuantizedTensor failed (%s); using VRAMKit's module",
                        layer.name, reason)
            report.notes.append(f"{layer.name}: ComfyUI QuantizedTensor failed ({reason}); VRAMKit's module "
                                "used.")
            scheme = quantized_ops.Scheme(q.format, q.granularity, q.group_size, target, "module")
    stand_in = quantized_ops.quantized_copy(layer.module, q, scheme, others, layer.buffers)
    report.layouts["VRAMKit module"] += 1
    return stand_in
