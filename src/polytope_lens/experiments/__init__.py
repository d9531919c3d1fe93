"""The paper's predictions as runnable experiments, each returning a result object with ``to_dict()``.

Every result reports entries ``{model, statistic, value, baseline, ci, verdict}``: the polytope-lens score, the
baseline's score, an interval of their difference (prediction 1: a paired percentile bootstrap over rows, and for
stability the spread of per-round differences; predictions 2 and 3: Student's t or Welch's interval of the mean
difference, ``stats.mean_difference_ci``) and a verdict computed from those numbers (``stats.verdict``). Submodules
import scikit-learn and the model adapters, so they load when first named::

    from polytope_lens.experiments import run_prediction1   # or .prediction1
"""

import importlib

_EXPORTS = {"run_prediction1": "prediction1", "Prediction1Result": "prediction1", "run_prediction2": "prediction2",
            "Prediction2Result": "prediction2", "run_prediction3": "prediction3", "Prediction3Result": "prediction3",
            "region_flow": "flow"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

