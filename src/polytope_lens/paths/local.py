"""Local evaluation of exact paths: each spatial position holds only the breakpoints of its own backward cone.

Along a path through a convolutional network, a unit's input at spatial position x depends on the path only through
the positions of its receptive field, so as a function of t it is affine between the breakpoints made there: the
crossings, at any earlier site, of units in x's backward cone. The frontier evaluator (``frontier``) holds every unit
at every breakpoint of the path; here a value of the network (C, H, W per point) is held as ragged lists, one per
position (and path), of the breakpoints that position needs, each with its C channels (``Field``). Points that
every position holds (a piece's ends at first, later any breakpoint whose effect has reached every position) are
kept dense, as images (the field's *base*, run through torch's own convolutions); the others are *extras*, ragged
entries at the positions that need them. A convolution's output position takes the union of its receptive field's
extras and reads each input position between its own breakpoints by interpolation (exact: it is affine there); a
1 x 1 convolution keeps the lists as they are; a site scans each position's list (base and extras) with the
activation's ``crossings`` (the registry's one definition of a kink crossing) and adds each crossing to its
position's list only, its unit exactly on the kink; a breakpoint held at every position joins the base.

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
import torch.nn.functional as F
from torch import nn

from .. import _conv64
from ..kinks import Crossings, as_pair, lexsort
from .frontier import FrontierProgram, _attribute, _convolution, _global_hooks, _hooked, _zero_padding

_ADDS = {operator.add, torch.add, operator.sub, torch.sub}
_SCALINGS = {operator.mul, torch.mul, operator.truediv, torch.div}


class PointOrder:
    """The place along its path (rank) and the t of every point id of a chunk at one stage, and the base points
    (held at every position, dense) in path order."""

    def __init__(self, ids: torch.Tensor, t: torch.Tensor, pid: torch.Tensor, n_ids: int, base_ids: torch.Tensor):
        self.n = n_ids
        self.rank = torch.empty(n_ids, dtype=torch.long, device=ids.device)
        self.rank[ids] = torch.arange(len(ids), device=ids.device)
        self.t = t.new_zeros(n_ids)
        self.t[ids] = t
        self.path = torch.zeros(n_ids, dtype=torch.long, device=ids.device)
        self.path[ids] = pid
        self.ids = ids  # point id at each place
        self.base_ids = base_ids
        self.base_rank = self.rank[base_ids]  # ascending: base rows are in path order
        self.is_base = torch.zeros(n_ids, dtype=torch.bool, device=ids.device)
        self.is_base[base_ids] = True

    def keys(self, pos: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
        return pos * self.n + self.rank[pid]

    def union(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted distinct (position, point) pairs of several lists."""
        k = torch.unique(torch.cat([self.keys(p, q) for p, q in parts]))
        return k // self.n, self.ids[k % self.n]


