"""Exact 1-D crossings: against Regioncam1D, against dense float64 sampling, hand-computed ties, and bad inputs."""

from __future__ import annotations

import copy
import functools
import os
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_same_records
from polytope_lens.capture import run
from polytope_lens.errors import InvalidInputError, NotPiecewiseLinearError
from polytope_lens.paths import path_crossings, polyline_crossings, ray_crossings, site_activations
from polytope_lens.paths.runner import index_inputs, prepare_model

regioncam = pytest.importorskip("regioncam")


# ---------------------------------------------------------------------------------------------------- models
def _init(lin: nn.Module, g: torch.Generator, bias_std: float = 0.5) -> nn.Module:
    with torch.no_grad():
        fan_in = lin.weight[0].numel()
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * bias_std)
    return lin


class MLP(nn.Module):
    """ReLU/LeakyReLU MLP, optionally with residual blocks h + W2 act(W1 h + b1) + b2."""

    def __init__(self, din, width, depth, slope=None, residual=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.slope, self.residual = slope, residual
        self.inp = _init(nn.Linear(din, width), g)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            if residual:
                self.blocks.append(nn.Sequential(_init(nn.Linear(width, width), g), _init(nn.Linear(width, width), g)))
            else:
                self.blocks.append(_init(nn.Linear(width, width), g))

    def act(self, x):
        return F.relu(x) if self.slope is None else F.leaky_relu(x, self.slope)

    def forward(self, x):
        h = self.act(self.inp(x))
        for b in self.blocks:
            h = h + b[1](self.act(b[0](h))) if self.residual else self.act(b(h))
        return h

    def regioncam_count(self, a, b) -> int:
        rc = regioncam.Regioncam1D.through_points(np.stack([a.numpy(), b.numpy()]).astype(np.float32), size=2.0)

        def lin(m):
            return (np.ascontiguousarray(m.weight.detach().numpy().T.astype(np.float32)),
                    np.ascontiguousarray(m.bias.detach().numpy().astype(np.float32)))

        def act_layer():
            return regioncam.ReLU() if self.slope is None else regioncam.LeakyReLU(self.slope)
        rc.linear(*lin(self.inp))
        rc.relu() if self.slope is None else rc.leaky_relu(self.slope)
        for b in self.blocks:
            if self.residual:
                rc.add(regioncam.Residual(regioncam.Sequential(regioncam.Linear(*lin(b[0])), act_layer(),
                                                               regioncam.Linear(*lin(b[1])))))
            else:
                rc.linear(*lin(b))
                rc.relu() if self.slope is None else rc.leaky_relu(self.slope)
        return rc.num_vertices - 2


class SmallCNN(nn.Module):
    """Conv-BN-ReLU6-MaxPool, a residual block with BatchNorm, Hardtanh and abs, then a linear head."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = _init(nn.Conv2d(1, 4, 3, padding=1), g, 0.3)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = _init(nn.Conv2d(4, 4, 3, padding=1), g, 0.3)
        self.bn2 = nn.BatchNorm2d(4)
        self.c3 = _init(nn.Conv2d(4, 4, 3, padding=1), g, 0.3)
        self.head = _init(nn.Linear(4 * 3 * 3 * 2, 5), g)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.copy_(torch.randn(4, generator=g) * 0.2)
                bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(4, generator=g) * 0.2)
        self.eval()

    def forward(self, x):
        h = F.relu6(3.0 * self.bn1(self.c1(x)))
        h = F.max_pool2d(h, 2)  # 4x3x3 from 6x6
        r = F.relu(self.bn2(self.c2(h)))
        h = F.hardtanh(h + self.c3(r), -1.0, 2.0)
        h = torch.cat([h, torch.abs(F.avg_pool2d(h, 1) - 0.5)], dim=1)
        return self.head(h.flatten(1))


# ------------------------------------------------------------------------------------------ sampling oracle
def _first_max_within(w, z, tol=1e-9):
    """The documented max-pool rule: the first window entry within tol * max(floor, |max|) of the window's maximum,
    floor = min(1, the largest |entry| of the example's input ``z``) (so entries equal in exact arithmetic but rounded
    apart are tied, as at clamped or interpolated points, and pieces do not change when the input is scaled)."""
    top = w.amax(-1, keepdim=True)
    floor = torch.stack([r.abs().max() for r in z]).clamp(max=1.0).reshape(-1, *[1] * (w.dim() - 1))
    near = w >= top - tol * torch.maximum(top.abs(), floor)
    return torch.argmax(near.to(torch.uint8), dim=-1)


def _pieces_along(model, t, point, site=None, base=None):
    """Pieces of every unit at every site (execution order) at path points ``point(t)``."""
    m = prepare_model(model, torch.float64, "cpu")
    x = point(t)
    out: dict = {}

    def handler(s, z):
        if s.name == site:
            return x
        windows = getattr(s.activation, "windows", None)
        p = s.activation.pieces(z) if windows is None else _first_max_within(windows(z), z)
        out[s.name] = p.reshape(len(t), -1)
    inp = x if site is None else index_inputs(base, torch.zeros(len(t), dtype=torch.long))
    run(m, lambda: m(inp), handler)
    return out


def dense_count(model, point, site=None, base=None, n0=2048, n_max=2 ** 17) -> dict:
    """Crossings per site from dense float64 samples, doubling the grid until every count is stable."""
    prev, n = None, n0
    while n <= n_max:
        t = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        counts = {}
        for name, p in _pieces_along(model, t, point, site, base).items():
            d = p[1:] != p[:-1]
            counts[name] = int(d.sum())
        if prev == counts:
            return counts
        prev, n = counts, n * 4
    raise AssertionError("sampling did not stabilise")


# ----------------------------------------------------------------------------------------- vs Regioncam1D
@pytest.mark.parametrize("slope", [None, 0.1])
@pytest.mark.parametrize("residual", [False, True])
def test_counts_equal_regioncam_on_random_mlps(slope, residual):
    """Counts equal Regioncam1D's on ReLU and LeakyReLU MLPs, with and without residual blocks (float32-safe)."""
    mlp = MLP(12, 24, 3, slope=slope, residual=residual, seed=3)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    res = path_crossings(mlp, a, b)
    assert res.exact and res.method == "exact" and res.dtype == "float64"
    # Regioncam is float32: compare on paths where float32 is unambiguous (no tie, breakpoints >= 1e-6 apart in t)
    clear = [i for i, p in enumerate(res.paths) if p.ties == 0 and np.diff(p.t).min() > 1e-6]
    assert len(clear) >= 12
    rc = [mlp.regioncam_count(a[i], b[i]) for i in clear]
    assert res.counts[clear].tolist() == rc


def test_affine_and_graph_evaluators_agree():
    """The two evaluators (Jacobian blocks, forward passes) give identical records."""
    mlp = MLP(6, 16, 2, residual=True, seed=1)
    a, b = torch.randn(5, 6), torch.randn(5, 6)
    r1 = path_crossings(mlp, a, b, evaluator="affine")
    r2 = path_crossings(mlp, a, b, evaluator="graph")
    assert "affine" in r1.notes[0] and "graph" in r2.notes[0]
    for p, q in zip(r1.paths, r2.paths):
        assert p.per_layer == q.per_layer
        np.testing.assert_allclose(p.records["t"], q.records["t"], atol=1e-12)
        assert (p.records["unit"] == q.records["unit"]).all() and (p.records["piece"] == q.records["piece"]).all()


@pytest.mark.parametrize("residual,slope", [(False, None), (True, None), (True, 0.05)])
def test_products_at_every_point_equal_the_closed_form_bends(monkeypatch, residual, slope):
    """The GPU's affine route (every site's unit inputs by products at every point, ``PRODUCTS_AT_EVERY_POINT``,
    here in its appended layout with torch operations) gives the CPU's records (closed-form bends at new points), on
    the CPU, and both equal Regioncam1D's counts."""
    import polytope_lens.paths.exact as exact
    mlp = MLP(12, 24, 3, slope=slope, residual=residual, seed=3)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    bends = path_crossings(mlp, a, b, evaluator="affine", trace=True)
    monkeypatch.setattr(exact, "PRODUCTS_AT_EVERY_POINT", {"cpu"})
    products = path_crossings(mlp, a, b, evaluator="affine", trace=True)
    assert_same_records(products, bends)
    clear = [i for i, p in enumerate(products.paths) if p.ties == 0 and np.diff(p.t).min() > 1e-6]
    assert len(clear) >= 12
    assert products.counts[clear].tolist() == [mlp.regioncam_count(a[i], b[i]) for i in clear]


@pytest.mark.parametrize("case", ["relu6", "units"])
def test_products_at_every_point_in_path_order_and_unit_subsets(monkeypatch, case):
    """Products at every point with two-kink units (ReLU6: merged into path order, not appended) and with the last
    site's crossings restricted to some units (appended: the output still needs them all) give the bends' records."""
    import polytope_lens.paths.exact as exact
    g = torch.Generator().manual_seed(11)
    if case == "relu6":
        torch.manual_seed(4)
        model, kw = nn.Sequential(nn.Linear(5, 20), nn.ReLU6(), nn.Linear(20, 20), nn.ReLU6(), nn.Linear(20, 3)), {}
        a, b = 3 * torch.randn(12, 5, generator=g), 3 * torch.randn(12, 5, generator=g)
    else:
        model, kw = MLP(12, 24, 3, seed=5), {"layers": "relu#3", "units": list(range(0, 24, 2))}
        a, b = torch.randn(12, 12, generator=g), torch.randn(12, 12, generator=g)
    bends = path_crossings(model, a, b, evaluator="affine", **kw)
    monkeypatch.setattr(exact, "PRODUCTS_AT_EVERY_POINT", {"cpu"})
    made = []
    monkeypatch.setattr(exact.Refiner, "_run_chunk_appended",
                        lambda self, *x, f=exact.Refiner._run_chunk_appended: made.append(1) or f(self, *x))
    products = path_crossings(model, a, b, evaluator="affine", **kw)
    assert bool(made) == (case == "units")
    assert products.counts.sum() > 20
    assert_same_records(products, bends)


# -------------------------------------------------------------------------------------------- vs sampling
@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_cnn_counts_equal_dense_sampling(evaluator):
    """BatchNorm (eval), ReLU6, MaxPool, residual add, Hardtanh, abs, concat, avg pool: exact = dense sampling."""
    cnn = SmallCNN(seed=2)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 1, 6, 6, generator=g), torch.randn(3, 1, 6, 6, generator=g)
    res = path_crossings(cnn, a, b, evaluator=evaluator)
    assert res.exact
    assert set(res.sites) == {"relu6", "max_pool2d", "relu", "hardtanh", "abs"}
    assert sum(p.ties for p in res.paths) > 0  # max pooling over clamped ReLU6 outputs ties with their crossings
    for i, p in enumerate(res.paths):
        want = dense_count(cnn, lambda t, i=i: a[i:i + 1].double() + t.reshape(-1, 1, 1, 1) * (b[i] - a[i]).double())
        assert p.per_layer == want


@pytest.mark.parametrize("evaluator", ["affine", "graph", "products", "frontier"])
def test_paths_at_a_layer_and_rays_equal_sampling(evaluator, monkeypatch):
    """Segments between activations at a named site, and scaling rays there, match dense sampling (the graph
    evaluator runs the network before the site once per path: ``SharedPrefix``, residual branches included;
    "products": the affine route with products at every point, appended, each path with its own constant term)."""
    if evaluator == "products":
        import polytope_lens.paths.exact as exact
        monkeypatch.setattr(exact, "PRODUCTS_AT_EVERY_POINT", {"cpu"})
        made = []
        monkeypatch.setattr(exact.Refiner, "_run_chunk_appended",
                            lambda self, *x, f=exact.Refiner._run_chunk_appended: made.append(1) or f(self, *x))
        evaluator = "affine"
    mlp = MLP(5, 12, 3, residual=True, seed=4)
    x = torch.randn(3, 5)
    names = [s.name for s in __import__("polytope_lens").list_sites(mlp, lambda: mlp(x[:1]))]
    site = names[1]
    a = torch.relu(torch.randn(3, 12))
    b = torch.relu(torch.randn(3, 12))
    res = path_crossings(mlp, a, b, layer=site, inputs=x, evaluator=evaluator)
    assert res.layer == site and site not in res.sites and names[0] not in res.sites
    for i, p in enumerate(res.paths):
        want = dense_count(mlp, lambda t, i=i: a[i].double() + t[:, None] * (b[i] - a[i]).double(), site=site,
                           base=x[i:i + 1].double())
        want = {k: v for k, v in want.items() if k in res.sites}
        assert p.per_layer == want
    rays = ray_crossings(mlp, x, layer=site, alphas=(0.0, 3.0), evaluator=evaluator)
    act = {}
    run(mlp, lambda: mlp(x), lambda s, z: act.setdefault(s.name, torch.relu(z)))
    for i, p in enumerate(rays.paths):
        ai = act[site][i].double()
        want = dense_count(mlp, lambda t, ai=ai: (3.0 * t)[:, None] * ai, site=site, base=x[i:i + 1].double())
        assert p.per_layer == {k: v for k, v in want.items() if k in rays.sites}
        assert p.alphas == (0.0, 3.0) and p.alpha(0.5) == 1.5
        assert p.density == pytest.approx(p.crossings / (3.0 * float(ai.norm())))
    if "made" in locals():
        assert made  # the appended route ran



@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_rays_along_a_direction_equal_sampling_and_the_segment(evaluator):
    """Rays a + alpha * d (one d for all paths, and one per path) match dense sampling of that line, equal the
    segment between its two ends at the site record for record, and measure density along |d|."""
    mlp = MLP(5, 12, 3, residual=True, seed=6)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    site = [s.name for s in __import__("polytope_lens").list_sites(mlp, lambda: mlp(x[:1]))][1]
    a = site_activations(mlp, x, layer=site)  # float64, as the ray computes it
    g = torch.Generator().manual_seed(3)
    for d in (torch.randn(12, generator=g), torch.randn(3, 12, generator=g)):
        rays = ray_crossings(mlp, x, layer=site, alphas=(-1.0, 2.5), direction=d, evaluator=evaluator)
        dd = d.double().expand_as(a)
        seg = path_crossings(mlp, a - dd, a + 2.5 * dd, layer=site, inputs=x, evaluator=evaluator)
        for i, (p, q) in enumerate(zip(rays.paths, seg.paths)):
            want = dense_count(mlp, lambda t, i=i: a[i] + (-1.0 + 3.5 * t)[:, None] * dd[i], site=site,
                               base=x[i:i + 1].double())
            assert p.per_layer == {k: v for k, v in want.items() if k in rays.sites}
            assert p.per_layer == q.per_layer and p.crossings > 0
            for key in ("site", "unit", "piece"):
                np.testing.assert_array_equal(p.records[key], q.records[key])
            # the ray's points are a + alpha(t) d, the segment's interpolated between its ends: equal to rounding
            np.testing.assert_allclose(p.records["t"], q.records["t"], rtol=0, atol=1e-14)
            assert p.alpha(0.0) == -1.0 and p.alpha(1.0) == 2.5
            assert p.density == pytest.approx(p.crossings / (3.5 * float(dd[i].norm())))
    for bad, msg in ((torch.randn(5), "activation shape"), (torch.full((12,), float("nan")), "NaN"),
                     (torch.zeros(12), "zero direction"), ("up", "array of numbers")):
        with pytest.raises(InvalidInputError, match=msg):
            ray_crossings(mlp, x, layer=site, direction=bad)

class ClampNet(nn.Module):
    """Clamps with two bounds, with one nonzero bound (below and above), and a clamped residual."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(8)
        self.l1, self.l2, self.l3 = (_init(nn.Linear(4, 10), g), _init(nn.Linear(10, 10), g),
                                     _init(nn.Linear(10, 10), g))

    def forward(self, x):
        h = torch.clamp(self.l1(x), -0.5, 0.6)
        h = h + self.l2(h).clamp(min=0.1)
        return torch.clip(self.l3(h), max=0.3)


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_clamp_sites_equal_sampling(evaluator):
    m = ClampNet()
    g = torch.Generator().manual_seed(1)
    a, b = 2 * torch.randn(3, 4, generator=g), 2 * torch.randn(3, 4, generator=g)
    res = path_crossings(m, a, b, evaluator=evaluator)
    assert res.sites == ("clamp", "clamp#1", "clamp#2") and res.exact
    for i, p in enumerate(res.paths):
        assert p.per_layer == dense_count(m, lambda t, i=i: a[i].double() + t[:, None] * (b[i] - a[i]).double())
        assert p.crossings > 0


class InPlaceNet(nn.Module):
    """In-place activations three ways (a module, ``F.relu(x, inplace=True)`` whose result is ignored, and
    ``torch.relu_``), and ``plain()``: the same network with out-of-place calls."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.l1, self.l2, self.l3 = _init(nn.Linear(3, 12), g), _init(nn.Linear(12, 12), g), _init(nn.Linear(12, 4), g)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.l2(self.act(self.l1(x)))
        F.relu(h, inplace=True)
        return torch.relu_(self.l3(h) * 1.0)

    def plain(self, x):
        return torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x))))))


@pytest.mark.parametrize("evaluator", ["affine", "graph"])
def test_in_place_activations_are_seen_before_they_overwrite_their_input(evaluator):
    """An in-place activation overwrote the unit input that the engine kept (every later read saw the output) and,
    when the engine replaced the site's output, the input was left unmodified for code that reads it (the Jacobian
    blocks came out wrong): the internal check refused the path. Now counts, codes and slices equal the out-of-place
    network's (dense sampling as the oracle)."""
    m = InPlaceNet().eval()

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = m

        def forward(self, x):
            return self.net.plain(x)
    plain = Plain()
    g = torch.Generator().manual_seed(2)
    a, b = 2 * torch.randn(4, 3, generator=g), 2 * torch.randn(4, 3, generator=g)
    res = path_crossings(m, a, b, evaluator=evaluator)
    for i, p in enumerate(res.paths):
        want = dense_count(plain, lambda t, i=i: a[i].double() + t[:, None] * (b[i] - a[i]).double())
        assert list(p.per_layer.values()) == list(want.values())
    assert sum(p.crossings for p in res.paths) > 10
    x = torch.randn(2, 3, generator=g)
    acts = site_activations(m, x, layer="act.relu")
    at_site = path_crossings(m, acts, acts.flip(0) + 0.1, layer="act.relu", inputs=x, evaluator=evaluator)
    ref = path_crossings(plain, acts, acts.flip(0) + 0.1, layer="relu", inputs=x, evaluator=evaluator)
    assert [list(p.per_layer.values()) for p in at_site.paths] == [list(p.per_layer.values()) for p in ref.paths]


class _InPlaceInputNet(nn.Module):
    """``x.relu_()`` on the model's own input, then Linear, LeakyReLU, Linear, ReLU; ``in_place=False``: the same
    network with ``torch.relu(x)``."""

    def __init__(self, in_place: bool):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.l0, self.l1, self.in_place = _init(nn.Linear(6, 10), g), _init(nn.Linear(10, 6), g), in_place

    def forward(self, x):
        h = x.relu_() if self.in_place else torch.relu(x)
        return F.relu(self.l1(F.leaky_relu(self.l0(h), 0.1)))


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_a_model_that_writes_into_its_input_does_not_move_the_path(evaluator):
    """Found by a tester at stop 30: the engine's first pass fed the model a view of the first path's start, and
    ``x.relu_()`` there turned the path into relu(a) -> b. Every evaluator must count what the out-of-place network
    counts (dense sampling as the oracle), and the caller's tensors stay as they were."""
    g = torch.Generator().manual_seed(4)
    a, b = 2 * torch.randn(3, 6, generator=g, dtype=torch.float64), 2 * torch.randn(3, 6, generator=g,
                                                                                  dtype=torch.float64)
    a0, b0 = a.clone(), b.clone()
    res = path_crossings(_InPlaceInputNet(True), a, b, evaluator=evaluator)
    plain = _InPlaceInputNet(False)
    ref = path_crossings(plain, a, b, evaluator="graph")
    for i, (p, q) in enumerate(zip(res.paths, ref.paths)):
        want = dense_count(plain, lambda t, i=i: a0[i] + t[:, None] * (b0[i] - a0[i]))
        assert list(p.per_layer.values()) == list(want.values()), i
        np.testing.assert_allclose(p.records["t"], q.records["t"], rtol=0, atol=1e-12)  # the same path
    assert torch.equal(a, a0) and torch.equal(b, b0)


class _ZeroThroughAClamp(nn.Module):
    """ReLU, a bias-free sparse Linear, a clamp whose 0 lies inside its middle piece, a bias-free sparse Linear,
    LeakyReLU: where the ReLU units a clamp unit reads are off it is exactly 0, and so is a LeakyReLU unit reading
    only such clamp units, on its kink over an interval."""

    def __init__(self, mid: str):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.l0, self.l1, self.out = nn.Linear(4, 6, bias=False), nn.Linear(6, 6, bias=False), nn.Linear(6, 2)
        self.mid = mid
        with torch.no_grad():
            for lin in (self.l0, self.l1):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g)
                                 * (torch.rand(lin.weight.shape, generator=g) < 0.4))

    def forward(self, x):
        h = F.relu(x)
        h = torch.clamp(self.l0(h), -0.3, 0.7) if self.mid == "clamp" else F.hardtanh(self.l0(h), -0.5, 1.0)
        return self.out(F.leaky_relu(self.l1(h), 0.1))


@pytest.mark.parametrize("mid", ["clamp", "hardtanh"])
def test_exact_zeros_pass_through_a_clamp_on_the_affine_route(mid):
    """Found by a tester at stop 30: the LeakyReLU reads the clamp's outputs alone with a zero constant, so its inputs
    came from products at every point, but the clamp's own came from closed-form bends, which left +-1e-17 at the
    ReLU's breakpoints where the exact value is 0: two crossings of a unit that sits on its kink were counted. Sites
    such a product reads now get products too. Oracles: dense sampling and the graph route."""
    net = _ZeroThroughAClamp(mid)
    g = torch.Generator().manual_seed(1003)
    a, b = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g)
    want = dense_count(net, lambda t: a[0].double() + t[:, None] * (b[0] - a[0]).double())
    graph = path_crossings(net, a, b, evaluator="graph").paths[0]
    for evaluator in ("affine", "auto"):
        p = path_crossings(net, a, b, evaluator=evaluator).paths[0]
        assert p.per_layer == want == graph.per_layer, evaluator
        np.testing.assert_allclose(p.records["t"], graph.records["t"], rtol=0, atol=1e-12)


