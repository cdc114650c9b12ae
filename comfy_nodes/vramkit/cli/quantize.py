"""`vramkit quantize IN OUT`: a safetensors model quantized into a new file (see `vramkit.io.quantize`)."""

from __future__ import annotations

import argparse
import json
import sys

# Kept literal so that building the parser imports nothing heavy (torch); `vramkit.io` checks them again.
FORMATS = ("fp8_e4m3fn", "fp8_e5m2", "int8")
GRANULARITIES = ("tensor", "channel", "group")
DEFAULT_GROUP_SIZE = 64


def register(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = verbs.add_parser(
        "quantize", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="quantize a safetensors model into a new file (streamed: memory stays near one tensor)",
        description="Quantizes the Linear weights of a safetensors diffusion model (or checkpoint) into a new "
        "file, streamed through the Rust core on all cores. fp8 per tensor and int8 per tensor/channel use "
        "ComfyUI's own markers, so ComfyUI's stock 'Load Diffusion Model' reads them (fp8_e4m3fn in ComfyUI "
        "0.3.7x too); other schemes (int8 per group, ...) load through VRAMKit's 'Load diffusion model "
        "(quantize on load)'. The output is written to a temporary file and renamed when complete; the input "
        "is only read.",
    )
    p.add_argument("input", help="the safetensors file to read")
    p.add_argument("output", help="the file to write (refused if it is the input)")
    p.add_argument("--format", choices=FORMATS, default="int8", help="code format")
    p.add_argument("--granularity", choices=GRANULARITIES, default="channel",
                   help="weights per scale: the whole tensor, one output channel (row), or a group of "
                        "--group-size weights of a row")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help="weights per scale with --granularity group")
    p.add_argument("--skip", default=None,
                   help="layers to keep as they are: comma-separated globs on layer names (e.g. "
                        "'double_blocks.0.*'), <first> and <last> (the stem and head), or 'none'; None means the "
                        "Quantize node's: '*norm*, *emb*, time_in.*, vector_in.*, guidance_in.*, <first>, <last>'")
    p.add_argument("--rotate", action="store_true",
                   help="ConvRot: rotate each 256-wide group of inputs by comfy-kitchen's block Hadamard before "
                        "int8 per-channel quantization (ComfyUI 0.29+ reads it; needs --format int8 "
                        "--granularity channel)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--worst", type=int, default=10, help="how many of the worst layers to list")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..io import quantize_file
    from ..quant.selection import DEFAULT_SKIP

    bar = None if args.no_progress else tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                                            desc="quantizing", file=sys.stderr, leave=False)

    def progress(done: int, total: int, done_bytes: int, total_bytes: int, name: str) -> None:
        if bar is None:
            return
        bar.total = total_bytes
        bar.n = done_bytes
        bar.set_postfix_str(f"{done}/{total} {name[-40:]}", refresh=False)
        bar.refresh()

    try:
        skip = DEFAULT_SKIP if args.skip is None else args.skip
        report = quantize_file(args.input, args.output, format=args.format, granularity=args.granularity,
                               group_size=args.group_size, skip=skip, rotate=args.rotate, progress=progress,
                               overwrite=args.force)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.summary(args.worst))
    return 0
