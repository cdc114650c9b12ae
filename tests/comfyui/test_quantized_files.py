"""Quantized files inside ComfyUI: stock UNETLoader on the files `vramkit quantize` writes, and the
"Load diffusion model (quantize on load)" / "Save quantized model" nodes, on the tiny SD1.5 UNet and Flux."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
from helpers import rel, sample
from safetensors.torch import save_file

from vramkit.comfy import compat, quantize_model, quantized_files
from vramkit.comfy.file_nodes import VRAMKitLoadQuantized, VRAMKitSaveQuantized
from vramkit.io import inspect_file, quantize_file
from vramkit.quant.selection import DEFAULT_SKIP

#: Relative output error against the unquantized run (2 steps): the in-memory node's bounds
#: (test_quantize_node.py), plus ComfyUI 0.29's INT8 layout, which quantizes activations too (W8A8).
TOLERANCE = {("int8", "group"): 0.015, ("int8", "channel"): 0.03, ("int8", "tensor"): 0.04,
             ("fp8_e4m3fn", "tensor"): 0.06, ("fp8_e4m3fn", "channel"): 0.06, ("fp8_e5m2", "tensor"): 0.12}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder registered as one of ComfyUI's diffusion_models folders, holding the tiny models' files."""
    import folder_paths

    folder = tmp_path_factory.mktemp("diffusion_models")
    for kind in tiny_models.KINDS:
        sd = tiny_models.state_dict(kind)
        tiny_models.register(kind, sd)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / f"tiny_{kind}.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return folder


def unet_loader(name: str) -> Any:
    """ComfyUI's own "Load Diffusion Model" node."""
    import nodes

    return nodes.UNETLoader().load_unet(name, "default")[0]


def same_layers_skip(tiny: Any, file_layers: set[str], fmt: str, granularity: str) -> str:
    """Skip patterns that make the in-memory Quantize node pick exactly `file_layers` (files quantize Linear
    layers only; the node also takes convolutions)."""
    _, report = quantize_model.quantize_model(tiny, fmt, granularity, 64)
    extra = sorted(set(report.quantized) - file_layers)
    return ", ".join([DEFAULT_SKIP, *extra])


def in_memory(tiny: Any, file_layers: set[str], fmt: str, granularity: str) -> Any:
    skip = same_layers_skip(tiny, file_layers, fmt, granularity)
    model, report = quantize_model.quantize_model(tiny, fmt, granularity, 64, skip)
    assert set(report.quantized) == file_layers
    return model


def quantized_file(model_dir: Path, kind: str, fmt: str, granularity: str, rotate: bool = False):
    dst = model_dir / f"tiny_{kind}_{fmt}_{granularity}{'_rot' if rotate else ''}.safetensors"
    report = quantize_file(model_dir / f"tiny_{kind}.safetensors", dst, format=fmt, granularity=granularity,
                           rotate=rotate, overwrite=True)
    return dst, {s.tensor.removesuffix(".weight") for s in report.layers}


def test_fp8_file_loads_in_stock_unetloader_and_samples_like_the_quantize_node(tiny, kind, model_dir):
    """Both ComfyUI versions: the fp8 per-tensor file loads with its scales (not as raw codes) and gives the
    very latent the Quantize node gives with the same scheme in memory."""
    path, layers = quantized_file(model_dir, kind, "fp8_e4m3fn", "tensor")
    assert layers
    model = unet_loader(path.name)
    root = model.model.diffusion_model
    for layer in layers:
        assert compat.is_comfy_quantized(root.get_submodule(layer).weight), f"{layer} loaded without its scale"
    out = sample(model, kind)
    assert torch.equal(out, sample(in_memory(tiny, layers, "fp8_e4m3fn", "tensor"), kind))
    assert 0 < rel(out, sample(tiny, kind)) < TOLERANCE[("fp8_e4m3fn", "tensor")]


def test_int8_per_row_file_loads_in_stock_unetloader(tiny, kind, model_dir):
    """ComfyUI 0.29+: ComfyUI's own int8_tensorwise layout with [out, 1] scales. ComfyUI 0.3.7x lacks it and
    must refuse the file rather than load codes as weights."""
    path, layers = quantized_file(model_dir, kind, "int8", "channel")
    if "int8_tensorwise" not in compat.native_quant_formats():
        with pytest.raises(Exception, match="int8_tensorwise"):
            unet_loader(path.name)
        return
    model = unet_loader(path.name)
    root = model.model.diffusion_model
    for layer in layers:
        weight = root.get_submodule(layer).weight
        assert compat.quantized_layout_name(weight) == "TensorWiseINT8Layout"
    assert 0 < rel(sample(model, kind), sample(tiny, kind)) < TOLERANCE[("int8", "channel")]


def test_conv_rot_file_loads_in_stock_unetloader(tiny, kind, model_dir):
    if not compat.reads_convrot():
        pytest.skip(f"{compat.describe()} has no ConvRot")
    path, _ = quantized_file(model_dir, kind, "int8", "channel", rotate=True)
    profile = inspect_file(path)
    rotated = [n for n, m in profile["quantization"]["layers"].items() if m.get("convrot")]
    if not rotated:
        pytest.skip(f"no layer of the tiny {kind} has rows that are a multiple of 256")
    model = unet_loader(path.name)
    assert 0 < rel(sample(model, kind), sample(tiny, kind)) < TOLERANCE[("int8", "channel")]


