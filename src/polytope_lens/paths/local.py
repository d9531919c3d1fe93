"""Local evaluation of exact paths: each spatial position holds only the breakpoints of its own backward cone.

Along a path through a convolutional network, a unit's input at spatial position x depends on the path only through
the positions of its receptive field, so as a function of t it is affine between the breakpoints made there: the
crossings, at any earlier site, of units in x's backward cone. The frontier evaluator (``frontier``) holds every unit
at every breakpoint of the path; here a value of the network (C, H, W per point) is held as ragged lists, one per
position (and path), of the breakpoints that position needs, each with its C channels (``Field``). A convolution's
output position takes the union of its receptive field's lists and reads each input position between its own
breakpoints by interpolation (exact: it is affine there); a 1 x 1 convolution keeps the lists as they are; a site
scans each position's list with the activation's ``crossings`` (the registry's one definition of a kink crossing)
and adds each crossing to its position's list only, its unit exactly on the kink.

The crossings are the frontier's: the same sites, units, pieces and positions in t (to rounding), placed on the
path's global list of points and handed to the same bookkeeping (``exact.Refiner._crossings``: ties, snapping, the
records), so a path's result does not depend on the evaluator. What differs is the work: early in a network, where a
crossing's effect stays within a few positions, the lists are short (docs/benchmarks.md measures both on
EfficientNet-Lite0). The FX graph is the frontier's (``FrontierProgram``: traced, batch norm and padding folded,
checked against forward passes); this evaluator follows the operators a convolutional network's layers up to its
last followed site are made of, and names the first node it cannot follow otherwise (``unsupported``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..kinks import Crossings, as_pair, lexsort
from .frontier import FrontierProgram, _attribute, _convolution, _zero_padding

_ADDS = {operator.add, torch.add, operator.sub, torch.sub}
_SCALINGS = {operator.mul, torch.mul, operator.truediv, torch.div}
_MEANS = {torch.mean, torch.Tensor.mean}


class Field:
    """One value of the network at every point of a chunk's paths, held per position (path and spatial position) at
    the breakpoints that position needs: entries sorted by (position, the point's place along its path).

    ``shape`` is one point's (C, H, W); ``pos`` (entries,) is ``path * H * W + h * W + w`` for ``n_paths`` paths;
    ``pid`` the point's id (``exact._Points.ids``); ``val`` (entries, C). A position with no entries holds zeros (zero
    padding)."""

    def __init__(self, shape: tuple, pos: torch.Tensor, pid: torch.Tensor, val: torch.Tensor, n_paths: int):
        self.shape, self.pos, self.pid, self.val, self.n_paths = tuple(shape), pos, pid, val, n_paths
        self._keys = None

    @property
    def area(self) -> int:
        return self.shape[1] * self.shape[2]

    def like(self, val: torch.Tensor, shape: tuple | None = None) -> "Field":
        return Field(self.shape if shape is None else shape, self.pos, self.pid, val, self.n_paths)

    def read(self, pts: "PointOrder", pos: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
        """The values (len(pos), C) at positions ``pos`` and points ``pid``: an entry's where there is one, else the
        interpolation between the position's entries on either side (it is affine between them); zeros at a
        position without entries."""
        keys = self.keys(pts)
        kq = pts.keys(pos, pid)
        i = (torch.searchsorted(keys, kq, right=True) - 1).clamp_(min=0)
        out = self.val.index_select(0, i)
        held = self.pos[i] == pos
        between = torch.nonzero(held & (keys[i] != kq)).flatten()  # no entry at that point: interpolated
        if len(between):
            ib = i[between]
            ti, tj = pts.t[self.pid[ib]], pts.t[self.pid[ib + 1]]
            w = ((pts.t[pid[between]] - ti) / (tj - ti)).to(out.dtype).unsqueeze(1)
            out[between] = torch.lerp(out[between], self.val[ib + 1], w)
        out.index_fill_(0, torch.nonzero(~held).flatten(), 0.0)
        return out

    def keys(self, pts: "PointOrder") -> torch.Tensor:
        """The entries' sort keys at ``pts``'s stage (kept: a convolution reads its input once per kernel tap)."""
        if self._keys is None or self._keys[0] is not pts:
            self._keys = (pts, pts.keys(self.pos, self.pid))
        return self._keys[1]


class PointOrder:
    """The place along its path (rank) and the t of every point id of a chunk, at one stage."""

    def __init__(self, ids: torch.Tensor, t: torch.Tensor, n_ids: int):
        self.n = n_ids
        self.rank = torch.empty(n_ids, dtype=torch.long, device=ids.device)
        self.rank[ids] = torch.arange(len(ids), device=ids.device)
        self.t = t.new_zeros(n_ids)
        self.t[ids] = t
        self.ids = ids  # point id at each place

    def keys(self, pos: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
        return pos * self.n + self.rank[pid]

    def union(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted distinct (position, point) pairs of several lists."""
        k = torch.unique(torch.cat([self.keys(p, q) for p, q in parts]))
        return k // self.n, self.ids[k % self.n]


