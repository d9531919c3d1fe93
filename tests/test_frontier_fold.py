"""Batch norm and zero padding folded into convolutions in the frontier evaluator's graph (``fold_into_convolutions``):
the folded graph computes the model's function, only the foldable patterns are folded, the model itself is left as
it was, and exact paths through the folded graph equal dense sampling of the model and the unfolded frontier."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from polytope_lens.capture import ACTIVATION_MODULE_CLASSES
from polytope_lens.errors import InvalidInputError
from polytope_lens.paths import path_crossings
import polytope_lens.paths.frontier as frontier
from test_paths import dense_count


def _randomise_norms(model: nn.Module, g: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.4)
                if bn.affine:
                    bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


class FoldNet(nn.Module):
    """Every pattern the fold takes, beside ones it must leave: a module convolution after symmetric zero padding and
    before batch norm; a functional one after ``F.pad`` (other amounts per dimension, added to its own padding), with
    no bias before a batch norm without weights; asymmetric padding before a strided convolution; a convolution whose
    output is read twice; reflection padding; zero padding read twice; a convolution in padding="same" form; a
    bias-free module before a batch norm, in a residual block."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pad1, self.c1, self.bn1 = nn.ZeroPad2d(1), nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)
        self.w2 = nn.Parameter(torch.randn(4, 4, 3, 3, generator=g) * 0.3)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.pad3, self.c3, self.bn3 = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4)
        self.c4, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c5, self.c7 = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        self.c6, self.bn6 = nn.Conv2d(4, 4, 3, padding="same", bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 3 * 3, 3)
        _randomise_norms(self, g)
        self.eval()

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(self.pad1(x))))  # 8 x 8: pad and norm folded
        h = F.relu6(2.0 * self.bn2(F.conv2d(F.pad(h, (1, 1, 2, 2)), self.w2, None, 1, (0, 1))))  # both folded
        h = F.relu(self.bn3(self.c3(self.pad3(h))))  # 4 x 4: the norm is folded, the asymmetric pad is not
        y = self.c4(h)
        h = F.hardtanh(self.bn4(y) + 0.5 * y)  # read twice: not folded
        h = F.relu(self.c5(F.pad(h, (1, 1, 1, 1), mode="reflect")))  # not folded (not zeros)
        q = F.pad(h, (1, 1, 1, 1))
        h = F.relu(self.c7(q) + q[:, :, 1:-1, 1:-1])  # the padded tensor is read twice: not folded
        h = F.relu(h + self.bn6(self.c6(h)))  # folded, the fused bias is new
        return self.head(F.max_pool2d(h, 2, ceil_mode=True).flatten(1))


class Fold1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.c2 = nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.Conv1d(3, 3, 1)
        self.kept = nn.BatchNorm1d(3, track_running_stats=False)  # normalises with each batch's statistics

    def forward(self, x):
        return torch.relu(self.kept(self.c2(torch.relu(self.bn(self.c(F.pad(x, (2, 2))))))))


