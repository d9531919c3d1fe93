"""Float64 convolutions (``_conv64``): depthwise convolutions with ATen's values and ATen's own path for every call
they do not take, ungrouped convolutions in slices of the batch with ATen's values to the bit, 1 x 1 convolutions as
matrix products (``POINTWISE_AS_MATMUL``, tried here on the CPU) with ATen's values to rounding, and exact paths
through a MobileNet-style block against dense sampling with ATen's convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import polytope_lens._conv64 as dw
from polytope_lens.capture import run
from polytope_lens.paths import path_crossings

from test_paths import dense_count


@pytest.fixture
def taken(monkeypatch) -> list:
    """One entry per call that ``FastConv64`` sends to ``depthwise_conv2d``."""
    calls = []
    real = dw.depthwise_conv2d
    monkeypatch.setattr(dw, "depthwise_conv2d", lambda *args: calls.append(1) or real(*args))
    return calls


@pytest.mark.parametrize("n,c,side,k,stride,pad,dil", [
    (3, 5, 9, 3, 1, 1, 1), (2, 7, 10, 5, 2, 2, 1), (4, 6, 11, 3, 2, 0, 2), (1, 40, 4, 3, 1, 1, 1),  # channels last
    (70, 8, 20, 3, 1, 1, 1),  # several batch chunks
    (2, 50, 9, 3, 2, 1, 2), (2, 50, 9, 3, (2,), [1], (2,)),  # channels last, strided and dilated
    (2, 50, 9, 3, 1, 0, 1),  # channels last, no padding
    (2, 3, 8, (3, 1), (1, 2), (1, 0), 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_equal_atens(n, c, side, k, stride, pad, dil, bias):
    g = torch.Generator().manual_seed(0)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, side, side, generator=g, dtype=torch.float64)
    w = torch.randn(c, 1, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64) if bias else None
    want = F.conv2d(x, w, b, stride, pad, dil, c)
    got = dw.depthwise_conv2d(x, w, b, stride, pad, dil)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-13 * want.abs().max()
    with dw.FastConv64():
        assert torch.equal(F.conv2d(x, w, b, stride, pad, dil, c), got)
        assert torch.equal(torch.conv2d(x, w, b, stride, pad, dil, c), got)


def test_other_convolutions_are_left_to_aten(monkeypatch, taken):
    """Only float64 CPU depthwise calls (groups = channels in = channels out) up to MAX_IMAGE per image are taken."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    cases = [(x.float(), w.float(), {"groups": 4}),  # float32: oneDNN's kernel is fast
             (x, torch.randn(4, 2, 3, 3, dtype=torch.float64), {"groups": 2}),  # grouped, not depthwise
             (x, torch.randn(8, 1, 3, 3, dtype=torch.float64), {"groups": 4}),  # channel multiplier 2
             (x, w, {"groups": 4, "padding": "same"}),
             (x, torch.randn(4, 4, 3, 3, dtype=torch.float64), {})]
    want = [F.conv2d(xi, wi, **kw) for xi, wi, kw in cases]
    with dw.FastConv64():
        for (xi, wi, kw), v in zip(cases, want):
            assert torch.equal(F.conv2d(xi, wi, **kw), v)
        assert not taken
        monkeypatch.setattr(dw, "MAX_IMAGE", 4 * 6 * 6 - 1)
        F.conv2d(x, w, groups=4)
        assert not taken
        monkeypatch.setattr(dw, "MAX_IMAGE", 4 * 6 * 6)
        F.conv2d(x, w, None, 1, "valid", 1, 4)
        assert len(taken) == 1
        wg = w.clone().requires_grad_()  # autograd must follow the call: ATen's
        F.conv2d(x, wg, groups=4).sum().backward()
        assert len(taken) == 1 and wg.grad is not None
        with torch.no_grad():
            F.conv2d(x, wg, groups=4)
        assert len(taken) == 2


