"""Tiny diffusion models with random weights, built and loaded through ComfyUI's own code paths.

- ``sd15``: an SD1.5-shaped UNet (model_channels 32, context 32). ComfyUI's SD15 config pins 320/768, so
  `register_tiny_sd15` adds a small config class to ``comfy.supported_models.models``, after which the stock
  UNETLoader detects it from the file.
- ``flux``: a Flux-shaped DiT (hidden size 128 = one head, one double and one single block, context 32),
  which ComfyUI 0.29+ detects as Flux as is. ComfyUI 0.3.7x hard-codes Flux's 24 heads in detection, so
  there `register_tiny_flux` adds a config class that derives the head count from the width, as 0.29 does.

Weights are drawn with a fan-in scale (std 1/sqrt(fan_in)), so activations stay O(1) and quantization error
shows in the outputs instead of vanishing under the sampler's noise. Imports ComfyUI: only for tests that run
inside a ComfyUI (``COMFYUI_PATH``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

CONTEXT_DIM = 32
POOLED_DIM = 32
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
FLUX_PARAMS = {
    "in_channels": 16, "out_channels": 16, "vec_in_dim": POOLED_DIM, "context_in_dim": CONTEXT_DIM,
    "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    "txt_ids_dims": [],
}
KINDS = ("sd15", "flux")


def register_tiny_sd15() -> type:
    """Adds (once) a config class matching the tiny UNet to ComfyUI's detection list, and returns it."""
    import comfy.supported_models as supported

    for cls in supported.models:
        if cls.__name__ == "VRAMKitTinySD15":
            return cls  # type: ignore[no-any-return]

    class VRAMKitTinySD15(supported.SD15):  # type: ignore[misc, name-defined]
        unet_config = {  # noqa: RUF012 (ComfyUI's config classes are written this way)"context_dim": CONTEXT_DIM, "model_channels": 32, "use_linear_in_transformer": False,
                       "adm_in_channels": None, "use_temporal_attention": False}

    supported.models.insert(0, VRAMKitTinySD15)
    return VRAMKitTinySD15


def _flux_detection_is_off(sd: dict[str, torch.Tensor]) -> bool:
    import comfy.model_detection

    config = comfy.model_detection.detect_unet_config(sd, "")
    return bool(config["num_heads"] * sum(config["axes_dim"]) != config["hidden_size"])


def register_tiny_flux() -> type:
    """Adds (once) a Flux config class whose head count follows the width (for ComfyUI 0.3.7x)."""
    import comfy.supported_models as supported

    for cls in supported.models:
        if cls.__name__ == "VRAMKitTinyFlux":
            return cls  # type: ignore[no-any-return]

    class VRAMKitTinyFlux(supported.Flux):  # type: ignore[misc, name-defined]
        unet_config = {"image_model": "flux", "guidance_embed": True, "hidden_size": 128}  # noqa: RUF012

        def __init__(self, unet_config: dict[str, Any]) -> None:
            heads = unet_config["hidden_size"] // sum(unet_config["axes_dim"])
            super().__init__(dict(unet_config, num_heads=heads))

    supported.models.insert(0, VRAMKitTinyFlux)
    return VRAMKitTinyFlux


def register(kind: str, sd: dict[str, torch.Tensor] | None = None) -> None:
    """Makes ComfyUI's detection load the tiny `kind` (registering config classes only where needed)."""
    if kind == "sd15":
        register_tiny_sd15()
    elif kind == "flux" and _flux_detection_is_off(sd if sd is not None else state_dict("flux")):
        register_tiny_flux()


def _random_like(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) >= 2:
            std = 1.0 / math.sqrt(math.prod(shape[1:]))
            out[name] = torch.randn(shape, generator=g) * std
        elif name.endswith(("norm.weight", "scale")) or (".norm" in name and name.endswith("weight")):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.1 * torch.randn(shape, generator=g)
    return out


def state_dict(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusion-model state dict (no prefix) for `kind`, as a UNET file would hold it."""
    import comfy.ops

    if kind == "sd15":
        cfg = register_tiny_sd15()(dict(SD15_UNET_CONFIG))
        cfg.set_inference_dtype(torch.float32, None)
        shapes = {k: v.shape for k, v in cfg.get_model({}, "").diffusion_model.state_dict().items()}
    elif kind == "flux":
        import comfy.ldm.flux.model as flux

        accepted = {f.name for f in dataclasses.fields(flux.FluxParams)}
        params = {k: v for k, v in FLUX_PARAMS.items() if k in accepted}
        net = flux.Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu", **params)
        shapes = {k: v.shape for k, v in net.state_dict().items()}
    else:
        raise ValueError(f"unknown tiny model {kind!r}; accepted: {', '.join(KINDS)}")
    return _random_like(shapes, seed)


def load(kind: str, seed: int = 0) -> Any:
    """A ModelPatcher for the tiny `kind`, loaded the way UNETLoader loads a file (detection included)."""
    import comfy.sd

    sd = state_dict(kind, seed)
    register(kind, sd)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not detect the tiny {kind} model")
    return patcher


def conditioning(kind: str, seed: int = 0, tokens: int = 8) -> list[list[Any]]:
    """CONDITIONING for the tiny models: random context, plus the pooled vector Flux needs."""
    g = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {}
    if kind == "flux":
        extra["pooled_output"] = torch.randn(1, POOLED_DIM, generator=g)
        extra["guidance"] = 3.5
    return [[torch.randn(1, tokens, CONTEXT_DIM, generator=g), extra]]
