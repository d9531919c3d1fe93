"""Exact paths and slices on randomly drawn small CNNs: max pooling with every kernel/stride/padding/dilation/ceil_mode
combination the draws give, ReLU, ReLU6, LeakyReLU, Hardtanh and abs, optional residual add and concatenation.

Oracles: dense float64 sampling of every unit's piece along each path; for slices, the codes of ``spline_codes`` at
each region's centroid, areas that tile the plane, and region output maps that reproduce the model there."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytope_lens import list_sites
from polytope_lens.codes import spline_codes
from polytope_lens.paths import path_crossings, ray_crossings, site_activations
from polytope_lens.slices import neighbours, slice_through

from test_paths import dense_count

ACTS = {"relu": F.relu, "relu6": lambda v: F.relu6(3 * v), "leaky": lambda v: F.leaky_relu(v, 0.1),
        "hardtanh": lambda v: F.hardtanh(v, -0.5, 1.0), "abs": torch.abs}


class RandomCNN(nn.Module):
    """conv -> act -> max pool (drawn kernel, stride, padding, dilation, ceil_mode) -> conv -> act (+ residual)
    (-> concat with an average pool) -> linear, He-initialised from ``seed``."""

    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        self.side = rng.choice([5, 6, 7])
        c = rng.choice([2, 3])
        self.k, self.s = rng.choice([2, 3]), rng.choice([1, 2, 3])
        self.p = min(rng.choice([0, 1]), self.k // 2)
        self.d, self.ceil = rng.choice([1, 2]), rng.choice([False, True])
        self.act1, self.act2 = rng.choice(sorted(ACTS)), rng.choice(["relu", "relu6", "leaky"])
        self.res, self.avg = rng.choice([False, True]), rng.choice([False, True])
        self.c1, self.c2 = nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            h = self.pool(torch.zeros(1, c, self.side, self.side))
        self.head = nn.Linear(c * h.shape[2] * h.shape[3] * (2 if self.avg else 1), 3)
        g = torch.Generator().manual_seed(rng.randrange(10 ** 6))
        with torch.no_grad():
            for m in (self.c1, self.c2, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
        self.eval()

    def pool(self, x):
        return F.max_pool2d(x, self.k, self.s, self.p, self.d, ceil_mode=self.ceil)

    def forward(self, x):
        h = self.pool(ACTS[self.act1](self.c1(x)))
        r = ACTS[self.act2](self.c2(h))
        h = h + r if self.res else r
        if self.avg:
            h = torch.cat([h, F.avg_pool2d(h, 1)], 1)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("evaluator", ["affine", "graph"])
def test_path_counts_equal_dense_sampling(seed, evaluator):
    m = RandomCNN(seed)
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(2, 1, m.side, m.side, generator=g) for _ in range(2))
    res = path_crossings(m, a, b, evaluator=evaluator, trace=False)
    assert res.exact
    for i, p in enumerate(res.paths):
        want = dense_count(m, lambda t, i=i: a[i:i + 1].double() + t.reshape(-1, 1, 1, 1) * (b[i] - a[i]).double(),
                           n0=4096, n_max=2 ** 18)
        assert p.per_layer == want


@pytest.mark.parametrize("seed", [150, 166, 168, 229, 38, 0])
def test_paths_at_a_site_and_rays_equal_dense_sampling(seed):
    """Segments between two activations at the first site (one of them an affine image of the other's clamped
    entries, so pool windows tie exactly at the ends) and rays a + alpha d through alpha = 0 (where ReLU zeros tie):
    the seeds where such ties once miscounted (a pool change onto a tie at t = 1 lost to rounding, a detour through
    a line that only touches the envelope)."""
    m = RandomCNN(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, m.side, m.side, generator=g)
    site = list_sites(m, lambda: m(x[:1]))[0].name
    a = site_activations(m, x, layer=site)
    b = a.flip(0) * 0.7 + 0.1
    d = torch.randn(a.shape[1:], generator=g, dtype=torch.float64)
    shape = (-1, *[1] * (a.dim() - 1))
    for evaluator in ("affine", "graph"):
        seg = path_crossings(m, a, b, layer=site, inputs=x, evaluator=evaluator, trace=False)
        ray = ray_crossings(m, x, layer=site, alphas=(-0.5, 2.5), direction=d, evaluator=evaluator, trace=False)
        for i in range(2):
            want = dense_count(m, lambda t: a[i][None] + t.reshape(shape) * (b[i] - a[i])[None], site=site,
                               base=x[i:i + 1].double(), n0=4096, n_max=2 ** 18)
            assert seg.paths[i].per_layer == {k: v for k, v in want.items() if k in seg.sites}
            want = dense_count(m, lambda t: a[i][None] + (-0.5 + 3.0 * t).reshape(shape) * d[None], site=site,
                               base=x[i:i + 1].double(), n0=4096, n_max=2 ** 18)
            assert ray.paths[i].per_layer == {k: v for k, v in want.items() if k in ray.sites}


@pytest.mark.parametrize("seed", range(8))
def test_slice_regions_match_the_model(seed):
    """Seed 0 has a region of area 8e-13: the centroid of the absolute shoelace formula fell outside it."""
    m = RandomCNN(seed).double()
    x = torch.randn(3, 1, m.side, m.side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = slice_through(m, x[0], x[1], x[2], memory_budget=4 << 30)
    assert res.exact and res.num_regions > 10
    assert abs(float(res.area.sum()) - res.plane.area) <= 1e-9 * res.plane.area
    assert float(res.area.min()) > 0
    u = res.centroids()
    pts = res.plane.points(u).reshape(len(u), 1, m.side, m.side)
    codes = spline_codes(m, pts)
    for site, (off, nb) in res.site_bytes.items():
        assert np.array_equal(codes[site].packed, res.codes[:, off:off + nb]), site
    with torch.no_grad():
        y = m(pts)
    err = float((res.predict(u, torch.arange(len(u))) - y).abs().max())
    assert err <= 1e-9 * max(1.0, float(y.abs().max()))


@pytest.mark.parametrize("seed", [1, 4])
def test_neighbours_are_every_region_across_each_edge(seed):
    """Oracle: just outside the middle of every edge of every region, the code of ``spline_codes`` names the region
    across it (a region's code is unique: the slice of a convex polytope). ``neighbours`` finds exactly those pairs
    (before: it missed every pair across a max-pool border, 21 % of these slices' pairs, because the pool's argmax
    regions are clipped as separate copies with their own vertices). Edges under 1e-6 are not probed."""
    m = RandomCNN(seed).double()
    x = torch.randn(3, 1, m.side, m.side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = slice_through(m, x[0], x[1], x[2], memory_budget=4 << 30)
    nb = neighbours(res)
    have = set(zip(np.minimum(nb.a, nb.b).tolist(), np.maximum(nb.a, nb.b).tolist()))
    assert len(have) == len(nb.a)  # each pair once
    region_of = {bytes(c): i for i, c in enumerate(res.codes)}
    xy = res.coords[res.ring]  # (R, W, 2)
    nxt = torch.where(torch.arange(xy.shape[1])[None] + 1 < res.deg[:, None], torch.arange(xy.shape[1])[None] + 1, 0)
    p, q = xy, xy.gather(1, nxt[..., None].expand(-1, -1, 2))
    valid = (torch.arange(xy.shape[1])[None] < res.deg[:, None]) & ((q - p).norm(dim=-1) > 1e-6)
    owner = torch.arange(len(xy))[:, None].expand_as(valid)[valid]
    p, q = p[valid], q[valid]
    normal = torch.stack([q[:, 1] - p[:, 1], p[:, 0] - q[:, 0]], 1)
    normal = normal / normal.norm(dim=1, keepdim=True)
    inward = ((res.centroids()[owner] - 0.5 * (p + q)) * normal).sum(1) > 0
    probe = 0.5 * (p + q) + 1e-7 * torch.where(inward[:, None], -normal, normal)
    codes = spline_codes(m, res.plane.points(probe).reshape(len(probe), 1, m.side, m.side))
    packed = np.concatenate([codes[s].packed for s in res.sites], 1)
    want = set()
    for o, c in zip(owner.tolist(), packed):
        j = region_of.get(bytes(c))
        if j is not None and j != o:  # None: outside the plane's domain
            want.add((min(o, j), max(o, j)))
    assert want <= have and len(want) > 100
    assert len(have - want) <= 2  # pairs that share only an edge too short to probe


@pytest.mark.parametrize("seed", [3, 5])
@pytest.mark.parametrize("evaluator", ["affine", "graph"])
def test_class_changes_equal_dense_sampling(seed, evaluator):
    """The trace's class changes are every change of the model's top class along the path, placed to sampling
    resolution (the outputs are affine on each region, so the argmax envelope along it is exact). Before: changes
    were bisected between region midpoints only, and a change in the first region before its midpoint (seed 3)
    was missed."""
    m = RandomCNN(seed)
    g = torch.Generator().manual_seed(seed)
    a, b = (3 * torch.randn(3, 1, m.side, m.side, generator=g) for _ in range(2))
    res = path_crossings(m, a, b, evaluator=evaluator)
    t = torch.linspace(0, 1, 2 ** 17 + 1, dtype=torch.float64)
    md = m.double()
    for i, p in enumerate(res.paths):
        with torch.no_grad():
            top = md(a[i:i + 1].double() + t.reshape(-1, 1, 1, 1) * (b[i] - a[i]).double()).argmax(1)
        flips = torch.nonzero(top[1:] != top[:-1]).flatten()
        got = np.sort(np.asarray(p.trace.class_changes))
        assert len(got) == len(flips)
        assert np.all((got >= t[flips].numpy()) & (got <= t[flips + 1].numpy()))


@pytest.mark.parametrize("seed", [0, 2])
def test_decision_boundary_is_where_the_top_class_changes(seed):
    """Every boundary segment's midpoint is a tie of the model's top two scores, and the segments' total L1 length
    equals the grid estimate (class changes between neighbouring points of a 300 x 300 grid, times the spacing) to
    5 %. Before: each segment was reported twice (both argmax copies of a region held it), doubling the length."""
    from matplotlib.path import Path

    m = RandomCNN(seed).double()
    x = torch.randn(3, 1, m.side, m.side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = slice_through(m, x[0], x[1], x[2], memory_budget=4 << 30)
    seg = res.boundary
    assert len(seg) > 20
    with torch.no_grad():
        y = m(res.plane.points(seg.mean(1)).reshape(len(seg), 1, m.side, m.side))
    top2 = y.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).max()) <= 1e-7 * max(1.0, float(y.abs().max()))
    dom = res.plane.domain
    lo, hi = dom.min(0).values, dom.max(0).values
    n = 300
    gx = torch.linspace(float(lo[0]), float(hi[0]), n, dtype=torch.float64)
    gy = torch.linspace(float(lo[1]), float(hi[1]), n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), -1).reshape(-1, 2)
    inside = torch.as_tensor(Path(dom.numpy()).contains_points(grid.numpy())).reshape(n, n)
    with torch.no_grad():
        cls = m(res.plane.points(grid).reshape(len(grid), 1, m.side, m.side)).argmax(1).reshape(n, n)
    flips_x = ((cls[1:] != cls[:-1]) & inside[1:] & inside[:-1]).sum() * float(gy[1] - gy[0])
    flips_y = ((cls[:, 1:] != cls[:, :-1]) & inside[:, 1:] & inside[:, :-1]).sum() * float(gx[1] - gx[0])
    l1 = float((seg[:, 1] - seg[:, 0]).abs().sum())
    assert abs(float(flips_x + flips_y) - l1) <= 0.05 * l1


def test_bisected_class_changes_include_the_path_ends():
    """With ``layers=`` stopping at the first site the trace's regions are not affine-output regions, so changes
    are bisected between positions; the path's ends are positions too (before: seed 3's change at t = 0.03, before
    the first region's midpoint, was missed)."""
    m = RandomCNN(3)
    g = torch.Generator().manual_seed(3)
    a, b = (3 * torch.randn(3, 1, m.side, m.side, generator=g) for _ in range(2))
    first = list_sites(m, lambda: m(a[:1]))[0].name
    res = path_crossings(m, a[:1], b[:1], layers=first)
    t = torch.linspace(0, 1, 2 ** 16 + 1, dtype=torch.float64)
    with torch.no_grad():
        top = m.double()(a[:1].double() + t.reshape(-1, 1, 1, 1) * (b[0] - a[0]).double()).argmax(1)
    flips = torch.nonzero(top[1:] != top[:-1]).flatten()
    got = np.sort(res.paths[0].trace.class_changes)
    assert len(got) == len(flips) >= 1 and res.paths[0].trace.t[0] > float(t[flips[0] + 1])
    assert np.all((got >= t[flips].numpy()) & (got <= t[flips + 1].numpy()))


@pytest.mark.parametrize("seed", [2, 4, 6])  # relu6 / abs / relu6 units around a max pool
def test_sampled_mode_places_pool_and_unit_crossings_like_exact_mode(seed):
    """Sampled mode on a piecewise-linear CNN, finely sampled: the same records as exact mode to its tolerance.
    Max-pool windows have no scalar kink (their brackets are bisected), ReLU-family units do (Illinois steps)."""
    m = RandomCNN(seed)
    g = torch.Generator().manual_seed(seed)
    a, b = (3 * torch.randn(2, 1, m.side, m.side, generator=g) for _ in range(2))
    ex = path_crossings(m, a, b, trace=False)
    sm = path_crossings(m, a, b, method="sampled", n_samples=1 << 15, tol=1e-12, trace=False)
    assert sm.counts.tolist() == ex.counts.tolist()
    for p, q in zip(ex.paths, sm.paths):
        o = np.lexsort((p.records["t"], p.records["unit"], p.records["site"]))
        r = np.lexsort((q.records["t"], q.records["unit"], q.records["site"]))
        for key in ("site", "unit", "piece"):
            np.testing.assert_array_equal(p.records[key][o], q.records[key][r])
        np.testing.assert_allclose(p.records["t"][o], q.records["t"][r], atol=1e-11)
