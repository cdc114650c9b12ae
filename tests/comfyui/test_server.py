"""A real ComfyUI server (``main.py``) with VRAMKit installed as a git clone in custom_nodes: the nodes
register, every example workflow validates against /object_info, and every API twin runs through /prompt."""

from __future__ import annotations

import copy
import os
import urllib.request
from pathlib import Path

import comfy_server
import pytest
import torch
import workflow_tools

from vramkit.comfy import nodes

WORKFLOWS = workflow_tools.names()
#: Which VRAMKit node each example workflow shows.
SHOWS = {"attention": "VRAMKitAttention", "free_after": "VRAMKitFreeAfter", "measure": "VRAMKitMeasure",
         "offload": "VRAMKitOffload", "precision": "VRAMKitPrecision", "quantize": "VRAMKitQuantize",
         "auto_sd15": "VRAMKitAutoOptimize", "auto_flux": "VRAMKitAutoOptimize", "auto_wan": "VRAMKitAutoOptimize",
         "load_quantized": "VRAMKitLoadQuantized", "save_quantized": "VRAMKitSaveQuantized"}


def test_every_node_has_a_workflow():
    covered = set(SHOWS.values()) | {"VRAMKitReport"}  # the report sits in measure.json
    assert covered == set(nodes.NODE_CLASS_MAPPINGS)
    assert set(WORKFLOWS) == set(SHOWS)


def test_nodes_are_registered(object_info):
    for node_id, display in nodes.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        assert info["display_name"] == display
        assert info["category"] == "VRAMKit"
        assert info["python_module"].startswith("custom_nodes.")
    assert object_info["VRAMKitReport"]["output_node"] is True


def test_frontend_extension_is_served(server):
    scripts = [path for path in server.get("/extensions") if path.endswith("/vramkit.js")]
    assert len(scripts) == 1
    with urllib.request.urlopen(server.url + scripts[0], timeout=30) as response:
        assert b"registerExtension" in response.read()


def test_workflows_are_served_as_templates_ui_format_only(server):
    """ComfyUI lists a pack's `workflows/*.json` (one level: the API twins in workflows/api/ stay out) in the
    frontend's template browser and serves them under /api/workflow_templates/<folder>/."""
    listed = server.get("/workflow_templates")
    assert sorted(listed["ComfyUI-VRAMKit"]) == WORKFLOWS
    for name in WORKFLOWS:
        served = server.get(f"/api/workflow_templates/ComfyUI-VRAMKit/{name}.json")
        assert {"nodes", "links"} <= set(served), f"{name}: not a UI-format workflow"


