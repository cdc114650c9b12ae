"""vramkit.io: quantized safetensors files written by the Rust core (no ComfyUI needed)."""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vramkit import _core, quant
from vramkit.cli import main as cli_main
from vramkit.io import formats, inspect_file, quantize_file, save_quantized

CORPUS = Path(__file__).resolve().parent / "data" / "safetensors_corpus"
SKIP = "*norm*, *emb*, time_in.*, <first>, <last>"


def model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Flux-shaped little state dict: stem, blocks with Linear weights (bf16 and f32), biases, norms, a
    conv, an embedding-like table, an int buffer, and the head."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(dtype)

    return {
        "img_in.weight": w(128, 64), "img_in.bias": w(128),
        "time_in.in_layer.weight": w(128, 32),
        "double_blocks.0.img_attn.qkv.weight": w(384, 128), "double_blocks.0.img_attn.qkv.bias": w(384),
        "double_blocks.0.img_mlp.0.weight": w(512, 128, dtype=torch.float32),
        "double_blocks.0.img_mlp.2.weight": w(128, 512, dtype=torch.float16),
        "double_blocks.0.img_norm.scale": w(128),
        "double_blocks.1.odd.weight": w(96, 96),  # 64 does not divide 96: per-channel fallback
        "double_blocks.1.conv.weight": w(16, 8, 3, 3),  # not a Linear layer
        "pos_embed.weight": w(100, 128),
        "step_count": torch.tensor([7], dtype=torch.int64),
        "final_layer.linear.weight": w(64, 128),
    }


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(model_tensors(), str(path), metadata={"modelspec.title": "tiny", "note": "kept"})
    return path


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "vramkit-partial" in p.name]


QUANTIZED = {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
             "double_blocks.1.odd"}


@pytest.mark.parametrize(("fmt", "granularity"), [("int8", "group"), ("int8", "channel"), ("int8", "tensor"),
                                                  ("fp8_e4m3fn", "tensor"), ("fp8_e5m2", "tensor"),
                                                  ("fp8_e4m3fn", "channel")])
