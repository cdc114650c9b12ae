"""Browser tests: a real ComfyUI server (``COMFYUI_PATH``) with the frontend that ComfyUI pins, driven in
headless Chromium by Python playwright.

Needs, and skips with the reason when one is missing:
- ``COMFYUI_PATH`` naming an importable ComfyUI (as for tests/comfyui);
- the frontend pinned in its requirements.txt (``comfyui-frontend-package==X``): ``VRAMKIT_FRONTEND_DIR`` (a
  ``pip install --target`` folder or a frontend's ``static`` folder), else ``${TMPDIR:-/tmp}/vramkit-frontend-X``
  (what ``bash .ci/install_frontend.sh $COMFYUI_PATH`` writes), else the installed package if its version matches;
- Python playwright, and a Chromium binary: ``VRAMKIT_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on
  PATH (Debian's ``apt-get install chromium``). Playwright never downloads a browser here.

With ``VRAMKIT_REQUIRE_BROWSER=1`` (CI) a missing piece fails the tests instead.

Screenshots go to ``VRAMKIT_SCREENSHOTS`` or a fresh folder under the temp dir; the path is printed at the end
of the run (they are for looking at, not committed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
COMFY_TESTS = HERE.parent / "comfyui"
sys.path.insert(0, str(COMFY_TESTS))  # comfy_server, workflow_tools, tiny_models

import comfy_server  # noqa: E402 (needs the sys.path entry above)

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")


def pinned_frontend(comfyui: Path) -> str | None:
    """The frontend version `comfyui` pins in its requirements.txt (None when it pins none)."""
    try:
        text = (comfyui / "requirements.txt").read_text()
    except OSError:
        return None
    found = re.search(r"^comfyui-frontend-package==([0-9][0-9.]*)", text, re.MULTILINE)
    return found.group(1) if found else None


def _static_dir(folder: Path, version: str) -> Path | None:
    """The frontend's static folder in `folder` if it holds frontend `version` (a pip --target folder, a
    site-packages folder, or the static folder itself)."""
    if (folder / "comfyui_frontend_package-" f"{version}.dist-info").is_dir():
        static = folder / "comfyui_frontend_package" / "static"
        return static if (static / "index.html").is_file() else None
    if (folder / "index.html").is_file() and (folder / "assets").is_dir():
        return folder  # a bare static folder: its version cannot be read, trust the caller
    return None


def find_frontend(comfyui: Path) -> tuple[Path | None, str, str]:
    """(static folder, version, why not found)."""
    version = pinned_frontend(comfyui)
    if version is None:
        return None, "", f"{comfyui}/requirements.txt pins no comfyui-frontend-package"
    candidates = []
    if os.environ.get("VRAMKIT_FRONTEND_DIR"):
        candidates.append(Path(os.environ["VRAMKIT_FRONTEND_DIR"]))
    candidates.append(Path(tempfile.gettempdir()) / f"vramkit-frontend-{version}")
    for folder in candidates:
        static = _static_dir(folder, version)
        if static is not None:
            return static, version, ""
    try:
        if importlib.metadata.version("comfyui-frontend-package") == version:
            spec = importlib.util.find_spec("comfyui_frontend_package")
            if spec is not None and spec.origin:
                static = Path(spec.origin).parent / "static"
                if (static / "index.html").is_file():
                    return static, version, ""
    except importlib.metadata.PackageNotFoundError:
        pass
    return None, version, (f"ComfyUI's pinned frontend {version} is not installed: run "
                           f"`bash .ci/install_frontend.sh {comfyui}` or set VRAMKIT_FRONTEND_DIR")


def find_chromium() -> str | None:
    for candidate in (os.environ.get("VRAMKIT_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _problem() -> tuple[str | None, Path | None, str, str | None]:
    problem = comfy_server.import_problem(COMFYUI_PATH)
    if problem:
        return problem, None, "", None
    if importlib.util.find_spec("playwright") is None:
        return "Python playwright is not installed (pip install playwright; no browser download needed)", \
            None, "", None
    chromium = find_chromium()
    if chromium is None:
        return "no Chromium found (apt-get install chromium, or set VRAMKIT_CHROMIUM)", None, "", None
    static, version, why = find_frontend(Path(COMFYUI_PATH))
    if static is None:
        return why, None, version, chromium
    return None, static, version, chromium


PROBLEM, FRONTEND_STATIC, FRONTEND_VERSION, CHROMIUM = _problem()


#: CI sets this: there a missing piece is a failure, not a skip.
REQUIRED = os.environ.get("VRAMKIT_REQUIRE_BROWSER", "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.browser)
            if PROBLEM and not REQUIRED:
                item.add_marker(pytest.mark.skip(reason=PROBLEM))


def _require() -> None:
    if PROBLEM:  # only reached with VRAMKIT_REQUIRE_BROWSER (otherwise the tests were skipped)
        pytest.fail(f"VRAMKIT_REQUIRE_BROWSER is set but the browser test cannot run: {PROBLEM}")


def pytest_report_header(config: pytest.Config) -> str:
    if PROBLEM:
        return f"browser tests: skipped ({PROBLEM})"
    return f"browser tests: frontend {FRONTEND_VERSION} ({FRONTEND_STATIC}), Chromium {CHROMIUM}"


_SHOTS: list[Path] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SHOTS:
        terminalreporter.write_line(f"browser test screenshots: {_SHOTS[0]}")


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """A folder for this run's screenshots (printed at the end of the run)."""
    from vramkit.comfy import compat

    root = os.environ.get("VRAMKIT_SCREENSHOTS")
    base = Path(root) if root else Path(tempfile.mkdtemp(prefix="vramkit-screenshots-"))
    folder = base / f"comfyui-{compat.comfyui_version()}-frontend-{FRONTEND_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    _SHOTS.append(folder)
    print(f"\nbrowser test screenshots: {folder}")
    return folder


class Server(comfy_server.ComfyServer):
    def set_setting(self, name: str, value: Any) -> None:
        request = urllib.request.Request(f"{self.url}/settings/{name}", data=json.dumps(value).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30):
            pass


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A ComfyUI server serving the pinned frontend, with VRAMKit as a git clone and the tiny test models."""
    _require()
    import torch

    assert FRONTEND_STATIC is not None
    base = tmp_path_factory.mktemp("comfyui-browser")
    comfy_server.prepare_base(base)
    running = Server(Path(COMFYUI_PATH), base, cpu=not torch.cuda.is_available(), frontend_root=FRONTEND_STATIC)
    try:
        running.wait_ready()
        # No first-run templates dialog over the canvas, no minimap over the nodes in the screenshots.
        running.set_setting("Comfy.TutorialCompleted", True)
        running.set_setting("Comfy.Minimap.Visible", False)
        # The overview screenshot fits the whole graph: draw titles and widgets even when zoomed out.
        running.set_setting("LiteGraph.Canvas.MinFontSizeForLOD", 1)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    _require()
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-gpu"])
        try:
            yield launched
        finally:
            launched.close()