class EdgeNet(nn.Module):
    """Patterns found in review: padding computed from the input's size (graph nodes), a one-value padding sequence
    (torch repeats it over the dimensions), and an in-place site between a padding and its convolution."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
        self.w2 = nn.Parameter(torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.3)
        self.pad3, self.c3, self.bn3 = nn.ZeroPad2d(1), nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x):
        p = x.size(-1) // 8
        h = torch.relu(self.bn1(F.conv2d(F.pad(x, (1, 1, 1, 1)), self.c1.weight, self.c1.bias, 1, (p, p))))
        h = F.conv2d(F.pad(h, (1, 1, 2, 2)), self.w2, None, 1, (1,))  # padding (3, 2) in all
        q = self.pad3(h)  # read only by c3, but h changes in place before c3 runs
        r = F.relu(h, inplace=True)
        return (F.relu(self.bn3(self.c3(q))) + r).flatten(1)


def _traced(model):
    return fx.GraphModule(model, frontier._Tracer(ACTIVATION_MODULE_CLASSES).trace(model))


def _batch_norm_calls(gm):
    return sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
               for n in gm.graph.nodes)


def test_fold_computes_the_model_and_leaves_it_as_it_was():
    """Counts by hand (FoldNet: norms 1, 2, 3, 6 and pads 1, 2; Fold1d: one of each), outputs equal the model's to
    1e-13 in float64, the model's modules and tensors unchanged, a second fold finds nothing, and a model in training
    mode keeps its norms (they would normalise with each batch's statistics)."""
    g = torch.Generator().manual_seed(1)
    for model, x, want in [(FoldNet().double(), torch.randn(5, 2, 8, 8, generator=g, dtype=torch.float64), (4, 2)),
                           (_randomise_norms(Fold1d().double().eval(), g),
                            torch.randn(5, 2, 9, generator=g, dtype=torch.float64), (1, 1))]:
        before = copy.deepcopy(model.state_dict())
        gm = _traced(model)
        norms = _batch_norm_calls(gm)
        assert frontier.fold_into_convolutions(gm) == want
        assert _batch_norm_calls(gm) == norms - want[0]
        with torch.no_grad():
            np.testing.assert_allclose(gm(x).numpy(), model(x).numpy(), rtol=0, atol=1e-13)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert _batch_norm_calls(_traced(model)) == norms  # the model still calls its own norms
        assert frontier.fold_into_convolutions(gm) == (0, 0)
    training = _traced(FoldNet().double().train())
    assert frontier.fold_into_convolutions(training) == (0, 2)
    shared = _traced(SharedWeight().double().eval())
    assert frontier.fold_into_convolutions(shared) == (0, 0)
    # review's cases: the padding with graph nodes is left (norm 1 too: its convolution's arguments are not
    # constants), the one-value padding and the padding before the in-place site are folded, and the result holds
    edge, x = _randomise_norms(EdgeNet().double().eval(), g), torch.randn(3, 2, 9, 9, generator=g, dtype=torch.float64)
    gm = _traced(edge)
    assert frontier.fold_into_convolutions(gm) == (1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), edge(x).numpy(), rtol=0, atol=1e-13)


def test_fold_leaves_hooked_modules():
    """A module's forward hooks would not run once it is folded away: a hooked batch norm, convolution or padding
    stays, as does everything while a global forward hook is registered."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    for owner, kind, want in [("bn1", "forward", (3, 2)), ("c1", "pre", (3, 1)), ("pad1", "forward", (4, 1))]:
        net = FoldNet().double()
        module = getattr(net, owner)
        if kind == "forward":
            module.register_forward_hook(lambda m, i, o: o + 0.5)
        else:
            module.register_forward_pre_hook(lambda m, i: (i[0] * 1.5,))
        gm = _traced(net)
        assert frontier.fold_into_convolutions(gm) == want
        with torch.no_grad():
            np.testing.assert_allclose(gm(x).numpy(), net(x).numpy(), rtol=0, atol=1e-13)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert frontier.fold_into_convolutions(_traced(FoldNet().double())) == (0, 0)
    finally:
        handle.remove()


class HeadNet(nn.Module):
    """A convolution and batch norm after the last site: only the class scores show what happens there."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3)
        _randomise_norms(self, torch.Generator().manual_seed(7))
        self.eval()

    def forward(self, x):
        return self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))).mean((2, 3))


def test_a_folded_graph_that_fails_its_checks_gives_way_to_the_models_own(monkeypatch):
    """A fold that raises or computes something else (simulated: every folded bias off, or only the one after the
    last site, which only the class scores show) is dropped: the frontier runs the model's own graph, says nothing
    was folded, and its records and trace equal the graph route's."""
    g = torch.Generator().manual_seed(6)
    real = frontier.fold_into_convolutions

    def raises(gm):
        raise RuntimeError("a misjudged pattern")

    def wrong(gm, last_only=False):
        counts = real(gm)
        names = sorted(name for name, _ in gm.named_buffers() if name.endswith("bias"))
        for name in names[-1:] if last_only else names:
            gm.register_buffer(name, getattr(gm, name) + 0.5)
        return counts
    for net, fakes in [(FoldNet(seed=5), (raises, wrong)), (HeadNet(), (lambda gm: wrong(gm, last_only=True),))]:
        a = 3 * torch.randn(1, 2, 8, 8, generator=g)
        b = 3 * torch.randn(1, 2, 8, 8, generator=g)
        graph = path_crossings(net, a, b, evaluator="graph")
        for fake in fakes:
            monkeypatch.setattr(frontier, "fold_into_convolutions", fake)
            front = path_crossings(net, a, b, evaluator="frontier")
            assert "frontier" in front.notes[-1] and "folded" not in front.notes[-1]
            p, q = graph.paths[0], front.paths[0]
            assert p.per_layer == q.per_layer and p.crossings > 20
            np.testing.assert_allclose(np.sort(p.records["t"]), np.sort(q.records["t"]), rtol=0, atol=1e-12)
            np.testing.assert_allclose(p.trace.top_prob, q.trace.top_prob, rtol=0, atol=1e-12)


