#!/usr/bin/env bash
# Prepares everything the GPU check needs on a bare NVIDIA machine that has only Python 3.12 + torch and no
# network, into the git-ignored folder .gpu/ (carried to that machine; at most 64 MiB):
#   .gpu/wheels/   vramkit's abi3 wheel (built here) and the ComfyUI 0.29 dependencies its image lacks
#                  (comfy-kitchen, comfy-aimdo, torchsde, trampoline), for CPython 3.12 manylinux x86-64;
#   .gpu/comfyui.tar.xz   the ComfyUI tree named by COMFYUI_PATH (fetched, never committed), without its tests;
#   .gpu/stubs/av  a stand-in for PyAV (35 MB, does not fit the carry): ComfyUI imports it at start-up for its
#                  video types, which the check never uses.
# Usage: COMFYUI_PATH=/path/to/ComfyUI bash scripts/gpu_prepare.sh ; then on the GPU machine:
#        bash scripts/gpu_check.sh   (here, `bash scripts/gpu_check.sh --dry-run` runs it on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
: "${COMFYUI_PATH:?COMFYUI_PATH must name the ComfyUI tree to carry (the current ComfyUI)}"
OUT=.gpu
rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$OUT/stubs"

echo "building vramkit's abi3 wheel" >&2
"$PYTHON" -m maturin build --release --quiet --out "$OUT/wheels" >&2

echo "downloading the wheels the GPU image lacks (CPython 3.12, manylinux x86-64)" >&2
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$OUT/wheels" \
    "comfy-kitchen==0.2.24" "comfy-aimdo==0.4.10" "torchsde==0.2.6" "trampoline==0.1.2" >&2

echo "packing ComfyUI from $COMFYUI_PATH" >&2
tar -C "$COMFYUI_PATH" -cJf "$OUT/comfyui.tar.xz" --exclude=.git --exclude=tests --exclude=tests-unit \
    --exclude=__pycache__ --exclude=.github --exclude='*.png' --exclude='*.jpg' --exclude='*.webp' .

cp -R scripts/gpu/av_stub "$OUT/stubs/av"

size=$(du -sb "$OUT" | cut -f1)
echo "prepared $OUT: $((size / 1024 / 1024)) MiB (the device carries at most 64 MiB)" >&2
ls -la "$OUT" "$OUT/wheels" >&2
if [ "$size" -gt $((62 * 1024 * 1024)) ]; then
    echo "too large to carry" >&2
    exit 1
fi
