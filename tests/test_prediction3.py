"""Prediction 3: validity intervals and density near their ends."""

import numpy as np
import pytest
import torch
from torch import nn

from polytope_lens.experiments.prediction3 import ray_statistics, validity_interval
from polytope_lens.paths import ray_crossings


def test_validity_interval_planted():
    """Classes 0 on [0, 0.6), 1 on [0.6, 2.5), 2 after: the interval around alpha = 1 is (0.6, 2.5)."""
    alpha = np.linspace(0.005, 3.995, 400)
    top = np.where(alpha < 0.6, 0, np.where(alpha < 2.5, 1, 2))
    lo, hi, c = validity_interval(alpha, top, 1.0)
    assert c == 1 and abs(lo - 0.6) < 0.011 and abs(hi - 2.5) < 0.011
    lo, hi, c = validity_interval(alpha, np.ones(400, int), 1.0)
    assert lo is None and hi is None


class _Planted(nn.Module):
    """Input (B, 2) = (a, s). Site 'pre.relu' outputs a (the scaled activation, a = 1 for the inputs used); s shifts
    everything ray by ray: hidden kinks at alpha = kinks + s (+ kink_shift), class changes at alpha = 0.6 + s and
    2.5 + s (class 0 below, 1 between, 2 above)."""

    def __init__(self, kinks, flips=(0.6, 2.5), kink_shift=0.0):
        super().__init__()
        self.pre = nn.ReLU()
        self.k = torch.tensor(kinks, dtype=torch.float32)
        self.flips = flips
        self.kink_shift = kink_shift
        self.act = nn.ReLU()

    def forward(self, x):
        a = self.pre(x[:, :1])                            # (B, 1), the scaled site
        s = x[:, 1:2]                                     # per-ray shift, from the real input
        h = self.act(a - self.k.to(a.dtype) - s - self.kink_shift)
        f0, f1 = self.flips
        l0 = -(a - s - f0) * 10
        l1 = torch.minimum((a - s - f0) * 10, (f1 + s - a) * 10)
        l2 = (a - s - f1) * 10
        return torch.cat([l0, l1, l2], 1) + 1e-6 * h.sum(1, keepdim=True)


def _rays(kinks, kink_shift=0.0, n=6):
    m = _Planted(kinks, kink_shift=kink_shift)
    x = torch.stack([torch.ones(n), 0.15 * torch.arange(n, dtype=torch.float32)], 1)  # shifts 0, 0.15, ..., 0.75
    return ray_crossings(m, x, layer="pre.relu", alphas=(0.0, 4.0), method="sampled", n_samples=2000)


def test_planted_interval_and_density_holds():
    """Kinks clustered at each ray's own interval ends: intervals recovered; denser there than at other rays'
    ends (holds)."""
    kinks = np.concatenate([0.6 + np.linspace(-0.03, 0.03, 10), 2.5 + np.linspace(-0.03, 0.03, 10)])
    st = ray_statistics(_rays(kinks), half_width=0.05)
    iv = st["intervals"][1]  # shift 0.15
    assert iv["class"] == 1 and abs(iv["lo"] - 0.75) < 0.01 and abs(iv["hi"] - 2.65) < 0.01
    assert st["entries"][0]["verdict"] == "holds"


def test_kinks_away_from_ends_do_not_hold():
    """Kinks clustered 0.15 past each ray's ends, i.e. at the next ray's ends: density near a ray's own ends is
    lower than near the other rays' ends (does not hold)."""
    kinks = np.concatenate([0.6 + np.linspace(-0.02, 0.02, 10), 2.5 + np.linspace(-0.02, 0.02, 10)])
    e = ray_statistics(_rays(kinks, kink_shift=0.15), half_width=0.05)["entries"][0]
    assert e["value"] < e["baseline"] and e["verdict"] == "does not hold"


