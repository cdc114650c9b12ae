"""Getting VRAMKit into ComfyUI's custom_nodes: `vramkit install-comfyui` and the repository's root entry
(ComfyUI-free: a fake ComfyUI folder, and the loaders imported the way ComfyUI imports packs)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vramkit import cli
from vramkit.cli import install
from vramkit.comfy import NODE_CLASS_MAPPINGS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def comfyui(tmp_path: Path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("# ComfyUI\n")
    return root


def load_like_comfyui(init: Path) -> object:
    """What ComfyUI's load_custom_node does: a module named after the path, from the folder's __init__.py."""
    name = str(init.parent).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, init)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_install_writes_a_loader_that_registers_every_node(comfyui: Path) -> None:
    loader = install.install_into_comfyui(comfyui)
    assert loader == comfyui / "custom_nodes" / install.LOADER_DIR
    module = load_like_comfyui(loader / "__init__.py")
    assert module.NODE_CLASS_MAPPINGS == NODE_CLASS_MAPPINGS
    assert Path(module.WEB_DIRECTORY, "vramkit.js").is_file()


def test_install_is_idempotent_and_protects_edits(comfyui: Path) -> None:
    loader = install.install_into_comfyui(comfyui)
    assert install.install_into_comfyui(comfyui) == loader
    (loader / "__init__.py").write_text("# edited\n")
    with pytest.raises(FileExistsError, match="differs from the loader"):
        install.install_into_comfyui(comfyui)
    install.install_into_comfyui(comfyui, force=True)
    assert (loader / "__init__.py").read_text() == install.LOADER_SOURCE


def test_install_refuses_a_second_entry(comfyui: Path) -> None:
    clone = comfyui / "custom_nodes" / "ComfyUI-VRAMKit"
    clone.mkdir(parents=True)
    shutil.copy(REPO / "__init__.py", clone / "__init__.py")
    with pytest.raises(FileExistsError, match=r"already in .* as ComfyUI-VRAMKit"):
        install.install_into_comfyui(comfyui)


def test_install_refuses_what_is_not_comfyui(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not look like ComfyUI"):
        install.install_into_comfyui(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        install.install_into_comfyui(tmp_path / "missing")


def test_cli_verb(comfyui: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install-comfyui", str(comfyui)]) == 0
    assert "restart ComfyUI" in capsys.readouterr().out
    assert cli.main(["install-comfyui", str(comfyui.parent)]) == 2  # not ComfyUI: an error, no traceback


def test_repository_root_entry_registers_every_node() -> None:
    module = load_like_comfyui(REPO / "__init__.py")
    assert module.NODE_CLASS_MAPPINGS == NODE_CLASS_MAPPINGS
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)


def _run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_clone_without_compiled_core_logs_one_line_and_loads_nothing(tmp_path: Path) -> None:
    clone = tmp_path / "ComfyUI-VRAMKit"
    shutil.copytree(REPO / "comfy_nodes", clone / "comfy_nodes",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    shutil.copy(REPO / "__init__.py", clone / "__init__.py")
    done = _run_isolated(f"""
        import importlib.util, logging, sys
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        sys.modules["vramkit"] = None  # as if vramkit were not installed
        spec = importlib.util.spec_from_file_location("custom_nodes_clone", {str(clone / "__init__.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print("nodes", len(module.NODE_CLASS_MAPPINGS))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "nodes 0"
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, done.stderr
    assert "-m pip install" in errors[0] and str(clone) in errors[0]


def test_clone_with_core_but_no_install_loads_from_comfy_nodes(tmp_path: Path) -> None:
    clone = tmp_path / "ComfyUI-VRAMKit"
    shutil.copytree(REPO / "comfy_nodes", clone / "comfy_nodes", ignore=shutil.ignore_patterns("__pycache__"))
    if not list((clone / "comfy_nodes" / "vramkit").glob("_core*")):
        pytest.skip("the extension is not built in place (maturin develop builds it there)")
    shutil.copy(REPO / "__init__.py", clone / "__init__.py")
    done = _run_isolated(f"""
        import importlib.util, sys
        sys.modules["vramkit"] = None
        spec = importlib.util.spec_from_file_location("custom_nodes_clone", {str(clone / "__init__.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        import vramkit
        print(len(module.NODE_CLASS_MAPPINGS), vramkit.__file__)
    """)
    assert done.returncode == 0, done.stderr
    count, origin = done.stdout.split()
    assert int(count) == len(NODE_CLASS_MAPPINGS)
    assert origin.startswith(str(clone))


def test_loader_without_vramkit_logs_how_to_install(comfyui: Path) -> None:
    loader = install.install_into_comfyui(comfyui)
    done = _run_isolated(f"""
        import importlib.util, logging, sys
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        sys.modules["vramkit"] = None
        spec = importlib.util.spec_from_file_location("loader", {str(loader / "__init__.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print("nodes", len(module.NODE_CLASS_MAPPINGS))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "nodes 0"
    assert "-m pip install vramkit (or a VRAMKit wheel or clone)" in done.stderr


def test_install_into_a_comfyui_user_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ComfyUI Desktop and --base-directory keep custom_nodes/ in a folder without ComfyUI's code (Desktop with
    its own .venv there): the loader goes into that custom_nodes/, and the command says which Python to use."""
    user = tmp_path / "ComfyUI Desktop"
    (user / "custom_nodes").mkdir(parents=True)
    (user / "models").mkdir()
    venv_python = user / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    assert cli.main(["install-comfyui", str(user)]) == 0
    out = capsys.readouterr().out
    assert (user / "custom_nodes" / install.LOADER_DIR / "__init__.py").read_text() == install.LOADER_SOURCE
    assert f"installed in {sys.executable}" in out
    assert f"{venv_python} -m pip install vramkit==" in out  # Desktop's own Python needs VRAMKit too


def test_loader_folder_gives_the_node_badge_its_name(comfyui: Path) -> None:
    # The frontend's source badge shows the custom_nodes folder name ("ComfyUI-" prefixes dropped).
    assert install.install_into_comfyui(comfyui).name == "VRAMKit"


def test_install_replaces_the_old_loader_folder(comfyui: Path) -> None:
    old = comfyui / "custom_nodes" / "vramkit-loader"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text(install.LOADER_SOURCE.replace("vramkit.comfy", "vramkit.comfy "))
    loader = install.install_into_comfyui(comfyui)
    assert not old.exists() and (loader / "__init__.py").is_file()


def test_install_error_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"neither main.py and comfy/ .* nor custom_nodes/"):
        install.install_into_comfyui(tmp_path)
