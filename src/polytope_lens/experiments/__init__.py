"""The paper's predictions as runnable experiments, each returning a result object with ``to_dict()``.

Every result reports entries ``{model, statistic, value, baseline, ci, verdict}``: the polytope-lens score, the
baseline's score, a percentile confidence interval of their difference and a verdict computed from those numbers
(``stats.verdict``). Submodules import scikit-learn and the model adapters, so import them directly::

    from polytope_lens.experiments.prediction1 import run_prediction1
"""
