"""The local evaluator (``paths.local``: each spatial position holds the breakpoints of its own backward cone)
against the frontier and the graph route (forward passes of the model itself at every point): the same records
(site, unit, piece entered; t to rounding), ties, traces and pieces; and its refusals, each naming what stops it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_site_conv import InvertedResidual, Mobile
from torch import nn

from polytope_lens.errors import InvalidInputError
from polytope_lens.paths import path_crossings, polyline_crossings


class Mixed(nn.Module):
    """What the local evaluator follows beyond the folded MobileNet patterns: a batch norm it cannot fold (its
    convolution's output is read twice), a grouped strided convolution, a subtraction, a constant added, a
    division, a reused ReLU module, an in-place site, and a site after the last processed one is not needed."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.pw = nn.Conv2d(6, 6, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.bn.running_mean.copy_(torch.randn(4, generator=g))
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)

    def forward(self, x):
        s = self.stem(x)
        h = self.relu(self.bn(s) - 0.3 * s + 0.1)
        h = self.grouped(h) / 2.0
        h = F.relu(h, inplace=True)
        h = F.hardtanh(self.pw(h) + h)
        return self.fc(self.relu(h).mean((2, 3)))


def _records(result) -> list:
    out = []
    for p in result.paths:
        r = p.records
        out.append(sorted(zip(r["site"].tolist(), r["unit"].tolist(), r["piece"].tolist(), r["t"].tolist())))
    return out


def _same(a, b, tol=1e-9) -> None:
    ra, rb = _records(a), _records(b)
    assert [len(p) for p in ra] == [len(p) for p in rb]
    for p, q in zip(ra, rb):
        assert [x[:3] for x in p] == [x[:3] for x in q]
        assert max((abs(x[3] - y[3]) for x, y in zip(p, q)), default=0.0) <= tol
    assert [p.ties for p in a.paths] == [p.ties for p in b.paths]
    assert [p.per_layer for p in a.paths] == [p.per_layer for p in b.paths]


@pytest.mark.parametrize("make, shape", [(Mobile, (2, 9, 9)), (InvertedResidual, (2, 7, 6)), (Mixed, (3, 8, 7))])
def test_local_equals_frontier_and_graph(make, shape):
    model = make().double().eval()
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(3, *shape, generator=g, dtype=torch.float64) for _ in range(2))
    local = path_crossings(model, a, b, evaluator="local")
    assert local.exact and "evaluator: local" in local.notes[-1]
    assert all(p.crossings > 20 for p in local.paths)
    _same(local, path_crossings(model, a, b, evaluator="frontier"))
    graph = path_crossings(model, a, b, evaluator="graph")
    _same(local, graph)
    for p, q in zip(local.paths, graph.paths):  # the semantic trace: outputs at region midpoints
        np.testing.assert_allclose(p.trace.js, q.trace.js, atol=1e-9)
        np.testing.assert_array_equal(p.trace.top_class, q.trace.top_class)


def test_local_in_pieces_polylines_and_units():
    model = Mobile().double().eval()
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(1, 2, 9, 9, generator=g, dtype=torch.float64) for _ in range(2))
    whole = path_crossings(model, a, b, evaluator="frontier", trace=False)
    _same(path_crossings(model, a, b, evaluator="local", trace=False, memory_budget=1 << 20), whole)  # many pieces
    pts = torch.randn(2, 4, 2, 9, 9, generator=g, dtype=torch.float64)  # two polylines of four points
    _same(polyline_crossings(model, pts, evaluator="local"), polyline_crossings(model, pts, evaluator="frontier"))
    units = [0, 5, 17, 40]
    _same(path_crossings(model, a, b, evaluator="local", units=units, layers=["relu6", "relu6#1"]),
          path_crossings(model, a, b, evaluator="frontier", units=units, layers=["relu6", "relu6#1"]))


