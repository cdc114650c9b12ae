"""Exception types shared by the package, and the wording of their messages."""

from __future__ import annotations

import torch


class DtypeError(TypeError, ValueError):
    """A tensor or dtype argument of a type that is not accepted.

    It is both a TypeError (the usual exception for a wrong type) and a ValueError (what callers that
    validate "bad input" often catch), so either ``except`` clause handles it.
    """


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """Dtypes as users write them in an error message: "float32, float16, bfloat16"."""
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)
