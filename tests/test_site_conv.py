"""A clamp site and the convolution after it as one Triton kernel (``_conv64.clamp_conv2d``, the frontier's
``FUSE_SITE_CONVOLUTIONS``): against torch's separate steps (clamp, zero padding, convolution, residual add) at
several shapes, and whole exact paths through a MobileNet-style CNN with it against the graph route's forward
passes, in Triton's interpreter (a subprocess: the interpreter is chosen when the kernels are defined)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_same_records
from polytope_lens.paths import frontier, path_crossings


class Mobile(nn.Module):
    """Every pattern the kernel takes, and two it must leave: ReLU6 -> depthwise (padding inside the convolution);
    a ReLU6 read twice (by a depthwise layer and a residual add: not fused); ReLU6 -> 1 x 1 + residual; a clamp with
    a lower bound above 0 -> asymmetric zero padding -> strided depthwise (the padding is of the clamp's output);
    Hardtanh(-1, 1) -> 1 x 1 without residual; ReLU -> mean (no convolution: not fused)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.stem, self.bn = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.dw0 = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.dw, self.pw = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 1)
        self.pad, self.dw2 = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(6, 6, 3, stride=2, groups=6)
        self.pw2, self.act, self.fc = nn.Conv2d(6, 8, 1), nn.Hardtanh(-1.0, 1.0), nn.Linear(8, 4)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.dw0(F.relu6(3 * self.bn(self.stem(x))))
        h = F.relu6(2 * h)
        h = h + self.pw(F.relu6(3 * self.dw(h)))
        h = self.dw2(self.pad(torch.clamp(h, 0.5, 2.0)))
        h = self.pw2(self.act(h))
        return self.fc(F.relu(h).mean((2, 3)))