def test_per_group_file_is_refused_by_stock_loaders(model_dir):
    path, _ = quantized_file(model_dir, "flux", "int8", "group")
    with pytest.raises(Exception, match=r"vramkit_block_scaled|int8_tensorwise"):
        unet_loader(path.name)


def run_loader(name: str, fmt: str, granularity: str, skip: str, cache: Path, **kw: Any) -> tuple[Any, str]:
    result = VRAMKitLoadQuantized().run(name, fmt, granularity, 64, skip, False, str(cache), **kw)
    model, text = result["result"]
    assert result["ui"]["text"] == [text]
    return model, text


@pytest.mark.parametrize("scheme", sorted(TOLERANCE), ids=["-".join(s) for s in sorted(TOLERANCE)])
def test_loader_node_loads_every_scheme_and_the_second_load_does_no_work(tiny, kind, model_dir, tmp_path,
                                                                         monkeypatch, scheme):
    fmt, granularity = scheme
    _, layers = quantized_file(model_dir, kind, fmt, granularity)
    skip = same_layers_skip(tiny, layers, fmt, granularity)
    cache = tmp_path / "cache"
    model, text = run_loader(f"tiny_{kind}.safetensors", fmt, granularity, skip, cache)
    assert text.startswith("Cache miss") and str(cache) in text
    out = sample(model, kind)
    assert 0 < rel(out, sample(tiny, kind)) < TOLERANCE[scheme]
    stock = granularity == "tensor" or (granularity == "channel" and fmt == "int8")
    native = stock and {"float8_e4m3fn" if fmt == "fp8_e4m3fn" else "float8_e5m2" if fmt == "fp8_e5m2"
                        else "int8_tensorwise"} <= compat.native_quant_formats()
    assert ("stock operations" in text) == native
    if not native or fmt != "int8":  # weight-only: the very latent of the Quantize node
        assert torch.equal(out, sample(in_memory(tiny, layers, fmt, granularity), kind))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.endswith(quantized_files.CACHE_SUFFIX)
    # Second load: no quantization at all.
    monkeypatch.setattr(quantized_files, "quantize_file", lambda *a, **k: pytest.fail("quantized again"))
    again, text = run_loader(f"tiny_{kind}.safetensors", fmt, granularity, skip, cache)
    assert text.startswith("Cache hit")
    assert torch.equal(sample(again, kind), out)


def test_cache_key_follows_file_identity_and_options(model_dir, tmp_path):
    src = model_dir / "tiny_flux.safetensors"
    options = quantized_files.options_of("int8", "group", 64, DEFAULT_SKIP, False)
    key = quantized_files.cache_key(str(src), options)
    assert key == quantized_files.cache_key(str(src), dict(options))
    assert key != quantized_files.cache_key(str(src), {**options, "group_size": 32})
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(src.read_bytes())
    assert quantized_files.cache_key(str(copy), options) != key  # another path
    before = quantized_files.cache_key(str(copy), options)
    stat = copy.stat()
    import os

    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert quantized_files.cache_key(str(copy), options) != before  # touched


def test_cache_keeps_to_its_size_limit(model_dir, tmp_path):
    cache = tmp_path / "cache"
    run_loader("tiny_flux.safetensors", "int8", "group", DEFAULT_SKIP, cache)
    first = {p.name for p in cache.iterdir()}
    size = sum(p.stat().st_size for p in cache.iterdir())
    # A limit below two files: writing a second evicts the first, never the one just written.
    _, text = run_loader("tiny_flux.safetensors", "int8", "channel", DEFAULT_SKIP, cache,
                         cache_limit_gb=1.5 * size / 2**30)
    names = {p.name for p in cache.iterdir()}
    assert len(names) == 1 and not names & first
    assert "Evicted 1" in text


def test_interrupted_load_leaves_no_cache_file(model_dir, tmp_path):
    import comfy.model_management as mm

    cache = tmp_path / "cache"
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_loader("tiny_flux.safetensors", "int8", "group", DEFAULT_SKIP, cache)
    finally:
        mm.interrupt_current_processing(False)
    assert not list(cache.iterdir())


def test_loader_errors_name_the_problem(model_dir, tmp_path):
    with pytest.raises(ValueError, match="group_size must be a positive"):
        VRAMKitLoadQuantized().run("tiny_flux.safetensors", "int8", "group", 0, DEFAULT_SKIP, False,
                                   str(tmp_path))
    with pytest.raises(ValueError, match="int8 with granularity"):
        VRAMKitLoadQuantized().run("tiny_flux.safetensors", "fp8_e4m3fn", "tensor", 64, DEFAULT_SKIP, True,
                                   str(tmp_path))
    with pytest.raises(Exception, match=r"nope\.safetensors"):
        VRAMKitLoadQuantized().run("nope.safetensors", "int8", "group", 64, DEFAULT_SKIP, False, str(tmp_path))


def test_save_node_writes_a_file_the_loader_reads(tiny, kind, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    result = VRAMKitSaveQuantized().run(tiny, "diffusion_models/saved", "int8", "group", 64, DEFAULT_SKIP, False)
    (text,) = result["result"]
    saved = sorted((tmp_path / "diffusion_models").glob("saved_*.safetensors"))
    assert len(saved) == 1 and "Quantized" in text
    profile = inspect_file(saved[0])
    layers = set(profile["quantization"]["layers"])
    model = compat.load_diffusion_model(str(saved[0]), quantized_files.loader_options(saved[0])[0])
    assert torch.equal(sample(model, kind), sample(in_memory(tiny, layers, "int8", "group"), kind))
    assert not tiny.object_patches  # the input model is untouched
