"""Exact 2-D slices: counts against Regioncam, areas, codes, affine maps, neighbours, local complexity, errors."""

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from polytope_lens.codes import spline_codes
from polytope_lens.errors import InvalidInputError, NotPiecewiseLinearError, UnsupportedActivationError
from polytope_lens.slices import (Plane, slice_plane, exact_local_complexity, local_complexity, neighbours, slice_box,
                                  slice_through)

regioncam = pytest.importorskip("regioncam")


class Residual(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


def _mlp(width, depth, seed, slope=None, residual=False):
    g = torch.Generator().manual_seed(seed)
    layers, d = [], 2
    for i in range(depth):
        lin = nn.Linear(d, width)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(width, d, generator=g) * np.sqrt(2 / d))
            lin.bias.copy_(torch.randn(width, generator=g) * 0.5)
        act = nn.ReLU() if slope is None else nn.LeakyReLU(slope)
        block = nn.Sequential(lin, act)
        layers.append(Residual(block) if residual and d == width else block)
        d = width
    return nn.Sequential(*layers)


def _regioncam_count(model, slope=None):
    rc = regioncam.Regioncam(size=1)
    for block in model:
        inner = block.m if isinstance(block, Residual) else block
        lin = inner[0]
        w = lin.weight.detach().double().numpy().T.astype(np.float32)
        b = lin.bias.detach().double().numpy().astype(np.float32)
        layer = [regioncam.Linear(w, b), regioncam.ReLU() if slope is None else regioncam.LeakyReLU(slope)]
        if isinstance(block, Residual):
            rc.add(regioncam.Residual(regioncam.Sequential(*layer)))
        else:
            rc.add(regioncam.Sequential(*layer))
    return rc.num_faces


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("slope,residual", [(None, False), (0.1, False), (None, True), (0.2, True)])
def test_counts_match_regioncam(seed, slope, residual):
    """Region counts equal Regioncam's on random (Leaky)ReLU MLPs, with and without residual blocks."""
    m = _mlp(16, 3, seed, slope, residual)
    res = slice_box(m, outputs=False)
    assert res.num_regions == _regioncam_count(m, slope)


def test_areas_codes_and_maps_mlp():
    """Areas sum to the box; codes equal spline_codes at centroids; maps reproduce the model at interior points."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    res = slice_box(m, -2, 2)
    assert abs(float(res.area.sum()) - 16.0) < 1e-9
    assert bool((res.area > 0).all())
    c = res.centroids()
    codes = spline_codes(m, c)
    for s in res.sites:
        off, nb = res.site_bytes[s]
        assert np.array_equal(codes[s].packed, res.codes[:, off:off + nb])
    assert len(set(res.code_hex())) == res.num_regions
    pred = res.predict(c, torch.arange(res.num_regions))
    assert torch.allclose(pred, m(c), atol=1e-10, rtol=0)
    d = res.to_dict()
    assert d["num_regions"] == res.num_regions and d["exact"] and d["dtype"] == "float64"
    import json
    json.dumps(d)


def _interior(res, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = res.ring.shape[1]
    w = torch.rand(res.num_regions, k, W, generator=g, dtype=torch.float64) + 0.05
    w = w * (torch.arange(W)[None, None] < res.deg[:, None, None])
    w = w / w.sum(-1, keepdim=True)
    pts = w @ res.coords[res.ring].to(torch.float64)
    return pts.reshape(-1, 2), torch.arange(res.num_regions).repeat_interleave(k)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = F.relu6(self.bn(self.c1(x)) * 3)
        h = F.max_pool2d(h, 2)
        h = h + F.relu(self.c2(h))
        return self.fc(h.flatten(1))


def test_cnn_slice_maps_and_codes():
    """CNN (BN, ReLU6, MaxPool, residual): areas sum, codes at centroids, maps reproduce outputs to 1e-9."""
    torch.manual_seed(3)
    m = SmallCNN()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    m = m.double().eval()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    res = slice_through(m, x[0], x[1], x[2])
    assert res.num_regions > 20
    assert abs(float(res.area.sum()) - res.plane.area) < 1e-9 * res.plane.area
    c = res.centroids()
    codes = spline_codes(m, res.plane.points(c))
    for s in res.sites:
        off, nb = res.site_bytes[s]
        assert np.array_equal(codes[s].packed, res.codes[:, off:off + nb]), s
    u, reg = _interior(res)
    with torch.no_grad():
        y = m(res.plane.points(u))
    err = (res.predict(u, reg) - y).abs().max()
    assert float(err) <= 1e-9 * max(1.0, float(y.abs().max()))


def test_site_plane_and_units():
    """A plane in a site's output space, and a partition restricted to a few units of one site."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    a = torch.relu(m[0](torch.randn(3, 5, dtype=torch.float64)))
    res = slice_through(m, a[0], a[1], a[2], layer="1.relu", inputs=x)
    assert res.sites == ("3.relu",)
    u, reg = _interior(res)
    y = m[4](m[3](m[2](res.plane.points(u))))
    assert torch.allclose(res.predict(u, reg), y, atol=1e-10)
    part = slice_through(m, *torch.randn(3, 5), until="1.relu", units=[0, 1, 2])
    assert part.slope is None and part.num_regions <= 7


