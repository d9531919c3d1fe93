"""Exact paths through EfficientNet-Lite0 on the CPU between two real photos (the issue's 60 s goal).

    python benchmarks/bench_paths_efficientnet.py [--device cuda] [--full]

Full-network exact paths cost about one float64 evaluation of every later site per breakpoint (tens of thousands of
breakpoints x millions of units), which is out of reach on 2 CPU cores. The goal is stated for a path restricted to
one layer's codes: the crossings of the first ReLU6 site (32 x 112 x 112 units, two kinks each) along the straight
path chelsea -> coffee in input space; later sites are not needed for them and are skipped. Also timed: the exact
scaling ray alpha * a, alpha in [0, 3], of the last block's ReLU6 site for chelsea (every later site processed).
With --full (a GPU): the full-network path over the first 1/2000 and 1/100 of the segment, then all of it, each run
only if its time extrapolated from the previous fraction fits --full-seconds (other fractions: --fractions).
--flops FRACTION prints a compute floor and two memory floors for the
full-network path instead (a forward pass after a crossing's site per crossing; memory: the later unit inputs alone,
and every operator's reads and writes run one by one, with what folding or fusing some away leaves), from its first
FRACTION. --executed FRACTION counts the multiply-adds the graph route actually runs for that first FRACTION (default
1 GiB budget), by cause: passes at new breakpoints, the pieces' ends, the final check, the reductions' checks.
--pieces FRACTION counts each piece's operator calls and peak of live tensors (host time and memory on a GPU) and
projects the whole path's calls. --delta-support FRACTION measures how far each breakpoint's slope change
reaches into the later sites (the most an evaluator that propagated only those changes could save, in multiply-adds
and in the later sites' unit inputs it would write).
--aten-convolutions runs float64 convolutions through ATen's fallback as it comes (one call per channel of a
depthwise layer, a whole batch unfolded at once) instead of the ways of ``polytope_lens._conv64`` (the before/after
of stop 17). --pointwise-matmul runs the 1 x 1 convolutions as matrix products on the device
(``_conv64.POINTWISE_AS_MATMUL``), and --full-only skips the one-site cases before the full-network fractions.
--no-fold keeps batch norm and padding in the frontier evaluator's graph (``frontier.FOLD_INTO_CONVOLUTIONS``;
they are folded into the convolutions by default since stop 24). --scan torch finds the units that change piece
with torch operations instead of one Triton kernel per site on a GPU (stop 25). --no-append merges the frontier's new
points into path order at every site instead of appending them (stop 25). --pointwise-triton runs the 1 x 1
convolutions in one Triton kernel (``_conv64.POINTWISE_WAY``, an opt-in until measured here on a GPU). --fuse runs
each clamp site with the depthwise or 1 x 1 convolution that reads it (and a residual add) as one Triton kernel
(``frontier.FUSE_SITE_CONVOLUTIONS``, stop 26; an opt-in until measured here on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from polytope_lens.data import load_data
from polytope_lens.models import load_model
from polytope_lens.paths import path_crossings, ray_crossings
from polytope_lens.paths.exact import Refiner


def profile_full(bundle, x, dev, frac=5e-4, evaluator="auto", memory_gib=32):
    """Where the full-network path's time goes: the top operators by CPU and by device time, and on a device how
    much of the wall time its kernels kept it busy (the rest is host time: launches, Python, waits)."""
    from torch.profiler import ProfilerActivity, profile

    end = x[:1] + frac * (x[1:] - x[:1])
    path_crossings(bundle.module, x[:1], end, trace=False, device=dev, layers="_swish.relu6")  # warm-up
    on_device = not dev.startswith("cpu")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        r = path_crossings(bundle.module, x[:1], end, trace=False, device=dev, memory_budget=memory_gib << 30,
                           evaluator=evaluator)
        wall = time.perf_counter() - t0
    print(f"full-network path, first {frac:g} of chelsea -> coffee on {dev} ({r.notes[-1]}; {memory_gib} GiB): "
          f"{r.paths[0].crossings} crossings, {wall:.1f} s under the profiler", flush=True)
    events = prof.key_averages()
    if on_device:
        from torch.autograd import DeviceType

        busy = sum(e.self_device_time_total for e in events  # kernels, as the table's own total counts them
                   if e.device_type != DeviceType.CPU and not e.is_user_annotation) / 1e6
        print(f"device kernels: {busy:.2f} s ({busy / wall:.0%} of the wall time); aten operators called: "
              f"{sum(e.count for e in events if e.key.startswith('aten::'))}", flush=True)
    keys = ["self_cpu_time_total"] + (["self_device_time_total"] if on_device else [])
    for key in keys:
        print(events.table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)


def layer_calls(model, x, site_inputs: list | None = None) -> list:
    """One forward pass of ``x``, in call order: ("macs", n) per Conv2d and Linear call (multiply-adds per image),
    ("site", units) per ReLU6 / Hardtanh call (units per image); with ``site_inputs``, each site's input is appended
    to that list."""
    import torch

    calls = []

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            calls.append(("macs", out[0].numel() * mod.weight[0].numel()))
        elif isinstance(mod, torch.nn.Linear):
            calls.append(("macs", out[0].numel() * mod.in_features))
        elif isinstance(mod, (torch.nn.ReLU6, torch.nn.Hardtanh)):
            calls.append(("site", out[0].numel()))
            if site_inputs is not None:
                site_inputs.append(inp[0])
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def flops_floor(bundle, x, dev, frac: float, peak_tflops: float, bandwidth_tbs: float) -> None:
    """Floors for the full-network path on the graph route: each breakpoint costs about one forward pass of the
    network after the site that made it. Counts the crossings per site over the first ``frac`` of the segment,
    the multiply-adds of one pass after each site (Conv2d and Linear layers, in call order, one image), their sum,
    extrapolated to the whole segment, and the time that takes at ``peak_tflops`` (float64). A second floor, for
    memory: every later site's unit inputs at the new point are written once (8 bytes each) and read once by that
    site's scan, at ``bandwidth_tbs`` (TB/s) and nothing else moved. A third: the bytes the passes' operators read
    and write, run one by one as the evaluators run them (``op_traffic``), and what folding or fusing some of them
    away would leave."""
    model = bundle.module.double().eval()
    calls = layer_calls(model, x[:1])
    after = [sum(n for kind, n in calls[i + 1:] if kind == "macs") for i, (kind, _) in enumerate(calls)
             if kind == "site"]
    units_after = [sum(n for kind, n in calls[i + 1:] if kind == "site") for i, (kind, _) in enumerate(calls)
                   if kind == "site"]
    t0 = time.perf_counter()
    r = path_crossings(model, x[:1], x[:1] + frac * (x[1:] - x[:1]), trace=False, verify=False, device=dev)
    seconds = time.perf_counter() - t0
    per = list(r.paths[0].per_layer.values())
    if len(per) != len(after):
        print(f"{len(per)} sites in the result, {len(after)} activation calls seen: no floor")
        return
    macs = sum(c * a for c, a in zip(per, after))
    total_flops = 2 * macs / frac
    print(f"one forward pass: {sum(n for k, n in calls if k == 'macs') / 1e6:.0f} M multiply-adds; first {frac:g} of "
          f"chelsea -> coffee: {sum(per)} crossings in {seconds:.1f} s on {dev}; passes after each crossing's site: "
          f"{macs / 1e9:.1f} G multiply-adds, so about {sum(per) / frac / 1e6:.2f} M crossings and "
          f"{total_flops / 1e15:.2f} PFLOP for the whole segment: {total_flops / (peak_tflops * 1e12):.0f} s at "
          f"{peak_tflops:g} TFLOP/s")
    moved = 16 * sum(c * u for c, u in zip(per, units_after)) / frac
    print(f"{len(per)} sites, {sum(n for k, n in calls if k == 'site') / 1e6:.2f} M units; later sites' unit inputs "
          f"written and read once per crossing (16 bytes per unit): {moved / 1e15:.2f} PB for the whole segment, "
          f"{moved / (bandwidth_tbs * 1e12):.0f} s at {bandwidth_tbs:g} TB/s")
    ops = op_traffic(model, x[:1])
    site_at = [i for i, (name, _) in enumerate(ops) if name.startswith("hardtanh")]
    if len(site_at) != len(per):
        print(f"{len(site_at)} activation operators seen, {len(per)} sites: no traffic floor")
        return
    kinds = sorted({name for name, _ in ops})
    after = {k: [sum(b for name, b in ops[i + 1:] if name == k) for i in site_at] for k in kinds}
    by_kind = {k: sum(c * a for c, a in zip(per, after[k])) / frac for k in kinds}
    print(f"one forward pass op by op moves {sum(b for _, b in ops) / 1e6:.0f} MB per image (each operator reading its "
          f"inputs and writing its outputs once, weights left out); the passes after each crossing's site move, for "
          f"the whole segment:")
    print("| operators left out (fused or folded away) | PB moved | seconds at "
          f"{bandwidth_tbs:g} TB/s |")
    print("|---|---:|---:|")
    pointwise = [k for k in kinds if not k.startswith(("convolution", "addmm", "mm", "mean"))]
    for label, drop in [("none (op by op, as the evaluators run it)", []),
                        ("batch norm (folded into the convolutions)", ["native_batch_norm"]),
                        ("batch norm and padding (folded into the convolutions)", ["native_batch_norm",
                                                                                   "constant_pad_nd"]),
                        ("every pointwise operator (fused into the convolutions)", pointwise)]:
        total = sum(v for k, v in by_kind.items() if k not in drop)
        print(f"| {label} | {total / 1e15:.2f} | {total / (bandwidth_tbs * 1e12):.0f} |")
    fused = sum(v for k, v in by_kind.items() if k not in pointwise)
    frontier_bookkeeping(model, x, frac, per, units_after, fused, bandwidth_tbs)


def frontier_bookkeeping(model, x, frac, per, units_after, fused, bandwidth_tbs) -> None:
    """The frontier evaluator's own traffic beside its passes, whole segment: each site's scan reads every point's
    unit inputs there once (8 bytes each, what one kernel per site reads), and each site's insert copies every value
    carried across its cut at every point (read and written: 16 bytes; a new point's are interpolated from two rows,
    24 bytes). A breakpoint made at site j is scanned at the sites after j and copied at the cuts j, j + 1, ... up to
    the last site's (which inserts nothing). ``fused``: the passes' bytes with every pointwise operator fused away."""
    from polytope_lens.paths import frontier as fr

    progs = []
    build = fr.FrontierProgram.build

    def keep(runner):
        prog, why = build(runner)
        progs.append(prog)
        return prog, why
    fr.FrontierProgram.build = keep
    try:
        path_crossings(model, x[:1], x[:1] + 1e-7 * (x[1:] - x[:1]), trace=False, verify=False, evaluator="frontier")
    finally:
        fr.FrontierProgram.build = build
    live = progs[-1].live_per_site if progs and progs[-1] is not None else []
    if len(live) != len(per):
        print(f"the frontier's program has {len(live)} cuts, the result {len(per)} sites: no bookkeeping floor")
        return
    scans = 8 * sum(c * u for c, u in zip(per, units_after)) / frac
    inserts = sum(c * (24 * live[j] + 16 * sum(live[j:-1])) for j, c in enumerate(per[:-1])) / frac
    bw = bandwidth_tbs * 1e12
    print(f"the frontier's bookkeeping beside its passes, whole segment: scans reading each later unit input once "
          f"{scans / 1e15:.2f} PB ({scans / bw:.0f} s), inserts copying each carried value once per later cut "
          f"{inserts / 1e15:.2f} PB ({inserts / bw:.0f} s; at most {max(live) / 1e6:.2f} M values per point across a "
          f"cut); with the passes fused as in the last row: {(fused + scans + inserts) / bw:.0f} s at "
          f"{bandwidth_tbs:g} TB/s, {(fused + scans) / bw:.0f} s without the inserts' copies")


def op_traffic(model, x) -> list:
    """One forward pass of ``x``, in call order: (aten operator, bytes it reads and writes) for every operator that
    moves data (views left out), the model's parameters and buffers not counted (a batch reads them once)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    views = {"view", "_unsafe_view", "t", "permute", "reshape", "expand", "slice", "select", "unsqueeze", "squeeze",
             "detach", "alias", "as_strided", "empty", "empty_like", "lift_fresh"}

    class Traffic(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in views:
                tensors = [t for t in tree_flatten((args, kwargs))[0] + tree_flatten(out)[0]
                           if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params]
                self.ops.append((name, sum(t.numel() * t.element_size() for t in tensors)))
            return out

    with torch.no_grad(), Traffic() as t:
        model(x)
    return t.ops


def executed(bundle, x, dev, frac: float, budget_mib: int, evaluator: str = "auto") -> None:
    """Multiply-adds of every convolution and linear call the full-network path runs over its first ``frac``, by
    cause (the engine method that asked for the forward pass), counted where every call of the capture and of the
    frontier evaluator goes through (``_conv64.conv_call``)."""
    import torch
    import torch.nn.functional as F

    import sys

    import polytope_lens._conv64 as conv64
    import polytope_lens.paths as paths_mod
    from polytope_lens.paths.exact import Refiner
    from polytope_lens.paths.frontier import FrontierProgram

    count = {"macs": 0}
    by_cause: dict[str, list] = {}
    cause = ["pieces' ends (and a chunk's first points)"]
    labels: set[str] = set()
    real_call = conv64.conv_call

    def counting_call(func, args, kwargs):
        out = real_call(func, args, kwargs)
        if func in (F.conv2d, torch.conv2d):
            w = args[1] if len(args) > 1 else kwargs["weight"]
            count["macs"] += out.numel() * w[0].numel()
        elif func is F.linear:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            count["macs"] += out.numel() * w.shape[1]
        return out
    # the package's ``capture`` attribute is the function of that name: the module is taken from sys.modules
    conv64.conv_call = sys.modules["polytope_lens.capture"].conv_call = counting_call

    def tagged(owner, name, label):
        orig = getattr(owner, name)

        def wrapper(*a, **k):
            outer, cause[0] = cause[0], label
            before = count["macs"]
            try:
                return orig(*a, **k)
            finally:
                cause[0] = outer
                by_cause.setdefault(label, [0])[0] += count["macs"] - before
                if outer in labels:  # what ran inside is not counted again for the caller
                    by_cause.setdefault(outer, [0])[0] -= count["macs"] - before
        labels.add(label)
        setattr(owner, name, wrapper)

    model = bundle.module.double().eval()
    tagged(Refiner, "_eval_new", "passes at new breakpoints")
    tagged(Refiner, "_check_reduction", "the reductions' checks")
    tagged(paths_mod, "verify_chunk", "final check of 32 intervals")
    tagged(Refiner, "_run_chunk_frontier", "frontier passes (every point, site to site)")
    tagged(FrontierProgram, "build", "the frontier evaluator's checks")
    t0 = time.perf_counter()
    r = path_crossings(model, x[:1], x[:1] + frac * (x[1:] - x[:1]), trace=False, device=dev,
                       memory_budget=budget_mib << 20, evaluator=evaluator)
    seconds = time.perf_counter() - t0
    total = count["macs"]
    named = sum(v[0] for v in by_cause.values())
    print(f"first {frac:g} of chelsea -> coffee, every site, {budget_mib} MiB, {r.notes[-1].split(' (')[0]}: "
          f"{r.paths[0].crossings} crossings in {seconds:.1f} s on {dev}; executed {total / 1e9:.1f} G multiply-adds")
    for label, (v,) in sorted(by_cause.items(), key=lambda kv: -kv[1][0]):
        print(f"  {label}: {v / 1e9:.1f} G")
    print(f"  {cause[0]}: {(total - named) / 1e9:.1f} G")


def piece_costs(bundle, x, frac: float, budget_gib: int, evaluator: str = "frontier",
                crossings_total: float = 2.08e6) -> None:
    """What each piece of the full-network path costs in operator calls (host time on a GPU: each call is a launch)
    and in memory (the peak of live tensors, against the budget's estimate per point), over its first ``frac``, with
    ATen's convolutions so that a convolution is one call as on a GPU; and the whole path's calls projected from
    them, with pieces of the estimate's size and of the measured size (``exact.DevicePeak`` on a GPU)."""
    import weakref
    from collections import defaultdict

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    import polytope_lens._conv64 as conv64
    import polytope_lens.paths.exact as exact

    class Costs(TorchDispatchMode):
        """Operator calls, and live tensor storages (counted once per storage, freed with their last tensor)."""

        def __init__(self):
            super().__init__()
            self.calls, self.live, self.refs, self.now, self.peak = 0, {}, defaultdict(int), 0, 0

        def _drop(self, key):
            self.refs[key] -= 1
            if not self.refs[key]:
                del self.refs[key]
                self.now -= self.live.pop(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.calls += 1
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                    key = t.untyped_storage().data_ptr()
                    if key not in self.live:
                        self.live[key] = t.untyped_storage().nbytes()
                        self.now += self.live[key]
                        self.peak = max(self.peak, self.now)
                    self.refs[key] += 1
                    weakref.finalize(t, self._drop, key)
            return out

    conv64.MAX_IMAGE, conv64.COLUMN_BYTES = 0, 1 << 62  # ATen's convolutions: one call each, as on a GPU
    rows, sized = [], []
    real_chunk, real_pieces = exact.Refiner.run_chunk, exact.Refiner.run_path_in_pieces

    def run_chunk(self, *args):
        with Costs() as c:
            out = real_chunk(self, *args)
        rows.append((out["n_evaluated"], c.calls, c.peak))
        return out

    def run_path_in_pieces(self, gp, max_points, *args):
        sized.append(max_points)
        return real_pieces(self, gp, max_points, *args)
    exact.Refiner.run_chunk, exact.Refiner.run_path_in_pieces = run_chunk, run_path_in_pieces
    r = path_crossings(bundle.module, x[:1], x[:1] + frac * (x[1:] - x[:1]), trace=False, evaluator=evaluator,
                       memory_budget=budget_gib << 30)
    budget = budget_gib << 30
    print(f"full-network path, first {frac:g} of chelsea -> coffee, {r.paths[0].crossings} crossings, "
          f"{budget_gib} GiB ({r.notes[-1]}; ATen's convolutions): the estimate allows {sized[0]} points per piece "
          f"({budget / sized[0] / 2**20:.1f} MiB each)")
    print("| piece | points | operator calls | peak of live tensors (MiB) | MiB per point |")
    print("|---:|---:|---:|---:|---:|")
    for i, (n, calls, peak) in enumerate(rows):
        print(f"| {i} | {n} | {calls:,} | {peak / 2**20:,.0f} | {peak / max(n, 1) / 2**20:.1f} |")
    n, calls, peak = max(rows)
    measured = exact.measured_piece_points(sized[0], budget, peak, n)  # as run_path_in_pieces sizes them on CUDA
    for label, pts in (("the estimate's", sized[0]), ("measured", measured)):
        pieces = crossings_total / exact.piece_room(pts)
        print(f"whole path ({crossings_total:.3g} crossings), pieces of {label} size ({pts} points): about "
              f"{pieces:,.0f} pieces, {pieces * calls / 1e6:.1f} M operator calls")


def delta_support(bundle, x, frac: float, thresholds=(1e-13, 1e-12, 1e-11)) -> None:
    """How much of the network a breakpoint's slope change reaches: the ceiling of an incremental evaluator.

    A breakpoint p that site s makes changes, at every later site k, the unit inputs only where the kink's effect
    reaches: z_k(p) minus the interpolation of z_k between p's neighbours (the breakpoints on either side) is
    nonzero only there. An evaluator that ran the network after site s on that difference alone (sparse in its
    spatial positions) would need, per segment after site k, the segment's multiply-adds times the fraction of
    site k's positions it reaches (after site s itself: the kinked unit's one position). Counted here for every
    breakpoint of the first ``frac`` of chelsea -> coffee (exact, float64), against the passes the frontier runs
    (each later segment in full); "reached" is a difference above ``threshold`` times the site's largest unit input,
    for a few thresholds, since rounding makes every difference nonzero (the smallest is the least optimistic).
    Also counted: the later sites' unit inputs such an evaluator would hold per breakpoint (every channel at the
    positions reached) against the frontier's (every unit), the bytes its passes and scans would at least move."""
    import numpy as np
    import torch

    model = bundle.module.double().eval()
    end = x[:1] + frac * (x[1:] - x[:1])
    r = path_crossings(model, x[:1], end, trace=False)
    t = torch.tensor(np.unique(r.paths[0].t))
    z = None
    for i in range(0, len(t), 16):
        inputs = []
        calls = layer_calls(model, x[:1] + t[i:i + 16].view(-1, 1, 1, 1) * (end - x[:1]), inputs)
        z = [[v] for v in inputs] if z is None else [a + [v] for a, v in zip(z, inputs)]
    z = [torch.cat(v) for v in z]  # per site: (points, C, H, W)
    seg, cur = [], None  # multiply-adds after each site up to the next (the last: to the output)
    for kind, n in calls:
        if kind == "site":
            if cur is not None:
                seg.append(cur)
            cur = 0
        elif cur is not None:
            cur += n
    seg = torch.tensor(seg + [cur], dtype=torch.float64)
    units = torch.tensor([v[0].numel() for v in z], dtype=torch.float64)  # unit inputs per point at each site
    lam = ((t[1:-1] - t[:-2]) / (t[2:] - t[:-2])).view(-1, 1, 1, 1).double()
    print(f"first {frac:g} of chelsea -> coffee: {r.paths[0].crossings} crossings, {len(t) - 2} inner breakpoints, "
          f"{len(z)} sites")
    for thr in thresholds:
        reach = torch.stack([((v[1:-1] - ((1 - lam) * v[:-2] + lam * v[2:])).abs() > thr * v.abs().amax()).any(1)
                             .flatten(1).double().mean(1) for v in z], 1)  # (breakpoints, sites): positions reached
        dense = sparse = dense_units = sparse_units = 0.0
        for row in reach:
            hit = torch.nonzero(row > 0).flatten()
            s = int(hit[0]) - 1 if len(hit) else len(z) - 1  # the site that made it: the first change is after it
            s = max(s, 0)
            dense += float(seg[s:].sum())
            sparse += float(seg[s]) / (z[s].shape[2] * z[s].shape[3]) + float((seg[s + 1:] * row[s + 1:]).sum())
            dense_units += float(units[s + 1:].sum())
            sparse_units += float((units[s + 1:] * row[s + 1:]).sum())
        print(f"threshold {thr:g}: the frontier's passes {dense / 1e9:.2f} G multiply-adds, an exact incremental "
              f"evaluator at least {sparse / 1e9:.2f} G ({sparse / dense:.2f} of them); later sites' unit inputs "
              f"{dense_units * 8 / 2**30:.2f} GiB in float64, reached {sparse_units * 8 / 2**30:.3f} GiB "
              f"({sparse_units / dense_units:.3f} of them)")


def one_site_cases(bundle, x, dev, row) -> None:
    """The CPU goal's one-site path and two rays of one later site, each timed (``row`` prints it)."""
    t0 = time.perf_counter()
    r = path_crossings(bundle.module, x[:1], x[1:], layers="_swish.relu6", trace=False, device=dev)
    row("path chelsea -> coffee, crossings of the first ReLU6 site (401,408 units)", t0, r)
    t0 = time.perf_counter()
    r = ray_crossings(bundle.module, x[:1], layer="_blocks.15._swish.relu6#1", alphas=(0.0, 3.0), trace=False,
                      device=dev)
    row("scaling ray of _blocks.15._swish.relu6#1 (chelsea), alpha 0..3, all later sites", t0, r)
    t0 = time.perf_counter()
    r = ray_crossings(bundle.module, x[:1], layer="_blocks.15._swish.relu6#1", alphas=(0.25, 4.0), units="position",
                      device=dev)
    row("prediction-3 ray of _blocks.15._swish.relu6#1 (chelsea), alpha 0.25..4, head centre channel vector, "
        "with the trace", t0, r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="also the full-network path (every site; the GPU case)")
    ap.add_argument("--full-seconds", type=float, default=240.0,
                    help="time for the full-network fractions: a longer fraction runs only if its extrapolation fits")
    ap.add_argument("--profile", action="store_true",
                    help="only profile the full-network path over the first --profile-fraction of the segment (top "
                         "operators; --evaluator, --full-memory-gib apply)")
    ap.add_argument("--profile-fraction", type=float, default=5e-4)
    ap.add_argument("--fractions", default="5e-4,1e-2,1",
                    help="with --full: comma-separated fractions of the segment, in increasing order")
    ap.add_argument("--flops", type=float, default=None, metavar="FRACTION",
                    help="only the compute floor of the full-network path (graph route), from its first FRACTION")
    ap.add_argument("--executed", type=float, default=None, metavar="FRACTION",
                    help="only count the multiply-adds the full-network path runs over its first FRACTION, by cause")
    ap.add_argument("--memory-mib", type=int, default=1024, help="budget for --executed (MiB)")
    ap.add_argument("--pieces", type=float, default=None, metavar="FRACTION",
                    help="only count each piece's operator calls and peak memory over the first FRACTION, and project "
                         "the whole path's calls (--evaluator, default frontier here; --full-memory-gib)")
    ap.add_argument("--delta-support", type=float, default=None, metavar="FRACTION",
                    help="only measure how far each breakpoint's slope change reaches into the later sites over the "
                         "first FRACTION (the most an incremental evaluator could save)")
    ap.add_argument("--evaluator", default="auto",
                    help="evaluator for --executed and the --full fractions (auto, graph, frontier)")
    ap.add_argument("--peak-tflops", type=float, default=66.9,
                    help="float64 peak for --flops (66.9: an H100 SXM's matrix units; 33.5 its vector units)")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35,
                    help="memory bandwidth for --flops, TB/s (3.35: an H100 SXM's HBM3)")
    ap.add_argument("--aten-convolutions", action="store_true",
                    help="ATen's float64 convolutions as they come instead of polytope_lens._conv64's ways")
    ap.add_argument("--pointwise-matmul", action="store_true",
                    help="1 x 1 convolutions as matrix products on --device (_conv64.POINTWISE_AS_MATMUL)")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                    help="dtype of the --full fractions (float32: a data point only; the goal is float64)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="cuDNN's benchmark mode for the --full fractions (every algorithm timed once per new shape: "
                         "the frontier's passes change shape with every piece and site, so this mostly times the "
                         "search)")
    ap.add_argument("--no-fold", action="store_true",
                    help="keep batch norm and zero padding in the frontier's graph (frontier.FOLD_INTO_CONVOLUTIONS)")
    ap.add_argument("--pointwise-triton", action="store_true",
                    help="1 x 1 convolutions in one Triton kernel on --device (_conv64.POINTWISE_AS_MATMUL and "
                         "POINTWISE_WAY = 'triton'; an opt-in, stop 25)")
    ap.add_argument("--fuse", action="store_true",
                    help="each clamp site and the depthwise or 1 x 1 convolution after it in one Triton kernel on "
                         "--device (frontier.FUSE_SITE_CONVOLUTIONS; an opt-in, stop 26)")
    ap.add_argument("--no-append", action="store_true",
                    help="merge the frontier's new points into path order at every site, as before stop 25 "
                         "(frontier.APPEND_NEW_POINTS)")
    ap.add_argument("--scan", choices=["triton", "torch"], default="triton",
                    help="on a GPU, find where units change piece with one Triton kernel per site (default) or with "
                         "torch operations (polytope_lens._kink_scan.USE_TRITON)")
    ap.add_argument("--full-memory-gib", type=int, default=32, help="memory budget of --full and --profile (GiB)")
    ap.add_argument("--full-only", action="store_true",
                    help="with --full: only the full-network fractions (not the one-site path and the two rays)")
    args = ap.parse_args()
    if args.pointwise_matmul or args.pointwise_triton:
        import polytope_lens._conv64 as conv64

        conv64.POINTWISE_AS_MATMUL = {args.device.split(":")[0]}
        conv64.POINTWISE_WAY = "triton" if args.pointwise_triton else "matmul"
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.no_fold:
        import polytope_lens.paths.frontier as frontier

        frontier.FOLD_INTO_CONVOLUTIONS = False
    if args.fuse:
        import polytope_lens.paths.frontier as frontier

        frontier.FUSE_SITE_CONVOLUTIONS = {args.device.split(":")[0]}
    if args.no_append:
        import polytope_lens.paths.frontier as frontier

        frontier.APPEND_NEW_POINTS = False
    if args.scan == "torch":
        import polytope_lens._kink_scan as kink_scan

        kink_scan.USE_TRITON = False
    if args.aten_convolutions:
        import polytope_lens._conv64 as conv64

        conv64.MAX_IMAGE, conv64.COLUMN_BYTES = 0, 1 << 62
    dev = args.device
    bundle = load_model("efficientnet-lite0")
    photos = load_data("skimage")
    names = list(photos.label_names)
    x = next(iter(bundle.encode(photos, [names.index("chelsea"), names.index("coffee")]).tensors.values())).double()
    if args.profile:
        profile_full(bundle, x, dev, args.profile_fraction, args.evaluator, args.full_memory_gib)
        return
    if args.pieces is not None:
        piece_costs(bundle, x, args.pieces, args.full_memory_gib,
                    "frontier" if args.evaluator == "auto" else args.evaluator)
        return
    if args.delta_support is not None:
        delta_support(bundle, x, args.delta_support)
        return
    if args.executed is not None:
        executed(bundle, x, dev, args.executed, args.memory_mib, args.evaluator)
        return
    if args.flops is not None:
        flops_floor(bundle, x, dev, args.flops, args.peak_tflops, args.bandwidth_tbs)
        return
    print(f"device: {dev}; float64 convolutions: {'ATen' if args.aten_convolutions else 'polytope_lens._conv64'}"
          f"{'; 1 x 1 ones as matrix products' if args.pointwise_matmul else ''}"
          f"{'; 1 x 1 ones in one Triton kernel' if args.pointwise_triton else ''}"
          f"{'; batch norm and padding not folded' if args.no_fold else ''}"
          f"{'; cuDNN benchmark mode' if args.cudnn_benchmark else ''}"
          f"{'; piece changes found with torch operations' if args.scan == 'torch' else ''}"
          f"{'; new points merged into path order' if args.no_append else ''}"
          f"{'; clamp sites and the convolutions after them in one Triton kernel' if args.fuse else ''}")
    print("| case | seconds | crossings | exact | evaluator |")
    print("|---|---:|---:|---|---|", flush=True)

    def row(case, t0, r):  # one row as soon as it is known: a step killed at its time limit keeps the rows before
        from polytope_lens import _kink_scan
        failed = f"; a Triton kernel FAILED, torch's steps ran instead: {_kink_scan._failed[0][:150]}" \
            if _kink_scan._failed else ""  # a fallback would time torch's steps under the kernels' name
        print(f"| {case} | {time.perf_counter() - t0:.1f} | {r.paths[0].crossings} | {r.exact} | "
              f"{r.notes[-1]}{failed} |", flush=True)

    if dev != "cpu":  # warm-up: CUDA context, kernels
        path_crossings(bundle.module, x[:1], x[1:], layers="_swish.relu6", trace=False, device=dev)
    if not args.full_only:
        one_site_cases(bundle, x, dev, row)
    if args.full:  # the first 1/2000, 1/100 of the path (CPU, stop 11: 1/2000 crosses 1,087 in 131 s), then all
        start, spent, last = time.perf_counter(), 0.0, None
        for frac in (float(f) for f in args.fractions.split(",")):
            if last is not None:
                guess = last[1] * frac / last[0]  # time grows about linearly with the breakpoints, so the length
                if spent + guess > args.full_seconds:
                    print(f"| path chelsea -> coffee, every site, first {frac:g} of the segment: not run; about "
                          f"{guess:.0f} s by extrapolation from the first {last[0]:g} ({last[1]:.1f} s) | | | | |",
                          flush=True)
                    break
            t0 = time.perf_counter()
            with counted_pieces() as pieces:
                r = path_crossings(bundle.module, x[:1], x[:1] + frac * (x[1:] - x[:1]), trace=False, device=dev,
                                   memory_budget=args.full_memory_gib << 30, evaluator=args.evaluator,
                                   dtype=getattr(torch, args.dtype))
            row(f"path chelsea -> coffee, every site (full network), first {frac:g} of the segment, "
                f"{args.full_memory_gib} GiB budget, {args.dtype}; {len(pieces)} pieces of {min(pieces, default=0)} to "
                f"{max(pieces, default=0)} points (mean {sum(pieces) / max(len(pieces), 1):.0f})", t0, r)
            last, spent = (frac, time.perf_counter() - t0), time.perf_counter() - start

@contextlib.contextmanager
def counted_pieces():
    """The evaluated points of every piece (``Refiner.run_chunk`` call) made inside the block: how the pieces were
    sized (on a CUDA device from their measured peak memory, docs/paths.md)."""
    real, points = Refiner.run_chunk, []

    def run_chunk(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        points.append(int(out["n_evaluated"]))
        return out
    Refiner.run_chunk = run_chunk
    try:
        yield points
    finally:
        Refiner.run_chunk = real


if __name__ == "__main__":
    main()
