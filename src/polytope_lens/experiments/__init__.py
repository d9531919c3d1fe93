"""The paper's predictions as runnable experiments, each returning a result object with ``to_dict()``.

Every result reports entries ``{model, statistic, value, baseline, ci, verdict}``: the polytope-lens score, the
baseline's score, an interval of their difference (prediction 1: a paired percentile bootstrap over rows, and for
stability the spread of per-round differences; predictions 2 and 3: Student's t or Welch's interval of the mean
difference, ``stats.mean_difference_ci``) and a verdict computed from those numbers (``stats.verdict``). Submodules
import scikit-learn and the model adapters, so import them directly::

    from polytope_lens.experiments.prediction1 import run_prediction1
"""
