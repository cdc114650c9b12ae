"""A small built-in transformer for `vramkit demo`: no download, seeded, runs on CPU in seconds.

Weights are heavy-tailed like trained ones: a Student-t bulk (df 5) with per-input-channel scales drawn from a
log-normal, so a few channels carry outliers — the structure that makes per-tensor scales lose precision
and per-channel / per-group scales win, as they do on real checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's scaled dot-product attention on (B, H, N, D) tensors: the default of `Block`."""
    return F.scaled_dot_product_attention(q, k, v)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention then a GELU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.attention: AttentionFn = sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """`blocks` transformer blocks of width `dim` over a token sequence, with a final norm and projection."""

    def __init__(self, dim: int = 512, heads: int = 8, blocks: int = 12) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def set_attention(self, fn: AttentionFn) -> None:
        for block in self.blocks:
            block.attention = fn  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


def heavy_tailed_(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fills `weight` (out, in) in place with Student-t values times log-normal input-channel scales."""
    out_features, in_features = weight.shape
    df = 5
    chi2 = torch.randn(df, out_features, in_features, generator=generator).square().mean(dim=0)
    student_t = torch.randn(out_features, in_features, generator=generator) / chi2.sqrt()
    channel_scale = torch.exp(0.6 * torch.randn(in_features, generator=generator))
    with torch.no_grad():
        weight.copy_(student_t * channel_scale / math.sqrt(in_features))
    return weight


def build(dim: int = 512, heads: int = 8, blocks: int = 12, seed: int = 0,
          dtype: torch.dtype = torch.bfloat16) -> TinyTransformer:
    """The demo model with seeded heavy-tailed weights, stored in `dtype` like a real checkpoint."""
    g = torch.Generator().manual_seed(seed)
    model = TinyTransformer(dim, heads, blocks)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                heavy_tailed_(module.weight, g)
                module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=g))
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=g))
    return model.to(dtype).eval().requires_grad_(False)


def example_input(tokens: int, dim: int = 512, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, tokens, dim, generator=g).to(dtype)
