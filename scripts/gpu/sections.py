"""The GPU check's measurements, one function per section; each returns table rows.

A row is ``{"check": str, "result": str, "ok": bool | None}`` (None: information, no verdict). Plain sections
(no ComfyUI) run in the check's process; ComfyUI sections run in a child process per memory manager:
``python sections.py SECTION MANAGER`` prints ``ROW: {json}`` lines (see check.py).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Row = dict[str, Any]
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MiB = 1 << 20


def device() -> str:
    import torch

    forced = os.environ.get("VRAMKIT_GPU_CHECK_DEVICE")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def header(dev: str, seconds: float) -> str:
    import torch

    import vramkit

    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run)"
    comfy = os.environ.get("COMFYUI_PATH", "")
    version = ""
    if comfy and (Path(comfy) / "comfyui_version.py").is_file():
        text = (Path(comfy) / "comfyui_version.py").read_text()
        version = text.split("__version__ =")[-1].strip().strip("\"'")
    return (f"GPU check: {name}; torch {torch.__version__}; vramkit {vramkit.__version__}; "
            f"ComfyUI {version or 'not used'}; {seconds:.0f} s")


def markdown(rows: list[Row], header: str) -> str:
    verdict = {True: "ok", False: "FAIL", None: ""}
    lines = [header, "", "| check | result | verdict |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['result']} | {verdict[r.get('ok')]} |")
    return "\n".join(lines) + "\n"


def _guard(name: str, fn: Callable[[], list[Row]]) -> list[Row]:
    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        return [{"check": name, "result": f"error: {type(exc).__name__}: {exc}", "ok": False}]


# ---------------------------------------------------------------------------------------------------------
# Plain sections


def quant_bits(dev: str) -> list[Row]:
    """Quantize on the CPU (Rust) and on `dev` (the torch twin): codes, scales and dequantized values must be
    the same bits, for every format and granularity, on every 16-bit pattern for the plain fp8 cast."""
    import torch

    from vramkit import quant
    from vramkit.quant import cast_rule

    rows: list[Row] = []
    # Information: the overflow rule of torch's own casts. `none` follows the CPU cast's (probed at import)
    # on every device; the torch twin writes it explicitly, so the CUDA cast's rule must not matter.
    for fmt in ("fp8_e4m3fn", "fp8_e5m2"):
        try:
            on_dev = cast_rule.probe(fmt, dev).describe()
        except cast_rule.UnknownCastRule as exc:
            on_dev = f"no known rule ({exc})"
        rows.append({"check": f"torch fp8 cast rule {fmt}",
                     "result": f"CPU: {quant.CAST_RULES[fmt].describe()} (followed everywhere); "
                               f"{dev}: {on_dev}", "ok": None})
    g = torch.Generator().manual_seed(0)
    every16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    cases: list[tuple[str, torch.Tensor, str, str | None]] = []
    for fmt in ("fp8_e4m3fn", "fp8_e5m2"):
        cases.append((f"{fmt} none, all f16 patterns", every16.view(torch.float16).reshape(256, 256), fmt, "none"))
        cases.append((f"{fmt} none, all bf16 patterns", every16.view(torch.bfloat16).reshape(256, 256), fmt,
                      "none"))
        bits = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 20,), generator=g, dtype=torch.int64)
        cases.append((f"{fmt} none, 1M random f32 patterns", bits.to(torch.int32).view(torch.float32)
                      .reshape(1024, 1024), fmt, "none"))
    w = torch.randn(3072, 3072, generator=g).to(torch.bfloat16)
    for fmt in ("fp8_e4m3fn", "fp8_e5m2", "int8"):
        for gran in ("tensor", "channel", "group"):
            cases.append((f"{fmt} {gran}, bf16 3072x3072", w, fmt, gran))
    for label, t, fmt, gran in cases:
        q_cpu = quant.quantize(t, fmt, gran)  # the Rust path
        if dev == "cpu":  # dry run: the torch twin forced onto the CPU tensor
            q_dev = quant._quantize_torch(t.contiguous(), fmt, gran, 64 if gran == "group" else None)
        else:  # the torch twin on the device
            q_dev = quant.quantize(t.to(dev), fmt, gran)
        same = torch.equal(q_cpu.data.view(torch.uint8), q_dev.data.cpu().view(torch.uint8))
        if q_cpu.scale is not None:
            assert q_dev.scale is not None
            same = same and torch.equal(q_cpu.scale.view(torch.int32), q_dev.scale.cpu().view(torch.int32))
        d_cpu = q_cpu.dequantize(torch.float32)
        d_dev = q_dev.dequantize(torch.float32).cpu()
        same_deq = torch.equal(d_cpu.view(torch.int32), d_dev.view(torch.int32))
        rows.append({"check": f"quant CPU vs {dev}: {label}",
                     "result": f"codes+scales {'identical' if same else 'DIFFER'}; dequantized "
                               f"{'identical' if same_deq else 'DIFFER'}", "ok": same and same_deq})
        if gran == "none":  # information: where torch's own device cast differs from the followed rule
            own = t.to(dev).to(quant.TORCH_FP8[fmt]).view(torch.uint8).cpu()
            differ = int((own != q_cpu.data).sum())
            rows.append({"check": f"torch's own {dev} cast vs the followed rule: {label}",
                         "result": f"{differ} of {t.numel()} codes differ", "ok": None})
    return rows


def dequant_peak(dev: str) -> list[Row]:
    """Extra device memory while dequantizing one layer: peak allocated minus the output, for Flux's largest
    layer shapes. The bound is 64 MiB."""
    import torch

    from vramkit import quant

    if dev != "cuda":
        return [{"check": "dequant peak per layer", "result": "needs CUDA (the CPU bound is a pytest tracer test)",
                 "ok": None}]
    rows: list[Row] = []
    shapes = {"single linear1 21504x3072": (21504, 3072), "double mlp.0 12288x3072": (12288, 3072),
              "qkv 9216x3072": (9216, 3072)}
    for label, shape in shapes.items():
        w = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        for fmt, gran in (("int8", "group"), ("int8", "channel"), ("fp8_e4m3fn", "tensor")):
            q = quant.quantize(w, fmt, gran)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = q.dequantize(torch.bfloat16)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
            del out
            rows.append({"check": f"dequant peak: {label} {fmt} {gran}",
                         "result": f"output {w.numel() * 2 / MiB:.0f} MiB + extra {extra / MiB:.1f} MiB",
                         "ok": extra <= 64 * MiB})
        rows += _kitchen_dequant_peak(label, w)
        del w
    return rows


def _kitchen_dequant_peak(label: str, w: Any) -> list[Row]:
    """comfy-kitchen's own dequantize of the same per-row INT8 weight (``int8_tensorwise``, what ComfyUI's
    cast path runs for a native layer), for comparison: information, not VRAMKit's bound. VRAMKit's forward
    for native layers (compute "dequantize") reads the codes and scales with the bounded path above."""
    import torch

    from vramkit import quant

    try:
        from comfy_kitchen.tensor import QuantizedTensor, TensorWiseINT8Layout
    except ImportError as exc:
        return [{"check": f"dequant peak: {label} comfy-kitchen int8_tensorwise", "result": f"skipped: {exc}",
                 "ok": None}]
    q = quant.quantize(w, "int8", "channel")
    assert q.scale is not None
    params = TensorWiseINT8Layout.Params(scale=q.scale.reshape(-1, 1), orig_dtype=torch.bfloat16,
                                         orig_shape=tuple(w.shape))
    qt = QuantizedTensor(q.data, "TensorWiseINT8Layout", params)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = qt.dequantize()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    same = torch.equal(out.view(torch.int16), q.dequantize(torch.bfloat16).view(torch.int16))
    return [{"check": f"dequant peak: {label} comfy-kitchen int8_tensorwise (per row)",
             "result": f"extra {extra / MiB:.1f} MiB (comfy-kitchen's own kernel); values "
                       f"{'identical to' if same else 'DIFFER from'} VRAMKit's", "ok": None if same else False}]


PLAIN: dict[str, Callable[[str], list[Row]]] = {"quant_bits": quant_bits, "dequant_peak": dequant_peak}


def run_plain(name: str, dev: str) -> list[Row]:
    return _guard(name, lambda: PLAIN[name](dev))


# ---------------------------------------------------------------------------------------------------------
# ComfyUI sections (child processes)


def _comfy(manager: str) -> None:
    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    os.environ["VRAMKIT_TEST_MEMORY_MANAGER"] = manager
    if manager == "dynamic":
        import comfy_aimdo.control  # before torch, as ComfyUI's main.py does

        comfy_aimdo.control.init()
    import comfy_setup

    problem = comfy_setup.import_comfyui(Path(os.environ["COMFYUI_PATH"]))
    if problem:
        raise RuntimeError(problem)


def _dit_file(folder: Path, hidden: int, double: int, single: int, dtype: Any) -> Path:
    """A Flux-shaped model with random weights, saved as a diffusion-model file (the way UNETLoader gets it)."""
    import dataclasses

    import comfy.ldm.flux.model as flux
    import comfy.ops
    import safetensors.torch
    import tiny_models
    import torch

    params = dict(tiny_models.FLUX_PARAMS, hidden_size=hidden, num_heads=hidden // 128, depth=double,
                  depth_single_blocks=single, axes_dim=[16, 56, 56])
    accepted = {f.name for f in dataclasses.fields(flux.FluxParams)}
    with torch.device("meta"):
        net = flux.Flux(operations=comfy.ops.disable_weight_init, dtype=dtype, device="meta",
                        **{k: v for k, v in params.items() if k in accepted})
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are faster there
    g = torch.Generator(gen_device).manual_seed(0)
    sd = {}
    for name, p in net.state_dict().items():
        std = 1.0 / math.sqrt(math.prod(p.shape[1:])) if p.dim() >= 2 else 0.1
        sd[name] = (torch.randn(p.shape, generator=g, device=gen_device) * std).to(dtype).cpu()
    path = folder / f"dit-{hidden}-{double}x{single}.safetensors"
    safetensors.torch.save_file(sd, str(path))
    tiny_models.register("flux", sd)
    return path


def _emit(rows: list[Row]) -> None:
    for r in rows:
        print("ROW: " + json.dumps(r), flush=True)


@contextmanager
def _peak(dev: str) -> Iterator[dict[str, float]]:
    import torch

    box: dict[str, float] = {}
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield box
    if dev == "cuda":
        torch.cuda.synchronize()
        box["peak"] = torch.cuda.max_memory_allocated()
    box["seconds"] = time.perf_counter() - start


def _sample(model: Any, size: int, steps: int, dev: str) -> tuple[Any, dict[str, float]]:
    import helpers

    with _peak(dev) as box:
        out = helpers.sample(model, "flux", size=size, steps=steps)
    return out, box


def _node(node_id: str) -> Any:
    from vramkit.comfy import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[node_id]()


def _result(ret: Any) -> tuple[Any, ...]:
    return tuple(ret["result"]) if isinstance(ret, dict) else tuple(ret)


def nodes(manager: str) -> list[Row]:
    """The nodes end to end on a small Flux-shaped model loaded from a file: outputs against the plain run,
    and ComfyUI's resident weight bytes against the Offload node's budget (with the budget API's residency
    view: the manager in charge, the budget in force, whether the cap was applied)."""
    import comfy.model_management as mm
    import comfy.sd
    import helpers
    import torch

    dev = device()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        # About 560 MiB of weights on a GPU (several 32 MiB pages of Dynamic VRAM); small on the CPU dry run.
        hidden, double, single = (1024, 4, 8) if dev == "cuda" else (256, 1, 2)
        path = _dit_file(Path(tmp), hidden=hidden, double=double, single=single, dtype=torch.bfloat16)
        model = comfy.sd.load_diffusion_model(str(path))
        kind = type(model).__name__
        total = model.model_size()
        ref, box = _sample(model, 64, 2, dev)
        rows.append({"check": f"[{manager}] plain run ({kind}, {total / MiB:.0f} MiB of weights)",
                     "result": _fmt_box(box) + f"; resident {model.loaded_size() / MiB:.0f} MiB", "ok": None})
        mm.unload_all_models()

        budget_gb = 0.25 if dev == "cuda" else 0.002
        for gb in (budget_gb, 0.0):  # a fixed budget, then auto (decided inside the load)
            rows.append(_offload_row(model, gb, ref, manager, dev))
            mm.unload_all_models()

        for fmt, gran, compute, rotation in (("int8", "group", "dequantize", "none"),
                                             ("int8", "channel", "dequantize", "none"),
                                             ("int8", "channel", "int8 matmul", "none"),
                                             ("int8", "channel", "int8 matmul", "convrot"),
                                             ("fp8_e4m3fn", "tensor", "dequantize", "none")):
            qm, text = _quantize_node(model, fmt, gran, compute, rotation)
            out, box = _sample(qm, 64, 2, dev)
            err = helpers.rel(out, ref)
            native = "ComfyUI's own layouts" in text
            label = f"{fmt} {gran}" + ("" if compute == "dequantize" else f", {compute}") + (
                f", {rotation}" if rotation != "none" else "")
            rows.append({"check": f"[{manager}] Quantize {label}",
                         "result": f"output vs plain {err:.1e}; {'native layout' if native else 'VRAMKit layout'}; "
                                   f"resident {qm.loaded_size() / MiB:.0f} MiB; " + _fmt_box(box),
                         "ok": err < 0.1})
            mm.unload_all_models()

        rows += _attention_keeps_backend(model, manager, dev)
    return rows


def _quantize_node(model: Any, fmt: str, gran: str, compute: str = "dequantize", rotation: str = "none"
                   ) -> tuple[Any, str]:
    """The Quantize node's output model and summary (inputs this version of the node lacks are left out)."""
    qnode = _node("VRAMKitQuantize")
    spec = qnode.INPUT_TYPES()
    accepted = set(spec["required"]) | set(spec.get("optional", {}))
    args = {"format": fmt, "granularity": gran, "group_size": 64, "skip_patterns": "none",
            "compute_dtype": "default", "compute": compute, "rotation": rotation}
    result = _result(getattr(qnode, qnode.FUNCTION)(model, **{k: v for k, v in args.items() if k in accepted}))
    return result[0], str(result[1])


