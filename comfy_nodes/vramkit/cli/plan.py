"""`vramkit plan`: how to fit a model into a VRAM budget, without a GPU.

    vramkit plan flux-dev --vram 8 --size 1024x1024
    vramkit plan ./wan2.1_t2v_14B_bf16.safetensors --vram 12 --size 832x480 --frames 81 --json
    vramkit plan --list

GB are binary (2**30 bytes), as GPU memory is sold: a "24 GB" card is 24 GiB.
"""

from __future__ import annotations

import argparse
import json
import re

GIB = 1024**3


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT in pixels, e.g. 1024x1024; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not 0 < value <= 4096:
        raise argparse.ArgumentTypeError(f"expected a number of GB in (0, 4096], got {text!r}")
    return value


def _sm(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--sm must look like 8.9; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def register(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = verbs.add_parser(
        "plan",
        help="how to fit a model into your VRAM: the cheapest rungs of the ladder, with reasons",
        description="Plans a built-in model or a .safetensors file for a VRAM budget without a GPU: the "
        "least of the ladder (16-bit, efficient attention, text encoder/VAE offload, 8-bit weights, layer "
        "streaming, attention slicing) whose predicted peak fits, with the predicted step time. GB are "
        "binary (2**30 bytes). Speeds default to a reference RTX 4090-class card.",
    )
    p.add_argument("model", nargs="?", help="a built-in name (see --list) or a .safetensors path")
    p.add_argument("--list", action="store_true", help="list the built-in model profiles")
    p.add_argument("--vram", type=_gb, help="GPU memory in GB (default: this GPU's, if there is one)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT in pixels (default 1024x1024)")
    p.add_argument("--frames", type=int, default=1, help="video frames (default 1)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--ram", type=_gb, default=None,
                   help="system RAM in GB; a plan needing more is refused (default: not checked)")
    p.add_argument("--preset", default="auto", choices=["auto", "gpu-only", "medvram", "lowvram", "novram"],
                   help="auto plans; the others fix the rungs like ComfyUI's launch flag")
    p.add_argument("--sm", type=_sm, default=(8, 9), help="compute capability of the GPU (default 8.9)")
    p.add_argument("--pcie", type=float, default=None, help="pinned host-to-device GB/s (default 24.7)")
    p.add_argument("--tflops", type=float, default=None, help="effective 16-bit TFLOPS (default 100)")
    p.add_argument("--os", dest="os_name", default="linux", choices=["linux", "windows"], help="default linux")
    p.add_argument("--estimate", default="first_principles", choices=["first_principles", "comfy"],
                   help="which activation estimate decides the fit (both are shown)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import plan as planner

    if args.list:
        print(planner.profiles.describe_builtins())
        return 0
    if not args.model:
        raise ValueError("name a model (a built-in name or a .safetensors path), or pass --list")
    width, height = args.size or (1024, 1024)
    if args.frames <= 0 or args.batch <= 0:
        raise ValueError(f"--frames and --batch must be positive; got {args.frames} and {args.batch}")
    profile = planner.model_profile(args.model)
    speeds = {k: v for k, v in (("h2d_gbps", args.pcie), ("tflops", args.tflops)) if v is not None}
    ram = int(args.ram * GIB) if args.ram else 0
    if args.vram is None:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("no GPU here: give the GPU memory with --vram GB")
        device = planner.device_profile()
        if args.ram:
            device["ram_bytes"] = ram
        budget = 0
    else:
        vram = int(args.vram * GIB)
        device = planner.reference_device(vram, ram_bytes=ram, os_name=args.os_name, compute_capability=args.sm,
                                          **speeds)
        budget = vram
    job = planner.job(width, height, args.frames, args.batch, estimate=args.estimate)
    result = planner.plan_fit(profile, device, job, budget, args.preset)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.text())
    return 0
