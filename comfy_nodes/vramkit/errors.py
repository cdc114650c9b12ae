"""Exception types shared by the package."""


class DtypeError(TypeError, ValueError):
    """A tensor or dtype argument of a type that is not accepted.

    It is both a TypeError (the usual exception for a wrong type) and a ValueError (what callers that
    validate "bad input" often catch), so either ``except`` clause handles it.
    """