class _Residual(nn.Module):
    """conv -> ReLU (the site) -> conv, plus a branch that reads the tensor before the site after it."""

    def __init__(self, read_batch_size: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.c1, self.c2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            for c in (self.c1, self.c2):
                c.weight.copy_(torch.randn(c.weight.shape, generator=g))
        self.site = nn.ReLU()
        self.read_batch_size = read_batch_size
        self.rows_before = []  # rows of every pass through the part before the site

    def forward(self, x):
        self.rows_before.append(len(x))
        h = self.c1(x)
        bs = x.size(0)
        out = self.c2(self.site(h)) + h
        return out.reshape(bs, -1)[:, :4] if self.read_batch_size else out.flatten(1)[:, :4]


def test_outputs_along_run_the_prefix_once_per_path_and_equal_one_forward_per_point():
    """``outputs_along`` equals a forward pass per point with the site replaced (the oracle, one point at a time); the
    part before the site runs on one row per path and batch where that reproduces the plain pass, and on every point
    for a model that reads its batch size before the site (as EfficientNet's head does)."""
    from polytope_lens.capture import run
    from polytope_lens.experiments._along import outputs_along

    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 1, 5, 5, generator=g)
    pts = torch.relu(torch.randn(3, 7, 3, 5, 5, generator=g))  # 3 paths x 7 points of the site's output
    for read_batch_size in (False, True):
        m = _Residual(read_batch_size).eval()

        def one_point(p, j):
            return run(m, lambda: m(x[p:p + 1]), lambda s, z: pts[p, j][None] if s.name == "site.relu" else None)[0]
        want = torch.stack([torch.stack([one_point(p, j) for j in range(7)]) for p in range(3)]).double()
        got = outputs_along(m, lambda d: m(d["x"]), {"x": x}, "site.relu", pts, batch=8)
        assert got.shape == (3, 7, 4) and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        # the last three passes: points 0-7, 8-15 and 16-20 (batches of 8), which span 2, 2 and 1 paths
        assert m.rows_before[-3:] == ([8, 8, 5] if read_batch_size else [2, 2, 1])


def test_density_near_ends_uses_the_windows_exact_length():
    """Crossings near validity ends per unit alpha: over the exact length of the union of the windows, clipped to
    the ray (a 2001-point grid overestimated it by up to a step before)."""
    from polytope_lens.experiments.prediction3 import _density_near

    xa = np.array([0.3, 0.35, 0.5, 1.0, 1.05, 15.99])
    assert np.isclose(_density_near(xa, [0.3, 0.4], 0.25, 16.0, 0.1), 3 / (0.5 - 0.25))  # overlapping, clipped
    assert np.isclose(_density_near(xa, [1.0, 3.0], 0.25, 16.0, 0.1), 2 / 0.4)  # two disjoint windows
    assert np.isclose(_density_near(xa, [15.95], 0.25, 16.0, 0.1), 1 / 0.15)  # clipped at the end
    assert _density_near(xa, [], 0.25, 16.0, 0.1) is None


def _one_change_net():
    """x -> relu(x) -> relu(x - 0.1), relu(x - 0.3) -> logits (0.8, relu(x - 0.1)): along alpha * relu(1), hand
    computed, the hidden kinks are at alpha = 0.1 and 0.3 and the class changes from 0 to 1 at alpha = 0.9; at
    alpha = 1 the logits are (0.8, 0.9): class 1. On [0.25, 16] the regions are [0.25, 0.3] and [0.3, 16], whose
    midpoints (0.275, 8.15) are both far from 1, and the one nearer to 1 has class 0."""
    m = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        m[0].weight.fill_(1.0), m[0].bias.zero_()
        m[2].weight.copy_(torch.tensor([[1.0], [1.0]])), m[2].bias.copy_(torch.tensor([-0.1, -0.3]))
        m[4].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]])), m[4].bias.copy_(torch.tensor([0.8, 0.0]))
    return m.eval()


