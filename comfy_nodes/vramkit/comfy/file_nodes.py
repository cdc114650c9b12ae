"""The quantized-file nodes: "Load diffusion model (quantize on load)" and "Save quantized model".

Thin like every node (see `nodes.py`, which registers them): validate, call `quantized_files`, return the
result and a summary.
"""

from __future__ import annotations

from typing import Any

from ..io import FILE_GRANULARITIES
from ..quant import DEFAULT_GROUP_SIZE, FORMATS, selection
from . import compat, quantized_files

CATEGORY = "VRAMKit"

_FORMAT_TIP = ("int8: best quality at 8 bits. fp8_e4m3fn: FP8 with more precision; fp8_e5m2: FP8 with more "
               "range. fp8 per tensor and int8 per tensor/channel are ComfyUI's own formats; the rest load "
               "through VRAMKit's operations.")
_GRANULARITY_TIP = ("How many weights share one scale: a group of consecutive weights of a row (best quality, "
                    "VRAMKit's format), an output channel (ComfyUI's per-row INT8), or the whole tensor.")


def _scheme_inputs() -> dict[str, Any]:
    return {
        "format": (list(FORMATS), {"default": "int8", "tooltip": _FORMAT_TIP}),
        "granularity": (list(FILE_GRANULARITIES), {"default": "group", "tooltip": _GRANULARITY_TIP}),
        "group_size": ("INT", {"default": DEFAULT_GROUP_SIZE, "min": 1, "max": 4096, "step": 1,
                               "tooltip": "Weights per scale for granularity 'group' (32/64/128 usual). Layers "
                                          "whose rows it does not divide use per-channel scales."}),
        "skip_patterns": ("STRING", {
            "default": selection.DEFAULT_SKIP, "multiline": False,
            "tooltip": "Layers kept as they are: globs on layer names (e.g. double_blocks.0.*) separated by "
                       "commas, plus <first> and <last> (the model's stem and head). 'none' quantizes every "
                       "Linear layer."}),
        "rotate": ("BOOLEAN", {
            "default": False,
            "tooltip": "ConvRot (int8 per channel only): rotate groups of 256 inputs by comfy-kitchen's block "
                       "Hadamard before quantizing, as ComfyUI's INT8 W8A8 files do. Needs ComfyUI 0.29+."}),
    }


class VRAMKitLoadQuantized:
    DESCRIPTION = ("Loads a diffusion model from the diffusion_models folder quantized to 8 bits, quantizing it "
                   "once into a disk cache (streamed by the Rust core: little RAM, all cores) and loading the "
                   "cached file through ComfyUI's own loader, so the second load does no work and Dynamic VRAM "
                   "maps the small file. The summary says whether the cache hit.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    OUTPUT_TOOLTIPS = ("The quantized model.", "Cache hit or miss, what was quantized, where the file is.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "unet_name": (compat.diffusion_model_files(), {
                    "tooltip": "A safetensors file of ComfyUI's diffusion_models folder (high precision)."}),
                **_scheme_inputs(),
            },
            "optional": {
                "cache_dir": ("STRING", {
                    "default": "", "tooltip": "Where quantized files are kept: empty = models/vramkit_cache "
                                              "(kept across restarts), 'temp' = ComfyUI's temp folder (emptied at "
                                              "each start), or a folder path."}),
                "cache_limit_gb": ("FLOAT", {
                    "default": quantized_files.DEFAULT_CACHE_GB, "min": 0.1, "max": 100000.0, "step": 1.0,
                    "tooltip": "Size limit of the cache folder; the least recently used files go first."}),
            },
        }

    def run(self, unet_name: str, format: str, granularity: str, group_size: int, skip_patterns: str,
            rotate: bool, cache_dir: str = "", cache_limit_gb: float = quantized_files.DEFAULT_CACHE_GB
            ) -> dict[str, Any]:
        result = quantized_files.load_quantized(unet_name, format, granularity, group_size, skip_patterns,
                                                rotate, cache_dir, cache_limit_gb)
        text = result.summary()
        return {"ui": {"text": [text]}, "result": (result.model, text)}


class VRAMKitSaveQuantized:
    DESCRIPTION = ("Writes the model's diffusion-model weights (LoRA merged) quantized to 8 bits into a new "
                   "safetensors file in the output folder, in the same formats as the quantize-on-load node: "
                   "fp8 per tensor and int8 per tensor/channel load in stock ComfyUI, the rest through "
                   "'Load diffusion model (quantize on load)'.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("summary",)
    OUTPUT_TOOLTIPS = ("Where the file went, what was quantized, the worst layers.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to save (it is not changed)."}),
            "filename_prefix": ("STRING", {"default": "diffusion_models/vramkit",
                                           "tooltip": "Path under ComfyUI's output folder, without extension."}),
            **_scheme_inputs(),
        }}

    def run(self, model: Any, filename_prefix: str, format: str, granularity: str, group_size: int,
            skip_patterns: str, rotate: bool) -> dict[str, Any]:
        _, text = quantized_files.save_model(model, filename_prefix, format, granularity, group_size,
                                             skip_patterns, rotate)
        return {"ui": {"text": [text]}, "result": (text,)}
