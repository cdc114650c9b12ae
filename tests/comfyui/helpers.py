"""Running the tiny models and comparing their outputs (imports ComfyUI; used by the in-process tests)."""

from __future__ import annotations

from typing import Any

import tiny_models
import torch

STEPS = 2
CFG = 2.0


def sample(model: Any, kind: str, seed: int = 0, size: int = 8, steps: int = STEPS) -> torch.Tensor:
    """A short, deterministic KSampler-style run (euler, normal schedule, CFG 2) on an empty latent."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, size, size))
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = tiny_models.conditioning(kind, seed=1)
    negative = tiny_models.conditioning(kind, seed=2)
    return comfy.sample.sample(model, noise, steps, CFG, "euler", "normal", positive, negative, latent,
                               denoise=1.0, seed=seed, disable_pbar=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def lora_state_dict(model: Any, rank: int = 4, seed: int = 3, strength: float = 0.3) -> dict[str, torch.Tensor]:
    """A random LoRA in ComfyUI's generic key format for the 2-D (Linear) weights of `model`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in sorted(model.model.state_dict().items()):
        if not (key.startswith("diffusion_model.") and key.endswith(".weight") and value.dim() == 2):
            continue
        base = key[: -len(".weight")]
        out_features, in_features = value.shape
        sd[f"{base}.lora_up.weight"] = torch.randn(out_features, rank, generator=g) * strength
        sd[f"{base}.lora_down.weight"] = torch.randn(rank, in_features, generator=g) * strength / in_features**0.5
    return sd


def apply_lora(model: Any, lora: dict[str, torch.Tensor], strength: float = 1.0) -> Any:
    """What LoraLoaderModelOnly does: a clone with the LoRA's weight patches."""
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    return patched


def object_patches(model: Any) -> dict[str, Any]:
    return dict(model.object_patches)
