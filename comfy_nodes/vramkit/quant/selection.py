"""Which layers of a model to quantize: the skip patterns users type, parsed and applied.

Patterns are shell-style globs (``*``, ``?``, ``[...]``) matched against a layer's name inside the diffusion
model, e.g. ``double_blocks.0.img_attn.qkv``, separated by commas or new lines. Two placeholders name the
layers that turn the input into features and features into the output, which quantize worst:

- ``<first>``: the stem: the first unit of layers no other pattern keeps (``img_in``; ``input_blocks.0``);
- ``<last>``: the head: the last such unit (``final_layer.*``; ``out.*``).

``none`` alone means "quantize every Linear/Conv layer". No ComfyUI import here.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FIRST, LAST = "<first>", "<last>"
PLACEHOLDERS = (FIRST, LAST)
NOTHING = "none"
#: Norms, embeddings (UNet time/label embeddings, Flux's time/vector/guidance embedders) and the stem and
#: head stay in high precision: together a few percent of the weights, and the most error-sensitive part.
DEFAULT_SKIP = "*norm*, *emb*, time_in.*, vector_in.*, guidance_in.*, <first>, <last>"

_PATTERN_CHARS = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+$")


@dataclass(frozen=True)
class SkipRules:
    globs: tuple[str, ...]
    keep_first: bool
    keep_last: bool

    @property
    def empty(self) -> bool:
        return not self.globs and not self.keep_first and not self.keep_last


def parse_skip_patterns(text: str, input_name: str = "skip_patterns") -> SkipRules:
    """Parses the comma/newline separated skip patterns, naming the input in every error."""
    if not isinstance(text, str):
        raise TypeError(f"{input_name} must be text, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{input_name} is empty; write '{NOTHING}' to quantize every Linear/Conv layer, or "
                         f"use the default: {DEFAULT_SKIP}")
    if stripped.lower() == NOTHING:
        return SkipRules((), False, False)
    entries = [e.strip() for e in re.split(r"[,\n]", stripped)]
    globs: list[str] = []
    keep_first = keep_last = False
    for number, entry in enumerate(entries, start=1):
        if not entry:
            raise ValueError(f"{input_name}: pattern #{number} is empty (a doubled or trailing comma?) in "
                             f"{text!r}")
        if entry.startswith("<") or entry.endswith(">"):
            if entry not in PLACEHOLDERS:
                raise ValueError(f"{input_name}: unknown placeholder {entry!r}; accepted: "
                                 f"{', '.join(PLACEHOLDERS)}")
            keep_first |= entry == FIRST
            keep_last |= entry == LAST
            continue
        if entry.lower() == NOTHING:
            raise ValueError(f"{input_name}: '{NOTHING}' must stand alone, not among other patterns")
        if not _PATTERN_CHARS.match(entry):
            raise ValueError(f"{input_name}: pattern {entry!r} has characters no layer name contains; layer "
                             "names look like 'double_blocks.0.img_attn.qkv' and patterns may use * ? [ ]")
        globs.append(entry)
    return SkipRules(tuple(globs), keep_first, keep_last)


def unit_prefix(name: str, list_names: Iterable[str]) -> str:
    """The prefix of `name` naming its top-level unit: the first path component, plus the index when that
    component is a block list (``input_blocks.0`` in ``input_blocks.0.0``; ``final_layer`` in
    ``final_layer.linear``). `list_names` are the names of the model's ModuleLists."""
    lists = set(list_names)
    parts = name.split(".")
    prefix = parts[0]
    depth = 1
    while prefix in lists and depth < len(parts):
        prefix = f"{prefix}.{parts[depth]}"
        depth += 1
    return prefix


def _in_unit(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def skip_reasons(names: Sequence[str], rules: SkipRules, list_names: Iterable[str]) -> dict[str, str]:
    """For each of `names` (the quantizable layers, in model order) that `rules` keep in high precision, why.

    Globs apply first; ``<first>``/``<last>`` then take the first/last unit among the layers left, so a UNet's
    time embedding (kept by ``*emb*``) does not hide its input convolution. Returns ``{name: reason}``;
    layers not in the result are quantized.
    """
    lists = tuple(list_names)
    reasons: dict[str, str] = {}
    for name in names:
        for glob in rules.globs:
            if fnmatch.fnmatchcase(name, glob):
                reasons[name] = glob
                break
    rest = [n for n in names if n not in reasons]
    if rest and rules.keep_first:
        stem = unit_prefix(rest[0], lists)
        reasons.update({n: FIRST for n in rest if _in_unit(n, stem)})
    rest = [n for n in rest if n not in reasons]
    if rest and rules.keep_last:
        head = unit_prefix(rest[-1], lists)
        reasons.update({n: LAST for n in rest if _in_unit(n, head)})
    return reasons


def unmatched_globs(names: Sequence[str], rules: SkipRules) -> list[str]:
    """Globs that match none of `names` (worth a note: a typo, or a pattern for another model family)."""
    return [g for g in rules.globs if not any(fnmatch.fnmatchcase(n, g) for n in names)]


#: Where a file gives no model order (a safetensors header lists names only), ``<first>`` and ``<last>`` mean
#: these stem and head units of the diffusion model families ComfyUI loads (Flux, Chroma, HunyuanVideo, Qwen
#: Image: ``img_in``; DiT, SD3, Lumina, HiDream: ``x_embedder``; Wan: ``patch_embedding`` / ``head``; UNets:
#: ``input_blocks.0`` / ``out``).
STEM_UNITS = ("img_in", "x_embedder", "patch_embed", "patch_embedding", "conv_in", "input_blocks.0")
HEAD_UNITS = ("final_layer", "proj_out", "norm_out", "head", "out", "conv_out", "final_linear")


def skip_reasons_by_name(names: Sequence[str], rules: SkipRules) -> dict[str, str]:
    """`skip_reasons` for layers known by name only (a checkpoint file): globs as there; ``<first>`` and
    ``<last>`` keep the layers of the units in `STEM_UNITS` and `HEAD_UNITS` that no glob matched."""
    reasons: dict[str, str] = {}
    for name in names:
        for glob in rules.globs:
            if fnmatch.fnmatchcase(name, glob):
                reasons[name] = glob
                break
    for name in names:
        if name in reasons:
            continue
        if rules.keep_first and any(_in_unit(name, u) for u in STEM_UNITS):
            reasons[name] = FIRST
        elif rules.keep_last and any(_in_unit(name, u) for u in HEAD_UNITS):
            reasons[name] = LAST
    return reasons
