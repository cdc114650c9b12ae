"""Every instruction-set copy of the kernels (portable, AVX2, AVX-512) passes the bit-exactness tests.

The kernels pick the widest copy the CPU runs; `VRAMKIT_SIMD` caps that level, so each level runs the
exactness suite in a subprocess of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vramkit import _core

HERE = Path(__file__).parent


@pytest.mark.parametrize("level", ["portable", "avx2"])
def test_lower_simd_levels_are_bit_exact_too(level: str) -> None:
    if os.environ.get("VRAMKIT_SIMD"):
        pytest.skip("already running under a capped SIMD level")
    env = {**os.environ, "VRAMKIT_SIMD": level}
    probe = subprocess.run([sys.executable, "-c", "import vramkit._core as c; print(c.simd_level())"],
                           env=env, capture_output=True, text=True, timeout=120, check=True)
    used = probe.stdout.strip()
    if level == "avx2" and used == "portable":
        pytest.skip("this CPU has no AVX2")
    assert used in ("portable", "avx2+fma+f16c")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(HERE / "test_quant_exact.py"), str(HERE / "test_quant_errors.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_simd_level_is_reported() -> None:
    assert _core.simd_level() in ("portable", "avx2+fma+f16c", "avx512")
