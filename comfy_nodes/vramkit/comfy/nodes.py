"""The VRAMKit nodes (ComfyUI's V1 node API, which every supported ComfyUI version loads).

Thin on purpose: each node validates its inputs, calls one module that does the work on a clone, and
returns the clone plus a summary the user can read. Nothing is patched globally; bypassing a node undoes it.
"""

from __future__ import annotations

from typing import Any

from .. import quant
from ..quant import selection
from . import (
    attention_modes,
    auto,
    budget,
    display,
    dtypes,
    measure,
    offload_encoders,
    precision,
    quantize_model,
    quantized_ops,
)
from .file_nodes import VRAMKitLoadQuantized, VRAMKitSaveQuantized

CATEGORY = "VRAMKit"


class AnyType(str):
    """ComfyUI's wildcard socket type: equal to every other type (ComfyUI 0.3.7x needs the ``__ne__``)."""

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


ANY = AnyType("*")


def _with_text(text: str, *result: Any) -> dict[str, Any]:
    """The node's outputs with its summary shown on the node (see `display.node_output`)."""
    return display.node_output(text, *result)


class VRAMKitQuantize:
    DESCRIPTION = ("Stores the model's Linear and Conv weights in 8 bits (INT8 or FP8) and dequantizes each layer "
                   "as it runs: about half the VRAM of FP16 (a quarter of FP32). INT8 with a scale per group of "
                   "64 weights keeps the most quality; norms, embeddings and the first and last layers stay in "
                   "high precision. Per-tensor FP8 and per-tensor/per-channel INT8 use ComfyUI's own formats "
                   "where it has them (0.29+), so ModelSave and ComfyUI's kernels handle them; compute "
                   "'int8 matmul' runs ComfyUI's fast W8A8 kernels. Works with LoRA (apply the LoRA after this "
                   "node) and with ComfyUI's offloading.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    OUTPUT_TOOLTIPS = ("The quantized model (a clone; the input model is unchanged).",
                       "What was quantized, what was kept, bytes before and after.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to quantize."}),
            "format": (list(quantize_model.NODE_FORMATS), {
                "default": "int8",
                "tooltip": "int8: best quality at 8 bits. fp8_e4m3fn: FP8 with more precision; fp8_e5m2: "
                           "FP8 with more range."}),
            "granularity": (list(quantize_model.NODE_GRANULARITIES), {
                "default": "group",
                "tooltip": "How many weights share one scale: a group of consecutive weights (best), an "
                           "output channel, or the whole tensor (ComfyUI's native INT8, the worst)."}),
            "group_size": ("INT", {"default": quant.DEFAULT_GROUP_SIZE, "min": 1, "max": 4096, "step": 1,
                                   "tooltip": "Weights per scale for granularity 'group' (32/64/128 usual). "
                                              "Layers whose rows it does not divide use per-channel scales."}),
            "skip_patterns": ("STRING", {
                "default": selection.DEFAULT_SKIP, "multiline": False,
                "tooltip": "Layers kept in high precision: globs on layer names (e.g. double_blocks.0.*) "
                           "separated by commas, plus <first> and <last> (the input and output layers). "
                           "'none' quantizes everything."}),
            "compute_dtype": (list(dtypes.CHOICES), {
                "default": "default",
                "tooltip": "What the weights are dequantized to for the math; default keeps the model's."}),
        }, "optional": {
            # Optional with defaults: workflows saved before these inputs existed load and run unchanged.
            "compute": (list(quantized_ops.COMPUTES), {
                "default": "dequantize",
                "tooltip": "dequantize: weight-only, each weight is dequantized for its matmul (best quality). "
                           "int8 matmul: W8A8 through ComfyUI's INT8 kernels (fastest on NVIDIA sm >= 7.5, "
                           "somewhat lower quality); needs format int8 with granularity channel or tensor "
                           "and ComfyUI 0.29+."}),
            "rotation": (list(quantize_model.ROTATIONS), {
                "default": "none",
                "tooltip": "convrot: rotate each layer by a block Hadamard (ComfyUI's ConvRot, groups of 256) "
                           "before INT8 matmuls, which recovers most of W8A8's quality loss. Needs compute "
                           "int8 matmul and granularity channel."}),
        }}

    def run(self, model: Any, format: str, granularity: str, group_size: int, skip_patterns: str,
            compute_dtype: str, compute: str = "dequantize", rotation: str = "none") -> dict[str, Any]:
        precision.check_bf16(model, dtypes.parse(compute_dtype, "compute_dtype"), "compute_dtype")
        out, report = quantize_model.quantize_model(model, format, granularity, group_size, skip_patterns,
                                                    compute_dtype, compute=compute, rotation=rotation)
        text = report.summary()
        return _with_text(text, out, text)


