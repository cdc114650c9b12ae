"""Device profiles: what the planner needs to know of the machine.

- Memory: `torch.cuda.mem_get_info` (free, total) for plain torch. Inside ComfyUI under Dynamic VRAM that
  under-reports what a model can have (other models' VBARs give memory back on demand); the ComfyUI layer
  (`vramkit.comfy`) passes its own ``free_bytes`` and ``memory_manager``.
- Capabilities from the compute capability: bf16 on sm >= 8.0, fp8 matmul on sm >= 8.9, int8 matmul on
  sm >= 7.5.
- Speed: host-to-device bandwidth measured once with a pinned copy, device memory bandwidth with a device
  copy, and matmul throughput with a bf16 GEMM; cached on disk per device and torch version
  (``$VRAMKIT_CACHE_DIR`` or ``~/.cache/vramkit/device.json``), written whole or not at all.
- System RAM (psutil, else /proc/meminfo) and the OS.

Without a GPU, `reference_device` describes a reference card of a given size (RTX 4090-class speed) so
that plans can be made anywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GIB = 1024**3
REFERENCE = {"h2d_gbps": 24.7, "memory_gbps": 1000.0, "tflops": 100.0}
"""Reference speeds (RTX 4090-class: pinned PCIe 4.0 measured at 24.7 GB/s, ~1 TB/s memory, ~100 effective
bf16 TFLOPS), used when nothing was measured."""


def system_os() -> str:
    name = platform.system().lower()
    return {"darwin": "macos"}.get(name, name if name in ("linux", "windows") else "linux")


def system_ram_bytes() -> int:
    """Total system RAM in bytes (0 if it cannot be read)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reference_device(vram_bytes: int, *, ram_bytes: int = 0, os_name: str = "linux",
                     compute_capability: tuple[int, int] = (8, 9), memory_manager: str = "dynamic",
                     **speeds: float) -> dict[str, Any]:
    """A device profile for a GPU of `vram_bytes` that is not here (the CLI without a GPU)."""
    if isinstance(vram_bytes, bool) or not isinstance(vram_bytes, int) or vram_bytes <= 0:
        raise ValueError(f"vram_bytes must be a positive int; got {vram_bytes!r}")
    unknown = set(speeds) - set(REFERENCE)
    if unknown:
        raise ValueError(f"unknown speed {sorted(unknown)}; accepted: {', '.join(REFERENCE)}")
    return {"name": f"a {vram_bytes / GIB:.0f} GB GPU, sm {compute_capability[0]}.{compute_capability[1]}",
            "total_bytes": vram_bytes, "free_bytes": vram_bytes, "compute_capability": compute_capability,
            "ram_bytes": ram_bytes, "os": os_name, "memory_manager": memory_manager,
            "efficient_attention": True, "streams": 2, **REFERENCE, **speeds}


def cache_path() -> Path:
    root = os.environ.get("VRAMKIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vramkit")
    return Path(root) / "device.json"


def _load_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes `data` as JSON to `path` whole or not at all (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached(key: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`measure()` once per `key`, then from the on-disk cache."""
    data = _load_cache()
    hit = data.get(key)
    if isinstance(hit, dict) and all(isinstance(v, (int, float)) for v in hit.values()):
        return {k: float(v) for k, v in hit.items()}
    values = measure()
    data[key] = values
    try:
        write_json_atomic(cache_path(), data)
    except OSError as exc:
        log.warning("VRAMKit: could not cache device measurements in %s: %s", cache_path(), exc)
    return values


def _best_seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int = 5) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_speeds(device: Any) -> dict[str, float]:
    """Pinned host-to-device GB/s, device-copy GB/s and bf16 matmul TFLOPS on a CUDA `device` (~1 s)."""
    import torch

    def sync() -> None:
        torch.cuda.synchronize(device)

    n = 256 * 2**20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    h2d = n / _best_seconds(lambda: src.copy_(host, non_blocking=True), sync) / 1e9
    # A device copy reads and writes every byte.
    mem = 2 * n / _best_seconds(lambda: dst.copy_(src), sync) / 1e9
    edge = 4096
    dtype = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    a = torch.randn(edge, edge, device=device, dtype=dtype)
    b = torch.randn(edge, edge, device=device, dtype=dtype)
    flops = 2 * edge**3 / _best_seconds(lambda: torch.matmul(a, b), sync) / 1e12
    return {"h2d_gbps": round(h2d, 2), "memory_gbps": round(mem, 1), "tflops": round(flops, 1)}


def device_profile(device: Any = None, *, free_bytes: int | None = None, memory_manager: str | None = None,
                   measure: bool = True) -> dict[str, Any]:
    """The profile of a torch device (default: the current CUDA device, else the CPU).

    `free_bytes` and `memory_manager` override what plain torch can tell (ComfyUI's layer passes them)."""
    import torch

    ram = system_ram_bytes()
    os_name = system_os()
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type != "cuda":
        # On the CPU "device memory" is RAM; nothing streams, attention is ComfyUI's sub-quadratic path.
        available = ram
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except ImportError:
            pass
        total = ram or 16 * GIB
        return {"name": f"CPU ({platform.processor() or platform.machine()})", "total_bytes": total,
                "free_bytes": free_bytes if free_bytes is not None else min(available or total, total),
                "compute_capability": None, "ram_bytes": 0, "os": os_name,
                "memory_manager": memory_manager or "legacy", "efficient_attention": True, "streams": 0,
                "h2d_gbps": 50.0, "memory_gbps": 50.0, "tflops": 1.0}
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    cc = (int(props.major), int(props.minor))
    speeds = dict(REFERENCE)
    if measure:
        key = f"{props.name}|sm{cc[0]}{cc[1]}|{total}|torch {torch.__version__}"
        try:
            speeds = cached(key, lambda: measure_speeds(torch.device("cuda", index)))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            log.warning("VRAMKit: could not measure %s (%s); using reference speeds", props.name, exc)
    return {"name": f"{props.name} (sm {cc[0]}.{cc[1]})", "total_bytes": int(total),
            "free_bytes": int(free if free_bytes is None else free_bytes), "compute_capability": cc,
            "ram_bytes": ram, "os": os_name, "memory_manager": memory_manager or "legacy",
            "efficient_attention": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
            "streams": 2, **speeds}
