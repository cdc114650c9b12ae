"""Weight storage and compute dtype per model (the "Precision" node's work).

Storage: each ComfyUI op (Linear, Conv, norms, embeddings) gets a per-clone copy whose weights are in the
requested dtype, and casts them on the fly; layers that are already quantized and raw parameters outside
ComfyUI's ops keep theirs. Compute: ComfyUI's own ``set_model_compute_dtype`` (its ``manual_cast`` path).
A bf16 compute dtype is refused, with the reason, on devices that cannot compute in it (NVIDIA before
Ampere, ...); bf16 *storage* only needs the device to hold bf16 tensors and cast them to the compute dtype,
which every CUDA GPU does (ComfyUI runs bf16 checkpoints with an fp16/fp32 manual cast the same way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from . import compat, dtypes, patch
from .display import format_bytes

log = logging.getLogger("vramkit.comfy")

_FP16_MAX = 65504.0
_ROOT = "diffusion_model"


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def bf16_problem(device: torch.device,
                 capability: Callable[[torch.device], tuple[int, int]] = _cuda_capability) -> str | None:
    """Why `device` cannot compute in bf16, or None when it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if torch.version.hip is not None:
            return None if torch.cuda.is_bf16_supported() else (
                f"{torch.cuda.get_device_name(device)} (an AMD GPU older than RDNA3/CDNA) has no bf16 support")
        major, minor = capability(device)
        if (major, minor) < (8, 0):
            return (f"the GPU {device} has compute capability {major}.{minor}; bf16 needs 8.0 or newer "
                    "(Ampere / RTX 30 series and later)")
        return None
    if device.type == "xpu":
        return None if torch.xpu.is_bf16_supported() else f"this Intel GPU ({device}) has no bf16 support"
    try:  # mps and others: ask the device itself
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as exc:
        return f"{device} cannot compute in bf16 ({exc})"
    return None


def bf16_storage_problem(device: torch.device) -> str | None:
    """Why `device` cannot hold bf16 weights and cast them to fp16/fp32 as layers run, or None when it can."""
    if device.type == "cpu":
        return None
    try:  # ask the device itself: storing and converting needs no bf16 arithmetic units
        torch.ones(2, dtype=torch.bfloat16, device=device).to(torch.float16).sum().item()
    except (RuntimeError, TypeError) as exc:
        return f"{device} cannot hold bf16 tensors ({exc})"
    return None


def check_bf16(model: Any, dtype: torch.dtype | None, input_name: str) -> None:
    """Refuses bf16 as a compute dtype where the load device cannot compute in it."""
    if dtype != torch.bfloat16:
        return
    device = compat.load_device(model)
    problem = bf16_problem(device)
    if problem is not None:
        raise ValueError(f"{input_name} = bf16 refused: {problem}. Compute in fp16 (watch for overflow) or fp32; "
                         "storing the weights as bf16 (weight_dtype) still works there.")


def check_bf16_storage(model: Any, dtype: torch.dtype | None, input_name: str = "weight_dtype") -> None:
    """Refuses bf16 as a storage dtype only where the load device cannot even hold bf16 tensors."""
    if dtype != torch.bfloat16:
        return
    problem = bf16_storage_problem(compat.load_device(model))
    if problem is not None:
        raise ValueError(f"{input_name} = bf16 refused: {problem}. Store the weights as fp16 (same memory) "
                         "or fp32.")


def current_compute_dtype(model: Any) -> torch.dtype:
    patched = model.get_model_object("manual_cast_dtype")
    return patched if patched is not None else model.model_dtype()  # type: ignore[no-any-return]


def _ops(model: Any) -> list[patch.Layer]:
    return [layer for layer in patch.layers(model, _ROOT)
            if hasattr(layer.module, "comfy_cast_weights") and any(p is not None for p in layer.params.values())]


def apply_precision(model: Any, storage: str = "default", compute: str = "default") -> tuple[Any, str]:
    """A clone of `model` storing its op weights as `storage` and computing in `compute`; and a summary."""
    storage_dtype = dtypes.parse(storage, "weight_dtype")
    compute_dtype = dtypes.parse(compute, "compute_dtype")
    check_bf16_storage(model, storage_dtype, "weight_dtype")
    check_bf16(model, compute_dtype, "compute_dtype")
    out = patch.clone(model)
    notes: list[str] = []
    before = model.model_size()
    delta = converted = kept = 0
    if storage_dtype is not None:
        progress_ops = _ops(model)
        progress = compat.progress_bar(max(len(progress_ops), 1))
        for layer in progress_ops:
            name = layer.name
            params = dict(layer.params)
            changed = False
            for pname, original in layer.params.items():
                if original is None:
                    continue
                if compat.is_comfy_quantized(original) or original.dtype not in dtypes.FLOATS.values():
                    kept += 1
                    continue
                if original.dtype == storage_dtype:
                    params[pname] = original.to(compat.offload_device(model))
                    continue
                if storage_dtype == torch.float16 and original.numel():
                    with torch.no_grad():  # parameters may require grad: no graph, no scalar warning
                        largest = float(original.detach().abs().max())
                    if largest > _FP16_MAX:
                        raise ValueError(f"weight_dtype = fp16 would overflow: {name}.{pname} holds values up "
                                         f"to {largest:.4g}, beyond fp16's {_FP16_MAX:.0f}; use bf16 or fp32")
                params[pname] = original.to(device=compat.offload_device(model), dtype=storage_dtype)
                delta += params[pname].nbytes - original.nbytes  # type: ignore[union-attr]
                changed = True
            if changed:
                copy = patch.copy_module(layer.module, parameters=params, buffers=layer.buffers)
                copy.comfy_cast_weights = True  # cast to the compute dtype on the fly
                patch.add_module_patch(out, f"{_ROOT}.{name}", copy)
                converted += 1
            progress.update(1)
        if compute_dtype is None:
            compute_dtype = current_compute_dtype(model)  # storage changed; keep computing as before
        after = before + delta
        change = f"{format_bytes(-delta)} less VRAM" if delta <= 0 else f"{format_bytes(delta)} more VRAM"
        notes.append(f"stored {converted} layers' weights as {storage}: the model takes {format_bytes(after)} "
                     f"instead of {format_bytes(before)} ({change})")
        if kept:
            notes.append(f"{kept} quantized or integer tensors kept as they are")
    if compute_dtype is not None:
        out.set_model_compute_dtype(compute_dtype)
        notes.append(f"computing in {str(compute_dtype).removeprefix('torch.')}")
    if not notes:
        notes.append("nothing to change (both inputs are 'default')")
    lines = ["Precision: " + "; ".join(notes) + "."]
    if converted:
        lines.append("Cost: each of those layers is cast to the compute dtype as it runs (a little slower), and "
                     "16-bit weights round the values slightly.")
    if compute_dtype == torch.bfloat16 and compat.load_device(model).type == "cpu":
        lines.append("bf16 on a CPU works but is slow.")
    if storage_dtype is not None:
        lines.append("Need less VRAM still? 'Quantize weights (FP8/INT8)' halves 16-bit weights again.")
    patch.set_size(out, before + delta)
    text = "\n".join(lines)
    log.info("VRAMKit %s", " ".join(lines))
    return out, text
