"""`vramkit demo`: quantize the built-in transformer in every format, run it, and compare with bf16.

What each row means for a ComfyUI user: "fp8_e4m3fn cast" is what `--fp8_e4m3fn-unet` (or UNETLoader's
fp8 weight dtype) does, "int8 tensor" is ComfyUI's only native INT8 layout, and "int8 group-64" is what
VRAMKit's Quantize node does by default.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .. import attention
from ..quant.modules import quantize_linears
from . import demo_model
from .bench.timing import format_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoScheme:
    label: str
    format: str
    granularity: str
    group_size: int | None = None


SCHEMES = [
    DemoScheme("fp8_e4m3fn cast (ComfyUI --fp8_e4m3fn-unet)", "fp8_e4m3fn", "none"),
    DemoScheme("fp8_e5m2 cast (ComfyUI --fp8_e5m2-unet)", "fp8_e5m2", "none"),
    DemoScheme("fp8_e4m3fn per-tensor scale", "fp8_e4m3fn", "tensor"),
    DemoScheme("fp8_e4m3fn per-channel scale", "fp8_e4m3fn", "channel"),
    DemoScheme("int8 per-tensor (ComfyUI int8_tensorwise)", "int8", "tensor"),
    DemoScheme("int8 per-channel", "int8", "channel"),
    DemoScheme("int8 group-64 (VRAMKit default)", "int8", "group", 64),
]


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer: what the model occupies in (V)RAM."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    ref = reference.double()
    err = other.double() - ref
    noise = float(err.square().sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.square().sum()) / noise)


def _progress(label: str):
    def wrap(items):
        return tqdm(items, desc=f"quantizing ({label})", unit="layer", leave=False,
                    disable=not sys.stderr.isatty())
    return wrap


def run(blocks: int = 4, seed: int = 0, tokens: int = 512, dim: int = 512, heads: int = 8) -> str:
    if blocks <= 0 or tokens <= 0:
        raise ValueError(f"blocks and tokens must be positive; got blocks={blocks}, tokens={tokens}")
    torch.manual_seed(seed)
    base = demo_model.build(dim, heads, blocks, seed)
    x = demo_model.example_input(tokens, dim, seed)
    with torch.inference_mode():
        start = time.perf_counter()
        reference = base(x)
        ref_time = time.perf_counter() - start
    base_bytes = model_bytes(base)
    rows: list[list[object]] = [["bf16 (reference)", f"{base_bytes / 2**20:.1f} MiB", "1.00x", "inf", 0.0, "-",
                                 f"{1000 * ref_time:.0f}"]]
    for scheme in SCHEMES:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        # The final projection stays in bf16, as quantized checkpoints keep their last layer.
        quantize_linears(model, scheme.format, scheme.granularity, scheme.group_size, skip=["out"],
                         progress=_progress(scheme.label))
        quantize_s = time.perf_counter() - start
        with torch.inference_mode():
            start = time.perf_counter()
            out = model(x)
            run_s = time.perf_counter() - start
        size = model_bytes(model)
        rows.append([scheme.label, f"{size / 2**20:.1f} MiB", f"{base_bytes / size:.2f}x", snr_db(reference, out),
                     float((out.double() - reference.double()).abs().max()), f"{1000 * quantize_s:.0f}",
                     f"{1000 * run_s:.0f}"])
    headers = ["format", "weight bytes", "compression", "output SNR dB", "max abs err", "quantize ms", "run ms"]
    title = (f"vramkit demo: {blocks}-block transformer (dim {dim}, {heads} heads, {tokens} tokens), "
             f"weight-only quantization, output compared with the bf16 run")
    return "\n\n".join(["\n".join([title, format_table(headers, rows), QUANT_COLUMNS]),
                        "\n".join([attention_table(base, x, reference, heads), ATTENTION_COLUMNS]), NEXT_STEPS])


#: What the quantization table's columns mean, printed under it.
QUANT_COLUMNS = """\
Everything here is measured on this CPU: bytes in RAM and CPU time, not VRAM or GPU speed. The same weights
take the same bytes in VRAM, so "compression" is what a format saves in VRAM.
- weight bytes, compression: the model's weights in that format (8 bits: about half of bf16; more is better).
- output SNR dB: how close the output stays to the bf16 run; higher is better (+10 dB: a tenth of the error
  power).
