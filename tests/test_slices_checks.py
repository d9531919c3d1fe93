"""Slices: decision boundary on region edges and ties, float64 planes, output forms, until= past a bend, and the
one-line errors of bad inputs. Each test checks the library against the model itself (a grid, probes just off each
segment) or a hand-computed value."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from polytope_lens.capture import run
from polytope_lens.cli import app
from polytope_lens.codes import spline_codes, unpack_pieces
from polytope_lens.errors import InvalidInputError, NotPiecewiseLinearError
from polytope_lens.paths import site_activations
from polytope_lens.slices import (Plane, exact_local_complexity, local_complexity, slice_box, slice_plane,
                                  slice_through)


def _grid_l1(model, lo, hi, n=400):
    """L1 length of the decision boundary in [lo, hi]^2 from a grid: class changes between neighbours x spacing."""
    xs = torch.linspace(lo, hi, n, dtype=torch.float64)
    u = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        c = model(u).argmax(1).reshape(n, n)
    return float((c[1:] != c[:-1]).sum() + (c[:, 1:] != c[:, :-1]).sum()) * float(xs[1] - xs[0])


def _sides(model, seg, eps=1e-6):
    """torch.argmax of the model just either side of each segment's midpoint."""
    mid, d = seg.mean(1), seg[:, 1] - seg[:, 0]
    nrm = torch.stack([-d[:, 1], d[:, 0]], 1)
    nrm = nrm / nrm.norm(dim=1, keepdim=True)
    with torch.no_grad():
        return model(mid + eps * nrm).argmax(1), model(mid - eps * nrm).argmax(1)


def _final_relu_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3), nn.ReLU()).double().eval()
    m[2].bias.data -= 0.2  # classes clamped to a tie at 0 over much of the box: changes lie on region edges
    return m


def _tied_columns_net():
    torch.manual_seed(0)
    nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))  # the tester's draw
    m = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    m[2].weight.data[1] = m[2].weight.data[0]
    m[2].bias.data[1] = m[2].bias.data[0]  # class 1 ties class 0 everywhere: torch.argmax never picks it
    return m


@pytest.mark.parametrize("make", [_final_relu_net, _tied_columns_net])
def test_decision_boundary_is_exactly_where_argmax_changes(make):
    """Every segment separates two different torch.argmax classes, and the segments' L1 length is the grid's to 5 %.
    Before: the final-ReLU net's changes lie on region edges and none was found (0 segments, the grid says 4.7 long);
    with two identical columns 12 of 18 segments had the same class on both sides."""
    m = make()
    res = slice_box(m, -2, 2)
    seg = res.boundary
    assert len(seg) > 0
    a, b = _sides(m, seg)
    assert bool((a != b).all())
    l1 = float((seg[:, 1] - seg[:, 0]).abs().sum())
    assert abs(l1 - _grid_l1(m, -2, 2)) <= 0.05 * l1


@pytest.mark.parametrize("make", [_final_relu_net, _tied_columns_net])
def test_decision_boundary_in_float32_matches_float64(make):
    """Ties are decided above float32 rounding: before that, the noise of a final ReLU's zeros at vertices on its kink
    made 12 segments inside regions where every class is 0."""
    m = make()
    seg = slice_box(m, -2, 2, dtype=torch.float32).boundary.double()
    a, b = _sides(m, seg)
    assert bool((a != b).all())
    l64 = float((slice_box(m, -2, 2).boundary.diff(dim=1)).norm(dim=-1).sum())
    assert abs(float(seg.diff(dim=1).norm(dim=-1).sum()) - l64) <= 1e-4 * l64


def test_plane_through_is_a_float64_square_holding_its_points():
    """margin=0: the bounding square of the three points (one x per vertical edge, one y per horizontal edge, every
    anchor inside). Before: corners 2-4 had float32 offsets, so edges were 3e-8 apart and anchors fell outside."""
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        p = torch.randn(3, 5, generator=g, dtype=torch.float64)
        pl = Plane.through(p[0], p[1], p[2], margin=0)
        d, a = pl.domain, pl.anchors
        assert d.dtype == torch.float64
        assert d[0, 0] == d[3, 0] and d[1, 0] == d[2, 0] and d[0, 1] == d[1, 1] and d[2, 1] == d[3, 1]
        assert torch.isclose(d[1, 0] - d[0, 0], d[2, 1] - d[1, 1], rtol=1e-14)
        lo, hi = d.min(0).values, d.max(0).values
        assert bool(((a >= lo) & (a <= hi)).all())
        side = float((a.max(0).values - a.min(0).values).max())
        assert abs(float(hi[0] - lo[0]) - side) <= 1e-12 * side  # margin 0: the square is the anchors' extent


