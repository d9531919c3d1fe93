"""The one-pass kink scan of exact paths on a GPU (``polytope_lens._kink_scan``): torch operations against a
brute-force loop, and the Triton kernels against the torch operations in Triton's interpreter (a subprocess: the
interpreter is chosen when the kernels are defined), one and several kinks, down to whole exact paths (MLPs, a CNN
against the CPU's closed-form bends; a ReLU6 CNN on the frontier route against its torch-operation scans, and with
its 1 x 1 convolutions in ``_conv64``'s Triton kernel)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from helpers import assert_same_records
from polytope_lens import _kink_scan


def _case(rows, units, n_paths, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, units, generator=g, dtype=torch.float64)
    z[0, :2] = 0.0  # units exactly on the kink
    order = torch.randperm(rows, generator=g)
    pid = torch.sort(torch.randint(0, n_paths, (rows,), generator=g)).values
    offset = 0.3 * torch.randn(1, units, generator=g, dtype=torch.float64)
    return z, order, pid, offset


def test_torch_scan_equals_a_loop():
    z, order, pid, offset = _case(23, 9, 3, 0)
    for off in (None, offset):
        changes, out = _kink_scan.torch_scan(z, order, pid, 0.0, off, torch.relu)
        zb = z if off is None else z + off
        assert changes.shape == (22, 9) and changes.dtype == torch.int8
        for i in range(22):
            for u in range(9):
                a, b = float(zb[order[i], u]), float(zb[order[i + 1], u])
                want = pid[i] == pid[i + 1] and ((a > 0.0) != (b > 0.0))
                assert bool(changes[i, u]) == bool(want)
        assert torch.equal(out, torch.relu(zb))


def test_torch_scan_of_two_kinks_equals_a_loop():
    """ReLU6's two kinks: a change wherever the pieces (kinks below the input) differ, a jump over both included."""
    z, order, pid, offset = _case(31, 8, 2, 1)
    z = 5 * z
    z[3, :2], z[4, 2] = 6.0, 0.0  # units exactly on a kink
    changes, _ = _kink_scan.torch_scan(z, order, pid, (0.0, 6.0), offset)
    zb = z + offset

    def piece(v):
        return int(v > 0.0) + int(v > 6.0)
    jumps = 0
    for i in range(30):
        for u in range(8):
            a, b = piece(float(zb[order[i], u])), piece(float(zb[order[i + 1], u]))
            assert bool(changes[i, u]) == bool(pid[i] == pid[i + 1] and a != b)
            jumps += pid[i] == pid[i + 1] and abs(a - b) == 2
    assert jumps > 0
    with pytest.raises(ValueError, match="one-kink"):
        _kink_scan.scan(z, order, pid, (0.0, 6.0), lines=torch.zeros(4, 8, dtype=torch.float64), apply=torch.relu)


