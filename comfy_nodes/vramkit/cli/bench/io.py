"""`vramkit bench io`: quantizing a generated bf16 safetensors file, VRAMKit's streaming core against torch.

Generates a DiT-shaped bf16 file of `--size-gb` (blocks of qkv / proj / MLP Linear weights with hidden size
3072, plus norms and biases), then quantizes it to the same scheme three ways, each in its own child process:

- ``vramkit quantize``: the command line users run (the Rust core streams the file; output fsynced);
- ``torch load_file``: ``safetensors.torch.load_file`` (the whole state dict in RAM), the scheme's formula in
  torch per weight, ``save_file``;
- ``torch safe_open``: the same, reading one tensor at a time with ``safe_open`` (the outputs still
  accumulate until ``save_file``).

Wall time and peak RSS (``ru_maxrss`` of the child from ``wait4``, the number ``/usr/bin/time -v`` reports as
"Maximum resident set size") are measured for each, in the same run, from the page cache: the generated file
was just written and fits in RAM here. The torch paths do not fsync their output; VRAMKit's does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .timing import format_table

HIDDEN = 3072
#: One block's Linear weights (name, [out, in]); norms and biases are added as 1-D tensors.
BLOCK: tuple[tuple[str, tuple[int, ...]], ...] = (("attn.qkv", (3 * HIDDEN, HIDDEN)), ("attn.proj", (HIDDEN, HIDDEN)),
         ("mlp.0", (4 * HIDDEN, HIDDEN)), ("mlp.2", (HIDDEN, 4 * HIDDEN)))
RSS_LIMIT = 1 << 30
SPEEDUP_TARGET = 3.0

_TORCH_SCRIPT = r"""
import sys, torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
src, dst, fmt, gran, mode = sys.argv[1:6]
fmt_max = {"int8": 127.0, "fp8_e4m3fn": 448.0, "fp8_e5m2": 57344.0}[fmt]
def quantize(w):
    wf = w.float()
    amax = wf.abs().amax() if gran == "tensor" else wf.abs().amax(dim=1, keepdim=True)
    scale = amax / fmt_max
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    x = wf / scale
    if fmt == "int8":
        q = torch.round(x).clamp(-127, 127).to(torch.int8)
    else:
        q = x.clamp(-fmt_max, fmt_max).to(torch.float8_e4m3fn if fmt == "fp8_e4m3fn" else torch.float8_e5m2)
    return q, scale.reshape(() if gran == "tensor" else (-1, 1))
out = {}
def take(k, w):
    if k.endswith(".weight") and w.dim() == 2:
        out[k], out[k[:-7] + ".weight_scale"] = quantize(w)
    else:
        out[k] = w
if mode == "load_file":
    for k, w in load_file(src).items():
        take(k, w)
else:
    with safe_open(src, "pt") as f:
        for k in f.keys():
            take(k, f.get_tensor(k))
save_file(out, dst)
"""


@dataclass
class Run:
    name: str
    seconds: float
    peak_rss: int
    output_bytes: int


def generate(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Writes a DiT-shaped bf16 safetensors file of about `size_bytes` to `path` (streamed: one chunk of
    random values is generated and reused with a different scale per tensor). Returns its size."""
    per_block = sum(2 * o * i + 2 * o for _, (o, i) in BLOCK) + 2 * 2 * HIDDEN
    blocks = max(1, round(size_bytes / per_block))
    tensors: list[tuple[str, tuple[int, ...]]] = []
    for b in range(blocks):
        for name, shape in BLOCK:
            tensors.append((f"blocks.{b}.{name}.weight", shape))
            tensors.append((f"blocks.{b}.{name}.bias", (shape[0],)))
        tensors += [(f"blocks.{b}.norm1.weight", (HIDDEN,)), (f"blocks.{b}.norm2.weight", (HIDDEN,))]
    header: dict[str, object] = {"__metadata__": {"generator": "vramkit bench io"}}
    pos = 0
    for name, shape in tensors:
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1 << 24, generator=g)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for i, (_, shape) in enumerate(tensors):
            n = int(torch.Size(shape).numel())
            scale = 0.02 * (1 + (i % 7))
            done = 0
            while done < n:
                k = min(n - done, base.numel())
                offset = (i * 7919) % (base.numel() - k + 1)
                f.write((base[offset:offset + k] * scale).bfloat16().view(torch.uint16).numpy().tobytes())
                done += k
    return path.stat().st_size