def test_points_given_as_lists_are_not_rounded_to_float32():
    p0, p1, p2 = [0.1, 0.2], [1.3, -0.7], [0.4, 1.1]
    pl = Plane.through(p0, p1, p2)
    want = (np.array(p0) + np.array(p1) + np.array(p2)) / 3
    assert np.abs(pl.origin.numpy() - want).max() <= 1e-15
    assert np.abs(pl.points(pl.anchors[:1])[0].numpy() - np.array(p0)).max() <= 1e-15
    assert Plane.from_directions([0.1, 0.2], [1.0, 0.0], [0.0, 1.0]).origin.tolist() == [0.1, 0.2]


class _Heads(nn.Module):  # output (n, 3, 2): three 2-way heads
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(2, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.o(F.relu(self.a(x))).reshape(-1, 3, 2)


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(2, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.o(F.relu(self.a(x)))


class _Dict(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(2, 6), nn.Linear(6, 3)

    def forward(self, x):
        return {"y": self.o(F.relu(self.a(x)))}


def _model_at_centroids(res, m):
    u = res.centroids()
    with torch.no_grad():
        return u, m(res.plane.points(u))


def test_output_maps_of_each_output_form():
    """(n, 3, 2): the maps are of out[:, -1], and a note says so; one score: one column that reproduces the model
    (before: a prepended zero column, slope (R, 2, 2)) and a boundary where it changes sign; a dict: no maps, with
    the reason in the notes (before: silently none)."""
    torch.manual_seed(0)
    heads = _Heads().double().eval()
    res = slice_box(heads, -2, 2)
    u, y = _model_at_centroids(res, heads)
    assert (res.predict(u, torch.arange(res.num_regions)) - y[:, -1]).abs().max() <= 1e-12
    assert any("out.reshape(n, -1, 2)[:, -1]" in n and "(3, 2)" in n for n in res.notes)

    one = _One().double().eval()
    res = slice_box(one, -2, 2)
    u, y = _model_at_centroids(res, one)
    assert res.slope.shape == (res.num_regions, 2, 1) and res.offset.shape == (res.num_regions, 1)
    assert (res.predict(u, torch.arange(res.num_regions)) - y).abs().max() <= 1e-12
    assert np.array_equal(res.top_class(), (y[:, 0] > 0).long().numpy())
    assert len(res.boundary) > 0 and not any("output maps" in n for n in res.notes)
    mid = res.boundary.mean(1)
    d = res.boundary[:, 1] - res.boundary[:, 0]
    nrm = torch.stack([-d[:, 1], d[:, 0]], 1) / d.norm(dim=1, keepdim=True)
    with torch.no_grad():
        assert bool(((one(mid + 1e-6 * nrm) > 0) != (one(mid - 1e-6 * nrm) > 0)).all())

    res = slice_box(_Dict().double().eval())
    assert res.slope is None and res.boundary is None
    assert "dict" in res.why_no_maps() and "no floating tensor" in res.why_no_maps()
    with pytest.raises(ValueError, match="dict"):
        res.colors("class")


class _BendAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.a(x))  # site 'relu', the only one
        z = self.b(h)
        return self.o(torch.maximum(z, torch.zeros_like(z)))  # a bend capture does not follow, after it


def test_until_is_not_refused_for_a_bend_after_it():
    """The regions of the model truncated at 'relu' are those of Linear -> ReLU alone (same count, same areas); the
    full slice with output maps is still refused by name, and until='relu' keeps no maps, saying why. Before: every
    call raised NotPiecewiseLinearError ('maximum ... reaches the model's output'), outputs=False too."""
    torch.manual_seed(0)
    m = _BendAfter().double().eval()
    alone = slice_box(nn.Sequential(m.a, nn.ReLU()))
    for kw in ({"until": "relu"}, {"until": "relu", "outputs": False}, {"outputs": False}):
        res = slice_box(m, **kw)
        assert res.num_regions == alone.num_regions
        assert torch.allclose(res.area.sort().values, alone.area.sort().values, atol=1e-12)
        assert res.slope is None
    assert "maximum" in slice_box(m, until="relu").why_no_maps()
    with pytest.raises(NotPiecewiseLinearError, match="maximum"):
        slice_box(m)


_MLP = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("call, name", [
    (lambda p: local_complexity(_MLP, p, n_dirs=2, batch_size=0), "'batch_size'"),
    (lambda p: local_complexity(_MLP, p, n_dirs=2, batch_size=-1), "'batch_size'"),
    (lambda p: local_complexity(_MLP, p, n_dirs=2, radius=float("inf")), "'radius'"),
    (lambda p: local_complexity(_MLP, p, n_dirs=2, dtype=torch.float16), "'dtype'"),
    (lambda p: local_complexity(_MLP, p, n_dirs=2, dtype=torch.int64), "'dtype'"),
    (lambda p: exact_local_complexity(_MLP, p, radius=float("inf")), "'radius' parameter of exact_local"),
    (lambda p: exact_local_complexity(_MLP, p, dtype=torch.float16), "'dtype' parameter of exact_local"),
])
def test_local_complexity_refuses_bad_parameters_in_one_line(call, name):
    with pytest.raises(InvalidInputError, match=name) as e:
        call(torch.randn(4, 2))
    assert "\n" not in str(e.value)


def test_cli_complexity_refuses_an_infinite_radius(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32))
    r = CliRunner().invoke(app, ["complexity", "--model", "toy:2-8-8-2", "--data", f"npy:{tmp_path / 'x.npy'}",
                                 "--json", str(tmp_path / "lc.json"), "--radius", "inf"])
    assert r.exit_code == 1 and "--radius must be a finite number > 0" in r.stderr, r.output


def test_local_complexity_refuses_overflow_at_its_vertices():
    """A finite radius at which the model overflows: pieces of inf/NaN unit inputs were counted as if they were
    values (the exact count and slices refused the same overflow)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 2)).double()
    with torch.no_grad():
        for lin in m[::2]:
            lin.weight.mul_(1e4)
    with pytest.raises(InvalidInputError, match=r"site '\d.relu' are NaN or infinite .*use a smaller radius") as e:
        local_complexity(m, torch.randn(3, 4, dtype=torch.float64), radius=1e300, n_dirs=4)
    assert "\n" not in str(e.value)


def test_exact_local_complexity_says_which_counts_are_near_float_resolution(tmp_path):
    """Points exactly on the crossing of two kink lines: every square centred there holds >= 4 regions, but a square
    of side 1e-13 is below float resolution and its slice merges them. The count says so (it was labelled exact with
    no word), in the API, the JSON and on stderr; a square large enough has no note and the true count."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        m[0].weight[:2, 2] = 0
        m[0].bias[:2] = 0
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 10.0], [0.0, 0.0, 1000.0]])
    tiny = exact_local_complexity(m, pts, radius=1e-13)
    assert (tiny.total < 4).any() and len(tiny.notes) == 1 and "near float resolution at 3 of 3 points" in tiny.notes[0]
    fine = exact_local_complexity(m, pts, radius=1e-3)
    assert (fine.total >= 4).all() and fine.notes == ()
    torch.save(m, tmp_path / "m.pt")
    np.save(tmp_path / "x.npy", pts.numpy())
    r = CliRunner().invoke(app, ["complexity", "--model", f"file:{tmp_path / 'm.pt'}", "--data",
                                 f"npy:{tmp_path / 'x.npy'}", "--radius", "1e-13", "--exact", "--json",
                                 str(tmp_path / "lc.json")])
    assert r.exit_code == 0, r.output
    assert "near float resolution" in r.stderr
    assert "near float resolution" in json.loads((tmp_path / "lc.json").read_text())["exact"]["notes"][0]