class _CountConvolutions(TorchFunctionMode):
    """Counts the conv2d calls that reach it (from a mode entered after it: those that mode passes on)."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in dw._CONV2D:
            self.batches.append(len(args[0] if args else kwargs["input"]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("c_in,c_out,side,k,stride,pad,groups", [
    (16, 16, 28, 3, 1, 1, 1), (3, 8, 80, 5, 2, 2, 1), (16, 6, 24, 3, 1, "same", 1),
    (16, 32, 40, 1, 1, 0, 1),  # 1 x 1: not unfolded, one call
    (8, 8, 10, 3, 1, 1, 2)])  # grouped: one call (slices would repeat ATen's loop over groups)
def test_ungrouped_convolutions_run_in_slices_of_the_batch_with_atens_values_to_the_bit(c_in, c_out, side, k, stride,
                                                                                      pad, groups):
    """Batches that unfold to more than 4 x COLUMN_BYTES (all the sliced cases here) run in slices."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, c_in, side, side, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    want = F.conv2d(x, w, b, stride, pad, 1, groups)
    counter = _CountConvolutions()
    with counter, dw.FastConv64():
        got = F.conv2d(x, w, bias=b, stride=stride, padding=pad, groups=groups)
    assert torch.equal(got, want)
    out_side = -(-side // stride)
    step = max(1, dw.COLUMN_BYTES // (8 * c_in * k * k * out_side * out_side))
    sliced = groups == 1 and k > 1
    assert not sliced or 37 * 8 * c_in * k * k * out_side ** 2 > 4 * dw.COLUMN_BYTES
    assert counter.batches == ([min(step, 37 - a) for a in range(0, 37, step)] if sliced else [37])
    assert len(counter.batches) > 1 or not sliced


class InvertedResidual(nn.Module):
    """MobileNetV2-style: stem conv-BN-ReLU6, then 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN plus
    the skip, then a 5x5 stride-2 depthwise conv, ReLU and a linear head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem, self.expand = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 1)
        self.dw, self.project = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)
        self.down, self.head = nn.Conv2d(4, 4, 5, stride=2, padding=2, groups=4), nn.Linear(4 * 4 * 4, 3)
        self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in (4, 8, 8, 4)])
        with torch.no_grad():
            for m in (self.stem, self.expand, self.dw, self.project, self.down, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            for bn in self.bns:
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g) * 0.2)
        self.eval()

    def forward(self, x):
        h = F.relu6(3.0 * self.bns[0](self.stem(x)))
        e = F.relu6(3.0 * self.bns[1](self.expand(h)))
        e = F.relu6(3.0 * self.bns[2](self.dw(e)))
        h = h + self.bns[3](self.project(e))
        return self.head(F.relu(self.down(h)).flatten(1))


@pytest.mark.parametrize("evaluator", ["affine", "graph"])
def test_paths_through_depthwise_blocks_equal_dense_sampling_with_atens_convolutions(monkeypatch, taken, evaluator):
    """The engine's forward passes take ``depthwise_conv2d``; the oracle samples the model with ATen's convolutions."""
    m = InvertedResidual()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 1, 7, 7, generator=g), torch.randn(3, 1, 7, 7, generator=g)
    res = path_crossings(m, a, b, evaluator=evaluator, trace=False)
    assert res.exact and taken
    monkeypatch.setattr(dw, "MAX_IMAGE", 0)
    monkeypatch.setattr(dw, "COLUMN_BYTES", 1 << 62)
    for i, p in enumerate(res.paths):
        want = dense_count(m, lambda t, i=i: a[i:i + 1].double() + t.reshape(-1, 1, 1, 1) * (b[i] - a[i]).double(),
                           n0=4096, n_max=2 ** 18)
        assert p.per_layer == want and p.crossings > 0


@pytest.fixture
def pointwise(monkeypatch) -> list:
    """``POINTWISE_AS_MATMUL`` holding the CPU; one entry per call sent to ``pointwise_conv2d``."""
    calls = []
    real = dw.pointwise_conv2d
    monkeypatch.setattr(dw, "POINTWISE_AS_MATMUL", {"cpu"})
    monkeypatch.setattr(dw, "pointwise_conv2d", lambda *args: calls.append(1) or real(*args))
    return calls


@pytest.mark.parametrize("n,c_in,c_out,h,w", [(3, 16, 24, 7, 9), (1, 5, 3, 1, 1), (40, 32, 8, 6, 6),
                                               (2, 1, 6, 5, 4)])  # one channel: both layouts at once
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_values_equal_atens(pointwise, n, c_in, c_out, h, w, bias, channels_last):
    """1 x 1 convolutions as matrix products equal ATen's to rounding, from either memory layout, in ATen's memory
    format: channels-last in, channels-last out (a second 1 x 1 convolution reads it without a copy), contiguous in,
    contiguous out (code after the call may ``view`` it)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(c_out, c_in, 1, 1, generator=g, dtype=torch.float64)
    w2 = torch.randn(c_in, c_out, 1, 1, generator=g, dtype=torch.float64)
    b1 = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    want = F.conv2d(F.conv2d(x, w1, b1), w2)
    with dw.FastConv64():
        mid = F.conv2d(x, w1, b1)
        got = torch.conv2d(mid, w2, None, 1, 0)
    assert len(pointwise) == 2 and got.shape == want.shape
    with torch.no_grad():  # the memory formats ATen's outputs are in (one channel or 1 x 1 images: both)
        aten_mid = F.conv2d(x, w1, b1)
        aten = F.conv2d(aten_mid, w2)

    def formats(t):
        return t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)
    assert formats(mid) == formats(aten_mid) and formats(got) == formats(aten)
    assert (got - want).abs().max() <= 1e-13 * want.abs().max()
    with dw.FastConv64():  # an empty batch is ATen's
        empty = F.conv2d(x[:0], w1, b1)
    assert empty.shape == (0, c_out, h, w) and len(pointwise) == 2


def test_other_convolutions_are_not_taken_as_pointwise(pointwise, monkeypatch):
    """Strided, padded, dilated, grouped, larger or float32 kernels, a device type not in the set and calls autograd
    must follow are ATen's (or the CPU's depthwise way), with ATen's values to the bit."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    cases = [(x, w, {"stride": 2}), (x, w, {"padding": 1}), (x, w, {"dilation": (1, 2)}),
             (x, torch.randn(6, 2, 1, 1, dtype=torch.float64), {"groups": 2}),
             (x, torch.randn(6, 4, 3, 3, dtype=torch.float64), {}), (x.float(), w.float(), {})]
    want = [F.conv2d(xi, wi, **kw) for xi, wi, kw in cases]
    with dw.FastConv64():
        for (xi, wi, kw), v in zip(cases, want):
            assert torch.equal(F.conv2d(xi, wi, **kw), v)
        assert not pointwise
        # calls ATen refuses get ATen's own errors: a wrong padding string, bias or channel count
        for kw, match in [({"padding": "SAME"}, "padding"), ({"bias": torch.zeros(1, dtype=torch.float64)}, "bias"),
                          ({"bias": torch.zeros(6)}, "bias type"), ({"input": x[:, :3]}, "channels")]:
            with pytest.raises(RuntimeError, match=match):
                F.conv2d(**{"input": x, "weight": w, **kw})
        assert not pointwise
        F.conv2d(x, w, padding="same")
        F.conv2d(x, w, None, (1,), "valid")
        assert len(pointwise) == 2
        wg = w.clone().requires_grad_()
        F.conv2d(x, wg).sum().backward()
        assert len(pointwise) == 2 and wg.grad is not None
        monkeypatch.setattr(dw, "POINTWISE_AS_MATMUL", set())
        assert torch.equal(F.conv2d(x, w), F.conv2d(x.clone(), w.clone()))
        assert len(pointwise) == 2


class PointwiseThenView(nn.Module):
    """A 1 x 1 convolution whose output (through a ReLU) is flattened with ``view``, which needs ATen's layout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.c1, self.c2, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 1), nn.Linear(6 * 5 * 5, 3)
        self.eval()

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.head(h.view(h.shape[0], -1))


@pytest.mark.parametrize("model", ["inverted residual", "view after 1 x 1"])
@pytest.mark.parametrize("evaluator", ["frontier", "graph"])
def test_paths_with_pointwise_matmuls_equal_dense_sampling_with_atens_convolutions(monkeypatch, pointwise, evaluator,
                                                                                   model):
    """With 1 x 1 convolutions as matrix products (what a GPU in ``POINTWISE_AS_MATMUL`` runs), the exact counts
    through MobileNet-style blocks, and through a model that views a 1 x 1 convolution's output, still equal dense
    sampling with ATen's convolutions."""
    m = InvertedResidual(seed=3) if model == "inverted residual" else PointwiseThenView()
    g = torch.Generator().manual_seed(2)
    side = 7 if model == "inverted residual" else 5
    a, b = torch.randn(2, 1, side, side, generator=g), torch.randn(2, 1, side, side, generator=g)
    res = path_crossings(m, a, b, evaluator=evaluator, trace=False)
    assert res.exact and pointwise and res.notes[-1].startswith(f"evaluator: {evaluator}")
    monkeypatch.setattr(dw, "POINTWISE_AS_MATMUL", set())
    for i, p in enumerate(res.paths):
        want = dense_count(m, lambda t, i=i: a[i:i + 1].double() + t.reshape(-1, 1, 1, 1) * (b[i] - a[i]).double(),
                           n0=4096, n_max=2 ** 18)
        assert p.per_layer == want and p.crossings > 0


def test_capture_runs_depthwise_convolutions_through_it(taken):
    """Every capture (codes, paths, slices) runs float64 depthwise calls through ``depthwise_conv2d``, and its
    replacement's own operations are not sites."""
    m = InvertedResidual().double()
    x = torch.randn(2, 1, 7, 7, dtype=torch.float64)
    sites = []
    out = run(m, lambda: m(x), lambda s, z: sites.append(s.name))
    assert len(taken) == 2 and len(sites) == 4
    with torch.no_grad():
        assert torch.allclose(out, m(x), rtol=1e-12, atol=1e-12)


@pytest.fixture
def pooled(monkeypatch) -> list:
    """One entry per max-pool call that ``conv_call`` computes as ``WindowMax.maxima``."""
    from polytope_lens.kinks import WindowMax

    calls = []
    real = WindowMax.maxima
    monkeypatch.setattr(WindowMax, "maxima", lambda self, x: calls.append(self.name) or real(self, x))
    return calls


@pytest.mark.parametrize("call", [
    lambda x: F.max_pool2d(x, 2), lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    lambda x: F.max_pool2d(x, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    lambda x: F.max_pool1d(x.flatten(2), 3, 2, 1), lambda x: nn.MaxPool2d(2, 1, 1, ceil_mode=True)(x)])
def test_float64_max_pooling_equals_atens_to_the_bit(pooled, call):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 9, 9, generator=g, dtype=torch.float64)
    x[:, :, 2:5, 2:5] = 0.0  # ties
    want = call(x)
    with dw.FastConv64():
        got = call(x)
    assert torch.equal(got, want) and len(pooled) == 1


def test_other_max_pooling_is_left_to_aten(pooled):
    """float32, unbatched images, indices asked for, autograd: ATen's."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    xg = x.clone().requires_grad_()
    want = F.max_pool2d(x.float(), 2), F.max_pool2d(x[0], 2), F.max_pool2d(x, 2, return_indices=True)
    with dw.FastConv64():
        assert torch.equal(F.max_pool2d(x.float(), 2), want[0])
        assert torch.equal(F.max_pool2d(x[0], 2), want[1])
        assert all(torch.equal(a, b) for a, b in zip(F.max_pool2d(x, 2, return_indices=True), want[2]))
        F.max_pool2d(xg, 2).sum().backward()
    assert not pooled and xg.grad is not None


def test_max_pool_sites_are_computed_by_it_inside_and_outside_the_forward(pooled):
    """A max-pool site's output in a captured forward pass and at new unit inputs (``CallSite.apply``, what the exact
    engines call) comes from ``WindowMax.maxima``, equal to ATen's pooling."""

    class Pool(nn.Module):
        def forward(self, x):
            return F.max_pool2d(F.relu(x), 2, 2).sum((2, 3))

    m = Pool()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    sites = {}
    out = run(m, lambda: m(x), lambda s, z: sites.setdefault(s.name, (s, z)) and None)
    assert torch.equal(out, m(x)) and pooled == ["max_pool2d"]
    site, z = sites["max_pool2d"]
    z2 = z + 0.5
    assert torch.equal(site.apply(z2), F.max_pool2d(z2, 2, 2)) and len(pooled) == 2
    assert torch.equal(z2, z + 0.5)  # not overwritten (the call is not in place, so no copy is made)
