"""Prediction 2 statistics on hand-made piecewise-linear models."""

import numpy as np
import torch
from torch import nn

from polytope_lens.experiments.prediction2 import path_statistics, window_counts
from polytope_lens.paths import path_crossings


def _mlp(kinks: np.ndarray) -> nn.Module:
    """1-D input x in [0, 1] (path from 0 to 1): hidden unit i kinks at x = kinks[i]; logits (0.5 - x, x - 0.5),
    so the class flips at x = 0.5."""
    h = len(kinks)
    l1 = nn.Linear(1, h + 2)
    with torch.no_grad():
        l1.weight.zero_()
        l1.bias.zero_()
        l1.weight[:h, 0] = 1.0
        l1.bias[:h] = -torch.tensor(kinks, dtype=torch.float32)
        l1.weight[h, 0], l1.bias[h] = 1.0, 10.0          # x + 10 > 0 always: identity channel
    l2 = nn.Linear(h + 2, 2)
    with torch.no_grad():
        l2.weight.zero_()
        l2.bias.zero_()
        l2.weight[0, h], l2.bias[0] = -1.0, 10.5         # 0.5 - x
        l2.weight[1, h], l2.bias[1] = 1.0, -10.5         # x - 0.5
        l2.weight[:, :h] = 1e-4                          # kinks change the output only slightly (same both logits)
    return nn.Sequential(l1, nn.ReLU(), l2)


def _batch(kinks_per_path):
    res = []
    for k in kinks_per_path:
        m = _mlp(k)
        res.append(path_crossings(m, torch.zeros(1, 1), torch.ones(1, 1)))
    paths = [r.paths[0] for r in res]
    r0 = res[0]
    return type(r0)(paths, r0.exact, r0.method, r0.dtype, r0.tolerance, r0.kind, r0.layer, r0.sites)


def test_alignment_separates_aligned_from_spread():
    """Kinks clustered at the flip align (holds); uniformly spread kinks do not."""
    rng = np.random.default_rng(0)
    aligned = _batch([0.5 + rng.uniform(-0.02, 0.02, 40) for _ in range(12)])
    spread = _batch([rng.uniform(0.01, 0.99, 40) for _ in range(60)])
    a = {e["statistic"]: e for e in path_statistics(aligned)["entries"]}
    s = {e["statistic"]: e for e in path_statistics(spread)["entries"]}
    assert np.allclose(aligned.paths[0].trace.class_changes, [0.5], atol=1e-6)  # bisected on the model
    assert a["alignment[peak vs flip]"]["verdict"] == "holds"
    assert a["alignment[peak vs flip]"]["mean_distance"] < 0.03
    assert s["alignment[peak vs flip]"]["verdict"] != "holds"
    assert s["alignment[peak vs flip]"]["value"] < a["alignment[peak vs flip]"]["value"] - 0.1


def test_kinks_far_from_flip_do_not_hold():
    """Kinks all at t = 0.95 (flip at 0.5): the peak is farther from the flip than a random flip would be."""
    far = _batch([0.95 + np.linspace(-0.01, 0.01, 30) for _ in range(10)])
    e = {x["statistic"]: x for x in path_statistics(far)["entries"]}["alignment[peak vs flip]"]
    assert e["value"] < e["baseline"]
    assert e["verdict"] == "does not hold"


def test_different_vs_same_counts_verdicts():
    """More crossings on different-class paths holds; the reverse does not hold."""
    many = _batch([np.linspace(0.1, 0.9, 40) for _ in range(8)])
    few = _batch([np.linspace(0.1, 0.9, 5) for _ in range(8)])
    e = {x["statistic"]: x for x in path_statistics(many, few)["entries"]}
    assert e["crossings[different vs same]"]["verdict"] == "holds"
    e = {x["statistic"]: x for x in path_statistics(few, many)["entries"]}
    assert e["crossings[different vs same]"]["verdict"] == "does not hold"
    assert e["crossings[different vs same]"]["value"] == 5


def test_window_counts():
    assert window_counts([0.0, 0.06, 0.5, 1.0], 10).tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]


def test_run_prediction2_digits_small():
    """The real pipeline on digits-cnn: exact paths at a late site, all entries well formed."""
    from polytope_lens.experiments.prediction2 import run_prediction2

    r = run_prediction2("digits-cnn", "digits", layer="pool2.max_pool2d", n_pairs=3, n_items=60)
    d = r.to_dict()
    assert r.exact and d["method"] == "exact"
    names = {e["statistic"] for e in d["entries"]}
    assert {"crossings[different vs same]", "crossings[different vs random]", "alignment[peak vs flip]"} <= names
    for e in d["entries"]:
        assert set(e) >= {"model", "statistic", "value", "baseline", "ci", "verdict"}
    # the start codes (region_flow's, for the report) are the pieces each path leaves at its first crossing of a unit
    assert set(r.start_codes) == set(r.paths["different"].sites)
    for s_i, site in enumerate(r.paths["different"].sites):
        for p_i, p in enumerate(r.paths["different"].paths):
            m = p.records["site"] == s_i
            units, first = np.unique(p.records["unit"][m], return_index=True)
            assert (r.start_codes[site][p_i, units] != p.records["piece"][m][first]).all()
    # the notebook views: the histogram counts every path once, the HTML view carries the verdict and entries
    axes = r.plot()
    n_paths = sum(len(v) for v in r.plot_data["counts"].values())
    assert sum(p.get_height() for p in axes[0].patches) == n_paths and len(axes) == 2
    h = r._repr_html_()
    assert r.verdict in h and all(e["statistic"] in h for e in r.entries) and "exact" in h
    assert "<td>digits</td>" in h and "tie_tol=" in h
    import matplotlib.pyplot as plt
    plt.close("all")


