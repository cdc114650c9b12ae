"""`inspect_file`: what a safetensors file holds, by block, without reading its tensor data.

The profile is a plain dict of JSON types (``json.dumps(profile)`` works), the input of `vramkit inspect
--json` and of the planner. Its shape is stable; fields are only ever added, and ``profile_version`` changes
if one changes meaning::

    {
      "profile_version": 1,
      "path": str, "file_size": int, "header_len": int,
      "header_sha256": str,            # hex digest of the JSON header bytes (identifies the layout)
      "model_prefix": str,             # "model.diffusion_model." for checkpoints, "" for diffusion models
      "tensor_count": int, "tensor_bytes": int, "params": int,
      "dtypes": {dtype: {"tensors": int, "bytes": int, "params": int}},      # safetensors dtype names
      "quantization": {
        "scheme": "none" | "comfy" | "vramkit" | "mixed",   # whose markers the layers carry
        "marker_sources": [str],        # "comfy_quant" tensors, "header" (_quantization_metadata),
                                        # "scaled_fp8" (ComfyUI's legacy fp8 marker)
        "formats": {format: int},       # layers per marker format
        "layers": {layer: marker},      # marker JSON objects, layer names without the model prefix
        "loadable_by_stock": bool,      # every marker is one ComfyUI 0.29+ knows
      },
      "tensors": {name: {"dtype": str, "shape": [int], "bytes": int, "block": str}},   # every tensor
      "blocks": [                       # in natural order (double_blocks.2 before double_blocks.10)
        {"name": str,                   # first name component, plus the index when it is a block list
         "tensors": int, "bytes": int, "params": int,
         "dtypes": {dtype: bytes}, "quantized_layers": int}
      ],
      "metadata": {str: str}            # the header's __metadata__ (values longer than 4 KiB elided)
    }

Tensor names outside the model prefix of a checkpoint (VAE, text encoders) form blocks under their full
names (``first_stage_model``, ...). `bytes` are bytes on disk, so a block's quantized weights count with their
codes, scales and markers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from os import PathLike
from typing import Any

from .. import _core
from . import formats

PROFILE_VERSION = 1
_METADATA_VALUE_MAX = 4096
_COMFY_FORMATS = frozenset({"float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4", "mxfp8", "convrot_w4a4"})


def block_of(name: str) -> str:
    """The block a tensor (name without the model prefix) belongs to: its first name component, plus the
    next when that is an index (``double_blocks.3``, ``input_blocks.4``, ``img_in``, ``final_layer``)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def natural_key(name: str) -> list[Any]:
    """Sorts ``blocks.2`` before ``blocks.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _layer_markers(header: Mapping[str, Any], prefix: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Marker per layer (names without `prefix`), and where the markers were found."""
    layers: dict[str, dict[str, Any]] = {}
    sources: list[str] = []
    path = header["path"]
    for name, raw in header["markers"].items():
        layer = name[: -len(formats.MARKER_SUFFIX)].removeprefix(prefix)
        layers[layer] = formats.parse_marker(raw, f"{path}: {name}")
    if header["markers"]:
        sources.append("comfy_quant")
    meta = header["metadata"] or {}
    if formats.QUANT_METADATA_KEY in meta:
        doc = _json_object(meta[formats.QUANT_METADATA_KEY], path)
        found = doc.get("layers")
        for layer, marker in (found if isinstance(found, dict) else {}).items():
            if isinstance(marker, dict) and isinstance(marker.get("format"), str):
                layers.setdefault(layer.removeprefix(prefix), marker)
        sources.append("header")
    names = {t["name"] for t in header["tensors"]}
    if f"{prefix}scaled_fp8" in names or "scaled_fp8" in names:
        for n in names:
            if n.endswith(".scale_weight"):
                layers.setdefault(n[: -len(".scale_weight")].removeprefix(prefix), {"format": "float8_e4m3fn"})
        sources.append("scaled_fp8")
    return layers, sources


