"""ComfyUI custom_nodes entry for a git clone of VRAMKit (``custom_nodes/ComfyUI-VRAMKit``).

ComfyUI imports this file under a name derived from its path. It imports the installed ``vramkit`` package
(absolute import: a relative one would load the package a second time). Without an install it tries the
clone's own ``comfy_nodes/``; without the compiled Rust core it logs one line saying how to install and
exports no nodes. It never raises: a broken pack must not stop ComfyUI from starting.
"""
# vramkit-custom-nodes-entry (lets `vramkit install-comfyui` recognise this entry)

import importlib
import logging
import os
import sys

_log = logging.getLogger("vramkit")
_CLONE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_CLONE, "comfy_nodes")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def _forget_vramkit() -> None:
    for name in [m for m in sys.modules if m == "vramkit" or m.startswith("vramkit.")]:
        del sys.modules[name]


def _is_this_clone(module: object) -> bool:
    # A folder named "vramkit" on sys.path (e.g. the clone itself) would shadow the real package.
    return os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or "")) == _CLONE


def _import_nodes() -> object:
    try:
        vramkit = importlib.import_module("vramkit")
        if not _is_this_clone(vramkit):
            return importlib.import_module("vramkit.comfy")
        _forget_vramkit()
    except ModuleNotFoundError as exc:
        if exc.name not in ("vramkit", "vramkit._core"):
            raise
        _forget_vramkit()
    if not os.path.isdir(_SOURCE):
        raise ModuleNotFoundError("vramkit is not installed", name="vramkit")
    sys.path.insert(0, _SOURCE)
    try:
        return importlib.import_module("vramkit.comfy")
    except ImportError:
        sys.path.remove(_SOURCE)
        _forget_vramkit()
        raise


try:
    _nodes = _import_nodes()
    NODE_CLASS_MAPPINGS = dict(_nodes.NODE_CLASS_MAPPINGS)  # type: ignore[attr-defined]
    NODE_DISPLAY_NAME_MAPPINGS = dict(_nodes.NODE_DISPLAY_NAME_MAPPINGS)  # type: ignore[attr-defined]
    WEB_DIRECTORY = _nodes.WEB_DIRECTORY  # type: ignore[attr-defined]
except ImportError as _exc:
    _log.error("VRAMKit nodes not loaded: its compiled core is not installed (%s). Install it with the Python "
               "that runs ComfyUI: %s -m pip install %s", _exc, sys.executable, _CLONE)
except Exception as _exc:  # never take ComfyUI's startup down
    _log.error("VRAMKit nodes not loaded: %s: %s", type(_exc).__name__, _exc)