@pytest.mark.parametrize("units", [[1.9], [True], [0.999]])
def test_unit_indices_must_be_integers(units):
    """1.9, True and 0.999 were read as units 1, 1 and 0."""
    with pytest.raises(InvalidInputError, match="must hold integer unit indices"):
        slice_box(_MLP, units=units)


def _site_case():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(3, 4)
    return m, x, site_activations(m, x, layer="1.relu")


def test_site_plane_errors_are_one_line():
    """Points of the wrong shape for the site (before: a raw RuntimeError from a reshape), a batch of several inputs
    (before: silently its first row), and until= naming the plane's own site (before: 'the model's 1 activation
    sites (3.relu)' of a model with 2)."""
    m, x, a = _site_case()
    with pytest.raises(InvalidInputError, match=r"output shape \(6,\).*Got \(4,\)"):
        slice_through(m, x[0], x[1], x[2], layer="1.relu", inputs=x[:1])
    with pytest.raises(InvalidInputError, match=r"batch of 1.*\(2, 4\)"):
        slice_through(m, a[0], a[1], a[2], layer="1.relu", inputs=x[:2])
    with pytest.raises(InvalidInputError, match=r"at or before the plane's site '1.relu'.*\(3.relu\)"):
        slice_through(m, a[0], a[1], a[2], layer="1.relu", inputs=x[:1], until="1.relu")
    assert slice_through(m, a[0], a[1], a[2], layer="1.relu", inputs=x[:1], until="3.relu").num_regions >= 1


