"""Checkpoint files through the Rust core (being built: issue 9): reading and writing safetensors (and the
quantized checkpoints VRAMKit makes) via `vramkit._core`, whole or not at all. Nothing here imports ComfyUI."""
