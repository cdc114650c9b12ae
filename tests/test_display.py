"""The node display's data (vramkit.comfy.display): the chart format the frontend draws, its text twin, and
the ``ui`` dict a node returns. (The drawing itself is checked in tests/browser.)"""

from __future__ import annotations

import json

import pytest

from vramkit.comfy import display

GB = 2**30
MB = 2**20


def test_bar_stacks_in_component_order_and_drops_zero_segments():
    b = display.bar("predicted", {"attention": 3 * MB, "resident_weights": 2 * GB, "activations": 0},
                    labels={"attention": "chunked attention"})
    assert b == {"label": "predicted", "segments": [
        {"key": "resident_weights", "bytes": 2 * GB},
        {"key": "attention", "bytes": 3 * MB, "label": "chunked attention"},
    ]}
    assert display.bar_total(b) == 2 * GB + 3 * MB


@pytest.mark.parametrize(("segments", "error", "words"), [
    ({"weights": 1}, ValueError, "unknown chart segment 'weights'"),
    ({"attention": -1}, ValueError, "segment attention must be >= 0"),
    ({"attention": "1"}, TypeError, "segment attention must be a number"),
    ({"attention": True}, TypeError, "segment attention must be a number"),
])
def test_bad_segments_are_named(segments, error, words):
    with pytest.raises(error, match=words):
        display.bar("x", segments)


def test_chart_is_json_and_its_numbers_are_in_text():
    predicted = display.bar("predicted", {"resident_weights": 6 * GB, "activations": 2 * GB})
    measured = display.bar("measured", {"resident_weights": 6 * GB, "working": int(2.5 * GB)})
    chart = display.memory_chart("VRAM", [predicted, measured], device="cuda:0", capacity_bytes=12 * GB,
                                 budget_bytes=10 * GB)
    assert json.loads(json.dumps(chart)) == chart  # what ComfyUI sends over its websocket and keeps in /history
    assert chart["kind"] == display.CHART_KIND and chart["version"] == 1
    assert display.chart_lines(chart) == [
        "predicted: 8.00 GB (weights kept in VRAM 6.00 GB, activations 2.00 GB)",
        "measured: 8.50 GB (weights kept in VRAM 6.00 GB, sampling working memory 2.50 GB)",
        "capacity 12.0 GB, budget 10.0 GB on cuda:0",
    ]


def test_chart_needs_a_bar_and_sane_limits():
    with pytest.raises(ValueError, match="at least one bar"):
        display.memory_chart("VRAM", [])
    with pytest.raises(ValueError, match="budget_bytes must be >= 0"):
        display.memory_chart("VRAM", [display.bar("x", {})], budget_bytes=-1)


@pytest.mark.parametrize(("n", "text"), [
    (0, "0.0 MB"), (512 * 1024, "0.5 MB"), (9.96 * MB, "10 MB"), (300 * MB, "300 MB"), (1023.9 * MB, "1.00 GB"),
    (1.5 * GB, "1.50 GB"), (9.999 * GB, "10.0 GB"), (99.97 * GB, "100 GB"), (-2 * GB, "-2.00 GB"),
])
def test_format_bytes(n, text):
    assert display.format_bytes(n) == text


def test_node_output_wraps_every_ui_value_in_a_list():
    chart = display.memory_chart("VRAM", [display.bar("measured", {"working": MB})])
    out = display.node_output("summary", "model", "summary", chart=chart, extra={"numbers": {"a": 1}})
    assert out == {"ui": {"text": ["summary"], "vramkit_chart": [chart], "numbers": [{"a": 1}]},
                   "result": ("model", "summary")}
    assert display.node_output("only text", 1) == {"ui": {"text": ["only text"]}, "result": (1,)}


def test_a_plans_components_become_a_predicted_bar_beside_the_measured_one():
    components = {"weights": 6 * GB, "streaming_buffers": 300 * MB, "activations": 2 * GB, "attention": 0,
                  "text_encoder": 100 * MB, "vae": 50 * MB, "reserve": GB}
    predicted = display.plan_bar(components)
    assert predicted["label"] == "predicted"
    assert display.bar_total(predicted) == sum(components.values())
    keys = {s["key"]: s for s in predicted["segments"]}
    assert keys["other_models"]["bytes"] == 150 * MB and keys["other_models"]["label"] == "text encoder / VAE"
    assert keys["other"]["label"] == "ComfyUI's reserve" and "attention" not in keys
    planned = display.memory_chart("plan", [predicted], budget_bytes=10 * GB)
    measured = display.memory_chart("VRAM", [display.bar("measured", {"working": GB})], capacity_bytes=12 * GB)
    both = display.with_prediction(measured, planned)
    assert [b["label"] for b in both["bars"]] == ["predicted", "measured"]
    assert both["budget_bytes"] == 10 * GB and both["capacity_bytes"] == 12 * GB
    assert measured["bars"] == [display.bar("measured", {"working": GB})]  # the inputs are left alone
