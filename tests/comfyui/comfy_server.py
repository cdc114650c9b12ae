"""A headless ComfyUI server for the tests: its own base directory, a free loopback port, a start-up timeout.

The base directory holds the tiny models (as UNET files for the stock UNETLoader), the repository as a
git-clone style custom node (``custom_nodes/ComfyUI-VRAMKit`` -> repo root, loaded through the root
``__init__.py``) and the test-only node pack.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL_FILES = {"sd15": "vramkit_tiny_sd15.safetensors", "flux": "vramkit_tiny_flux.safetensors"}
LORA_FILES = {"sd15": "vramkit_tiny_sd15_lora.safetensors", "flux": "vramkit_tiny_flux_lora.safetensors"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_base(base: Path) -> None:
    """Writes the tiny model files and the custom nodes into `base` (imports ComfyUI in this process)."""
    import helpers
    import tiny_models
    from safetensors.torch import save_file

    models = base / "models" / "diffusion_models"
    loras = base / "models" / "loras"
    models.mkdir(parents=True, exist_ok=True)
    loras.mkdir(parents=True, exist_ok=True)
    for kind, name in MODEL_FILES.items():
        save_file({k: v.contiguous() for k, v in tiny_models.state_dict(kind).items()}, str(models / name))
        lora = helpers.lora_state_dict(tiny_models.load(kind))
        save_file({k: v.contiguous() for k, v in lora.items()}, str(loras / LORA_FILES[kind]))
    custom = base / "custom_nodes"
    custom.mkdir(exist_ok=True)
    (custom / "ComfyUI-VRAMKit").symlink_to(REPO, target_is_directory=True)
    pack = custom / "vramkit_testing_pack"
    shutil.copytree(HERE / "testing_pack", pack, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(HERE / "tiny_models.py", pack / "tiny_models.py")
    (base / "frontend").mkdir(exist_ok=True)  # --front-end-root: no frontend package needed


def import_problem(comfyui_path: str) -> str | None:
    """Why the ComfyUI at `comfyui_path` cannot be used in this process (None when it can): imports it with
    ``--cpu`` semantics unless CUDA is present (``args.cpu`` is set before ``comfy.model_management``), under
    the memory manager ``VRAMKIT_TEST_MEMORY_MANAGER`` names (comfy_setup.py; the GPU check sets it)."""
    if not comfyui_path:
        return "COMFYUI_PATH is not set (point it at a ComfyUI folder to run these tests)"
    import comfy_setup

    return comfy_setup.import_comfyui(Path(comfyui_path))


class ComfyServer:
    def __init__(self, comfyui: Path, base: Path, cpu: bool = True, extra_args: tuple[str, ...] = (),
                 frontend_root: Path | None = None) -> None:
        """`frontend_root`: a frontend's static folder to serve (default: an empty one, for API-only tests)."""
        self.comfyui = comfyui
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / f"server-{self.port}.log"
        front_end = frontend_root if frontend_root is not None else base / "frontend"
        args = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
                "--front-end-root", str(front_end), "--disable-api-nodes", *extra_args]
        if cpu:
            args.append("--cpu")
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(args, cwd=comfyui, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def run_prompt(self, prompt: dict[str, Any], timeout: float = 180.0) -> dict[str, Any]:
        """Queues an API-format prompt and returns its /history entry once it finished (raises on a
        validation error, with ComfyUI's node_errors)."""
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": "vramkit-tests",
                                               "prompt_id": str(uuid.uuid4())})
        if status != 200:
            raise AssertionError(f"/prompt refused the graph ({status}): {json.dumps(answer, indent=1)}")
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # ComfyUI files a prompt under /history once it has finished
                return history[prompt_id]  # type: ignore[no-any-return]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
