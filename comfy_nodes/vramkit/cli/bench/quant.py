"""`vramkit bench quant`: the quantization kernels against torch's own casts and eager formulas.

Every row times vramkit, torch and a plain copy of the kernel's input (made by the Rust core, with the same
output allocation as every kernel) interleaved in the same run. "% copy" is the kernel's bytes read plus
written per second over the copy's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ... import _core, quant
from ..._arrays import as_numpy
from .timing import format_table, measure

log = logging.getLogger(__name__)

ROW_LEN = 4096  # a typical hidden size: per-channel rows are this long


@dataclass
class Case:
    name: str
    source: torch.Tensor
    bytes_per_elem: float
    ours: Callable[[], object]
    theirs: Callable[[], object]
    theirs_label: str


def _eager_int8_channel(w: torch.Tensor) -> torch.Tensor:
    scale = w.float().abs().amax(dim=1) / 127
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)


def _eager_fp8_channel(w: torch.Tensor) -> torch.Tensor:
    scale = w.float().abs().amax(dim=1) / 448
    return (w.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)


def build_cases(elements: int, seed: int = 0) -> list[Case]:
    rows = max(1, elements // ROW_LEN)
    g = torch.Generator().manual_seed(seed)
    w32 = torch.randn(rows, ROW_LEN, generator=g)
    w16 = w32.bfloat16()
    fp8 = quant.quantize(w32, "fp8_e4m3fn", "none")
    fp8_view = fp8.data.view(torch.float8_e4m3fn)
    i8 = quant.quantize(w16, "int8", "channel")
    i8_scale = i8.scale[:, None]
    return [
        Case("f32 -> fp8_e4m3fn (cast)", w32, 5, lambda: quant.quantize(w32, "fp8_e4m3fn", "none"),
             lambda: w32.to(torch.float8_e4m3fn), "t.to(float8_e4m3fn)"),
        Case("bf16 -> fp8_e4m3fn (cast)", w16, 3, lambda: quant.quantize(w16, "fp8_e4m3fn", "none"),
             lambda: w16.to(torch.float8_e4m3fn), "t.to(float8_e4m3fn)"),
        Case("bf16 -> fp8_e4m3fn per-channel", w16, 3, lambda: quant.quantize(w16, "fp8_e4m3fn", "channel"),
             lambda: _eager_fp8_channel(w16), "eager formula"),
        Case("fp8_e4m3fn -> bf16", fp8.data, 3, lambda: fp8.dequantize(torch.bfloat16),
             lambda: fp8_view.to(torch.bfloat16), "t.to(bfloat16)"),
        Case("f32 -> int8 per-channel", w32, 5, lambda: quant.quantize(w32, "int8", "channel"),
             lambda: _eager_int8_channel(w32), "eager formula"),
        Case("bf16 -> int8 per-channel", w16, 3, lambda: quant.quantize(w16, "int8", "channel"),
             lambda: _eager_int8_channel(w16), "eager formula"),
        Case("bf16 -> int8 group-64", w16, 3 + 4 / 64, lambda: quant.quantize(w16, "int8", "group", 64),
             lambda: _eager_int8_channel(w16.reshape(-1, 64)), "eager formula"),
        Case("int8 per-channel -> bf16", i8.data, 3, lambda: i8.dequantize(torch.bfloat16),
             lambda: (i8.data.float() * i8_scale).to(torch.bfloat16), "eager formula"),
        Case("int8 per-channel -> f32", i8.data, 5, lambda: i8.dequantize(torch.float32),
             lambda: i8.data.float() * i8_scale, "eager formula"),
        Case("error stats (int8 per-channel)", w16, 3, lambda: quant.error_stats(w16, i8),
             lambda: _eager_stats(w16, i8), "eager formula"),
    ]


def _eager_stats(t: torch.Tensor, q: quant.QTensor) -> tuple[float, float]:
    err = (q.data.float() * q.scale[:, None]).double() - t.double()
    return float(err.abs().max()), float((err * err).mean())


def run(elements: int = 64 * 2**20, repeats: int = 7) -> str:
    if isinstance(elements, bool) or not isinstance(elements, int) or elements < 1:
        raise ValueError(f"elements must be a whole number >= 1, got {elements!r}")
    cases = build_cases(elements)
    rows = []
    for case in cases:
        src = case.source
        timings = measure({"ours": case.ours, "theirs": case.theirs,
                           "copy": lambda src=src: _core._bench.copy_bytes(as_numpy(src))}, repeats=repeats)
        n = src.numel()
        ours, theirs, copy = (timings[k].median_s for k in ("ours", "theirs", "copy"))
        ours_gbs = case.bytes_per_elem * n / ours / 1e9
        copy_gbs = 2 * n * src.element_size() / copy / 1e9
        rows.append([case.name, f"{n / 1e6:.0f}M", n / ours / 1e9, n / theirs / 1e9, f"{theirs / ours:.1f}x",
                     case.theirs_label, ours_gbs, copy_gbs, f"{100 * ours_gbs / copy_gbs:.0f}%"])
        log.debug("%s: %s", case.name, timings)
    headers = ["kernel", "elements", "vramkit Gelem/s", "torch Gelem/s", "ratio", "torch op",
               "vramkit GB/s", "copy GB/s", "% copy"]
    threads = f"torch threads {torch.get_num_threads()}, vramkit SIMD {_core.simd_level()}"
    return (f"vramkit bench quant: median of {repeats} interleaved runs; {threads}\n"
            + format_table(headers, rows))
