"""The same analyses on the GPU and on the CPU, float64, same weights: do the results agree? (run on a GPU machine)

    python benchmarks/gpu_agreement.py [--device cuda]

Spline codes (pinned asynchronous copies on a GPU), exact paths with the semantic trace (batched trace and class
changes), exact paths through a MobileNet-style CNN on the frontier and graph routes in pieces (with and without
``_conv64.POINTWISE_AS_MATMUL``, and with each clamp site fused with its convolution,
``frontier.FUSE_SITE_CONVOLUTIONS``), sampled paths on a GELU net (Illinois steps). Prints one line per check; exits 1
if one disagrees.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch import nn

from polytope_lens.codes import spline_codes
from polytope_lens.paths import path_crossings


def mlp(act: type[nn.Module], seed: int, din=6, width=48, depth=3, classes=5) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, d = [], din
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes)).double().eval()


def mobile_block(seed: int) -> nn.Module:
    """Stem conv-BN-ReLU6, then an inverted residual block: 1 x 1 expand-BN-ReLU6, 3 x 3 depthwise-BN-ReLU6,
    1 x 1 project-BN plus the skip, and a linear head (the layer kinds of EfficientNet-Lite0)."""
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
            self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
            self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
            self.head = nn.Linear(8 * 10 * 10, 5)
            for bn in self.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.running_mean.uniform_(-0.2, 0.2)
                    bn.running_var.uniform_(0.5, 1.5)

        def forward(self, x):
            h = self.stem(x)
            return self.head((h + self.project(self.dw(self.expand(h)))).flatten(1))

    return Block()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    dev = ap.parse_args().device
    ok = True

    def report(name: str, same: bool, detail: str) -> None:
        nonlocal ok
        ok &= same
        print(f"{'agree' if same else 'DIFFER'}: {name}: {detail}", flush=True)

    g = torch.Generator().manual_seed(0)
    net = mlp(nn.ReLU, 0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    cpu = spline_codes(net, x, batch_size=64)
    gpu = spline_codes(net.to(dev), x.to(dev), batch_size=64)
    net.cpu()
    same = all(np.array_equal(cpu[n].packed, gpu[n].packed) for n in cpu.layers)
    report("spline codes", same, f"{len(x)} rows, {len(cpu.layers)} sites, 5 batches")

    a, b = (3 * torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(2))
    rc = path_crossings(net, a, b)
    rg = path_crossings(net, a, b, device=dev)
    same_counts = rc.counts.tolist() == rg.counts.tolist()
    top = all(np.array_equal(p.trace.top_class, q.trace.top_class) for p, q in zip(rc.paths, rg.paths))
    changes = all(len(p.trace.class_changes) == len(q.trace.class_changes)
                  and np.allclose(p.trace.class_changes, q.trace.class_changes, atol=1e-9)
                  for p, q in zip(rc.paths, rg.paths))
    js = all(np.allclose(p.trace.js, q.trace.js, rtol=1e-7, atol=1e-12) for p, q in zip(rc.paths, rg.paths))
    report("exact paths with trace", same_counts and top and changes and js,
           f"40 paths, {int(rc.counts.sum())} crossings; counts {same_counts}, top class {top}, class changes "
           f"{changes}, JS {js}")

    class Residual(nn.Module):  # h + W2 leaky(W1 h): a leaf read two sites later (appended rows joined)
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.inp, self.w1, self.w2 = nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 32)
            self.out = nn.Linear(32, 5)

        def forward(self, x):
            h = nn.functional.leaky_relu(self.inp(x), 0.1)
            h = h + self.w2(nn.functional.leaky_relu(self.w1(h), 0.1))
            return self.out(nn.functional.leaky_relu(h, 0.1))

    from polytope_lens import _kink_scan
    for label, model, kw in [("residual LeakyReLU net", Residual().double().eval(), {}),
                             ("ReLU6 net (two kinks: path order)", mlp(nn.ReLU6, 3), {}),
                             ("units subset", net, {"layers": "5.relu", "units": list(range(0, 48, 3))})]:
        c = path_crossings(model, a, b, **kw)
        gs = path_crossings(model, a, b, device=dev, **kw)
        _kink_scan.USE_TRITON = False
        gt = path_crossings(model, a, b, device=dev, **kw)
        _kink_scan.USE_TRITON = True
        same = c.counts.tolist() == gs.counts.tolist() == gt.counts.tolist()
        top = all(np.array_equal(p.trace.top_class, q.trace.top_class) for p, q in zip(c.paths, gs.paths))
        report(f"exact paths, {label}", same and top,
               f"40 paths, {int(c.counts.sum())} crossings; counts (CPU, GPU, GPU torch scan) {same}, top class {top}")

    from polytope_lens import _transfer
    xs = [torch.randn(1001, dtype=torch.float64, device=dev), torch.arange(7, dtype=torch.int16, device=dev),
          torch.arange(-3, 10, dtype=torch.int8, device=dev).reshape(13, 1),
          torch.ones(5, 3, dtype=torch.bool, device=dev), torch.arange(9, dtype=torch.int32, device=dev),
          torch.zeros(0, dtype=torch.int64, device=dev)]
    want = [x.cpu().numpy() for x in xs]
    runs = []
    for background in (True, False):
        _transfer.BACKGROUND = background
        got = _transfer.arrays_to_host(xs) + _transfer.arrays_to_host(xs[:2])  # the slots reused
        same = all(np.array_equal(w, h) and w.dtype == h.dtype and w.shape == h.shape
                   for w, h in zip(want + want[:2], got))
        runs.append(path_crossings(net, a, b, device=dev))
        report(f"results to the host (background {background})", same, f"arrays of 6 dtypes as .cpu(): {same}")
    _transfer.BACKGROUND = True
    keys = ("t", "site", "unit", "piece")
    recs = all(all(np.array_equal(p.records[k], q.records[k]) for k in keys) and np.array_equal(p.t, q.t)
               for p, q in zip(*runs))
    dtypes = all(p.records[k].dtype == q.records[k].dtype for p, q in zip(rc.paths, runs[0].paths) for k in keys)
    report("records with and without the background copy", recs and dtypes,
           f"40 paths' records and breakpoints equal: {recs}; dtypes as on the CPU: {dtypes}")

    from polytope_lens import _conv64
    cnn = mobile_block(4).double().eval()
    xa, xb = (3 * torch.randn(4, 1, 10, 10, generator=g, dtype=torch.float64) for _ in range(2))
    want = path_crossings(cnn, xa, xb, evaluator="frontier")
    real_pointwise, taken = _conv64.pointwise_conv2d, []
    _conv64.pointwise_conv2d = lambda *args: taken.append(1) or real_pointwise(*args)
    for label, pointwise in [("as they come", set()), ("1 x 1 as matrix products", {"cuda"})]:
        _conv64.POINTWISE_AS_MATMUL = pointwise
        for evaluator in ("frontier", "graph"):  # pieces of a few points each, sized from measured memory on a GPU
            taken.clear()
            got = path_crossings(cnn, xa, xb, evaluator=evaluator, device=dev, memory_budget=4 << 20)
            same = want.counts.tolist() == got.counts.tolist()
            pos = all(np.allclose(p.records["t"], q.records["t"], rtol=0, atol=1e-9)
                      for p, q in zip(want.paths, got.paths))
            rule = bool(taken) == (torch.device(dev).type in pointwise)  # the rule ran exactly where it should
            report(f"exact paths, MobileNet-style CNN, {evaluator} route, convolutions {label}", same and pos and rule,
                   f"4 paths, {int(want.counts.sum())} crossings, 4 MiB budget; counts {same}, positions within "
                   f"1e-9 {pos}; 1 x 1 products taken {len(taken)} times ({'as' if rule else 'NOT as'} expected)")
    _conv64.POINTWISE_AS_MATMUL, _conv64.pointwise_conv2d = set(), real_pointwise
    # each clamp site with the convolution after it in one Triton kernel (stop 26's opt-in), and with the other 1 x 1
    # convolutions in the Triton way too: the same records as the CPU's
    from polytope_lens.paths import frontier
    real_fused, fused = _conv64.clamp_conv2d, []
    _conv64.clamp_conv2d = lambda *args: fused.append(real_fused(*args)) or fused[-1]  # whether each launch ran
    from polytope_lens import _kink_scan
    frontier.FUSE_SITE_CONVOLUTIONS = {torch.device(dev).type}
    for label, way in [("site and convolution fused", "matmul"), ("fused, other 1 x 1 in Triton", "triton")]:
        _conv64.POINTWISE_AS_MATMUL, _conv64.POINTWISE_WAY = ({torch.device(dev).type}, way) if way == "triton" \
            else (set(), "matmul")
        for budget in (4 << 20, 1 << 30):
            fused.clear()
            got = path_crossings(cnn, xa, xb, evaluator="frontier", device=dev, memory_budget=budget)
            same = want.counts.tolist() == got.counts.tolist()
            pos = all(np.allclose(p.records["t"], q.records["t"], rtol=0, atol=1e-9)
                      for p, q in zip(want.paths, got.paths))
            ran = bool(fused) and all(fused) and not _kink_scan._failed  # no kernel fell back to torch's steps
            report(f"exact paths, MobileNet-style CNN, frontier, {label}, {budget >> 20} MiB", same and pos and ran,
                   f"4 paths, {int(want.counts.sum())} crossings; counts {same}, positions within 1e-9 {pos}; fused "
                   f"kernels ran {sum(fused)} of {len(fused)} times; Triton failures: {_kink_scan._failed or 'none'}")
    frontier.FUSE_SITE_CONVOLUTIONS, _conv64.clamp_conv2d = set(), real_fused
    _conv64.POINTWISE_AS_MATMUL, _conv64.POINTWISE_WAY = set(), "matmul"

    smooth = mlp(nn.GELU, 1)
    sc = path_crossings(smooth, a[:8], b[:8], n_samples=128, tol=1e-10)
    sg = path_crossings(smooth, a[:8], b[:8], n_samples=128, tol=1e-10, device=dev)
    pos = all(np.allclose(p.records["t"], q.records["t"], atol=1e-9) for p, q in zip(sc.paths, sg.paths))
    report("sampled paths (GELU)", sc.counts.tolist() == sg.counts.tolist() and pos,
           f"8 paths, {int(sc.counts.sum())} crossings; positions within 1e-9: {pos}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
