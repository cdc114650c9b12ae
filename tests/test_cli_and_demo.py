"""The command line, the demo and the plain-torch quantized layers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from vramkit import cli, quant
from vramkit.cli import demo, demo_model
from vramkit.qmodules import QuantizedLinear, quantize_linears


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["bench", "--help"], ["install-comfyui", "--help"]])
def test_help_for_every_verb(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    assert "usage: vramkit" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "vramkit", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "demo" in done.stdout and "bench" in done.stdout


def test_demo_prints_a_row_per_scheme_with_sensible_numbers() -> None:
    quant_part, attention_part, next_steps = demo.run(blocks=2, tokens=256, dim=128, heads=4).split("\n\n")
    lines = [line for line in quant_part.splitlines() if line.startswith("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert set(rows) == {"bf16 (reference)", *(s.label for s in demo.SCHEMES)}
    for label, cells in rows.items():
        compression = float(cells[1].rstrip("x"))
        assert (compression == 1.0) if label.startswith("bf16") else (1.5 < compression < 2.0)
    snr = {label: float(cells[2]) for label, cells in rows.items() if not label.startswith("bf16")}
    assert all(value > 5 for value in snr.values())
    best = max(snr, key=snr.__getitem__)
    assert best == "int8 group-64 (VRAMKit default)"
    assert snr["int8 per-channel"] > snr["int8 per-tensor (ComfyUI int8_tensorwise)"]

    modes = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in [line for line in attention_part.splitlines() if line.startswith("|")][2:]}
    assert set(modes) == set(demo.ATTENTION_MODES)
    chunked = modes["chunked"]
    assert float(chunked[0]) > 0 and float(chunked[3]) > 0
    assert float(chunked[2].rstrip("%")) < 100  # linear memory: below one N x N score matrix
    assert float(chunked[4]) > 30  # the same outputs as sdpa up to bf16 rounding
    # The demo explains its columns and ends with what to try in ComfyUI.
    assert "output SNR dB: how close the output stays to the bf16 run; higher is better" in quant_part
    assert "not VRAM or GPU speed" in quant_part
    assert "below 100% means attention memory grows" in attention_part
    assert next_steps.startswith("Next, in ComfyUI") and "Quantize weights (FP8/INT8)" in next_steps


def test_demo_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="blocks and tokens must be positive"):
        demo.run(blocks=0)


def test_bench_quant_prints_every_kernel_with_ratios() -> None:
    from vramkit.cli.bench import quant as bench_quant

    table = bench_quant.run(elements=1 << 16, repeats=1)
    body = table.splitlines()[3:]
    assert len(body) == len(bench_quant.build_cases(1 << 16))
    for line in body:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[4].endswith("x") and cells[8].endswith("%")


def test_quantized_linear_matches_dequantized_weights_and_moves_devices() -> None:
    layer = nn.Linear(64, 32)
    q = QuantizedLinear.from_linear(layer, "int8", "group", 32)
    x = torch.randn(5, 64)
    expected = nn.functional.linear(x, q.qweight.dequantize(torch.float32), layer.bias)
    assert torch.equal(q(x), expected)
    moved = q.to(torch.float64)  # buffers keep their dtype; the module still runs in the input's dtype
    assert moved.codes.dtype == torch.int8 and q(x.double()).dtype == torch.float64
    state = q.state_dict()
    assert set(state) == {"codes", "scale", "bias"} and state["codes"].dtype == torch.int8


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()])
def test_dtype_casts_of_a_quantized_model_keep_its_float32_scales(cast) -> None:
    model = demo_model.build(dim=64, heads=4, blocks=1, dtype=torch.float32)
    quantize_linears(model, "int8", "group", 16)
    layer = model.blocks[0].fc1
    layer.bias = None  # the bias is an ordinary parameter, which dtype casts do round
    x = torch.randn(8, 64)
    before = layer(x)
    cast(model).float()
    assert layer.scale.dtype == torch.float32 and layer.codes.dtype == torch.int8
    assert torch.equal(layer(x), before)


def test_unknown_simd_level_is_reported() -> None:
    import os

    env = {**os.environ, "VRAMKIT_SIMD": "avx1024"}
    done = subprocess.run([sys.executable, "-c", "import vramkit"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "VRAMKIT_SIMD='avx1024' is not one of" in done.stderr


def test_quantize_linears_skips_by_pattern_and_reports_bytes() -> None:
    model = demo_model.build(dim=64, heads=4, blocks=2, dtype=torch.float32)
    x = demo_model.example_input(8, dim=64, dtype=torch.float32)
    reference = model(x)
    report = quantize_linears(model, "fp8_e4m3fn", "channel", skip=["out", "blocks.1.*"])
    assert report.skipped == ["blocks.1.qkv", "blocks.1.proj", "blocks.1.fc1", "blocks.1.fc2", "out"]
    assert len(report.quantized) == 4 and isinstance(model.blocks[0].qkv, QuantizedLinear)
    assert isinstance(model.blocks[1].qkv, nn.Linear)
    assert report.bytes_before == 4 * (3 * 64 * 64 + 64 * 64 + 2 * 4 * 64 * 64)
    assert report.bytes_after < report.bytes_before / 3.5
    assert demo.snr_db(reference, model(x)) > 20
    assert "quantized 4 linear layers, kept 5" in report.summary()


def test_quantized_layer_weight_equals_qtensor() -> None:
    w = torch.randn(16, 32)
    layer = nn.Linear(32, 16)
    with torch.no_grad():
        layer.weight.copy_(w)
    q = QuantizedLinear.from_linear(layer, "fp8_e5m2", "tensor")
    assert torch.equal(q.qweight.data, quant.quantize(w, "fp8_e5m2", "tensor").data)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from vramkit import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"vramkit {__version__} (Python ")


@pytest.mark.parametrize(("argv", "shown", "hidden"), [
    (["bench", "quant", "--help"], ["--elements", "--repeats", "(default: 7)"], ["--quick"]),
    (["bench", "attention", "--help"], ["--quick", "--repeats"], ["--elements"]),
    (["demo", "--help"], ["--blocks", "(default: 4)", "--tokens", "(default: 512)"], ["--repeats"]),
    (["install-comfyui", "--help"], ["custom_nodes/", "--force"], ["--blocks"]),
])
def test_each_verb_helps_with_its_own_flags(argv, shown, hidden, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(argv)
    out = " ".join(capsys.readouterr().out.split())
    for text in shown:
        assert text in out
    for text in hidden:
        assert text not in out


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "quant", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["bench", "quant", "--elements", "0"], "argument --elements: must be at least 1, got 0"),
    (["bench", "attention", "--repeats", "-2"], "argument --repeats: must be at least 1, got -2"),
    (["demo", "--tokens", "-1"], "argument --tokens: must be at least 1, got -1"),
    (["demo", "--blocks", "two"], "argument --blocks: expected a whole number, got 'two'"),
    (["demo", "--seed", "-1"], "argument --seed: must be at least 0, got -1"),
])
def test_bad_values_get_argparse_errors_naming_the_flag(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_apis_refuse_nonsense_too() -> None:
    from vramkit.cli.bench import quant as bench_quant
    from vramkit.cli.bench.timing import measure

    with pytest.raises(ValueError, match="repeats must be a whole number >= 1"):
        measure({"noop": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="elements must be a whole number >= 1"):
        bench_quant.run(elements=0)


def test_cpu_memory_measurement_prints_nothing_of_its_own() -> None:
    """The demo measures CPU attention memory with torch's profiler, whose C++ backend logs on start and stop
    (a "USDT: ... profiler_start" line on newer torch): none of it reaches the terminal, all else does."""
    code = textwrap.dedent("""
        import os, torch
        from vramkit.attention import measure
        with measure._quiet_native_output():
            os.write(1, b"native noise on stdout\\n")
            os.write(2, b"native noise on stderr\\n")
        _, peak = measure.peak_bytes(lambda: torch.ones(256, 256) * 2, torch.device("cpu"))
        _, peak = measure.peak_bytes(lambda: torch.ones(256, 256) * 2, torch.device("cpu"))
        print("peak", peak > 0)
        os.write(2, b"after\\n")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "peak True\n"
    assert done.stderr == "after\n"
