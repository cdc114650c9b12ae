"""Test-only ComfyUI nodes for VRAMKit's server tests; the tests copy this pack (with tiny_models.py) into the
test server's custom_nodes. It makes ComfyUI's stock UNETLoader detect the tiny models, and stands in for
what a test machine lacks: text encoders (conditioning from a seed) and a VAE (a latent shown as an image).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from . import tiny_models

for _kind in tiny_models.KINDS:
    tiny_models.register(_kind)


class VRAMKitTestConditioning:
    """CONDITIONING for the tiny models, seeded by the prompt text (replaces CLIPTextEncode in tests)."""

    CATEGORY = "VRAMKit/testing"
    FUNCTION = "run"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"text": ("STRING", {"default": ""}), "kind": (list(tiny_models.KINDS),)}}

    def run(self, text: str, kind: str) -> tuple[Any]:
        return (tiny_models.conditioning(kind, seed=zlib.crc32(text.encode())),)


class VRAMKitTestDecode:
    """The first three latent channels as an RGB image (replaces VAEDecode in tests)."""

    CATEGORY = "VRAMKit/testing"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    def run(self, samples: dict[str, Any], vae: Any) -> tuple[torch.Tensor]:
        latent = samples["samples"][:, :3].float()
        image = (latent / max(float(latent.abs().max()), 1e-6) + 1) / 2
        return (image.movedim(1, -1).contiguous(),)


NODE_CLASS_MAPPINGS = {"VRAMKitTestConditioning": VRAMKitTestConditioning, "VRAMKitTestDecode": VRAMKitTestDecode}
