"""The float dtypes the nodes offer, by the names they show (one table for Quantize and Precision)."""

from __future__ import annotations

import torch

#: Name shown in a node -> torch dtype.
FLOATS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: A dtype input's choices: "default" (keep what the model has) and every float.
CHOICES: tuple[str, ...] = ("default", *FLOATS)


def parse(name: str, input_name: str) -> torch.dtype | None:
    """The dtype named `name`, None for "default"; a clear error for anything else."""
    if not isinstance(name, str):
        raise TypeError(f"{input_name} must be one of {', '.join(CHOICES)} (a string), got {type(name).__name__}")
    if name not in CHOICES:
        raise ValueError(f"{input_name} {name!r} is not one of {', '.join(CHOICES)}")
    return FLOATS.get(name)