def test_codes_and_scales_are_the_kernels_and_the_rest_is_byte_identical(model_file, tmp_path, fmt, granularity):
    dst = tmp_path / "q.safetensors"
    report = quantize_file(model_file, dst, format=fmt, granularity=granularity, skip=SKIP)
    src = model_tensors()
    out = load_file(str(dst))
    assert {s.tensor.removesuffix(".weight") for s in report.layers} == QUANTIZED
    assert report.skipped == {"img_in": "<first>", "time_in.in_layer": "time_in.*", "pos_embed": "*emb*",
                              "final_layer.linear": "<last>"}
    assert report.channel_fallback == (["double_blocks.1.odd"] if granularity == "group" else [])
    for layer in QUANTIZED:
        weight = src[f"{layer}.weight"]
        gran = "channel" if layer in report.channel_fallback else granularity
        q = quant.quantize(weight, fmt, gran, 64 if gran == "group" else None)
        codes = out[f"{layer}.weight"]
        assert codes.dtype == (torch.int8 if fmt == "int8" else quant.TORCH_FP8[fmt])
        assert torch.equal(codes.view(torch.uint8) if fmt != "int8" else codes, q.data)
        scale = out[f"{layer}.weight_scale"]
        assert scale.dtype == torch.float32
        assert scale.shape == {"tensor": (), "channel": (weight.shape[0], 1),
                               "group": (weight.shape[0], weight.shape[1] // 64)}[gran]
        assert torch.equal(scale.reshape(-1), q.scale.reshape(-1))
        marker = json.loads(bytes(out[f"{layer}.comfy_quant"].tolist()))
        native = formats.is_native(fmt, gran)
        assert (marker["format"] != formats.VRAMKIT_FORMAT) == native
        if native:
            assert marker == {"format": formats.COMFY_FORMATS[fmt]}
        else:
            assert marker == {"format": formats.VRAMKIT_FORMAT, "codes": fmt, "granularity": gran, "version": 1,
                              **({"group_size": 64} if gran == "group" else {})}
        stats = next(s for s in report.layers if s.tensor == f"{layer}.weight")
        want = quant.error_stats(weight, q)
        assert stats.snr_db == pytest.approx(want["snr_db"], rel=1e-9)
        assert stats.max_abs == pytest.approx(want["max_abs"], rel=1e-9)
    kept = set(src) - {f"{layer}.weight" for layer in QUANTIZED}
    for name in kept:
        assert out[name].dtype == src[name].dtype and torch.equal(out[name], src[name]), name
    assert set(out) == kept | {f"{layer}.{s}" for layer in QUANTIZED for s in ("weight", "weight_scale",
                                                                                "comfy_quant")}
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "tiny" and meta["note"] == "kept"
    header_layers = json.loads(meta[formats.QUANT_METADATA_KEY])["layers"]
    assert set(header_layers) == QUANTIZED
    assert json.loads(meta[formats.VRAMKIT_METADATA_KEY])["format"] == fmt
    assert report.output_file_bytes == dst.stat().st_size
    assert not leftovers(tmp_path)


def test_same_input_and_options_give_the_same_bytes(model_file, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    quantize_file(model_file, a, format="int8", granularity="group", skip=SKIP)
    quantize_file(model_file, b, format="int8", granularity="group", skip=SKIP)
    assert a.read_bytes() == b.read_bytes()
    # The in-memory writer (the Save node's) makes the same file from the same tensors.
    c = tmp_path / "c.safetensors"
    with safe_open(str(model_file), "pt") as f:
        meta = f.metadata()
    save_quantized(model_tensors(), c, format="int8", granularity="group", skip=SKIP, metadata=meta)
    assert set(load_file(str(c))) == set(load_file(str(a)))
    assert all(torch.equal(x, load_file(str(c))[k]) for k, x in load_file(str(a)).items())


def test_prefixed_checkpoint_quantizes_only_the_diffusion_model(tmp_path):
    tensors = {f"model.diffusion_model.{k}": v for k, v in model_tensors().items()}
    tensors["first_stage_model.decoder.weight"] = torch.randn(64, 64)
    tensors["cond_stage_model.proj.weight"] = torch.randn(64, 64)
    src, dst = tmp_path / "ckpt.safetensors", tmp_path / "q.safetensors"
    save_file(tensors, str(src))
    report = quantize_file(src, dst, format="fp8_e4m3fn", granularity="tensor", skip=SKIP)
    assert {s.tensor for s in report.layers} == {f"model.diffusion_model.{n}.weight" for n in QUANTIZED}
    with safe_open(str(dst), "pt") as f:
        layers = json.loads(f.metadata()[formats.QUANT_METADATA_KEY])["layers"]
        assert set(layers) == QUANTIZED  # header names without the prefix (ComfyUI 0.3.7x needs that)
        assert "model.diffusion_model.double_blocks.1.odd.comfy_quant" in set(f.keys())
    profile = inspect_file(dst)
    assert profile["model_prefix"] == "model.diffusion_model."
    assert {"first_stage_model", "cond_stage_model", "double_blocks.0"} <= {b["name"] for b in profile["blocks"]}


def test_conv_rot_is_comfy_kitchens_rotation(tmp_path):
    """A rotated file dequantizes through comfy-kitchen's own ConvRot code to the original weights, with
    the error of per-row INT8 on the rotated weights; unrotated per-row INT8 of the same weights (an outlier
    input channel) is far worse."""
    kitchen = pytest.importorskip("comfy_kitchen.backends.eager.quantization")
    utils = pytest.importorskip("comfy_kitchen.tensor.int8_utils")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 1024, generator=g) * 0.05
    w[:, 7] *= 20
    src = tmp_path / "w.safetensors"
    save_file({"blocks.0.l.weight": w.bfloat16(), "blocks.0.odd.weight": torch.randn(8, 96).bfloat16()}, str(src))
    errors = {}
    for rotate in (False, True):
        dst = tmp_path / f"r{rotate}.safetensors"
        report = quantize_file(src, dst, format="int8", granularity="channel", skip="none", rotate=rotate)
        t = load_file(str(dst))
        marker = json.loads(bytes(t["blocks.0.l.comfy_quant"].tolist()))
        ref = w.bfloat16().double()
        if rotate:
            assert marker == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
            assert report.unrotated == ["blocks.0.odd"]  # 96 inputs: not a multiple of 256
            deq = kitchen.dequantize_int8_convrot_weight(t["blocks.0.l.weight"], t["blocks.0.l.weight_scale"], 256)
            # Our rotation is comfy-kitchen's H (kron of its H4, / sqrt(256), groups of 256 along the input).
            h = utils._build_hadamard(256, dtype=torch.float64)
            rotated = utils._rotate_weight(ref, h, 256)
            codes, scales = t["blocks.0.l.weight"].double(), t["blocks.0.l.weight_scale"].double()
            assert float((codes * scales - rotated).abs().max()) <= float(scales.max()) * 0.5 + 1e-6
        else:
            assert marker == {"format": "int8_tensorwise"}
            deq = t["blocks.0.l.weight"].float() * t["blocks.0.l.weight_scale"]
        errors[rotate] = float((deq.double() - ref).norm() / ref.norm())
    assert errors[True] < 0.01 < errors[False] / 3


def test_progress_reaches_every_byte_and_an_exception_cancels(model_file, tmp_path):
    calls = []
    dst = tmp_path / "q.safetensors"
    quantize_file(model_file, dst, format="int8", granularity="channel", progress=lambda *a: calls.append(a))
    assert calls[-1][0] == calls[-1][1] == len(model_tensors())
    assert calls[-1][2] == calls[-1][3] > 0
    assert all(a[2] <= b[2] for a, b in itertools.pairwise(calls))

    def stop(done, total, done_bytes, total_bytes, name):
        if done >= 3:
            raise KeyboardInterrupt("stop")

    out = tmp_path / "cancelled.safetensors"
    with pytest.raises(KeyboardInterrupt, match="stop"):
        quantize_file(model_file, out, format="int8", granularity="channel", progress=stop)
    assert not out.exists() and not leftovers(tmp_path)


def test_corpus_of_bad_files_gives_clear_errors(tmp_path):
    expected = json.loads((CORPUS / "expected.json").read_text())
    for name, want in expected.items():
        path = CORPUS / name
        before = path.read_bytes()
        dst = tmp_path / f"{name}.out"
        if want == "OK":
            inspect_file(path)
            continue
        with pytest.raises(ValueError, match="not a safetensors file, or a damaged one") as info:
            quantize_file(path, dst, format="int8", granularity="channel")
        assert want in str(info.value) and str(path) in str(info.value), str(info.value)
        with pytest.raises(ValueError, match=want.replace("(", r"\(").replace(")", r"\)")):
            inspect_file(path)
        assert path.read_bytes() == before and not dst.exists() and not leftovers(tmp_path)


def test_bad_requests_are_refused_and_leave_nothing(model_file, tmp_path):
    before = model_file.read_bytes()
    with pytest.raises(ValueError, match="is the input file"):
        quantize_file(model_file, model_file, format="int8", granularity="channel", overwrite=True)
    link = tmp_path / "hardlink.safetensors"
    os.link(model_file, link)
    with pytest.raises(ValueError, match="is the input file"):
        quantize_file(model_file, link, format="int8", granularity="channel", overwrite=True)
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        quantize_file(model_file, existing, format="int8", granularity="channel")
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(FileNotFoundError):
        quantize_file(model_file, tmp_path / "no" / "such" / "dir.safetensors", format="int8",
                      granularity="channel")
    with pytest.raises(FileNotFoundError):
        quantize_file(tmp_path / "missing.safetensors", tmp_path / "x.safetensors", format="int8",
                      granularity="channel")
    dst = tmp_path / "o.safetensors"
    for kwargs, message in [
        ({"format": "int4", "granularity": "channel"}, "format 'int4'"),
        ({"format": "int8", "granularity": "none"}, "cannot hold the unscaled"),
        ({"format": "int8", "granularity": "group", "group_size": 0}, "group_size must be a positive"),
        ({"format": "fp8_e4m3fn", "granularity": "channel", "rotate": True}, "int8 with granularity"),
        ({"format": "int8", "granularity": "channel", "skip": "*norm*,,x"}, "pattern #2 is empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            quantize_file(model_file, dst, **kwargs)
    assert model_file.read_bytes() == before and not dst.exists() and not leftovers(tmp_path)


def test_nan_weight_names_the_tensor_and_index(tmp_path):
    tensors = model_tensors()
    tensors["double_blocks.0.img_attn.qkv.weight"][3, 5] = float("nan")
    src = tmp_path / "nan.safetensors"
    save_file(tensors, str(src))
    dst = tmp_path / "q.safetensors"
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv\.weight.*index 389"):
        quantize_file(src, dst, format="int8", granularity="group", skip="none")
    assert not dst.exists() and not leftovers(tmp_path)


_FSIZE_SCRIPT = """
import resource, signal, sys
from vramkit.io import quantize_file
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
try:
    quantize_file(sys.argv[1], sys.argv[2], format="int8", granularity="channel")
except OSError as exc:
    print("OSError", exc.errno, exc)
    sys.exit(3)
"""


def test_full_disk_is_an_os_error_and_leaves_nothing(model_file, tmp_path):
    """A full disk, simulated with a file-size limit (the output outgrows 20 kB): OSError with its errno."""
    dst = tmp_path / "full.safetensors"
    done = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(model_file), str(dst)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"OSError {errno.EFBIG}" in done.stdout and "full.safetensors" in done.stdout, done.stdout
    assert not dst.exists() and not leftovers(tmp_path)


def test_profile_is_json_and_describes_blocks_and_markers(model_file, tmp_path):
    plain = inspect_file(model_file)
    assert json.loads(json.dumps(plain)) == plain
    assert plain["profile_version"] == 1 and plain["quantization"]["scheme"] == "none"
    assert plain["tensor_count"] == len(model_tensors())
    assert plain["tensor_bytes"] == sum(d["bytes"] for d in plain["dtypes"].values())
    assert plain["tensor_bytes"] == sum(b["bytes"] for b in plain["blocks"])
    names = [b["name"] for b in plain["blocks"]]
    assert names == ["double_blocks.0", "double_blocks.1", "final_layer", "img_in", "pos_embed", "step_count",
                     "time_in"]
    assert plain["metadata"]["modelspec.title"] == "tiny"
    dst = tmp_path / "q.safetensors"
    quantize_file(model_file, dst, format="int8", granularity="group", skip=SKIP)
    q = inspect_file(dst)
    assert q["quantization"]["scheme"] == "mixed"  # per-group layers plus the per-channel fallback
    assert q["quantization"]["formats"] == {"int8_tensorwise": 1, formats.VRAMKIT_FORMAT: 3}
    assert set(q["quantization"]["marker_sources"]) == {"comfy_quant", "header"}
    assert not q["quantization"]["loadable_by_stock"]
    block0 = next(b for b in q["blocks"] if b["name"] == "double_blocks.0")
    assert block0["quantized_layers"] == 3 and "I8" in block0["dtypes"]
    assert q["header_sha256"] != plain["header_sha256"]
    # ComfyUI's legacy scaled_fp8 marker is recognised too.
    legacy = tmp_path / "legacy.safetensors"
    save_file({"scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn),
               "a.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn), "a.scale_weight": torch.ones(())},
              str(legacy))
    lq = inspect_file(legacy)["quantization"]
    assert lq["marker_sources"] == ["scaled_fp8"] and lq["layers"] == {"a": {"format": "float8_e4m3fn"}}
    with pytest.raises(ValueError, match="legacy scaled_fp8"):
        quantize_file(legacy, tmp_path / "again.safetensors", format="int8", granularity="channel", skip="none")


def test_cli_quantize_and_inspect(model_file, tmp_path, capsys):
    dst = tmp_path / "cli.safetensors"
    assert cli_main(["quantize", str(model_file), str(dst), "--format", "fp8_e4m3fn", "--granularity", "tensor",
                     "--skip", SKIP, "--no-progress", "--worst", "2"]) == 0
    out = capsys.readouterr().out
    assert "Quantized 4 layers" in out and "stock ComfyUI (0.3.7x and 0.29+)" in out
    assert "The 2 worst layers" in out
    assert cli_main(["inspect", str(dst), "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["quantization"]["formats"] == {"float8_e4m3fn": 4}
    assert cli_main(["inspect", str(dst)]) == 0
    assert "double_blocks.0" in capsys.readouterr().out
    # Errors: exit status 2 and the message on the log, nothing written.
    assert cli_main(["quantize", str(model_file), str(dst), "--format", "int8", "--no-progress"]) == 2
    assert cli_main(["quantize", str(CORPUS / "lying_size.safetensors"), str(tmp_path / "x.safetensors"),
                     "--no-progress"]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_core_binding_arguments_are_checked(model_file, tmp_path):
    dst = str(tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match=r"layers\[0\]"):
        _core.quantize_safetensors(str(model_file), dst, "int8", [("a", "b")])
    with pytest.raises(ValueError, match="granularity \"row\""):
        _core.quantize_safetensors(str(model_file), dst, "int8", [("img_in.weight", "row", None, None)])
    with pytest.raises(ValueError, match="no tensor named"):
        _core.quantize_safetensors(str(model_file), dst, "int8", [("nope.weight", "channel", None, None)])
    with pytest.raises(ValueError, match=r"<layer>\.weight"):
        _core.quantize_safetensors(str(model_file), dst, "int8", [("step_count", "tensor", None, None)])
    ints = torch.arange(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="only F32, F16 and BF16"):
        _core.quantize_tensors([("a.weight", "I64", [2, 2], ints.view(torch.uint8).numpy())], dst, "int8",
                               [("a.weight", "tensor", None, None)])
    with pytest.raises(TypeError, match="metadata"):
        _core.quantize_safetensors(str(model_file), dst, "int8", [], metadata={"a": 1})
    with pytest.raises(ValueError, match="rotate"):
        _core.quantize_safetensors(str(model_file), dst, "int8", [("img_in.weight", "channel", None, 2)])
    with pytest.raises(TypeError, match="uint8"):
        _core.quantize_tensors([("a", "F32", [2], torch.zeros(2).numpy())], dst, "int8", [])
    with pytest.raises(ValueError, match="do not hold"):
        _core.quantize_tensors([("a", "F32", [3], torch.zeros(2).view(torch.uint8).numpy())], dst, "int8", [])
    assert not Path(dst).exists() and not leftovers(tmp_path)


@pytest.mark.slow
def test_bench_io_runs_small(tmp_path):
    from vramkit.cli.bench.io import run

    text = run(size_gb=0.05, folder=str(tmp_path))
    assert "vramkit quantize" in text and "torch load_file" in text and "peak RSS" in text
    assert not list(tmp_path.iterdir())  # the generated files are gone
