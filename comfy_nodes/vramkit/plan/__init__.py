"""Planner glue (being built: issue 11): turns a model, a workflow's sizes and a VRAM budget into a plan of
what to apply (precision, attention mode, quantization, resident weights), through the Rust planners in
`vramkit._core` (`plan_attention`, `plan_offload`). Nothing here imports ComfyUI; the nodes that apply a plan
live in `vramkit.comfy`."""