class Field:
    """One value of the network at every point of a chunk's paths: dense at the base points, ragged elsewhere.

    ``base`` (base points, C, H, W): the values at the points every position holds (``PointOrder.base_ids``, in
    that order); ``pos``, ``pid``, ``val`` (entries; entries, C): the other points, each at the positions that need
    it, sorted by (position, place along the path). ``pos`` is ``path * H * W + h * W + w`` for ``n_paths`` paths.
    Between the points a position holds, its values are affine in t."""

    def __init__(self, base: torch.Tensor, pos: torch.Tensor, pid: torch.Tensor, val: torch.Tensor, n_paths: int):
        self.base, self.pos, self.pid, self.val, self.n_paths = base, pos, pid, val, n_paths
        self.shape = tuple(base.shape[1:])
        self._keys = None
        self._rows = None

    @property
    def area(self) -> int:
        return self.shape[1] * self.shape[2]

    def like(self, base: torch.Tensor, val: torch.Tensor) -> "Field":
        return Field(base, self.pos, self.pid, val, self.n_paths)

    def numel(self) -> int:
        return self.base.numel() + self.val.numel()

    def keys(self, pts: PointOrder) -> torch.Tensor:
        """The extras' sort keys at ``pts``'s stage (kept: a convolution reads its input once per kernel tap)."""
        if self._keys is None or self._keys[0] is not pts:
            self._keys = (pts, pts.keys(self.pos, self.pid))
        return self._keys[1]

    def base_rows(self) -> torch.Tensor:
        """The base as (base point x position, C) rows, channels last (kept: gathered once per kernel tap)."""
        if self._rows is None:
            self._rows = self.base.permute(0, 2, 3, 1).reshape(-1, self.shape[0])
        return self._rows

    def read(self, pts: PointOrder, pos: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
        """The values (len(pos), C) at positions ``pos`` and points ``pid`` (of the positions' paths): a held
        point's, else the interpolation between the points the position holds on either side (affine there)."""
        r, s, area = pts.rank[pid], pos % self.area, self.area
        last = len(pts.base_rank) - 1
        bl = (torch.searchsorted(pts.base_rank, r, right=True) - 1).clamp_(0, last)  # the path's ends are base
        br = torch.searchsorted(pts.base_rank, r).clamp_(0, last)
        rows = self.base_rows()
        vl, vr = rows.index_select(0, bl * area + s), rows.index_select(0, br * area + s)
        rl, rr = pts.base_rank[bl], pts.base_rank[br]
        if len(self.pos):  # a nearer extra on either side replaces the base point
            keys, kq = self.keys(pts), pts.keys(pos, pid)
            i = (torch.searchsorted(keys, kq, right=True) - 1).clamp_(min=0)
            j = torch.searchsorted(keys, kq).clamp_(max=len(keys) - 1)
            ri, rj = pts.rank[self.pid[i]], pts.rank[self.pid[j]]
            left = torch.nonzero((self.pos[i] == pos) & (ri <= r) & (ri > rl)).flatten()
            right = torch.nonzero((self.pos[j] == pos) & (rj >= r) & (rj < rr)).flatten()
            vl[left], rl[left] = self.val[i[left]], ri[left]
            vr[right], rr[right] = self.val[j[right]], rj[right]
        between = torch.nonzero(rl != rr).flatten()
        if len(between):
            tl, tr = pts.t[pts.ids[rl[between]]], pts.t[pts.ids[rr[between]]]
            w = ((pts.t[pid[between]] - tl) / (tr - tl)).to(vl.dtype).unsqueeze(1)
            vl[between] = torch.lerp(vl[between], vr[between], w)
        return vl

    def at_points(self, pts: PointOrder, ids: torch.Tensor) -> torch.Tensor:
        """The values at every position of their paths of points ``ids``: (len(ids), C, H, W)."""
        area = self.area
        s = torch.arange(area, device=ids.device)
        pos = (pts.path[ids].view(-1, 1) * area + s).reshape(-1)
        v = self.read(pts, pos, ids.repeat_interleave(area))
        return v.view(len(ids), area, -1).transpose(1, 2).reshape(len(ids), *self.shape)

    def promoted(self, pts: PointOrder, ids: torch.Tensor, order: torch.Tensor) -> "Field":
        """This field with points ``ids`` moved from the extras into the base, whose rows (the old base's, then
        those of ``ids``) are put in ``order``."""
        rows = self.at_points(pts, ids)
        keep = torch.nonzero(~torch.isin(self.pid, ids)).flatten()
        base = torch.cat([self.base, rows]).index_select(0, order)
        return Field(base, self.pos[keep], self.pid[keep], self.val[keep], self.n_paths)


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
    if _global_hooks():
        return "forward hooks registered for every module are in place (it does not run the modules)"
    for i, node in enumerate(prog.nodes[:prog.sites[-1] + 1]):
        if node.op == "call_module" and _hooked(prog.modules[node.target]):
            return f"it does not run {node.target}'s forward hooks"
        if node.op in ("placeholder", "get_attr") or i in prog.sites:
            continue
        if _kind(prog, node) is None:
            return f"it does not follow {node.format_node()[:70]}"
    return ""


def _kind(prog: FrontierProgram, node: fx.Node) -> str | None:
    """Which of this evaluator's operations a node is, else None. Each reads images with one row per point
    (``_image``) and numbers: never a tensor of the model's that would broadcast, nor a size."""
    if node.op == "call_method" and node.target == "size":
        return "size"  # read by nothing it follows (each operation's operands are checked)
    conv = _convolution(prog.gm, node)
    if conv is not None:
        dims, call = conv
        ok = dims == 2 and as_pair(call["dilation"]) == (1, 1) and not isinstance(call["padding"], str)
        return "conv" if ok and _image(prog, call["input"]) else None
    pad = _zero_padding(prog.gm, node, 2)
    if pad is not None:
        return "pad" if _image(prog, pad[0]) else None
    if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
        images = [prog.point_shapes.get(a.name) for a in node.args if isinstance(a, fx.Node)]
        ok = all(_image(prog, a) if isinstance(a, fx.Node) else _number(a) for a in node.args)
        return "add" if ok and len(set(images)) == 1 else None  # two images of one shape, or an image and a number
    if node.op == "call_function" and node.target in _SCALINGS and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if node.target in (operator.mul, torch.mul) and not isinstance(a, fx.Node):
            a, b = b, a
        return "scale" if _image(prog, a) and _number(b) else None
    if node.op == "call_module" and node.args and _image(prog, node.args[0]) and len(node.args) == 1:
        m = prog.modules[node.target]
        if isinstance(m, nn.Identity) or isinstance(m, nn.Dropout) and not m.training:
            return "identity"
        if isinstance(m, nn.BatchNorm2d) and not m.training and m.running_mean is not None:
            return "norm"
    return None


def _image(prog: FrontierProgram, arg) -> bool:
    """Whether ``arg`` is a node that makes one (C, H, W) image per point."""
    return isinstance(arg, fx.Node) and len(prog.point_shapes.get(arg.name, ())) == 3


def _number(arg) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool)