def test_units_position_is_the_centre_channel_vector():
    """units="position" cuts with the channel vector at the centre of a (C, H, W) site, the same units as indices
    written out by hand; repeated indices are refused (one resolver for slices and paths)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).double()
    p = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    by_name = slice_through(m, p[0], p[1], p[2], units="position")
    by_hand = slice_through(m, p[0], p[1], p[2], units=[c * 25 + 2 * 5 + 2 for c in range(4)])
    assert by_name.num_regions == by_hand.num_regions > 1
    assert np.array_equal(by_name.codes, by_hand.codes)
    with pytest.raises(InvalidInputError, match="distinct indices"):
        slice_through(m, p[0], p[1], p[2], units=[1, 1])


def test_float32_slice_has_the_float64_regions():
    """The affinity probe allows float32 rounding, so a float32 slice runs (before: refused as 'not affine') and
    finds the same regions as float64 on a small ReLU MLP."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    s64, s32 = slice_box(m), slice_box(m, dtype=torch.float32)
    assert s32.dtype == "float32" and s32.num_regions == s64.num_regions > 100
    assert not s32.notes  # the arrangement's tiling check allows float32 rounding too: no unit-by-unit fallback


def test_neighbours_differ_on_shared_edge():
    """Neighbours differ in exactly the units whose kink the shared edge lies on."""
    m = _mlp(8, 2, 5).double()
    res = slice_box(m)
    nb = neighbours(res)
    assert len(nb.a) > 0
    edges = torch.tensor(nb.edge)
    zs = {}

    def grab(model, x):
        h1 = model[0][0](x)
        h2 = model[1][0](torch.relu(h1))
        return {"0.1.relu": h1, "1.1.relu": h2}
    for k in range(2):
        zs[k] = grab(m, edges[:, k])
    for i in range(len(nb.a)):
        on = {(s, int(u)) for s in zs[0] for u in torch.nonzero((zs[0][s][i].abs() < 1e-9)
                                                                & (zs[1][s][i].abs() < 1e-9)).flatten()}
        assert set(nb.units[i]) == on
    assert (nb.map_distance > 0).all()


