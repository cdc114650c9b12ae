"""The `vramkit` command line (also `python -m vramkit`).

Each verb lives in its own module and is imported only when used, so `vramkit --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


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
    else:
        from .bench.attention import run as run_attention

        print(run_attention(repeats=args.repeats, quick=args.quick))
    return 0


def _install_comfyui(args: argparse.Namespace) -> int:
    from .install import install_into_comfyui

    path = install_into_comfyui(args.comfyui_path, force=args.force)
    print(f"VRAMKit loader written to {path}; restart ComfyUI to see the VRAMKit nodes.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vramkit",
        description="Run diffusion models that do not fit your GPU: FP8/INT8 weights, chunked attention, "
        "offloading. Verbs below; `vramkit VERB --help` for each.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    demo = verbs.add_parser(
        "demo",
        help="quantize and run a small built-in transformer in every format; print a table",
        description="Builds a small seeded transformer (attention + MLP blocks with heavy-tailed weights), "
        "quantizes it in every format, runs it, and prints size, compression, output SNR against the bf16 "
        "run, max abs error and quantize time.",
    )
    demo.add_argument("--blocks", type=int, default=12, help="transformer blocks (default 12)")
    demo.add_argument("--tokens", type=int, default=1024, help="sequence length of the test input (default 1024)")
    demo.add_argument("--seed", type=int, default=0, help="seed of weights and input (default 0)")
    demo.set_defaults(func=_demo)

    bench = verbs.add_parser(
        "bench",
        help="time the kernels against torch in the same run",
        description="Times vramkit's kernels against torch in the same run and prints ratios.",
    )
    bench.add_argument("what", choices=["quant", "attention"], help="which kernels")
    bench.add_argument("--elements", type=int, default=64 * 2**20,
                       help="quant: elements per tensor (default 64M)")
    bench.add_argument("--repeats", type=int, default=7, help="timed runs per kernel; the median is shown")
    bench.add_argument("--quick", action="store_true", help="attention: the smaller shapes only")
    bench.set_defaults(func=_bench)

    install = verbs.add_parser(
        "install-comfyui",
        help="make a pip-installed vramkit show up in a ComfyUI installation",
        description="Writes a tiny loader package into COMFYUI_PATH/custom_nodes/ that imports the "
        "installed vramkit nodes (ComfyUI discovers node packs only there).",
    )
    install.add_argument("comfyui_path", help="the ComfyUI folder (the one holding main.py)")
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
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        logging.getLogger("vramkit").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
