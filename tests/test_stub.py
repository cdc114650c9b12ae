"""The hand-written stub `vramkit/_core.pyi` matches the compiled module (mypy's stubtest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_core_stub_matches_the_compiled_module() -> None:
    pytest.importorskip("mypy", reason="mypy is a test extra: pip install -e '.[test]'")
    allowlist = Path(__file__).with_name("stubtest_allowlist.txt")
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", "vramkit._core", "--allowlist", str(allowlist)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