def test_local_complexity_bruteforce():
    """Sampled LC equals a direct count of sign changes among the cross-polytope's vertices."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU())
    pts = torch.randn(7, 3)
    lc = local_complexity(m, pts, radius=0.3, n_dirs=2, seed=4)
    g = torch.Generator().manual_seed(4)
    v, _ = torch.linalg.qr(torch.randn(3, 2, generator=g, dtype=torch.float64))
    md = m.double()
    for i, x in enumerate(pts.double()):
        verts = torch.cat([x + 0.3 * v.T, x - 0.3 * v.T])
        z1 = md[0](verts)
        z2 = md[2](torch.relu(z1))
        for name, z in (("1.relu", z1), ("3.relu", z2)):
            s = z > 0
            assert lc.per_site[name][i] == int((s != s[:1]).any(0).sum())
    ex = exact_local_complexity(m, pts[:2], radius=0.5)
    assert ex.exact and (ex.total >= 1).all()


def test_pictures(tmp_path):
    """PNG/SVG export, stable colours, opening figure."""
    m = _mlp(8, 2, 0)
    res = slice_box(m)
    res.save_png(tmp_path / "a.png", kinks_of="1.1.relu")
    res.save_svg(tmp_path / "a.svg", color_by="slope")
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "a.svg").stat().st_size > 1000
    assert np.allclose(res.colors(), slice_box(m).colors())
    assert 'src="data:image/png;base64,iVBORw0KGgo' in res._repr_html_()  # the notebook view holds the picture


@pytest.mark.slow
def test_opening_figure(tmp_path):
    from polytope_lens.slices.render import opening_figure
    """The paper's opening picture: a toy moons classifier's polytopes after each layer."""
    fig, results = opening_figure(tmp_path / "o.png")
    assert len(results) == 3 and results[-1].boundary is not None and (tmp_path / "o.png").exists()
    assert results[0].num_regions <= results[1].num_regions <= results[2].num_regions


def test_bad_inputs():
    """Collinear points, degenerate box, unsupported op, smooth model, memory budget."""
    with pytest.raises(InvalidInputError, match="collinear"):
        Plane.through(torch.zeros(3), torch.ones(3), 2 * torch.ones(3))
    with pytest.raises(InvalidInputError, match="positive area"):
        Plane.box(1.0, 1.0)
    with pytest.raises(InvalidInputError, match="parallel"):
        Plane.from_directions(torch.zeros(2), torch.ones(2), 2 * torch.ones(2))
    with pytest.raises(UnsupportedActivationError, match="elu"):
        slice_box(nn.Sequential(nn.Linear(2, 4), nn.ELU()))
    with pytest.raises(NotPiecewiseLinearError, match="smooth"):
        slice_box(nn.Sequential(nn.Linear(2, 4), nn.GELU()))
    with pytest.raises(NotPiecewiseLinearError, match="not an affine"):
        slice_box(nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.ReLU()))

    class MaxOfTwo(nn.Module):  # a ReLU written as a maximum of two tensors: a bend that is no site
        def forward(self, z):
            return torch.maximum(z, torch.zeros_like(z))
    with pytest.raises(NotPiecewiseLinearError,
                       match=r"maximum \(called in module '2'\) reaches the unit input of site '4.relu'"):
        slice_box(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), MaxOfTwo(), nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(InvalidInputError, match="memory budget"):
        slice_box(_mlp(64, 3, 0), memory_budget=1 << 17)
    # points the model cannot take: one line with the shape and the model's own error
    wide = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(InvalidInputError, match=r"on the slice points of slice_plane \(one row of shape \(2,\)\)"):
        slice_box(wide)
    with pytest.raises(InvalidInputError, match=r"RuntimeError on the points of local_complexity .* mat1 and mat2"):
        local_complexity(wide, torch.zeros(3, 5), radius=0.1, n_dirs=2)


def test_relu6_middle_band_regression():
    """A cell crossed by both kinks of a ReLU6 unit keeps its middle band (areas sum, codes match)."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(2, 6), nn.ReLU6(), nn.Linear(6, 6), nn.Hardtanh(-0.5, 0.5), nn.Linear(6, 2))
    with torch.no_grad():
        m[0].weight.mul_(20)
    m = m.double()
    res = slice_box(m)
    assert abs(float(res.area.sum()) - 4.0) < 1e-9
    codes = spline_codes(m, res.centroids())
    for s in res.sites:
        off, nb = res.site_bytes[s]
        assert np.array_equal(codes[s].packed, res.codes[:, off:off + nb])


def _force_unit_by_unit(monkeypatch):
    import polytope_lens.slices.partition as partition
    from polytope_lens.slices._arrangement import Degenerate

    def refuse(*a, **k):
        raise Degenerate("forced by the test")
    monkeypatch.setattr(partition, "arrange", refuse)


def _relu6_net(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(2, 10), nn.ReLU6(), nn.Linear(10, 10), nn.Hardtanh(-0.5, 0.5), nn.Linear(10, 8),
                      nn.LeakyReLU(0.1), nn.Linear(8, 2))
    with torch.no_grad():
        m[0].weight.mul_(8)
    return m.double()


@pytest.mark.parametrize("make", [lambda: _mlp(24, 3, 0), lambda: _mlp(24, 3, 1, 0.1, True), lambda: _relu6_net(2),
                                  SmallCNN], ids=["relu", "leaky-residual", "relu6-hardtanh-leaky", "cnn"])
