#!/usr/bin/env bash
# The one-command GPU check. On a bare NVIDIA machine with Python 3.12 and torch (prepared beforehand with
# scripts/gpu_prepare.sh, which fills the git-ignored .gpu/ that travels with the tree):
#     bash scripts/gpu_check.sh
# installs vramkit's wheel and ComfyUI's missing dependencies into a scratch folder, unpacks ComfyUI, prints
# one table (scripts/gpu/check.py: quant CPU-vs-CUDA bits, dequant peak per layer, the tiny-model nodes under
# Dynamic VRAM and under --disable-dynamic-vram, attention auto, a DiT-sized model with and without each node),
# then runs `pytest -m gpu` under each memory manager. Here, without a GPU:
#     bash scripts/gpu_check.sh --dry-run
# runs the same steps on the CPU with the vramkit and ComfyUI (COMFYUI_PATH) already installed, to prove the
# script before device time is spent. Everything it writes goes to $VRAMKIT_GPU_WORK (default /tmp/vramkit-gpu)
# and, when set, $OUT (the device tool's result folder).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WORK="${VRAMKIT_GPU_WORK:-/tmp/vramkit-gpu}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD/scripts/gpu${PYTHONPATH:+:$PYTHONPATH}"  # the gpu_first pytest plugin
mkdir -p "$WORK"
REPORT="${OUT:-$WORK}"
status=0

if [ "$DRY" = 0 ]; then
    [ -d .gpu/wheels ] || { echo "no .gpu/wheels: run scripts/gpu_prepare.sh first and carry .gpu" >&2; exit 2; }
    echo "== installing the carried wheels into $WORK/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .gpu/wheels/*.whl || exit 2
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PYTHON" -c "import av" 2>/dev/null; then
        export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/stubs"
    fi
    echo "== unpacking ComfyUI into $WORK/comfyui"
    rm -rf "$WORK/comfyui" && mkdir -p "$WORK/comfyui"
    tar -C "$WORK/comfyui" -xJf .gpu/comfyui.tar.xz || exit 2
    export COMFYUI_PATH="$WORK/comfyui"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    : "${COMFYUI_PATH:?--dry-run needs COMFYUI_PATH (a ComfyUI tree whose dependencies are installed)}"
    export VRAMKIT_GPU_CHECK_DEVICE=cpu
fi
"$PYTHON" -c "import torch, vramkit; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'| vramkit', vramkit.__version__, vramkit.__file__)" || exit 2

echo "== the table"
"$PYTHON" scripts/gpu/check.py --report "$REPORT/gpu_table.md" || status=1

for manager in dynamic legacy; do
    echo "== pytest -m gpu under the $manager memory manager"
    VRAMKIT_TEST_MEMORY_MANAGER=$manager "$PYTHON" -m pytest -p no:cacheprovider -q -m gpu \
        -p gpu_first --rootdir . tests -x --junitxml="$REPORT/pytest_gpu_$manager.xml" || status=1
done
exit "$status"