def test_the_class_at_alpha_one_is_the_models_not_the_nearest_midpoints():
    """The validity interval's class is the class at alpha = 1 (hand-computed: 1), through run_prediction3 (the
    model's prediction) and through ray_statistics alone (the trace between the class changes around 1); the
    nearest region midpoint (0.275, class 0) gave class 0 before."""
    from polytope_lens.data._source import DataSource
    from polytope_lens.experiments.prediction3 import run_prediction3
    from polytope_lens.models._bundle import ModelBundle

    m = _one_change_net()
    bundle = ModelBundle("handmade", m, "vector", (1,), ["c0", "c1"], None, {})
    src = DataSource("one", "array", np.ones((2, 1), np.float32), None, None, {})
    r = run_prediction3(bundle, src, layer="1.relu", n_items=2, alphas=(0.25, 16.0))
    assert [iv["class"] for iv in r.intervals] == [1, 1]
    assert r.intervals[0]["lo"] == pytest.approx(0.9, abs=1e-7) and r.intervals[0]["hi"] is None
    st = ray_statistics(r.rays)
    assert [iv["class"] for iv in st["intervals"]] == [1, 1]
    # the notebook views: one panel per ray with its validity interval; the HTML view lists the intervals
    import matplotlib.pyplot as plt
    axes = r.plot(n_rays=2)
    spans = [p for p in axes[0].patches if p.get_label() == "validity interval"]
    assert len(spans) == 1 and spans[0].get_x() == pytest.approx(r.intervals[0]["lo"])
    assert f"<td>{r.intervals[0]['lo']:.4g}</td>" in r._repr_html_()
    plt.close("all")


@pytest.mark.parametrize("alphas", [(0.05, 0.3), (1.0, 4.0), (2.0, 0.5), (0.0, float("inf"))])
def test_alphas_must_hold_one(alphas):
    """A range of alpha without 1 has no validity interval (it is the range around the input's own activation):
    refused before anything runs, instead of a statistic about classes the model does not predict at alpha = 1."""
    from polytope_lens.errors import InvalidInputError
    from polytope_lens.experiments.prediction3 import run_prediction3

    with pytest.raises(InvalidInputError, match="alpha0 < 1 < alpha1"):
        run_prediction3("nosuchmodel", "digits", layer="x", alphas=alphas)


def test_mean_difference_ci_is_scipys_t_interval_and_calibrated_at_small_n():
    """Predictions 2 and 3's intervals equal scipy's paired and Welch t intervals; on null data (no true difference)
    at the report's small n, a false verdict on each side comes out near the nominal 2.5 % (the percentile bootstrap
    gave 10 % at n = 4)."""
    from scipy import stats as sps

    from polytope_lens.experiments.stats import mean_difference_ci, verdict

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=7), rng.normal(size=7) + 0.3
    assert mean_difference_ci(a, b, paired=True) == pytest.approx(tuple(sps.ttest_rel(a, b).confidence_interval()))
    c = rng.normal(size=4) * 3
    assert mean_difference_ci(a, c, paired=False, level=0.9) == pytest.approx(
        tuple(sps.ttest_ind(a, c, equal_var=False).confidence_interval(0.9)))
    assert all(np.isnan(mean_difference_ci([1.0], [0.0], paired=True)))
    # no spread: a point only where the exact sign (permutation) test could reach 95 % at all (2 / 2^n, 2 / C(2n, n))
    assert all(np.isnan(mean_difference_ci([5, 5, 5, 5, 5], [0] * 5, paired=True)))
    assert mean_difference_ci([5] * 6, [0] * 6, paired=True) == (5.0, 5.0)
    assert all(np.isnan(mean_difference_ci([3, 3, 3], [1, 1, 1], paired=False)))
    assert mean_difference_ci([3] * 4, [1] * 4, paired=False) == (2.0, 2.0)
    for n in (2, 4, 6):
        verdicts = [verdict(x.mean(), y.mean(), mean_difference_ci(x, y, paired=True))
                    for x, y in (rng.normal(size=(2, n)) for _ in range(4000))]
        for side in ("holds", "does not hold"):
            assert 0.015 < verdicts.count(side) / len(verdicts) < 0.035, (n, side)


