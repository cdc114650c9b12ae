"""A stand-in for PyAV on the GPU check machine only (see scripts/gpu_prepare.sh).

ComfyUI imports ``av`` at start-up for its video input/output types; the GPU check never decodes or
encodes video, and PyAV's 35 MB wheel does not fit the device's carry limit. Any use raises.
"""

from typing import Any


class _Missing:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("PyAV is not installed on this machine (GPU check stand-in)")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Missing,), {})
