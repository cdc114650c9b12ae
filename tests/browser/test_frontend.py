"""VRAMKit in the real ComfyUI frontend (headless Chromium): the example workflows load, a graph with every
VRAMKit node runs from the Run button, each node shows its whole summary (and the report its chart), and a
second Run with nothing changed executes nothing (the displays never enter the prompt, so ComfyUI's cache
holds). Each check runs with the classic canvas nodes and with the Vue nodes ("Nodes 2.0"), which a fresh
ComfyUI Desktop install turns on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import workflow_tools

HERE = Path(__file__).resolve().parent
PAGE_JS = (HERE / "page.js").read_text()
MODES = ["classic", "nodes2"]
#: Nodes that show a summary after they run (the Measure node only arms the measurement).
SHOWS_SUMMARY = {"VRAMKitQuantize", "VRAMKitAttention", "VRAMKitOffload", "VRAMKitPrecision",
                 "VRAMKitFreeAfter", "VRAMKitReport", "VRAMKitAutoOptimize"}


class ComfyPage:
    """One browser page on the test server, with what the console said."""

    def __init__(self, browser: Any, server: Any, mode: str) -> None:
        self.server = server
        self.mode = mode
        server.set_setting("Comfy.VueNodes.Enabled", mode == "nodes2")
        self.context = browser.new_context(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
        self.page = self.context.new_page()
        self.console: list[tuple[str, str, str]] = []
        self.page_errors: list[str] = []
        self.page.on("console", lambda m: self.console.append((m.type, m.text, str(m.location.get("url", "")))))
        self.page.on("pageerror", lambda e: self.page_errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
        self.page.goto(server.url)
        self.page.wait_for_function(
            "() => window.app?.graph && window.LiteGraph && "
            "app.extensions?.some(e => e.name === 'VRAMKit.NodeDisplay')",
            timeout=120_000)
        self.page.evaluate(PAGE_JS)
        time.sleep(0.5)
        self.page.evaluate("() => vramkitTest.closeDialogs()")

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def extension_problems(self) -> list[str]:
        """Console errors and warnings logged by our extension's script (or naming it), any "internal module"
        notice (an extension importing a private frontend module), and page errors whose stack passes through
        our script. (The frontend's own messages about our node ids, e.g. a registry lookup the offline test
        machine blocks, are not ours.)"""
        problems = []
        for kind, text, url in self.console:
            ours = "vramkit.js" in url.lower() or "vramkit.js" in text.lower() or "VRAMKit.NodeDisplay" in text
            if (kind in ("error", "warning") and ours) or "is an internal module" in text:
                problems.append(f"console {kind}: {text} ({url})")
        problems += [f"page error: {e}" for e in self.page_errors if "vramkit.js" in e.lower()]
        return problems

    def run_button(self) -> Any:
        button = self.page.get_by_role("button", name="Run", exact=True)
        if button.count() == 0:
            button = self.page.locator("[data-testid='queue-button'], .comfyui-queue-button button")
        return button.first

    def run(self) -> str:
        """Clicks Run; returns the id of the prompt the frontend queued."""
        with self.page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/prompt")) as info:
            self.run_button().click()
        answer = info.value.json()
        assert "prompt_id" in answer, f"/prompt refused the graph: {json.dumps(answer)[:2000]}"
        return str(answer["prompt_id"])

    def wait_done(self, prompt_id: str, timeout: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.server.get(f"/history/{prompt_id}")
            if prompt_id in history:
                # The "executed" messages reach the page just before /history has the entry; let them land.
                time.sleep(1.0)
                return history[prompt_id]  # type: ignore[no-any-return]
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n{self.server.log_tail()}")

    def screenshot(self, path: Path, clip: dict[str, float] | None = None) -> None:
        self.page.wait_for_timeout(300)  # one more frame for the canvas and the DOM widgets
        self.page.screenshot(path=str(path), clip=clip)

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module", params=MODES)
def comfy(request: pytest.FixtureRequest, browser: Any, server: Any) -> Iterator[ComfyPage]:
    page = ComfyPage(browser, server, str(request.param))
    try:
        yield page
    finally:
        page.close()


def _prompt(comfy: ComfyPage) -> dict[str, Any]:
    return comfy.js("async () => (await app.graphToPrompt()).output")  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", workflow_tools.names())
def test_workflow_loads_without_missing_nodes(comfy: ComfyPage, name: str) -> None:
    ui, api = workflow_tools.load(name)
    comfy.js("async (w) => { await app.loadGraphData(w); }", ui)
    comfy.page.wait_for_timeout(500)
    dialogs = comfy.js("() => vramkitTest.visibleDialogs()")
    assert dialogs == [], f"{name}: a dialog opened on load: {dialogs}"
    # (Loader nodes may be flagged for model files this server lacks; what matters is that every type exists.)
    missing = comfy.js("() => app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                       ".map(n => n.type)")
    assert missing == [], f"{name}: nodes not found by the frontend: {missing}"
    # What the frontend would queue is the committed API twin, widget for widget (the display never in it).
    prompt = _prompt(comfy)
    assert workflow_tools.strip_meta(prompt) == workflow_tools.strip_meta(api)
    assert comfy.extension_problems() == []


def test_new_report_node_shows_its_title(comfy: ComfyPage) -> None:
    comfy.js("() => { app.graph.clear(); const n = LiteGraph.createNode('VRAMKitReport'); n.pos = [100, 100]; "
             "app.graph.add(n); }")
    node_id = comfy.js("() => app.graph._nodes[0].id")
    fit = comfy.js("(id) => vramkitTest.titleFits(id)", node_id)
    # Room for the collapse dot, the title and the source badge beside it.
    assert fit["nodeWidth"] >= fit["titleWidth"] + 150, fit


def _check_displays(displays: list[dict[str, Any]], where: str) -> None:
    types = {d["type"] for d in displays}
    assert types >= SHOWS_SUMMARY, f"{where}: missing nodes {SHOWS_SUMMARY - types}"
    for d in displays:
        label = f"{where}: {d['type']} (node {d['id']})"
        if d["type"] not in SHOWS_SUMMARY:
            continue
        assert d["widget"], f"{label} has no display"
        assert d["serialize"] is False and d["optionsSerialize"] is False, label
        assert d["text"].strip(), f"{label} shows no summary"
        assert d["shown"], f"{label}: its display is not visible: {d}"
        scroll_h, client_h, scroll_w, client_w = d["textScroll"]
        assert scroll_h <= client_h + 1 and scroll_w <= client_w + 1, f"{label}: summary clipped: {d}"
        assert d["elementScroll"][0] <= d["elementScroll"][1] + 1, f"{label}: display taller than its box: {d}"
        node, rect = d["node"], d["rect"]
        assert rect["y"] + rect["height"] <= node["y"] + node["height"] + 2, f"{label}: display overflows node {d}"
        assert rect["x"] + rect["width"] <= node["x"] + node["width"] + 2, f"{label}: display overflows node {d}"
    planned = next(d for d in displays if d["type"] == "VRAMKitAutoOptimize")
    assert planned["chart"] and any("predicted" in t for t in planned["chartText"]), planned["chartText"]
    report = next(d for d in displays if d["type"] == "VRAMKitReport")
    assert report["chart"], f"{where}: the VRAM report shows no chart"
    assert any("measured" in t for t in report["chartText"]), report["chartText"]
    assert "measured:" in report["text"]  # the chart's numbers also as text


def _cached_everything(entry: dict[str, Any]) -> tuple[set[str], set[str]]:
    nodes = set(entry["prompt"][2])
    cached: set[str] = set()
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_cached":
            cached |= set(data["nodes"])
    return nodes, cached


def test_tiny_graph_runs_from_the_run_button(comfy: ComfyPage, screenshots: Path) -> None:
    variant = MODES.index(comfy.mode)
    comfy.js("async (v) => await vramkitTest.buildTinyGraph(v)", variant)
    prompt = _prompt(comfy)
    assert not any("vramkit_display" in node["inputs"] for node in prompt.values())

    first = comfy.wait_done(comfy.run())
    assert first["status"]["status_str"] == "success", f"{first['status']}\n{comfy.server.log_tail()}"
    if comfy.mode == "classic":  # (Vue nodes lay themselves out; older frontends ignore moves made here)
        comfy.js("() => vramkitTest.arrange()")
    comfy.js("() => vramkitTest.fitView()")
    comfy.screenshot(screenshots / f"{comfy.mode}-graph.png")

    displays = comfy.js("() => vramkitTest.displays()")
    shown = []
    for d in displays:
        if d["type"] not in SHOWS_SUMMARY:
            continue
        rect = comfy.js("(id) => vramkitTest.focus(id)", d["id"])
        comfy.screenshot(screenshots / f"{comfy.mode}-{d['type']}.png",
                         clip={"x": max(rect["x"] - 10, 0), "y": max(rect["y"] - 10, 0),
                               "width": rect["width"] + 20, "height": rect["height"] + 20})
        shown += [x for x in comfy.js("() => vramkitTest.displays()") if x["id"] == d["id"]]
    _check_displays(shown, comfy.mode)

    # The same graph again: nothing changed, so ComfyUI runs nothing (the summaries are not inputs).
    again = comfy.wait_done(comfy.run())
    assert again["status"]["status_str"] == "success", again["status"]
    nodes, cached = _cached_everything(again)
    assert cached == nodes, f"a second Run executed {sorted(nodes - cached)} (cache broken)"
    assert comfy.extension_problems() == []


def test_chart_shows_predicted_beside_measured(comfy: ComfyPage, screenshots: Path) -> None:
    """The chart format the Auto node will send (a plan's prediction beside the measured peak, against the
    device's capacity and the budget), drawn by the extension from a node's "ui" message."""
    from vramkit.comfy import display

    gb = 2**30
    predicted = display.bar("predicted", {"resident_weights": 6.2 * gb, "streamed_weights": 0.7 * gb,
                                          "activations": 2.1 * gb, "attention": 0.6 * gb,
                                          "other_models": 0.4 * gb})
    measured = display.bar("measured", {"resident_weights": 6.2 * gb, "other_models": 0.5 * gb,
                                        "working": 3.4 * gb})
    chart = display.memory_chart("VRAM at the sampling peak", [predicted, measured], device="cuda:0",
                                 capacity_bytes=12 * gb, budget_bytes=11 * gb)
    text = "\n".join(["Plan: int8 weights, 60% resident, chunked attention.", *display.chart_lines(chart)])
    comfy.js("async () => { await app.loadGraphData({last_node_id: 1, last_link_id: 0, nodes: [{id: 1, "
             "type: 'VRAMKitReport', pos: [100, 100], size: [420, 120], flags: {}, order: 0, mode: 0, "
             "inputs: [{name: 'samples', type: 'LATENT', link: null}], outputs: [{name: 'samples', "
             "type: 'LATENT', links: null}], properties: {}, widgets_values: []}], links: [], groups: [], "
             "config: {}, extra: {}, version: 0.4}, true, true, 'vramkit chart'); }")
    comfy.js("(m) => app.graph.getNodeById(1).onExecuted(m)", {"text": [text], "vramkit_chart": [chart]})
    comfy.page.wait_for_timeout(300)
    rect = comfy.js("() => vramkitTest.focus(1)")
    comfy.screenshot(screenshots / f"{comfy.mode}-chart-predicted-measured.png",
                     clip={"x": max(rect["x"] - 10, 0), "y": max(rect["y"] - 10, 0),
                           "width": rect["width"] + 20, "height": rect["height"] + 20})
    (shown,) = comfy.js("() => vramkitTest.displays()")
    labels = " | ".join(shown["chartText"])
    for expected in ("predicted", "measured", "capacity 12.0 GB", "budget 11.0 GB", "10.0 GB", "10.1 GB",
                     "streamed weights", "attention", "sampling working memory"):
        assert expected in labels, f"{expected!r} not in the chart: {labels}"
    assert shown["shown"] and shown["elementScroll"][0] <= shown["elementScroll"][1] + 1, shown
    scroll_h, client_h, _, _ = shown["textScroll"]
    assert scroll_h <= client_h + 1, shown
    assert comfy.extension_problems() == []
