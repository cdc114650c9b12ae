"""Model profiles: the built-in table (Rust), or one read from a safetensors file's header.

A profile is the dict `_core.plan_fit` takes: the model's blocks with their bytes at each storage format
(8-bit ones with their scales), its text encoders and VAE, and the architecture numbers that size the
activations (see `_core.pyi`). From a file only the header is read, never the weights: the header holds
every tensor's dtype and shape. The architecture is recognised from the tensor names (Flux, Flux.2,
HunyuanVideo, Qwen-Image, Wan, SD1.5, SDXL); its activation constants and, where the file holds only the
diffusion model, its text encoders and VAE come from the matching built-in profile.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .. import _core
from ..io import inspect_file

# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
_FORMAT_OF_DTYPE = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "fp8", "F8_E5M2": "fp8", "I8": "int8"}
# Tensors that are scales or markers of a quantized layer, not weights of their own.
_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".scale_weight", ".scale_input",
                   ".comfy_quant")
# Prefixes under which checkpoints store the diffusion model, text encoders and VAE.
_DIFFUSION_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
_TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")
_VAE_PREFIXES = ("first_stage_model.", "vae.")
_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|blocks|layers|input_blocks|output_blocks)"
                    r"\.(\d+)\.")


def builtin_names() -> list[str]:
    """Names of the built-in profiles: `vramkit plan --list`."""
    return list(_builtins())


@cache
def _builtins() -> dict[str, dict[str, Any]]:
    return {name: dict(p) for name, p in _core.builtin_profiles().items()}


def builtin_profile(name: str) -> dict[str, Any]:
    """A copy of the built-in profile `name` (ValueError naming the accepted names otherwise)."""
    table = _builtins()
    if name not in table:
        raise ValueError(f"unknown model {name!r}; built-in profiles: {', '.join(table)} (or a .safetensors path)")
    return json.loads(json.dumps(table[name]))


def describe_builtins() -> str:
    table = _builtins()
    width = max(len(n) for n in table)
    rows = []
    for name, p in table.items():
        size = sum(b["bytes"][p["weights_format"]] for b in p["blocks"]) / 2**30
        rows.append(f"{name:<{width}}  {size:6.2f} GiB  {p['description']}")
    return "\n".join(rows)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file from its header alone (`vramkit.io.inspect_file`: the Rust reader,
    which validates sizes and offsets). ValueError for a file that is not safetensors, or a damaged one."""
    return {name: TensorInfo(str(t["dtype"]), tuple(t["shape"]))
            for name, t in inspect_file(path)["tensors"].items()}


def _strip(names: Mapping[str, TensorInfo]) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo],
                                                      dict[str, TensorInfo]]:
    """Splits a checkpoint into its diffusion model (prefix removed), text encoders and VAE."""
    diffusion: dict[str, TensorInfo] = {}
    te: dict[str, TensorInfo] = {}
    vae: dict[str, TensorInfo] = {}
    for name, t in names.items():
        if name.startswith(_TEXT_ENCODER_PREFIXES):
            te[name] = t
        elif name.startswith(_VAE_PREFIXES):
            vae[name] = t
        else:
            for prefix in _DIFFUSION_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    break
            diffusion[name] = t
    return diffusion, te, vae


def _has(names: Mapping[str, Any], pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(n) for n in names)


