#!/usr/bin/env bash
# Runs every test: builds and installs vramkit (editable, with the test tools), then the Rust unit tests and
# the Python tests. ComfyUI integration tests run when COMFYUI_PATH names a ComfyUI checkout, and skip otherwise.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k quant`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The Rust tests of the bindings embed this same interpreter (pyo3 reads PYO3_PYTHON, else `python3` on PATH).
PYO3_PYTHON="${PYO3_PYTHON:-$(command -v "$PYTHON")}"
export PYO3_PYTHON

# Editable, so the tests import this checkout (a plain `pip install .` before is replaced).
"$PYTHON" -m pip install --quiet --editable ".[test]"
cargo test --release --workspace --quiet
status=0
"$PYTHON" -m pytest "$@" || status=$?
# pytest exits 5 when it collected no test (e.g. a -k that matches nothing): not a failure here.
if [ "$status" -eq 5 ]; then status=0; fi
exit "$status"