class LocalState:
    """A chunk's values in ``Field`` form, advanced node by node from the input to each site in turn."""

    def __init__(self, prog: FrontierProgram, x: torch.Tensor, ids: torch.Tensor, n_paths: int):
        """``x``: the model's input at the chunk's first points (path order; the input is affine between them, and
        they are the first base points), ``ids``: their point ids."""
        self.prog, self.env, self.next, self.n_paths = prog, {}, 0, n_paths
        self.base_ids = ids
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        self.input = Field(x, empty, empty, x.new_zeros(0, x.shape[1]), n_paths)
        self.entries: list[int] = []  # values held at each site's unit inputs (base and extras)

    def run_to(self, k: int, pts: PointOrder) -> Field:
        """Advance to site ``k``; its unit inputs."""
        p = self.prog
        cut = p.sites[k]
        with torch.no_grad():  # no mode that every operation would go through: ``_conv`` calls the fast kernels
            for i in range(self.next, cut):
                node = p.nodes[i]
                self.env[node.name] = self._exec(node, pts)
                for name in p.free_after[i]:
                    if name != p.nodes[cut].args[0].name:
                        self.env.pop(name, None)
        self.next = cut
        z = self.env[p.nodes[cut].args[0].name]
        self.entries.append(z.numel())
        return z

    def set_site_output(self, k: int, z: Field, pts: PointOrder) -> None:
        """Site ``k``'s unit inputs at every point it needs (its own breakpoints added): its output from here on.
        Points its output holds at every position of their path join the base of every live value."""
        p = self.prog
        i = p.sites[k]
        node = p.nodes[i]
        lo, hi = p.clamps[i]
        clamp = (lambda v: v.clamp_min(lo)) if hi is None else (lambda v: v.clamp(lo, hi))
        out = z.like(clamp(z.base), clamp(z.val))
        self.env[node.name] = out
        if p._inplace(node, node.args, node.kwargs):  # the nodes after it read what the call wrote
            self.env[node.args[0].name] = out
        for name in p.free_after[i]:
            self.env.pop(name, None)
        self.next = i + 1
        if len(out.pid):
            held = torch.bincount(out.pid, minlength=pts.n)
            ids = torch.nonzero(held == out.area).flatten()
            if len(ids):
                grown = torch.cat([self.base_ids, ids])
                order = torch.argsort(pts.rank[grown])
                for name, v in list(self.env.items()):
                    if isinstance(v, Field):
                        self.env[name] = v.promoted(pts, ids, order)
                self.base_ids = grown[order]

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
            scale, shift = scale.detach().to(f.val.dtype), shift.detach().to(f.val.dtype)
            return f.like(f.base * scale.view(-1, 1, 1) + shift.view(-1, 1, 1), f.val * scale + shift)
        if kind == "scale":
            a, b = node.args
            f, c = (self.env[a.name], b) if isinstance(a, fx.Node) else (self.env[b.name], a)
            if node.target in (operator.truediv, torch.div):
                return f.like(f.base / c, f.val / c)
            return f.like(f.base * c, f.val * c)
        if kind == "add":
            a, b = (self.env[n.name] if isinstance(n, fx.Node) else n for n in node.args)
            sign = -1.0 if node.target in (operator.sub, torch.sub) else 1.0
            if not isinstance(a, Field) or not isinstance(b, Field):  # a constant: added everywhere
                if isinstance(a, Field):
                    return a.like(a.base + sign * b, a.val + sign * b)
                return b.like(a + sign * b.base, a + sign * b.val)
            return _add(a, b, sign, pts)
        raise ValueError(f"the local evaluator cannot run {node.format_node()[:70]}")