def test_pairs_are_distinct_unordered_pairs():
    """A segment and its reverse are one path: drawn pairs are distinct as unordered pairs (the quick digits run drew
    (80, 0) and (0, 80) before), with the right class relation."""
    from polytope_lens.experiments.prediction2 import _draw_pairs

    labels = np.repeat(np.arange(3), 4)  # 12 items: few pairs, so repeats are likely
    for seed in range(20):
        diff, same = _draw_pairs(labels, 12, np.random.default_rng(seed))
        for pairs, equal in ((diff, False), (same, True)):
            keys = {(min(i, j), max(i, j)) for i, j in pairs.tolist()}
            assert len(keys) == len(pairs)
            assert all((labels[i] == labels[j]) == equal and i != j for i, j in pairs.tolist())


def test_unknown_primary_statistic_is_refused_before_any_path():
    import pytest

    from polytope_lens.errors import InvalidInputError
    from polytope_lens.experiments.prediction2 import STATISTICS, run_prediction2

    with pytest.raises(InvalidInputError, match="'primary' parameter of run_prediction2 must be one of .*Got "
                                                "'crossings'"):
        run_prediction2("toy:64-8-10", "digits", primary="crossings", n_items=20)
    assert "crossings[different vs same]" in STATISTICS


def test_data_source_is_cut_to_n_items_and_labels_must_match():
    """A DataSource is cut to its first n_items (it was used whole); labels= must have one label per item, of the
    cut or of the whole source (a too-long array for a sampled spec was cut silently, pairing labels with other
    items)."""
    import pytest

    from polytope_lens.data import load_data
    from polytope_lens.errors import InvalidInputError
    from polytope_lens.experiments.prediction2 import run_prediction2

    src = load_data("digits", limit=80)
    r = run_prediction2("digits-cnn", src, layer="pool2.max_pool2d", n_pairs=2, n_items=30)
    assert r.settings["n_items"] == 30
    r2 = run_prediction2("digits-cnn", src, layer="pool2.max_pool2d", n_pairs=2, n_items=30,
                         labels=np.asarray(src.labels))
    assert r2.settings["n_items"] == 30
    for bad in (np.zeros(40, dtype=int), np.zeros(29, dtype=int)):
        with pytest.raises(InvalidInputError, match="'labels' parameter of run_prediction2 needs one label per item"):
            run_prediction2("digits-cnn", src, layer="pool2.max_pool2d", n_pairs=2, n_items=30, labels=bad)
    with pytest.raises(InvalidInputError, match=r"one label per item \(30\)\. Got 80"):
        run_prediction2("digits-cnn", "digits", layer="pool2.max_pool2d", n_pairs=2, n_items=30,
                        labels=np.asarray(src.labels))


def test_js_windows_of_exact_paths_sit_where_the_output_changes():
    """Found at stop 35: exact traces' JS was placed halfway between two region midpoints, windows away from the
    boundary when a region is long. Hand-built: the logits are (0, 1000 * ramp) with ramp = relu(x - 0.8) -
    relu(x - 0.81), constant outside [0.8, 0.81]; the path runs x from 0 to 1. Oracle: JS between consecutive
    points of a 20,001-point grid, summed per window: all of it in window 16 ([0.8, 0.85)), as the tool's."""
    m = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        m[0].weight.fill_(1.0), m[0].bias.copy_(torch.tensor([-0.8, -0.81], dtype=torch.float64))
        m[2].weight.copy_(torch.tensor([[0.0, 0.0], [1000.0, -1000.0]])), m[2].bias.zero_()
    res = path_crossings(m, torch.zeros(1, 1), torch.ones(1, 1))
    assert res.exact and res.paths[0].records["t"].tolist() == [0.8, 0.81]
    got = np.array(path_statistics(res, n_windows=20)["plot"]["js_windows"][0])
    x = torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        pr = torch.softmax(m(x), -1).numpy()
    mid = 0.5 * (pr[1:] + pr[:-1])
    js = 0.5 * ((pr[1:] * np.log(pr[1:] / mid)).sum(1) + (pr[:-1] * np.log(pr[:-1] / mid)).sum(1))
    want = np.bincount(np.minimum((x[1:, 0].numpy() * 20).astype(int), 19), weights=js, minlength=20)
    assert np.argmax(want) == np.argmax(got) == 16
    assert np.flatnonzero(got).tolist() == [16] and want[16] / want.sum() > 0.99


def test_pairs_of_equal_items_are_left_out_with_a_note():
    """Found at stop 35: data holding an item twice drew a pair of equal ends, and path_crossings refused the whole
    run ("equal start and end points"). Such pairs are left out, and the settings' notes count them; every path
    kept has distinct ends (oracle: the items themselves)."""
    from polytope_lens.data._source import DataSource
    from polytope_lens.experiments.prediction2 import run_prediction2
    from polytope_lens.models._bundle import ModelBundle

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = np.random.default_rng(0).uniform(0, 1, (6, 2)).astype(np.float32)
    x, y = np.concatenate([x, x]), np.concatenate([np.arange(6) % 2] * 2)
    r = run_prediction2(ModelBundle("dup", net, "vector", input_shape=(2,)), DataSource("dup", "array", x, y, None, {}),
                        n_pairs=12, n_items=12, seed=0)
    for kind in ("different", "same"):
        pairs = r.pairs[kind]
        assert len(pairs) >= 2 and (x[pairs[:, 0]] != x[pairs[:, 1]]).any(1).all()
        assert r.paths[kind].counts.shape == (len(pairs),)
    equal = sum(int((x[i] == x[j]).all()) for i, j in __import__("itertools").combinations(range(12), 2))
    assert equal == 6
    assert any(n.endswith("pairs left out: their two items are equal (a path needs two distinct ends)")
               for n in r.settings["notes"])