- max abs err: the largest single difference from the bf16 output; lower is better.
- quantize ms: converting the weights, once per model load. run ms: one forward pass on this CPU (8-bit weights
  are turned back into bf16 layer by layer as they run, so about the bf16 time; times vary with machine load)."""

#: What the attention table's columns mean, printed under it.
ATTENTION_COLUMNS = """\
- attention ms, peak attention memory: one attention call of this model's shape, and the extra memory it took.
- of N x N scores: that memory against one full score matrix; below 100% means attention memory grows
  linearly with the image size instead of with its square (what lets large images fit).
- model run ms, output SNR dB vs sdpa: the whole model with that mode; 30 dB and more is rounding only."""

#: Printed last: where to go from here.
NEXT_STEPS = """\
Next, in ComfyUI (nodes in the VRAMKit category; example workflows in the template browser under VRAMKit):
- the model's weights do not fit: "Quantize weights (FP8/INT8)" after the loader (int8, group 64: the best
  quality here, half the VRAM of fp16);
- large images or videos run out of memory: "Attention mode" set to chunked;
- still not enough: "Sequential offload" with a VRAM budget, and "Offload text encoder / VAE" after the prompt;
- see what each change does: "Measure VRAM" before the sampler and "VRAM report" after it."""


ATTENTION_MODES = ("sdpa", "chunked", "sliced")


def attention_table(model: demo_model.TinyTransformer, x: torch.Tensor, reference: torch.Tensor,
                    heads: int) -> str:
    """One row per attention mode: a single attention call of the model's shape (time, peak extra memory
    against the full score matrix) and the whole bf16 model run with that mode."""
    b, n, d = x.shape
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(b, heads, n, d // heads, generator=g).to(x.dtype) for _ in range(3))
    scores = b * heads * n * n * 4  # one float32 N x N score matrix per head: what "standard" attention holds
    rows: list[list[object]] = []
    for mode in ATTENTION_MODES:
        seconds, peak = attention.measure_mode(q, k, v, mode)
        model.set_attention(lambda q, k, v, mode=mode: attention.attention(q, k, v, mode=mode))
        with torch.inference_mode():
            start = time.perf_counter()
            out = model(x)
            run_s = time.perf_counter() - start
        rows.append([mode, f"{1000 * seconds:.1f}", f"{peak / 2**20:.2f} MiB", f"{100 * peak / scores:.1f}%",
                     f"{1000 * run_s:.0f}", snr_db(reference, out)])
    model.set_attention(demo_model.sdpa)
    headers = ["attention mode", "attention ms", "peak attention memory", "of N x N scores", "model run ms",
               "output SNR dB vs sdpa"]
    title = (f"attention modes: one call of {b}x{heads} heads x {n} tokens x {d // heads} ({x.dtype}), "
             f"and the whole model run with each mode")
    return title + "\n" + format_table(headers, rows)


PLANNER_BUDGETS_GB = (48, 24, 16, 12, 8, 6)


def planner_table(model: str = "flux-dev", width: int = 1024, height: int = 1024,
                  budgets_gb: tuple[int, ...] = PLANNER_BUDGETS_GB) -> str:
    """The fit planner on a built-in model for a few budgets (reference GPU speeds, no GPU needed)."""
    from .. import plan as planner

    profile = planner.model_profile(model)
    rows: list[list[object]] = []
    for gb in budgets_gb:
        p = planner.plan_fit(profile, planner.reference_device(gb * planner.GIB), planner.job(width, height),
                             gb * planner.GIB)
        rows.append([f"{gb} GB", "yes" if p.fits else "no", ", ".join(p.rungs) or "(nothing)",
                     f"{p.predicted_peak_bytes / planner.GIB:.2f} GiB", f"{p.predicted_step_seconds:.2f}"])
    headers = ["VRAM", "fits", "what the plan applies (ladder order)", "predicted peak", "s/step"]
    title = (f"vramkit plan: {model} at {width}x{height} on a reference GPU of each size "
             f"(`vramkit plan {model} --vram GB --size {width}x{height}` explains each)")
    return title + "\n" + format_table(headers, rows)
