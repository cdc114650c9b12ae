"""Skip patterns of the quantize node (ComfyUI-free)."""

from __future__ import annotations

import pytest

from vramkit.quant import selection

# Layer names as ComfyUI's SD1.x UNet and Flux register them (model order), and their block lists.
UNET = ["time_embed.0", "time_embed.2", "input_blocks.0.0", "input_blocks.1.0.in_layers.2",
        "input_blocks.1.1.proj_in", "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "middle_block.1.transformer_blocks.0.attn2.to_k", "output_blocks.0.0.out_layers.3", "out.2"]
UNET_LISTS = ["input_blocks", "output_blocks", "middle_block"]
FLUX = ["img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "guidance_in.in_layer", "txt_in",
        "double_blocks.0.img_mod.lin", "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1",
        "final_layer.linear", "final_layer.adaLN_modulation.1"]
FLUX_LISTS = ["double_blocks", "single_blocks"]


def test_defaults_keep_stem_head_and_embeddings_of_a_unet():
    reasons = selection.skip_reasons(UNET, selection.parse_skip_patterns(selection.DEFAULT_SKIP), UNET_LISTS)
    assert reasons == {"time_embed.0": "*emb*", "time_embed.2": "*emb*", "input_blocks.0.0": "<first>",
                       "out.2": "<last>"}


def test_defaults_keep_stem_head_and_embedders_of_flux():
    reasons = selection.skip_reasons(FLUX, selection.parse_skip_patterns(selection.DEFAULT_SKIP), FLUX_LISTS)
    assert reasons == {"img_in": "<first>", "time_in.in_layer": "time_in.*", "time_in.out_layer": "time_in.*",
                       "vector_in.in_layer": "vector_in.*", "guidance_in.in_layer": "guidance_in.*",
                       "final_layer.linear": "<last>", "final_layer.adaLN_modulation.1": "<last>"}


def test_none_quantizes_everything_and_globs_match_whole_names():
    assert selection.skip_reasons(FLUX, selection.parse_skip_patterns("none"), FLUX_LISTS) == {}
    rules = selection.parse_skip_patterns("double_blocks.*\nsingle_blocks.0.linear?")
    assert set(selection.skip_reasons(FLUX, rules, FLUX_LISTS)) == {
        "double_blocks.0.img_mod.lin", "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"}
    assert selection.unmatched_globs(FLUX, selection.parse_skip_patterns("*norm*, txt_in")) == ["*norm*"]


def test_unit_prefix_steps_into_block_lists():
    assert selection.unit_prefix("input_blocks.0.0", UNET_LISTS) == "input_blocks.0"
    assert selection.unit_prefix("final_layer.adaLN_modulation.1", FLUX_LISTS) == "final_layer"
    assert selection.unit_prefix("img_in", FLUX_LISTS) == "img_in"


@pytest.mark.parametrize(("text", "message"), [
    ("", "skip_patterns is empty; write 'none'"),
    ("   ", "skip_patterns is empty"),
    ("*norm*,", "pattern #2 is empty"),
    ("a,,b", "pattern #2 is empty"),
    ("<stem>", "unknown placeholder '<stem>'"),
    ("none, <first>", "'none' must stand alone"),
    ("^double_blocks$", "characters no layer name contains"),
])
def test_bad_patterns_name_the_input(text, message):
    with pytest.raises(ValueError, match=message):
        selection.parse_skip_patterns(text)


def test_non_text_is_a_type_error():
    with pytest.raises(TypeError, match="skip_patterns must be text"):
        selection.parse_skip_patterns(None)  # type: ignore[arg-type]
