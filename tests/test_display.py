"""The notebook layer: each result's ``plot()`` draws the result's own numbers (checked against the records and
``np.histogram``), its ``_repr_html_`` says how the numbers were made, and drawing for files, reports and HTML views
never switches the matplotlib backend a notebook chose."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from polytope_lens import spline_codes
from polytope_lens.cluster import cluster_summary
from polytope_lens.paths import path_crossings, ray_crossings
from polytope_lens.slices import local_complexity, slice_box


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU6(), nn.Linear(24, 3)).double()


def _bin_heights(ax, edges) -> np.ndarray:
    """Summed bar heights per bin of a (stacked) histogram drawn on ``ax``."""
    width = edges[1] - edges[0]
    out = np.zeros(len(edges) - 1)
    for p in ax.patches:
        i = int(round((p.get_x() - edges[0]) / width))
        out[i] += p.get_height()
    return out


def test_batch_plot_draws_the_mean_crossings_per_bin(mlp):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    res = path_crossings(mlp, a, b)
    edges = np.linspace(0, 1, 11)
    ax = res.plot(bins=10)
    every_t = np.concatenate([p.records["t"] for p in res.paths])  # oracle: the per-path records
    np.testing.assert_allclose(_bin_heights(ax, edges), np.histogram(every_t, edges)[0] / len(res), atol=1e-12)
    by_count = sorted(res.per_layer, key=lambda s: -res.per_layer[s])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [s for s in by_count if res.per_layer[s]]


def test_legends_name_sites_that_start_with_an_underscore():
    """Matplotlib drops a label= that starts with '_': EfficientNet-Lite0's sites (``_blocks.0._swish.relu6``) had
    bars without legend entries."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self._a, self._act, self._b = nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2)

        def forward(self, x):
            return self._b(self._act(self._a(x)))

    net = Net().double()
    g = torch.Generator().manual_seed(4)
    res = path_crossings(net, torch.randn(2, 3, generator=g, dtype=torch.float64),
                         torch.randn(2, 3, generator=g, dtype=torch.float64))
    assert res.sites[0].startswith("_") and res.counts.sum() > 0
    assert [t.get_text() for t in res.plot().get_legend().get_texts()] == [res.sites[0]]
    assert [t.get_text() for t in res[0].plot().get_legend().get_texts()] == [res.sites[0]]


def test_ray_plot_is_drawn_in_alpha_with_the_class_changes(mlp):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, generator=g, dtype=torch.float64)
    rays = ray_crossings(mlp, x, layer="1.relu", alphas=(0.5, 6.0))
    path = max(rays.paths, key=lambda p: len(p.trace.class_changes))
    assert len(path.trace.class_changes), "the planted check needs a class change on the ray"
    ax = path.plot(bins=20)
    edges = np.linspace(0.5, 6.0, 21)
    assert ax.get_xlim() == (0.5, 6.0)
    alpha = 0.5 + path.records["t"] * 5.5  # hand-written alpha(t) of this ray
    np.testing.assert_allclose(_bin_heights(ax, edges), np.histogram(alpha, edges)[0], atol=1e-12)
    twin = [a for a in ax.figure.axes if a is not ax][0]
    dashed = sorted(float(line.get_xdata()[0]) for line in twin.lines if line.get_linestyle() == "--")
    np.testing.assert_allclose(dashed, sorted(0.5 + path.trace.class_changes * 5.5), rtol=1e-12)
    # the batch view of rays over one range is in alpha too
    assert rays.plot().get_xlim() == (0.5, 6.0)


def test_html_views_say_exact_or_sampled_and_give_the_counts(mlp):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    exact = path_crossings(mlp, a, b)
    sampled = path_crossings(mlp, a, b, method="sampled", n_samples=64)
    h = exact._repr_html_()
    assert f"{int(exact.counts.sum())} crossings (exact, float64)" in h
    for site, c in exact.per_layer.items():
        assert f"<td>{site}</td><td>{c}</td>" in h
    hs = sampled._repr_html_()
    assert "sampled lower bounds" in hs and "(exact" not in hs and "n_samples=64" in hs
    assert f"<td>{exact[0].crossings} (exact)</td>" in exact[0]._repr_html_()
    assert "(sampled (lower bound))" in sampled[0]._repr_html_()
    assert "(sampled lower bound)" in sampled[0].plot().get_title()


def test_local_complexity_codes_and_clusters_views(mlp):
    two_d = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    lc = local_complexity(two_d, torch.randn(25, 2, dtype=torch.float64), radius=0.2, n_dirs=2)
    ax = lc.plot(bins=5)
    assert sum(p.get_height() for p in ax.patches) == 25 and "sampled, 2 directions" in ax.get_title()
    assert f"<td>1.relu</td><td>{lc.per_site['1.relu'].mean():.4g}</td>" in lc._repr_html_()
    x = torch.randn(8, 4, dtype=torch.float64)
    codes = spline_codes(mlp, x)
    h = codes._repr_html_()
    assert "exact: every site piecewise linear" in h
    for name, layer in codes.layers.items():
        assert f"<td>{name}</td>" in h and f"<td>{layer.n_units}</td>" in h
    summary = cluster_summary(np.array([0, 0, 0, 1, 1, 1, -1, -1]), codes)
    hc = summary._repr_html_()
    assert "2 clusters of 8 rows" in hc and "<th>noise rows</th><td>2</td>" in hc


def test_drawing_for_files_and_html_keeps_the_users_backend(tmp_path):
    """A notebook's backend (here svg, as any non-Agg one) survives a slice's HTML view and PNG file and the report's
    figures; they used to call matplotlib.use('Agg'), which silenced a notebook's inline figures from then on."""
    from polytope_lens.report import figures

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        res = slice_box(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).double(), -1, 1)
        assert "<img" in res._repr_html_()
        res.save_png(tmp_path / "slice.png")
        p2 = {"model": "m", "plot": {"counts": {"different": [3, 4], "same": [1]}, "window_centres": [0.25, 0.75],
                                     "density_windows": [[1.0, 2.0]], "flips": [[0.5]]}}
        text = figures.png(figures.crossings_histogram(p2, detached=True).figure)
        assert text and matplotlib.get_backend() == "svg" and plt.get_fignums() == []
        assert (tmp_path / "slice.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)