class ViewAfterInPlaceSite(nn.Module):
    """The last site changes its input in place, and a view of that input taken before it is read after it."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l0, self.l1, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(4, 3)
        with torch.no_grad():
            for layer in (self.l0, self.l1, self.head):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))

    def forward(self, x):
        h = self.l1(torch.relu(self.l0(x)))
        v = h[:, :4]
        F.relu(h, inplace=True)
        return self.head(v)


def test_frontier_refuses_a_graph_whose_class_scores_differ():
    """Found in review, older than the fold: on this model the frontier's site copy left the view unchanged, so its
    class scores differed from the model's while every site's unit inputs agreed. The build now also compares the
    class scores: ``frontier`` is a one-line error (``auto`` would take the graph route), whose scores are the
    model's."""
    net = ViewAfterInPlaceSite().eval()
    g = torch.Generator().manual_seed(1)
    a, b = 3 * torch.randn(1, 6, generator=g), 3 * torch.randn(1, 6, generator=g)
    with pytest.raises(InvalidInputError, match="its class scores differ from a plain forward pass"):
        path_crossings(net, a, b, evaluator="frontier")
    trace = path_crossings(net, a, b, evaluator="graph").paths[0].trace
    t = torch.as_tensor(trace.t, dtype=torch.float64).reshape(-1, 1)
    with torch.no_grad():
        want = torch.softmax(net.double()(a.double() + t * (b - a).double()), -1).amax(-1).numpy()
    np.testing.assert_allclose(trace.top_prob, want, rtol=0, atol=1e-6)  # the frontier was off by 0.012


