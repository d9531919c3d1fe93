"""Prediction 1: verdict rule, row alignment of codes and activations, end to end on digits-cnn (and MiniLM, slow)."""

import json

import numpy as np
import pytest

from polytope_lens.cluster import clustering_scores
from polytope_lens.codes import UnitSelection
from polytope_lens.data import DataSource
from polytope_lens.errors import InvalidInputError
from polytope_lens.experiments.prediction1 import (lexical_category, row_activations, run_prediction1,
                                                   token_context)
from polytope_lens.experiments.stats import (VERDICTS, paired_bootstrap, percentile_ci, resampled_clustering_scores,
                                             verdict)
from polytope_lens.extract import extract_codes
from polytope_lens.models import load_model


# ---------------------------------------------------------------------------------------------- verdict rule
@pytest.mark.parametrize("value,baseline,ci,expected", [
    (0.8, 0.6, (0.1, 0.3), "holds"),
    (0.5, 0.7, (-0.3, -0.1), "does not hold"),
    (0.8, 0.6, (-0.05, 0.4), "inconclusive"),     # CI touches 0
    (0.6, 0.6, (0.0, 0.0), "inconclusive"),
    (0.78, 0.75, (1e-16, 0.07), "inconclusive"),    # lower bound 0 up to rounding
    (0.72, 0.75, (-0.07, -1e-16), "inconclusive"),  # upper bound 0 up to rounding
    (0.5, 0.6, (0.01, 0.2), "inconclusive"),      # CI and point estimate disagree
    (float("nan"), 0.6, (0.1, 0.2), "inconclusive"),
    (0.8, 0.6, (float("nan"), 0.2), "inconclusive"),
])
def test_verdict_rule(value, baseline, ci, expected):
    assert verdict(value, baseline, ci) == expected


def test_verdict_rejects_inverted_ci():
    with pytest.raises(InvalidInputError, match="lower <= upper"):
        verdict(0.8, 0.6, (0.3, 0.1))


def test_percentile_ci_and_paired_bootstrap():
    """Percentile bounds; a bootstrap of a constant difference gives a degenerate interval at that constant."""
    assert percentile_ci(np.arange(101), 0.9) == pytest.approx((5.0, 95.0))
    assert np.isnan(percentile_ci([np.nan, np.nan])[0])
    x = np.arange(50.0)
    reps = paired_bootstrap(lambda idx: {"d": (x[idx] + 1).mean() - x[idx].mean()}, 50, n_boot=20)
    assert reps["d"].shape == (20,) and percentile_ci(reps["d"]) == pytest.approx((1.0, 1.0))
    with pytest.raises(InvalidInputError, match="'level' parameter of percentile_ci"):
        percentile_ci([1.0], 1.5)
    with pytest.raises(InvalidInputError, match="'n_boot' parameter"):
        paired_bootstrap(lambda idx: {}, 5, n_boot=0)



@pytest.mark.parametrize("block", [0, -1, 2.5, True])
def test_paired_bootstrap_rejects_a_bad_block(block):
    """block=-1 returned {} silently and block=0 raised range()'s ValueError."""
    with pytest.raises(InvalidInputError, match=rf"The 'block' parameter must be an int >= 1 or None\. Got {block!r}"):
        paired_bootstrap(lambda idx: {"m": idx.mean(1)}, 10, n_boot=5, block=block)