def test_arrangement_equals_unit_by_unit(make, monkeypatch):
    """All kink lines at once (_arrangement) and the unit-by-unit cut are independent algorithms: same regions
    (count, codes, areas), and the fast one really ran (no site fell back)."""
    torch.manual_seed(5)
    m = make()
    m = m.double().eval()
    if isinstance(m, SmallCNN):
        x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
        run = lambda: slice_through(m, x[0], x[1], x[2], outputs=False)  # noqa: E731
    else:
        run = lambda: slice_box(m, outputs=False)  # noqa: E731
    fast = run()
    assert not any("unit by unit" in n for n in fast.notes)
    _force_unit_by_unit(monkeypatch)
    slow = run()
    assert any("unit by unit" in n for n in slow.notes)
    assert fast.num_regions == slow.num_regions > 10
    assert sorted(fast.code_hex()) == sorted(slow.code_hex())
    assert len(set(fast.code_hex())) == fast.num_regions  # a convex region per code, so areas pair up by code
    fa, sa = (dict(zip(r.code_hex(), r.area.tolist())) for r in (fast, slow))
    scale = float(slow.area.sum())
    assert max(abs(fa[h] - sa[h]) for h in sa) <= 1e-9 * scale


def test_lines_through_vertices_and_one_point_hand_count():
    """Hand-computed: x - y = 0 runs through two corners of [-1,1]^2 and x = 0.5 crosses it inside: 4 regions of
    areas 1/8, 7/8, 9/8, 15/8 (all lines at once). Adding x = 0 and y = 0 puts four lines through the origin:
    8 triangles of area 1/2 (ties: that site is cut unit by unit, with snapping)."""
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 0.0]]))
        m[0].bias.copy_(torch.tensor([0.0, -0.5]))
    res = slice_box(m, outputs=False)
    assert not res.notes
    assert sorted(round(float(a), 12) for a in res.area) == [0.125, 0.875, 1.125, 1.875]
    codes = spline_codes(m, res.centroids())["1.relu"].packed
    assert np.array_equal(codes, res.codes)
    m = nn.Sequential(nn.Linear(2, 4), nn.ReLU()).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]))
        m[0].bias.zero_()
    res = slice_box(m, outputs=False)
    assert res.num_regions == 8 and any("unit by unit" in n for n in res.notes)
    assert torch.allclose(res.area, torch.full((8,), 0.5, dtype=res.area.dtype), atol=1e-12)
    codes = spline_codes(m, res.centroids())["1.relu"].packed
    assert np.array_equal(codes, res.codes)


@pytest.mark.parametrize("make", [lambda: _mlp(20, 3, 1, 0.1, True), SmallCNN], ids=["leaky-residual", "cnn"])
def test_affine_route_equals_forward_passes(make, monkeypatch):
    """Site inputs from stored earlier outputs through the Jacobian blocks (affine route: no forward pass of the
    vertices) give the same regions, codes and areas as a forward pass of every vertex at every site."""
    import polytope_lens.slices.partition as partition
    from polytope_lens.paths.runner import Runner
    torch.manual_seed(7)
    m = make().double().eval()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    run = (lambda: slice_through(m, x[0], x[1], x[2], outputs=False)) if isinstance(m, SmallCNN) else \
        (lambda: slice_box(m, outputs=False))
    calls = []
    real = partition._Model.site_values
    monkeypatch.setattr(partition._Model, "site_values", lambda self, *a: calls.append(1) or real(self, *a))
    fast = run()
    assert not calls
    monkeypatch.setattr(Runner, "extract_affine", lambda self, want_output: None)
    slow = run()
    assert calls
    assert fast.num_regions == slow.num_regions > 10
    fa, sa = (dict(zip(r.code_hex(), r.area.tolist())) for r in (fast, slow))
    assert fa.keys() == sa.keys()
    assert max(abs(fa[h] - sa[h]) for h in sa) <= 1e-9 * float(slow.area.sum())