def test_a_failing_kernel_warns_once_and_falls_back(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no float64 here")
            return launch
    monkeypatch.setattr(_kink_scan, "_failed", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _kink_scan._launch(Broken(), (1,)) is False
    assert len(caught) == 1 and "no float64 here" in str(caught[0].message)
    assert not _kink_scan.triton_ready(torch.zeros(1))  # the torch operations from now on


def test_running_out_of_device_memory_in_a_launch_is_not_a_kernel_failure(monkeypatch):
    """The device's limit reaches the caller (a piece of a path is retried smaller); the kernels stay in use."""
    class Full:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return launch
    monkeypatch.setattr(_kink_scan, "_failed", [])
    with pytest.raises(torch.OutOfMemoryError):
        _kink_scan._launch(Full(), (1,))
    assert _kink_scan._failed == []


_INTERPRETED = textwrap.dedent('''
    import pickle, sys
    import torch
    import triton  # the tests' install has Triton (pyproject: dev)
    from torch import nn
    import torch.nn.functional as F
    from polytope_lens import _kink_scan as ks
    from polytope_lens.paths import path_crossings
    import polytope_lens.paths.exact as exact
    assert ks.triton_ready(torch.zeros(1))
    g = torch.Generator().manual_seed(0)
    leaky = torch.tensor([[0.1], [1.0], [0.0], [0.0]], dtype=torch.float64)
    for rows, units, paths in [(37, 300, 4), (5, 7, 1), (1, 3, 1), (130, 129, 9), (2, 16, 2)]:
        z = torch.randn(rows, units, generator=g, dtype=torch.float64)
        z[0, :3] = 0.0
        order = torch.randperm(rows, generator=g)
        pid = torch.sort(torch.randint(0, paths, (rows,), generator=g)).values
        for off in (None, 0.5 * torch.randn(1, units, generator=g, dtype=torch.float64)):
            for slope in (0.0, 0.1):
                lines = leaky.expand(4, units).clone()
                lines[0] = slope
                act = (lambda x, s=slope: F.leaky_relu(x, s))
                c1, o1 = ks.triton_scan(z, order, pid, 0.0, off, lines)
                c2, o2 = ks.torch_scan(z, order, pid, 0.0, off, act)
                assert torch.equal(c1, c2) and torch.equal(o1, o2), (rows, units, off is None, slope)
                if rows > 1:
                    n = 2 * rows
                    left = torch.randint(0, rows, (n,), generator=g)
                    right = torch.randint(0, rows, (n,), generator=g)
                    u = torch.rand(n, generator=g, dtype=torch.float64)
                    got = ks.interpolated_outputs(z, left, right, u, 0.0, lines, off)
                    zb = z if off is None else z + off
                    want = act(zb[left].lerp(zb[right], u[:, None]))
                    assert torch.allclose(got, want, rtol=1e-15, atol=1e-15), float((got - want).abs().max())
    assert ks.triton_scan(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, dtype=torch.long), 0.0)[0].shape == (0, 4)
    # several kinks (ReLU6, Hardtanh, a three-kink case): pieces compared, jumps over two kinks and ties included
    from polytope_lens.kinks import REGISTRY, ScalarKinks
    for kinks in [(0.0, 6.0), (-1.0, 1.0), (-2.0, 0.0, 3.0)]:
        for rows, units, paths in [(41, 133, 3), (2, 5, 1), (17, 1, 2)]:
            z = 4 * torch.randn(rows, units, generator=g, dtype=torch.float64)
            z[0, :1] = kinks[-1]
            z[-1, -1:] = kinks[0]
            order = torch.randperm(rows, generator=g)
            pid = torch.sort(torch.randint(0, paths, (rows,), generator=g)).values
            for off in (None, torch.randn(1, units, generator=g, dtype=torch.float64)):
                c1, _ = ks.triton_scan(z, order, pid, kinks, off)
                c2, _ = ks.torch_scan(z, order, pid, kinks, off)
                assert torch.equal(c1, c2), (kinks, rows, units)
    for act in (REGISTRY["relu6"], REGISTRY["hardtanh"], REGISTRY["relu"], ScalarKinks("three", (-2.0, 0.0, 3.0))):
        for z in (4 * torch.randn(29, 3, 11, generator=g, dtype=torch.float64),
                  torch.randint(-3, 9, (15, 20), generator=g).double()):  # many exact ties
            kernel = act.crossings_along(z)
            ks.USE_TRITON = False
            plain = act.crossings_along(z)
            ks.USE_TRITON = True
            for field in ("segment", "unit", "t", "piece"):
                assert torch.equal(getattr(kernel, field), getattr(plain, field)), (act.name, field)

    class Net(nn.Module):  # LeakyReLU, a residual branch read two sites later, an output layer
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.inp, self.w1, self.w2, self.out = (nn.Linear(6, 24), nn.Linear(24, 24), nn.Linear(24, 24),
                                                    nn.Linear(24, 5))
        def forward(self, x):
            h = F.leaky_relu(self.inp(x), 0.1)
            h = h + self.w2(F.leaky_relu(self.w1(h), 0.1))
            return self.out(F.relu(h))

    class CNN(nn.Module):  # BatchNorm, per-channel PReLU (per-unit lines), a residual add, average pooling
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.c1, self.bn, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
            self.slopes, self.fc = nn.Parameter(torch.tensor([0.2, 0.1, 0.3, 0.05])), nn.Linear(36, 5)
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            h = F.relu(self.bn(self.c1(x)))
            h = F.avg_pool2d(h + F.prelu(self.c2(h), self.slopes), 2)
            return self.fc(F.leaky_relu(h, 0.05).flatten(1))

    class Mobile(nn.Module):  # ReLU6 sites (two kinks), batch norm, depthwise, a residual add: the frontier route
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.stem, self.bn = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.dw, self.pw, self.fc = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 1), nn.Linear(6, 4)
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            h = F.relu6(3 * self.bn(self.stem(x)))
            h = h + self.pw(F.relu6(3 * self.dw(h)))
            return self.fc(F.relu6(h).mean((2, 3)))

    mob = Mobile().double().eval()
    ma, mb = (torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    with_kernels = path_crossings(mob, ma, mb, evaluator="frontier")
    ks.USE_TRITON = False
    without = path_crossings(mob, ma, mb, evaluator="frontier")
    ks.USE_TRITON = True
    # 1 x 1 convolutions as one Triton kernel (``_conv64.POINTWISE_WAY``): values, then the same frontier path
    from polytope_lens import _conv64
    for n, ci, co, h, w, bias in [(2, 16, 24, 5, 7, True), (1, 3, 40, 9, 9, False), (3, 33, 17, 4, 4, True)]:
        x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
        wt = torch.randn(co, ci, 1, 1, generator=g, dtype=torch.float64)
        b = torch.randn(co, generator=g, dtype=torch.float64) if bias else None
        got = _conv64._triton_pointwise(x, wt, b)
        want = F.conv2d(x, wt, b)
        assert got is not None and got.is_contiguous() and torch.allclose(got, want, rtol=1e-13, atol=1e-13)
    launches = []
    real_pointwise = _conv64._triton_pointwise
    _conv64._triton_pointwise = lambda *a: (launches.append(1), real_pointwise(*a))[1]
    _conv64.POINTWISE_AS_MATMUL, _conv64.POINTWISE_WAY = {"cpu"}, "triton"
    pointwise = path_crossings(mob, ma, mb, evaluator="frontier")
    _conv64.POINTWISE_AS_MATMUL, _conv64.POINTWISE_WAY = set(), "matmul"
    assert len(launches) > 10, len(launches)
    mobile = (with_kernels, without, pointwise)

    net = Net().double().eval()
    a, b = (3 * torch.randn(10, 6, generator=g, dtype=torch.float64) for _ in range(2))
    ca, cb = (torch.randn(6, 1, 6, 6, generator=g, dtype=torch.float64) for _ in range(2))
    calls = {"scan": 0, "lerp": 0}
    scan, lerp = ks.triton_scan, exact.interpolated_outputs
    ks.triton_scan = lambda *x, **k: (calls.__setitem__("scan", calls["scan"] + 1), scan(*x, **k))[1]
    exact.interpolated_outputs = lambda *x, **k: (calls.__setitem__("lerp", calls["lerp"] + 1), lerp(*x, **k))[1]
    runs = []
    for model, x0, x1, kw in [(net, a, b, {}), (net, a, b, {"layers": "relu", "units": [0, 3, 5, 17]}),
                              (CNN().double().eval(), ca, cb, {})]:
        bends = path_crossings(model, x0, x1, evaluator="affine", **kw)
        exact.PRODUCTS_AT_EVERY_POINT = {"cpu"}
        runs.append((path_crossings(model, x0, x1, evaluator="affine", **kw), bends))
        exact.PRODUCTS_AT_EVERY_POINT = {"cuda"}
    assert calls["scan"] >= 9 and calls["lerp"] >= 6, calls
    with open(sys.argv[1], "wb") as f:
        pickle.dump((runs, mobile), f)
    print("ok", calls)
''')


def test_triton_kernels_equal_torch_operations_in_the_interpreter(tmp_path):
    script = tmp_path / "interpreted.py"
    script.write_text(_INTERPRETED)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    runs = tmp_path / "runs.pkl"
    res = subprocess.run([sys.executable, str(script), str(runs)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok"), res.stdout
    # whole exact paths, appended with the kernels in the interpreter, against the CPU's closed-form bends
    appended_runs, (with_kernels, without, pointwise) = pickle.loads(runs.read_bytes())
    for appended, bends in appended_runs:
        assert bends.counts.sum() > 10
        assert_same_records(appended, bends)
    # the frontier route through ReLU6 sites, its scans in the kernel and in torch operations
    assert without.counts.sum() > 50
    assert_same_records(with_kernels, without)
    assert_same_records(pointwise, without)  # its 1 x 1 convolutions in the Triton kernel