def test_mean_difference_ci_zero_spread_rule_tolerates_rounding():
    """Differences equal up to float rounding (0.7 - 0.6 vs 0.8 - 0.7, ~1e-16 apart) follow the zero-spread rule as
    exact ones do: (nan, nan) below the sign-test threshold (3 pairs; it gave a ~1e-16-wide t interval and "holds"),
    a point from 6 pairs; Welch likewise. A real spread of 1e-9 still gets scipy's t interval."""
    from scipy import stats as sps

    from polytope_lens.experiments.stats import mean_difference_ci

    a, b = np.array([0.7, 0.8, 0.9]), np.array([0.6, 0.7, 0.8])
    assert np.ptp(a - b) > 0 and all(np.isnan(mean_difference_ci(a, b, paired=True)))
    assert all(np.isnan(mean_difference_ci([5.0, 5.0, 5.0 + 1e-13], [0.0] * 3, paired=True)))
    assert mean_difference_ci(np.tile(a, 2), np.tile(b, 2), paired=True) == pytest.approx((0.1, 0.1), abs=1e-15)
    assert all(np.isnan(mean_difference_ci([1e6 + 0.1] * 2 + [1e6 + 0.1 + 1e-10], [1e6] * 3, paired=True)))
    assert all(np.isnan(mean_difference_ci([0.3, 0.1 + 0.2, 0.3], [0.0] * 3, paired=False)))
    assert mean_difference_ci([0.3, 0.1 + 0.2] * 2, [0.0] * 4, paired=False) == pytest.approx((0.3, 0.3), abs=1e-15)
    c = np.array([1.0, 1.0 + 1e-9, 1.0 + 2e-9])
    assert mean_difference_ci(c, np.zeros(3), paired=True) == pytest.approx(
        tuple(sps.ttest_rel(c, np.zeros(3)).confidence_interval()), rel=1e-9)


def test_paired_bootstrap_blocks_draw_the_same_resamples():
    """A block statistic sees the same resamples, in the same order, as one call per resample."""
    one, blocks = [], []
    paired_bootstrap(lambda idx: one.append(idx.copy()) or {"s": 0.0}, 7, n_boot=10, random_state=3)
    reps = paired_bootstrap(lambda idx: blocks.append(idx.copy()) or {"s": idx[:, 0] * 1.0}, 7, n_boot=10,
                            random_state=3, block=4)
    assert [len(b) for b in blocks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(blocks), np.stack(one))
    np.testing.assert_array_equal(reps["s"], np.stack(one)[:, 0])


@pytest.mark.parametrize("noise", ["cluster", "exclude", "singleton"])
def test_resampled_clustering_scores_equal_sklearn_per_resample(noise):
    """Oracle: ``clustering_scores`` (scikit-learn's NMI and ARI) on each resample's rows, including resamples with
    one class, one cluster, only noise, and labels absent from a resample."""
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(60):
        n = int(rng.integers(1, 30))
        t = rng.integers(0, int(rng.integers(1, 5)), n) * 7 - 3  # labels need not be 0..k-1
        p = rng.integers(-1, int(rng.integers(1, 6)), n)
        if trial % 6 == 0:
            p[:] = -1
        if trial % 7 == 0:
            t[:] = 5
        idx = rng.integers(0, n, (6, int(rng.integers(1, 25))))
        got = resampled_clustering_scores(t, p, idx, noise=noise)
        # singleton: each noise row a cluster of its own, which a resample's copies of it share
        q, policy = (np.where(p == -1, 10 + np.arange(n), p), "cluster") if noise == "singleton" else (p, noise)
        for b, rows in enumerate(idx):
            want = clustering_scores(t[rows], q[rows], noise=policy)
            for key in ("purity", "nmi", "ari"):
                if np.isnan(want[key]):
                    assert np.isnan(got[key][b])
                else:
                    assert got[key][b] == pytest.approx(want[key], abs=1e-12), (trial, b, key)
                    checked += 1
    assert checked > 500


def test_resampled_clustering_scores_bad_input():
    with pytest.raises(InvalidInputError, match="'noise' parameter of resampled_clustering_scores"):
        resampled_clustering_scores([0, 1], [0, 1], [[0, 1]], noise="drop")
    with pytest.raises(InvalidInputError, match="row indices"):
        resampled_clustering_scores([0, 1], [0, 1], [[0, 2]])
    with pytest.raises(InvalidInputError, match="equal length"):
        resampled_clustering_scores([0, 1], [0], [[0]])

