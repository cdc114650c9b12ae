"""The overflow rule of torch's unscaled FP8 cast, learned from the installed torch at import.

``t.to(torch.float8_e4m3fn)`` rounds to nearest even in every torch, but what it writes for a value the format
cannot hold changed: torch 2.11's CPU cast gives NaN (0x7f/0xff) for e4m3fn values beyond ±464 and for ±inf,
torch 2.15's saturates both to ±448 (0x7e/0xfe) (PyTorch PR #178817); e5m2 gives ±inf (0x7c/0xfc) in both, and
NaN stays NaN everywhere. Instead of a table of torch versions, `probe` casts a handful of values (just past
the range, huge, ±inf, NaN) and reads the rule off the codes. ``granularity="none"`` then follows that rule on
every device: the Rust kernel gets it as arguments, and the torch twin (`torch_math.cast_fp8`, used for CUDA
tensors) writes it explicitly instead of trusting the device's own cast, so both paths give the same bits on a
given install.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from .formats import TORCH_FP8

log = logging.getLogger(__name__)

Outcome = Literal["nan", "inf", "saturate"]
OUTCOMES: tuple[str, ...] = ("nan", "inf", "saturate")

#: The code (without sign) of each outcome in each fp8 format; e4m3fn has no infinity.
OUTCOME_CODES: dict[str, dict[str, int]] = {
    "fp8_e4m3fn": {"nan": 0x7F, "saturate": 0x7E},
    "fp8_e5m2": {"nan": 0x7F, "inf": 0x7C, "saturate": 0x7B},
}
#: The smallest magnitude that overflows after rounding to nearest even (464 itself rounds to 448 in e4m3fn;
#: 61440 is the tie between 57344 and 65536, which is e5m2's infinity), and whether it is included.
OVERFLOW_FROM: dict[str, tuple[float, bool]] = {"fp8_e4m3fn": (464.0, False), "fp8_e5m2": (61440.0, True)}
#: Finite magnitudes past the range that the probe casts: just past the threshold, and huge.
_PROBE_FINITE: dict[str, tuple[float, float]] = {"fp8_e4m3fn": (465.0, 3.0e38), "fp8_e5m2": (61440.0, 3.0e38)}
_PROBE_COPIES = 16  # repeated so that the cast's vectorized loop runs, not only its scalar tail


@dataclass(frozen=True)
class CastRule:
    """What the unscaled cast writes, with the input's sign, for finite values beyond the range
    (`overflow`) and for ±infinity (`inf`): "nan", "inf" (e5m2 only) or "saturate" (±fmt_max)."""

    overflow: Outcome
    inf: Outcome

    @classmethod
    def unsaturated(cls, format: str) -> CastRule:
        """c10's cast without saturation (torch's CPU cast up to 2.11): NaN for e4m3fn, inf for e5m2."""
        outcome: Outcome = "inf" if format == "fp8_e5m2" else "nan"
        return cls(outcome, outcome)

    def codes(self, format: str) -> tuple[int, int]:
        """The codes (without sign) for finite overflow and for infinity in `format`."""
        table = OUTCOME_CODES[format]
        for name in (self.overflow, self.inf):
            if name not in table:
                raise ValueError(f"{format} cannot write {name!r}; accepted: {', '.join(table)}")
        return table[self.overflow], table[self.inf]

    def describe(self) -> str:
        return f"overflow -> {self.overflow}, ±inf -> {self.inf}"


class UnknownCastRule(RuntimeError):
    """torch's cast gave codes that no `CastRule` describes."""


def probe(format: str, device: torch.device | str = "cpu") -> CastRule:
    """The rule of ``t.to(float8)`` on `device`, read from the codes of a few float32 values."""
    just, huge = _PROBE_FINITE[format]
    inf, nan = float("inf"), float("nan")
    values = torch.tensor([just, huge, inf, -just, -huge, -inf, nan], dtype=torch.float32)
    codes = values.repeat(_PROBE_COPIES).to(device).to(TORCH_FP8[format]).view(torch.uint8).cpu()
    rows = codes.reshape(_PROBE_COPIES, -1)
    first = [int(c) for c in rows[0]]
    by_code = {code: name for name, code in OUTCOME_CODES[format].items()}
    problem = None
    if not bool((rows == rows[0]).all()):
        problem = "copies of the same value were cast differently"
    elif first[0] != first[1] or first[3] != first[4]:
        problem = "a value just past the range and a huge one were cast differently"
    elif (first[3], first[5]) != (first[0] | 0x80, first[2] | 0x80):
        problem = "negative values did not get the positive codes with the sign bit set"
    elif first[6] & 0x7F != 0x7F:
        problem = "NaN did not stay NaN"
    elif first[0] not in by_code or first[2] not in by_code:
        problem = "an overflow code is none of " + ", ".join(f"{c:#04x} ({n})" for c, n in by_code.items())
    if problem:
        raise UnknownCastRule(f"torch {torch.__version__} casts {values.tolist()} to {format} on {device} as "
                              f"{[hex(c) for c in first]}: {problem}")
    return CastRule(by_code[first[0]], by_code[first[2]])  # type: ignore[arg-type]


def _probe_cpu() -> dict[str, CastRule]:
    rules = {}
    for fmt in TORCH_FP8:
        try:
            rules[fmt] = probe(fmt)
        except UnknownCastRule as exc:
            rules[fmt] = CastRule.unsaturated(fmt)
            log.warning("vramkit: %s; the plain fp8 cast uses c10's unsaturated rule (%s) instead, so it may "
                        "differ from t.to(%s) on overflow", exc, rules[fmt].describe(), fmt)
    return rules


#: The rule of the installed torch's CPU cast, per fp8 format, probed at import: what
#: ``quantize(t, fmt, "none")`` follows on every device.
CAST_RULES: dict[str, CastRule] = _probe_cpu()