def test_site_plane_graph_route_runs_the_prefix_once_per_batch(monkeypatch):
    """A plane in a site's output space, on the graph route (no Jacobian blocks): the network before the site runs
    on the one real input per batch of vertices (the paths engine's point evaluation), not once per vertex, and the
    regions, codes and areas equal both the affine route's and a full forward pass per vertex."""
    from polytope_lens.paths import site_activations
    from polytope_lens.paths.runner import Runner
    torch.manual_seed(3)
    m = SmallCNN().double().eval()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    a = site_activations(m, x, layer="max_pool2d")
    rows = []
    m.c1.register_forward_hook(lambda mod, inp, out: rows.append(len(out)))

    def run():
        rows.clear()
        return slice_plane(m, Plane.through(a[0], a[1], a[2]), layer="max_pool2d", inputs=x[:1], outputs=True)
    affine = run()
    monkeypatch.setattr(Runner, "extract_affine", lambda self, want_output: None)
    graph = run()
    n_vertices = len(graph.coords)
    assert graph.num_regions > 10 and sum(rows) < 20 < n_vertices  # one row per batch, plus the 3 of the check
    monkeypatch.setattr(Runner, "share_prefix", property(lambda self: False))
    full = run()
    assert sum(rows) >= n_vertices
    for other in (affine, full):
        assert other.num_regions == graph.num_regions
        ga, oa = (dict(zip(r.code_hex(), r.area.tolist())) for r in (graph, other))
        assert ga.keys() == oa.keys()
        assert max(abs(ga[h] - oa[h]) for h in oa) <= 1e-9 * float(graph.area.sum())
    torch.testing.assert_close(graph.slope, full.slope, rtol=0, atol=1e-9)


def test_integer_weight_nets_ties_agree(monkeypatch):
    """Integer weights put many kink lines through vertices and through common points (ties). On 24 such nets the
    default cut (all lines at once, unit by unit at ties) and the unit-by-unit cut alone give the same regions:
    count, codes, areas summing to the box."""
    acts = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.25), nn.Hardtanh(-1, 1)]
    nets = []
    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        w = int(torch.randint(2, 7, (1,), generator=g))
        layers, d = [], 2
        for _ in range(3):
            lin = nn.Linear(d, w)
            with torch.no_grad():
                lin.weight.copy_(torch.randint(-2, 3, (w, d), generator=g).float())
                lin.bias.copy_(torch.randint(-2, 3, (w,), generator=g).float() * 0.5)
            layers += [lin, acts[int(torch.randint(0, 4, (1,), generator=g))]]
            d = w
        nets.append(nn.Sequential(*layers).double())
    default = [slice_box(m, outputs=False) for m in nets]
    _force_unit_by_unit(monkeypatch)
    rounds = [slice_box(m, outputs=False) for m in nets]
    assert sum(not r.notes for r in default) >= 5  # the all-lines cut really ran on some of them
    for a, b in zip(default, rounds):
        assert a.num_regions == b.num_regions
        assert sorted(a.code_hex()) == sorted(b.code_hex())
        assert abs(float(a.area.sum()) - 4.0) < 1e-9


def test_area_and_centroid_of_a_tiny_polygon_far_from_the_origin():
    """Hand-computed: a right triangle with legs 1e-5 at (1000, -1000) and a 1e-5 square at (4, 2). The absolute
    shoelace cancelled terms of size |x|^2 down to the area and put the triangle's centroid outside it (a region's
    code at its centroid then disagreed with the region's code); relative to the first vertex both are exact to
    rounding."""
    from polytope_lens.slices.geometry import polygon_area, polygon_centroid
    h = 1e-5
    tri = torch.tensor([[1000.0, -1000.0], [1000.0 + h, -1000.0], [1000.0, -1000.0 + h], [0.0, 0.0]],
                       dtype=torch.float64)
    sq = torch.tensor([[4.0, 2.0], [4.0 + h, 2.0], [4.0 + h, 2.0 + h], [4.0, 2.0 + h]], dtype=torch.float64)
    xy, deg = torch.stack([tri, sq]), torch.tensor([3, 4])
    area = polygon_area(xy, deg)
    c = polygon_centroid(xy, deg)
    # the legs as stored (differences of nearby floats are exact)
    tx, ty = float(tri[1, 0] - tri[0, 0]), float(tri[2, 1] - tri[0, 1])
    sx, sy = float(sq[1, 0] - sq[0, 0]), float(sq[3, 1] - sq[0, 1])
    torch.testing.assert_close(area, torch.tensor([tx * ty / 2, sx * sy], dtype=torch.float64), rtol=1e-12, atol=0)
    want = torch.tensor([[1000.0 + tx / 3, -1000.0 + ty / 3], [4.0 + sx / 2, 2.0 + sy / 2]], dtype=torch.float64)
    torch.testing.assert_close(c, want, rtol=0, atol=1e-9 * h)


