"""The fit planner from Python: `_core.plan_fit`, `vramkit.plan`, `vramkit plan` and the demo table."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from vramkit import _core, cli
from vramkit import plan as planner
from vramkit.cli import demo

GIB = 1024**3
BUILTINS = ["sd1.5", "sdxl", "flux-dev", "flux2-dev", "qwen-image", "wan2.1-14b", "wan2.2-5b", "wan2.1-1.3b",
            "hunyuanvideo"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().out


def flux_json(gb: float, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out = run_cli(["plan", "flux-dev", "--vram", str(gb), "--size", "1024x1024", "--json"], capsys)
    assert code == 0
    return json.loads(out)


def test_builtin_profiles_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert planner.builtin_names() == BUILTINS
    code, out = run_cli(["plan", "--list"], capsys)
    assert code == 0
    for name in BUILTINS:
        assert name in out
    flux = planner.builtin_profile("flux-dev")
    assert sum(b["bytes"]["bf16"] for b in flux["blocks"]) / GIB == pytest.approx(22.17, abs=0.01)
    assert [t["name"] for t in flux["text_encoders"]] == ["t5xxl", "clip_l"]
    assert flux["memory_usage_factor"] == pytest.approx(3.1)


def test_flux_dev_at_48_gb_applies_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    out = flux_json(48, capsys)
    assert set(out) == {"fits", "steps", "predicted_peak_bytes", "predicted_step_seconds", "components"}
    assert out["fits"] is True and out["steps"] == []
    assert out["predicted_peak_bytes"] == sum(out["components"].values()) <= 48 * GIB
    assert out["predicted_step_seconds"] > 0


@pytest.mark.parametrize(("gb", "rungs"), [
    (24, ["offload_text_encoder"]),
    (16, ["offload_text_encoder", "weights_8bit"]),
    (12, ["offload_text_encoder", "offload_vae", "weights_8bit", "layer_streaming"]),
    (8, ["offload_text_encoder", "offload_vae", "weights_8bit", "layer_streaming"]),
    (6, ["offload_text_encoder", "offload_vae", "weights_8bit", "layer_streaming"]),
])
def test_flux_dev_fits_smaller_cards_with_reasons(gb: int, rungs: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = flux_json(gb, capsys)
    assert out["fits"] is True
    assert out["predicted_peak_bytes"] <= gb * GIB
    assert len(out["steps"]) == len(rungs)
    for step in out["steps"]:
        assert step["action"] and step["reason"].endswith(".")
    p = planner.plan("flux-dev", planner.reference_device(gb * GIB), width=1024, height=1024, budget_bytes=gb * GIB)
    assert list(p.rungs) == rungs
    assert p.to_json() == out


def test_slower_steps_as_memory_shrinks(capsys: pytest.CaptureFixture[str]) -> None:
    times = [flux_json(gb, capsys)["predicted_step_seconds"] for gb in (48, 24, 16, 12, 8, 6)]
    assert times == sorted(times)


def test_below_any_achievable_peak_it_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    out = flux_json(1, capsys)
    assert out["fits"] is False
    code, text = run_cli(["plan", "flux-dev", "--vram", "1", "--size", "1024x1024"], capsys)
    assert code == 0
    assert "does NOT fit" in text and "smallest achievable peak" in text


def test_sd15_at_4_gb_applies_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(["plan", "sd1.5", "--vram", "4", "--size", "512x512", "--json"], capsys)
    assert code == 0
    plan = json.loads(out)
    assert plan["fits"] is True and plan["steps"] == []
    code, text = run_cli(["plan", "sd1.5", "--vram", "4", "--size", "512x512"], capsys)
    assert "Nothing to apply" in text


def test_text_names_every_step_and_the_memory(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run_cli(["plan", "flux-dev", "--vram", "8", "--size", "1024x1024"], capsys)
    assert code == 0
    assert text.startswith("flux-dev at 1024x1024 on 8.00 GiB")
    for word in ("Free the text encoder", "fp8", "Stream layers", "Memory while sampling", "ComfyUI's estimate",
                 "Step time"):
        assert word in text, word


def test_video_frames_and_ram(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["plan", "wan2.1-14b", "--vram", "12", "--size", "832x480", "--frames", "81", "--json"]
    assert run_cli(base, capsys)[0] == 0
    code, out = run_cli([*base, "--ram", "8"], capsys)
    assert code == 0 and json.loads(out)["fits"] is False
    assert cli.main(["plan", "flux-dev", "--vram", "12", "--frames", "9"]) == 2  # an image model


def test_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "no-such-model", "--vram", "8"]) == 2
    assert cli.main(["plan", "--vram", "8"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["plan", "flux-dev", "--vram", "8", "--size", "big"])
    with pytest.raises(SystemExit):
        cli.main(["plan", "flux-dev", "--vram", "-1"])


def test_presets_fix_the_rungs() -> None:
    profile = planner.builtin_profile("flux-dev")
    device = planner.reference_device(12 * GIB)
    job = planner.job(1024, 1024)
    assert not planner.plan_fit(profile, device, job, 12 * GIB, "gpu-only").fits
    novram = planner.plan_fit(profile, device, job, 12 * GIB, "novram")
    assert novram.fits and novram.components["weights"] == 0
    with pytest.raises(ValueError, match="preset"):
        planner.plan_fit(profile, device, job, 12 * GIB, "ultra")


def _core_args() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    return planner.builtin_profile("sd1.5"), planner.reference_device(4 * GIB), planner.job(512, 512)


@pytest.mark.parametrize(("where", "change", "field"), [
    ("model", lambda m: m.pop("blocks"), "blocks"),
    ("model", lambda m: m["blocks"][2]["bytes"].pop("fp8"), "model_profile['blocks'][2]['bytes']"),
    ("model", lambda m: m.update(hidden=-3), "model_profile['hidden']"),
    ("model", lambda m: m.update(hidden=True), "model_profile['hidden']"),
    ("model", lambda m: m.update(family="rnn"), "family"),
    ("model", lambda m: m.update(weights_format="fp4"), "model_profile['weights_format']"),
    ("model", lambda m: m.update(blcoks=[]), "blcoks"),
    ("device", lambda d: d.update(h2d_gbps=float("nan")), "device['h2d_gbps']"),
    ("device", lambda d: d.update(tflops=0), "tflops"),
    ("device", lambda d: d.update(os="beos"), "device['os']"),
    ("device", lambda d: d.update(compute_capability="8.9"), "device['compute_capability']"),
    ("device", lambda d: d.pop("total_bytes"), "total_bytes"),
    ("job", lambda j: j.update(width=0), "job['width']"),
    ("job", lambda j: j.update(frames=5), "job['frames']"),
    ("job", lambda j: j.update(estimate="guess"), "job['estimate']"),
])
def test_bad_input_is_a_value_error_naming_the_field(where: str, change: Any, field: str) -> None:
    model, device, job = _core_args()
    change({"model": model, "device": device, "job": job}[where])
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        _core.plan_fit(model, device, job, 4 * GIB)


def test_bad_argument_types() -> None:
    model, device, job = _core_args()
    with pytest.raises(TypeError, match="model_profile"):
        _core.plan_fit([], device, job, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget_bytes"):
        _core.plan_fit(model, device, job, -1)


def test_budget_zero_means_the_free_memory_and_never_more() -> None:
    model, device, job = _core_args()
    device["free_bytes"] = 3 * GIB
    p = planner.plan_fit(model, device, job, 0)
    assert p.budget_bytes == 3 * GIB
    big = planner.plan_fit(model, device, job, 64 * GIB)
    assert big.budget_bytes == 3 * GIB and big.requested_budget_bytes == 64 * GIB
    assert any("more than the device has free" in n for n in big.notes)


def test_plan_details_for_the_auto_node() -> None:
    p = planner.plan("flux-dev", planner.reference_device(12 * GIB), width=1024, height=1024, budget_bytes=12 * GIB)
    assert p.config["weights_format"] == "fp8" and p.config["eight_bit"] is True
    assert p.config["offload_text_encoder"] and p.config["offload_vae"]
    assert 0 < p.config["resident_bytes"] < p.config["weights_bytes"]
    a = p.activations
    assert a["comfy"] // 2**20 == 2031 and a["first_principles"] < a["comfy"] < a["comfy_dynamic"]
    assert p.phases["sampling"] == p.predicted_peak_bytes
    assert p.summary().startswith("offload_text_encoder")


# ---- safetensors headers ----------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file whose tensors are zeros."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I8": 1}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def tiny_flux(dtype: str = "BF16", prefix: str = "") -> dict[str, tuple[str, list[int]]]:
    h = 256
    t: dict[str, tuple[str, list[int]]] = {f"{prefix}img_in.weight": (dtype, [h, 64]),
                                           f"{prefix}final_layer.linear.weight": (dtype, [64, h])}
    for i in range(2):
        t[f"{prefix}double_blocks.{i}.img_attn.qkv.weight"] = (dtype, [3 * h, h])
        t[f"{prefix}double_blocks.{i}.img_mlp.0.weight"] = (dtype, [4 * h, h])
        t[f"{prefix}double_blocks.{i}.img_attn.norm.query_norm.scale"] = ("BF16", [128])
    for i in range(3):
        t[f"{prefix}single_blocks.{i}.linear1.weight"] = (dtype, [7 * h, h])
        t[f"{prefix}single_blocks.{i}.linear2.weight"] = (dtype, [h, 5 * h])
    if dtype == "F8_E4M3":
        for name in list(t):
            if name.endswith(".weight"):
                t[name.replace(".weight", ".weight_scale")] = ("F32", [])
    return t


def test_profile_from_a_safetensors_header(tmp_path: Path) -> None:
    path = tmp_path / "tiny_flux.safetensors"
    write_safetensors(path, tiny_flux())
    profile = planner.model_profile(path)
    assert profile["name"] == "tiny_flux" and profile["weights_format"] == "bf16"
    names = [b["name"] for b in profile["blocks"]]
    assert names == ["double_blocks.0", "double_blocks.1", "rest", "single_blocks.0", "single_blocks.1",
                     "single_blocks.2"]
    single = profile["blocks"][3]
    params = 7 * 256 * 256 + 5 * 256 * 256
    assert single["bytes"]["bf16"] == 2 * params
    assert single["bytes"]["fp8"] == params + 2 * 4
    assert single["bytes"]["int8"] == params + 4 * (7 * 256 + 256)
    assert single["largest_layer_params"] == 7 * 256 * 256
    assert profile["hidden"] == 256 and profile["widest"] == 7 * 256
    assert profile["text_encoders"][0]["name"] == "t5xxl"  # from the built-in flux-dev profile
    p = planner.plan(profile, planner.reference_device(8 * GIB), width=512, height=512, budget_bytes=8 * GIB)
    assert p.fits


def test_checkpoint_prefixes_and_quantized_files(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    tensors = tiny_flux("F8_E4M3", prefix="model.diffusion_model.")
    tensors["first_stage_model.decoder.conv_in.weight"] = ("F16", [512, 16, 3, 3])
    write_safetensors(path, tensors)
    profile = planner.profile_from_safetensors(path)
    assert profile["weights_format"] == "fp8"
    assert profile["vae"]["bytes"] == 512 * 16 * 9 * 2
    assert "rest" in [b["name"] for b in profile["blocks"]]
    # Scales are not weights of their own.
    assert all(b["bytes"]["bf16"] % 2 == 0 for b in profile["blocks"])


def test_files_that_are_not_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        planner.model_profile(bad)
    with pytest.raises(FileNotFoundError):
        planner.model_profile(tmp_path / "missing.safetensors")
    unknown = tmp_path / "unknown.safetensors"
    write_safetensors(unknown, {"encoder.weight": ("BF16", [4, 4])})
    with pytest.raises(ValueError, match="architecture"):
        planner.model_profile(unknown)


# ---- device profiles ----------------------------------------------------------------------------------

def test_this_machine_gives_a_plannable_profile() -> None:
    device = planner.device_profile(measure=False)
    assert device["total_bytes"] > 0 and device["os"] in ("linux", "windows", "macos")
    p = planner.plan("sd1.5", device, width=512, height=512)
    assert p.budget_bytes > 0
    assert planner.system_ram_bytes() > 0


def test_measurements_are_cached_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vramkit.plan import device as device_mod

    monkeypatch.setenv("VRAMKIT_CACHE_DIR", str(tmp_path))
    calls: list[int] = []

    def measure() -> dict[str, float]:
        calls.append(1)
        return {"h2d_gbps": 12.5}

    assert device_mod.cached("gpu-a", measure) == {"h2d_gbps": 12.5}
    assert device_mod.cached("gpu-a", measure) == {"h2d_gbps": 12.5}
    assert len(calls) == 1
    assert json.loads((tmp_path / "device.json").read_text()) == {"gpu-a": {"h2d_gbps": 12.5}}
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "device.json").write_text("{broken")
    assert device_mod.cached("gpu-a", measure) == {"h2d_gbps": 12.5}
    assert len(calls) == 2


def test_demo_shows_the_planner() -> None:
    table = demo.planner_table()
    rows = table.splitlines()[3:]
    assert len(rows) == len(demo.PLANNER_BUDGETS_GB)
    assert "(nothing)" in rows[0] and "layer_streaming" in rows[-1]


def test_calibration_is_cached_and_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vramkit.plan import calibration

    monkeypatch.setenv("VRAMKIT_CACHE_DIR", str(tmp_path))
    device = planner.reference_device(12 * GIB)
    job = planner.job(1024, 1024)
    p = planner.plan("flux-dev", device, **{k: job[k] for k in ("width", "height")}, budget_bytes=12 * GIB)
    key = calibration.key(p.model, p.device, p.job)
    assert calibration.lookup(key) == {}
    act = p.components["activations"]
    # The run peaked 1 activation-size above the prediction and took 20% longer per step.
    miss = calibration.record(key, p.__dict__, p.predicted_peak_bytes + act, p.predicted_step_seconds * 1.2)
    assert miss.activation_scale == pytest.approx(2.0, rel=1e-6)
    assert miss.time_scale == pytest.approx(1.2)
    assert "+20%" in miss.text()
    scales = calibration.lookup(key)
    assert scales == {"activation_scale": pytest.approx(2.0, rel=1e-6), "time_scale": pytest.approx(1.2)}
    again = planner.plan("flux-dev", device, width=1024, height=1024, budget_bytes=12 * GIB, **scales)
    assert again.components["activations"] == pytest.approx(2 * act, rel=1e-3)
    assert again.predicted_step_seconds > p.predicted_step_seconds
    assert not list(tmp_path.glob("*.tmp"))
    # Absurd measurements are clamped.
    wild = calibration.record(key, p.__dict__, 0, 1e9)
    assert (wild.activation_scale, wild.time_scale) == (0.25, 4.0)
