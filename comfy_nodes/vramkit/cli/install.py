"""``vramkit install-comfyui PATH``: make a pip-installed VRAMKit visible to a ComfyUI installation.

ComfyUI discovers node packs only in ``custom_nodes/``; a package installed with pip is invisible until
something there imports it. This writes that something: a one-file loader package, ``custom_nodes/VRAMKit/``
(the folder name is what the frontend's node badge shows).

PATH is the ComfyUI folder (the one holding ``main.py``) or a ComfyUI user folder: a folder holding
``custom_nodes/`` without ComfyUI's code, as ComfyUI Desktop keeps (its base folder, with ``models/``,
``custom_nodes/``, ``user/`` and its own ``.venv``) and as ``main.py --base-directory`` uses. The loader only
works when ComfyUI runs the Python this vramkit is installed in; `python_note` says which one that is.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("vramkit")

LOADER_DIR = "VRAMKit"
#: Where versions before 0.1 of this command put the loader (replaced when found).
OLD_LOADER_DIRS = ("vramkit-loader",)
#: Present in every VRAMKit custom_nodes entry (this loader, and the repository's root __init__.py).
MARKER = "vramkit-custom-nodes-entry"
_LOADER_HEADER = '"""Written by `vramkit install-comfyui`'

LOADER_SOURCE = f'''{_LOADER_HEADER}: loads the pip-installed VRAMKit nodes into ComfyUI."""
# {MARKER}
import logging
import sys

try:
    from vramkit.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY
except ImportError as exc:
    logging.getLogger("vramkit").error(
        "VRAMKit nodes not loaded: vramkit is not installed in the Python that runs ComfyUI (%s). "
        "Install it with: %s -m pip install vramkit (or a VRAMKit wheel or clone)", exc, sys.executable)
    NODE_CLASS_MAPPINGS = {{}}
    NODE_DISPLAY_NAME_MAPPINGS = {{}}
'''

_WHAT_TO_PASS = ("pass the ComfyUI folder (the one holding main.py) or a ComfyUI user folder (one holding "
                 "custom_nodes/, as ComfyUI Desktop and --base-directory use)")


def custom_nodes_folder(path: str | Path) -> Path:
    """The ``custom_nodes`` folder of the ComfyUI folder or ComfyUI user folder `path` (created in a ComfyUI
    folder that lacks one). FileNotFoundError, saying what to pass, for anything else."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; {_WHAT_TO_PASS}")
    custom_nodes = root / "custom_nodes"
    if (root / "main.py").is_file() and (root / "comfy").is_dir():
        custom_nodes.mkdir(exist_ok=True)
        return custom_nodes
    if custom_nodes.is_dir():
        return custom_nodes
    raise FileNotFoundError(f"{root} does not look like ComfyUI: it has neither main.py and comfy/ (the ComfyUI "
                            f"folder) nor custom_nodes/ (a ComfyUI user folder); {_WHAT_TO_PASS}")


def _written_by_us(init: Path) -> bool:
    try:
        return init.read_text(encoding="utf-8", errors="replace").startswith(_LOADER_HEADER)
    except OSError:
        return False


def _other_entries(custom_nodes: Path, loader: Path) -> list[Path]:
    """VRAMKit entries already in custom_nodes other than the loader (e.g. a git clone)."""
    found = []
    for entry in sorted(custom_nodes.iterdir()):
        init = entry / "__init__.py"
        if entry == loader or entry.name.endswith(".disabled") or not init.is_file():
            continue
        if entry.name in OLD_LOADER_DIRS and _written_by_us(init):
            continue  # an old loader of ours: replaced below
        try:
            if MARKER in init.read_text(encoding="utf-8", errors="replace"):
                found.append(entry)
        except OSError:
            continue
    return found


def _write_whole(path: Path, text: str) -> None:
    """`text` into `path`, whole or not at all (a temporary file, flushed to disk, renamed over it)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _remove_old_loaders(custom_nodes: Path) -> None:
    for name in OLD_LOADER_DIRS:
        old = custom_nodes / name
        init = old / "__init__.py"
        leftovers = {p.name for p in old.iterdir()} - {"__init__.py", "__pycache__"} if old.is_dir() else set()
        if init.is_file() and _written_by_us(init) and not leftovers:
            shutil.rmtree(old)
            log.info("Removed the loader an earlier vramkit wrote to %s (now %s)", old, LOADER_DIR)


def install_into_comfyui(comfyui_path: str | Path, force: bool = False) -> Path:
    """Writes ``<custom_nodes>/VRAMKit/__init__.py``; returns the loader folder.

    `comfyui_path` is the ComfyUI folder or a ComfyUI user folder (see `custom_nodes_folder`). Idempotent: an
    identical loader is left alone; a loader an earlier vramkit wrote under another folder name is replaced.
    An edited loader, or another VRAMKit entry such as a git clone in custom_nodes (both would register the
    same nodes), is an error unless `force`.
    """
    custom_nodes = custom_nodes_folder(comfyui_path)
    loader = custom_nodes / LOADER_DIR
    others = _other_entries(custom_nodes, loader)
    if others and not force:
        raise FileExistsError(f"VRAMKit is already in {custom_nodes} as {', '.join(p.name for p in others)}; "
                              "its nodes would load twice. Remove that entry, or pass --force to add the loader "
                              "anyway")
    init = loader / "__init__.py"
    if init.is_file():
        if init.read_text(encoding="utf-8") == LOADER_SOURCE:
            _remove_old_loaders(custom_nodes)
            log.info("VRAMKit loader already up to date in %s", loader)
            return loader
        if not force:
            raise FileExistsError(f"{init} exists and differs from the loader this version writes; pass "
                                  "--force to overwrite it")
    loader.mkdir(exist_ok=True)
    _write_whole(init, LOADER_SOURCE)
    _remove_old_loaders(custom_nodes)
    log.info("VRAMKit loader written to %s", loader)
    return loader


def _venv_python(folder: Path) -> Path | None:
    for candidate in (folder / ".venv" / "bin" / "python", folder / ".venv" / "Scripts" / "python.exe"):
        if candidate.is_file():
            return candidate
    return None


def python_note(root: Path) -> str:
    """Which Python ComfyUI must run to find this vramkit, for the installation at `root` (the folder that
    holds custom_nodes/); with what to do when that folder has a Python environment of its own (ComfyUI
    Desktop keeps one in ``.venv``) other than this one."""
    from .. import __version__

    here = Path(sys.executable)
    text = (f"VRAMKit {__version__} is installed in {here}: ComfyUI finds it only when it runs that Python "
            f"(start it with `{here} main.py`, or install VRAMKit into the Python that runs ComfyUI: "
            f"`<that python> -m pip install vramkit=={__version__}`).")
    own = _venv_python(root)
    if own is not None and Path(sys.prefix).resolve() != own.parent.parent.resolve():
        text += (f"\nThis folder has its own Python environment, which ComfyUI Desktop runs: install VRAMKit "
                 f"there: {own} -m pip install vramkit=={__version__}")
    return text