def unsupported(prog: FrontierProgram, runner) -> str:
    """Why this evaluator cannot follow ``prog``'s graph up to its last processed site; "" where it can."""
    if prog.path_site is not None:
        return "it follows paths in the input space only (not at a named layer)"
    if not prog.sites:
        return "no site to follow"
    if any(i not in prog.clamps for i in prog.sites):
        return "its sites are not all ReLU, ReLU6, Hardtanh or two-bound clamps"
    inputs = [n for n in prog.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return "the model takes several inputs"
    shape = tuple(runner.spec.points(torch.zeros(1, dtype=torch.long, device=runner.device),
                                     torch.zeros(1, dtype=runner.dtype, device=runner.device)).shape)
    if len(shape) != 4:
        return f"its input is not a batch of images (N, C, H, W) but {shape[1:]}"
    for node in prog.nodes[:prog.sites[-1] + 1]:
        if node.op in ("placeholder", "get_attr") or prog.nodes.index(node) in prog.sites:
            continue
        if _kind(prog, node) is None:
            return f"it does not follow {node.format_node()[:70]}"
    return ""


def _kind(prog: FrontierProgram, node: fx.Node) -> str | None:
    """Which of this evaluator's operations a node is, else None."""
    if node.op == "call_method" and node.target == "size":
        return "size"
    if _convolution(prog.gm, node) is not None and _convolution(prog.gm, node)[0] == 2:
        call = _convolution(prog.gm, node)[1]
        if as_pair(call["dilation"]) == (1, 1) and not isinstance(call["padding"], str):
            return "conv"
        return None
    if _zero_padding(prog.gm, node, 2) is not None:
        return "pad"
    if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
        return "add"
    if node.op == "call_function" and node.target in _SCALINGS and len(node.args) == 2 and not node.kwargs and (
            isinstance(node.args[1], (int, float)) or node.target in (operator.mul, torch.mul)
            and isinstance(node.args[0], (int, float))):
        return "scale"
    if node.op == "call_module":
        m = prog.modules[node.target]
        if isinstance(m, nn.Identity) or isinstance(m, nn.Dropout) and not m.training:
            return "identity"
        if isinstance(m, nn.BatchNorm2d) and not m.training and m.running_mean is not None:
            return "norm"
    return None


class LocalState:
    """A chunk's values in ``Field`` form, advanced node by node from the input to each site in turn."""

    def __init__(self, prog: FrontierProgram, x: torch.Tensor, pid: torch.Tensor, ids: torch.Tensor, n_paths: int):
        """``x``: the model's input at the chunk's first points (path order; the input is affine between them),
        ``pid``, ``ids``: their path (within the chunk) and point id."""
        self.prog, self.env, self.next = prog, {}, 0
        n, c, h, w = x.shape
        self.n_paths = n_paths
        pos = (pid.view(-1, 1) * (h * w) + torch.arange(h * w, device=x.device)).reshape(-1)
        point = ids.repeat_interleave(h * w)
        val = x.reshape(n, c, h * w).transpose(1, 2).reshape(n * h * w, c)
        order = lexsort(pos, torch.arange(n, device=x.device).repeat_interleave(h * w))  # points are in path order
        self.input = Field((c, h, w), pos[order], point[order], val[order], n_paths)
        self.entries: list[int] = []  # values held at each site's unit inputs (entries x channels)

    def run_to(self, k: int, pts: PointOrder) -> Field:
        """Advance to site ``k``; its unit inputs."""
        p = self.prog
        cut = p.sites[k]
        for i in range(self.next, cut):
            node = p.nodes[i]
            self.env[node.name] = self._exec(node, pts)
            for name in p.free_after[i]:
                if name != p.nodes[cut].args[0].name:
                    self.env.pop(name, None)
        self.next = cut
        z = self.env[p.nodes[cut].args[0].name]
        self.entries.append(z.val.numel())
        return z

    def set_site_output(self, k: int, z: Field) -> None:
        """Site ``k``'s unit inputs at every point it needs (its own breakpoints added): its output from here on."""
        p = self.prog
        i = p.sites[k]
        node = p.nodes[i]
        lo, hi = p.clamps[i]
        out = z.like(z.val.clamp_min(lo) if hi is None else z.val.clamp(lo, hi))
        self.env[node.name] = out
        if p._inplace(node, node.args, node.kwargs):  # the nodes after it read what the call wrote
            self.env[node.args[0].name] = out
        for name in p.free_after[i]:
            self.env.pop(name, None)
        self.next = i + 1

    # ------------------------------------------------------------------------------------------- operations
    def _exec(self, node: fx.Node, pts: PointOrder):
        p = self.prog
        if node.op == "placeholder":
            return self.input
        if node.op == "get_attr":
            return _attribute(p.gm, node.target)
        kind = _kind(p, node)
        arg = node.args[0] if node.args else None
        if kind == "size":
            return None
        if kind == "identity":
            return self.env[arg.name]
        if kind == "conv":
            call = _convolution(p.gm, node)[1]
            return _conv(self.env[call["input"].name], pts, call["weight"].detach(), call["bias"], call)
        if kind == "pad":
            src, pad = _zero_padding(p.gm, node, 2)
            return _pad(self.env[src.name], pad)
        if kind == "norm":
            m = p.modules[node.target]
            f = self.env[arg.name]
            scale = (m.weight if m.weight is not None else 1.0) / torch.sqrt(m.running_var + m.eps)
            shift = (m.bias if m.bias is not None else 0.0) - m.running_mean * scale
            return f.like(f.val * scale.detach().to(f.val.dtype) + shift.detach().to(f.val.dtype))
        if kind == "scale":
            a, b = node.args
            f, c = (self.env[a.name], b) if isinstance(a, fx.Node) else (self.env[b.name], a)
            return f.like(f.val / c if node.target in (operator.truediv, torch.div) else f.val * c)
        if kind == "add":
            a, b = (self.env[n.name] if isinstance(n, fx.Node) else n for n in node.args)
            sign = -1.0 if node.target in (operator.sub, torch.sub) else 1.0
            if not isinstance(a, Field) or not isinstance(b, Field):  # a constant: added everywhere
                f, c = (a, b) if isinstance(a, Field) else (b, a)
                return f.like(f.val + sign * c if f is a else c + sign * f.val)
            return _add(a, b, sign, pts)
        raise ValueError(f"the local evaluator cannot run {node.format_node()[:70]}")


def _pad(f: Field, pad: tuple) -> Field:
    """Zero padding (``F.pad``'s order: left, right, top, bottom): the new positions hold no entries."""
    left, right, top, bottom = pad
    c, h, w = f.shape
    h2, w2 = h + top + bottom, w + left + right
    path, s = f.pos // (h * w), f.pos % (h * w)
    return Field((c, h2, w2), path * (h2 * w2) + (s // w + top) * w2 + s % w + left, f.pid, f.val, f.n_paths)


def _add(a: Field, b: Field, sign: float, pts: PointOrder) -> Field:
    if len(a.pos) == len(b.pos) and torch.equal(a.pos, b.pos) and torch.equal(a.pid, b.pid):
        return a.like(a.val + sign * b.val)
    pos, pid = pts.union([(a.pos, a.pid), (b.pos, b.pid)])
    return Field(a.shape, pos, pid, a.read(pts, pos, pid) + sign * b.read(pts, pos, pid), a.n_paths)


def _conv(f: Field, pts: PointOrder, weight: torch.Tensor, bias, call: dict) -> Field:
    """A 2-D convolution (zero padding, no dilation): each output position at the union of its receptive field's
    breakpoints; a 1 x 1 convolution with stride 1 keeps the lists."""
    c, h, w = f.shape
    co, cig, kh, kw = weight.shape
    (sh, sw), (ph, pw), groups = as_pair(call["stride"]), as_pair(call["padding"]), call["groups"]
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    weight = weight.to(f.val.dtype)
    dev = f.val.device
    if (kh, kw, sh, sw, ph, pw, groups) == (1, 1, 1, 1, 0, 0, 1):
        val = f.val @ weight.view(co, c).T
        return Field((co, ho, wo), f.pos, f.pid, val if bias is None else val.add_(bias.detach().to(val.dtype)),
                     f.n_paths)
    # output positions: the union of the lists of the input positions their window reads
    paths = torch.arange(f.n_paths, device=dev)
    oh = torch.arange(ho, device=dev).repeat_interleave(wo)
    ow = torch.arange(wo, device=dev).repeat(ho)
    first = torch.searchsorted(f.pos, torch.arange(f.n_paths * h * w + 1, device=dev))  # each position's entries
    q_all, y_all = [], []
    for i in range(kh):
        for j in range(kw):
            ih, iw = oh * sh - ph + i, ow * sw - pw + j
            ok = torch.nonzero((ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)).flatten()
            q = (paths.view(-1, 1) * (ho * wo) + ok).reshape(-1)
            y = (paths.view(-1, 1) * (h * w) + (ih * w + iw)[ok]).reshape(-1)
            q_all.append(q)
            y_all.append(y)
    q, y = torch.cat(q_all), torch.cat(y_all)
    counts = first[y + 1] - first[y]
    pair = torch.repeat_interleave(torch.arange(len(y), device=dev), counts)
    entry = first[y][pair] + torch.arange(len(pair), device=dev) - (torch.cumsum(counts, 0) - counts)[pair]
    pos, pid = pts.union([(q[pair], f.pid[entry])])
    val = f.val.new_zeros(len(pos), co)
    path, s = pos // (ho * wo), pos % (ho * wo)
    for i in range(kh):
        for j in range(kw):
            ih, iw = (s // wo) * sh - ph + i, (s % wo) * sw - pw + j
            ok = (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
            a = f.read(pts, path * (h * w) + ih.clamp(0, h - 1) * w + iw.clamp(0, w - 1), pid)
            a *= ok.unsqueeze(1).to(a.dtype)
            wij = weight[:, :, i, j]  # (co, cig)
            if groups == 1:
                val.addmm_(a, wij.T)
            elif cig == 1 and co == groups == c:  # depthwise
                val.addcmul_(a, wij[:, 0])
            else:
                g_in, g_out = c // groups, co // groups
                val += torch.einsum("ngi,goi->ngo", a.view(-1, groups, g_in),
                                    wij.view(groups, g_out, g_in)).reshape(-1, co)
    if bias is not None:
        val += bias.detach().to(val.dtype)
    return Field((co, ho, wo), pos, pid, val, f.n_paths)


def crossings(act, z: Field, pts: PointOrder, t_path: torch.Tensor):
    """A site's crossings along every position's list, placed on the path's points: ``Crossings`` whose segment is
    the index (in path order) of the point before it, ordered as ``crossings_along`` orders them over dense values
    (segment, t, kink, unit); and per crossing the entry it lies after, its channel and its kink. ``t_path``: the
    points' t in path order."""
    same = torch.nonzero(z.pos[:-1] == z.pos[1:]).flatten()
    cr = act.crossings(z.val[same], z.val[same + 1])
    e = same[cr.segment]
    id_l, id_r = z.pid[e], z.pid[e + 1]
    t_l, t_r = pts.t[id_l], pts.t[id_r]
    t_star = t_l + cr.t * (t_r - t_l)
    # the global segment holding each crossing: the last point at or before it between its entries' points, by a
    # bisection of all crossings at once (the two entries bracket it; points of other paths never lie between them)
    seg, hi = pts.rank[id_l], pts.rank[id_r]
    steps = int(hi.sub(seg).max()).bit_length() if len(seg) else 0
    for _ in range(steps):
        mid = (seg + hi) // 2
        right = (t_path[mid] <= t_star) & (mid > seg)
        seg, hi = torch.where(right, mid, seg), torch.where(right | (mid == seg), hi, mid)
    t0, t1 = t_path[seg], t_path[seg + 1]
    s = ((t_star - t0) / (t1 - t0)).clamp_(0.0, 1.0)
    unit = cr.unit * z.area + z.pos[e] % z.area
    kink = torch.where(cr.piece > cr.before, cr.piece - 1, cr.piece)
    order = torch.argsort(unit, stable=True)
    order = order[torch.argsort(kink[order], stable=True)]
    order = order[lexsort(seg[order], s[order])]
    out = Crossings(seg[order], unit[order], s[order], cr.piece[order], cr.before[order])
    return out, e[order], cr.unit[order], kink[order]


def add_breakpoints(act, z: Field, pts: PointOrder, e: torch.Tensor, channel: torch.Tensor, kink: torch.Tensor,
                    point: torch.Tensor, on_kink: torch.Tensor) -> Field:
    """Site unit inputs ``z`` with each crossing's point added to its position's list (``e``: the entry it lies
    after; ``point``: its point id, new or the one it was snapped to): interpolated between the entries on either
    side, the crossed unit exactly on its kink where ``on_kink``. ``pts`` knows the new points."""
    keep = (point != z.pid[e]) & (point != z.pid[e + 1])  # a crossing snapped to an entry adds nothing
    e, channel, kink, point, on_kink = e[keep], channel[keep], kink[keep], point[keep], on_kink[keep]
    if not len(e):
        return z
    key = pts.keys(z.pos[e], point)
    uniq, inv = torch.unique(key, return_inverse=True)
    first = torch.full((len(uniq),), len(key), dtype=torch.long, device=key.device).scatter_reduce_(
        0, inv, torch.arange(len(key), device=key.device), "amin")
    e0, p0 = e[first], point[first]
    t_l, t_r = pts.t[z.pid[e0]], pts.t[z.pid[e0 + 1]]
    u = ((pts.t[p0] - t_l) / (t_r - t_l)).to(z.val.dtype)
    new = torch.lerp(z.val[e0], z.val[e0 + 1], u.unsqueeze(1))
    kinks = torch.tensor(act.kinks, dtype=new.dtype, device=new.device)
    at = torch.nonzero(on_kink).flatten()
    new[inv[at], channel[at]] = kinks[kink[at]]
    pos = torch.cat([z.pos, z.pos[e0]])
    pid = torch.cat([z.pid, p0])
    order = torch.argsort(pts.keys(pos, pid))
    return Field(z.shape, pos[order], pid[order], torch.cat([z.val, new])[order], z.n_paths)


def dense(z: Field, pts: PointOrder, pid_path: torch.Tensor, ids_path: torch.Tensor) -> torch.Tensor:
    """A field's values at every point (path order) and unit: (points, C * H * W), as a dense evaluator holds them."""
    n, area = len(ids_path), z.area
    s = torch.arange(area, device=ids_path.device)
    pos = (pid_path.view(-1, 1) * area + s).reshape(-1)
    v = z.read(pts, pos, ids_path.repeat_interleave(area))
    return v.view(n, area, -1).transpose(1, 2).reshape(n, -1)

