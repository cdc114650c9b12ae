"""How torch tensors reach the Rust core: as numpy views of the same memory."""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor, made contiguous first if needed (a copy only then). numpy has no
    bfloat16, so a bfloat16 tensor is viewed as its uint16 bits, which is how `vramkit._core` takes bf16."""
    t = t.detach().contiguous()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