def test_same_points_merges_exactly_the_close_points():
    """Points within tol of each other in both coordinates share a label (transitively), points more than 2 tol
    apart never do through one pair; near grid-cell borders too (the four offset grids)."""
    from polytope_lens.slices.neighbours import same_points
    tol = 1e-9
    base = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [2e-9 * 7 + 1e-9, 5.0]], dtype=torch.float64)
    close = base + torch.tensor([[4e-10, -9e-10], [-9e-10, 9e-10], [0.0, 8e-10], [-6e-10, 0.0]], dtype=torch.float64)
    far = base + 5e-9
    chain = torch.tensor([[10.0, 10.0], [10.0 + 9e-10, 10.0], [10.0 + 1.8e-9, 10.0]], dtype=torch.float64)
    lab = same_points(torch.cat([base, close, far, chain]), tol)
    assert torch.equal(lab[4:8], lab[:4]) and len(set(lab[:4].tolist())) == 4
    assert torch.equal(lab[8:12], torch.arange(8, 12))
    assert lab[12] == lab[13] == lab[14] == 12


def _sized_cuts(monkeypatch):
    """Every all-lines cut sizes itself and falls back to the unit-by-unit cut, as when it does not fit the budget;
    returns the records (cells and vertices before the site, cells and vertices the cut is sure to add)."""
    import polytope_lens.slices.partition as partition
    from polytope_lens.slices._arrangement import Degenerate, arrange
    seen = []

    def sized(mesh, vals, kinks, tol, budget, keep_vals=False):
        try:
            arrange(mesh, vals, kinks, tol, 0, keep_vals)  # budget 0: sizes the cut and raises, cuts nothing
        except Degenerate as e:
            seen.append((mesh.nc, mesh.nv, e.cells, e.vertices))
            raise
    monkeypatch.setattr(partition, "arrange", sized)
    return seen


@pytest.mark.parametrize("make", [lambda: _mlp(12, 3, 4), lambda: _mlp(12, 2, 5, 0.1, True), lambda: _relu6_net(3)],
                         ids=["relu", "leaky-residual", "relu6-hardtanh-leaky"])
def test_size_of_a_cut_that_does_not_fit_is_the_cut(make, monkeypatch):
    """When all lines at once do not fit, the cut is sized before anything is cut (so that a slice that cannot fit
    is refused at once): on random nets in general position the cells it is sure to add are exactly the cells the
    unit-by-unit cut makes at that site, and its vertices at most the vertices made; with a small pair budget the
    sizes are lower bounds."""
    import polytope_lens.slices._arrangement as arrangement
    m = make().double().eval()
    sites = slice_box(m, outputs=False).sites
    seen = _sized_cuts(monkeypatch)
    sized = 0
    for cap in (arrangement._SIZE_PAIRS, 4):
        monkeypatch.setattr(arrangement, "_SIZE_PAIRS", cap)
        for k, s in enumerate(sites):
            seen.clear()
            res = slice_box(m, until=s, outputs=False)
            if not seen:
                continue
            nc, nv, cells, vertices = seen[-1]  # the last site's cut
            sized += 1
            if cap > 4:
                assert res.num_regions == nc + cells
            else:
                assert cells <= res.num_regions - nc
            assert vertices <= len(res.coords) - nv
    assert sized >= 2 * len(sites) - 1