class VRAMKitAttention:
    DESCRIPTION = ("Picks how this model computes attention, without a launch flag. auto (the default) keeps the "
                   "backend ComfyUI was started with on a GPU (sage, flash, xformers or PyTorch) and switches to "
                   "memory-efficient chunked or sliced attention only where that backend would not fit the memory "
                   "budget; on a CPU it runs VRAMKit's Rust kernel where it beats PyTorch (AVX-512). Or force "
                   "sdpa (PyTorch's fused kernel), chunked or sliced (less VRAM at large sizes, slower), ComfyUI's "
                   "sub-quadratic (--use-quad-cross-attention) or split (--use-split-cross-attention), or sage / "
                   "flash / xformers (auto is used where they are not installed). Only this model is affected; "
                   "bypass the node to undo it.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    OUTPUT_TOOLTIPS = ("The model with this attention mode (a clone; the input model is unchanged).",
                       "Which attention runs and why.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "A diffusion model (UNet or DiT); VAEs and text encoders are not "
                                           "affected."}),
            "mode": (attention_modes.node_modes(), {
                "default": attention_modes.default_mode(),
                "tooltip": "auto keeps ComfyUI's backend unless it does not fit the memory budget; chunked/sliced "
                           "save the most memory; sage/flash/xformers fall back to auto where not installed."}),
            "memory_budget_mb": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64,
                                         "tooltip": "Memory attention may use, for auto/chunked/sliced; "
                                                    "0 = auto (the free memory, read once per sampling step)."}),
        }}

    def run(self, model: Any, mode: str, memory_budget_mb: int) -> dict[str, Any]:
        out, text = attention_modes.apply_attention(model, mode, memory_budget_mb)
        return display.node_output(text, out, text)


class VRAMKitOffload:
    DESCRIPTION = ("Sequential (layer by layer) offload: keeps at most the given amount of this model's weights "
                   "in VRAM (the largest layers) and lets ComfyUI stream the other layers from RAM as they run. "
                   "Less VRAM, slower steps. Works under both of ComfyUI's memory managers: with Dynamic VRAM "
                   "(the default on NVIDIA) it caps the model's share of VRAM after each load, with the legacy "
                   "loader it caps what the loader keeps resident. 0 = auto: decided when sampling starts, after "
                   "ComfyUI has freed what it will, leaving room for the activations of this image size. The "
                   "summary says which memory manager is in charge, what stays and what streams, and plainly "
                   "when the budget cannot be applied.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    OUTPUT_TOOLTIPS = ("The model held to the budget (a clone; the input model is unchanged).",
                       "The memory manager in charge, what stays in VRAM, what streams, and what it costs.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        # The former one-value ``engine`` input is gone: ComfyUI drops an input the node does not declare from
        # an API prompt, and the frontend assigns a saved workflow's widget values by position (a trailing
        # "comfy" finds no widget and is ignored), so workflows saved with it still load and run.
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to stream."}),
            # step 0.1: the frontend rounds a FLOAT to the decimals of its step (0.25 would show and round
            # as 0.3).
            "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.1,
                                         "tooltip": "Most VRAM this model's weights may take, in GB; the rest "
                                                    "streams from RAM each step. 0 = auto (what fits beside "
                                                    "the activations of this image size)."}),
        }}

    def run(self, model: Any, vram_budget_gb: float) -> dict[str, Any]:
        out, text = budget.apply_offload(model, vram_budget_gb)
        return _with_text(text, out, text)