def test_local_ties_across_positions():
    """Two positions that see the same values cross at the same t: one breakpoint, a tie, as the frontier finds."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()).double().eval()
    a = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    b = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    a[..., 0, 0] = a[..., 3, 3] = -1.0
    b[..., 0, 0] = b[..., 3, 3] = 2.0  # positions (0, 0) and (3, 3) move identically
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        model[0].bias.zero_()
    local = path_crossings(model, a, b, evaluator="local")
    frontier = path_crossings(model, a, b, evaluator="frontier")
    _same(local, frontier)
    assert local.paths[0].ties >= 1
    r = local.paths[0].records
    first = r["t"][r["site"] == 0]
    assert np.allclose(first, 1 / 3)  # -1 + 3t = 0 for both positions' first channel


@pytest.mark.parametrize("model, x, kw, why", [
    (nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU()), (1, 4), {}, "not a batch of images"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 2, 1), nn.ReLU()), (1, 1, 6, 6), {},
     "not all ReLU, ReLU6, Hardtanh"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(0.1), nn.Conv2d(2, 2, 1), nn.ReLU()), (1, 1, 6, 6), {},
     "not all ReLU, ReLU6, Hardtanh"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 1), nn.ReLU()),
     (1, 1, 6, 6), {}, "does not follow"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.ReLU()), (1, 1, 6, 6), {"layer": "1.relu"},
     "input space only"),
])
def test_local_refuses_what_it_cannot_follow(model, x, kw, why):
    model = model.double().eval()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*x, generator=g, dtype=torch.float64) for _ in range(2))
    if "layer" in kw:
        kw = dict(kw, inputs=a)
        a, b = torch.rand(1, 2, 4, 4, dtype=torch.float64), torch.rand(1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match=f"evaluator='local'.*{why}") as e:
        path_crossings(model, a, b, evaluator="local", **kw)
    assert "\n" not in str(e.value)


def test_local_padding_only_windows_and_constants():
    """A 1 x 1 convolution with padding makes border positions whose window is all padding (the bias alone there),
    and a zero pad then a constant added moves those positions off zero: every position is read, not only those
    a crossing touched."""

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, 3, padding=1)
            self.b = nn.Conv2d(3, 3, 1, padding=1)
            self.c = nn.Conv2d(3, 2, 3, stride=2)

        def forward(self, x):
            h = F.relu(self.a(x))
            h = F.relu(self.b(h))
            h = F.relu(F.pad(h, (1, 0, 0, 1)) + 0.25)
            return self.c(h).mean((2, 3))

    torch.manual_seed(4)
    model = Padded().double().eval()
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(2, 2, 6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    local = path_crossings(model, a, b, evaluator="local")
    _same(local, path_crossings(model, a, b, evaluator="graph"))
    _same(local, path_crossings(model, a, b, evaluator="frontier"))


class _Broadcast(nn.Module):
    """A conv net whose middle step (``how``) is one the local evaluator must refuse."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.offset = nn.Parameter(torch.randn(2, 1, 1))
        self.mid = nn.Identity()

    def forward(self, x):
        h = F.relu(self.a(x))
        if self.how == "parameter":
            h = h + self.offset  # a tensor of the model's, broadcast over positions
        elif self.how == "broadcast":
            h = h + h.mean(3, keepdim=True)  # two images of different shapes
        elif self.how == "size":
            h = h + h.size(1)  # a size in arithmetic
        else:
            h = self.mid(h)
        return F.relu(self.b(h))


@pytest.mark.parametrize("how, why", [("parameter", "does not follow"), ("broadcast", "does not follow"),
                                      ("size", "does not follow"), ("hook", "forward hooks")])
def test_local_refuses_broadcasts_sizes_and_hooks(how, why):
    model = _Broadcast(how).double().eval()
    if how == "hook":
        model.mid.register_forward_hook(lambda m, i, o: o * 2.0)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, 1, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    with pytest.raises(InvalidInputError, match=f"evaluator='local'.*{why}"):
        path_crossings(model, a, b, evaluator="local")
    frontier = path_crossings(model, a, b, evaluator="frontier")  # what it refused, the frontier follows
    assert frontier.exact and sum(p.crossings for p in frontier.paths) > 0