class TorchvisionStyleResNet(nn.Module):
    """torchvision's ResNet idioms at toy size: ``nn.ReLU(inplace=True)`` modules called twice per block, ``out +=
    identity``, a strided 1x1 downsample, MaxPool2d(3, 2, 1), adaptive average pooling, BatchNorm in eval."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            out += identity
            return self.relu(out)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2 = self.Block(4, 4, 1), self.Block(4, 6, 2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(6, 5)
        with torch.no_grad():
            for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.2)
        self.eval()

    def forward(self, x):
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_torchvision_style_resnet_equals_sampling(evaluator):
    m = TorchvisionStyleResNet()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    res = path_crossings(m, x[:1], x[1:], evaluator=evaluator)
    want = dense_count(m, lambda t: x[:1].double() + t.reshape(-1, 1, 1, 1) * (x[1] - x[0]).double())
    assert res.paths[0].per_layer == want and res.paths[0].crossings > 100


class _InPlaceTwice(nn.Module):
    """One in-place ReLU module run twice (a residual add in place between), max pooling, two sites reading one
    tensor, the batch size read at the end (a reviewer's model, stop 25)."""

    def __init__(self, c=4):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.bn1 = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.c2, self.c3 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(2 * c, c, 3, padding=1)
        self.pool, self.r6, self.ht = nn.MaxPool2d(2), nn.ReLU6(), nn.Hardtanh(-0.3, 0.4)
        self.fc = nn.Linear(c * 4 * 4, 5)
        with torch.no_grad():
            self.bn1.running_mean.normal_(0, 0.2)
            self.bn1.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x):
        h = self.relu(self.bn1(self.c1(x)))
        r = self.c2(h)
        r += h
        a = self.relu(r)
        z = self.c3(torch.cat([self.pool(a), self.pool(h)], 1))
        z = self.r6(z) + self.ht(z)
        return self.fc(z.view(x.size(0), -1))


def test_graph_route_in_pieces_places_crossings_after_an_in_place_site():
    """Found by a reviewer at stop 25 (older than it): on the graph route, a pass that runs the network before an
    in-place site on the interval ends only (``SharedPrefix(at=...)``) copied the points' replacement into the
    ends' input tensor when the two happened to have as many rows, so later reads of it were wrong; the path in 16
    pieces placed crossings up to 0.0075 away in t. Oracle: the frontier route on the whole path (and counts)."""
    g = torch.Generator().manual_seed(3)
    m = _InPlaceTwice()
    a, b = 2 * torch.randn(1, 1, 8, 8, generator=g), 2 * torch.randn(1, 1, 8, 8, generator=g)
    whole = path_crossings(m, a, b, evaluator="frontier").paths[0]
    pieces = path_crossings(m, a, b, evaluator="graph", memory_budget=1 << 20).paths[0]
    assert whole.crossings > 300
    _same_records(whole, pieces, atol=1e-10)


def test_frontier_keeps_a_hooked_activation_modules_own_call():
    """A forward hook that changes an activation module's output (found by a reviewer at stop 25): the appended
    frontier's clamp sites write ``torch.clamp`` themselves, which would skip the hook; a hooked module (or a global
    hook) keeps its own call. Oracle: the graph route, whose forward passes run the hooks."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2)).double()
    m[1].register_forward_hook(lambda mod, args, out: out * 3 - 0.2)
    g = torch.Generator().manual_seed(1)
    a, b = 3 * torch.randn(4, 3, generator=g), 3 * torch.randn(4, 3, generator=g)
    graph, front = path_crossings(m, a, b, evaluator="graph"), path_crossings(m, a, b, evaluator="frontier")
    assert sum(p.crossings for p in front.paths) > 20
    for p, q in zip(graph.paths, front.paths):
        _same_records(p, q)


@pytest.mark.parametrize("append", [True, False])
def test_frontier_evaluator_equals_the_graph_route_and_sampling(monkeypatch, append):
    """The frontier evaluator (every point advances site by site through the model's FX graph, new breakpoints'
    values interpolated): records equal the graph route's and dense sampling's where a crossing unit's output ties
    with max-pool entries (PoolNet), with in-place sites whose results are ignored (InPlaceNet: the later nodes read
    what they wrote), with the batch size read before the sites (BatchSizeNet), with units= of the last site,
    refined in pieces under a small budget (each pass runs only the nodes between two sites), and for paths and rays
    at a site (in place, in a residual block). Both with new points appended (clamp sites writing old and new rows
    into one array, taken here) and merged into path order."""
    import polytope_lens.paths.frontier as frontier
    monkeypatch.setattr(frontier, "APPEND_NEW_POINTS", append)
    clamped = []
    real_clamp_rows = frontier.FrontierState._clamp_rows

    def clamp_rows(self, i, node):
        done = real_clamp_rows(self, i, node)
        clamped.append(done)
        return done
    monkeypatch.setattr(frontier.FrontierState, "_clamp_rows", clamp_rows)
    g = torch.Generator().manual_seed(5)
    net = PoolNet()
    a, b = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    graph, front = path_crossings(net, a, b, evaluator="graph"), path_crossings(net, a, b, evaluator="frontier")
    assert "frontier" in front.notes[-1]
    for i, (p, q) in enumerate(zip(graph.paths, front.paths)):
        _same_records(p, q)
        assert q.per_layer == dense_count(net, lambda t, i=i: a[i:i + 1].double() + t.reshape(-1, 1, 1, 1)
                                          * (b[i] - a[i]).double())
        assert (p.trace.top_class == q.trace.top_class).all()
    m = InPlaceNet().eval()
    a2, b2 = 2 * torch.randn(4, 3, generator=g), 2 * torch.randn(4, 3, generator=g)
    for p, q in zip(path_crossings(m, a2, b2, evaluator="graph").paths,
                    path_crossings(m, a2, b2, evaluator="frontier").paths):
        _same_records(p, q)
    bs = BatchSizeNet()
    a3, b3 = 3 * torch.randn(3, 4, generator=g), 3 * torch.randn(3, 4, generator=g)
    for p, q in zip(path_crossings(bs, a3, b3, evaluator="graph").paths,
                    path_crossings(bs, a3, b3, evaluator="frontier").paths):
        _same_records(p, q)
    cnn = SmallCNN(seed=2)
    x0, x1 = 4 * torch.randn(1, 1, 6, 6, generator=g), 4 * torch.randn(1, 1, 6, 6, generator=g)
    whole = path_crossings(cnn, x0, x1, evaluator="graph", units=[0, 3, 4])
    segments = []
    real_advance = frontier.FrontierState._advance

    def advance(self, stop):
        segments.append((self.next, stop))
        return real_advance(self, stop)
    monkeypatch.setattr(frontier.FrontierState, "_advance", advance)
    pieces = path_crossings(cnn, x0, x1, evaluator="frontier", units=[0, 3, 4], memory_budget=1 << 20)
    _same_records(whole.paths[0], pieces.paths[0])
    # every node runs once per chunk or piece: passes pick up where the last one stopped
    assert segments and all(s == 0 or s == prev_stop for (s, _), (_, prev_stop) in zip(segments[1:], segments))
    # paths and rays at a site: an in-place ReLU in a residual block (the network before it runs once per path), and
    # an in-place site whose result is ignored (what it wrote is read after it)
    res = TorchvisionStyleResNet()
    x = torch.randn(2, 3, 8, 8, generator=g)
    site = "layer1.relu.relu"
    acts = site_activations(res, x, layer=site)
    crossed = 0
    for r1, r2 in [(ray_crossings(res, x, layer=site, alphas=(0.5, 4.0), evaluator="graph"),
                    ray_crossings(res, x, layer=site, alphas=(0.5, 4.0), evaluator="frontier")),
                   (path_crossings(res, acts, acts.roll(1, 0), layer=site, inputs=x, evaluator="graph"),
                    path_crossings(res, acts, acts.roll(1, 0), layer=site, inputs=x, evaluator="frontier"))]:
        assert "frontier" in r2.notes[-1]
        crossed += sum(p.crossings for p in r2.paths)
        for p, q in zip(r1.paths, r2.paths):
            _same_records(p, q)
            assert (p.trace.top_class == q.trace.top_class).all()
    assert crossed > 10
    # polylines: the knots are points from the start
    corners = torch.randn(2, 4, 1, 8, 8, generator=g)
    for p, q in zip(polyline_crossings(net, corners, evaluator="graph").paths,
                    polyline_crossings(net, corners, evaluator="frontier").paths):
        _same_records(p, q)
    # real inputs given as keyword tensors ({"x": ...}, as data bundles encode them)
    for p, q in zip(ray_crossings(res, {"x": x}, layer=site, alphas=(0.5, 4.0), evaluator="graph").paths,
                    ray_crossings(res, {"x": x}, layer=site, alphas=(0.5, 4.0), evaluator="frontier").paths):
        _same_records(p, q)
    xi = torch.randn(2, 3, generator=g)
    at = site_activations(m, xi, layer="act.relu")
    for p, q in zip(path_crossings(m, at, at.flip(0) + 0.1, layer="act.relu", inputs=xi, evaluator="graph").paths,
                    path_crossings(m, at, at.flip(0) + 0.1, layer="act.relu", inputs=xi,
                                   evaluator="frontier").paths):
        _same_records(p, q)
    assert (sum(clamped) > 10) == append  # merged into path order, nothing waits: never asked


class _ResidualInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        y = self.l2(h)
        y += h  # an in-place add on a tensor nothing else reads: allowed
        h.mul_(2.0)  # h is read again below: not allowed
        return torch.relu(y) + h


def test_frontier_evaluator_refuses_what_it_cannot_follow():
    """A one-line error naming the reason: a custom forward, an in-place change of a tensor another node reads, and
    a model FX cannot trace (its control flow reads values)."""
    mlp = MLP(4, 8, 2, seed=1)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(InvalidInputError, match="a custom forward function"):
        path_crossings(mlp, a, b, evaluator="frontier", forward=lambda m: (lambda x: m(x)))
    with pytest.raises(InvalidInputError, match="in-place operation on a tensor read elsewhere"):
        path_crossings(_ResidualInPlace(), torch.randn(2, 3), torch.randn(2, 3), evaluator="frontier")

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.l1(x))
            return h if h.shape[0] > 0 else -h  # control flow on a size: no kink, but FX cannot follow it
    with pytest.raises(InvalidInputError, match="torch.fx cannot trace"):
        path_crossings(Branchy(), a, b, evaluator="frontier")


class BatchSizeNet(nn.Module):
    """Reads the batch size before its sites and reshapes with it after them (as EfficientNet's head does)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.l1, self.l2, self.l3 = _init(nn.Linear(4, 10), g), _init(nn.Linear(10, 10), g), _init(nn.Linear(10, 3), g)

    def forward(self, x):
        bs = x.size(0)
        h = torch.relu(self.l2(torch.relu(self.l1(x))))
        return self.l3(h.view(bs, -1))


def test_shared_prefix_is_used_only_where_it_reproduces_the_model():
    """The once-per-path prefix is checked on each model: kept for a residual MLP and for a model without class
    scores, refused for a model that reads the batch size early (which would break), and both give the per-point
    forward's counts."""
    from polytope_lens.paths.geometry import PathSpec
    from polytope_lens.capture import default_forward
    from polytope_lens.paths.runner import Runner

    def runner(model, x, site):
        a = torch.relu(torch.randn(2, 10, dtype=torch.float64))
        spec = PathSpec(torch.tensor([[0.0, 1.0]] * 2, dtype=torch.float64), torch.stack([a, 2 * a], 1),
                        torch.ones(2, dtype=torch.float64), "segment", site, x.double())
        model = copy.deepcopy(model).double()
        return Runner(model, default_forward(model), spec, dtype=torch.float64, device="cpu",
                      memory_budget=1 << 30, capture_kwargs={}, owner="test", probe_input=x[:1].double())

    class Encoder(nn.Module):  # no class scores, like a text encoder's hidden states
        def __init__(self):
            super().__init__()
            self.mlp = MLP(4, 10, 2, residual=True, seed=3)

        def forward(self, x):
            return {"hidden": self.mlp(x)}

    net, mlp = BatchSizeNet(), MLP(4, 10, 2, residual=True, seed=3)
    x = torch.randn(2, 4)
    assert runner(mlp, x, "relu").share_prefix
    assert not runner(net, x, "relu").share_prefix
    # the check compares the output only where there is one (before: a model without class scores always failed it,
    # so MiniLM paths ran the whole encoder once per point)
    assert runner(Encoder(), x, "mlp.relu").share_prefix
    rays = ray_crossings(net, x, layer="relu", alphas=(0.0, 3.0), evaluator="graph")
    act = torch.relu(net.l1(x)).double()
    for i, p in enumerate(rays.paths):
        want = dense_count(net, lambda t, i=i: (3.0 * t)[:, None] * act[i], site="relu", base=x[i:i + 1].double())
        assert p.per_layer == {k: v for k, v in want.items() if k in rays.sites}


def test_the_network_before_a_paths_site_is_replayed_with_the_same_results(monkeypatch):
    """Paths and rays at a site of a residual CNN on the graph route: the network before the site is recorded once per
    set of paths and replayed (``PrefixReplay``), checked on each model; records, breakpoints and traces equal those
    of runs that compute it every time, to the bit. A model that reads its batch size early keeps neither shortcut,
    and a recording evicted for the budget is made again."""
    from polytope_lens.paths import runner as runner_mod

    made = []
    real_for = runner_mod.Runner._replay_for

    def replay_for(self, paths):
        rp = real_for(self, paths)
        if rp is not None:
            made.append(not rp.recorded)  # a recording is made
        return rp
    m = TorchvisionStyleResNet()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, 8, generator=g)
    site = "layer1.relu.relu"  # in place, in a block whose residual add reads a tensor made before it

    def analyses():
        rays = ray_crossings(m, x, layer=site, alphas=(0.5, 2.0), evaluator="graph")
        a = site_activations(m, x, layer=site)
        return rays, path_crossings(m, a, a.roll(1, 0), layer=site, inputs=x, evaluator="graph")

    def same(r1, r2):
        for p, q in zip(r1.paths, r2.paths):
            assert p.per_layer == q.per_layer and np.array_equal(p.t, q.t)
            assert all(np.array_equal(p.records[k], q.records[k]) for k in p.records)
            assert np.array_equal(p.trace.top_prob, q.trace.top_prob) and np.array_equal(p.trace.js, q.trace.js)

    monkeypatch.setattr(runner_mod.Runner, "_replay_for", replay_for)
    with_replay = analyses()
    assert True in made and made.count(False) > made.count(True)  # recorded a few times, replayed more often
    monkeypatch.setattr(runner_mod.Runner, "_replay_for", lambda self, paths: None)
    without = analyses()
    for r1, r2 in zip(with_replay, without):
        same(r1, r2)
    # no room for any recording: each pass records (and computes) again, same results
    made.clear()
    monkeypatch.setattr(runner_mod.Runner, "_replay_for", replay_for)
    monkeypatch.setattr(runner_mod, "REPLAY_SHARE", 1 << 40)
    same(ray_crossings(m, x, layer=site, alphas=(0.5, 2.0), evaluator="graph"), without[0])
    assert made and all(made)
    net = BatchSizeNet()
    rays = ray_crossings(net, torch.randn(2, 4), layer="relu", alphas=(0.0, 3.0), evaluator="graph")
    assert rays.exact


class PoolNet(nn.Module):
    """ReLU then max pooling: windows of clamped zeros that a crossing unit leaves exactly at its kink."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = _init(nn.Conv2d(1, 4, 3, padding=1), g, 0.3)
        self.c2 = _init(nn.Conv2d(4, 4, 3, padding=1), g, 0.3)
        self.head = _init(nn.Linear(4 * 4 * 4, 3), g)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.head(torch.relu(self.c2(h)).flatten(1))


def _same_records(p, q, atol=1e-12):
    assert p.per_layer == q.per_layer and p.ties == q.ties
    op = np.lexsort((p.records["t"], p.records["unit"], p.records["site"]))
    oq = np.lexsort((q.records["t"], q.records["unit"], q.records["site"]))
    for f in ("site", "unit", "piece"):
        assert (p.records[f][op] == q.records[f][oq]).all()
    np.testing.assert_allclose(p.records["t"][op], q.records["t"][oq], rtol=0, atol=atol)


def test_graph_route_places_max_pool_crossings_exactly():
    """A unit that crosses its ReLU kink makes a breakpoint where its output is exactly 0, tied with the zeros in its
    pooling window; the graph route takes the site's output there from the interpolated unit inputs (kink exact),
    as the affine route does, so rounding cannot move or drop the pool's crossing (before: one path counted 71 of
    72 and placed crossings up to a whole interval early). Records equal the affine route's and dense sampling."""
    net = PoolNet()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    graph, affine = path_crossings(net, a, b, evaluator="graph"), path_crossings(net, a, b, evaluator="affine")
    for i, (p, q) in enumerate(zip(graph.paths, affine.paths)):
        _same_records(p, q)
        assert p.per_layer == dense_count(net, lambda t, i=i: a[i:i + 1].double() + t.reshape(-1, 1, 1, 1)
                                          * (b[i] - a[i]).double())


class TwinPool(nn.Module):
    """Max pooling over pairs of entries that are equal in exact arithmetic but rounded differently (h and
    (0.3 h) / 0.3), as a uniform image region's neighbouring positions can be."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = _init(nn.Linear(3, 16), g)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        pair = torch.stack([h, (h * 0.3) / 0.3], -1)[:, :, None, :]
        return F.max_pool2d(pair, (1, 2)).flatten(1)


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_rounding_between_equal_pool_entries_is_not_a_crossing(evaluator):
    """A pool over two entries that are equal in exact arithmetic never changes its maximum (the first entry); the
    ReLU crossings are the hand count (units whose input changes sign between the ends). Before the pool's tie
    tolerance the graph route counted 122 pool crossings on these 20 paths, all from rounding."""
    m = TwinPool()
    g = torch.Generator().manual_seed(1)
    a, b = 3 * torch.randn(20, 3, generator=g), 3 * torch.randn(20, 3, generator=g)
    res = path_crossings(m, a, b, evaluator=evaluator)
    with torch.no_grad():
        hand = ((m.lin(a) > 0) != (m.lin(b) > 0)).sum(1)
    assert [p.per_layer for p in res.paths] == [{"relu": int(h), "max_pool2d": 0} for h in hand]
    assert res.tolerance == {"tie_tol": 1e-12, "value_tol": 1e-9}  # both stated on the result


def test_graph_route_runs_the_pass_before_a_site_on_fewer_rows(monkeypatch):
    """New breakpoints are evaluated from the site that made them: the pass before it runs on one row when nothing
    after it reads that part (a plain chain), at the ends of the points' intervals when a residual branch does, and
    once per point for a model that reads the batch size early; each way is checked once per site, and the records
    equal the affine route's (or, for that model, dense sampling's)."""
    import polytope_lens.paths.exact as exact
    chosen = []
    real = exact.Refiner._check_reduction
    monkeypatch.setattr(exact.Refiner, "_check_reduction", lambda self, ev: chosen.append(real(self, ev)) or chosen[-1])
    g = torch.Generator().manual_seed(2)
    a, b = 2 * torch.randn(3, 6, generator=g), 2 * torch.randn(3, 6, generator=g)
    for model, ways in ((MLP(6, 24, 3, seed=1), {"one row"}), (MLP(6, 24, 2, residual=True, seed=2), {"ends"})):
        chosen.clear()
        graph, affine = path_crossings(model, a, b, evaluator="graph"), path_crossings(model, a, b, evaluator="affine")
        assert ways <= set(chosen) <= {"one row", "ends"}
        for p, q in zip(graph.paths, affine.paths):
            _same_records(p, q)
    chosen.clear()
    net = BatchSizeNet()
    x0, x1 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    res = path_crossings(net, x0, x1, evaluator="graph")
    assert chosen[0] == "every point"  # the first site's new points: the early batch size breaks any reduction
    for i, p in enumerate(res.paths):
        assert p.per_layer == dense_count(net, lambda t, i=i: x0[i].double() + t[:, None] * (x1[i] - x0[i]).double())


class _ZeroOnAKinkNet(nn.Module):
    """Input unit 0 is ReLU'd and read again by a residual into a ReLU6 whose other term is exactly 0, so once it
    crosses (at t1) the ReLU6's unit 0 sits exactly on its kink; a second layer's units 2..7 cross at t = 0.3 ... 0.8,
    several inside one interval of the first site's breakpoints, so the graph route evaluates them from that
    interval's ends."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.l1 = nn.Linear(2, 8)
        self.out = nn.Linear(2, 3)
        with torch.no_grad():
            self.l1.weight.zero_()
            self.l1.bias.zero_()
            self.l1.weight[0, 1] = -1.0  # input 1 stays positive: unit 0 of l1 stays off, its ReLU at exactly 0
            self.l1.weight[1, 0] = 1.0
            for i in range(2, 8):
                self.l1.weight[i, 1] = 1.0
                self.l1.bias[i] = -(0.3 + 0.1 * i)

    def forward(self, x):
        h = x.relu_() if self.in_place else x.relu()
        s = F.relu(self.l1(h))
        return self.out(F.relu6(s[:, :2] + h))


@pytest.mark.parametrize("in_place", [False, True])
def test_interval_ends_hold_an_earlier_sites_crossed_units_on_their_kinks(in_place):
    """Hand-computed: the ReLU6's unit 0 reaches its kink where input unit 0 crosses zero (t1 = a0 / (a0 - b0)) and
    stays there, so it enters piece 0 at t1. The input is chosen so that a forward pass at t1 leaves a positive
    rounding residue in that unit; the graph route interpolated it from the interval's ends into the second site's
    new points and put the crossing at t = 1. Every evaluator must say t1."""
    a0, b0 = 0.4552667583393064, -0.7219052486795277
    za, zb = torch.tensor(a0, dtype=torch.float64), torch.tensor(b0, dtype=torch.float64)
    t1 = (0 - za) / (zb - za)
    assert float(za + t1 * (zb - za)) > 0  # the residue the case is about
    net = _ZeroOnAKinkNet(in_place)
    a, b = torch.tensor([[a0, 0.2]], dtype=torch.float64), torch.tensor([[b0, 1.2]], dtype=torch.float64)
    for kw in ({"evaluator": "graph"}, {"evaluator": "frontier"}, {"evaluator": "affine"}):
        p = path_crossings(net, a, b, **kw).paths[0]
        rec = p.records
        assert p.per_layer == {"relu": 1, "relu#1": 7, "relu6": 1}, kw
        at6 = rec["site"] == 2
        assert rec["t"][at6].tolist() == pytest.approx([float(t1)], abs=1e-15), kw
        assert rec["piece"][at6].tolist() == [0], kw


def test_polyline_is_the_sum_of_its_segments():
    """A polyline's crossings are those of its pieces, and density uses its total length."""
    mlp = MLP(4, 16, 2, seed=6)
    pts = torch.randn(2, 3, 4)
    res = polyline_crossings(mlp, pts)
    s1 = path_crossings(mlp, pts[:, 0], pts[:, 1])
    s2 = path_crossings(mlp, pts[:, 1], pts[:, 2])
    assert res.counts.tolist() == (s1.counts + s2.counts).tolist()
    length = (pts[:, 1:] - pts[:, :-1]).norm(dim=2).sum(1)
    assert res.paths[0].length == pytest.approx(float(length[0]))


# ------------------------------------------------------------------------------------------------- ties
@pytest.fixture(params=["bends", "appended"])
def route(request, monkeypatch):
    """The CPU's affine route (closed-form bends) and the GPU's (products at every point, appended layout)."""
    if request.param == "appended":
        import polytope_lens.paths.exact as exact
        monkeypatch.setattr(exact, "PRODUCTS_AT_EVERY_POINT", {"cpu"})
    return request.param