class SharedWeight(nn.Module):
    """A convolution's weight read by another node (here scaled in place between the padding and the convolution):
    the fold must not move the convolution before that write."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        q = F.pad(x, (1, 1, 1, 1))
        self.c.weight.data.mul_(1.0)  # another reader of the weight
        return torch.relu(self.bn(self.c(q))).flatten(1)


@pytest.mark.parametrize("fold", [True, False])
def test_exact_paths_through_the_folded_graph(monkeypatch, fold):
    """Frontier paths through FoldNet equal dense float64 sampling of the model (an independent count) and the
    graph route's records; the result's note says what was folded."""
    monkeypatch.setattr(frontier, "FOLD_INTO_CONVOLUTIONS", fold)
    net = FoldNet(seed=3)
    g = torch.Generator().manual_seed(4)
    a, b = 3 * torch.randn(3, 2, 8, 8, generator=g), 3 * torch.randn(3, 2, 8, 8, generator=g)
    front = path_crossings(net, a, b, evaluator="frontier")
    graph = path_crossings(net, a, b, evaluator="graph")
    assert "frontier" in front.notes[-1]
    assert ("4 batch norms and 2 zero paddings folded into convolutions" in front.notes[-1]) == fold
    assert sum(p.crossings for p in front.paths) > 100
    for i, (p, q) in enumerate(zip(graph.paths, front.paths)):
        assert q.per_layer == dense_count(net, lambda t, i=i: a[i:i + 1].double() + t.reshape(-1, 1, 1, 1)
                                          * (b[i] - a[i]).double())
        assert p.per_layer == q.per_layer and p.ties == q.ties
        np.testing.assert_allclose(np.sort(p.records["t"]), np.sort(q.records["t"]), rtol=0, atol=1e-12)
        assert (p.trace.top_class == q.trace.top_class).all()


class _RandomConvNet(nn.Module):
    """A random stack of convolutions (module or functional, strided, grouped, with or without bias), each after
    some padding (none, symmetric or asymmetric modules, ``F.pad``, its own, "same") and before an optional batch
    norm (affine or not) and activation, with residual adds where shapes allow."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
        self.plan, c = [], 3
        for i in range(4):
            out = c if pick(2) else 2 * c
            groups = c if out == c and pick(3) == 0 else 1
            stride = 1 + pick(2) if i < 2 else 1
            pad = ["none", "zero_sym", "zero_asym", "fpad_sym", "own", "same"][pick(6)]
            if pad == "same":
                stride = 1
            k = 3 if pad != "none" else 1 + 2 * pick(2)
            functional = bool(pick(2))
            conv = nn.Conv2d(c, out, k, stride=stride, groups=groups, bias=bool(pick(2)),
                             padding="same" if pad == "same" else 1 if pad == "own" else 0)
            if functional:
                setattr(self, f"w{i}", nn.Parameter(conv.weight.detach().clone()))
                setattr(self, f"b{i}", None if conv.bias is None else nn.Parameter(conv.bias.detach().clone()))
            else:
                setattr(self, f"c{i}", conv)
            norm = [None, nn.BatchNorm2d(out), nn.BatchNorm2d(out, affine=False)][pick(3)]
            if norm is not None:
                setattr(self, f"n{i}", norm)
            self.plan.append([i, pad, stride, groups, functional, conv.padding, norm is not None, pick(3), False])
            c = out
        _randomise_norms(self, g)
        self.eval()
        self.shapes = []  # residual adds where a step keeps its input's shape (at the test's 24 x 23 images)
        with torch.no_grad():
            self(torch.zeros(1, 3, 24, 23))
        shapes, self.shapes = self.shapes, None
        for step, (before, after) in zip(self.plan, shapes):
            step[-1] = before == after and bool(pick(2))

    def forward(self, x):
        for i, pad, stride, groups, functional, own, norm, act, residual in self.plan:
            h = x
            if pad == "zero_sym":
                h = nn.functional.pad(h, (1, 1, 1, 1))
            elif pad == "zero_asym":
                h = F.pad(h, (0, 1, 0, 1))
            elif pad == "fpad_sym":
                h = F.pad(h, (1, 1, 1, 1), value=0.0)
            if functional:
                h = F.conv2d(h, getattr(self, f"w{i}"), getattr(self, f"b{i}"), stride, own, 1, groups)
            else:
                h = getattr(self, f"c{i}")(h)
            if norm:
                h = getattr(self, f"n{i}")(h)
            h = [torch.relu, F.relu6, lambda v: v][act](h)
            if self.shapes is not None:
                self.shapes.append((x.shape, h.shape))
            x = x + h if residual else h
        return x.flatten(1)


@pytest.mark.parametrize("seed", range(40))
def test_fold_keeps_random_conv_nets(seed):
    """On random convolution stacks the fold never raises, folds what it should (counted from the plan), and the
    folded graph computes the model (1e-12)."""
    net = _RandomConvNet(seed).double()
    x = torch.randn(2, 3, 24, 23, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gm = _traced(net)
    norms, pads = frontier.fold_into_convolutions(gm)
    # every batch norm here follows a convolution nothing else reads; every symmetric padding, and only those, folds
    assert norms == sum(p[6] for p in net.plan) and pads == sum(p[1] in ("zero_sym", "fpad_sym") for p in net.plan)
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), net(x).numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(0, 40, 5))
def test_exact_paths_through_random_folded_nets(seed):
    """Frontier paths through random folded convolution stacks equal the graph route's (which runs the model)."""
    net = _RandomConvNet(seed)
    g = torch.Generator().manual_seed(seed)
    a, b = 2 * torch.randn(1, 3, 24, 23, generator=g), 2 * torch.randn(1, 3, 24, 23, generator=g)
    front, graph = path_crossings(net, a, b, evaluator="frontier"), path_crossings(net, a, b, evaluator="graph")
    folds = any(step[6] or step[1] in ("zero_sym", "fpad_sym") for step in net.plan)
    assert ("folded into convolutions" in front.notes[-1]) == folds  # the folded graph passed its checks
    p, q = graph.paths[0], front.paths[0]
    assert p.per_layer == q.per_layer and p.ties == q.ties and p.crossings > 20
    np.testing.assert_allclose(np.sort(p.records["t"]), np.sort(q.records["t"]), rtol=0, atol=1e-12)
