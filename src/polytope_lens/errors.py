"""The library's exceptions: one root, a few kinds that callers may want to catch apart."""


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


def first_line(exc: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of an exception's message, cut at ``limit`` characters, for a one-line error that names
    another library's reason; ``empty`` (default: the exception's type name) when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else (type(exc).__name__ if empty is None else empty)