def test_hand_computed_tie(route):
    """Two units with the same kink position on the path make one tied breakpoint and two crossings."""
    lin = nn.Linear(1, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [2.0], [-1.0]]))
        lin.bias.copy_(torch.tensor([-0.5, -1.0, 0.25]))
    model = nn.Sequential(lin, nn.ReLU())
    res = path_crossings(model, torch.zeros(1, 1), torch.ones(1, 1))
    p = res.paths[0]
    assert p.crossings == 3 and p.ties == 1
    np.testing.assert_allclose(p.t, [0.0, 0.25, 0.5, 1.0])
    assert sorted(p.records["unit"][p.records["t"] == 0.5].tolist()) == [0, 1]
    assert p.records["piece"].tolist() == [0, 1, 1]  # unit 2 turns off at 0.25; units 0, 1 turn on at 0.5


def test_unit_on_its_kink_at_an_endpoint_is_a_tie(route):
    """A unit exactly at its kink at t=0 that then rises is one crossing at t=0, reported as a tie."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
    p = path_crossings(model, torch.zeros(1, 1), torch.ones(1, 1)).paths[0]
    assert p.crossings == 1 and p.ties == 1 and p.records["t"].tolist() == [0.0]
    np.testing.assert_allclose(p.t, [0.0, 1.0])


def test_a_snapped_crossing_and_a_tie_at_one_site(route):
    """A unit on its kink at t=0 (snapped to the end) and two units crossing together at t=0.5 (one new point), on
    one site, then a second site: 4 crossings at the first, ties at t=0 and t=0.5, one new point."""
    lin, out = nn.Linear(1, 4), nn.Linear(4, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [2.0], [1.0], [-1.0]]))
        lin.bias.copy_(torch.tensor([-0.5, -1.0, 0.0, 0.25]))
        out.weight.copy_(torch.tensor([[1.0, 1.0, -1.0, 1.0]]))
        out.bias.fill_(-0.1)
    model = nn.Sequential(lin, nn.ReLU(), out, nn.ReLU())
    p = path_crossings(model, torch.zeros(1, 1), torch.ones(1, 1)).paths[0]
    first = p.records["site"] == p.records["site"][0]
    assert first.sum() == 4 and p.ties == 2
    assert sorted(p.records["t"][first].tolist()) == [0.0, 0.25, 0.5, 0.5]
    # second site: 2.5 t - 1.5 + ... on each region, checked against dense sampling
    t = torch.linspace(0, 1, 200001, dtype=torch.float64)[:, None]
    z = model.double()[:3](t).squeeze(1)
    want = int(((z[1:] > 0) != (z[:-1] > 0)).sum())
    assert int((~first).sum()) == want


class _Touch(nn.Module):
    """A 1-D path through |x|: the abs site crosses its kink at x = 0 (t = 0.5), where the ReLU units' inputs |x|
    and -|x| touch their kink and turn back (no crossing), and |x| - 0.5 crosses at x = -0.5 and 0.5."""

    def forward(self, x):
        h = torch.abs(x)
        return F.relu(torch.cat([h, h - 0.5, -h], dim=1))


@pytest.mark.parametrize("evaluator", ["auto", "graph", "frontier"])
def test_a_unit_that_touches_its_kink_at_a_breakpoint_does_not_cross(route, evaluator):
    """Hand-computed: a unit that reaches its kink exactly at a breakpoint another site made and turns back changes
    no piece (before stop 25 the lower piece it is given on the kink counted as a detour there, twice)."""
    p = path_crossings(_Touch(), -torch.ones(1, 1), torch.ones(1, 1), evaluator=evaluator).paths[0]
    relu = p.records["site"] == 1
    assert p.per_layer == {"abs": 1, "relu": 2}
    assert p.records["unit"][relu].tolist() == [1, 1] and p.records["t"][relu].tolist() == [0.25, 0.75]
    assert p.records["t"][~relu].tolist() == [0.5] and p.ties == 1  # |x| and -|x| sit on their kink at t = 0.5


@pytest.mark.parametrize("evaluator", ["auto", "graph", "frontier"])
def test_a_touch_on_the_point_two_pieces_of_a_path_share_is_merged_as_within_a_piece(monkeypatch, route, evaluator):
    """The same hand-computed touches with the path split into pieces that meet exactly there (t = 0.5): the
    crossings on the shared point from both pieces are merged as within one piece (a max-pool window through a tie
    too); the oracle is the one-piece run and the hand count."""
    import polytope_lens.paths.exact as exact

    def in_two(self, gpid, max_points, est_points, on_piece=None):
        outs, shared = [], None
        for a, b in [(0.0, 0.5), (0.5, 1.0)]:
            out = self.run_chunk(gpid, (a, b), shared)
            shared = out.pop("last", None)
            outs.append(out)
        return exact._join_pieces(outs)
    whole = path_crossings(_Touch(), -torch.ones(1, 1), torch.ones(1, 1), evaluator=evaluator).paths[0]
    m = _PoolTouch(functools.partial(F.leaky_relu, negative_slope=0.1)).double().eval()
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ray = ray_crossings(m, x, layer="relu", alphas=(-1.0, 1.0), trace=False, evaluator=evaluator).paths[0]
    monkeypatch.setattr(exact.Refiner, "run_path_in_pieces", in_two)
    monkeypatch.setattr(exact, "FRONTIER_SHARE_MAX_POINTS", 1 << 30)
    halves = path_crossings(_Touch(), -torch.ones(1, 1), torch.ones(1, 1), evaluator=evaluator).paths[0]
    assert halves.per_layer == whole.per_layer == {"abs": 1, "relu": 2}
    _same_records(whole, halves)
    ray_halves = ray_crossings(m, x, layer="relu", alphas=(-1.0, 1.0), trace=False, evaluator=evaluator).paths[0]
    assert ray_halves.per_layer == ray.per_layer
    _same_records(ray, ray_halves)


class _Stacked(nn.Module):
    """An activation applied straight to a ReLU's output (its inputs exactly 0 wherever the ReLU is off, on its own
    kink), in a CNN and an MLP."""

    def __init__(self, second, conv=True):
        super().__init__()
        torch.manual_seed(2)
        self.second, self.conv = second, conv
        self.c0 = nn.Conv2d(1, 2, 3, padding=1) if conv else nn.Linear(6, 16)
        self.c1 = nn.Conv2d(2, 2, 3, padding=1) if conv else nn.Linear(16, 8)
        self.fc = nn.Linear(18 if conv else 8, 3)

    def forward(self, x):
        h = self.second(F.relu(self.c0(x)))
        h = self.c1(h)
        return self.fc((F.max_pool2d(h, 2) if self.conv else F.relu(h)).flatten(1))


@pytest.mark.parametrize("second", ["leaky_relu", "abs", "clamp", "scaled relu"])
@pytest.mark.parametrize("conv", [True, False])
def test_an_activation_on_a_relus_output_counts_as_sampling_does(second, conv):
    """Found by a reviewer at stop 25: the affine route's closed-form bends left such inputs at +-1e-17 at the ReLU's
    breakpoints and counted crossings of the second activation that are not there (51 against 37 on the CNN with
    LeakyReLU); its inputs now come from products at every point. Oracle: dense sampling, and the graph route."""
    fn = {"leaky_relu": functools.partial(F.leaky_relu, negative_slope=0.1), "abs": torch.abs,
          "clamp": lambda h: torch.clamp(h, 0.0, 6.0), "scaled relu": lambda h: F.relu(2.0 * h)}[second]
    m = _Stacked(fn, conv).double().eval()
    shape = (1, 1, 6, 6) if conv else (1, 6)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    auto = path_crossings(m, -x, x, trace=False)
    assert "affine" in auto.notes[-1]
    p = auto.paths[0]
    sampled = dense_count(m, lambda t: -x + 2 * t.reshape(-1, *[1] * (x.dim() - 1)) * x)
    two = list(p.per_layer)[:2]  # (sampling's forward passes break the max pool's exact ties by rounding)
    assert {k: p.per_layer[k] for k in two} == {k: sampled[k] for k in two}
    _same_records(p, path_crossings(m, -x, x, trace=False, evaluator="graph").paths[0])
    assert list(p.per_layer.values())[0] == list(p.per_layer.values())[1]  # the second changes with the ReLU


class _Between(nn.Module):
    """A ReLU's output reaching a LeakyReLU through a linear map with nothing added (reviewer, stop 25)."""

    def __init__(self, between):
        super().__init__()
        torch.manual_seed(2)
        self.between = between
        self.c0, self.mix, self.side = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(1, 2, 3)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        h = F.relu(self.c0(x))
        h = {"transpose": lambda: h.transpose(2, 3), "bias-free 1 x 1": lambda: self.mix(h),
             "average pool": lambda: F.avg_pool2d(h, 2, stride=1),
             "upsample": lambda: F.interpolate(h, scale_factor=2, mode="nearest"),
             "concatenation": lambda: torch.cat([h[:, :, 1:-1, 1:-1], self.side(x)], 1)}[self.between]()
        return self.fc(F.leaky_relu(h, 0.1).flatten(1))


@pytest.mark.parametrize("between", ["transpose", "bias-free 1 x 1", "average pool", "upsample", "concatenation"])
def test_an_activation_on_a_linear_image_of_a_relus_output_counts_as_sampling_does(between):
    """The same fault as above through any linear map with nothing added, or for the units of a concatenation
    that come from the ReLU alone: those inputs sit on the LeakyReLU's kink wherever the units they read are off.
    Oracle: dense sampling and the graph route."""
    m = _Between(between).double()
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m(x)  # the lazy layer's shape
    m.eval()
    p = path_crossings(m, -x, x, trace=False).paths[0]
    assert p.per_layer == dense_count(m, lambda t: -x + 2 * t.reshape(-1, 1, 1, 1) * x)
    _same_records(p, path_crossings(m, -x, x, trace=False, evaluator="graph").paths[0])


def test_site_path_at_an_in_place_site_in_pieces_on_the_graph_route():
    """Reviewer, stop 25: paths at an in-place site, graph route in pieces: a replayed pass returns the recording's
    tensors, and the path's points copied into the in-place site's input overwrote unit inputs an earlier pass had
    returned (views of them). Oracle: the frontier route and dense sampling."""
    m = _InPlaceTwice().double()
    g = torch.Generator().manual_seed(3)
    base = 2 * torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        hs = torch.relu(m.bn1(m.c1(base)))
    a, b = hs, hs.roll(1, 0) * 1.5
    front = path_crossings(m, a, b, layer="relu.relu", inputs=base, evaluator="frontier")
    pieces = path_crossings(m, a, b, layer="relu.relu", inputs=base, evaluator="graph", memory_budget=1 << 20)
    for i, (p, q) in enumerate(zip(front.paths, pieces.paths)):
        _same_records(p, q, atol=1e-10)
    assert front.paths[0].per_layer == dense_count(m, lambda t: a[:1] + t.reshape(-1, 1, 1, 1) * (b[:1] - a[:1]),
                                                   site="relu.relu", base=base[:1], n_max=2 ** 14)


class _PoolTouch(nn.Module):
    """A ray alpha * a at a ReLU output through alpha = 0: |alpha a| (or LeakyReLU), a convolution and 2 x 2 max
    pooling, whose window entries are c + |alpha| g_i: all equal at alpha = 0, the same line on both sides of it (a
    V; with LeakyReLU c + 0.1 alpha g_i before and c + alpha g_i after, whose maxima differ)."""

    def __init__(self, bend):
        super().__init__()
        self.bend = bend
        torch.manual_seed(0)
        self.c0, self.c1 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(18, 3)

    def forward(self, x):
        h = self.bend(F.relu(self.c0(x)))
        return self.fc(F.max_pool2d(self.c1(h), 2).flatten(1))


@pytest.mark.parametrize("evaluator", ["auto", "graph", "frontier"])
@pytest.mark.parametrize("bend", ["abs", "leaky_relu"])
def test_a_pool_window_through_a_tie_of_all_its_entries_changes_once_at_most(evaluator, bend):
    """Brute force: where all of a window's entries meet at a breakpoint, the window changes piece there iff its first
    maximum just before differs from the one just after (found by forward passes at alpha = +-1e-6); before stop 25
    every such window counted a detour through its first entry (2 crossings where there are 0 or 1)."""
    bend = torch.abs if bend == "abs" else functools.partial(F.leaky_relu, negative_slope=0.1)
    m = _PoolTouch(bend).double().eval()
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for alphas in [(-1.0, 1.0), (-0.7, 1.3)]:
        p = ray_crossings(m, x, layer="relu", alphas=alphas, trace=False, evaluator=evaluator).paths[0]
        with torch.no_grad():
            a = F.relu(m.c0(x))

            def first_max(alpha):
                w = F.unfold(m.c1(bend(alpha * a)), 2, stride=2).view(2, 4, -1)
                return w.argmax(1).flatten()
        changed = (first_max(-1e-6) != first_max(1e-6)).nonzero().flatten().tolist()
        pool = p.records["site"] == 1
        at_zero = pool & (np.abs(p.records["t"] - p.records["t"][~pool][0]) < 1e-12)
        assert sorted(p.records["unit"][at_zero].tolist()) == changed
        assert len(changed) > 3 if bend is not torch.abs else not changed
        assert p.records["site"].tolist().count(0) == int((a > 0).sum())


# ------------------------------------------------------------------------------------- methods and trace
def test_smooth_and_layernorm_models_are_refused_in_exact_and_sampled_in_auto():
    """GELU and LayerNorm are not piecewise linear: exact raises, auto samples and says so."""
    gelu = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2))
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(NotPiecewiseLinearError, match="smooth activation"):
        path_crossings(gelu, a, b, method="exact")
    r = path_crossings(gelu, a, b, n_samples=256)
    assert not r.exact and r.method == "sampled" and "smooth" in r.notes[0]
    ln = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(NotPiecewiseLinearError, match="not piecewise-linear"):
        path_crossings(ln, a, b, method="exact")
    assert path_crossings(ln, a, b, n_samples=256).method == "sampled"


def test_sampled_mode_matches_exact_on_a_relu_net():
    """On a piecewise-linear net, sampling finely finds the exact crossings (within its tolerance)."""
    mlp = MLP(4, 10, 2, seed=8)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    ex = path_crossings(mlp, a, b)
    sm = path_crossings(mlp, a, b, method="sampled", n_samples=4096, tol=1e-11)
    assert sm.tolerance == {"tol": 1e-11, "n_samples": 4096}
    assert sm.counts.tolist() == ex.counts.tolist()
    np.testing.assert_allclose(sm.paths[0].records["t"], ex.paths[0].records["t"], atol=1e-10)


def _unit_input(net, a, b, i, site, unit, t):
    """Input of ``unit`` at GELU site 0 or 1 of a Linear-GELU-Linear-GELU net, at t on the segment a[i] -> b[i]."""
    x = a[i] + t * (b[i] - a[i])
    with torch.no_grad():
        z = net[0](x)
        if site == 1:
            z = net[2](net[1](z))
    return float(z[unit])


@pytest.mark.parametrize("tol", [1e-6, 1e-12])
def test_sampled_positions_on_a_gelu_net_equal_brentq_roots(tol):
    """Sampled mode on a smooth net: every record lies within ``tol`` of the root of its unit's input minus the
    threshold (scipy's brentq on the float64 net, an independent root finder), in the sample interval where the
    code changed, and enters the piece on the far side; the counts equal the sign changes between samples."""
    from scipy.optimize import brentq

    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 12), nn.GELU(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 2)).double()
    a, b = 2 * torch.randn(2, 3, dtype=torch.float64), 2 * torch.randn(2, 3, dtype=torch.float64)
    res = path_crossings(net, a, b, n_samples=64, tol=tol)
    assert res.method == "sampled" and not res.exact

    grid = np.linspace(0.0, 1.0, 65)
    for i, p in enumerate(res.paths):
        want = 0
        for site in (0, 1):
            zs = np.array([[_unit_input(net, a, b, i, site, u, t) for u in range(12)] for t in grid])
            want += int(((zs[:-1] > 0) != (zs[1:] > 0)).sum())
        assert p.crossings == want
        for t, site, unit, piece in zip(p.records["t"], p.records["site"], p.records["unit"], p.records["piece"]):
            k = int(np.searchsorted(grid, t)) - 1
            root = brentq(lambda s: _unit_input(net, a, b, i, site, unit, s), grid[k], grid[k + 1], xtol=1e-15,
                          rtol=1e-15)
            assert abs(t - root) <= tol
            assert piece == int(_unit_input(net, a, b, i, site, unit, grid[k + 1]) > 0)


@pytest.mark.parametrize("tol", [2e-2, 1e-6, 1e-12])
def test_brackets_sharing_an_interval_are_narrowed_by_shared_sub_samples(monkeypatch, tol):
    """Many units changing in one sample interval (64-wide GELU layers, 4 samples) are narrowed together by
    sub-samples of the interval: every record still has its unit's input cross its threshold within ``tol``
    (the float64 net evaluated directly on both sides), enters the piece found just past it, and the counts, sites,
    units and pieces equal the one-bracket-at-a-time run's, which runs the net at more points (at a coarse ``tol``,
    one shared round places every crossing: less than half the points)."""
    import polytope_lens.paths.sampled as sampled_mod
    from polytope_lens.paths.runner import Runner
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 2)).double()
    a, b = 3 * torch.randn(2, 3, dtype=torch.float64), 3 * torch.randn(2, 3, dtype=torch.float64)
    rows = []  # points at which the net was run
    real_batches, real_points = Runner.eval_point_batches, Runner.eval_points

    def batches(self, pid, *args, **kw):
        rows.append(len(pid))
        yield from real_batches(self, pid, *args, **kw)

    def points(self, pid, *args, **kw):
        rows.append(len(pid))
        return real_points(self, pid, *args, **kw)
    monkeypatch.setattr(Runner, "eval_point_batches", batches)
    monkeypatch.setattr(Runner, "eval_points", points)
    shared = path_crossings(net, a, b, n_samples=4, tol=tol)
    shared_rows, rows[:] = sum(rows), []

    for i, p in enumerate(shared.paths):
        assert p.crossings > 20
        for t, site, unit, piece in zip(p.records["t"], p.records["site"], p.records["unit"], p.records["piece"]):
            below, above = (_unit_input(net, a, b, i, site, unit, t + d) for d in (-tol, tol))
            assert (below > 0) != (above > 0) or 0.0 in (below, above)
            assert piece == int(above > 0)
    monkeypatch.setattr(sampled_mod, "_SHARED_MIN", 10**9)
    alone = path_crossings(net, a, b, n_samples=4, tol=tol)
    assert alone.counts.tolist() == shared.counts.tolist()
    assert shared_rows < sum(rows) * (0.5 if tol > 1e-2 else 1.0)  # the point of sharing: fewer forward passes
    for p, q in zip(shared.paths, alone.paths):
        order_p = np.lexsort((p.records["unit"], p.records["site"]))
        order_q = np.lexsort((q.records["unit"], q.records["site"]))
        for key in ("site", "unit", "piece"):
            np.testing.assert_array_equal(p.records[key][order_p], q.records[key][order_q])


def test_sampled_mode_holds_one_batch_of_samples_at_a_time(monkeypatch):
    """Sampled mode evaluates the samples batch by batch under the budget and keeps only the sign changes (and the
    last sample of the batch before, for the pair across two batches): with two-row batches under a 1 MiB budget it
    finds the same crossings, positions, pieces and trace as with every sample in one batch."""
    from polytope_lens.paths.runner import Runner
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 3)).double()
    a, b = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    whole = path_crossings(net, a, b, n_samples=32)
    sizes = []
    real = Runner.eval_point_batches

    def batches(self, pid, *args, **kw):
        for rows, o in real(self, pid, *args, **kw):
            sizes.append(rows.stop - rows.start)
            yield rows, o
    monkeypatch.setattr(Runner, "eval_point_batches", batches)
    small = path_crossings(net, a, b, n_samples=32, memory_budget=1 << 20)
    assert max(sizes) <= 2 and len(sizes) > 16 and whole.paths[0].crossings > 100
    for p, q in zip(whole.paths, small.paths):
        assert p.per_layer == q.per_layer
        # both within tol (1e-9) of the root: products over other batch sizes round differently, and the
        # bracketing steps follow the rounding
        np.testing.assert_allclose(p.records["t"], q.records["t"], rtol=0, atol=2e-9)
        assert (p.records["unit"] == q.records["unit"]).all() and (p.records["piece"] == q.records["piece"]).all()
        assert (p.trace.top_class == q.trace.top_class).all()
        np.testing.assert_allclose(p.trace.js, q.trace.js, rtol=1e-6, atol=1e-12)