def _child(cmd: list[str]) -> tuple[float, int]:
    """Runs `cmd`; returns (wall seconds, peak RSS in bytes of that child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {err[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports kilobytes


def run(size_gb: float = 4.0, folder: str | None = None, format: str = "int8", granularity: str = "channel",
        keep: bool = False) -> str:
    import importlib.util

    if importlib.util.find_spec("safetensors") is None:
        raise ValueError("bench io compares with safetensors + torch: pip install safetensors")
    if granularity not in ("tensor", "channel"):
        raise ValueError("bench io compares with torch's per-tensor and per-channel formulas: use granularity "
                         "tensor or channel")
    with tempfile.TemporaryDirectory(dir=folder, prefix="vramkit-bench-io-") as tmp:
        work = Path(tmp)
        src = work / "bench_bf16.safetensors"
        t0 = time.perf_counter()
        size = generate(src, int(size_gb * 2**30))
        gen_s = time.perf_counter() - t0
        env_python = sys.executable
        runs: list[Run] = []
        commands = {
            "vramkit quantize": [env_python, "-m", "vramkit", "quantize", str(src), "{out}", "--format", format,
                                 "--granularity", granularity, "--skip", "none", "--no-progress"],
            "torch load_file": [env_python, "-c", _TORCH_SCRIPT, str(src), "{out}", format, granularity,
                                "load_file"],
            "torch safe_open": [env_python, "-c", _TORCH_SCRIPT, str(src), "{out}", format, granularity,
                                "safe_open"],
        }
        for name, cmd in commands.items():
            out = work / f"out_{name.replace(' ', '_')}.safetensors"
            seconds, rss = _child([c.replace("{out}", str(out)) for c in cmd])
            runs.append(Run(name, seconds, rss, out.stat().st_size))
            if not keep:
                out.unlink()
        if keep:
            kept = Path(folder or ".") / "vramkit-bench-io"
            kept.mkdir(exist_ok=True)
            for f in work.iterdir():
                f.rename(kept / f.name)
    ours = runs[0]
    rows = [[r.name, r.seconds, r.peak_rss / 2**20, r.output_bytes / 2**20,
             f"{r.seconds / ours.seconds:.2f}x" if r is not ours else "1.00x"] for r in runs]
    gib = size / 2**30
    lines = [
        f"Quantizing a generated {gib:.2f} GiB bf16 safetensors file ({format} per {granularity}; generated in "
        f"{gen_s:.1f} s; each path in its own process, read from the page cache; {os.cpu_count()} CPUs):",
        format_table(["path", "seconds", "peak RSS MB", "output MB", "time vs vramkit"], rows),
    ]
    torch_load = runs[1]
    speedup = torch_load.seconds / ours.seconds
    meets = "meets" if speedup >= SPEEDUP_TARGET else "misses"
    under = "under" if ours.peak_rss < RSS_LIMIT else "OVER"
    lines.append(
        f"vramkit: {speedup:.2f}x faster than torch load_file ({meets} the {SPEEDUP_TARGET:.0f}x target), "
        f"{runs[2].seconds / ours.seconds:.2f}x faster than torch safe_open; peak RSS "
        f"{ours.peak_rss / 2**20:.0f} MB ({under} the 1 GiB target) against {torch_load.peak_rss / 2**20:.0f} MB "
        f"and {runs[2].peak_rss / 2**20:.0f} MB.")
    return "\n".join(lines)
