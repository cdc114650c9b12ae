"""Checking the example workflows against a running ComfyUI, and shrinking them to the tiny test models.

- `ui_problems`: a UI-format (0.4) workflow against ``/object_info``: every node type exists, every link
  joins an output to an input of a compatible type, every widget value is where the node expects one and
  within its options (file-name lists excepted: the test server holds other files).
- `ui_to_api`: the API prompt the frontend would queue for a UI workflow (``graphToPrompt``), to prove the
  committed API twin is the same graph.
- `tinyfy`: the substitutions that let a workflow written for real models run on the test server: model
  files -> the tiny models, CLIPTextEncode -> test conditioning (no text encoder), VAE -> ``pixel_space`` with
  a test decoder (no VAE weights), 64x64 latents (a video latent becomes one 64x64 image: the tiny DiT stands
  in for Wan) and 2 steps. Everything else runs as written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from comfy_server import LORA_FILES as TINY_LORAS
from comfy_server import MODEL_FILES as TINY_FILES

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: Combos listing files in the models folders; the test server has other files, so they are not checked.
#: Nodes that load a file of the diffusion_models folder by its `unet_name`.
UNET_LOADERS = ("UNETLoader", "VRAMKitLoadQuantized")
FILE_INPUTS = {"unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "lora_name", "ckpt_name"}


def names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    return ui, api


def _inputs(info: dict[str, Any], cls: str) -> list[tuple[str, list[Any]]]:
    spec = info[cls]["input"]
    order = info[cls].get("input_order") or {k: list(v) for k, v in spec.items()}
    return [(name, spec[section][name]) for section in ("required", "optional") for name in order.get(section, [])]


def _is_widget(spec: list[Any]) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _options(spec: list[Any]) -> list[Any] | None:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options")
    return None


def _types_match(output_type: str, input_type: Any) -> bool:
    if isinstance(input_type, list):
        input_type = "COMBO"
    if "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(str(input_type).split(",")))


def ui_problems(ui: dict[str, Any], info: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        cls = node["type"]
        if cls not in info:
            problems.append(f"node {node['id']}: unknown node type {cls}")
            continue
        specs = _inputs(info, cls)
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        for name, spec in specs:
            if not _is_widget(spec):
                continue
            if not values:
                problems.append(f"node {node['id']} ({cls}): no widget value for {name}")
                break
            value = values.pop(0)
            bounds = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            controls = ("fixed", "increment", "decrement", "randomize")
            if bounds.get("control_after_generate") and (not values or values.pop(0) not in controls):
                problems.append(f"node {node['id']} ({cls}): {name} lacks its control_after_generate value")
            options = _options(spec)
            if name not in linked and options is not None and name not in FILE_INPUTS and value not in options:
                problems.append(f"node {node['id']} ({cls}): {name}={value!r} not in {options}")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and (value < bounds.get("min", value) or value > bounds.get("max", value)):
                problems.append(f"node {node['id']} ({cls}): {name}={value} outside its bounds")
        if values:
            problems.append(f"node {node['id']} ({cls}): {len(values)} widget values too many")
        socket_names = {name for name, _ in specs}
        for entry in node.get("inputs", []):
            if entry["name"] not in socket_names:
                problems.append(f"node {node['id']} ({cls}): no input named {entry['name']}")
    for link_id, origin, slot, target, target_slot, link_type in ui["links"]:
        source, sink = nodes.get(origin), nodes.get(target)
        if source is None or sink is None or source["type"] not in info or sink["type"] not in info:
            problems.append(f"link {link_id}: dangling")
            continue
        output_type = info[source["type"]]["output"][slot]
        if output_type != link_type:
            problems.append(f"link {link_id}: says {link_type}, {source['type']} output {slot} is {output_type}")
        entry = sink["inputs"][target_slot]
        if entry.get("link") != link_id:
            problems.append(f"link {link_id}: input slot {target_slot} of node {target} does not point back")
        spec = dict(_inputs(info, sink["type"])).get(entry["name"])
        if spec is None or not _types_match(output_type, spec[0]):
            problems.append(f"link {link_id}: {output_type} into {sink['type']}.{entry['name']}")
    return problems


def ui_to_api(ui: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """What the frontend queues for `ui`: widget values by name, links as [node id, output slot]."""
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, Any] = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4):
            continue
        values = list(node.get("widgets_values", []))
        by_name = {i["name"]: i for i in node.get("inputs", [])}
        inputs: dict[str, Any] = {}
        for name, spec in _inputs(info, node["type"]):
            entry = by_name.get(name)
            if _is_widget(spec):
                value = values.pop(0)
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                    values.pop(0)
                if entry is None or entry.get("link") is None:
                    inputs[name] = value
            if entry is not None and entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def strip_meta(api: dict[str, Any]) -> dict[str, Any]:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def family(api: dict[str, Any]) -> str:
    """The tiny model standing in: the DiT for Flux- and Wan-style workflows, the UNet otherwise."""
    names = [n["inputs"].get("unet_name", "") for n in api.values() if n["class_type"] in UNET_LOADERS]
    return "flux" if any(k in name.lower() for name in names for k in ("flux", "wan")) else "sd15"


def tinyfy(api: dict[str, Any]) -> dict[str, Any]:
    """`api` rewritten to run on the test server (see the module docstring for every substitution)."""
    kind = family(api)
    out = copy.deepcopy(api)
    removed = {k for k, v in out.items() if v["class_type"] in ("CLIPLoader", "DualCLIPLoader")}
    for key in removed:
        del out[key]
    for key, node in out.items():
        cls, inputs = node["class_type"], node["inputs"]
        for name, value in list(inputs.items()):
            if isinstance(value, list) and value[0] in removed and cls != "CLIPTextEncode":
                if cls not in ("VRAMKitFreeAfter", "VRAMKitAutoOptimize"):
                    raise ValueError(f"node {key} ({cls}) needs the text encoder through {name}")
                del inputs[name]  # an optional input of the free-after node
        if cls in UNET_LOADERS:
            inputs["unet_name"] = TINY_FILES[kind]
        elif cls == "LoraLoaderModelOnly":
            inputs["lora_name"] = TINY_LORAS[kind]
        elif cls == "CLIPTextEncode":
            node["class_type"] = "VRAMKitTestConditioning"
            node["inputs"] = {"text": inputs["text"], "kind": kind}
        elif cls == "VAELoader":
            inputs["vae_name"] = "pixel_space"
        elif cls == "VAEDecode":
            node["class_type"] = "VRAMKitTestDecode"
        elif cls in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=64, height=64)
        elif cls == "EmptyHunyuanLatentVideo":  # the tiny DiT makes images: one 64x64 frame
            node["class_type"] = "EmptyLatentImage"
            node["inputs"] = {"width": 64, "height": 64, "batch_size": inputs.get("batch_size", 1)}
        elif cls in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = min(int(inputs["steps"]), 2)
    return out