def test_trace_and_json():
    """The trace has one row per region, class changes at breakpoints, and results serialise to JSON."""
    mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    a, b = torch.randn(3, 2) * 3, torch.randn(3, 2) * 3
    res = path_crossings(mlp, a, b)
    for p in res.paths:
        assert len(p.trace.top_class) == p.n_regions and len(p.trace.js) == p.n_regions - 1
        assert set(p.trace.class_changes.tolist()) <= set(p.t.tolist())
        mids = torch.tensor(0.5 * (p.t[:-1] + p.t[1:]))
        want = mlp((a[p.index] + mids[:, None].float() * (b[p.index] - a[p.index]))).argmax(1)
        assert (want.numpy() == p.trace.top_class).mean() > 0.95
    json.dumps(res.to_dict(records=True))


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
@pytest.mark.parametrize("units", [None, [1, 4, 9]])
def test_trace_is_the_model_at_region_midpoints(evaluator, units):
    """Each region's output is the float64 model's at the region's midpoint: taken from the regions' ends when the
    output is affine on every region, evaluated at the midpoints when units= leaves kinks inside regions."""
    from polytope_lens.paths.results import trace_from_outputs
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    a, b = 3 * torch.randn(2, 3), 3 * torch.randn(2, 3)
    res = path_crossings(mlp, a, b, evaluator=evaluator, units=units)
    m = copy.deepcopy(mlp).double()
    for p in res.paths:
        mids = torch.tensor(0.5 * (p.t[:-1] + p.t[1:]))
        with torch.no_grad():
            out = m(a[p.index].double() + mids[:, None] * (b[p.index].double() - a[p.index].double()))
        want = trace_from_outputs(mids, out, torch.tensor(p.t[1:-1]))
        assert (p.trace.top_class == want.top_class).all()
        np.testing.assert_allclose(p.trace.js, want.js, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("block_elems", [1, 15, 1 << 23])  # 1: blocks of two rows; 15: three rows
def test_traces_of_several_paths_at_once_equal_a_scipy_oracle(block_elems):
    """Top class, changes and Jensen-Shannon divergences of consecutive paths computed in one pass (row blocks that
    overlap by one row) equal scipy's divergence and numpy's argmax path by path; no pair spans two paths."""
    from scipy.spatial.distance import jensenshannon
    from scipy.special import softmax

    from polytope_lens.paths.results import traces_from_outputs
    g = torch.Generator().manual_seed(0)
    counts = [4, 1, 6, 2]
    logits = torch.randn(sum(counts), 5, generator=g, dtype=torch.float64) * 3
    t_at = torch.rand(sum(counts), generator=g, dtype=torch.float64)
    t_between = torch.rand(sum(counts) - len(counts), generator=g, dtype=torch.float64)
    got = traces_from_outputs(t_at, logits, t_between, counts, block_elems=block_elems)
    r0 = b0 = 0
    for c, tr in zip(counts, got):
        z = logits[r0:r0 + c].numpy()
        top = z.argmax(1)
        p = softmax(z, axis=1)
        js = [jensenshannon(p[i], p[i + 1]) ** 2 for i in range(c - 1)]
        np.testing.assert_array_equal(tr.top_class, top)
        np.testing.assert_allclose(tr.top_prob, p.max(1), rtol=1e-12)
        np.testing.assert_allclose(tr.js, js, rtol=1e-9, atol=1e-15)
        np.testing.assert_array_equal(tr.t, t_at[r0:r0 + c].numpy())
        np.testing.assert_array_equal(tr.class_changes, t_between[b0:b0 + c - 1].numpy()[top[1:] != top[:-1]])
        r0, b0 = r0 + c, b0 + c - 1


def test_layers_filter_and_chunking():
    """layers= filters the report; a tiny memory budget chunks the batch and changes nothing."""
    mlp = MLP(6, 16, 2, seed=9)
    a, b = torch.randn(40, 6), torch.randn(40, 6)
    full = path_crossings(mlp, a, b)
    tiny = path_crossings(mlp, a, b, memory_budget=1 << 20, layers="relu#2")
    assert tiny.sites == ("relu#2",)
    assert [p.per_layer["relu#2"] for p in tiny.paths] == [p.per_layer["relu#2"] for p in full.paths]


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_path_list_of_many_chunks_reads_like_a_list(method):
    """The batch's paths (a ``PathList`` of per-chunk arrays, objects made when read) index, slice and iterate like a
    list; ``counts`` and ``per_layer`` (read from the arrays) equal the objects'; chunking changes nothing; the
    result pickles (Ray ships it)."""
    import pickle

    from polytope_lens.paths import PathList
    mlp = MLP(6, 16, 2, seed=9)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 6, generator=g), torch.randn(30, 6, generator=g)
    one = path_crossings(mlp, a, b, method=method)
    many = path_crossings(mlp, a, b, method=method, memory_budget=1 << 20, n_samples=256)
    assert isinstance(many.paths, PathList) and len(many.paths._blocks) > 1 and len(many) == 30
    assert repr(many.paths) == f"PathList(30 paths, {int(many.counts.sum())} crossings)"
    objs = list(many.paths)
    assert [p.index for p in objs] == list(range(30))
    assert many.paths[-1] is objs[-1] and many.paths[3:7] == objs[3:7] and many[5] is objs[5]
    with pytest.raises(IndexError):
        many.paths[30]
    assert many.counts.tolist() == [p.crossings for p in objs] == [len(p.records["t"]) for p in objs]
    assert many.per_layer == {s: sum(p.per_layer[s] for p in objs) for s in many.sites}
    for p in objs:
        assert p.per_layer == {s: int((p.records["site"] == i).sum()) for i, s in enumerate(p.sites)}
        assert np.all(np.diff(p.records["t"]) >= 0) and p.t[0] == 0.0 and p.t[-1] == 1.0
    if method == "exact":  # sampled positions depend on the chunk's samples only through bisection rounding
        for p, q in zip(objs, one.paths):
            assert p.per_layer == q.per_layer and p.ties == q.ties
            np.testing.assert_allclose(p.t, q.t, rtol=0, atol=1e-12)  # products over other rows: rounding
            np.testing.assert_array_equal(p.records["unit"], q.records["unit"])
    back = pickle.loads(pickle.dumps(many))
    assert back.counts.tolist() == many.counts.tolist() and back.paths[4].records["t"].tolist() == \
        objs[4].records["t"].tolist()


def test_a_long_path_is_refined_in_pieces_within_the_budget(monkeypatch):
    """A path with more breakpoints than the budget holds is refined in pieces along t: the crossings (t, unit,
    piece), the counts against Regioncam1D, the ties and the trace equal the one-piece run's."""
    import polytope_lens.paths.exact as exact
    mlp = MLP(8, 256, 4, seed=11)
    g = torch.Generator().manual_seed(3)
    a, b = 3 * torch.randn(2, 8, generator=g), 3 * torch.randn(2, 8, generator=g)
    whole = path_crossings(mlp, a, b)
    assert min(p.crossings for p in whole.paths) > 400
    seen = []
    monkeypatch.setattr(exact, "_JOIN_EVERY", 2)  # pieces joined 2 at a time, runs of them again: several levels
    pieces = path_crossings(mlp, a, b, memory_budget=1 << 20, progress=seen.append)  # ~60 breakpoints per piece
    # progress comes piece by piece (fractions of a path, so a bar moves and can estimate the time left)
    assert len(seen) > 8 and all(0 < f < 1 for f in seen) and math.isclose(sum(seen), 2.0)
    _assert_same_paths(whole, pieces)
    assert [p.crossings for p in pieces.paths] == [mlp.regioncam_count(a[i], b[i]) for i in range(2)]
    cnn = SmallCNN(seed=2)
    x0, x1 = 4 * torch.randn(1, 1, 6, 6, generator=g), 4 * torch.randn(1, 1, 6, 6, generator=g)
    r1, r2 = path_crossings(cnn, x0, x1), path_crossings(cnn, x0, x1, memory_budget=1 << 20)
    assert r1.paths[0].per_layer == r2.paths[0].per_layer and r1.paths[0].ties == r2.paths[0].ties


def _pool_cnn() -> nn.Module:
    """conv-ReLU-max pool-conv-ReLU-linear on 12 x 12 images (weights from torch's seed 4): a small CNN whose paths
    run in many pieces under a 1 MiB budget."""
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


@pytest.mark.parametrize("evaluator", ["graph", "frontier"])
def test_pieces_evaluate_their_shared_ends_once(monkeypatch, evaluator):
    """Consecutive pieces of a path share a point: the later piece takes the earlier one's values there instead of
    evaluating it again (one point per piece, not two, evaluated before the sites' passes; on the frontier route its
    values at every cut and its output), and the crossings and the trace equal the one-piece run's (the oracle) and a
    run that evaluates both ends of every piece."""
    import polytope_lens.paths.exact as exact
    import polytope_lens.paths.frontier as frontier
    import polytope_lens.paths.runner as runner_mod
    g = torch.Generator().manual_seed(3)
    cnn = _pool_cnn()
    x0, x1 = 3 * torch.randn(1, 1, 12, 12, generator=g), 3 * torch.randn(1, 1, 12, 12, generator=g)
    whole = path_crossings(cnn, x0, x1, evaluator=evaluator, verify=False)
    starts, pieces = [], []
    real_eval, real_chunk = runner_mod.Runner.eval_point_batches, exact.Refiner.run_chunk
    real_start = frontier.FrontierProgram.start

    def eval_point_batches(self, pid, t, names, want_output=False, at=None, *args):
        if at is None and evaluator == "graph":  # not a site's pass at its new points: a chunk's first points
            starts.append(len(pid))
        return real_eval(self, pid, t, names, want_output, at, *args)

    def start(self, x, *args, **kwargs):
        if kwargs.get("keep_last"):  # a piece of a path (not the evaluator's own check): the points it starts from
            starts.append(len(x))
        return real_start(self, x, *args, **kwargs)

    def run_chunk(self, gp, t_range=None, first=None):
        pieces.append(first is not None)
        return real_chunk(self, gp, t_range, first if reuse else None)
    monkeypatch.setattr(runner_mod.Runner, "eval_point_batches", eval_point_batches)
    monkeypatch.setattr(exact.Refiner, "run_chunk", run_chunk)
    runs = {}
    for reuse in (True, False):
        path_crossings(cnn, x0, x1, evaluator=evaluator, memory_budget=1 << 20)  # the frontier's own checks
        if evaluator == "frontier":
            monkeypatch.setattr(frontier.FrontierProgram, "start", start)
        starts.clear()
        pieces.clear()
        runs[reuse] = path_crossings(cnn, x0, x1, evaluator=evaluator, verify=False, memory_budget=1 << 20)
        monkeypatch.setattr(frontier.FrontierProgram, "start", real_start)
        assert len(pieces) > 10 and pieces[1:] == [True] * (len(pieces) - 1)
        assert sum(starts) == (len(pieces) + 1 if reuse else 2 * len(pieces))
    if evaluator == "frontier":  # pieces larger than FRONTIER_SHARE_MAX_POINTS evaluate both ends (the copies
        monkeypatch.setattr(exact, "FRONTIER_SHARE_MAX_POINTS", 0)  # sharing costs outweigh one point there)
        reuse, pieces[:] = True, []
        runs["large"] = path_crossings(cnn, x0, x1, evaluator=evaluator, verify=False, memory_budget=1 << 20)
        assert len(pieces) > 10 and not any(pieces)
    for r in runs.values():
        p, q = whole.paths[0], r.paths[0]
        assert p.per_layer == q.per_layer and p.ties == q.ties
        np.testing.assert_allclose(p.records["t"], q.records["t"], rtol=0, atol=1e-12)
        assert (p.records["unit"] == q.records["unit"]).all() and (p.records["piece"] == q.records["piece"]).all()
        assert (p.trace.top_class == q.trace.top_class).all()
        np.testing.assert_allclose(p.trace.js, q.trace.js, rtol=1e-9, atol=1e-14)


def _assert_same_paths(whole, pieces):
    for p, q in zip(whole.paths, pieces.paths):
        assert p.per_layer == q.per_layer and p.ties == q.ties
        np.testing.assert_allclose(p.records["t"], q.records["t"], rtol=0, atol=1e-12)
        assert (p.records["unit"] == q.records["unit"]).all() and (p.records["piece"] == q.records["piece"]).all()
        np.testing.assert_allclose(p.t, q.t, rtol=0, atol=1e-12)
        assert (p.trace.top_class == q.trace.top_class).all()
        assert len(p.trace.class_changes) == len(q.trace.class_changes) > 0  # exact changes from the joined pieces
        np.testing.assert_allclose(p.trace.class_changes, q.trace.class_changes, rtol=0, atol=1e-12)


class _FakePeak:
    """A device's peak-memory meter (``exact.DevicePeak``) on the CPU: each piece reports ``per_point`` bytes per
    point it holds, read from the piece the engine just ran."""

    def __init__(self, per_point: int, held: list):
        self.per_point, self.held = per_point, held

    def start(self) -> None:
        pass

    def peak(self) -> int:
        return self.per_point * self.held[-1]


@pytest.mark.parametrize("evaluator", ["graph", "frontier"])
def test_pieces_grow_to_the_measured_peak_and_shrink_back_after_running_out_of_memory(monkeypatch, evaluator):
    """Where the device measures each piece's peak memory, the next pieces are sized from it (to half the budget,
    never below the estimate's size); a piece that runs out of device memory midway is run again, smaller, with the
    estimate's sizes from then on; one that runs out before any measurement raises. The crossings, ties and trace
    equal the one-piece run's (the oracle) in every case."""
    import polytope_lens.paths.exact as exact
    g = torch.Generator().manual_seed(3)
    cnn = _pool_cnn()
    x0, x1 = 3 * torch.randn(1, 1, 12, 12, generator=g), 3 * torch.randn(1, 1, 12, 12, generator=g)
    whole = path_crossings(cnn, x0, x1, evaluator=evaluator)
    held, shared, room, fail_above, failed = [], [], [], [None], []
    real_chunk, real_pieces, real_crossings = (exact.Refiner.run_chunk, exact.Refiner.run_path_in_pieces,
                                               exact.Refiner._crossings)

    def run_chunk(self, *args):
        out = real_chunk(self, *args)
        held.append(out["n_evaluated"])
        shared.append(len(args) > 2 and args[2] is not None)  # the piece took its first point from the one before
        return out

    def run_path_in_pieces(self, gp, max_points, *args):
        room.append(max_points)
        return real_pieces(self, gp, max_points, *args)

    def crossings(self, cr, pid, t, *args):  # inside a piece, at a site: the device runs out above a size
        if fail_above[0] is not None and len(t) > fail_above[0]:
            failed.append(len(held))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_crossings(self, cr, pid, t, *args)
    monkeypatch.setattr(exact.Refiner, "run_chunk", run_chunk)
    monkeypatch.setattr(exact.Refiner, "run_path_in_pieces", run_path_in_pieces)
    monkeypatch.setattr(exact.Refiner, "_crossings", crossings)
    budget = 1 << 20
    runs = {"estimate": path_crossings(cnn, x0, x1, evaluator=evaluator, memory_budget=budget)}
    by_estimate = list(held)
    assert len(by_estimate) > 10 and max(by_estimate) <= 2 * room[-1]
    # pieces share their ends on the graph route always, on the frontier's only while they are small
    assert room[-1] <= exact.FRONTIER_SHARE_MAX_POINTS and shared == [False] + [True] * (len(held) - 1)
    shared.clear()
    # measured: 1 KiB per point, so half the budget holds 512 points: a few pieces, far above the estimate's size
    monkeypatch.setattr(exact.DevicePeak, "of", staticmethod(lambda device: _FakePeak(1024, held)))
    held.clear()
    runs["measured"] = path_crossings(cnn, x0, x1, evaluator=evaluator, memory_budget=budget)
    assert len(held) < len(by_estimate) / 2 and max(held) > 4 * room[-1]
    assert shared == [False] + [evaluator == "graph"] * (len(held) - 1)  # measured: 512 points, too many to share
    shared.clear()
    # measured above the estimate (a whole budget per point): never smaller than the estimate's pieces
    monkeypatch.setattr(exact.DevicePeak, "of", staticmethod(lambda device: _FakePeak(budget, held)))
    held.clear()
    runs["measured, large"] = path_crossings(cnn, x0, x1, evaluator=evaluator, memory_budget=budget)
    assert held == by_estimate
    shared.clear()
    # the device runs out above twice the estimate's size: that piece again, smaller, then the estimate's sizes
    monkeypatch.setattr(exact.DevicePeak, "of", staticmethod(lambda device: _FakePeak(1024, held)))
    fail_above[0] = 2 * room[-1]
    held.clear()
    runs["out of memory"] = path_crossings(cnn, x0, x1, evaluator=evaluator, memory_budget=budget)
    assert len(failed) == 1 and max(held[:failed[0]]) > room[-1] and max(held[failed[0]:]) <= 2 * room[-1]
    f = failed[0]  # the retried piece takes what the one before kept; those after it share again on both routes
    assert shared[1:f + 1] == [evaluator == "graph"] * f and shared[f + 1:] == [True] * (len(held) - f - 1)
    for r in runs.values():
        _same_records(whole.paths[0], r.paths[0])
        assert (whole.paths[0].trace.top_class == r.paths[0].trace.top_class).all()
    fail_above[0] = 0  # the first piece, before any measurement: the error is the device's
    with pytest.raises(torch.OutOfMemoryError):
        path_crossings(cnn, x0, x1, evaluator=evaluator, memory_budget=budget)


def test_running_out_of_device_memory_is_not_taken_for_a_model_the_shortcuts_cannot_follow(monkeypatch):
    """The evaluation shortcuts fall back to slower ways when a model's code does not allow them (any exception);
    running out of device memory is not such a failure, and reaches ``run_path_in_pieces`` (which retries a piece
    smaller) or the caller: in a reduced forward pass at new breakpoints, in the check of the shared network before
    a path's site (and of its recording), and in the frontier evaluator's probe of the model."""
    import polytope_lens.paths.frontier as frontier
    import polytope_lens.paths.runner as runner_mod
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(4)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x0, x1 = torch.randn(1, 1, 6, 6, generator=g), torch.randn(1, 1, 6, 6, generator=g)
    oom = torch.OutOfMemoryError("CUDA out of memory (simulated)")
    real_batches, real_points = runner_mod.Runner.eval_point_batches, runner_mod.Runner.eval_points
    seen = []

    def batches(self, pid, t, names, want_output=False, at=None, z_at=None, ends="every point", *args):
        reduced = at is not None and (not isinstance(ends, str) or ends == "one row")
        if reduced and len(pid) > min_points:  # the check of a reduction runs it on at most 4 points
            seen.append(len(pid))
            raise oom
        return real_batches(self, pid, t, names, want_output, at, z_at, ends, *args)
    monkeypatch.setattr(runner_mod.Runner, "eval_point_batches", batches)
    for min_points in (0, 4):  # in the check of a reduced pass, then in a reduced pass the check let through
        seen.clear()
        with pytest.raises(torch.OutOfMemoryError):
            path_crossings(cnn, x0, x1, evaluator="graph")
        assert seen and seen[0] > min_points
    monkeypatch.setattr(runner_mod.Runner, "eval_point_batches", real_batches)

    def points(self, *args, **kwargs):
        if self._share_prefix and (self._replay or not replay):  # the shared network before the site, checked
            raise oom
        return real_points(self, *args, **kwargs)
    monkeypatch.setattr(runner_mod.Runner, "eval_points", points)
    for replay in (False, True):  # its first check, then the check that its recording replays to the bit
        with pytest.raises(torch.OutOfMemoryError):
            ray_crossings(cnn, x0, layer="1.relu", alphas=(0.5, 2.0), evaluator="graph")
    monkeypatch.setattr(runner_mod.Runner, "eval_points", real_points)

    def probe(self, *args, **kwargs):
        raise oom
    monkeypatch.setattr(frontier.FrontierProgram, "_probe", probe)
    with pytest.raises(torch.OutOfMemoryError):
        path_crossings(cnn, x0, x1, evaluator="frontier")