class VRAMKitPrecision:
    DESCRIPTION = ("Sets how this model stores its weights and computes: fp32 (4 bytes a value), fp16 or bf16 "
                   "(2 bytes; bf16 has fp32's range). Weights in another dtype than the compute dtype are cast "
                   "layer by layer as they run, so bf16 weights work on any GPU; computing in bf16 needs an "
                   "RTX 30 / Ampere or newer. default keeps what the model has.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    OUTPUT_TOOLTIPS = ("The model with these dtypes (a clone; the input model is unchanged).",
                       "What was converted and the VRAM it saves.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model whose storage and compute dtypes to set."}),
            "weight_dtype": (list(dtypes.CHOICES), {
                "default": "default",
                "tooltip": "How the weights are stored. bf16 works on any GPU: the weights are cast to the "
                           "compute dtype as each layer runs."}),
            "compute_dtype": (list(dtypes.CHOICES), {
                "default": "default",
                "tooltip": "What the math runs in. bf16 needs an RTX 30 / Ampere or newer GPU."}),
        }}

    def run(self, model: Any, weight_dtype: str, compute_dtype: str) -> dict[str, Any]:
        out, text = precision.apply_precision(model, weight_dtype, compute_dtype)
        return _with_text(text, out, text)


class VRAMKitFreeAfter:
    DESCRIPTION = ("Passes its input through, then moves the connected text encoder and/or VAE out of VRAM. Put "
                   "it right after prompt encoding (text encoders run only at the start, so freeing them is "
                   "nearly free); the VAE comes back by itself when it decodes.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("passthrough",)
    OUTPUT_TOOLTIPS = ("The input, unchanged (connect it where the input was going).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"anything": (ANY, {"tooltip": "Passed through unchanged, e.g. the CONDITIONING "
                                                            "from CLIP Text Encode."})},
                "optional": {"clip": ("CLIP", {"tooltip": "Text encoder to move out of VRAM."}),
                             "vae": ("VAE", {"tooltip": "VAE to move out of VRAM."})}}

    def run(self, anything: Any, clip: Any = None, vae: Any = None) -> dict[str, Any]:
        return _with_text(offload_encoders.free_models({"clip": clip, "vae": vae}), anything)


class VRAMKitMeasure:
    DESCRIPTION = ("Measures every sampling run of this model: peak VRAM (peak process RAM on a CPU), load time "
                   "and time per step. Connect the sampler's LATENT output to 'VRAM report' to see the numbers; "
                   "turn on one optimization at a time and compare.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model, measured whenever it samples (a clone).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL", {"tooltip": "The diffusion model to measure; connect this node's "
                                                            "output to the sampler."}),
                             "label": ("STRING", {"default": "", "tooltip": "A name for this run, shown in the "
                                                                            "report (e.g. 'int8 + chunked')."})}}

    def run(self, model: Any, label: str) -> tuple[Any]:
        return (measure.apply_measure(model, label),)