def test_no_verdict_says_why():
    """Rays over (1.0, 1.2), where no class changes (the planted changes are at 0.6 + s and 2.5 + s), and rays where
    only one of them changes class: the entry is inconclusive and says why (it showed nan, nan, inconclusive)."""
    m = _Planted([0.3])
    x = torch.stack([torch.ones(3), torch.zeros(3)], 1)
    st = ray_statistics(ray_crossings(m, x, layer="pre.relu", alphas=(1.0, 1.2), method="sampled", n_samples=64))
    e = st["entries"][0]
    assert e["verdict"] == "inconclusive" and e["degenerate"].startswith("no ray changes class within its alphas")
    x = torch.tensor([[1.0, 0.0], [1.0, 0.5], [1.0, 0.5]])  # flips at 0.6 (ray 0) and 1.1 (rays 1, 2: class 1 after)
    st = ray_statistics(ray_crossings(m, x, layer="pre.relu", alphas=(0.5, 0.9), method="sampled", n_samples=64))
    assert st["entries"][0]["degenerate"].startswith("only one ray changes class")


@pytest.mark.parametrize("bad,match", [({"half_width": -1.0}, "'half_width' parameter of run_prediction3"),
                                       ({"half_width": float("nan")}, "'half_width' parameter of run_prediction3"),
                                       ({"n_grid": 0}, "'n_grid' parameter of run_prediction3"),
                                       ({"level": 2.0}, "'level' parameter of run_prediction3"),
                                       ({"model": nn.Linear(2, 2)}, "'model' parameter of run_prediction3 must be")])
def test_run_prediction3_refuses_bad_options_before_any_ray(bad, match, monkeypatch):
    """Found at stop 35: a negative or NaN half_width ran to NaN statistics and an 'inconclusive' verdict, n_grid=0
    was a raw torch error, a bad level was named as mean_difference_ci's after every ray, and a bare module raised
    AttributeError ('modality'). Each is now a one-line error before any ray runs."""
    import polytope_lens.paths as paths
    from polytope_lens.errors import InvalidInputError
    from polytope_lens.experiments import run_prediction3

    monkeypatch.setattr(paths, "ray_crossings", lambda *a, **k: pytest.fail("a ray ran"))
    kw = {"model": "toy:2-8-8-2", "n_items": 4} | bad
    with pytest.raises(InvalidInputError, match=match):
        run_prediction3(kw.pop("model"), "digits", layer="1.relu", **kw)


def test_numpy_seeds_and_option_ints_are_taken_and_bad_seeds_refused():
    """Found at stop 35 by a reviewer: seed=np.int64(3) passed the new seed check of local complexity, then crashed
    in torch.Generator.manual_seed (a raw TypeError); run_prediction2 took no seed check at all; paired_bootstrap
    refused block=np.int64(5). One check (errors.check_seed) now returns a Python int everywhere."""
    import numpy as np

    from polytope_lens.errors import InvalidInputError
    from polytope_lens.experiments import run_prediction2
    from polytope_lens.experiments.stats import paired_bootstrap
    from polytope_lens.slices import exact_local_complexity, local_complexity

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    pts = torch.randn(3, 3, dtype=torch.float64)
    for f, kw in ((local_complexity, {"n_dirs": 2}), (exact_local_complexity, {})):
        assert np.array_equal(f(m, pts, radius=0.5, seed=np.int64(3), **kw).total,
                              f(m, pts, radius=0.5, seed=3, **kw).total)
    for bad in (-1, 1.5, np.float64(2.0)):
        with pytest.raises(InvalidInputError, match="'seed' parameter of run_prediction2 must be an int"):
            run_prediction2("toy:64-8-10", "digits", seed=bad, n_items=20)
    stat = lambda idx: {"mean": idx.mean(-1)}
    assert np.array_equal(paired_bootstrap(stat, 10, n_boot=4, block=np.int64(2))["mean"],
                          paired_bootstrap(stat, 10, n_boot=4, block=2)["mean"])