def test_pieces_hold_about_what_the_budget_allows(monkeypatch):
    """Each piece of a path holds about the points the budget allows (the first piece sized from the expected
    breakpoints, the next ones from the density of the one before), also on the graph route; the check of final
    intervals evaluates batch-sized groups; a budget that cannot hold a few breakpoints is a one-line error naming
    --memory-mib."""
    import polytope_lens.paths as paths_mod
    import polytope_lens.paths.exact as exact
    held, checked, room = [], [], []
    real_chunk, real_pieces = exact.Refiner.run_chunk, exact.Refiner.run_path_in_pieces

    def run_chunk(self, *args):
        out = real_chunk(self, *args)
        held.append(out["n_evaluated"])  # what a chunk (piece) holds at the last site
        return out

    def run_path_in_pieces(self, gp, max_points, *args):
        room.append(max_points)
        return real_pieces(self, gp, max_points, *args)
    monkeypatch.setattr(exact.Refiner, "run_chunk", run_chunk)
    monkeypatch.setattr(exact.Refiner, "run_path_in_pieces", run_path_in_pieces)

    real_verify = exact._verify_intervals

    def verify(runner, gpids, pid, t, pick, units, tie_tol):
        checked.append((3 * len(pick), runner.rows_per_batch()))  # points evaluated at once, at every site
        return real_verify(runner, gpids, pid, t, pick, units, tie_tol)
    monkeypatch.setattr(exact, "_verify_intervals", verify)
    mlp = MLP(8, 1024, 1, seed=12)
    g = torch.Generator().manual_seed(3)
    a, b = 3 * torch.randn(1, 8, generator=g), 3 * torch.randn(1, 8, generator=g)
    per_point = 8 * (6 * 1024 + 2 * 1024 + 64)  # what _analyse counts per breakpoint on the affine route
    res = path_crossings(mlp, a, b, memory_budget=1 << 20, verify=False, trace=False)
    # about: within 2x (a piece is sized from the density of the one before)
    assert room == [(1 << 20) // per_point] and len(held) > 30 and max(held) <= 2 * room[0]
    assert res.paths[0].crossings > 800
    cnn = _pool_cnn()
    x0, x1 = 3 * torch.randn(1, 1, 12, 12, generator=g), 3 * torch.randn(1, 1, 12, 12, generator=g)
    held.clear()
    room.clear()
    r = path_crossings(cnn, x0, x1, memory_budget=1 << 20, evaluator="graph")  # ~75 KiB per breakpoint
    assert 8 <= room[0] <= 32 and len(held) > 10 and max(held) <= 2 * room[0]
    assert r.paths[0].per_layer == path_crossings(cnn, x0, x1).paths[0].per_layer
    assert len(checked) > 1 and all(n <= max(3, rows) for n, rows in checked)  # 32 intervals in several groups
    with pytest.raises(InvalidInputError, match=r"^The memory budget of path_crossings \(1 MiB\) holds fewer than "
                       r"4 breakpoints .* --memory-mib"):
        path_crossings(MLP(8, 5000, 1), a, b, memory_budget=1 << 20)  # 320 KiB per breakpoint
    assert paths_mod.MIN_PIECE_POINTS == 4


def test_last_site_breakpoints_do_not_shrink_the_pieces(monkeypatch):
    """Breakpoints made at the last site are never evaluated again, so they do not count against the memory budget:
    a one-layer path with ~10,000 crossings (about 10x what the budget holds as evaluated points) runs in two
    pieces, and its count equals the hand count (units whose input changes sign between the ends)."""
    import polytope_lens.paths.exact as exact
    torch.manual_seed(0)
    lin = nn.Linear(4, 20000).double()
    model = nn.Sequential(lin, nn.ReLU())
    a, b = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    calls = []
    real = exact.Refiner.run_chunk
    monkeypatch.setattr(exact.Refiner, "run_chunk", lambda self, *args: calls.append(1) or real(self, *args))
    res = path_crossings(model, a, b, trace=False, memory_budget=1 << 30)
    with torch.no_grad():
        hand = int(((lin(a) > 0) != (lin(b) > 0)).sum())
    assert res.paths[0].crossings == hand > 9000
    assert len(calls) <= 2


def test_units_of_the_last_site():
    """units= follows only some units of the last site: their crossings equal the full run's for those units (the
    full run equals Regioncam1D, tested above), earlier sites are unchanged; bad selections are clear errors."""
    mlp = MLP(6, 32, 3, seed=5)
    g = torch.Generator().manual_seed(1)
    a, b = 2 * torch.randn(4, 6, generator=g), 2 * torch.randn(4, 6, generator=g)
    full, sub = path_crossings(mlp, a, b), path_crossings(mlp, a, b, units=[3, 7, 20, 31])
    last = len(full.sites) - 1
    assert sum(q.per_layer[full.sites[-1]] for q in sub.paths) > 0
    for p, q in zip(full.paths, sub.paths):
        want = (p.records["site"] == last) & np.isin(p.records["unit"], [3, 7, 20, 31])
        got = q.records["site"] == last
        assert (p.records["unit"][want] == q.records["unit"][got]).all()
        np.testing.assert_allclose(p.records["t"][want], q.records["t"][got], rtol=0, atol=1e-12)
        assert {k: v for k, v in p.per_layer.items() if k != full.sites[-1]} == \
            {k: v for k, v in q.per_layer.items() if k != full.sites[-1]}
    with pytest.raises(InvalidInputError, match="distinct indices"):
        path_crossings(mlp, a, b, units=[0, 32])
    with pytest.raises(InvalidInputError, match="'position'"):
        path_crossings(mlp, a, b, units="position")
    with pytest.raises(InvalidInputError, match="exact mode"):
        path_crossings(mlp, a, b, units=[1], method="sampled")


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors():
    """Each bad input raises one clear sentence."""
    mlp = MLP(3, 8, 1)
    a = torch.randn(2, 3)
    with pytest.raises(InvalidInputError, match="equal start and end"):
        path_crossings(mlp, a, a.clone())
    with pytest.raises(InvalidInputError, match="NaN"):
        path_crossings(mlp, a, torch.full((2, 3), float("nan")))
    with pytest.raises(InvalidInputError, match="same shape"):
        path_crossings(mlp, a, torch.randn(3, 3))
    with pytest.raises(InvalidInputError, match="matches none"):
        ray_crossings(mlp, a, layer="nope.*")
    with pytest.raises(InvalidInputError, match="alpha0 < alpha1"):
        ray_crossings(mlp, a, layer="relu", alphas=(2.0, 1.0))
    with pytest.raises(InvalidInputError, match="'method'"):
        path_crossings(mlp, a, -a, method="fast")
    with pytest.raises(InvalidInputError, match="needs 'inputs'"):
        path_crossings(mlp, torch.randn(2, 8), torch.randn(2, 8), layer="relu")
    with pytest.raises(InvalidInputError, match="output shape"):
        path_crossings(mlp, torch.randn(2, 5), torch.randn(2, 5), layer="relu", inputs=a)
    with pytest.raises(InvalidInputError, match="repeats point"):
        polyline_crossings(mlp, torch.stack([a, a, -a], dim=1))
    # points, or a site path's real inputs, of a shape the model cannot take: one line naming the shape and the
    # model's own error (before: torch's traceback from inside the model)
    with pytest.raises(InvalidInputError, match=r"RuntimeError on the points of path_crossings \(one row of shape "
                                                r"\(5,\)\): mat1 and mat2"):
        path_crossings(mlp, torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(InvalidInputError, match=r"on the 'inputs' of ray_crossings \(one row of shape \(4,\)\)"):
        ray_crossings(mlp, torch.randn(2, 4), layer="relu")
    with pytest.raises(InvalidInputError, match="on the points of polyline_crossings"):
        polyline_crossings(mlp, torch.randn(2, 3, 4))


@pytest.mark.parametrize("option, value, msg", [
    ("evaluator", "fastest", "'evaluator'"), ("dtype", torch.int32, "'dtype'"), ("dtype", "float64", "'dtype'"),
    ("dtype", torch.bfloat16, "'dtype'"), ("dtype", torch.float16, "'dtype'"),
    ("memory_budget", 1000, "'memory_budget'"), ("memory_budget", 2.0 ** 30, "'memory_budget'"),
    ("tie_tol", -1.0, "'tie_tol'"), ("tie_tol", 0.1, "'tie_tol'"), ("tie_tol", 1e-6, r"\[0, 1e-09\] \(for float64\)"),
    ("n_samples", 1, "'n_samples'"),
    ("tol", 0.0, "'tol'"), ("tol", "small", "'tol'")])
def test_bad_options_raise_clear_errors(option, value, msg):
    """Every option is validated before any work, by all three entry points, with a message naming it."""
    mlp = MLP(3, 8, 1)
    a = torch.randn(2, 3)
    for call in (lambda **kw: path_crossings(mlp, a, -a, **kw),
                 lambda **kw: polyline_crossings(mlp, torch.stack([a, -a], dim=1), **kw),
                 lambda **kw: ray_crossings(mlp, a, layer="*relu", **kw)):
        with pytest.raises(InvalidInputError, match=msg):
            call(**{option: value})


def test_tie_tol_up_to_the_affine_tolerance():
    """tie_tol moves a crossing onto a breakpoint up to that far in t, leaving its kink inside an interval: allowed up
    to the rounding the affine checks accept (1e-9 in float64, 1000 ulps in float32), where the final-interval check
    accepts a unit that far from its kink at an end; the same crossings as the default there."""
    torch.manual_seed(0)
    mlp = MLP(3, 16, 3)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        loose = path_crossings(mlp, a, b, dtype=dtype, tie_tol=tol)
        strict = path_crossings(mlp, a, b, dtype=dtype)
        assert [p.crossings for p in loose.paths] == [p.crossings for p in strict.paths]
        assert loose.tolerance["tie_tol"] == tol
    top = 1e3 * torch.finfo(torch.float32).eps  # the limit printed exactly: 1.2e-4 is just over it
    for bad in (1e-3, 1.2e-4):
        with pytest.raises(InvalidInputError, match=rf"'tie_tol'.*\[0, {top!r}\] \(for float32\)\. Got {bad!r}"):
            path_crossings(mlp, a, b, dtype=torch.float32, tie_tol=bad)


def test_bad_site_inputs_raise_clear_errors():
    """Paths at a site need one finite real input per path."""
    mlp = MLP(3, 8, 1)
    a, b = torch.relu(torch.randn(2, 8)), torch.relu(torch.randn(2, 8))
    for inputs, msg in ((torch.randn(3, 3), "one row per path"), (torch.full((2, 3), float("nan")), "NaN"),
                        ([1, 2], "a tensor, a NumPy array or a mapping")):
        with pytest.raises(InvalidInputError, match=msg):
            path_crossings(mlp, a, b, layer="*relu", inputs=inputs)
    with pytest.raises(InvalidInputError, match="'layer' parameter of ray_crossings is required"):
        ray_crossings(mlp, torch.randn(2, 3), layer=None)
    with pytest.raises(InvalidInputError, match="at least one example"):
        ray_crossings(mlp, torch.randn(0, 3), layer="*relu")
    with pytest.raises(InvalidInputError, match="at least one example"):
        site_activations(mlp, torch.randn(0, 3), layer="*relu")
    # arrays are taken as path_crossings takes them
    x = np.random.default_rng(0).standard_normal((2, 3))
    assert torch.equal(site_activations(mlp, x, layer="*relu"), site_activations(mlp, torch.from_numpy(x),
                                                                                  layer="*relu"))
    assert ray_crossings(mlp, x, layer="*relu").counts.tolist() == ray_crossings(
        mlp, torch.from_numpy(x), layer="*relu").counts.tolist()
    # points of a polyline at a site must have the site's shape, as a segment's ends must
    for pts in (torch.rand(2, 3, 9), torch.rand(2, 3, 2, 4)):
        with pytest.raises(InvalidInputError, match=r"'points' of polyline_crossings at layer 'relu' must have that "
                                                    r"site's output shape \(P, K, 8\)"):
            polyline_crossings(mlp, pts, layer="relu", inputs=torch.randn(2, 3))


def test_bend_matches_the_piecewise_linear_function_it_describes():
    """``_bend`` (pairwise sums for short intervals, restarted prefix sums for long ones) against the function
    written out directly: zl + s0 u + sum_j v_j max(0, u - u_j), with s0 fixed by the value zr at u = 1."""
    from polytope_lens.paths.exact import _PAIRWISE_MAX, _bend

    g = torch.Generator().manual_seed(5)
    sizes = [1, 2, 5, _PAIRWISE_MAX, _PAIRWISE_MAX + 1, 40, 1, 3, 60]
    d = 7
    zl = torch.randn(len(sizes), d, generator=g, dtype=torch.float64)
    zr = torch.randn(len(sizes), d, generator=g, dtype=torch.float64)
    us = [torch.sort(torch.rand(n, generator=g, dtype=torch.float64)).values for n in sizes]
    v = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    grp = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    u = torch.cat(us)
    got = _bend(torch.lerp(zl[grp], zr[grp], u[:, None]), u, grp, len(sizes), v)
    want, row = [], 0
    for i, n in enumerate(sizes):
        ui, vi = us[i].numpy(), v[row:row + n].numpy()
        s0 = zr[i].numpy() - zl[i].numpy() - ((1 - ui)[:, None] * vi).sum(0)
        for k in range(n):
            want.append(zl[i].numpy() + s0 * ui[k] + (np.maximum(0.0, ui[k] - ui)[:, None] * vi).sum(0))
        row += n
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=0, atol=1e-12)
    # no slope changes: plain interpolation
    np.testing.assert_allclose(_bend(torch.lerp(zl[grp], zr[grp], u[:, None]), u, grp, len(sizes), None).numpy(),
                               (zl[grp] + u[:, None] * (zr[grp] - zl[grp])).numpy(), atol=1e-15)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 200, 1025, 40000])  # 1025, 40000: block totals scanned in blocks too
def test_cumsum_rows_equals_torch_cumsum(n):
    from polytope_lens.paths.exact import _cumsum_rows

    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    np.testing.assert_allclose(_cumsum_rows(x).numpy(), torch.cumsum(x, 0).numpy(), atol=1e-12)


def test_keep_freed_memory_sets_glibc_malloc_once_and_can_be_turned_off():
    import subprocess
    import sys

    from polytope_lens import _heap

    code = "from polytope_lens._heap import keep_freed_memory as k; a = k(); print(sorted(a.items()), a is k())"
    env = dict(os.environ)
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    env["POLYTOPE_LENS_KEEP_FREED_MEMORY"] = "0"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert off.strip() == "[] True"
    if _heap._glibc() is not None:  # every parameter accepted by mallopt
        assert on.strip() == f"{sorted((name, True) for name in _heap.SETTINGS)} True"
    else:
        assert on.strip() == "[] True"


def test_float32_runs_exact_with_rounding_sized_checks():
    """In float32 the affinity checks allow float32 rounding (1000 ulps) instead of float64's 1e-9, so a ReLU MLP
    stays exact (before: refused as 'not affine') and its counts equal float64's here."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    a, b = torch.randn(20, 10), torch.randn(20, 10)
    r64 = path_crossings(m, a, b)
    r32 = path_crossings(m, a, b, dtype=torch.float32, method="exact")
    assert r32.exact and r32.dtype == "float32"
    assert np.array_equal(r32.counts, r64.counts) and r64.counts.min() > 10
    # a real nonlinearity is still caught at float32's tolerance
    ln = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.LayerNorm(32), nn.Linear(32, 8), nn.ReLU())
    with pytest.raises(NotPiecewiseLinearError):
        path_crossings(ln, a, b, dtype=torch.float32, method="exact")


IN_PLACE_FORMS = {
    "ReLU6(inplace=True)": (lambda h: nn.ReLU6(inplace=True)(h), F.relu6),
    "LeakyReLU(inplace=True)": (lambda h: nn.LeakyReLU(0.1, inplace=True)(h), lambda h: F.leaky_relu(h, 0.1)),
    "Hardtanh(inplace=True)": (lambda h: nn.Hardtanh(-0.5, 0.5, inplace=True)(h), lambda h: F.hardtanh(h, -0.5, 0.5)),
    "Tensor.relu_": (lambda h: h.relu_(), torch.relu),
    "F.relu_": (F.relu_, F.relu),
    "Tensor.clamp_": (lambda h: h.clamp_(-0.3, 0.4), lambda h: h.clamp(-0.3, 0.4)),
    "F.leaky_relu(h, 0.2, True)": (lambda h: F.leaky_relu(h, 0.2, True), lambda h: F.leaky_relu(h, 0.2)),
    "Tensor.abs_": (lambda h: h.abs_(), torch.abs),
}


@pytest.mark.parametrize("form", sorted(IN_PLACE_FORMS))
def test_in_place_forms_equal_their_out_of_place_twins(form):
    """Each in-place form, with its return value ignored (the code reads the mutated tensor), gives the crossings
    (positions included) and the trace of the same network written out of place, on both evaluators."""
    f_in, f_out = IN_PLACE_FORMS[form]
    g = torch.Generator().manual_seed(0)
    l1, l2 = _init(nn.Linear(3, 10), g), _init(nn.Linear(10, 4), g)

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = l1, l2

        def forward(self, x):
            h = 3 * self.l1(x)
            f_in(h)
            return self.l2(h)

    class OutOfPlace(InPlace):
        def forward(self, x):
            return self.l2(f_out(3 * self.l1(x)))
    a, b = 3 * torch.randn(5, 3, generator=g), 3 * torch.randn(5, 3, generator=g)
    for evaluator in ("affine", "graph"):
        got = path_crossings(InPlace(), a, b, evaluator=evaluator)
        want = path_crossings(OutOfPlace(), a, b, evaluator=evaluator)
        assert got.counts.tolist() == want.counts.tolist() and got.counts.sum() > 0
        for p, q in zip(got.paths, want.paths):
            np.testing.assert_allclose(p.records["t"], q.records["t"], rtol=0, atol=1e-12)
            np.testing.assert_allclose(p.trace.class_changes, q.trace.class_changes, rtol=0, atol=1e-12)


def test_device_is_checked_before_any_work():
    """An unknown device string, or CUDA where torch has none, is one clear error (before: an AssertionError from
    deep inside torch); with CUDA present the same call runs there."""
    mlp = MLP(3, 8, 1)
    a = torch.randn(2, 3)
    with pytest.raises(InvalidInputError, match="'device' parameter must be a torch device"):
        path_crossings(mlp, a, -a, device="gpu9")
    if torch.cuda.is_available():
        assert path_crossings(mlp, a, -a, device="cuda").counts.tolist() == path_crossings(mlp, a, -a).counts.tolist()
    else:
        with pytest.raises(InvalidInputError, match="no CUDA device"):
            path_crossings(mlp, a, -a, device="cuda")
        with pytest.raises(InvalidInputError, match="no CUDA device"):
            ray_crossings(mlp, a, layer="*relu", device="cuda")


def test_default_memory_budget_is_1_gib_on_the_cpu_and_half_the_free_gpu_memory(monkeypatch):
    """memory_budget=None: 1 GiB on the CPU (same results as passing it); on a GPU half of what
    torch.cuda.mem_get_info reports free, never below 1 GiB."""
    from polytope_lens.paths import default_memory_budget

    assert default_memory_budget(torch.device("cpu")) == 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    assert default_memory_budget(torch.device("cuda")) == 5 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    assert default_memory_budget(torch.device("cuda")) == 1 << 30
    mlp = MLP(5, 12, 2, seed=3)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    assert (path_crossings(mlp, a, b, memory_budget=None).counts.tolist()
            == path_crossings(mlp, a, b, memory_budget=1 << 30).counts.tolist())


@pytest.mark.parametrize("block", [1, 2, 256])
def test_class_changes_of_a_chunk_equal_per_path_envelopes(block):
    """Class changes of several paths found in one pass over the chunk (regions in blocks) equal the argmax
    envelope of each path's regions taken alone, in order, with no region spanning two paths."""
    from polytope_lens.kinks import argmax_changes
    from polytope_lens.paths import _class_changes

    g = torch.Generator().manual_seed(5)
    pcount = [7, 2, 9]
    t = torch.cat([torch.sort(torch.rand(c, generator=g, dtype=torch.float64)).values for c in pcount])
    logits = torch.randn(sum(pcount), 4, generator=g, dtype=torch.float64) * 2
    last = torch.zeros(len(t), dtype=torch.bool)
    last[np.cumsum(pcount) - 1] = True
    got = _class_changes(t, logits, last, pcount, 1e-9, block=block)
    p0 = 0
    for c, changes in zip(pcount, got):
        tt, z = t[p0:p0 + c], logits[p0:p0 + c]
        cr = argmax_changes(z[:-1], z[1:], 1e-9)
        want = np.sort((tt[cr.segment] + cr.t * (tt[cr.segment + 1] - tt[cr.segment])).numpy())
        np.testing.assert_allclose(changes, want, rtol=0, atol=1e-15)
        p0 += c
    assert sum(len(c) for c in got) > 3


def test_progress_is_called_once_per_chunk_with_the_paths_finished():
    """progress= gets the number of paths finished after every chunk (the first path, refined in pieces, reports
    their lengths in t): several calls under a small budget, summing
    to the batch; rays report too; anything but a callable is a one-line error."""
    mlp = MLP(6, 16, 2, seed=9)
    a, b = torch.randn(40, 6), torch.randn(40, 6)
    seen = []
    res = path_crossings(mlp, a, b, memory_budget=1 << 20, progress=seen.append)
    assert len(seen) > 1 and math.isclose(sum(seen), 40) and len(res.paths) == 40
    rays = []
    ray_crossings(mlp, a[:3], layer="relu#1", alphas=(0.5, 2.0), progress=rays.append)
    assert sum(rays) == 3
    with pytest.raises(InvalidInputError, match="'progress' parameter of path_crossings must be None or a callable"):
        path_crossings(mlp, a, b, progress=3)


def test_sampled_rays_through_zero_count_ties_as_exact_paths_do():
    """A ray through alpha = 0 at a ReLU site puts every max-pool window on a tie (all entries the channel's bias)
    and every bias-free later unit on its kink at one sample: the sampled mode counts a touch there as no change and
    a pass through it as one, as the exact engine does (found by a tester: 52 window changes where there are 36),
    wherever the batches of samples split (a 1 MiB budget) and whatever tol (above the sample spacing too: 53 against
    36 once, when touches were told from stretches after bisection); a range that ends at alpha = 0 keeps its end's
    crossings."""
    torch.manual_seed(0)
    pool = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(36, 5)).double()
    bias_free = nn.Sequential(nn.Linear(6, 12, bias=False), nn.ReLU(), nn.Linear(12, 12, bias=False), nn.ReLU(),
                              nn.Linear(12, 3, bias=False)).double()
    x, v = torch.randn(1, 1, 8, 8, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    for model, inp, layer in ((pool, x, "1.relu"), (bias_free, v, "1.relu")):
        for alphas in ((-1.0, 1.0), (-1.0, 0.0)):
            exact = ray_crossings(model, inp, layer=layer, alphas=alphas, method="exact")
            assert exact.counts.sum() > 5
            for budget, n, tol in ((None, 1024, 1e-9), (1 << 20, 1024, 1e-9), (None, 1024, 1e-3), (None, 64, 0.05)):
                kw = {} if budget is None else {"memory_budget": budget}
                sampled = ray_crossings(model, inp, layer=layer, alphas=alphas, method="sampled", n_samples=n,
                                        tol=tol, **kw)
                assert sampled.paths[0].per_layer == exact.paths[0].per_layer, (layer, alphas, budget, n, tol)


class _Written(nn.Module):
    """A small CNN whose activations are written as ``ops`` (a dict of callables): registered calls, other spellings
    of them, or operations that are no activation at all."""

    def __init__(self, ops: dict):
        super().__init__()
        torch.manual_seed(11)
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(16, 3)
        self.ops = ops

    def forward(self, x):
        h = self.ops["first"](self.c1(x))
        h = self.ops["pool"](self.ops["second"](self.c2(h)))
        return self.head(h.flatten(1))


_REGISTERED = {"first": F.relu, "second": lambda z: torch.clamp(z, max=0.5), "pool": lambda z: F.max_pool2d(z, 2)}


def test_other_spellings_of_clamps_and_max_pooling_are_the_same_sites():
    """``clamp_min``, ``clamp_max`` (and in place) and ``torch.max_pool2d`` are sites, with the records of the
    registered calls they equal (before, they were not seen at all and their crossings were missing)."""
    a, b = 2 * torch.randn(3, 2, 4, 4), 2 * torch.randn(3, 2, 4, 4)
    want = path_crossings(_Written(_REGISTERED), a, b)
    assert set(want.sites) == {"relu", "clamp", "max_pool2d"} and all(p.per_layer["max_pool2d"] for p in want.paths)
    spelled = {"first": lambda z: z.clamp_min(0.0), "second": lambda z: z.clone().clamp_max_(0.5),
               "pool": lambda z: torch.max_pool2d(z, 2)}
    assert_same_records(path_crossings(_Written(spelled), a, b), want)
    spelled = {"first": lambda z: torch.clamp_min(z, 0.0), "second": lambda z: torch.clamp_max(z, 0.5),
               "pool": _REGISTERED["pool"]}
    assert_same_records(path_crossings(_Written(spelled), a, b), want)


@pytest.mark.parametrize("op, name", [
    (lambda z: torch.maximum(z, torch.zeros_like(z)), "maximum"),
    (lambda z: torch.where(z > 0, z, 0.1 * z), "gt"),
    (lambda z: z * (z > 0), "gt"),
    (lambda z: z * (z - 0.5).gt_(0), "gt"),  # in place: the result stays floating
    (lambda z: z.unfold(2, 2, 2).unfold(3, 2, 2).amax((-1, -2)), "amax"),  # a max pool written by hand
    (lambda z: z + torch.round(z), "round"),
    (lambda z: z + (z * 3).long(), "long"),  # any cast of unit values to integers
    (lambda z: z if z.sum().item() > 0 else -z, "item"),  # control flow on a unit value
    (lambda z: z.clone().masked_fill_(z > 0.5, 0.5), "gt"),  # a bend written in place
    (lambda z: _set_where_above(z.clone(), 0.5), "gt"),  # ... through __setitem__ and a view
    (lambda z: torch.from_numpy(z.numpy().clip(0, 1)), "numpy"),  # values that leave torch
])
def test_bends_that_are_no_site_are_refused_by_exact_methods(op, name):
    """An operation that bends the network without being an activation (a comparison of unit values, a maximum of
    two tensors, a reduction to the largest entry, rounding, a cast to integers, a branch on a value) is an error in
    exact mode, naming it and what it reaches; before, its crossings were silently missing from a result that said
    exact. auto takes the sampled mode and says why; a path that starts after the bend, or sites that stop before
    it, are unaffected."""
    a, b = 2 * torch.randn(2, 2, 4, 4), 2 * torch.randn(2, 2, 4, 4)
    hidden_last = _Written({**_REGISTERED, "pool": op if name == "amax" else lambda z: F.max_pool2d(op(z), 2)})
    reach = "the model's output" if name == "amax" else "the unit input of site 'max_pool2d'"
    with pytest.raises(NotPiecewiseLinearError, match=rf"{name}\b.*called in the model itself.* reaches {reach}"):
        path_crossings(hidden_last, a, b, method="exact")
    r = path_crossings(hidden_last, a, b, method="auto", n_samples=64)
    assert not r.exact and any(f"reaches {reach}" in n for n in r.notes)
    assert path_crossings(hidden_last, a, b, layers="relu").exact  # the bend comes after the reported site
    hidden_first = _Written({**_REGISTERED, "first": lambda z: F.relu(op(z)) if name != "amax" else F.relu(z)})
    if name != "amax":
        with pytest.raises(NotPiecewiseLinearError, match=rf"{name}\b.* reaches the unit input of site 'relu'"):
            path_crossings(hidden_first, a, b, method="exact")
        # a path at a site after the bend: the network before it is the same for every point
        r = path_crossings(hidden_first, torch.rand(1, 4, 4, 4), torch.rand(1, 4, 4, 4), layer="relu", inputs=a[:1])
        assert r.exact


def _set_where_above(z, k):
    view = z[:, :2]
    view[view > k] = k
    return z


class _Bookkeeping(nn.Module):
    """An MLP whose forward copies its hidden layer into a buffer of its own, checks that it is finite, and makes a
    boolean mask of ones: nothing here bends it, and its second site still follows the path."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.l1, self.l2, self.l3 = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        assert torch.isfinite(h).all()
        buf = torch.empty(h.shape, dtype=h.dtype)
        buf[:] = h
        keep = torch.ones_like(buf, dtype=torch.bool)
        return self.l3(torch.relu(self.l2(buf * keep)))


class _GatedReLU(nn.Module):  # an activation module the user registers: its comparison is the site's own
    def forward(self, z):
        return z * (z > 0)


def test_bookkeeping_and_registered_activation_modules_are_no_bends():
    """Copies into buffers, finiteness checks, mask factories and a registered activation module's inner comparison
    leave the model exact, with the plain network's records (before the dependency tracking followed writes, such a
    copy hid the second site from the path)."""
    m = _Bookkeeping().double()
    plain = nn.Sequential(m.l1, nn.ReLU(), m.l2, nn.ReLU(), m.l3)
    a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    got, want = path_crossings(m, a, b), path_crossings(plain, a, b)
    assert got.exact and got.counts.tolist() == want.counts.tolist() and len(got.sites) == 2
    gated = nn.Sequential(m.l1, _GatedReLU(), m.l3)
    got = path_crossings(gated, a, b, method="exact", activation_modules={"_GatedReLU": "relu"})
    want = path_crossings(nn.Sequential(m.l1, nn.ReLU(), m.l3), a, b)
    assert got.exact and got.counts.tolist() == want.counts.tolist()


class _ParameterWork(nn.Module):
    """Comparisons, rounding and clamps of parameters and buffers alone (a pruning mask, quantised weights, a clamped
    scale): they do not depend on the path, so they bend nothing along it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.l1, self.l2 = nn.Linear(3, 8), nn.Linear(8, 2)
        self.register_buffer("mask", torch.rand(8, 3))
        self.log_scale = nn.Parameter(torch.randn(8))

    def forward(self, x):
        w = self.l1.weight * (self.mask > 0.3)  # pruning
        w = torch.round(w * 64) / 64  # fake quantisation
        scale = self.log_scale.exp().clamp_min(0.1)  # a clamp of a parameter: no unit of the path
        return self.l2(torch.relu(F.linear(x, w, self.l1.bias) * scale))