class VRAMKitAutoOptimize:
    DESCRIPTION = ("Plans how to fit this job into your VRAM and applies only what the plan needs, in the order "
                   "of the ladder: 16-bit precision, efficient attention, text encoder / VAE offload, 8-bit "
                   "weights, layer streaming, attention slicing. Where the model fits, nothing is applied. The "
                   "plan (with a reason per step and the predicted peak and step time) is the second output. "
                   "The safety net retries a sampling run that runs out of memory one rung higher.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "plan")
    OUTPUT_TOOLTIPS = ("The model to sample with (the input itself, or a clone with the plan's patches).",
                       "The plan: what was applied and why, predicted memory and time.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model."}),
            "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16,
                              "tooltip": "Image width (used when no latent is connected)."}),
            "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16,
                               "tooltip": "Image height (used when no latent is connected)."}),
            "frames": ("INT", {"default": 1, "min": 1, "max": 4096,
                               "tooltip": "Video frames (used when no latent is connected)."}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 4096,
                              "tooltip": "Batch size (used when no latent is connected)."}),
            "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.1,
                                         "tooltip": "VRAM this job may use; 0 = what this GPU has free."}),
            "preset": (list(auto.PRESETS), {
                "default": "auto",
                "tooltip": "auto plans; gpu-only / medvram / lowvram / novram fix the rungs like the launch "
                           "flag, for this workflow only."}),
            "safety_net": ("BOOLEAN", {"default": True,
                                       "tooltip": "On out-of-memory while sampling: free caches, climb one rung, "
                                                  "retry."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "The text encoder: counted, and freed after encoding if the plan says."}),
            "vae": ("VAE", {"tooltip": "The VAE: counted, and kept off the GPU while sampling if the plan says."}),
            "latent": ("LATENT", {"tooltip": "The latent to sample: its size replaces width/height/frames/batch."}),
        }}

    def run(self, model: Any, width: int, height: int, frames: int, batch: int, vram_budget_gb: float,
            preset: str, safety_net: bool, clip: Any = None, vae: Any = None,
            latent: dict[str, Any] | None = None) -> dict[str, Any]:
        out, text, record = auto.auto_optimize(model, clip, vae, latent, width, height, frames, batch,
                                               vram_budget_gb, preset, safety_net)
        return display.node_output(text, out, text, chart=record.chart)


class VRAMKitReport:
    DESCRIPTION = "Shows what 'Measure VRAM' recorded for the sampling run that produced this latent."
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("The latent, unchanged (connect it to VAE Decode).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT", {"tooltip": "The LATENT output of the measured sampler."})}}

    def run(self, samples: dict[str, Any]) -> dict[str, Any]:
        text, numbers = measure.report(samples)
        auto_text = auto.report(samples)
        if auto_text is not None:
            text = auto_text if numbers is None else f"{text}\n{auto_text}"
        if numbers is None:
            return display.node_output(text, samples)
        found = measure.find(samples["samples"])
        chart = found.chart() if found is not None else None
        planned = auto.find(samples["samples"])
        if chart is not None and planned is not None and planned.chart is not None and found is not None \
                and found.peak_kind.endswith("VRAM"):  # a plan predicts VRAM: beside a VRAM measurement only
            chart = display.with_prediction(chart, planned.chart)
        text = "\n".join([text, *(display.chart_lines(chart) if chart is not None else []), measure.COMPARE_HINT])
        return display.node_output(text, samples, chart=chart, extra={"vramkit_measurement": numbers})


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "VRAMKitQuantize": VRAMKitQuantize,
    "VRAMKitAttention": VRAMKitAttention,
    "VRAMKitOffload": VRAMKitOffload,
    "VRAMKitPrecision": VRAMKitPrecision,
    "VRAMKitFreeAfter": VRAMKitFreeAfter,
    "VRAMKitMeasure": VRAMKitMeasure,
    "VRAMKitReport": VRAMKitReport,
    "VRAMKitAutoOptimize": VRAMKitAutoOptimize,
    "VRAMKitLoadQuantized": VRAMKitLoadQuantized,
    "VRAMKitSaveQuantized": VRAMKitSaveQuantized,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VRAMKitQuantize": "Quantize weights (FP8/INT8)",
    "VRAMKitAttention": "Attention mode",
    "VRAMKitOffload": "Sequential offload",
    "VRAMKitPrecision": "Precision",
    "VRAMKitFreeAfter": "Offload text encoder / VAE",
    "VRAMKitMeasure": "Measure VRAM",
    "VRAMKitReport": "VRAM report",
    "VRAMKitAutoOptimize": "Auto-optimize for my VRAM",
    "VRAMKitLoadQuantized": "Load diffusion model (quantize on load)",
    "VRAMKitSaveQuantized": "Save quantized model",
}
