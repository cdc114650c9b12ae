"""Quantized model files for the "Load diffusion model (quantize on load)" and "Save quantized model" nodes.

Loading: the chosen file of ComfyUI's ``diffusion_models`` folder is quantized once into a disk cache (by the
Rust core through `vramkit.io.quantize_file`: streamed, bounded memory, written whole or not at all), then
loaded from the cache through ComfyUI's own loader (``comfy.sd.load_diffusion_model``, what UNETLoader
calls), so the model is an ordinary ComfyUI model whose weights Dynamic VRAM maps from the file. Formats this
ComfyUI's stock loader lacks (per-group INT8, ...) plug in as ``custom_operations`` (`file_ops`).

The cache key is the input file's identity (real path, size, mtime, SHA-256 of its header) plus the options;
a hit loads without quantizing. The cache lives in ``models/vramkit_cache`` (kept across restarts), or in
ComfyUI's temp folder (``cache_dir = "temp"``, emptied at each start), or in a folder the user names; after
each write the least recently used files are removed until the cache fits its size limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _core
from ..io import inspect_file, quantize_file, save_quantized
from ..io.quantize import FileQuantizeReport
from . import compat, file_ops

log = logging.getLogger("vramkit.comfy")

CACHE_FOLDER = "vramkit_cache"
CACHE_SUFFIX = ".vramkit.safetensors"
#: Bumped when what a cache file holds for the same options changes (invalidates older entries).
CACHE_VERSION = 1
DEFAULT_CACHE_GB = 64.0


@dataclass
class LoadResult:
    model: Any
    cache_path: Path
    hit: bool
    route: str
    report: FileQuantizeReport | None
    evicted: list[str]
    load_seconds: float

    def summary(self) -> str:
        mb = 1 / 2**20
        size = self.cache_path.stat().st_size * mb
        if self.hit:
            text = f"Cache hit: loaded {self.cache_path.name} ({size:.1f} MB) without quantizing."
        else:
            assert self.report is not None
            text = (f"Cache miss: quantized {len(self.report.layers)} layers in {self.report.seconds:.1f} s "
                    f"({self.report.input_file_bytes * mb:.1f} MB -> {size:.1f} MB), kept "
                    f"{len(self.report.skipped)} as they were; cached as {self.cache_path}.")
            worst = self.report.worst(1)
            if worst:
                text += f" Worst layer SNR {worst[0].snr_db:.1f} dB ({worst[0].tensor})."
        text += f" Loaded through ComfyUI's loader ({self.route}) in {self.load_seconds:.1f} s."
        if self.evicted:
            text += f" Evicted {len(self.evicted)} older cache files to stay under the size limit."
        return text


def cache_directory(cache_dir: str) -> Path:
    """The cache folder for the node's `cache_dir` input ("" = models/vramkit_cache, "temp" = ComfyUI's
    temp folder, else a path), created if missing."""
    text = cache_dir.strip()
    if not text:
        path = Path(compat.models_directory()) / CACHE_FOLDER
    elif text.lower() == "temp":
        path = Path(compat.temp_directory()) / CACHE_FOLDER
    else:
        path = Path(text).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def options_of(format: str, granularity: str, group_size: int, skip: str, rotate: bool) -> dict[str, Any]:
    return {"format": format, "granularity": granularity,
            "group_size": group_size if granularity == "group" else None, "skip": skip, "rotate": rotate}


def cache_key(src: str, options: dict[str, Any]) -> str:
    """SHA-256 of the input's identity (real path, size, mtime, header hash) and the options."""
    st = os.stat(src)
    header = _core.safetensors_header(src)
    identity = {"path": os.path.realpath(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "header_sha256": hashlib.sha256(header["header"]).hexdigest(), "options": options,
                "cache_version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_file(cache: Path, src: str, key: str) -> Path:
    stem = Path(src).name.removesuffix(".safetensors")
    return cache / f"{stem}.{key[:24]}{CACHE_SUFFIX}"


def evict(cache: Path, limit_bytes: int, keep: Path) -> list[str]:
    """Removes the least recently used cache files (never `keep`) until the folder's cache files fit."""
    files = [p for p in cache.glob(f"*{CACHE_SUFFIX}") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    removed: list[str] = []
    for p in sorted(files, key=lambda f: f.stat().st_mtime):
        if total <= limit_bytes:
            break
        if p == keep:
            continue
        size = p.stat().st_size
        try:
            p.unlink()
        except OSError as exc:
            log.warning("VRAMKit cache: cannot remove %s: %s", p, exc)
            continue
        total -= size
        removed.append(p.name)
    return removed


def _progress_for_comfy() -> Any:
    bar = compat.progress_bar(1000)
    state = {"shown": 0}

    def progress(done: int, total: int, done_bytes: int, total_bytes: int, name: str) -> None:
        compat.throw_if_interrupted()  # Cancel stops the writer, which removes its temporary file
        permille = 1000 * done_bytes // max(total_bytes, 1)
        if permille > state["shown"]:
            bar.update(permille - state["shown"])
            state["shown"] = permille

    return progress


def loader_options(path: Path) -> tuple[dict[str, Any], str]:
    """ComfyUI ``model_options`` for loading the quantized file at `path`, and the route taken: ComfyUI's own
    operations when its stock loader reads every marker, VRAMKit's `file_ops` otherwise."""
    profile = inspect_file(path)
    kinds = set(profile["quantization"]["formats"])
    rotated = any(m.get("convrot") for m in profile["quantization"]["layers"].values())
    if rotated and not compat.reads_convrot():
        raise ValueError(f"{path.name} holds ConvRot INT8 layers, which need ComfyUI 0.29 or later "
                         f"({compat.describe()})")
    if kinds <= compat.native_quant_formats():
        return {}, "stock operations"
    unknown = kinds - file_ops.READS
    if unknown:
        raise ValueError(f"{path.name} holds quantization formats neither this ComfyUI nor VRAMKit reads: "
                         f"{', '.join(sorted(unknown))}")
    return {"custom_operations": file_ops.operations()}, "VRAMKit operations for " + ", ".join(sorted(kinds))


def load_quantized(unet_name: str, format: str, granularity: str, group_size: int, skip: str, rotate: bool,
                   cache_dir: str = "", cache_limit_gb: float = DEFAULT_CACHE_GB) -> LoadResult:
    """Quantizes `unet_name` (a file of ComfyUI's diffusion_models folder) through the cache and loads it."""
    if not (cache_limit_gb > 0):
        raise ValueError(f"cache_limit_gb must be positive, got {cache_limit_gb}")
    src = compat.diffusion_model_path(unet_name)
    options = options_of(format, granularity, group_size, skip, rotate)
    cache = cache_directory(cache_dir)
    key = cache_key(src, options)
    path = cache_file(cache, src, key)
    report = None
    hit = path.is_file() and _cached_key(path) == key
    if hit:
        os.utime(path)  # most recently used
    else:
        report = quantize_file(src, path, format=format, granularity=granularity, group_size=group_size,
                               skip=skip, rotate=rotate, progress=_progress_for_comfy(), overwrite=True,
                               metadata={CACHE_KEY_METADATA: key})
    evicted = evict(cache, int(cache_limit_gb * 2**30), keep=path)
    model_options, route = loader_options(path)
    started = time.perf_counter()
    model = compat.load_diffusion_model(str(path), model_options)
    if model is None:
        raise ValueError(f"ComfyUI did not recognise the model in {unet_name}")
    result = LoadResult(model, path, hit, route, report, evicted, time.perf_counter() - started)
    log.info("VRAMKit load quantized: %s", result.summary())
    return result


#: `__metadata__` key recording the cache key a cache file was written for.
CACHE_KEY_METADATA = "vramkit.cache_key"


def _cached_key(path: Path) -> str | None:
    try:
        meta = _core.safetensors_header(str(path))["metadata"] or {}
    except (OSError, ValueError) as exc:
        log.warning("VRAMKit cache: %s is unreadable (%s); quantizing again", path.name, exc)
        return None
    return meta.get(CACHE_KEY_METADATA)


# --- saving a MODEL ------------------------------------------------------------------------------------------

_QUANT_BOOKKEEPING = ("weight_scale", "weight_scale_2", "input_scale", "scale_weight", "scale_input")


def model_state_dict(model: Any) -> tuple[dict[str, torch.Tensor], int]:
    """The diffusion model's weights as plain tensors, LoRA and other weight patches merged (as ComfyUI's
    ModelSave does): quantized weights are dequantized to their original dtype, their scale tensors dropped.
    Returns the tensors and how many were dequantized."""
    from . import quantized_ops

    compat.patch_weights_for_saving(model)
    root = model.model.diffusion_model
    out: dict[str, torch.Tensor] = {}
    dequantized = 0
    for mod_name, module in root.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        weight = module._parameters.get("weight")
        quantized = compat.is_comfy_quantized(weight) or isinstance(module, quantized_ops._OwnQuantizedOp)
        for name, p in module._parameters.items():
            if p is None or (quantized and name in _QUANT_BOOKKEEPING):
                continue
            if name == "weight" and quantized:
                if isinstance(module, quantized_ops._OwnQuantizedOp):  # codes + a weight_scale buffer
                    p = module._dequantized(p, module._scale(), module._vramkit_scheme.dtype)
                else:
                    p = p.dequantize()
                dequantized += 1
            out[prefix + name] = p.detach()
        for name, b in module._buffers.items():
            if b is None or name in module._non_persistent_buffers_set or (quantized and name in _QUANT_BOOKKEEPING):
                continue
            out[prefix + name] = b.detach()
    return out, dequantized


def save_model(model: Any, filename_prefix: str, format: str, granularity: str, group_size: int, skip: str,
               rotate: bool) -> tuple[Path, str]:
    """Writes `model`'s diffusion-model weights, quantized, to a new file in ComfyUI's output folder."""
    folder, stem, counter = compat.output_save_path(filename_prefix)
    path = Path(folder) / f"{stem}_{counter:05}_.safetensors"
    tensors, dequantized = model_state_dict(model)
    report = save_quantized(tensors, path, format=format, granularity=granularity, group_size=group_size,
                            skip=skip, rotate=rotate, progress=_progress_for_comfy())
    text = report.summary(worst=5).replace("<memory>", "the model")
    if dequantized:
        text += (f"\n{dequantized} weights were quantized in the model already; they were dequantized and "
                 "quantized again in the chosen scheme.")
    log.info("VRAMKit save quantized: %s", text)
    return path, text