def test_work_on_parameters_alone_is_no_bend_and_no_site_of_the_path():
    """The model above runs exact, with the records of the same network written with its parameters precomputed;
    the clamp of the parameter is a site of the model (codes see it) but not one a path crosses."""
    m = _ParameterWork().double()  # the parameters' work as the paths' float64 copy does it
    a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    got = path_crossings(m, a, b)
    with torch.no_grad():
        w = torch.round(m.l1.weight * (m.mask > 0.3) * 64) / 64
        scale = m.log_scale.exp().clamp_min(0.1)
        plain = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
        plain[0].weight.copy_(w * scale[:, None])
        plain[0].bias.copy_(m.l1.bias * scale)
        plain[2].load_state_dict(m.l2.state_dict())
    want = path_crossings(plain, a, b)
    assert got.exact and got.sites == ("relu",) and want.sites == ("1.relu",)
    assert got.counts.tolist() == want.counts.tolist() and all(p.per_layer["relu"] == q.per_layer["1.relu"]
                                                               for p, q in zip(got.paths, want.paths))
    for p, q in zip(got.paths, want.paths):
        np.testing.assert_allclose(p.records["t"], q.records["t"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_ray_through_zero_of_a_bias_free_cnn_counts_what_the_closed_form_gives(seed):
    """Along alpha * a at a ReLU, a bias-free conv -> max pool -> conv -> ReLU6 is positively homogeneous: a ReLU6
    input is |alpha| z(-1) for alpha < 0 and alpha z(1) for alpha > 0, and a pool window's first maximum is the
    first argmin of a for alpha < 0 and the first argmax for alpha > 0 (a tester's closed form). At alpha = 0 every
    unit input is 0 and every window tied: a breakpoint interpolated there (t = 1/3 of [-1, 2]) held noise of 1e-16
    that counted 122 crossings instead of 96 (exact) and more than the truth in sampled mode, documented as a lower
    bound. The ray now has a knot at alpha = 0 whose point is exactly 0 (``geometry.ray``)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.ReLU6(), nn.Flatten(),
                      nn.Linear(96, 5)).double().eval()
    m.requires_grad_(False)
    m[3].weight.mul_(4)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64) * 3
    a = site_activations(m, x, layer="1.relu")
    w = a.unfold(2, 2, 2).unfold(3, 2, 2).reshape(1, 4, 4, 4, 4)
    first = lambda v: (v == v.max(-1, keepdim=True).values).to(torch.uint8).argmax(-1)  # noqa: E731
    pool = int((first(-w) != first(w)).sum())
    zn, zp = m[3](m[2](-a)).flatten(), m[3](m[2](a)).flatten()
    piece = lambda z: (z > 0).long() + (z > 6).long()  # noqa: E731
    for a0, a1 in ((-1.0, 2.0), (-0.7, 1.3), (-1.0, 1.0)):
        relu6 = int((piece(-a0 * zn) != piece(1e-300 * zn)).sum() + (piece(a1 * zp) != piece(1e-300 * zp)).sum()
                    + (piece(1e-300 * zn) != piece(1e-300 * zp)).sum())
        for method in ("exact", "sampled"):
            r = ray_crossings(m, x, layer="1.relu", alphas=(a0, a1), method=method, n_samples=300, trace=False)
            assert list(r.paths[0].per_layer.values()) == [pool, relu6], (a0, a1, method)
            if method == "exact":  # the knot at alpha = 0 is a breakpoint
                assert np.abs(r.paths[0].t - (-a0 / (a1 - a0))).min() < 1e-15


def test_sampled_mode_places_a_kink_stretch_that_holds_one_sample_at_its_ends():
    """Hand-computed cases from a tester where a unit (a max-pool window) is exactly on its kink (tied) over a
    stretch shorter than the sample spacing with one sample on it. Sampled mode took that for a one-point touch: it
    moved the change to the sample (t = 0.4375 instead of 0.43; 0.5 instead of 1 - 1/sqrt(2)) or dropped two changes
    the samples themselves showed. Now sampled equals the exact engine and the closed form, to tol."""
    # max pool over relu(t - 0.44), relu(-1), relu(0.43 - t), relu(-1): entry 2 is the maximum until t = 0.43, then
    # all four are 0 (first maximum: entry 0) and entry 0 leads after 0.44: one change, 2 -> 0, at 0.43
    pool = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1, 2)).double()
    start = torch.tensor([[[[-0.44, -1.0], [0.43, -1.0]]]], dtype=torch.float64)
    end = torch.tensor([[[[0.56, -1.0], [-0.57, -1.0]]]], dtype=torch.float64)
    for method, n in (("exact", 2), ("sampled", 32), ("sampled", 1024)):
        p = path_crossings(pool, start, end, method=method, n_samples=n, tol=1e-9, trace=False).paths[0]
        m = p.records["site"] == 1
        assert p.records["t"][m] == pytest.approx([0.43], abs=1e-9) and p.records["piece"][m].tolist() == [0]
    # a polyline whose first coordinate (a ReLU unit's input) is 1, 0, 0, -1 or 1 at its knots: it reaches its kink
    # at the first knot (t = 1 - 1/sqrt(2)) and stays on it until the second (t = 2 - sqrt(2))
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3)).double().requires_grad_(False)
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
    k1, k2 = 1 - 2 ** -0.5, 2 - 2 ** 0.5
    for last, want in ((-1.0, [(k1, 0)]), (1.0, [(k1, 0), (k2, 1)])):
        pts = torch.tensor([[[1.0, -1.0], [0.0, -1.0], [0.0, -2.0], [last, -3.0]]], dtype=torch.float64)
        for method, n in (("exact", 2), ("sampled", 4), ("sampled", 8)):
            p = polyline_crossings(net, pts, method=method, n_samples=n, tol=1e-10, trace=False).paths[0]
            m = p.records["unit"] == 0
            assert p.records["t"][m] == pytest.approx([t for t, _ in want], abs=1e-9), (last, method, n)
            assert p.records["piece"][m].tolist() == [pc for _, pc in want]


def test_lengths_of_huge_paths_are_finite_and_overflowing_rays_refused():
    """A segment between points of size 1e200 has a finite length (the sum of squares overflowed to inf, so density
    read 0); rays whose ends overflow float64 are a one-line error naming alphas (a NotPiecewiseLinearError about
    the model before)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    start, end = x[:1] * 1e200, x[1:] * -1e200
    p = path_crossings(m, start, end, trace=False).paths[0]
    want = float(np.linalg.norm(((end - start) / 1e200).numpy())) * 1e200
    assert p.length == pytest.approx(want, rel=1e-15) and p.density == pytest.approx(p.crossings / want)
    assert polyline_crossings(m, torch.stack([start, end], 1), trace=False).paths[0].length == pytest.approx(want)
    with pytest.raises(InvalidInputError, match="overflow float64 .*use a smaller range of alpha"):
        ray_crossings(m, x, layer="1.relu", alphas=(-1e308, 1e308))
    with pytest.raises(InvalidInputError, match="span more than float64"):
        path_crossings(m, torch.full((1, 4), 1e308, dtype=torch.float64), torch.full((1, 4), -1e308,
                                                                                    dtype=torch.float64))


def test_sampled_mode_with_tol_above_the_sample_spacing_keeps_every_change_the_samples_show():
    """A reviewer's cases: with tol at least the sample spacing brackets are never bisected, so their unmoved ends
    are no sign of a touch. |x - 0.5| - 0.0007 along [0, 1] crosses its ReLU kink twice (hand-computed: t = 0.4993
    and 0.5007); a ReLU6 unit along x = -1, 7, 3 enters pieces 1, 2, 1. Sampled mode dropped the first pair and
    kept one record of piece 2 of the second (the samples show all three changes)."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.copy_(torch.tensor([-0.5, 0.5]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        net[2].bias.fill_(-0.0007)
    s, e = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    for n, tol in ((1024, 1e-9), (1024, 1e-3), (256, 5e-3)):
        p = path_crossings(net, s, e, method="sampled", n_samples=n, tol=tol, trace=False).paths[0]
        m = p.records["site"] == 1
        assert p.records["piece"][m].tolist() == [0, 1] and p.records["t"][m] == pytest.approx([0.4993, 0.5007],
                                                                                               abs=tol)
    relu6 = nn.Sequential(nn.Linear(1, 1), nn.ReLU6(), nn.Linear(1, 2)).double()
    with torch.no_grad():
        relu6[0].weight.fill_(1.0)
        relu6[0].bias.zero_()
    pts = torch.tensor([[[-1.0], [7.0], [3.0]]], dtype=torch.float64)
    for tol in (1e-9, 0.5):
        p = polyline_crossings(relu6, pts, method="sampled", n_samples=3, tol=tol, trace=False).paths[0]
        assert p.records["piece"].tolist() == [1, 2, 1]


@pytest.mark.parametrize("evaluator", ["graph", "frontier", "auto"])
def test_a_rays_knot_at_zero_is_no_region_boundary_where_nothing_crosses_there(evaluator):
    """With biases nothing crosses at alpha = 0, so the ray's knot there is not a breakpoint of the result: regions
    = crossings + 1 (no ties), and each trace row sits at the midpoint of its region with the model's own top class
    there (a forward pass), with every site reported and with layers= stopping early (outputs evaluated, not
    averaged). The knot counted one region too many (a reviewer: 17 for 15 crossings)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 3)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    a = site_activations(m, x, layer="1.relu")
    for layers in (None, "3.relu"):
        r = ray_crossings(m, x, layer="1.relu", alphas=(-1.0, 2.0), evaluator=evaluator, layers=layers)
        for i, p in enumerate(r.paths):
            assert p.ties == 0 and p.n_regions == len(p.t) - 1 == p.crossings + 1 and 1 / 3 not in p.t
            assert p.trace.t == pytest.approx(0.5 * (p.t[:-1] + p.t[1:]), abs=1e-15)
            with torch.no_grad():
                top = m[2:](torch.as_tensor(p.alpha(p.trace.t))[:, None] * a[i]).argmax(1).numpy()
            assert (p.trace.top_class == top).all()


def test_sampled_mode_reads_a_unit_on_its_kink_at_a_sample_from_probes_either_side():
    """Hand-computed cases of a tester's: a ReLU6 input 8 (gelu(x) + gelu(-x)) + 10 (x - tanh x) along x from -1 to 1
    (and back) touches 0 exactly at the middle sample and crosses 6 once (x6 > 0, by bisection of the closed form);
    a GELU-threshold unit gelu(x) + gelu(-x) touches 0 there and is positive elsewhere. Expected: the 6 crossing
    alone, and no GELU change. Sampled mode gave a spurious second ReLU6 record or lost the crossing (n = 2), and
    counted the GELU touch twice at tol >= the sample spacing. Now a unit on its kink at a sample is read at probes
    just either side of it."""
    def relu6_input(x):
        return 8 * (F.gelu(x) + F.gelu(-x)) + 10 * (x - torch.tanh(x))

    class Net(nn.Module):
        def forward(self, x):
            return F.relu6(relu6_input(x)) + F.gelu(F.gelu(x) + F.gelu(-x))

    lo, hi = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for _ in range(200):  # relu6_input rises through 6 once on (0, 1)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if relu6_input(mid) < 6 else (lo, mid)
    x6 = float(lo)
    a, b = torch.full((1, 1), -1.0, dtype=torch.float64), torch.full((1, 1), 1.0, dtype=torch.float64)
    for n in (2, 4, 1024):
        for tol in (1e-9, 1e-3):
            for s, e, t6, piece in ((a, b, (x6 + 1) / 2, 2), (b, a, (1 - x6) / 2, 1)):
                p = path_crossings(Net(), s, e, method="sampled", n_samples=n, tol=tol, trace=False).paths[0]
                relu6 = [i for i, name in enumerate(p.sites) if "relu6" in name][0]
                m = p.records["site"] == relu6
                assert p.records["t"][m] == pytest.approx([t6], abs=tol), (n, tol)
                assert p.records["piece"][m].tolist() == [piece], (n, tol)
                # x itself passes through the thresholds of gelu(x), gelu(-x), tanh at the sample: one change each,
                # at t = 1/2; the outer GELU of gelu(x) + gelu(-x) only touches its threshold there: none
                assert p.per_layer == {"gelu": 1, "gelu#1": 1, "tanh": 1, "relu6": 1, "gelu#2": 1, "gelu#3": 1,
                                       "gelu#4": 0}, (n, tol, p.per_layer)
                assert (p.records["t"][~m] == 0.5).all()


def test_sampled_mode_on_ties_at_consecutive_samples_that_differ():
    """A 2 x 2 max-pool window along a polyline (a tester's, hand-computed): entries (0, -1, 4, -5) -> (1, 0, 1, -5)
    -> (0, 3, 2, -5). Entry 0 ties entry 2 at the knot (t = 1/2) without overtaking it, and entry 1 overtakes entry 2
    at t = 3/4: one change, 2 -> 1 at 3/4 (the exact engine's too). With 4 samples the windows are tied at t = 1/2
    and 3/4 with different first maxima: two ties, not a stretch on one (that gave 2 -> 0 and 0 -> 2 at 1/2 and lost
    the change at 3/4); the path the other way changes once, 1 -> 2 at 1/4."""
    net = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1, 3), nn.GELU(), nn.Linear(3, 2)).double()
    pts = torch.tensor([[0, -1, 4, -5], [1, 0, 1, -5], [0, 3, 2, -5]], dtype=torch.float64).reshape(1, 3, 1, 2, 2)
    for path, t, piece in ((pts, 0.75, 1), (pts.flip(1), 0.25, 2)):
        for n in (2, 4, 6, 64):
            p = polyline_crossings(net, path, method="sampled", n_samples=n, tol=1e-9, trace=False).paths[0]
            m = p.records["site"] == 0
            assert p.records["t"][m] == pytest.approx([t], abs=1e-9) and p.records["piece"][m].tolist() == [piece]


def test_only_the_ends_of_a_run_on_a_kink_are_kept():
    """Windows tied at every sample (zeros of a ReLU) keep two entries per run, not one per sample (a reviewer's CNN
    ray held 11.6 million, 3.9 GB); a change of tie-break piece inside a run splits it."""
    from polytope_lens.paths.sampled import _run_ends

    n = 12
    on = torch.ones(n, 3, dtype=torch.bool)
    p = torch.zeros(n, 3, dtype=torch.long)
    p[7:, 2] = 1  # unit 2: a different tie from sample 7 on
    z = torch.zeros(n, 3, dtype=torch.float64)
    inner = torch.ones(n, dtype=torch.bool)
    inner[0] = inner[-1] = False  # a path's ends
    (k, g, u, *_, starts, ends, prev_on, next_on), = _run_ends(0, on, z, p, inner, 0, False)
    got = sorted(zip(u.tolist(), g.tolist(), starts.tolist(), ends.tolist()))
    assert got == [(0, 1, True, False), (0, 10, False, True), (1, 1, True, False), (1, 10, False, True),
                   (2, 1, True, False), (2, 6, False, True), (2, 7, True, False), (2, 10, False, True)]
    assert prev_on.tolist() == [g_ == 7 for g_ in g.tolist()] and next_on.tolist() == [g_ == 6 for g_ in g.tolist()]


@pytest.mark.parametrize("n", [3, 5, 301])
def test_sampled_records_at_a_rays_zero_enter_the_exact_engines_pieces(n):
    """A ray's alpha = 0 is one of sampled mode's samples (a knot, like a polyline's corners): in a bias-free CNN
    every window is tied there, and bisection converging onto it (odd n) recorded the tie-break piece instead of
    the piece entered (a reviewer's sweep: 6 of 756 differences). Every sampled record is an exact one (site, unit,
    piece entered, t within tol); none is extra."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.ReLU6(), nn.Flatten(),
                      nn.Linear(96, 5)).double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64) * 3
    for alphas in ((-1.0, 1.0), (-1.0, 2.0)):
        ex = ray_crossings(m, x, layer="1.relu", alphas=alphas, method="exact", trace=False)
        sa = ray_crossings(m, x, layer="1.relu", alphas=alphas, method="sampled", n_samples=n, tol=1e-9, trace=False)
        for p, q in zip(sa.paths, ex.paths):
            want = {(int(s), int(u), int(pc)): float(t) for t, s, u, pc in
                    zip(q.records["t"], q.records["site"], q.records["unit"], q.records["piece"])}
            assert len(want) == q.crossings  # one record per (site, unit, piece) here
            for t, s, u, pc in zip(p.records["t"], p.records["site"], p.records["unit"], p.records["piece"]):
                assert abs(want[int(s), int(u), int(pc)] - t) <= 1e-9


def test_per_site_is_the_per_path_array_of_per_layer():
    """``res.per_site`` (P, sites) holds each path's crossings per site in ``res.sites`` order: row sums are
    ``counts``, column sums ``per_layer``, and each row equals a dense float64 sampling count (fine enough here)."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    a, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    res = path_crossings(m, a, b)
    assert res.per_site.shape == (6, 2) and res.per_site.dtype == np.int64
    assert (res.per_site.sum(1) == res.counts).all()
    assert dict(zip(res.sites, res.per_site.sum(0).tolist())) == res.per_layer
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64)[:, None, None]
    with torch.no_grad():
        z1 = m[0](a + t * (b - a))
        z2 = m[2](m[1](z1))
    dense = [((z[1:] > 0) != (z[:-1] > 0)).sum((0, 2)) for z in (z1, z2)]
    assert res.per_site.T.tolist() == [d.tolist() for d in dense]
    sampled = path_crossings(m, a, b, method="sampled")
    assert sampled.per_site.shape == (6, 2) and (sampled.per_site.sum(1) == sampled.counts).all()


def test_one_dimensional_endpoints_get_a_batch_axis_hint():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.tensor([0.5, 0.5, 1.0, 2.0])
    with pytest.raises(InvalidInputError, match=r"equal start and end points.*one path between two vectors is "
                                                r"x\[None\]"):
        path_crossings(m, x, torch.tensor([0.5, 0.5, 3.0, 1.0]))
    with pytest.raises(InvalidInputError, match=r"one row of shape \(\)\).*one example is x\[None\]"):
        path_crossings(m, x, x + 1.0)


class _StretchNet(nn.Module):
    """A = relu6(L1 x) (the ray's site), B = relu6(L2 A), C = relu(A + B): along a ray alpha * a with a[2] = 0, C's
    unit 2 reads B[2] alone and sits exactly on its kink once B[2] turns off (a tester's float64 net)."""

    def __init__(self, seed: int = 30):
        super().__init__()
        r = np.random.default_rng(seed)
        self.l1, self.a = nn.Linear(3, 6, dtype=torch.float64), nn.ReLU6()
        self.l2, self.b = nn.Linear(6, 6, dtype=torch.float64), nn.ReLU6()
        self.c, self.l3 = nn.ReLU(), nn.Linear(6, 3, dtype=torch.float64)
        with torch.no_grad():
            for lin, shape in ((self.l1, (6, 3)), (self.l2, (6, 6)), (self.l3, (3, 6))):
                lin.weight.copy_(torch.from_numpy(r.standard_normal(shape)))
                lin.bias.copy_(torch.from_numpy(r.standard_normal(shape[0])))
        self.x = torch.from_numpy(r.standard_normal((2, 3)) * 2)[:1]

    def forward(self, x):
        a = self.a(self.l1(x))
        return self.l3(self.c(a + self.b(self.l2(a))))


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_ray_keeps_units_on_a_kink_over_a_stretch_through_the_rays_zeros(evaluator):
    """A unit that reads the ray's input only through coordinates that stay 0 (a's zeros) holds an exact constant
    where the units it reads are off. The affine route bent it in closed form: the change of C[2] landed at t = 1
    instead of where B[2] turns off (a tester's float CNN ray: 119 crossings against 75). Oracle: each site's pieces
    from forward passes at 200,001 points along the ray."""
    m = _StretchNet().eval()
    res = ray_crossings(m, m.x, layer="a.relu6", alphas=(0.0, 2.0), method="exact", evaluator=evaluator, trace=False)
    p = res.paths[0]
    with torch.no_grad():
        a = m.a(m.l1(m.x))
        h = 2.0 * torch.linspace(0, 1, 200_001, dtype=torch.float64)[:, None] * a
        b_in = m.l2(h)
        c_in = h + m.b(b_in)
    dense = {"b.relu6": ((b_in > 0).long() + (b_in > 6).long()), "c.relu": (c_in > 0).long()}
    for site, pieces in dense.items():
        assert p.per_layer[site] == int((pieces[1:] != pieces[:-1]).sum()), (site, p.per_layer)
    sel = [(float(t), int(pc)) for t, s, u, pc in zip(p.records["t"], p.records["site"], p.records["unit"],
                                                       p.records["piece"]) if p.sites[s] == "c.relu" and u == 2]
    off = int(torch.nonzero(dense["c.relu"][:, 2] == 0)[0]) / 200_000  # the first sample where C[2] is off
    assert len(sel) == 1 and sel[0][1] == 0 and off - 1e-5 <= sel[0][0] <= off


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_ray_ends_are_exactly_alpha0_and_alpha1(evaluator):
    """alphas (-2, -0.5): alpha(1) was (1 - 4/3) * 1.5 = -0.4999999999999999, so a unit whose input reaches its kink
    exactly at alpha = -0.5 was counted crossing at t = 1 (hand-computed: z = 6 alpha + 3, on its kink at the end,
    piece 0 throughout; the same segment given by its ends has no crossing)."""
    m = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        for lin, w, b in ((m[0], 1.0, 0.0), (m[2], 2.0, 3.0), (m[4], 1.0, 0.0)):
            lin.weight.fill_(w), lin.bias.fill_(b)
    x = torch.tensor([[3.0]], dtype=torch.float64)
    ray = ray_crossings(m, x, layer="1.relu", alphas=(-2.0, -0.5), evaluator=evaluator, trace=False)
    seg = path_crossings(m, -2 * x, -0.5 * x, layer="1.relu", inputs=x, evaluator=evaluator, trace=False)
    assert ray.counts.tolist() == seg.counts.tolist() == [0]
    sampled = ray_crossings(m, x, layer="1.relu", alphas=(-2.0, -0.5), method="sampled", trace=False)
    assert sampled.counts.tolist() == [0]


