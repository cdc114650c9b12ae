"""What the frontend shows of each node, checked without ComfyUI: a tooltip on every input and output, and
number inputs whose step the frontend's rounding keeps."""

from __future__ import annotations

import math

import pytest

from vramkit.comfy import nodes

NODES = sorted(nodes.NODE_CLASS_MAPPINGS.items())


def _inputs(cls: type) -> list[tuple[str, tuple]]:
    spec = cls.INPUT_TYPES()
    return [(name, value) for section in ("required", "optional") for name, value in spec.get(section, {}).items()]


@pytest.mark.parametrize(("node_id", "cls"), NODES)
def test_every_input_and_output_has_a_tooltip(node_id, cls):
    for name, value in _inputs(cls):
        options = value[1] if len(value) > 1 else {}
        assert len(options.get("tooltip", "")) > 10, f"{node_id}.{name} has no tooltip"
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), f"{node_id}: output tooltips"
    assert cls.DESCRIPTION


@pytest.mark.parametrize(("node_id", "cls"), NODES)
def test_float_steps_survive_the_frontends_rounding(node_id, cls):
    """The frontend rounds a FLOAT widget to 10^-d, d = the decimals of its step (-floor(log10(step))), unless
    the input sets `round`: a step with more decimals (0.25 -> 0.3) would change what the user typed."""
    for name, value in _inputs(cls):
        if type(value[0]) is not str or value[0] != "FLOAT":  # (the wildcard type equals everything)
            continue
        options = value[1]
        step = options.get("step", 0.5)
        rounding = options.get("round") or 10 ** -max(0, -math.floor(math.log10(step)))
        assert math.isclose(step / rounding, round(step / rounding)), f"{node_id}.{name}: step {step}"
        assert math.isclose(options["default"] / rounding, round(options["default"] / rounding))
