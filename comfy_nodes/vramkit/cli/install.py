"""``vramkit install-comfyui PATH``: make a pip-installed VRAMKit visible to a ComfyUI installation.

ComfyUI discovers node packs only in ``custom_nodes/``; a package installed with pip is invisible until
something there imports it. This writes that something: a one-file loader package.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("vramkit")

LOADER_DIR = "vramkit-loader"
#: Present in every VRAMKit custom_nodes entry (this loader, and the repository's root __init__.py).
MARKER = "vramkit-custom-nodes-entry"

LOADER_SOURCE = f'''"""Written by `vramkit install-comfyui`: loads the pip-installed VRAMKit nodes into ComfyUI."""
# {MARKER}
import logging
import sys

try:
    from vramkit.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY
except ImportError as exc:
    logging.getLogger("vramkit").error(
        "VRAMKit nodes not loaded: vramkit is not installed in the Python that runs ComfyUI (%s). "
        "Install it with: %s -m pip install <a VRAMKit clone or wheel>", exc, sys.executable)
    NODE_CLASS_MAPPINGS = {{}}
    NODE_DISPLAY_NAME_MAPPINGS = {{}}
'''


def _check_comfyui(root: Path) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass the ComfyUI folder (the one holding main.py)")
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise FileNotFoundError(f"{root} does not look like ComfyUI (no main.py and comfy/ there); pass the "
                                "ComfyUI folder (the one holding main.py)")


def _other_entries(custom_nodes: Path, loader: Path) -> list[Path]:
    """VRAMKit entries already in custom_nodes other than the loader (e.g. a git clone)."""
    found = []
    for entry in sorted(custom_nodes.iterdir()):
        init = entry / "__init__.py"
        if entry == loader or entry.name.endswith(".disabled") or not init.is_file():
            continue
        try:
            if MARKER in init.read_text(encoding="utf-8", errors="replace"):
                found.append(entry)
        except OSError:
            continue
    return found


def install_into_comfyui(comfyui_path: str | Path, force: bool = False) -> Path:
    """Writes ``<comfyui_path>/custom_nodes/vramkit-loader/__init__.py``; returns the loader folder.

    Idempotent: an identical loader is left alone. An edited loader, or another VRAMKit entry such as a git
    clone in custom_nodes (both would register the same nodes), is an error unless `force`.
    """
    root = Path(comfyui_path).expanduser().resolve()
    _check_comfyui(root)
    custom_nodes = root / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    loader = custom_nodes / LOADER_DIR
    others = _other_entries(custom_nodes, loader)
    if others and not force:
        raise FileExistsError(f"VRAMKit is already in {custom_nodes} as {', '.join(p.name for p in others)}; "
                              "its nodes would load twice. Remove that entry, or pass --force to add the loader "
                              "anyway")
    init = loader / "__init__.py"
    if init.is_file():
        if init.read_text(encoding="utf-8") == LOADER_SOURCE:
            log.info("VRAMKit loader already up to date in %s", loader)
            return loader
        if not force:
            raise FileExistsError(f"{init} exists and differs from the loader this version writes; pass "
                                  "--force to overwrite it")
    loader.mkdir(exist_ok=True)
    init.write_text(LOADER_SOURCE, encoding="utf-8")
    log.info("VRAMKit loader written to %s", loader)
    return loader