def test_nan_weights_and_overflow_are_named():
    """Before: 'not an affine function ... LayerNorm or softmax' (NaN in the first layer), or no maps and no word
    (NaN in the last)."""
    m = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    m[2].weight.data[0, 1] = float("nan")
    with pytest.raises(InvalidInputError, match=r"parameter '2.weight' holds NaN or infinite"):
        slice_box(m)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    m[2].weight.data *= 1e30
    with torch.no_grad():  # the model itself overflows float32 at the box's corners
        assert not bool(torch.isfinite(m[:3](torch.tensor([[1e10, 1e10], [-1e10, 1e10]]))).all())
    with pytest.raises(InvalidInputError, match=r"site '3.relu' are NaN or infinite.*overflows float32"):
        slice_box(m, -1e10, 1e10, dtype=torch.float32)


def test_color_by_class_of_a_softmax_model_gives_the_real_reason(tmp_path):
    """No --until was given: the message says the output is not affine (softmax), not that --until cut it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3), nn.Softmax(-1))
    res = slice_box(m.double())
    assert res.slope is None and "softmax" in res.why_no_maps()
    torch.save(m.float(), tmp_path / "softmax.pt")
    r = CliRunner().invoke(app, ["slice", "--model", f"file:{tmp_path / 'softmax.pt'}", "--box", "-1,1,-1,1",
                                 "--json", str(tmp_path / "s.json"), "--png", str(tmp_path / "s.png"),
                                 "--color-by", "class"])
    assert r.exit_code == 1 and "softmax" in r.stderr and "until" not in r.stderr, r.output


class _AddsIntoItsInput(nn.Module):
    """``x.add_(0.5)`` on the model's own input, then Linear and ReLU; ``in_place=False``: ``x + 0.5``."""

    def __init__(self, in_place: bool):
        super().__init__()
        torch.manual_seed(0)
        self.in_place, self.lin = in_place, nn.Linear(2, 6)

    def forward(self, x):
        return torch.relu(self.lin(x.add_(0.5) if self.in_place else x + 0.5))


def test_a_model_that_writes_into_its_input_leaves_the_plane_alone():
    """Found by a tester at stop 30: the first pass fed the model a view of the plane's origin, so ``x.add_()`` moved
    the caller's plane (and exact_local_complexity's points) and the slice was of another square. Oracle: the
    out-of-place network's slice."""
    from polytope_lens.slices import slice_plane

    plane = Plane.box(-1, 1)
    got = slice_plane(_AddsIntoItsInput(True), plane, outputs=False)
    want = slice_plane(_AddsIntoItsInput(False), Plane.box(-1, 1), outputs=False)
    assert plane.origin.tolist() == [0.0, 0.0]
    assert got.num_regions == want.num_regions and sorted(got.code_hex()) == sorted(want.code_hex())
    x = torch.zeros(3, 2, dtype=torch.float64)
    exact_local_complexity(_AddsIntoItsInput(True), x, radius=0.5)
    assert x.abs().max() == 0