def _json_object(text: str, path: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: the header's {formats.QUANT_METADATA_KEY} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the header's {formats.QUANT_METADATA_KEY} is not a JSON object")
    return value


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


def inspect_file(path: str | PathLike[str]) -> dict[str, Any]:
    """The profile of the safetensors file at `path` (see the module docs for its fields).

    Reads and validates the header only (plus the few bytes of each marker tensor). Raises ValueError for a
    file that is not valid safetensors (naming what is wrong), OSError when it cannot be read.
    """
    header = _core.safetensors_header(str(path))
    tensors = header["tensors"]
    names = [t["name"] for t in tensors]
    prefix = formats.model_prefix(names)
    layers, sources = _layer_markers(header, prefix)

    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "params": 0})
    blocks: dict[str, dict[str, Any]] = {}
    quantized_per_block: Counter[str] = Counter()
    for layer in layers:
        quantized_per_block[block_of(layer)] += 1
    listing: dict[str, dict[str, Any]] = {}
    for t in tensors:
        nbytes = t["end"] - t["start"]
        params = _numel(t["shape"])
        d = dtypes[t["dtype"]]
        d["tensors"] += 1
        d["bytes"] += nbytes
        d["params"] += params
        name = t["name"].removeprefix(prefix) if prefix else t["name"]
        if prefix and not t["name"].startswith(prefix):
            name = t["name"]
        block = blocks.setdefault(block_of(name), {"name": block_of(name), "tensors": 0, "bytes": 0,
                                                   "params": 0, "dtypes": {}, "quantized_layers": 0})
        block["tensors"] += 1
        block["bytes"] += nbytes
        # Markers and scales are bookkeeping, not parameters of the model.
        if not (t["name"].endswith(formats.MARKER_SUFFIX) or t["name"].endswith(formats.SCALE_SUFFIX)):
            block["params"] += params
        block["dtypes"][t["dtype"]] = block["dtypes"].get(t["dtype"], 0) + nbytes
        listing[t["name"]] = {"dtype": t["dtype"], "shape": list(t["shape"]), "bytes": nbytes,
                              "block": block["name"]}
    for name, block in blocks.items():
        block["quantized_layers"] = quantized_per_block.get(name, 0)

    format_counts = Counter(m["format"] for m in layers.values())
    ours = sum(n for f, n in format_counts.items() if f == formats.VRAMKIT_FORMAT)
    scheme = ("none" if not layers else "vramkit" if ours == len(layers) else "comfy" if ours == 0 else "mixed")
    metadata = {k: (v if len(v) <= _METADATA_VALUE_MAX else v[:_METADATA_VALUE_MAX] + "...")
                for k, v in (header["metadata"] or {}).items()}
    return {
        "profile_version": PROFILE_VERSION,
        "path": str(path),
        "file_size": header["file_size"],
        "header_len": header["header_len"],
        "header_sha256": hashlib.sha256(header["header"]).hexdigest(),
        "model_prefix": prefix,
        "tensor_count": len(tensors),
        "tensor_bytes": sum(t["end"] - t["start"] for t in tensors),
        "params": sum(b["params"] for b in blocks.values()),
        "dtypes": dict(sorted(dtypes.items())),
        "quantization": {
            "scheme": scheme,
            "marker_sources": sources,
            "formats": dict(sorted(format_counts.items())),
            "layers": dict(sorted(layers.items(), key=lambda kv: natural_key(kv[0]))),
            "loadable_by_stock": all(f in _COMFY_FORMATS for f in format_counts),
        },
        "tensors": listing,
        "blocks": sorted(blocks.values(), key=lambda b: natural_key(b["name"])),
        "metadata": metadata,
    }


def format_profile(profile: dict[str, Any], max_blocks: int = 60) -> str:
    """A human-readable table of a profile (what `vramkit inspect` prints without --json)."""
    mb = 1 / 2**20
    q = profile["quantization"]
    lines = [
        f"{profile['path']}: {profile['file_size'] * mb:.1f} MB, {profile['tensor_count']} tensors, "
        f"{profile['params'] / 1e6:.1f} M parameters"
        + (f", model prefix {profile['model_prefix']!r}" if profile["model_prefix"] else ""),
        "dtypes: " + ", ".join(f"{d} {v['bytes'] * mb:.1f} MB ({v['tensors']} tensors)"
                               for d, v in profile["dtypes"].items()),
    ]
    if q["scheme"] == "none":
        lines.append("quantization: none")
    else:
        formats_text = ", ".join(f"{f} x{n}" for f, n in q["formats"].items())
        loader = "stock ComfyUI loads it" if q["loadable_by_stock"] else "needs VRAMKit's loader"
        lines.append(f"quantization: {len(q['layers'])} layers ({formats_text}) from "
                     f"{', '.join(q['marker_sources'])}; {loader}")
    blocks = profile["blocks"]
    width = max((len(b["name"]) for b in blocks[:max_blocks]), default=5)
    lines.append(f"{'block':<{width}}  {'MB':>9}  {'tensors':>7}  {'quantized':>9}  dtypes")
    for b in blocks[:max_blocks]:
        dt = ", ".join(f"{d} {n * mb:.1f}" for d, n in sorted(b["dtypes"].items()))
        lines.append(f"{b['name']:<{width}}  {b['bytes'] * mb:>9.2f}  {b['tensors']:>7}  "
                     f"{b['quantized_layers']:>9}  {dt}")
    if len(blocks) > max_blocks:
        lines.append(f"... and {len(blocks) - max_blocks} more blocks (--json lists all)")
    return "\n".join(lines)
