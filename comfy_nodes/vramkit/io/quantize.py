"""`quantize_file`: a safetensors model quantized into a new file, streamed through the Rust core.

The core maps the input, quantizes the selected weights tensor by tensor (large ones in chunks of rows) on
all cores and writes the output as it goes into a temporary file next to the destination, then fsyncs and
renames it: the output appears whole or not at all, the input is only read, and memory stays near one chunk
(pages of the input are dropped from the process once read). What the file holds is described in
`vramkit.io.formats`.

Which tensors are quantized: the ``<layer>.weight`` tensors with 2 dimensions (Linear layers) stored as
F32, F16 or BF16, of the diffusion model (under its prefix in a full checkpoint), minus those the skip
patterns keep (`vramkit.quant.selection`; in a file ``<first>``/``<last>`` name the known stem and head units).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from os import PathLike, fspath
from typing import Any, cast

from .. import _core
from ..quant import DEFAULT_GROUP_SIZE, FORMATS, selection
from . import formats

#: The granularities a file can be written with.
FILE_GRANULARITIES = ("tensor", "channel", "group")
#: ConvRot's group size (comfy-kitchen's default, what ComfyUI assumes when a file does not say).
CONVROT_GROUP = 256

#: ``progress(tensors_done, tensors_total, bytes_done, bytes_total, tensor_name)``; raising cancels.
ProgressFn = Callable[[int, int, int, int, str], object]


@dataclass(frozen=True)
class LayerStats:
    """One quantized layer: what it became and how far its dequantized weights are from the input."""

    tensor: str
    shape: tuple[int, ...]
    dtype: str
    granularity: str
    group_size: int | None
    rotate: int | None
    marker: dict[str, Any]
    native: bool
    bytes_before: int
    bytes_after: int
    max_abs: float
    rmse: float
    snr_db: float


@dataclass
class FileQuantizeReport:
    src: str
    dst: str
    format: str
    granularity: str
    group_size: int | None
    rotate: bool
    input_file_bytes: int = 0
    output_file_bytes: int = 0
    layers: list[LayerStats] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Layer -> why it stays as it is (a skip pattern, <first>/<last>, or a reason such as its dtype)."""
    channel_fallback: list[str] = field(default_factory=list)
    """Layers quantized per channel because the group size does not divide their rows."""
    unrotated: list[str] = field(default_factory=list)
    """Layers left unrotated (their rows are not a multiple of the ConvRot group)."""
    unmatched_patterns: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def native(self) -> bool:
        """Every layer carries one of ComfyUI's own markers (stock ComfyUI 0.29+ loads the file)."""
        return all(layer.native for layer in self.layers)

    def worst(self, n: int = 10) -> list[LayerStats]:
        """The `n` layers with the lowest SNR (the largest relative error)."""
        return sorted(self.layers, key=lambda s: (s.snr_db, -s.rmse))[:n]

    def loaders(self) -> str:
        """Which loaders read this file correctly."""
        if not self.layers:
            return "any loader (nothing was quantized)"
        kinds = {layer.marker["format"] for layer in self.layers}
        if kinds == {"float8_e4m3fn"}:
            return "stock ComfyUI (0.3.7x and 0.29+) and VRAMKit's loader"
        if self.native:
            return "stock ComfyUI 0.29+ and VRAMKit's loader (ComfyUI 0.3.7x refuses it)"
        return "VRAMKit's loader only (\"Load diffusion model (quantize on load)\"); stock ComfyUI refuses it"

    def summary(self, worst: int = 10) -> str:
        mb = 1 / 2**20
        scheme = f"{self.format} per {self.granularity}"
        if self.granularity == "group":
            scheme += f" of {self.group_size}"
        if self.rotate:
            scheme += f" with ConvRot ({CONVROT_GROUP})"
        before, after = self.bytes_before, self.bytes_after
        ratio = before / after if after else 1.0
        lines = [
            f"Quantized {len(self.layers)} layers of {self.src} to {scheme} in {self.seconds:.1f} s: their "
            f"weights {before * mb:.1f} MB -> {after * mb:.1f} MB ({ratio:.2f}x smaller, scales included); the "
            f"file {self.input_file_bytes * mb:.1f} MB -> {self.output_file_bytes * mb:.1f} MB.",
            f"Wrote {self.dst}; loads in {self.loaders()}.",
        ]
        if self.skipped:
            reasons = Counter(self.skipped.values())
            lines.append(f"Kept {len(self.skipped)} layers as they were ("
                         + ", ".join(f"{r}: {n}" for r, n in reasons.most_common()) + ").")
        if self.channel_fallback:
            lines.append(f"{len(self.channel_fallback)} layers used per-channel scales: {self.group_size} does "
                         "not divide their rows.")
        if self.unrotated:
            lines.append(f"{len(self.unrotated)} layers were not rotated: their rows are not a multiple of "
                         f"{CONVROT_GROUP}.")
        if self.unmatched_patterns:
            lines.append(f"Patterns that matched nothing: {', '.join(self.unmatched_patterns)}.")
        if self.layers:
            snrs = [s.snr_db for s in self.layers]
            lines.append(f"Error: SNR {min(snrs):.1f} dB worst, {sorted(snrs)[len(snrs) // 2]:.1f} dB median. "
                         f"The {min(worst, len(self.layers))} worst layers:")
            width = max(len(s.tensor) for s in self.worst(worst))
            lines.append(f"  {'layer':<{width}}  {'SNR dB':>7}  {'rmse':>9}  {'max abs':>9}")
            for s in self.worst(worst):
                lines.append(f"  {s.tensor:<{width}}  {s.snr_db:>7.2f}  {s.rmse:>9.3g}  {s.max_abs:>9.3g}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON types only (for --json and logs)."""
        d = asdict(self)
        d.update(bytes_before=self.bytes_before, bytes_after=self.bytes_after, native=self.native)
        for layer in d["layers"]:
            layer["shape"] = list(layer["shape"])
            for k in ("snr_db", "max_abs", "rmse"):
                if not math.isfinite(layer[k]):
                    layer[k] = str(layer[k])
        return d


@dataclass(frozen=True)
class LayerChoice:
    tensor: str
    granularity: str
    group_size: int | None
    rotate: int | None


def _validate(format: str, granularity: str, group_size: int, rotate: bool) -> None:
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    if granularity not in FILE_GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {', '.join(FILE_GRANULARITIES)} (a file "
                         "cannot hold the unscaled \"none\" cast: use granularity \"tensor\")")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (32, 64 or 128 are usual), got {group_size!r}")
    if rotate and (format != "int8" or granularity != "channel"):
        raise ValueError("rotate (ConvRot) applies to int8 with granularity \"channel\" only: comfy-kitchen "
                         "rotates before per-row INT8")


def choose_layers(tensors: Sequence[Mapping[str, Any]], format: str, granularity: str,
                  group_size: int = DEFAULT_GROUP_SIZE, skip: str = selection.DEFAULT_SKIP,
                  rotate: bool = False) -> tuple[list[LayerChoice], FileQuantizeReport]:
    """Which tensors of a header (`_core.safetensors_header(...)["tensors"]`) to quantize and how, plus a
    report skeleton holding what was skipped and why."""
    _validate(format, granularity, group_size, rotate)
    rules = selection.parse_skip_patterns(skip, "skip")
    names = [t["name"] for t in tensors]
    prefix = formats.model_prefix(names)
    report = FileQuantizeReport("", "", format, granularity, group_size if granularity == "group" else None,
                                rotate)
    by_layer: dict[str, Mapping[str, Any]] = {}
    for t in tensors:
        name = t["name"]
        if not name.endswith(formats.WEIGHT_SUFFIX) or not name.startswith(prefix):
            continue
        layer = name[len(prefix):-len(formats.WEIGHT_SUFFIX)]
        if len(t["shape"]) != 2:
            continue  # norms, biases-by-another-name, convolutions: not Linear layers
        if t["dtype"] not in formats.SOURCE_DTYPES:
            report.skipped[layer] = f"stored as {t['dtype']}"
            continue
        if math.prod(t["shape"]) == 0:
            report.skipped[layer] = "empty"
            continue
        by_layer[layer] = t
    layers = list(by_layer)
    reasons = selection.skip_reasons_by_name(layers, rules)
    report.unmatched_patterns = selection.unmatched_globs(layers, rules)
    chosen: list[LayerChoice] = []
    for layer, t in by_layer.items():
        if layer in reasons:
            report.skipped[layer] = reasons[layer]
            continue
        row = t["shape"][1]
        gran, group = granularity, (group_size if granularity == "group" else None)
        if gran == "group" and row % group_size:
            gran, group = "channel", None
            report.channel_fallback.append(layer)
        turn = None
        if rotate:
            if row % CONVROT_GROUP == 0:
                turn = CONVROT_GROUP
            else:
                report.unrotated.append(layer)
        chosen.append(LayerChoice(t["name"], gran, group, turn))
    return chosen, report


def quantize_file(src: str | PathLike[str], dst: str | PathLike[str], *, format: str, granularity: str,
                  group_size: int = DEFAULT_GROUP_SIZE, skip: str = selection.DEFAULT_SKIP, rotate: bool = False,
                  progress: ProgressFn | None = None, overwrite: bool = False,
                  metadata: dict[str, str] | None = None) -> FileQuantizeReport:
    """Quantizes the safetensors model `src` into a new file `dst` (see the module docs).

    format: "fp8_e4m3fn", "fp8_e5m2" or "int8". granularity: "tensor", "channel" (one scale per output
    row) or "group" (`group_size` consecutive weights of a row; layers whose rows it does not divide use
    "channel"). skip: comma-separated globs on layer names, plus ``<first>``/``<last>``, or "none".
    rotate: ConvRot (int8 per channel; comfy-kitchen's block Hadamard of 256 along the input dimension).
    progress: called after each chunk, see `ProgressFn`. overwrite: replace an existing `dst`. metadata:
    extra ``__metadata__`` entries (the input's are kept).

    Raises ValueError (bad options; an input that is not valid safetensors, naming what is wrong; NaN/Inf in
    a weight), FileExistsError (dst exists and not `overwrite`), OSError (unreadable input, a full disk,
    ...). The input is never modified and on any error no output is left behind.
    """
    started = time.perf_counter()
    src_s, dst_s = fspath(src), fspath(dst)
    header = _core.safetensors_header(src_s)
    choices, report = choose_layers(header["tensors"], format, granularity, group_size, skip, rotate)
    report.src, report.dst = src_s, dst_s
    options = {"format": format, "granularity": granularity, "group_size": report.group_size,
               "rotate": CONVROT_GROUP if rotate else None, "skip": skip, "vramkit": _core.__version__}
    meta = dict(metadata or {})
    meta[formats.VRAMKIT_METADATA_KEY] = json.dumps(options, sort_keys=True)
    raw = _core.quantize_safetensors(
        src_s, dst_s, cast("_core.Format", format), _specs(choices),
        metadata=meta, overwrite=overwrite, progress=progress)
    report.input_file_bytes = header["file_size"]
    report.output_file_bytes = raw["output_bytes"]
    report.layers = [_layer_stats(entry) for entry in raw["layers"]]
    report.seconds = time.perf_counter() - started
    return report


def _specs(choices: list[LayerChoice]) -> list[_core.LayerSpec]:
    return [(c.tensor, cast(Any, c.granularity), c.group_size, c.rotate) for c in choices]


def _layer_stats(entry: Mapping[str, Any]) -> LayerStats:
    return LayerStats(
        tensor=entry["tensor"], shape=tuple(entry["shape"]), dtype=entry["dtype"],
        granularity=entry["granularity"], group_size=entry["group_size"], rotate=entry["rotate"],
        marker=json.loads(entry["marker"]), native=entry["native"], bytes_before=entry["bytes_before"],
        bytes_after=entry["bytes_after"], max_abs=entry["max_abs"], rmse=entry["rmse"], snr_db=entry["snr_db"])


#: safetensors dtype names of the torch dtypes a state dict may hold.
_ST_DTYPES = {
    "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
    "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2", "torch.int8": "I8", "torch.uint8": "U8",
    "torch.int16": "I16", "torch.int32": "I32", "torch.int64": "I64", "torch.bool": "BOOL",
}


def save_quantized(tensors: dict[str, Any], dst: str | PathLike[str], *, format: str, granularity: str,
                   group_size: int = DEFAULT_GROUP_SIZE, skip: str = selection.DEFAULT_SKIP, rotate: bool = False,
                   metadata: dict[str, str] | None = None, progress: ProgressFn | None = None,
                   overwrite: bool = False) -> FileQuantizeReport:
    """`quantize_file` for tensors in memory (a model's state dict of plain CPU or GPU tensors): writes `dst`
    the same way, choosing the layers the same way. Tensors on other devices are copied to the CPU first."""
    import torch

    started = time.perf_counter()
    entries: list[tuple[str, str, list[int], Any]] = []
    header_view: list[dict[str, Any]] = []
    pos = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        dtype = _ST_DTYPES.get(str(t.dtype))
        if dtype is None:
            raise ValueError(f"tensor {name!r} is {t.dtype}; safetensors files hold {', '.join(_ST_DTYPES)}")
        cpu = t.detach().to("cpu").contiguous()
        raw = cpu.reshape(-1).view(torch.uint8).numpy() if cpu.numel() else cpu.new_empty(0, dtype=torch.uint8).numpy()
        entries.append((name, dtype, list(cpu.shape), raw))
        header_view.append({"name": name, "dtype": dtype, "shape": list(cpu.shape), "start": pos,
                            "end": pos + raw.size})
        pos += raw.size
    choices, report = choose_layers(header_view, format, granularity, group_size, skip, rotate)
    report.src, report.dst = "<memory>", fspath(dst)
    options = {"format": format, "granularity": granularity, "group_size": report.group_size,
               "rotate": CONVROT_GROUP if rotate else None, "skip": skip, "vramkit": _core.__version__}
    meta = dict(metadata or {})
    meta[formats.VRAMKIT_METADATA_KEY] = json.dumps(options, sort_keys=True)
    raw_report = _core.quantize_tensors(
        entries, fspath(dst), cast("_core.Format", format), _specs(choices),
        metadata=meta, overwrite=overwrite, progress=progress)
    report.input_file_bytes = pos
    report.output_file_bytes = raw_report["output_bytes"]
    report.layers = [_layer_stats(entry) for entry in raw_report["layers"]]
    report.seconds = time.perf_counter() - started
    return report
