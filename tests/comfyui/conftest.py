"""Tests that run inside a real ComfyUI, named by ``COMFYUI_PATH`` (the folder holding main.py).

Without COMFYUI_PATH, or when that ComfyUI cannot be imported, every test here is skipped with the reason.
ComfyUI is imported in-process with ``--cpu`` semantics (``args.cpu`` is set before ``comfy.model_management``
is first imported) unless a CUDA device is present; the server tests start their own ``main.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tiny_models, helpers, workflow_tools (tests use --import-mode=importlib)

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")

import comfy_server  # noqa: E402 (needs the sys.path entry above)

PROBLEM = comfy_server.import_problem(COMFYUI_PATH)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=PROBLEM or "")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)
            if PROBLEM:
                item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    if PROBLEM:
        return f"ComfyUI: skipped ({PROBLEM})"
    from vramkit.comfy import compat

    return f"ComfyUI: {compat.describe()} at {COMFYUI_PATH}"


@pytest.fixture(scope="session")
def comfy_version() -> str:
    from vramkit.comfy import compat

    return compat.comfyui_version()


@pytest.fixture(scope="session", params=["sd15", "flux"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_MODELS: dict[str, Any] = {}


@pytest.fixture(scope="session", autouse=True)
def _release_models() -> Iterator[None]:
    yield
    # Drop the patchers while ComfyUI's modules still exist (their __del__ needs them).
    import gc

    _MODELS.clear()
    gc.collect()


@pytest.fixture
def tiny(kind: str) -> Iterator[Any]:
    """The tiny model of `kind` (loaded once per session; tests must not modify it, only clone it)."""
    import tiny_models

    if kind not in _MODELS:
        _MODELS[kind] = tiny_models.load(kind)
    yield _MODELS[kind]
    # Leave nothing loaded between tests, as a fresh prompt would find it.
    import comfy.model_management as mm

    mm.unload_all_models()


@pytest.fixture(autouse=True)
def _inference_mode() -> Iterator[None]:
    # ComfyUI runs every node under torch.inference_mode(); tests call node code the same way.
    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One ComfyUI server for the whole session (CPU unless CUDA is present), stopped at the end."""
    base = tmp_path_factory.mktemp("comfyui-base")
    comfy_server.prepare_base(base)
    running = comfy_server.ComfyServer(Path(COMFYUI_PATH), base, cpu=not torch.cuda.is_available())
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def object_info(server: Any) -> dict[str, Any]:
    return server.get("/object_info")  # type: ignore[no-any-return]
