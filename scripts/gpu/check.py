"""The GPU check's table: one row per measurement, each with its verdict.

Run by scripts/gpu_check.sh (on a GPU, or on the CPU with --dry-run). Sections that need ComfyUI run in a child
process per memory manager (Dynamic VRAM is chosen once per process, before torch loads), see `sections.py`.
Every section catches its own failure, so one broken row never hides the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _child(section: str, manager: str, timeout: float) -> list[dict[str, object]]:
    """Runs one ComfyUI section in a fresh process under `manager` and returns its rows."""
    env = dict(os.environ, VRAMKIT_TEST_MEMORY_MANAGER=manager)
    cmd = [sys.executable, str(HERE / "sections.py"), section, manager]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"check": f"{section} [{manager}]", "result": f"timed out after {timeout:.0f} s", "ok": False}]
    rows = [json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("ROW: ")]
    if done.returncode != 0 or not rows:
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        print("\n".join(tail), file=sys.stderr)
        rows.append({"check": f"{section} [{manager}]", "result": f"exit {done.returncode}: "
                     + (tail[-1] if tail else "no output"), "ok": False})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--report", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per child section")
    args = parser.parse_args()

    import sections

    start = time.perf_counter()
    rows: list[dict[str, object]] = []
    device = sections.device()
    for name in sections.PLAIN:
        rows += sections.run_plain(name, device)
    if os.environ.get("COMFYUI_PATH"):
        managers = ["dynamic", "legacy"] if device == "cuda" else ["legacy"]
        for name in sections.COMFY:
            for manager in managers:
                rows += _child(name, manager, args.timeout)
    else:
        rows.append({"check": "ComfyUI sections", "result": "skipped: COMFYUI_PATH is not set", "ok": None})

    table = sections.markdown(rows, header=sections.header(device, time.perf_counter() - start))
    print(table)
    if args.report:
        args.report.write_text(table)
    return 0 if all(r.get("ok") is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
