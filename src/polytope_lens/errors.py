"""The library's exceptions: one root, a few kinds that callers may want to catch apart; and the tests of option
values that the checks share."""

import numbers


class PolytopeLensError(Exception):
    """Root of every error polytope-lens raises on purpose; the CLI prints its message as one line."""


class InvalidInputError(PolytopeLensError, ValueError):
    """A parameter or input value is not acceptable (wrong shape, NaN, empty, unknown name...)."""


class UnsupportedActivationError(PolytopeLensError):
    """A model calls a nonlinearity the kink registry does not describe."""


class MissingDependencyError(PolytopeLensError, ImportError):
    """An optional package, model or data set is not installed here; the message says how to get it."""


class NotPiecewiseLinearError(PolytopeLensError):
    """An exact (piecewise-linear) analysis met a model that is not piecewise linear between its captured sites."""


class RandomWeightsWarning(UserWarning):
    """A loaded model holds parameters that its checkpoint lacks, initialised at random (the CLI prints it as one
    line): what they compute means nothing."""


def is_int(v) -> bool:
    """An integer option's value: a Python or NumPy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A real option's value: a Python or NumPy number (NaN and infinities included: callers bound it), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_seed(seed, owner: str) -> int:
    """A random seed as a Python int (what ``torch.Generator.manual_seed`` and NumPy take); a one-line error unless
    it is an int in [0, 2**63)."""
    if not (is_int(seed) and 0 <= seed < 2**63):
        raise InvalidInputError(f"The 'seed' parameter of {owner} must be an int in [0, 2**63). Got {seed!r}.")
    return int(seed)


def first_line(exc: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of an exception's message, cut at ``limit`` characters, for a one-line error that names
    another library's reason; ``empty`` (default: the exception's type name) when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else (type(exc).__name__ if empty is None else empty)


def not_finite(what: str, owner: str, dtype, where: str = "at some points of the slice",
               smaller: str | None = None) -> InvalidInputError:
    """The one-line error for NaN or infinite values a model computes (it overflows ``dtype``, or makes NaN): a
    piece read from NaN is a tie-break, not a side, so counts made from it would be artefacts."""
    hint = f"; use a smaller {smaller}" if smaller else ""
    return InvalidInputError(f"{owner}: {what} are NaN or infinite {where} (the model computes NaN, or overflows "
                             f"{str(dtype).replace('torch.', '')} there){hint}.")