class _OnItsKinkOverAnArea(nn.Module):
    """ReLU, then a bias-free Linear and a ReLU: where both first units are off the second unit is exactly 0."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1, self.l2 = nn.Linear(2, 2), nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.l1.weight.copy_(torch.randn(2, 2, generator=g))
            self.l1.bias.copy_(torch.randn(2, generator=g) * 0.4 - 0.6)
            self.l2.weight.copy_(torch.randn(1, 2, generator=g))

    def forward(self, x):
        return F.relu(self.l2(F.relu(self.l1(x))))


@pytest.mark.parametrize("seed", [2, 26])
def test_float32_slices_cover_the_plane_with_their_default_tolerance(seed):
    """Found by a tester at stop 30: float32 slices used float64's snapping tolerance (1e-10), under float32's
    rounding; seed 26 lost a sliver of the plane (area 15.34 of 16) and seed 2 gave a region the wrong code. Now the
    default is 64 ulps of the dtype. Oracles: the plane's area, the float64 slice's count, and the model's own code
    at every region's centroid."""
    from polytope_lens.codes import spline_codes
    from polytope_lens.slices import slice_plane

    m = _OnItsKinkOverAnArea(seed).eval()
    r = slice_plane(m, Plane.box(-2, 2), dtype=torch.float32, outputs=False)
    r64 = slice_plane(m, Plane.box(-2, 2), outputs=False)
    assert r.tol == pytest.approx(64 * torch.finfo(torch.float32).eps) and r64.tol == 1e-10
    assert float(r.area.sum()) == pytest.approx(16.0, rel=1e-5) and r.num_regions == r64.num_regions
    codes = spline_codes(copy.deepcopy(m).float(), r.centroids().float())
    for site in r.sites:
        o, n = r.site_bytes[site]
        assert (codes[site].packed == r.codes[:, o:o + n]).all(), site
    # a tolerance under the dtype's rounding is refused, not run into a partition that does not tile the plane
    for dtype, bad in ((torch.float32, 1e-10), (torch.float64, 0.0), (torch.float64, True)):
        with pytest.raises(InvalidInputError, match=r"'tol' parameter of slice_plane .*64 ulps at least"):
            slice_plane(m, Plane.box(-2, 2), dtype=dtype, tol=bad, outputs=False)


def test_a_partition_that_does_not_tile_the_plane_is_an_error():
    """The last check of every slice (any cut: all lines, unit by unit, max pool): areas that do not sum to the
    plane's, or a NaN area, raise instead of returning a result labelled exact."""
    from polytope_lens.slices.partition import _check_tiling

    plane = Plane.box(-1, 1)  # area 4
    _check_tiling(torch.tensor([1.0, 3.0], dtype=torch.float64), plane, torch.float64, 1e-10)
    for area in ([1.0, 2.9], [1.0, float("nan"), 3.0], [-1.0, 5.0]):
        with pytest.raises(NotPiecewiseLinearError, match="do not tile the plane"):
            _check_tiling(torch.tensor(area, dtype=torch.float64), plane, torch.float64, 1e-10)


@pytest.mark.parametrize("side", [1e-8, 1e-10, 1e-12])
def test_a_tiny_box_keeps_its_regions(side):
    """A tiny box around the crossing of two first-layer kink lines: at side <= 1e-10 a fixed tol of 1e-10 (of the
    unit inputs' scale) snaps both lines away (1 region); the default tol is lowered to the plane's size (with a
    note) and the count equals the distinct codes of a dense grid of forward passes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    W, b = net[0].weight.detach(), net[0].bias.detach()
    centre = torch.linalg.solve(W[:2], -b[:2])  # units 0 and 1 on their kinks
    lo, hi = centre - side / 2, centre + side / 2
    box = Plane.box(float(lo[0]), float(hi[0]), ylo=float(lo[1]), yhi=float(hi[1]))
    res = slice_plane(net, box)
    xs, ys = (torch.linspace(float(lo[i]), float(hi[i]), 301, dtype=torch.float64) for i in (0, 1))
    u = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        h1 = net[0](u)
        h2 = net[2](h1.relu())
    grid = len(torch.unique(torch.cat([h1 > 0, h2 > 0], 1).to(torch.int8), dim=0))
    assert grid == 4 and res.num_regions == grid
    assert res.tol == 1e-10 and any(n.startswith("tol lowered from 1e-10") for n in res.notes)
    assert abs(float(res.area.sum()) - float((hi - lo).prod())) <= 1e-9 * float((hi - lo).prod())
    given = slice_plane(net, box, tol=1e-10)
    assert not any("lowered" in n for n in given.notes)  # a tol given is kept
    assert given.num_regions == (1 if side <= 1e-10 else 4)


def test_a_plane_where_every_unit_is_constant_keeps_its_tol():
    """All first-layer units dead on a 20 x 20 box: the second site's inputs are constant over the plane, which says
    nothing about the plane's size, so tol is not lowered there (a reviewer saw a note calling the plane small)."""
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -0.5]]))
        net[0].bias.fill_(-100.0)
    r = slice_plane(net, Plane.box(-10, 10, ylo=-10, yhi=10))
    assert r.num_regions == 1 and r.tol == 1e-10 and not any("lowered" in n for n in r.notes)


