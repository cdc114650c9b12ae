"""VRAMKit inside ComfyUI: the nodes, and the glue that patches models per workflow.

This is the only part of VRAMKit that imports ComfyUI, and it does so lazily (inside functions), so
``import vramkit.comfy`` works without ComfyUI. ComfyUI loads the nodes through a ``custom_nodes`` entry (the
repository's root ``__init__.py``, or the loader ``vramkit install-comfyui`` writes), which re-exports these.
"""

from __future__ import annotations

from pathlib import Path

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

#: The frontend extension that shows node summaries and reports in the UI (absolute, so any loader works).
WEB_DIRECTORY = str(Path(__file__).with_name("web"))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