# ------------------------------------------------------------------------------------------------ text labels
def test_lexical_category_and_context():
    cats = [lexical_category(t) for t in ["[CLS]", "##ing", ",", "...", "42", "the", "Paris", "Ġbank", "bank"]]
    assert cats == ["special", "subword", "punctuation", "punctuation", "digit", "stopword", "capitalised", "word",
                    "word"]
    toks = ["[CLS]", "the", "river", "bank", "was", "mud", "##dy", "[SEP]"]
    assert token_context(toks, 3, width=2) == "… the river [[bank]] was mud …"
    assert token_context(toks, 5, width=10) == "[CLS] the river bank was [[mud]]dy [SEP]"
    assert token_context(toks, 7, width=1) == "… dy [[[SEP]]]"


# ------------------------------------------------------------------------------------------------- alignment
def test_activation_rows_align_with_code_rows_toy():
    """Row i of the activations is the unit input whose sign pattern is code row i (ReLU MLP, uneven batches)."""
    bundle = load_model("toy:4-16-16-3:relu:seed=1")
    x = np.random.default_rng(0).normal(size=(37, 4)).astype(np.float32)
    src = DataSource("x", "array", x)
    codes = extract_codes(bundle, src, batch_size=8)
    sites = list(codes.layers)
    acts, rows, tokens = row_activations(bundle, src, sites, UnitSelection("all"), batch_size=8)
    assert tokens is None and np.array_equal(rows, codes.rows)
    start = 0
    for name in sites:
        lc = codes[name]
        assert np.array_equal(lc.pieces(), (acts[:, start:start + lc.n_units] > 0).astype(np.int64))
        start += lc.n_units
    assert start == acts.shape[1]


@pytest.mark.parametrize("units", ["all", "position"])
def test_activation_rows_align_with_code_rows_cnn(units):
    """Same on digits-cnn's conv ReLU, for all units and for the channel vector at one position."""
    from polytope_lens.data import load_data

    bundle, src = load_model("digits-cnn"), load_data("digits", limit=40)
    sel = UnitSelection(units, position=(0.25, 0.75))
    codes = extract_codes(bundle, src, layers="conv.1.relu", units=units, position=(0.25, 0.75), batch_size=16)
    acts, rows, _ = row_activations(bundle, src, ["conv.1.relu"], sel, batch_size=16)
    assert np.array_equal(rows, codes.rows)
    assert np.array_equal(codes["conv.1.relu"].pieces(), (acts > 0).astype(np.int64))
    assert acts.shape == (40, 32 if units == "position" else 32 * 4 * 4)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def digits_result():
    return run_prediction1("digits-cnn", "digits", layers="conv.1.relu", n_items=300, seed=0, n_boot=100,
                           n_stability=3)


def test_run_prediction1_digits_is_well_formed(digits_result):
    """Finite scores, CIs around the observed difference, verdicts from the rule, JSON-safe dict with dashboard."""
    res = digits_result
    d = json.loads(json.dumps(res.to_dict()))
    assert d["model"] == "digits-cnn" and d["n_rows"] == 300 and d["verdict"] in VERDICTS
    stats = [e["statistic"] for e in d["entries"]]
    assert stats == ["purity[class]", "nmi[class]", "ari[class]", "stability"]
    for e in d["entries"]:
        assert set(e) == {"model", "statistic", "value", "baseline", "ci", "n", "ci_method", "verdict"}
        assert e["n"] == (3 if e["statistic"] == "stability" else 300)
        assert np.isfinite([e["value"], e["baseline"], *e["ci"]]).all()
        assert e["ci"][0] <= e["ci"][1]
        assert e["verdict"] == verdict(e["value"], e["baseline"], e["ci"])
    assert d["primary"] == "nmi[class]" and d["verdict"] == res.entry("nmi[class]")["verdict"]
    k = d["code_clustering"]["n_clusters_found"]
    assert d["baseline_clustering"]["n_clusters"] == max(2, k)  # matched k-means baseline
    clusters = [c for c in d["code_clusters"] if not c.get("noise")]
    assert len(clusters) == k and sum(c["size"] for c in d["code_clusters"]) == 300
    assert all(0 <= i < 300 for c in clusters for i in c["items"]) and clusters[0]["units"]
    assert len(res.code_labels) == len(res.baseline_labels) == len(res.labels["class"]) == 300
    assert "<table>" in res._repr_html_()