def test_comfyui_reads_the_registry_metadata():
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(comfy_server.REPO))
    assert config.project.name == "vramkit"
    assert config.project.urls.repository.startswith("https://github.com/")
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name == "VRAMKit"
    assert config.tool_comfy.web is None  # WEB_DIRECTORY serves the extension; `web` would serve it twice


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_validates_and_matches_its_api_twin(object_info, name):
    ui, api = workflow_tools.load(name)
    assert workflow_tools.ui_problems(ui, object_info) == []
    assert workflow_tools.ui_to_api(ui, object_info) == workflow_tools.strip_meta(api)
    assert SHOWS[name] in {node["type"] for node in ui["nodes"]}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_twin_runs(server, name):
    _, api = workflow_tools.load(name)
    entry = server.run_prompt(workflow_tools.tinyfy(api))
    status = entry["status"]
    assert status["status_str"] == "success", f"{name}: {status}\n{server.log_tail()}"
    outputs = entry["outputs"]
    saves = [key for key, node in api.items() if node["class_type"] == "SaveImage"]
    for key in saves:
        images = outputs[key]["images"]
        assert len(images) == 1
        assert (server.base / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()
    texts = {key: out.get("text", [""])[0] for key, out in outputs.items()}
    node_key = next(key for key, node in api.items() if node["class_type"] == SHOWS[name])
    expected = {"quantize": "Quantized", "offload": "budget 6.00 GB", "precision": "Precision:",
                "free_after": "Freed after use", "attention": "Attention: VRAMKit chunked",
                "load_quantized": "Cache ", "save_quantized": "Quantized"}
    if name in expected:
        assert expected[name] in texts[node_key]
    if name == "measure":
        report_key = next(key for key, node in api.items() if node["class_type"] == "VRAMKitReport")
        numbers = outputs[report_key]["vramkit_measurement"][0]
        assert numbers["steps"] == 2 and numbers["peak_bytes"] > 0
        assert "peak" in texts[report_key]


def test_quantize_prompt_saved_before_compute_and_rotation_still_runs(server):
    """Workflows saved before the optional compute/rotation inputs existed queue and run with their defaults
    (weight-only dequantize, no rotation)."""
    _, api = workflow_tools.load("quantize")
    prompt = workflow_tools.tinyfy(api)
    key = next(k for k, node in prompt.items() if node["class_type"] == "VRAMKitQuantize")
    for name in ("compute", "rotation"):
        del prompt[key]["inputs"][name]
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    assert "Compute: dequantize" in entry["outputs"][key]["text"][0]


def test_attention_modes_are_the_same_everywhere_and_a_missing_one_falls_back(server, object_info):
    """A workflow saved where sage is installed validates and runs here (no sage on this CPU server): the
    node lists every mode on every machine and falls back to auto, saying so in its summary."""
    modes = object_info["VRAMKitAttention"]["input"]["required"]["mode"][0]
    assert {"auto", "sage", "flash", "xformers"} <= set(modes)
    assert object_info["VRAMKitAttention"]["output"] == ["MODEL", "STRING"]
    _, api = workflow_tools.load("attention")
    prompt = workflow_tools.tinyfy(api)
    key = next(k for k, node in prompt.items() if node["class_type"] == "VRAMKitAttention")
    prompt[key]["inputs"]["mode"] = "sage"
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    text = entry["outputs"][key]["text"][0]
    assert "attention mode 'sage' is not available" in text.lower() and "using auto instead" in text
    assert "Attention auto on cpu" in text


def test_offload_workflows_saved_with_the_former_engine_input_still_work(server, object_info):
    """The node lost its one-value ``engine`` input. A saved UI workflow still holds ``[6.0, "comfy"]``: the
    frontend assigns widget values by position, so the trailing "comfy" finds no widget (ui_to_api does the
    same mapping); an API prompt still sends ``"engine"``: ComfyUI drops an input the node does not declare."""
    ui, api = workflow_tools.load("offload")
    old_ui = copy.deepcopy(ui)
    node = next(n for n in old_ui["nodes"] if n["type"] == "VRAMKitOffload")
    node["widgets_values"] = [*node["widgets_values"], "comfy"]
    assert workflow_tools.ui_to_api(old_ui, object_info) == workflow_tools.strip_meta(api)
    old_api = workflow_tools.tinyfy(api)
    key = next(k for k, n in old_api.items() if n["class_type"] == "VRAMKitOffload")
    old_api[key]["inputs"].update(engine="comfy", vram_budget_gb=5.0)
    entry = server.run_prompt(old_api)
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    assert "budget 5.00 GB" in entry["outputs"][key]["text"][0]


def test_bad_input_fails_with_a_clear_message(server):
    _, api = workflow_tools.load("quantize")
    prompt = workflow_tools.tinyfy(api)
    key = next(k for k, node in prompt.items() if node["class_type"] == "VRAMKitQuantize")
    prompt[key]["inputs"]["skip_patterns"] = "*norm*,,<last>"
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "pattern #2 is empty" in errors[0]["exception_message"]
    assert errors[0]["node_type"] == "VRAMKitQuantize"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Dynamic VRAM needs an NVIDIA GPU")
def test_every_workflow_runs_under_dynamic_vram(tmp_path_factory, comfy_version):
    """ComfyUI 0.29+ pages weights itself on NVIDIA (Dynamic VRAM); every node must work with it, and the
    offload node must cap the model's VBAR and say so."""
    if tuple(int(p) for p in comfy_version.split(".")[:2]) < (0, 29):
        pytest.skip(f"ComfyUI {comfy_version} has no Dynamic VRAM")
    base = tmp_path_factory.mktemp("comfyui-dynamic")
    comfy_server.prepare_base(base)
    running = comfy_server.ComfyServer(Path(os.environ["COMFYUI_PATH"]), base, cpu=False,
                                       extra_args=("--enable-dynamic-vram",))
    try:
        running.wait_ready()
        for name in WORKFLOWS:
            _, api = workflow_tools.load(name)
            entry = running.run_prompt(workflow_tools.tinyfy(api))
            assert entry["status"]["status_str"] == "success", f"{name}: {entry['status']}"
            if name == "offload":
                key = next(k for k, n in api.items() if n["class_type"] == "VRAMKitOffload")
                text = entry["outputs"][key]["text"][0]
                assert "under Dynamic VRAM" in text and "budget 6.00 GB" in text and "NOT" not in text, text
    finally:
        running.stop()