def _offload_row(model: Any, gb: float, ref: Any, manager: str, dev: str) -> Row:
    """The Offload node at `gb` (0 = auto): the budget API's residency view next to ComfyUI's loaded_size(),
    and the output against the plain run. Under Dynamic VRAM the cap is whole 32 MiB pages, so one page over
    the budget is allowed (VRAMKit rounds down; the tolerance covers aimdo rounding up)."""
    import helpers

    from vramkit.comfy import budget

    offload = _node("VRAMKitOffload")
    patched = _result(getattr(offload, offload.FUNCTION)(model, vram_budget_gb=gb))[0]
    out, box = _sample(patched, 64, 2, dev)
    loaded = patched.loaded_size()
    total = patched.model_size()
    res = budget.residency(patched)
    page = 32 * MiB if res.manager == "dynamic" else 0
    err = helpers.rel(out, ref)
    view = (f"residency(): {res.manager}, budget "
            f"{'none' if res.budget_bytes is None else f'{res.budget_bytes / MiB:.0f} MiB'}"
            f"{' (auto)' if res.requested_bytes is None else ''}, resident {res.resident_bytes / MiB:.0f} MiB, "
            f"streamed {res.streamed_bytes / MiB:.0f} MiB")
    if res.watermark_bytes is not None:
        view += f", VBAR cap {res.watermark_bytes / MiB:.0f} MiB"
    view += ", cap applied" if res.cap_applied else f", cap NOT applied ({res.reason})"
    cuda = dev == "cuda"
    held = res.budget_bytes is not None and loaded <= res.budget_bytes + page
    ok: bool | None = (res.cap_applied and held and res.resident_bytes == loaded and res.manager == manager
                       and err < 1e-3)
    if not cuda and gb == 0:
        ok = None if err < 1e-3 and not res.cap_applied else False  # auto on a CPU caps nothing, by design
    label = "auto" if gb == 0 else f"budget {gb} GB"
    return {"check": f"[{manager}] Offload, {label}",
            "result": f"{view}; ComfyUI loaded_size() {loaded / MiB:.0f} of {total / MiB:.0f} MiB; output vs "
                      f"plain {err:.1e}; " + _fmt_box(box), "ok": ok}