def _template(names: Mapping[str, TensorInfo]) -> tuple[str, dict[str, Any]]:
    """The built-in profile whose architecture the tensor names show, and what the header says of its
    dimensions (hidden width, widest intermediate, blocks with attention)."""
    dims: dict[str, Any] = {}
    if _has(names, r"^double_blocks\.\d+\.img_attn") and _has(names, r"^single_blocks\.\d+\.linear1"):
        linear1 = next(t for n, t in names.items() if re.match(r"^single_blocks\.\d+\.linear1\.weight$", n))
        dims["widest"], dims["hidden"] = linear1.shape[0], linear1.shape[-1]
        dims["heads"] = max(1, dims["hidden"] // 128)
        if _has(names, r"^double_stream_modulation_img"):
            base = "flux2-dev"
            dims["memory_usage_factor"] = 3.1 * 4.0 * dims["hidden"] / 2604
        elif _has(names, r"^txt_in\.individual_token_refiner"):
            base = "hunyuanvideo"
        else:
            base = "flux-dev"
    elif _has(names, r"^transformer_blocks\.\d+\.img_mod"):
        base = "qwen-image"
    elif _has(names, r"^blocks\.\d+\.self_attn\.q\.weight") and _has(names, r"^blocks\.\d+\.ffn\.0\.weight"):
        q = next(t for n, t in names.items() if re.match(r"^blocks\.\d+\.self_attn\.q\.weight$", n))
        ffn = next(t for n, t in names.items() if re.match(r"^blocks\.\d+\.ffn\.0\.weight$", n))
        dim = q.shape[0]
        base = min((("wan2.1-1.3b", 1536), ("wan2.2-5b", 3072), ("wan2.1-14b", 5120)),
                   key=lambda c: abs(c[1] - dim))[0]
        dims.update(hidden=dim, widest=ffn.shape[0], heads=max(1, dim // 128), memory_usage_factor=dim / 2222)
    elif _has(names, r"^input_blocks\.") and _has(names, r"^output_blocks\.") and _has(names, r"^middle_block\."):
        base = "sdxl" if _has(names, r"^label_emb\.") else "sd1.5"
    else:
        raise ValueError("cannot tell the model's architecture from its tensor names (known: Flux, Flux.2, "
                         "HunyuanVideo, Qwen-Image, Wan, SD1.5, SDXL); plan with a built-in name instead")
    dims["attention_layers"] = len({m.group(0) for n in names if (m := _BLOCK.match(n))
                                    and m.group(1) != "input_blocks" and m.group(1) != "output_blocks"}) or None
    return base, {k: v for k, v in dims.items() if v is not None}


def _weights_format(tensors: Mapping[str, TensorInfo]) -> str:
    """The storage format holding most of the weight bytes."""
    by_format: dict[str, int] = {}
    for name, t in tensors.items():
        if name.endswith(_SCALE_SUFFIXES) or t.dtype not in _FORMAT_OF_DTYPE:
            continue
        fmt = _FORMAT_OF_DTYPE[t.dtype]
        by_format[fmt] = by_format.get(fmt, 0) + t.elements * _DTYPE_BYTES[t.dtype]
    if not by_format:
        raise ValueError("no weight tensors of a known dtype (fp32, bf16, fp16, fp8, int8)")
    return max(sorted(by_format), key=by_format.__getitem__)


def _block_bytes(tensors: list[tuple[str, TensorInfo]]) -> dict[str, Any]:
    """Bytes of one block at every format: 2-D weights take one byte per element in 8 bits plus a float32
    scale per tensor (fp8) or per row (int8); everything else stays 16-bit."""
    params = quantizable = count = rows = largest = 0
    for name, t in tensors:
        if name.endswith(_SCALE_SUFFIXES):
            continue
        n = t.elements
        params += n
        largest = max(largest, n)
        if name.endswith(".weight") and len(t.shape) == 2 and min(t.shape) >= 16:
            quantizable += n
            count += 1
            rows += t.shape[0]
    rest = (params - quantizable) * 2
    return {"bytes": {"fp32": params * 4, "bf16": params * 2, "fp16": params * 2,
                      "fp8": quantizable + rest + 4 * count, "int8": quantizable + rest + 4 * rows},
            "largest_layer_params": largest}


def _bytes_as_stored(tensors: Mapping[str, TensorInfo]) -> int:
    return sum(t.elements * _DTYPE_BYTES.get(t.dtype, 2) for t in tensors.values())


def profile_from_tensors(diffusion: Mapping[str, TensorInfo], name: str, description: str, *,
                         generic: bool = False) -> dict[str, Any]:
    """A profile from the diffusion model's tensors (names without a checkpoint prefix). With `generic`, an
    architecture the names do not show is planned as a generic DiT (or UNet) with the dimensions the
    tensors show, instead of a ValueError."""
    try:
        base, dims = _template(diffusion)
    except ValueError:
        if not generic:
            raise
        base, dims = _generic(diffusion)
    profile = builtin_profile(base)
    groups: dict[str, list[tuple[str, TensorInfo]]] = {}
    for tensor_name, t in diffusion.items():
        if m := _BLOCK.match(tensor_name):
            key = f"{m.group(1)}.{m.group(2)}"
        elif tensor_name.startswith("middle_block."):
            key = "middle_block"
        else:
            key = "rest"
        groups.setdefault(key, []).append((tensor_name, t))

    def order(key: str) -> tuple[str, int]:
        head, _, idx = key.rpartition(".")
        return (head, int(idx)) if idx.isdigit() else (key, 0)

    profile["blocks"] = [{"name": k, **_block_bytes(groups[k])} for k in sorted(groups, key=order)]
    profile["weights_format"] = _weights_format(diffusion)
    profile["name"] = name
    profile["description"] = f"{description}; architecture as {base}"
    profile.update(dims)
    return profile


def _generic(names: Mapping[str, TensorInfo]) -> tuple[str, dict[str, Any]]:
    """A generic template: UNet-like names plan as sd1.5, anything else as flux-dev, with the widths the
    2-D weights show (hidden: the most common input width; widest: the largest output width)."""
    base = "sd1.5" if any(n.startswith(("input_blocks.", "down_blocks.")) for n in names) else "flux-dev"
    matrices = [t.shape for n, t in names.items() if n.endswith(".weight") and len(t.shape) == 2]
    dims: dict[str, Any] = {}
    if matrices:
        widths: dict[int, int] = {}
        for shape in matrices:
            widths[shape[1]] = widths.get(shape[1], 0) + 1
        hidden = max(sorted(widths), key=widths.__getitem__)
        dims.update(hidden=hidden, widest=max(s[0] for s in matrices), heads=max(1, hidden // 64))
    blocks = {m.group(0) for n in names if (m := _BLOCK.match(n))}
    if blocks:
        dims["attention_layers"] = len(blocks)
    return base, dims


def profile_from_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A model profile from a safetensors file's header (a diffusion model, or a full checkpoint with its
    text encoders and VAE)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (or is not a file)")
    diffusion, te, vae = _strip(read_header(p))
    if not diffusion:
        raise ValueError(f"{p} holds no diffusion-model tensors")
    profile = profile_from_tensors(diffusion, p.stem, f"{p.name}: read from its header")
    if te:
        profile["text_encoders"] = [{"name": "text encoders (in the checkpoint)", "bytes": _bytes_as_stored(te)}]
    if vae:
        profile["vae"] = {"name": "vae (in the checkpoint)", "bytes": _bytes_as_stored(vae)}
    return profile


def model_profile(model: str | os.PathLike[str]) -> dict[str, Any]:
    """A built-in name, or a path to a .safetensors file."""
    text = os.fspath(model)
    if text in _builtins():
        return builtin_profile(text)
    if text.endswith(".safetensors") or os.path.sep in text or Path(text).is_file():
        return profile_from_safetensors(text)
    return builtin_profile(text)
