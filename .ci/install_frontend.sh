#!/usr/bin/env bash
# Installs the ComfyUI frontend that a ComfyUI tree pins (its requirements.txt: comfyui-frontend-package==X)
# into a folder of its own, for the browser tests, without touching the Python environment's packages:
# `pip install --no-deps --target ${TMPDIR:-/tmp}/vramkit-frontend-X comfyui-frontend-package==X`.
#
# Usage:  bash .ci/install_frontend.sh COMFYUI_PATH
# Progress goes to stderr; the last line of stdout is the folder (tests/browser finds it there by itself, or
# through VRAMKIT_FRONTEND_DIR). Safe to run again: an installed copy is reused.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
COMFYUI="${1:?usage: install_frontend.sh COMFYUI_PATH}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

VERSION="$(sed -n 's/^comfyui-frontend-package==\([0-9][0-9.]*\).*/\1/p' "$COMFYUI/requirements.txt" | head -n 1)"
if [ -z "$VERSION" ]; then
    echo "no comfyui-frontend-package==X pin in $COMFYUI/requirements.txt" >&2
    exit 1
fi
DEST="${TMPDIR:-/tmp}/vramkit-frontend-$VERSION"
if [ -d "$DEST/comfyui_frontend_package-$VERSION.dist-info" ] && [ -f "$DEST/comfyui_frontend_package/static/index.html" ]; then
    echo "reusing frontend $VERSION at $DEST" >&2
else
    echo "installing comfyui-frontend-package==$VERSION into $DEST" >&2
    rm -rf "$DEST"
    "$PYTHON" -m pip install --quiet --no-deps --target "$DEST" "comfyui-frontend-package==$VERSION" >&2
fi
echo "$DEST"