def _attention_keeps_backend(model: Any, manager: str, dev: str) -> list[Row]:
    """Attention 'auto' on CUDA must call the backend ComfyUI hands the override (the one it was started with),
    say so in its summary, and read the free memory once per sampling step (not per attention call)."""
    import comfy.model_management as mm

    import vramkit.attention.planner as planner

    node = _node("VRAMKitAttention")
    ret = _result(getattr(node, node.FUNCTION)(model, "auto", 0))
    patched, summary = ret[0], (ret[1] if len(ret) > 1 else "")
    opts = patched.model_options["transformer_options"]
    ours = opts["optimized_attention_override"]
    calls = {"backend": 0, "all": 0}
    handed: set[str] = set()

    def recording(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def backend(*a: Any, **k: Any) -> Any:
            calls["backend"] += 1
            return func(*a, **k)

        backend.__name__ = getattr(func, "__name__", "backend")  # the kind of backend decides its memory model
        calls["all"] += 1
        handed.add(backend.__name__)
        return ours(backend, *args, **kwargs)

    reads: list[str] = []
    real_reader = planner.available_bytes

    def reader(device: Any) -> int:
        reads.append(str(device))
        return real_reader(device)

    spy = patched.clone()
    spy.model_options["transformer_options"] = dict(opts, optimized_attention_override=recording)
    steps = 2
    planner.available_bytes = reader
    try:
        _sample(spy, 64, steps, dev)
    finally:
        planner.available_bytes = real_reader
    mm.unload_all_models()
    kept = calls["all"] > 0 and calls["backend"] == calls["all"]
    names = ", ".join(sorted(handed)) or "none"
    return [{"check": f"[{manager}] Attention auto keeps ComfyUI's backend",
             "result": f"{calls['backend']} of {calls['all']} attention calls went to ComfyUI's backend ({names}); "
                       f"summary: {summary[:160]}",
             "ok": (kept and "ComfyUI's" in summary) if dev == "cuda" else None},
            {"check": f"[{manager}] Attention auto reads free memory once per step",
             "result": f"{len(reads)} reads over {steps} steps and {calls['all']} attention calls",
             "ok": len(reads) == steps if calls["all"] > steps else None}]


def dit(manager: str) -> list[Row]:
    """A DiT-sized model (Flux's width 3072, 4 double + 8 single blocks, bf16) at 1024x1024: step time and
    peak with and without each node."""
    import comfy.model_management as mm
    import comfy.sd
    import torch

    dev = device()
    if dev != "cuda":
        return [{"check": f"[{manager}] DiT-sized model", "result": "needs CUDA", "ok": None}]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = _dit_file(Path(tmp), hidden=3072, double=4, single=8, dtype=torch.bfloat16)
        model = comfy.sd.load_diffusion_model(str(path))
        total = model.model_size()
        variants: list[tuple[str, Any]] = [("plain", model)]
        for fmt, gran in (("int8", "group"), ("fp8_e4m3fn", "tensor")):
            variants.append((f"Quantize {fmt} {gran}", _quantize_node(model, fmt, gran)[0]))
        # int8 per row: ComfyUI's own layout (weight-only, W8A8, W8A8 + ConvRot) against VRAMKit's layout.
        from vramkit.comfy import quantize_model

        ours, _ = quantize_model.quantize_model(model, "int8", "channel", 64, "none", native=False)
        variants.append(("Quantize int8 per-row, VRAMKit layout (weight-only)", ours))
        for compute, rotation in (("dequantize", "none"), ("int8 matmul", "none"), ("int8 matmul", "convrot")):
            qm, text = _quantize_node(model, "int8", "channel", compute, rotation)
            where = "native" if "ComfyUI's own layouts" in text else "VRAMKit layout (no native here)"
            variants.append((f"Quantize int8 per-row, {where} ({compute}"
                             + (", ConvRot" if rotation != "none" else "") + ")", qm))
        off = _node("VRAMKitOffload")
        for gb in (1.0, 2.0):
            variants.append((f"Offload {gb:g} GB", _result(getattr(off, off.FUNCTION)(model, vram_budget_gb=gb))[0]))
        att = _node("VRAMKitAttention")
        for mode in ("auto", "chunked"):
            variants.append((f"Attention {mode}", _result(getattr(att, att.FUNCTION)(model, mode, 0))[0]))
        from vramkit.comfy import budget

        for label, m in variants:
            _sample(m, 128, 1, dev)  # warm-up (load, kernels)
            times = []
            peak = 0.0
            for _ in range(3):
                _, box = _sample(m, 128, 1, dev)
                times.append(box["seconds"])
                peak = max(peak, box.get("peak", 0.0))
            result = (f"step {statistics.median(times) * 1000:.0f} ms; peak {peak / 2**30:.2f} GiB; "
                      f"resident {m.loaded_size() / 2**30:.2f} GiB")
            if label.startswith("Offload"):
                res = budget.residency(m)
                result += (f"; residency(): {res.manager}, cap "
                           f"{'applied' if res.cap_applied else 'NOT applied: ' + res.reason}, "
                           f"streamed {res.streamed_bytes / 2**30:.2f} GiB")
            rows.append({"check": f"[{manager}] DiT {total / 2**30:.1f} GiB, 1024x1024: {label}",
                         "result": result, "ok": None})
            mm.unload_all_models()
            torch.cuda.empty_cache()
    return rows


def _fmt_box(box: dict[str, float]) -> str:
    peak = f"peak {box['peak'] / MiB:.0f} MiB, " if "peak" in box else ""
    return f"{peak}{box['seconds']:.2f} s"


COMFY: dict[str, Callable[[str], list[Row]]] = {"nodes": nodes, "dit": dit}


if __name__ == "__main__":
    section, mgr = sys.argv[1], sys.argv[2]
    _comfy(mgr)
    import torch

    with torch.inference_mode():
        _emit(_guard(f"{section} [{mgr}]", lambda: COMFY[section](mgr)))