class InvertedResidual(nn.Module):
    """A MobileNetV2 block (1 x 1 expansion, ReLU6, depthwise, ReLU6, 1 x 1 projection plus the block's input): on a
    short path the last ReLU6 may not cross at all, while the block's input still waits for the new points of the
    ReLU6 before (found by a reviewer: the fused projection read those rows out of bounds)."""

    def __init__(self, c: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.expand, self.dw = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.project, self.fc = nn.Conv2d(2 * c, c, 1), nn.Linear(c, 3)

    def forward(self, x):
        h = F.relu6(3 * self.stem(x))
        y = h + self.project(F.relu6(self.dw(F.relu6(self.expand(h)))))
        return self.fc(F.relu(y).mean((2, 3)))


def short_path():
    """Ends of a path on which ``InvertedResidual``'s last ReLU6 does not cross."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)
    return a, a + 0.02 * torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)


_INTERPRETED = textwrap.dedent('''
    import pickle, sys
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, sys.argv[2])
    from test_site_conv import InvertedResidual, Mobile, short_path
    from polytope_lens import _conv64
    from polytope_lens.paths import frontier, path_crossings

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # the kernels against torch's steps: depthwise (kernel, stride, padding left/right/top/bottom, clamp bounds)
    worst = 0.0
    for n, c, h, w, k, s, pads, lim, bias in [(2, 5, 7, 6, 3, 1, (1, 1, 1, 1), (0.0, 6.0), True),
                                              (1, 4, 9, 9, 3, 2, (0, 1, 0, 1), (0.5, 2.0), False),
                                              (3, 3, 5, 8, 5, 2, (2, 2, 1, 3), (0.0, None), True),
                                              (2, 6, 4, 4, 3, 1, (0, 0, 0, 0), (-1.0, 1.0), True)]:
        z, wt, b = 3 * rand(n, c, h, w), rand(c, 1, k, k), rand(c) if bias else None
        want = F.conv2d(F.pad(torch.clamp(z, *lim), pads), wt, b, s, 0, 1, c)
        out = torch.full_like(want, float("nan"))
        assert _conv64.site_conv_ready(z, wt, b, s, pads)
        assert _conv64.clamp_conv2d(z, lim, wt, b, s, pads, None, out)
        worst = max(worst, float(((out - want).abs() / want.abs().clamp_min(1)).max()))
    # 1 x 1 (with and without bias, residual, upper bound)
    for n, ci, co, h, w, lim, res, bias in [(2, 16, 24, 5, 7, (0.0, 6.0), True, True),
                                            (1, 3, 40, 9, 9, (0.5, 2.0), False, False),
                                            (3, 33, 17, 4, 4, (0.0, None), True, False)]:
        z, wt, b = 3 * rand(n, ci, h, w), rand(co, ci, 1, 1), rand(co) if bias else None
        r = rand(n, co, h, w) if res else None
        want = F.conv2d(torch.clamp(z, *lim), wt, b) + (r if res else 0)
        out = torch.full_like(want, float("nan"))
        assert _conv64.clamp_conv2d(z, lim, wt, b, 1, (0, 0, 0, 0), r, out)
        worst = max(worst, float(((out - want).abs() / want.abs().clamp_min(1)).max()))
    assert not _conv64.site_conv_ready(rand(1, 4, 5, 5), rand(5, 4, 3, 3), None, 1, (0, 0, 0, 0))
    assert not _conv64.site_conv_ready(rand(1, 4, 5, 5).float(), rand(4, 1, 3, 3).float(), None, 1,
                                       (1, 1, 1, 1))  # float64 only
    assert _conv64.site_conv_ready(rand(0, 4, 5, 5), rand(4, 1, 3, 3), None, 1, (1, 1, 1, 1))

    # whole paths through the frontier with the kernel: new points appended, one piece; merged, in pieces;
    # appended, in pieces
    ran = []
    real = _conv64.clamp_conv2d
    _conv64.clamp_conv2d = lambda *a: (ran.append((tuple(a[2].shape), a[5], a[6] is not None)), real(*a))[1]
    model = Mobile().double().eval()
    a, b = rand(2, 2, 6, 6), rand(2, 2, 6, 6)
    frontier.FUSE_SITE_CONVOLUTIONS = {"cpu"}
    runs = [path_crossings(model, a, b, evaluator="frontier")]
    kinds = sorted(set(ran))
    frontier.APPEND_NEW_POINTS = False  # the first path only, in pieces
    runs.append(path_crossings(model, a[:1], b[:1], evaluator="frontier", memory_budget=1 << 20))
    frontier.APPEND_NEW_POINTS = True  # appended, in pieces that share their end points' values
    runs.append(path_crossings(model, a[:1], b[:1], evaluator="frontier", memory_budget=1 << 20))
    # the block's input waits for new rows while the site before the projection has none: rows paired as they are
    n_mobile = len(ran)
    ran.clear()
    runs.append(path_crossings(InvertedResidual().double().eval(), *short_path(), evaluator="frontier"))
    assert any(residual for _, _, residual in ran)
    with open(sys.argv[1], "wb") as f:
        pickle.dump((worst, kinds, n_mobile, runs, a, b), f)
    print("ok")
''')


def test_site_convolutions_equal_torch_steps_in_the_interpreter(tmp_path):
    script = tmp_path / "interpreted.py"
    script.write_text(_INTERPRETED)
    out = tmp_path / "runs.pkl"
    res = subprocess.run([sys.executable, str(script), str(out), os.path.dirname(__file__)],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    worst, kinds, n_ran, runs, a, b = pickle.loads(out.read_bytes())
    assert worst < 1e-13
    # the four site convolutions the model has (depthwise, 1 x 1 + residual, strided depthwise after asymmetric
    # padding, 1 x 1 after Hardtanh); the site read twice and the ReLU before the mean are left to torch
    assert kinds == [((6, 1, 3, 3), (0, 1, 0, 1), False), ((6, 1, 3, 3), (1, 1, 1, 1), False),
                     ((6, 6, 1, 1), (0, 0, 0, 0), True), ((8, 6, 1, 1), (0, 0, 0, 0), False)], kinds
    assert n_ran > 20
    # the oracle: the graph route (a forward pass of the model as it is per breakpoint), same ends
    model = Mobile().double().eval()
    want = path_crossings(model, a, b, evaluator="graph")
    assert want.counts.sum() > 100
    assert_same_records(runs[0], want, t_atol=1e-10)
    first = path_crossings(model, a[:1], b[:1], evaluator="graph")
    for got in runs[1:-1]:
        assert len(got.paths[0].records["t"]) > 50
        assert_same_records(got, first, t_atol=1e-10)
    block = path_crossings(InvertedResidual().double().eval(), *short_path(), evaluator="graph")
    assert block.paths[0].per_layer["relu6#1"] > 0 and block.paths[0].per_layer["relu6#2"] == 0
    assert_same_records(runs[-1], block, t_atol=1e-10)


def test_site_convolutions_are_left_to_torch_where_triton_cannot_run(monkeypatch):
    """Without the interpreter a CPU tensor is not Triton's: the opt-in changes nothing (same records, no launch)."""
    from polytope_lens import _conv64

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_conv64, "clamp_conv2d", lambda *a: (_ for _ in ()).throw(AssertionError("launched")))
    model = Mobile().double().eval()
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(2, 2, 7, 7, generator=g, dtype=torch.float64) for _ in range(2))
    want = path_crossings(model, a, b, evaluator="frontier")
    monkeypatch.setattr(frontier, "FUSE_SITE_CONVOLUTIONS", {"cpu"})
    assert_same_records(path_crossings(model, a, b, evaluator="frontier"), want)
