"""`vramkit inspect FILE`: what a safetensors file holds, by block (see `vramkit.io.inspect`)."""

from __future__ import annotations

import argparse
import json


def register(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = verbs.add_parser(
        "inspect", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="profile a safetensors file: tensors by block, dtypes, quantization markers, bytes per block",
        description="Reads and validates a safetensors header (no tensor data) and prints the file's profile: "
        "dtypes, quantization markers and which loaders read them, and bytes per block. --json prints the "
        "profile the planner reads (its fields are documented in vramkit.io.inspect).",
    )
    p.add_argument("file", help="the safetensors file")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import format_profile, inspect_file

    profile = inspect_file(args.file)
    print(json.dumps(profile, indent=1) if args.json else format_profile(profile))
    return 0