def test_plots_render(digits_result):
    """The CI plot (one point per finite entry, the level in its label) and an image grid of the code clusters
    (Axes, one row per cluster) render; the notebook view names the data and the interval's level."""
    import matplotlib.pyplot as plt

    from polytope_lens.data import load_data

    ax = digits_result.plot()
    finite = [e for e in digits_result.entries if np.isfinite([e["value"], e["baseline"], *e["ci"]]).all()]
    assert len(ax.lines) - 1 >= len(finite) and "95% interval" in ax.get_xlabel()
    src = load_data("digits", limit=300, seed=0)
    axes = digits_result.plot(src, max_clusters=3, per_cluster=4)
    assert axes.shape == (3, 4) and len(axes.flat[0].figure.axes) == 12
    with pytest.raises(InvalidInputError, match="'which' parameter of plot"):
        digits_result.plot(src, which="both")
    h = digits_result._repr_html_()
    assert "<td>digits</td>" in h and "95% interval of difference" in h and "(spread)" in h
    plt.close("all")


def test_run_prediction1_exclude_is_paired():
    """With noise='exclude' both clusterings are scored on the same kept rows."""
    res = run_prediction1("digits-cnn", "digits", layers="conv.1.relu", n_items=120, min_cluster_size=5,
                          noise="exclude", n_boot=20, n_stability=0)
    keep = res.code_labels != -1
    assert res.settings["coverage"] == pytest.approx(keep.mean())
    assert [e["statistic"] for e in res.entries] == ["purity[class]", "nmi[class]", "ari[class]"]


@pytest.mark.parametrize("kwargs,match", [
    ({"n_items": 1}, r"The 'n_items' parameter of run_prediction1 must be an int >= 2\. Got 1"),
    ({"noise": "drop"}, "The 'noise' parameter of run_prediction1 must be one of"),
    ({"metric": "cosine"}, "The 'metric' parameter of run_prediction1 must be one of 'hamming', 'jaccard'"),
    ({"baseline_method": "dbscan"}, "The 'baseline_method' parameter of run_prediction1 must be one of"),
    ({"primary": "nmi[token]"}, r"The 'primary' parameter of run_prediction1 must be one of purity\[class\]"),
])
def test_run_prediction1_rejects_bad_inputs(kwargs, match):
    args = {"layers": "head.2.relu", "n_items": 60, "n_boot": 5, "n_stability": 0, "min_cluster_size": 5, **kwargs}
    with pytest.raises(InvalidInputError, match=match):
        run_prediction1("digits-cnn", "digits", **args)


@pytest.mark.slow
def test_run_prediction1_minilm_tokens():
    """MiniLM on pydoc with the token protocol: token and lexical-category label sets, contexts with marked tokens."""
    res = run_prediction1("minilm", "pydoc", layers="*layer.0.*", n_items=40, n_boot=50, n_stability=2,
                          min_cluster_size=5)
    d = json.loads(json.dumps(res.to_dict()))
    stats = [e["statistic"] for e in d["entries"]]
    assert stats[:3] == ["purity[token]", "nmi[token]", "ari[token]"] and "nmi[category]" in stats
    assert not d["exact"] and d["settings"]["selection"]["kind"] == "tokens"
    ctx = [c for c in d["code_clusters"] if not c.get("noise")][0]["contexts"]
    assert ctx and all("[[" in s and "]]" in s for s in ctx)
    # a passage gives up to 6 token rows: the bootstrap resamples passages, not rows
    assert d["entries"][0]["ci_method"] == "paired percentile bootstrap over examples (all their rows)"


