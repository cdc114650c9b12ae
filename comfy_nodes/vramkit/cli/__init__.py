"""The `vramkit` command line (also `python -m vramkit`).

Each verb lives in its own module and is imported only when used, so `vramkit --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import planner_table, run

    print(run(blocks=args.blocks, seed=args.seed, tokens=args.tokens))
    print()
    print(planner_table())
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what == "quant":
        from .bench.quant import run as run_quant

        print(run_quant(elements=args.elements, repeats=args.repeats))
    elif args.what == "io":
        from .bench.io import run as run_io

        print(run_io(size_gb=args.size_gb, folder=args.dir, format=args.format, granularity=args.granularity,
                     keep=args.keep))
    else:
        from .bench.attention import run as run_attention

        print(run_attention(repeats=args.repeats, quick=args.quick))
    return 0


def _install_comfyui(args: argparse.Namespace) -> int:
    from .install import install_into_comfyui, python_note

    path = install_into_comfyui(args.comfyui_path, force=args.force)
    print(f"VRAMKit loader written to {path}; restart ComfyUI to see the VRAMKit nodes.")
    print(python_note(path.parent.parent))
    return 0


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "whole number"  # what argparse calls the type in its messages
    return parse


POSITIVE = _whole_number(1)
NON_NEGATIVE = _whole_number(0)


def _version() -> str:
    import platform

    from .. import __version__

    return f"vramkit {__version__} (Python {platform.python_version()}, {platform.system()} {platform.machine()})"


_Help = argparse.ArgumentDefaultsHelpFormatter  # every option's help ends with its default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vramkit", formatter_class=_Help,
        description="Run diffusion models that do not fit your GPU: FP8/INT8 weights, chunked attention, "
        "offloading. Verbs below; `vramkit VERB --help` for each.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    demo = verbs.add_parser(
        "demo", formatter_class=_Help,
        help="quantize and run a small built-in transformer in every format; print what each costs",
        description="Builds a small seeded transformer (attention + MLP blocks with heavy-tailed weights), "
        "quantizes it in every 8-bit format ComfyUI and VRAMKit offer, runs it on the CPU, and compares each "
        "with the bf16 run (size, output SNR, error, time); then runs it with each attention mode. The table "
        "explains its columns; it ends with what to try in ComfyUI.",
    )
    demo.add_argument("--blocks", type=POSITIVE, default=4, help="transformer blocks")
    demo.add_argument("--tokens", type=POSITIVE, default=512, help="sequence length of the test input")
    demo.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of weights and input")
    demo.set_defaults(func=_demo)

    bench = verbs.add_parser(
        "bench", formatter_class=_Help,
        help="time the kernels against torch in the same run",
        description="Times vramkit's kernels against torch in the same run and prints ratios. "
        "`vramkit bench KERNELS --help` for each.",
    )
    kernels = bench.add_subparsers(dest="what", required=True, metavar="KERNELS")
    quant = kernels.add_parser(
        "quant", formatter_class=_Help, help="quantize / dequantize / error statistics",
        description="Times the Rust quantization kernels (every format and granularity) against the same "
        "math in torch, on random tensors, and prints the median of the timed runs and the ratio.")
    quant.add_argument("--elements", type=POSITIVE, default=64 * 2**20, help="elements per tensor")
    quant.add_argument("--repeats", type=POSITIVE, default=7, help="timed runs per kernel; the median is shown")
    quant.set_defaults(func=_bench)
    attention = kernels.add_parser(
        "attention", formatter_class=_Help, help="the CPU attention kernel against torch's SDPA",
        description="Times VRAMKit's chunked CPU attention against torch's scaled_dot_product_attention on "
        "diffusion-model shapes, with the peak extra memory of each.")
    attention.add_argument("--repeats", type=POSITIVE, default=7,
                           help="timed runs per kernel; the median is shown")
    attention.add_argument("--quick", action="store_true", help="the smaller shapes only")
    attention.set_defaults(func=_bench)
    io = kernels.add_parser(
        "io", formatter_class=_Help, help="quantizing a generated safetensors file, against safetensors + torch",
        description="Generates a DiT-shaped bf16 safetensors file and quantizes it with `vramkit quantize` and "
        "with safetensors + torch (load_file, and safe_open tensor by tensor), each in its own process; prints "
        "the wall time and peak RSS of each and the ratios.")
    io.add_argument("--size-gb", type=float, default=4.0, help="size of the generated bf16 file")
    io.add_argument("--dir", default=None, help="folder for the generated files (default: a temporary one)")
    io.add_argument("--format", choices=["int8", "fp8_e4m3fn", "fp8_e5m2"], default="int8", help="code format")
    io.add_argument("--granularity", choices=["tensor", "channel"], default="channel", help="weights per scale")
    io.add_argument("--keep", action="store_true", help="keep the generated files (in --dir)")
    io.set_defaults(func=_bench)

    from . import inspect as inspect_verb
    from . import quantize as quantize_verb

    quantize_verb.register(verbs)
    inspect_verb.register(verbs)

    install = verbs.add_parser(
        "install-comfyui", formatter_class=_Help,
        help="make a pip-installed vramkit show up in a ComfyUI installation",
        description="Writes a tiny loader package into the custom_nodes/ folder of a ComfyUI installation "
        "that imports the installed vramkit nodes (ComfyUI discovers node packs only there), and says which "
        "Python ComfyUI must run for it to find them.",
    )
    install.add_argument("comfyui_path", metavar="PATH",
                         help="the ComfyUI folder (the one holding main.py), or a ComfyUI user folder that holds "
                         "custom_nodes/ (ComfyUI Desktop's, or the folder given to --base-directory)")
    install.add_argument("--force", action="store_true", help="overwrite an existing loader")
    install.set_defaults(func=_install_comfyui)

    from . import plan as plan_verb

    plan_verb.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError) as exc:
        logging.getLogger("vramkit").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