def test_ray_notes_the_crossings_at_alpha_zero():
    """Hand-computed: site h = x (one unit, a = 1 at the input 1), then relu([h, -h, h - 0.5]) along alpha in
    (-1, 1): units 0 and 1 cross at alpha = 0 (t = 1/2), unit 2 at alpha = 0.5. The note counts 2 of 3."""
    m = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        m[0].weight.fill_(1.0), m[0].bias.fill_(0.0)
        m[2].weight.copy_(torch.tensor([[1.0], [-1.0], [1.0]])), m[2].bias.copy_(torch.tensor([0.0, 0.0, -0.5]))
    x = torch.ones(1, 1, dtype=torch.float64)
    res = ray_crossings(m, x, layer="1.relu", alphas=(-1.0, 1.0), trace=False)
    p = res.paths[0]
    assert p.per_layer["3.relu"] == 3 and sorted(p.alpha(p.records["t"]).tolist()) == [0.0, 0.0, 0.5]
    assert p.crossings == 3 and any(n.startswith("2 of 3 crossings lie at alpha = 0") for n in res.notes), res.notes
    assert not any("alpha = 0" in n for n in ray_crossings(m, x, layer="1.relu", alphas=(0.25, 1.0)).notes)
    # sampled mode locates those changes next to the knot, within its tolerance: noted as within tol, not at it (a
    # tester's GPT-2 ray at tol 1e-3: 3 crossings "at alpha = 0" were at alpha 0.001-0.003)
    sampled = ray_crossings(m, x, layer="1.relu", alphas=(-1.0, 1.0), method="sampled", trace=False)
    assert any(n.startswith("2 of 3 crossings were located within tol (1e-09 in t, 2e-09 in alpha) of alpha = 0, "
                            "so they may lie") for n in sampled.notes), sampled.notes
    # alpha at the knot is exactly 0 in the JSON too (alphas whose t_0 = 0.1 / 0.8 is not exact)
    odd = ray_crossings(m, x, layer="1.relu", alphas=(-0.1, 0.7), trace=False).paths[0]
    assert sorted(rec["alpha"] for rec in odd.to_dict()["records"])[:2] == [0.0, 0.0]
    assert isinstance(odd.alpha(0.5), float) and odd.alpha(1.0) == 0.7  # a number for a number, the ends exact


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_polyline_resting_on_zero_for_one_leg(evaluator):
    """A polyline at the ReLU6 site A whose coordinates 0-2 are 0 on its first leg only: C = relu(A + B) reads A
    there through coordinates that stay 0, so C[k] sits exactly on its kink where B[k] is off. 'Zero at every knot'
    missed it (the affine route moved or lost C's changes, a tester's 5 seeds of 25). Oracle: each site's pieces at
    100,001 points per leg."""
    m = _StretchNet(seed=3).eval()
    rng = np.random.default_rng(3)
    for _ in range(3):
        k0, k1, k2 = (torch.from_numpy(rng.uniform(0, 6, 6)) for _ in range(3))
        k0[:3] = 0
        k1[:3] = 0
        knots = torch.stack([k0, k1, k2])
        res = polyline_crossings(m, knots[None], layer="a.relu6", inputs=m.x, evaluator=evaluator, trace=False)
        s = torch.linspace(0, 1, 100_001, dtype=torch.float64)[:, None]
        h = torch.cat([k0 + s * (k1 - k0), (k1 + s * (k2 - k1))[1:]])
        with torch.no_grad():
            b_in = m.l2(h)
            c_in = h + m.b(b_in)
        dense = {"b.relu6": (b_in > 0).long() + (b_in > 6).long(), "c.relu": (c_in > 0).long()}
        got = res.paths[0].per_layer
        assert got == {k: int((v[1:] != v[:-1]).sum()) for k, v in dense.items()}, got


def test_a_texts_paths_do_not_depend_on_the_padding_it_is_batched_with():
    """A text ray, segment or polyline at a site runs at the text's own length: batched beside a longer text (so
    padded), it gives the same records and length as alone. Before, the padding positions' crossings were counted
    (on MiniLM: 10,746 more crossings, and a longer path) and a text's count depended on its batch."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                vocab_size=30)).eval()
    ids = torch.tensor([[1, 5, 7, 9, 2, 0, 0], [1, 4, 4, 6, 8, 3, 2]])
    mask = (torch.arange(7) < torch.tensor([[5], [7]])).long()
    padded, alone = {"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1, :5],
                                                                 "attention_mask": mask[:1, :5]}
    site = "encoder.layer.0.intermediate.intermediate_act_fn.gelu"
    kw = dict(layer=site, n_samples=32, tol=1e-6, trace=False)
    both = ray_crossings(bert, padded, alphas=(0.5, 3.0), **kw)
    one = ray_crossings(bert, alone, alphas=(0.5, 3.0), **kw)
    assert both[0].crossings == one[0].crossings > 0 and both[0].length == pytest.approx(one[0].length, rel=1e-12)
    np.testing.assert_allclose(both[0].records["t"], one[0].records["t"], atol=1e-9)
    assert both[1].index == 1 and any("own lengths (5, 7 positions of 7)" in n for n in both.notes)
    a = site_activations(bert, padded, layer=site)
    b = a.flip(0)  # the other text's activations, padding and all
    seg = path_crossings(bert, a, b, inputs=padded, **kw)
    seg_alone = path_crossings(bert, a[:1, :5], b[:1, :5], inputs=alone, **kw)
    assert seg[0].crossings == seg_alone[0].crossings and seg[0].length == pytest.approx(seg_alone[0].length)
    line = polyline_crossings(bert, torch.stack([a, b, a * 0.5], 1), inputs=padded, **kw)
    line_alone = polyline_crossings(bert, torch.stack([a, b, a * 0.5], 1)[:1, :, :5], inputs=alone, **kw)
    assert line[0].crossings == line_alone[0].crossings
    np.testing.assert_allclose(line[0].t, line_alone[0].t, atol=1e-9)


def test_sampled_polylines_keep_their_knots_as_breakpoints():
    """A polyline knot is a breakpoint in both modes (PathResult.t: 'including 0 and 1 and polyline knots'); sampled
    results left it out, so a knot without a crossing gave one region fewer than the exact engine."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    pts = 0.05 * torch.randn(4, 3, 2, dtype=torch.float64)  # short polylines: few crossings, knots mostly alone
    exact, sampled = polyline_crossings(m, pts), polyline_crossings(m, pts, method="sampled", n_samples=256)
    for e, s in zip(exact.paths, sampled.paths):
        assert s.n_regions == e.n_regions and len(s.t) == len(e.t)
        np.testing.assert_allclose(s.t, e.t, atol=1e-8)
        knot = np.linalg.norm(pts[e.index, 1] - pts[e.index, 0]) / (
            np.linalg.norm(pts[e.index, 1] - pts[e.index, 0]) + np.linalg.norm(pts[e.index, 2] - pts[e.index, 1]))
        assert np.isclose(s.t, knot, atol=1e-12).any()


def test_sampled_paths_refuse_a_model_that_overflows_along_them():
    """A ray to alpha = 1e300 overflows before LayerNorm (oracle: the unit inputs there are inf/NaN in float64); NaN
    read as a piece gave spurious crossings (1 crossing at 1e100, 3 at 1e300). Now a one-line error says where."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        h = m[2](m[1](1e300 * m[0](x)))
        assert not torch.isfinite(m[3](h)).all()
    ray_crossings(m, x, layer="1.relu", alphas=(0.5, 1e100), n_samples=16)  # finite all along: runs
    with pytest.raises(InvalidInputError, match=r"unit inputs of site '4.gelu' are NaN or infinite on path 0 at t = "
                                                r".*use a smaller range of alpha"):
        ray_crossings(m, x, layer="1.relu", alphas=(0.5, 1e300), n_samples=16)
    with pytest.raises(InvalidInputError, match=r"'n_samples' parameter of ray_crossings must be an int in \[2, "):
        ray_crossings(m, x, layer="1.relu", n_samples=2**63 - 1)


def test_encoded_inputs_are_taken_as_their_tensor_everywhere():
    """A bundle's encode() gives ModelInputs; ray_crossings and site_activations took it, path_crossings, slices and
    local complexity refused it or crashed (slice_through(..., inputs=x[:1]) raised AttributeError). Oracle: the
    same call on the tensor inside."""
    from polytope_lens.models._bundle import ModelInputs
    from polytope_lens.slices import local_complexity, slice_through

    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    t = torch.randn(3, 3, dtype=torch.float64)
    x = ModelInputs({"input": t})  # keyed by the forward argument, as a bundle encodes
    assert path_crossings(m, x[:1], x[1:2]).counts.tolist() == path_crossings(m, t[:1], t[1:2]).counts.tolist()
    a = site_activations(m, x, layer="1.relu")
    kw = dict(layer="1.relu", until="3.relu")
    assert slice_through(m, a[0], a[1], a[2], inputs=x[:1], **kw).num_regions == \
        slice_through(m, a[0], a[1], a[2], inputs=t[:1], **kw).num_regions
    assert (local_complexity(m, x, radius=0.1, n_dirs=2).total == local_complexity(m, t, radius=0.1, n_dirs=2).total
            ).all()
    text = ModelInputs({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)})
    with pytest.raises(InvalidInputError, match="token ids cannot be interpolated; draw the path at a site"):
        path_crossings(m, text[:1], text[1:])


class _ClampOut(nn.Module):
    def __init__(self, out_form: bool):
        super().__init__()
        torch.manual_seed(1)
        self.l1, self.l2, self.l3, self.out_form = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3), out_form

    def forward(self, x):
        h = self.l1(x)
        if self.out_form:
            torch.clamp(h, -0.2, 0.3, out=h)  # the caller reads h, not the return value
        else:
            h.clamp_(-0.2, 0.3)
        return self.l3(F.relu(self.l2(h)))


@pytest.mark.parametrize("evaluator", ["affine", "graph"])
def test_a_site_called_with_out_is_followed_like_its_in_place_form(evaluator):
    """torch.clamp(h, lo, hi, out=h) failed an internal check ('please report'): a replaced value was returned but
    not written into out, which the caller reads. Oracle: the same model written h.clamp_(lo, hi), and dense
    sampling of both sites' pieces."""
    g = torch.Generator().manual_seed(3)
    a, b = 2 * torch.randn(1, 4, generator=g, dtype=torch.float64), 2 * torch.randn(1, 4, generator=g,
                                                                                     dtype=torch.float64)
    out_form = path_crossings(_ClampOut(True).double(), a, b, evaluator=evaluator)
    in_place = path_crossings(_ClampOut(False).double(), a, b, evaluator=evaluator)
    assert out_form.exact and list(out_form[0].per_layer.values()) == list(in_place[0].per_layer.values())
    np.testing.assert_allclose(out_form[0].records["t"], in_place[0].records["t"], atol=1e-12)
    m = _ClampOut(False).double()
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        h = m.l1(a + t * (b - a))
        c = (h > 0.3).long() + (h >= -0.2).long()
        r = (m.l2(h.clamp(-0.2, 0.3)) > 0).long()
    dense = int((c[1:] != c[:-1]).sum() + (r[1:] != r[:-1]).sum())
    assert out_form[0].crossings == dense


def test_a_site_without_the_batch_first_is_a_one_line_error():
    """A sequence-first layer (nn.TransformerEncoderLayer(batch_first=False) in a batch-first model) crashed paths
    and slices with raw reshape or matmul errors; exact mode blamed an unseen LayerNorm and sent users to sampled
    mode, which crashed too."""
    from polytope_lens.slices import slice_through

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.enc(x.transpose(0, 1))[-1])

    m = SeqFirst().double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        assert m(x).shape == (3, 3)  # the model itself runs
    for method in ("auto", "exact", "sampled"):
        with pytest.raises(InvalidInputError, match=r"site 'enc.relu' applies its nonlinearity to a tensor of shape "
                                                    r"\(5, 1, 16\) for one example; .* batch on its own first axis"):
            path_crossings(m, x[:1], x[1:2], method=method, n_samples=8)
    with pytest.raises(InvalidInputError, match="batch on its own first axis"):
        slice_through(m, x[0], x[1], x[2])

    class EarlyTransposed(nn.Module):  # the odd site runs before the ray's site: rays there never follow it
        def __init__(self, transposed: bool):
            super().__init__()
            torch.manual_seed(4)
            self.l1, self.l2, self.l3, self.t = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2), transposed
            self.a1, self.a2, self.a3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

        def forward(self, v):
            h = self.l1(v)
            h = self.a1(h.t()).t() if self.t else self.a1(h)
            return self.l3(self.a3(self.l2(self.a2(h))))

    v = torch.randn(4, 3, dtype=torch.float64)
    v = v[(EarlyTransposed(False).double().a2(EarlyTransposed(False).double().l1(v)) > 0).any(1)]  # no zero rays
    counts = [ray_crossings(EarlyTransposed(t).double(), v, layer="a2.relu", alphas=(0.5, 3.0)).counts.tolist()
              for t in (True, False)]
    assert counts[0] == counts[1]


def test_padded_text_batches_edge_cases():
    """Review of the per-text runs: one alpha = 0 note for the batch (each group added its own); an error inside a
    group says which rows of the batch it means; a row without tokens, left padding and units= (which index the
    padded layout) are a one-line error or a note, not a crash or a silent count."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                vocab_size=30)).eval()
    ids = torch.tensor([[1, 5, 7, 9, 2, 0, 0], [1, 4, 4, 6, 8, 3, 2], [1, 6, 2, 0, 0, 0, 0]])
    right = (ids != 0).long()
    site = "encoder.layer.0.intermediate.intermediate_act_fn.gelu"
    kw = dict(layer=site, n_samples=16, tol=1e-6, trace=False)
    res = ray_crossings(bert, {"input_ids": ids, "attention_mask": right}, alphas=(-1.0, 2.0), **kw)
    zero_notes = [n for n in res.notes if "where the site's output is 0" in n]
    assert len(zero_notes) <= 1 and any("own lengths" in n for n in res.notes)
    a = site_activations(bert, {"input_ids": ids, "attention_mask": right}, layer=site)
    end = a + 1
    end[2, :3] = a[2, :3]  # row 2 (3 tokens) moves only at its padding: equal ends once run at its own length
    with pytest.raises(InvalidInputError, match=r"Paths \[0\] .* equal start and end points.*in the rows \[2\] of "
                                                r"the batch, texts of 3 positions"):
        path_crossings(bert, a, end, inputs={"input_ids": ids, "attention_mask": right}, **kw)
    with pytest.raises(InvalidInputError, match=r"Rows \[2\] of the 'inputs' of ray_crossings have no tokens"):
        ray_crossings(bert, {"input_ids": ids, "attention_mask": right * torch.tensor([[1], [1], [0]])}, **kw)
    left = right.flip(1)
    res = ray_crossings(bert, {"input_ids": ids.flip(1), "attention_mask": left}, alphas=(0.5, 2.0), **kw)
    assert any("pads on the left or has holes" in n for n in res.notes)


def test_units_on_a_padded_batch_keep_the_padded_layout():
    """units= index the padded layout (position * units + unit); a per-text run refused index 31 of a 7 x 5 site as
    out of range for a 4-token group. Now the batch is not split, and a note says padding positions are counted."""

    class Toy(nn.Module):  # an exact "text" model: embeddings, masked mean mixing, ReLUs
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.emb, self.r1, self.l2, self.r2 = nn.Embedding(10, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU()

        def forward(self, input_ids, attention_mask):
            h = self.r1(self.emb(input_ids) * attention_mask[..., None])
            return self.r2(self.l2(h)).mean(1)

    m = Toy().double()
    ids = torch.tensor([[1, 2, 3, 4, 0, 0, 0], [5, 6, 7, 8, 9, 1, 2]])
    base = {"input_ids": ids, "attention_mask": (torch.arange(7) < torch.tensor([[4], [7]])).long()}
    res = ray_crossings(m, base, layer="r1.relu", alphas=(-1.0, 2.0), units=[31], trace=False)
    assert any("units= index the padded layout" in n for n in res.notes)
    full = ray_crossings(m, index_inputs(base, torch.tensor([1])), layer="r1.relu", alphas=(-1.0, 2.0), units=[31],
                         trace=False)
    assert res[1].crossings == full[0].crossings


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_rays_over_many_orders_of_magnitude_equal_log_spaced_sampling(evaluator):
    """Found at stop 35: ties were a fixed 1e-12 in t, which on a ray over (1, 1e9) is 1e-3 in alpha, where the
    kinks crowd: distinct crossings were merged and moved (the digits CNN failed its affine check), and over
    (1, 1e200) everything up to alpha ~1e188 was one tie (747 crossings, 786 now). Ties on rays are relative to
    alpha. Oracle: dense sampling at log-spaced alphas; and the ray over (1, 3) gives the same records there."""
    cnn = SmallCNN(seed=2)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    site = [s.name for s in __import__("polytope_lens").list_sites(cnn, lambda: cnn(x[:1]))][0]
    a = site_activations(cnn, x, layer=site)
    near = ray_crossings(cnn, x, layer=site, alphas=(1.0, 3.0), evaluator=evaluator, trace=False)
    for top in (1e9, 1e200):
        wide = ray_crossings(cnn, x, layer=site, alphas=(1.0, top), evaluator=evaluator, trace=False)
        assert wide.tolerance["tie_tol_in"] == "alpha, relative"
        for i, p in enumerate(wide.paths):
            decades = math.log10(top)
            want = dense_count(cnn, lambda t, i=i: (10.0 ** (decades * t)).reshape(-1, *[1] * (a.dim() - 1)) * a[i],
                               site=site, base=x[i:i + 1].double(), n_max=2 ** 19)
            assert p.per_layer == {k: v for k, v in want.items() if k in wide.sites}
            q = near.paths[i]
            inside = p.alpha(p.records["t"]) <= 3.0
            for key in ("site", "unit", "piece"):
                np.testing.assert_array_equal(p.records[key][inside], q.records[key])
            np.testing.assert_allclose(p.alpha(p.records["t"][inside]), q.alpha(q.records["t"]), rtol=1e-12)


def test_sampled_rays_too_wide_for_their_samples_say_so():
    """Evenly spaced, a sampled ray's samples over (1, 1e9) are ~1.6e7 apart with 64 samples, so the low end, where
    crossings crowd, was resolved only unit by unit; half the samples are now spaced evenly in asinh(alpha), and
    positions are known to tol in t = 1 in alpha. The result says so; a ray over (0.25, 4) does not."""
    cnn = SmallCNN(seed=2)
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    site = [s.name for s in __import__("polytope_lens").list_sites(cnn, lambda: cnn(x[:1]))][0]
    wide = ray_crossings(cnn, x, layer=site, alphas=(1.0, 1e9), method="sampled", n_samples=64, trace=False)
    exact = ray_crossings(cnn, x, layer=site, alphas=(1.0, 1e9), trace=False)
    assert wide.counts[0] <= exact.counts[0]
    assert sum(n.startswith("samples evenly spaced in alpha would be 1.56e+07 apart, more than the |alpha| around "
                            "which the ray's kinks crowd (1): 32 of the 65 samples were spaced evenly in asinh")
               and "known to tol in t (1 in alpha)" in n for n in wide.notes) == 1
    through = ray_crossings(cnn, x, layer=site, alphas=(-1.0, 1e9), method="sampled", n_samples=64, trace=False)
    # a range holding 0 too
    assert any(n.startswith("samples evenly spaced in alpha would be 1.56e+07 apart") for n in through.notes)
    narrow = ray_crossings(cnn, x, layer=site, alphas=(0.25, 4.0), method="sampled", n_samples=64, trace=False)
    assert not any(n.startswith("samples") for n in narrow.notes + exact.notes)


@pytest.mark.parametrize("alphas", [(-1.0, 2.0), (-0.5, 1e3), (-3.0, 7.0)])
def test_direction_rays_through_a_point_where_units_tie_count_each_change_once(alphas):
    """Found at stop 35 (a regression of the day's relative ties): a ray 0 + alpha * d through a bias-free net, where
    every later unit sits on its kink at alpha = 0, had no knot there, so its points near 0 were interpolated between
    the ends and their rounding, no longer tied, counted 28 or 34 crossings for 22. Direction rays get the knot at
    alpha = 0 that rays alpha * a have. Oracle: the units whose piece differs between alpha = -1 and 1 (the
    pattern is constant on each side of 0 in a bias-free ReLU net)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
                      nn.Linear(16, 16, bias=False), nn.ReLU()).double()
    x = torch.randn(1, 8, dtype=torch.float64)
    d = site_activations(m, x, layer="1.relu")
    sides = [torch.cat([torch.relu(m[2](al * d)), torch.relu(m[4](torch.relu(m[2](al * d))))], 1) > 0
             for al in (-1.0, 1.0)]
    want = int((sides[0] != sides[1]).sum())
    res = ray_crossings(m, torch.zeros_like(x), layer="1.relu", alphas=alphas, direction=d, trace=False)
    assert want > 10 and res.counts.tolist() == [want] and res.paths[0].ties == 1
    assert res.counts.tolist() == ray_crossings(m, x, layer="1.relu", alphas=alphas, trace=False).counts.tolist()


def test_negative_rays_are_resolved_up_to_what_t_can_place():
    """Found at stop 35: rays whose end nearest alpha = 0 is alpha1 crowd their kinks near t = 1, where t's spacing
    is (alpha1 - alpha0) * 1.1e-16 in alpha: (-1e9, -1) failed the affine checks ('not affine', or 'internal check
    failed: please report'). alpha is now measured from that end (``ray_alpha``), so (-1e6, -1) runs and equals
    log-spaced dense sampling; ranges t cannot resolve to the affine checks' 1e-9 ((-1e8, -1) failed them on this
    CNN) are one-line errors that say where to split."""
    cnn = SmallCNN(seed=2)
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    site = [s.name for s in __import__("polytope_lens").list_sites(cnn, lambda: cnn(x[:1]))][0]
    a = site_activations(cnn, x, layer=site)
    res = ray_crossings(cnn, x, layer=site, alphas=(-1e6, -1.0), trace=False)
    want = dense_count(cnn, lambda t: -(10.0 ** (6 * (1 - t))).reshape(-1, *[1] * (a.dim() - 1)) * a[0],
                       site=site, base=x.double(), n_max=2 ** 19)
    assert res.paths[0].per_layer == {k: v for k, v in want.items() if k in res.sites} and res.counts[0] > 0
    for alphas, hint in (((-1e8, -1.0), r"split it where \|alpha\| is about the geometric mean of its ends, "
                                        r"\(-1e\+08, -1e\+04\) and \(-1e\+04, -1\)"),
                         ((-1e9, 1.0), "split it at alpha = 0"),
                         ((-1e9, 1e9), r"\(\(0, 1e\+09\) runs\), ranges reaching 0 from below only when at most "
                                       "9e\\+06 wide")):
        with pytest.raises(InvalidInputError, match=hint):
            ray_crossings(cnn, x, layer=site, alphas=alphas)
    assert ray_crossings(cnn, x, layer=site, alphas=(-1e9, 1.0), method="sampled", n_samples=64).counts[0] >= 0


