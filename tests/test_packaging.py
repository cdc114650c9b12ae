"""What installers read: versions that agree, the Comfy Registry metadata, requirements.txt for ComfyUI-Manager
clones, and the release workflow (structure, GitHub's workflow schema, zizmor's audits; all offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RELEASE = REPO / ".github" / "workflows" / "release.yml"


def test_versions_agree():
    version = PYPROJECT["project"]["version"]
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    assert cargo["workspace"]["package"]["version"] == version
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "the Comfy Registry wants X.Y.Z"


def test_requirements_pin_the_wheel_of_this_version():
    """A Manager/Registry install pip-installs requirements.txt: it must bring the compiled core of the same
    version as the checkout (which the custom_nodes entry then imports)."""
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    packages = [line for line in lines if line and not line.startswith("#")]
    assert packages == [f"vramkit=={PYPROJECT['project']['version']}"]


def test_comfy_registry_metadata():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"])  # the registry's node id
    assert "comfyui" not in project["name"].lower()
    assert project["description"]
    assert (REPO / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"] == "VRAMKit"
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    # The entry exports WEB_DIRECTORY; a `web` key would make ComfyUI serve the extension twice.
    assert "web" not in comfy


def _release() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(RELEASE.read_text())
    assert isinstance(data, dict)
    return data


def test_release_workflow_builds_abi3_wheels_for_every_platform():
    workflow = _release()
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "tags" in on["push"]
    jobs = workflow["jobs"]
    assert {"wheels", "sdist", "publish"} <= set(jobs)
    platforms = jobs["wheels"]["strategy"]["matrix"]["platform"]
    runners = " ".join(p["runner"] for p in platforms)
    for system in ("ubuntu", "windows", "macos"):
        assert system in runners
    steps = jobs["wheels"]["steps"]
    build = next(s for s in steps if s.get("uses", "").startswith("PyO3/maturin-action@"))
    assert "--release" in build["with"]["args"]
    smoke = next(s for s in steps if "Smoke test" in s.get("name", ""))
    assert "--only-binary=:all:" in smoke["run"] and "vramkit demo" in smoke["run"]
    # Every action is pinned to a commit.
    for job in jobs.values():
        for step in job.get("steps", []):
            if "uses" in step:
                assert re.search(r"@[0-9a-f]{40}$", step["uses"]), step["uses"]
    # abi3: one wheel per platform serves every Python the package supports.
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    assert any(f.startswith("abi3-py3") for f in cargo["workspace"]["dependencies"]["pyo3"]["features"])


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install {name}; .ci/run installs it)")
    return found


def test_release_workflow_matches_the_github_schema():
    tool = _tool("check-jsonschema")
    result = subprocess.run([tool, "--builtin-schema", "vendor.github-workflows", str(RELEASE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_release_workflow_passes_zizmor():
    tool = _tool("zizmor")
    result = subprocess.run([tool, "--offline", str(RELEASE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