def _pad(f: Field, pad: tuple) -> Field:
    """Zero padding (``F.pad``'s order: left, right, top, bottom): the new positions hold zeros at every point."""
    left, right, top, bottom = pad
    c, h, w = f.shape
    h2, w2 = h + top + bottom, w + left + right
    path, s = f.pos // (h * w), f.pos % (h * w)
    return Field(F.pad(f.base, pad), path * (h2 * w2) + (s // w + top) * w2 + s % w + left, f.pid, f.val,
                 f.n_paths)


def _add(a: Field, b: Field, sign: float, pts: PointOrder) -> Field:
    base = a.base + sign * b.base
    if len(a.pos) == len(b.pos) and torch.equal(a.pos, b.pos) and torch.equal(a.pid, b.pid):
        return a.like(base, a.val + sign * b.val)
    pos, pid = pts.union([(a.pos, a.pid), (b.pos, b.pid)])
    return Field(base, pos, pid, a.read(pts, pos, pid) + sign * b.read(pts, pos, pid), a.n_paths)


def _conv(f: Field, pts: PointOrder, weight: torch.Tensor, bias, call: dict) -> Field:
    """A 2-D convolution (zero padding, no dilation): torch's own on the base; each output position's extras at the
    union of its receptive field's, reading each tap's position between its own points; a 1 x 1 convolution with
    stride 1 keeps the extras' lists."""
    c, h, w = f.shape
    co, cig, kh, kw = weight.shape
    (sh, sw), (ph, pw), groups = as_pair(call["stride"]), as_pair(call["padding"]), call["groups"]
    weight = weight.to(f.val.dtype)
    b = None if bias is None else bias.detach().to(f.val.dtype)
    base = _conv64.conv_call(F.conv2d, (f.base, weight, b, (sh, sw), (ph, pw), 1, groups), {}) \
        if f.base.device.type == "cpu" or f.base.device.type in _conv64.POINTWISE_AS_MATMUL \
        else F.conv2d(f.base, weight, b, (sh, sw), (ph, pw), 1, groups)
    ho, wo = base.shape[2], base.shape[3]
    dev = f.val.device
    if not len(f.pos):
        return Field(base, f.pos, f.pid, f.val.new_zeros(0, co), f.n_paths)
    if (kh, kw, sh, sw, ph, pw, groups) == (1, 1, 1, 1, 0, 0, 1):
        val = f.val @ weight.view(co, c).T
        return Field(base, f.pos, f.pid, val if b is None else val.add_(b), f.n_paths)
    # output positions: the union of the extras of the input positions their window reads
    paths = torch.arange(f.n_paths, device=dev)
    oh = torch.arange(ho, device=dev).repeat_interleave(wo)
    ow = torch.arange(wo, device=dev).repeat(ho)
    first = torch.searchsorted(f.pos, torch.arange(f.n_paths * h * w + 1, device=dev))  # each position's extras
    q_all, y_all = [], []
    for i in range(kh):
        for j in range(kw):
            ih, iw = oh * sh - ph + i, ow * sw - pw + j
            ok = torch.nonzero((ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)).flatten()
            q_all.append((paths.view(-1, 1) * (ho * wo) + ok).reshape(-1))
            y_all.append((paths.view(-1, 1) * (h * w) + (ih * w + iw)[ok]).reshape(-1))
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
    if b is not None:
        val += b
    return Field(base, pos, pid, val, f.n_paths)


def crossings(act, z: Field, pts: PointOrder, t_path: torch.Tensor):
    """A site's crossings along every position's list, placed on the path's points: ``Crossings`` whose segment is
    the index (in path order) of the point before it, ordered as ``crossings_along`` orders them over dense values
    (segment, t, kink, unit); and per crossing its position, channel and kink. Consecutive base points are scanned
    densely at the positions without extras; the others along their merged lists. ``t_path``: the points' t in
    path order."""
    area, dev = z.area, z.base.device
    has_extras = torch.zeros(z.n_paths * area, dtype=torch.bool, device=dev)
    has_extras[z.pos] = True
    base_path = pts.path[pts.base_ids]
    pairs = torch.nonzero(base_path[:-1] == base_path[1:]).flatten()
    cr = act.crossings(z.base[pairs], z.base[pairs + 1])
    k = pairs[cr.segment]
    pos = base_path[k] * area + cr.unit % area
    kept = torch.nonzero(~has_extras[pos]).flatten()
    parts = [(pts.base_ids[k[kept]], pts.base_ids[k[kept] + 1], pos[kept], cr.unit[kept] // area, cr.t[kept],
              cr.piece[kept], cr.before[kept])]
    if len(z.pos):  # positions with extras: their base points and extras, merged into one list each
        at = torch.unique(z.pos)
        per = torch.bincount(base_path, minlength=z.n_paths)  # base points per path
        start = torch.cumsum(per, 0) - per
        p_at = at // area
        n_at = per[p_at]
        which = torch.repeat_interleave(torch.arange(len(at), device=dev), n_at)
        row = start[p_at][which] + torch.arange(len(which), device=dev) - (torch.cumsum(n_at, 0) - n_at)[which]
        m_pos = torch.cat([at[which], z.pos])
        m_pid = torch.cat([pts.base_ids[row], z.pid])
        m_val = torch.cat([z.base_rows().index_select(0, row * area + at[which] % area), z.val])
        order = torch.argsort(pts.keys(m_pos, m_pid))
        m_pos, m_pid, m_val = m_pos[order], m_pid[order], m_val[order]
        same = torch.nonzero(m_pos[:-1] == m_pos[1:]).flatten()
        cm = act.crossings(m_val[same], m_val[same + 1])
        e = same[cm.segment]
        parts.append((m_pid[e], m_pid[e + 1], m_pos[e], cm.unit, cm.t, cm.piece, cm.before))
    id_l, id_r, pos, channel, s_loc, piece, before = (torch.cat(v) for v in zip(*parts))
    t_l, t_r = pts.t[id_l], pts.t[id_r]
    t_star = t_l + s_loc * (t_r - t_l)
    # the global segment holding each crossing: the last point at or before it between its list's two points, by a
    # bisection of all crossings at once (the two bracket it; points of other paths never lie between them)
    seg, hi = pts.rank[id_l], pts.rank[id_r]
    steps = int(hi.sub(seg).max()).bit_length() if len(seg) else 0
    for _ in range(steps):
        mid = (seg + hi) // 2
        right = (t_path[mid] <= t_star) & (mid > seg)
        seg, hi = torch.where(right, mid, seg), torch.where(right | (mid == seg), hi, mid)
    t0, t1 = t_path[seg], t_path[seg + 1]
    s = ((t_star - t0) / (t1 - t0)).clamp_(0.0, 1.0)
    unit = channel * area + pos % area
    kink = torch.where(piece > before, piece - 1, piece)
    order = torch.argsort(unit, stable=True)
    order = order[torch.argsort(kink[order], stable=True)]
    order = order[lexsort(seg[order], s[order])]
    return Crossings(seg[order], unit[order], s[order], piece[order], before[order]), pos[order], \
        channel[order], kink[order]


def add_breakpoints(act, z: Field, pts: PointOrder, pos: torch.Tensor, channel: torch.Tensor, kink: torch.Tensor,
                    point: torch.Tensor, on_kink: torch.Tensor) -> Field:
    """Site unit inputs ``z`` with each crossing's point (``point``: new, or the one it was snapped to) added to its
    position's list where the position does not hold it yet: interpolated between the points it holds on either
    side, the crossed unit exactly on its kink where ``on_kink``. ``pts`` knows the new points."""
    keys = pts.keys(pos, point)
    held = pts.is_base[point]
    if len(z.pos):
        zk = pts.keys(z.pos, z.pid)
        i = torch.searchsorted(zk, keys).clamp_(max=len(zk) - 1)
        held |= zk[i] == keys
    new = torch.nonzero(~held).flatten()
    if not len(new):
        return z
    pos, channel, kink, point, on_kink, keys = (v[new] for v in (pos, channel, kink, point, on_kink, keys))
    uniq, inv = torch.unique(keys, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.long, device=keys.device).scatter_reduce_(
        0, inv, torch.arange(len(keys), device=keys.device), "amin")
    p0, q0 = pos[first], point[first]
    values = z.read(pts, p0, q0)
    kinks = torch.tensor(act.kinks, dtype=values.dtype, device=values.device)
    at = torch.nonzero(on_kink).flatten()
    values[inv[at], channel[at]] = kinks[kink[at]]
    all_pos, all_pid = torch.cat([z.pos, p0]), torch.cat([z.pid, q0])
    order = torch.argsort(pts.keys(all_pos, all_pid))
    return Field(z.base, all_pos[order], all_pid[order], torch.cat([z.val, values])[order], z.n_paths)


def dense(z: Field, pts: PointOrder, ids_path: torch.Tensor) -> torch.Tensor:
    """A field's values at every point (path order) and unit: (points, C * H * W), as a dense evaluator holds them."""
    return z.at_points(pts, ids_path).reshape(len(ids_path), -1)