@pytest.mark.parametrize("dtype,tie_tol", [(torch.float64, 0.0), (torch.float32, 1e-12)])
def test_a_crossing_that_rounds_onto_the_next_breakpoint_passes_the_checks(dtype, tie_tol):
    """Found at stop 35 by a reviewer: a crossing that rounds onto the next breakpoint leaves an interval of width 0,
    where the affine check's new midpoint weight was 0/0 and the run failed as an overflow. Hand-built: site 1 is
    relu(x) along x from -1 to 1 (kink at t = 1/2), site 2 relu(h - k) with k one ulp below 1 (its kink at t just
    below 1, which rounds to 1): two crossings."""
    k = 1 - torch.finfo(dtype).eps / 2
    m = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        for lin, bias in ((m[0], 0.0), (m[2], -k), (m[4], 0.0)):
            lin.weight.fill_(1.0), lin.bias.fill_(bias)
    res = path_crossings(m, -torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                         dtype=dtype, tie_tol=tie_tol)
    assert res.counts.tolist() == [2] and res.paths[0].per_layer == {"1.relu": 1, "3.relu": 1}


def test_declared_piecewise_linear_sites_run_sampled_and_say_why():
    """Found at stop 35 by a reviewer: a declared site of a piecewise-linear activation (its module's output is the
    unit input; the model applies the activation itself, out of capture's sight) has no ``apply``, and exact paths
    ended in a raw TypeError. Exact mode now refuses in one line; auto runs sampled and says why. Oracle: the model
    relu(x) * (x > 0) applied by hand after a declared Linear, sampled densely."""
    class Formula(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.out = nn.Linear(2, 6), nn.Linear(6, 2)

        def forward(self, x):
            z = self.pre(x)
            return self.out(z * (z > 0))  # relu as a formula: no torch call capture sees as a site

    torch.manual_seed(0)
    m = Formula().double()
    a, b = torch.randn(1, 2, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    with pytest.raises(NotPiecewiseLinearError, match="'pre' is a declared site .* use method='sampled'"):
        path_crossings(m, a, b, declared_sites={"pre": "relu"}, method="exact")
    res = path_crossings(m, a, b, declared_sites={"pre": "relu"}, n_samples=4096)
    assert res.method == "sampled" and "auto chose sampled: declared site pre" in res.notes[0]
    with torch.no_grad():
        z = m.pre(a + torch.linspace(0, 1, 100001, dtype=torch.float64)[:, None] * (b - a))
    assert res.counts.tolist() == [int(((z[1:] > 0) != (z[:-1] > 0)).sum())]


@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_max_pool_ties_scale_with_a_ray_from_a_tiny_alpha(evaluator):
    """Found at stop 35: max pooling tied window entries within tol * max(1, |max|), an absolute 1e-9 where the pool
    reads a site scaled towards 0, so on a ray of that site from alpha = 1e-9 every window was tied at the start and
    'changed' to its true maximum at t = 0 (11 and 8 crossings here). The tie band's floor is now min(1, the
    point's largest |entry|). Oracles: argmax of alpha * a is the same for every alpha > 0, so the pool (which reads
    the ray's site directly) crosses nowhere; the later sites equal log-spaced dense sampling."""
    cnn = SmallCNN(seed=2)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    sites = [s.name for s in __import__("polytope_lens").list_sites(cnn, lambda: cnn(x[:1]))]
    assert sites[:2] == ["relu6", "max_pool2d"]
    a = site_activations(cnn, x, layer="relu6")
    res = ray_crossings(cnn, x, layer="relu6", alphas=(1e-9, 1.0), evaluator=evaluator, trace=False)
    for i, p in enumerate(res.paths):
        assert p.per_layer["max_pool2d"] == 0 and p.crossings > 30
        want = dense_count(cnn, lambda t, i=i: (10.0 ** (-9.0 * (1 - t))).reshape(-1, *[1] * (a.dim() - 1)) * a[i],
                           site="relu6", base=x[i:i + 1].double(), n_max=2 ** 19)
        assert p.per_layer == {k: v for k, v in want.items() if k in res.sites}


# ------------------------------------------------------ sampled rays too wide for even samples: the asinh grid
# Evenly spaced samples on a ray over (1, 1e9) are ~1e6 apart in alpha while its kinks crowd between 1 and ~1e3:
# every unit crossing more than once there was undercounted (the digits CNN: 752 of 786 with any n_samples). Such
# rays now space half their samples evenly in asinh(alpha / crowd scale) (``sampled.wide_ray_grid``).
def _wide_gelu_mlp(width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, o in ((8, width), (width, width), (width, width), (width, 3)):
        lin = nn.Linear(i, o)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(o, i, generator=g) / math.sqrt(i))
            lin.bias.copy_(torch.randn(o, generator=g))
        layers += [lin, nn.GELU()]
    return nn.Sequential(*layers[:-1]).double().eval(), torch.randn(4, 8, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("alphas,n", [((1.0, 1e9), 1024), ((1.0, 1e9), 64), ((-1.0, 1e9), 256), ((-1e6, -1.0), 256),
                                      ((-1e3, 1e3), 128), ((1e-2, 1e8), 33), ((0.0, 3.0), 2), ((5e3, 1e9), 100)])
def test_wide_sampled_ray_grid_keeps_the_sample_count_and_bounds_the_spacing(alphas, n):
    """The grid of a wide ray holds n_samples + 1 samples, 0 and 1 among them; no two neighbours are further apart
    in alpha than the even half's step, and inside the asinh window no further than du * sqrt(s^2 + alpha^2) (the
    mean value theorem on s * sinh(u), alpha the neighbour further from 0): relatively du apart where kinks crowd.
    Rays whose even samples are at most the crowd scale apart keep them (None)."""
    from polytope_lens.paths.geometry import ray_alpha
    from polytope_lens.paths.sampled import wide_ray_grid

    w = wide_ray_grid(alphas, n)
    assert w is not None and w.n_even + w.n_asinh == n + 1 and w.step == (alphas[1] - alphas[0]) / n
    t = w.t(alphas, torch.float64, "cpu")
    assert len(t) == n + 1 and t[0] == 0 and t[-1] == 1 and bool((t[1:] > t[:-1]).all())
    al = ray_alpha(t, alphas).numpy()
    gap, far = np.diff(al), np.maximum(np.abs(al[1:]), np.abs(al[:-1]))
    assert (gap <= w.even_step * (1 + 1e-12)).all()
    lo, hi = w.window
    inside = (al[:-1] >= lo) & (al[1:] <= hi)
    s = w.scale
    assert (gap[inside] <= w.du * np.sqrt(s ** 2 + far[inside] ** 2) * (1 + 1e-9) + 1e-9 * far[inside]).all()
    assert inside.sum() >= w.n_asinh - 1  # the asinh samples fill the window
    for even in [((0.25, 16.0), 48), ((0.25, 16.0), 512), ((0.0, 2.0), 2), ((0.0, 63.5), 64), ((-3.0, 50.0), 64),
                 ((1.0, 1e9), 10 ** 9), ((2e3, 1e4), 100)]:
        assert wide_ray_grid(*even) is None, even


def test_wide_sampled_rays_reach_the_exact_count_on_the_digits_cnn():
    """The digits CNN at stem.2.relu over (1, 1e9) (and (-1e6, -1)): sampled counts are a lower bound of the exact
    engine's for every unit, and now reach 99% of it on every ray (784, 776, 671 of 786, 776, 671 with 1,024
    samples; 752, 746, 628 with evenly spaced samples, 96%, whatever their number); with a small tol every sampled
    crossing lies within 1e-6 (relative) of the exact one of its unit and enters the same piece. Oracle: exact
    mode on the same piecewise-linear rays."""
    from collections import Counter

    from polytope_lens.data import load_data
    from polytope_lens.models import load_model

    b = load_model("digits-cnn")
    x = b.encode(load_data("digits"), [0, 1, 7]).tensors[b.input_name]
    exact = {}
    for alphas, n, share in (((1.0, 1e9), 1024, 0.99), ((1.0, 1e9), 64, 0.98), ((-1e6, -1.0), 256, 0.99)):
        if alphas not in exact:
            exact[alphas] = ray_crossings(b.module, x, layer="stem.2.relu", alphas=alphas, trace=False)
        sampled = ray_crossings(b.module, x, layer="stem.2.relu", alphas=alphas, method="sampled", n_samples=n,
                                tol=1e-15, trace=False)
        assert sampled.method == "sampled" and any("asinh(alpha / 1)" in note for note in sampled.notes)
        for e, s in zip(exact[alphas].paths, sampled.paths):
            assert s.crossings >= share * e.crossings, (alphas, n, s.crossings, e.crossings)
            rec = [p.records for p in (e, s)]
            key = [r["site"].astype(np.int64) * 10 ** 6 + r["unit"] for r in rec]
            want, got = (Counter(k.tolist()) for k in key)
            assert all(c <= want[k] for k, c in got.items())  # unit by unit, a lower bound
            same = [k for k, c in got.items() if c == want[k]]
            assert len(same) >= 0.98 * len(want)
            ordered = []  # (alphas, pieces) of the units counted alike, unit by unit in t
            for r, k, p in zip(rec, key, (e, s)):
                order = np.lexsort((r["t"], k))
                keep = np.isin(k[order], same)
                ordered.append((p.alpha(r["t"][order][keep]), r["piece"][order][keep]))
            (alpha_e, piece_e), (alpha_s, piece_s) = ordered
            np.testing.assert_allclose(alpha_s, alpha_e, rtol=1e-6)
            np.testing.assert_array_equal(piece_s, piece_e)


@pytest.mark.parametrize("alphas", [(1e-2, 1e8), (-1e8, -1e-2), (-1e8, 1e8)])
def test_wide_sampled_gelu_rays_equal_log_spaced_dense_signs(alphas):
    """A GELU MLP (smooth: sampled mode) scaled over ten orders of magnitude: every unit's sampled crossings are at
    most its sign changes along a dense log-spaced grid of alpha (2^16 samples, the same changes as 2^14), in total
    equal to them, and placed within 1e-3 relative of them (the dense grid's own ratio is 1.0004). Evenly spaced
    samples gave 206 of the 224 on (1e-2, 1e8). Oracle: the unit inputs' signs at the dense alphas, in float64."""
    from collections import Counter

    net, x = _wide_gelu_mlp()
    site = "1.gelu"
    a = site_activations(net, x, layer=site)
    res = ray_crossings(net, x, layer=site, alphas=alphas, n_samples=1024, tol=1e-15, trace=False)
    assert res.method == "sampled" and any("asinh(alpha / 1)" in n for n in res.notes)

    def dense(i, n):  # (alpha at the change, site, unit) of every sign change between dense samples
        lo, hi = math.log10(min(abs(v) for v in alphas if v)), math.log10(max(abs(v) for v in alphas))
        sides = [np.sign(v) * 10.0 ** np.linspace(*((lo, hi) if v > 0 else (hi, lo)), n + 1) for v in alphas]
        if alphas[0] < 0 < alphas[1]:  # a range holding 0: down to 1e-6 on each side
            sides = [-10.0 ** np.linspace(hi, -6.0, n + 1), 10.0 ** np.linspace(-6.0, hi, n + 1)]
        al = np.concatenate(sides) if alphas[0] < 0 < alphas[1] else sides[0]
        mid = np.sign(al[1:]) * np.sqrt(np.maximum(al[1:] * al[:-1], 0.0))  # geometric midpoints (0 across 0)
        out = []
        for name, p in _pieces_along(net, torch.as_tensor(al), lambda t: t.reshape(-1, 1) * a[i], site=site,
                                     base=x[i:i + 1]).items():
            j, u = torch.nonzero(p[1:] != p[:-1], as_tuple=True)
            out += [(float(mid[k]), name, v) for k, v in zip(j.tolist(), u.tolist())]
        return out

    for i, p in enumerate(res.paths):
        fine = dense(i, 2 ** 16)
        assert len(fine) == len(dense(i, 2 ** 14))  # the oracle is stable
        want = Counter((name, u) for _, name, u in fine)
        got = Counter(zip((res.sites[k] for k in p.records["site"]), p.records["unit"].tolist()))
        assert all(c <= want[k] for k, c in got.items()) and p.crossings == len(fine), (i, p.crossings, len(fine))
        for (name, u), c in got.items():
            where = np.sort([al for al, n2, u2 in fine if (n2, u2) == (name, u)])
            mine = np.sort(p.alpha(p.records["t"][(np.asarray(res.sites)[p.records["site"]] == name)
                                                  & (p.records["unit"] == u)]))
            np.testing.assert_allclose(mine, where, rtol=1e-3)


# ------------------------------------------------------------------------- affine route: bends on their own scale
def _exact_bend(zl, zr, u, v):
    """The function ``_bend`` describes, in exact rational arithmetic from its float inputs: zl + s0 u +
    sum_j v_j max(0, u - u_j), s0 fixed by zr at u = 1 (one interval; zl, zr (d,), u (n,), v (n, d))."""
    from fractions import Fraction as Q

    zl, zr = [Q(float(a)) for a in zl], [Q(float(a)) for a in zr]
    us, vs = [Q(float(a)) for a in u], [[Q(float(a)) for a in row] for row in v]
    out = []
    for ui in us:
        row = []
        for k in range(len(zl)):
            s0 = zr[k] - zl[k] - sum((1 - uj) * vj[k] for uj, vj in zip(us, vs))
            row.append(float(zl[k] + s0 * ui + sum(vj[k] * max(Q(0), ui - uj) for uj, vj in zip(us, vs))))
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 100, 1025, 5000])
@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_rows_in_runs_equals_a_cumsum_per_run(n, reverse):
    """``_cumsum_rows`` with runs (``seg``) restarts at each run, from the run's first row or (``reverse``) its
    last, across block boundaries and in the recursive block totals (1025, 5000 rows; runs longer than a block and
    of one row), against torch's cumsum of each run alone; and a run's sums never pass through another's, so a run
    of values near 1 after one near 1e12 keeps its own digits (subtracting a running sum over both kept 1e-4)."""
    from polytope_lens.paths.exact import _cumsum_rows

    g = torch.Generator().manual_seed(n)
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(torch.randint(1, 80, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - n
    seg = torch.cat([torch.full((m,), 3 * i + 7) for i, m in enumerate(lengths)])  # labels: any, one per run
    scale = torch.cat([torch.full((m,), 1e12 if i % 2 == 0 else 1.0) for i, m in enumerate(lengths)])
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * scale[:, None]

    def per_run(v):
        return torch.cat([p.flip(0).cumsum(0).flip(0) if reverse else p.cumsum(0) for p in torch.split(v, lengths)])
    got = _cumsum_rows(x, seg=seg, reverse=reverse)
    # within rounding of the run's own sums of |x| (random signs cancel: a relative tolerance on the sums is not one)
    assert ((got - per_run(x)).abs() <= 1e-13 * per_run(x.abs())).all()
    if not reverse:  # no runs: torch's cumsum, as before
        assert ((_cumsum_rows(x) - x.cumsum(0)).abs() <= 1e-13 * x.abs().cumsum(0)).all()


def test_bend_rounds_each_interval_on_the_scale_of_its_own_terms():
    """``_bend``'s long intervals (prefix sums) are each rounded on the scale of their own terms: zl (1 - u) + zr u
    and |v_j| min(u, u_j) (1 - max(u, u_j)). Against the function written out in exact rational arithmetic, with
    (1) an interval of slope jumps near 1e9 (a ray's interval up to alpha = 1e9) before one of jumps near 1: the
    sums over both, restarted by subtracting, left the second 2.6e-7 of its scale off (as on the digits CNN ray
    batch over (-1, 1e9) that failed the final check); (2) an interval that ends at its small values (alpha = 0 at
    u = 1, from alpha = -1e9): the sums after each point, taken as the interval's total less the sum before it,
    left 3.2e-7 there. Now 1.7e-16."""
    from polytope_lens.paths.exact import _PAIRWISE_MAX, _bend

    g = torch.Generator().manual_seed(11)
    d, n = 3, 3 * _PAIRWISE_MAX  # long intervals: prefix sums
    # (1) alpha up to 1e9 at u = 1, small values at u -> 0; then an ordinary interval of values near 1
    u1 = torch.sort(torch.cat([torch.rand(n // 2, generator=g, dtype=torch.float64) * 1e-9,
                               torch.rand(n - n // 2, generator=g, dtype=torch.float64)])).values
    v1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 1e9
    zl1, zr1 = torch.randn(d, generator=g, dtype=torch.float64), 1e9 * torch.randn(d, generator=g, dtype=torch.float64)
    u2 = torch.sort(torch.rand(n, generator=g, dtype=torch.float64)).values
    v2 = torch.randn(n, d, generator=g, dtype=torch.float64)
    zl2, zr2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    # (2) from alpha = -1e9 at u = 0 to alpha = 0 at u = 1: large values first, small ones near u = 1
    u3 = torch.sort(torch.cat([torch.rand(n // 2, generator=g, dtype=torch.float64),
                               1.0 - torch.rand(n - n // 2, generator=g, dtype=torch.float64) * 1e-9])).values
    v3 = torch.randn(n, d, generator=g, dtype=torch.float64) * 1e9
    zl3, zr3 = 1e9 * torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    zl, zr = torch.stack([zl1, zl2, zl3]), torch.stack([zr1, zr2, zr3])
    u, v = torch.cat([u1, u2, u3]), torch.cat([v1, v2, v3])
    grp = torch.arange(3).repeat_interleave(n)
    got = _bend(torch.lerp(zl[grp], zr[grp], u[:, None]), u, grp, 3, v.clone())
    for i, (ui, vi) in enumerate(((u1, v1), (u2, v2), (u3, v3))):
        want = _exact_bend(zl[i], zr[i], ui, vi)
        lo, hi = torch.minimum(ui[:, None], ui[None]), torch.maximum(ui[:, None], ui[None])
        scale = ((1 - ui)[:, None] * zl[i].abs() + ui[:, None] * zr[i].abs()
                 + (lo * (1 - hi)) @ vi.abs()).numpy()  # the terms' own size at each point
        err = np.abs(got[i * n:(i + 1) * n].numpy() - want) / scale
        assert err.max() < 1e-13, (i, float(err.max()))


def test_affine_ray_batch_over_a_wide_range_matches_the_forward_pass_and_the_graph_route(monkeypatch):
    """The digits CNN at stem.2.relu, rows 0, 1, 7 over alpha in (-1, 1e9). Refined together, the second chunk's
    closed-form bends (``_bend``) summed the first path's interval up to alpha 1e9 into the second's near alpha 0:
    a block.relu2 unit at alpha -0.17 was 7e-8 off its forward-pass value, its crossing placed 6e-8 (in alpha) from
    where it is, and verify raised "internal check failed" (each row alone passed). Oracles: every unit input the
    affine route computes (at every point, every site) against a forward pass at that point (``Runner.eval_points``,
    to 1e-12 of the point's largest unit input; old code 3.6e-7), and the graph route's records (the same
    crossings, alphas equal to 1e-12 relative but for a few ill-conditioned units, all to 1e-10)."""
    from polytope_lens.data import load_data
    from polytope_lens.models import load_model
    from polytope_lens.paths import exact

    b = load_model("digits-cnn")
    x = b.encode(load_data("digits"), [0, 1, 7]).tensors[b.input_name]
    alphas = (-1.0, 1e9)
    seen = []
    affine_z = exact.Refiner._affine_z

    def recorded(self, m, pid, t, gpids, *args, **kwargs):
        z = affine_z(self, m, pid, t, gpids, *args, **kwargs)
        seen.append((self.r, m, gpids[pid], t.clone(), z.clone()))
        return z
    monkeypatch.setattr(exact.Refiner, "_affine_z", recorded)
    aff = ray_crossings(b.module, x, layer="stem.2.relu", alphas=alphas, trace=False, evaluator="affine")
    monkeypatch.undo()
    assert any("evaluator: affine" in note for note in aff.notes)
    assert len({tuple(gp.unique().tolist()) for _, _, gp, _, _ in seen}) >= 2  # some chunk held several rays
    worst = 0.0
    for runner, m, gp, t, z in seen:
        want = runner.eval_points(gp, t, [m])[m]
        err = ((z - want).abs().amax(1) / want.abs().amax(1).clamp_min(1e-300)).max()
        worst = max(worst, float(err))
    assert worst < 1e-12, worst
    graph = ray_crossings(b.module, x, layer="stem.2.relu", alphas=alphas, trace=False, evaluator="graph")
    for p, q in zip(aff.paths, graph.paths):
        assert p.per_layer == q.per_layer and p.ties == q.ties
        order = [np.lexsort((r.records["piece"], r.records["unit"], r.records["site"],
                             np.round(r.alpha(r.records["t"]), 6))) for r in (p, q)]
        for f in ("site", "unit", "piece"):
            assert (p.records[f][order[0]] == q.records[f][order[1]]).all()
        ap, aq = p.alpha(p.records["t"][order[0]]), q.alpha(q.records["t"][order[1]])
        assert ((ap == 0) == (aq == 0)).all()
        rel = np.abs(ap - aq) / np.where(aq == 0, 1.0, np.abs(aq))
        assert rel.max() < 1e-10 and (rel > 1e-12).sum() <= 2, (p.index, rel.max(), (rel > 1e-12).sum())


# ------------------------------------------------------------------- stop 36: inputs a CLI hunt found
@pytest.mark.parametrize("evaluator", ["affine", "graph", "frontier"])
def test_paths_between_entries_of_a_1d_batch(evaluator):
    """Found at stop 36: paths whose points have shape () (the entries of 1-D tensors, as the docs allow) ended in an
    IndexError on the affine route's set-up. Hand-computed: relu(x) from 0.1 to 0.9 never crosses, from 0.2 to -0.7
    crosses once at t = 0.2 / 0.9."""
    res = path_crossings(nn.ReLU(), torch.tensor([0.1, 0.2], dtype=torch.float64),
                         torch.tensor([0.9, -0.7], dtype=torch.float64), evaluator=evaluator)
    assert res.counts.tolist() == [0, 1]
    np.testing.assert_allclose(res.paths[1].records["t"], [0.2 / 0.9], rtol=1e-14)


def test_ray_directions_in_another_byte_order_run_and_complex_ones_are_refused():
    """Found at stop 36: a big-endian NumPy direction (MATLAB, FITS, HDF5 exports) was refused as 'not an array of
    numbers', and a complex one was cut to its real part by torch. Oracle: the same direction in native order."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    d = np.random.default_rng(0).normal(size=8)
    want = ray_crossings(m, x, layer="1.relu", direction=d, alphas=(-1.0, 2.0), trace=False)
    got = ray_crossings(m, x, layer="1.relu", direction=d.astype(">f8"), alphas=(-1.0, 2.0), trace=False)
    assert got.counts.tolist() == want.counts.tolist() and sum(want.counts) > 4
    assert_same_records(got, want, trace=False, t_atol=0.0)
    for bad, kind in [(d.astype(complex), "complex128"), (torch.tensor(d, dtype=torch.complex128), "torch.complex128"),
                      (np.array(["a"] * 8), "<U1")]:
        with pytest.raises(InvalidInputError, match=f"The 'direction' parameter of ray_crossings must hold real "
                                                    f"numbers; it holds {kind}."):
            ray_crossings(m, x, layer="1.relu", direction=bad, alphas=(-1.0, 2.0))