@pytest.mark.parametrize("big", [1.0, 1e3, 1e5])
def test_a_large_constant_unit_does_not_coarsen_a_tiny_plane(big):
    """Three ReLU kink lines through the centre of a box of side 2e-12 and a fourth unit with no weight and bias
    ``big`` (a tester's): 6 regions, as a 401 x 401 grid of forward passes counts. The site's scale came from the
    constant unit, which raised the tolerance of every unit (1 region at big = 1000); a unit that does not move over
    the plane no longer sets it."""
    m = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].weight[:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        m[0].bias.zero_()
        m[0].bias[3] = big
        m[2].weight.fill_(1.0)
    e = 1e-12
    a = torch.linspace(-e, e, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(a, a, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        want = len(torch.unique((m[0](grid) > 0).to(torch.int8), dim=0))
    res = slice_box(m, -e, e)
    assert want == 6 and res.num_regions == want
    # tol's floor (64 ulps of scale 1) over the least move of a unit whose kink crosses the box (2e-12: x, y) is stated
    share = 64 * torch.finfo(torch.float64).eps / 2e-12
    assert any(n.startswith(f"near float resolution: at '1.relu' the snapping tolerance is {share:.2g} of how far")
               for n in res.notes), res.notes


def test_the_float_resolution_note_reads_the_least_moving_crossing_unit():
    """Units 1000 x and w y on a box of side 1e-12 (a reviewer's): the y line is lost once w y moves by less than
    tol's floor (1.4e-14) across the box, and the note says so from that unit's move, not the site's largest."""
    for w, regions in ((1.0, 4), (0.001, 2)):
        m = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2)).double()
        with torch.no_grad():
            m[0].weight.copy_(torch.tensor([[1e3, 0.0], [0.0, w]]))
        r = slice_box(m, -5e-13, 5e-13)
        share = 64 * torch.finfo(torch.float64).eps / (w * 1e-12)
        assert r.num_regions == regions and any(f"snapping tolerance is {share:.2g} of how far" in n for n in r.notes)


def test_float32_cnn_slice_codes_are_the_model_codes_inside_each_region():
    """A float32 slice of a CNN with max pooling: each region's code was read at its centroid after snapping, so a
    thin region beside a cut took its neighbour's piece (76 codes shared by several regions, 65 adjacent regions
    with equal codes). Oracle: spline_codes of the float32 model at the region centroids; a unit (window) may
    differ only where its input is within 10 tol of the kink (the chosen entry within 10 tol of the maximum)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.3, 0.3)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                      nn.ReLU6(), nn.Flatten(), nn.Linear(36, 3)).eval()
    xs = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(100))
    r = slice_through(m, xs[0], xs[1], xs[2], dtype=torch.float32)
    X = r.plane.points(r.centroids().double()).float()
    codes = spline_codes(m, X)
    z = {}
    with torch.no_grad():
        run(m, lambda: m(X), lambda site, v: z.__setitem__(site.name, v))
    for name in r.sites:
        o, b = r.site_bytes[name]
        act = codes[name].activation
        n = codes[name].n_units
        mine = unpack_pieces(r.codes[:, o:o + b], n, act)
        bad_row, bad_unit = np.nonzero(codes[name].pieces() != mine)
        tol = 10 * r.tol * max(1.0, float(z[name].abs().max()))
        if name.endswith("max_pool2d"):  # 2x2 windows: entry (i, j) of window (c, h, w) is z[c, 2h + i, 2w + j]
            w = z[name].reshape(len(X), 4, 3, 2, 3, 2).permute(0, 1, 2, 4, 3, 5).reshape(len(X), n, 4)
            v = w[bad_row, bad_unit]
            gap = v.amax(-1) - v[torch.arange(len(v)), torch.as_tensor(mine[bad_row, bad_unit])]
        else:
            v = z[name].reshape(len(X), -1)[bad_row, bad_unit]
            gap = torch.stack([(v - k).abs() for k in ((0.0, 6.0) if name.endswith("relu6") else (0.0,))]).amin(0)
        assert (gap <= tol).all(), (name, len(gap), float(gap.max()))
    _, counts = np.unique(r.codes, axis=0, return_counts=True)
    assert (counts > 1).sum() <= 0.001 * r.num_regions


def _line_count(m, x, q, side):
    """Oracle: regions of a 1-hidden-layer ReLU MLP in the square of side ``side`` at x in the plane of q's columns:
    1 + kink lines crossing the square + their crossings inside it (general position)."""
    import itertools

    W, b = m[0].weight.detach().double(), m[0].bias.detach().double()
    a, c, h = (W @ q).numpy(), (W @ x + b).numpy(), side / 2
    vals = np.array([[-h, -h], [h, -h], [h, h], [-h, h]]) @ a.T + c
    cr = [j for j in range(len(c)) if vals[:, j].min() < 0 < vals[:, j].max()]
    inside = sum(bool(np.all(np.abs(np.linalg.solve(a[[i, j]], -c[[i, j]])) < h))
                 for i, j in itertools.combinations(cr, 2))
    return 1 + len(cr) + inside


def test_exact_local_complexity_shares_one_plane_and_flags_wide_squares():
    """Found at stop 35: point i's plane was the i-th draw of one generator, so a point's count depended on its
    place in the batch (four copies of one point: 11, 11, 14, 7); and on huge squares the snapping tolerance (tol x
    the largest unit input, ~1 at side 1e10) merged the central structure with no note (72 regions instead of 137).
    Oracle: the closed-form count of a 1-hidden-layer MLP in the shared plane. Also: until='s note is passed on,
    seed and unknown keywords are one-line errors."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    pts = torch.randn(3, 4, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    batch = exact_local_complexity(m, torch.cat([pts, pts[2:].expand(3, -1)]), radius=3.0)
    assert batch.total.tolist() == [_line_count(m, x, q, 3.0) for x in pts] + [batch.total[2]] * 3
    assert batch.total[2] == exact_local_complexity(m, pts[2:], radius=3.0).total[0] and batch.notes == ()
    wide = exact_local_complexity(m, pts, radius=1e10)
    want = [_line_count(m, x, q, 1e10) for x in pts]
    assert (wide.total < want).any()  # the tolerance merged regions: the result says so
    assert len(wide.notes) == 1 and wide.notes[0].startswith("near float resolution at 3 of 3 points (0, 1, 2): "
                                                             "their squares are wide against the structure")
    deep = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    cut = exact_local_complexity(deep, pts, radius=3.0, until="1.relu")
    assert cut.notes == ("partial: only sites up to 1.relu; no output maps or decision boundary",)
    for bad, match in (({"seed": None}, "'seed' parameter of exact_local_complexity"),
                       ({"outputs": True}, "exact_local_complexity got an unexpected keyword argument 'outputs'"),
                       ({"untill": "1.relu"}, "did you mean 'until'")):
        with pytest.raises(InvalidInputError, match=match):
            exact_local_complexity(deep, pts, radius=3.0, **bad)


def test_sampled_local_complexity_notes_a_radius_at_float_resolution():
    """Found at stop 35: float32 points 3e-9 from a kink at radius 1e-8 gave 0 (float64: 1) with no note: the
    vertices rounded onto the points. Now noted; float64 at that radius is not."""
    m = nn.Sequential(nn.Linear(2, 1), nn.ReLU()).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.0]], dtype=torch.float64)), m[0].bias.fill_(-3.0)
    pts = torch.tensor([[3.0 - 3e-9, 0.5]])
    f64 = local_complexity(m, pts, radius=1e-8, n_dirs=2)
    assert f64.total.tolist() == [1] and f64.notes == ()
    f32 = local_complexity(m, pts, radius=1e-8, n_dirs=2, dtype=torch.float32)
    assert len(f32.notes) == 1 and "the vertices round toward the points" in f32.notes[0]