def test_grouped_bootstrap_resamples_whole_groups_and_padding_is_not_a_row():
    """With groups, each resample is as many whole groups (drawn with replacement) as there are groups; blocks pad
    shorter resamples with -1, which resampled_clustering_scores does not count (oracle: clustering_scores on the
    resample's rows, i.e. scikit-learn's formulas)."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(7), rng.integers(1, 6, 7))
    y, pred = rng.integers(0, 3, len(groups)), rng.integers(-1, 3, len(groups))
    seen = []

    sizes = np.bincount(groups, minlength=7)
    one_each = np.where(pred == -1, 3 + np.arange(len(pred)), pred)  # each noise row a cluster, with all its copies

    def stat(idx):
        single = idx.ndim == 1
        idx = np.atleast_2d(idx)
        for row in idx:
            rows = row[row >= 0]
            seen.append(rows)
            counts = np.bincount(groups[rows], minlength=7)
            assert (counts % sizes == 0).all() and (counts // sizes).sum() == 7  # 7 whole groups
        got = resampled_clustering_scores(y, pred, idx, noise="singleton")
        for b, row in enumerate(idx):
            want = clustering_scores(y[row[row >= 0]], one_each[row[row >= 0]])
            for key in ("purity", "nmi", "ari"):
                assert abs(got[key][b] - want[key]) < 1e-12
        return {"nmi": got["nmi"][0] if single else got["nmi"]}

    one = paired_bootstrap(stat, len(groups), n_boot=12, groups=groups)
    first = list(seen)
    seen.clear()
    blocked = paired_bootstrap(stat, len(groups), n_boot=12, groups=groups, block=5)
    assert np.array_equal(one["nmi"], blocked["nmi"]) and all(np.array_equal(a, b) for a, b in zip(first, seen))
    assert len({len(r) for r in first}) > 1  # resamples of whole groups differ in length


def test_singleton_noise_copies_are_one_cluster_in_resamples():
    """Under noise='singleton' a resample's copies of one noise row are one cluster, not one cluster each (that
    biased resampled NMI down). Oracle: scikit-learn on the resampled labels with noise relabelled as singletons
    first; the unresampled rows give clustering_scores(noise='singleton') itself."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(3)
    y, pred = rng.integers(0, 4, 60), rng.integers(-1, 3, 60)
    pred[rng.random(60) < 0.4] = -1
    single = np.where(pred == -1, 10 + np.arange(60), pred)
    idx = rng.integers(0, 60, (40, 60))
    idx[0] = np.arange(60)
    got = resampled_clustering_scores(y, pred, idx, noise="singleton")
    for b, row in enumerate(idx):
        assert abs(got["nmi"][b] - normalized_mutual_info_score(y[row], single[row])) < 1e-12
        assert abs(got["ari"][b] - adjusted_rand_score(y[row], single[row])) < 1e-12
        cells = np.unique(np.c_[single[row], y[row]], axis=0, return_counts=True)
        largest = {}
        for (c, _), n in zip(*cells):
            largest[c] = max(largest.get(c, 0), n)
        assert abs(got["purity"][b] - sum(largest.values()) / len(row)) < 1e-12
    point = clustering_scores(y, pred, noise="singleton")
    assert all(abs(got[k][0] - point[k]) < 1e-12 for k in ("purity", "nmi", "ari"))


def test_a_clustering_without_clusters_gives_no_verdict():
    """HDBSCAN calling every row noise (min_cluster_size above what 60 digits hold) scores like a constant labelling:
    NMI 0 and a subsample "stability" of 1. It used to read "does not hold" (labels) and "holds" (stability)."""
    res = run_prediction1("digits-cnn", "digits", layers="head.2.relu", n_items=60, n_boot=50, n_stability=3,
                          min_cluster_size=40)
    assert res.code_clustering["n_clusters_found"] == 0
    assert res.verdict == "inconclusive" and res.settings["degenerate"].startswith("the code clustering found 0")
    for e in res.entries:
        assert e["verdict"] == "inconclusive" and "fewer than 2" in e["degenerate"]
    assert res.entry("stability")["value"] == 1.0  # what a verdict would have been drawn from
    # noise="exclude" leaves no row to score: the label entries are still there, inconclusive (it used to raise
    # about the 'primary' statistic, or say the data have no labels)
    for n_stability in (2, 0):
        ex = run_prediction1("digits-cnn", "digits", layers="head.2.relu", n_items=60, n_boot=20,
                             n_stability=n_stability, min_cluster_size=40, noise="exclude")
        assert ex.verdict == "inconclusive" and ex.entry("nmi[class]")["n"] == 0
        assert all(e["verdict"] == "inconclusive" for e in ex.entries)