def test_a_slice_that_cannot_fit_is_refused_before_cutting(monkeypatch):
    """A site whose lines cross about a million times in the slice is refused at once with the size of its
    partition (before: cut unit by unit for a minute, checking the budget only every 64 units, until the process
    held 2.5 times the budget)."""
    import polytope_lens.slices.partition as partition

    def no_rounds(*a, **k):
        raise AssertionError("the unit-by-unit cut ran")
    monkeypatch.setattr(partition._Partitioner, "_scalar_rounds", no_rounds)
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(2, 2000).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2000, 2, generator=g, dtype=torch.float64))
        lin.bias.copy_(0.5 * torch.randn(2000, generator=g, dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="needs about .* over the memory budget of 256.0 MiB"):
        slice_box(nn.Sequential(lin, nn.ReLU()), memory_budget=256 << 20)


def test_unit_by_unit_cut_stays_within_the_budget(monkeypatch):
    """The unit-by-unit cut checks before every unit what it may add: the mesh never holds more than the budget,
    and a slice over it is refused."""
    import polytope_lens.slices.partition as partition
    _force_unit_by_unit(monkeypatch)
    held = []
    real = partition._Partitioner._write_bands

    def record(self, mesh, *a):
        real(self, mesh, *a)
        held.append(self.mesh_bytes(mesh))
    monkeypatch.setattr(partition._Partitioner, "_write_bands", record)
    budget = 4 << 20
    with pytest.raises(InvalidInputError, match="memory budget"):
        slice_box(_mlp(300, 1, 0), memory_budget=budget)
    assert len(held) > 10 and max(held) <= budget


@pytest.mark.parametrize("n_out", [1, 3, 10])
def test_class_pieces_paint_each_point_with_the_models_class(n_out):
    """The class picture cuts regions along the decision boundary: the pieces tile the box, and the class painted at
    every grid point is the model's argmax there (one score: class 1 where it is > 0). Filling whole regions with
    the class at their centroid painted 4.6 % of such a box with a class the model does not predict there."""
    from matplotlib.path import Path as MplPath

    from polytope_lens.slices.render import class_pieces

    torch.manual_seed(2)  # a seed whose box holds a decision boundary for each n_out
    m = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, n_out)).double()
    res = slice_box(m, -2, 2)
    assert len(res.boundary)
    polys, cls, region = class_pieces(res)
    area = sum(0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1))) for p in polys)
    assert abs(area - 16.0) < 1e-9 and len(polys) > res.num_regions and set(region) == set(range(res.num_regions))
    g = torch.linspace(-1.99, 1.99, 150, dtype=torch.float64)
    u = torch.stack(torch.meshgrid(g, g + 1e-3, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        y = m(u)
    want = ((y[:, 0] > 0).long() if n_out == 1 else y.argmax(1)).numpy()
    painted = np.full(len(u), -1)
    for p, c in zip(polys, cls):
        painted[MplPath(p).contains_points(u.numpy())] = c
    assert (painted == want).all()


def test_predict_takes_arrays_and_plane_at_takes_a_site_name():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    res = slice_box(m)
    c = res.centroids()
    got = res.predict(c.numpy(), np.arange(res.num_regions))
    with torch.no_grad():
        torch.testing.assert_close(got, m(c), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"predict needs points u \(n, 2\) and regions \(n,\)"):
        res.predict(c.numpy(), np.arange(res.num_regions - 1))
    with pytest.raises(InvalidInputError, match="Plane.at takes a site name.*use Plane.points"):
        res.plane.at(torch.zeros(4, 2))


def test_budget_advice_knows_when_units_already_restrict_the_site():
    """Over the budget at the last site with units= given, the advice says how many units it keeps instead of
    suggesting units= again."""
    m = _mlp(300, 1, 0)
    with pytest.raises(InvalidInputError, match="cut only some of this site's units"):
        slice_box(m, memory_budget=1 << 20)
    with pytest.raises(InvalidInputError, match=r"cut fewer of this site's units \(units= keeps 200 now\)") as e:
        slice_box(m, memory_budget=1 << 20, units=list(range(200)))
    assert "cut only some" not in str(e.value)


def test_plane_checks_follow_the_points_precision_and_refuse_unbounded_sizes():
    """Found at stop 35: a float32 midpoint of two 784-d points is off their line by float32 rounding (5.6e-7
    here), and passed float64's 1e-9 collinearity test, so the slice's second axis was rounding noise; the same
    points in float64 were refused. Infinite margins and extents were accepted and blamed on the model later, and
    a box whose area overflows float64 was a NotPiecewiseLinearError advising float64. NumPy scalars are numbers."""
    x = torch.randn(2, 784, generator=torch.Generator().manual_seed(0))
    mid32 = (x[0] + x[1]) / 2
    off = mid32.double() - (x[0].double() + x[1].double()) / 2
    assert 0 < float(off.norm()) < 1e-5  # the oracle: the float32 midpoint is the true one up to float32 rounding
    with pytest.raises(InvalidInputError, match="collinear"):
        Plane.through(x[0], x[1], mid32)
    Plane.through(x[0], x[1], mid32 + 1e-3 * torch.randn(784, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(InvalidInputError, match="'margin' parameter of Plane.through must be a finite number"):
        Plane.through(torch.zeros(3), torch.eye(3)[0], torch.eye(3)[1], margin=float("inf"))
    with pytest.raises(InvalidInputError, match="'extent' parameter of Plane.from_directions must be a finite"):
        Plane.from_directions(torch.zeros(2), torch.eye(2)[0], torch.eye(2)[1], extent=float("inf"))
    with pytest.raises(InvalidInputError, match="area overflows"):
        Plane.box(-1e300, 1e300)
    assert torch.equal(Plane.box(np.float32(-1), np.int64(1)).domain, Plane.box(-1.0, 1.0).domain)


def test_numpy_scalar_options_equal_python_numbers():
    """Found at stop 35: n_samples=np.int64(64) was refused as "must be an int ... Got np.int64(64)" (memory
    budgets, tie_tol, n_dirs alike), while tol took NumPy floats. Results equal those with Python numbers."""
    from polytope_lens.paths import path_crossings

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    py = path_crossings(mlp, a, b, method="sampled", n_samples=64, tol=1e-6, memory_budget=2**30)
    np_ = path_crossings(mlp, a, b, method="sampled", n_samples=np.int64(64), tol=np.float64(1e-6),
                         memory_budget=np.int64(2**30))
    assert py.counts.tolist() == np_.counts.tolist() and py.tolerance == np_.tolerance
    ex = path_crossings(mlp, a, b, tie_tol=np.float32(1e-12))
    assert ex.counts.tolist() == path_crossings(mlp, a, b).counts.tolist()
    pts = torch.randn(4, 2)
    assert np.array_equal(local_complexity(mlp, pts, n_dirs=np.int64(2), radius=np.float32(0.5)).total,
                          local_complexity(mlp, pts, n_dirs=2, radius=float(np.float32(0.5))).total)
    assert slice_box(mlp, memory_budget=np.int64(2**30)).num_regions == slice_box(mlp).num_regions
    with pytest.raises(InvalidInputError, match="'n_samples' parameter"):
        path_crossings(mlp, a, b, n_samples=True)


@pytest.mark.parametrize("n_out,seed", [(3, 0), (1, 2)])
def test_class_picture_paints_torch_argmax_where_scores_tie_over_an_area(n_out, seed):
    """Found at stop 35: a net ending in nn.ReLU() has regions where several scores are exactly 0; every tied class
    kept the whole region, so the picture showed the last drawn (17.7 % of a box painted another class than
    torch.argmax; one score, 0 everywhere, painted class 1). Oracle: argmax (one score: > 0 is class 1) on a grid,
    against the last piece covering each point, as matplotlib paints them."""
    from matplotlib.path import Path

    from polytope_lens.slices.render import class_pieces

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, n_out),
                      nn.ReLU()).double()
    res = slice_box(m, -2, 2)
    polys, cls, region = class_pieces(res)
    g = (np.arange(120) + 0.5123) / 120 * 4 - 2
    u = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    painted = np.full(len(u), -1)
    for poly, c in zip(polys, cls):
        painted[Path(poly).contains_points(u)] = c
    with torch.no_grad():
        y = m(torch.tensor(u))
    want = (y[:, 0] > 0).long().numpy() if n_out == 1 else y.argmax(1).numpy()
    assert (painted >= 0).all() and (painted == want).all()
    assert len(set(region.tolist())) == res.num_regions


def test_neighbours_name_the_models_units_under_units_selection():
    """Found at stop 35: with units=[5, 6], neighbours named the last site's columns (0, 1) as its units; the result
    did not say which units were selected. site_info and the JSON now give unit_ids. Oracle: the unit whose input
    is 0 at each edge's midpoint (forward pass)."""
    from polytope_lens.slices import neighbours

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    res = slice_box(m, -2, 2, units=[5, 6])
    assert res.site_info["3.relu"]["unit_ids"] == [5, 6] and res.to_dict()["unit_ids"] == {"3.relu": [5, 6]}
    nb = neighbours(res)
    checked = 0
    for edge, units in zip(nb.edge, nb.units):
        mid = torch.tensor(edge.mean(0))[None]
        with torch.no_grad():
            z1 = m[0](mid)
            z3 = m[2](torch.relu(z1))
        for site, u in units:
            z = z1 if site == "1.relu" else z3
            assert abs(float(z[0, u])) < 1e-9
            checked += site == "3.relu"
    assert checked >= 5
