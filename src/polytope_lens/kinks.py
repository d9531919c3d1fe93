"""The kink registry: one description of every nonlinearity polytope-lens understands.

A nonlinearity cuts its input into linear *pieces*; the places where the piece changes are its *kinks*.
Everything else in polytope-lens asks this module the same two questions:

* ``pieces(z)``: which piece is each unit in? (spline codes, local complexity)
* ``crossings(z0, z1)``: if the unit inputs move affinely from ``z0`` (t=0) to ``z1`` (t=1), at which t does a unit
  change piece, and which piece does it enter? (1-D paths, 2-D slice edges, scaling rays)

Two families cover the registry:

``ScalarKinks``
    Elementwise units with kinks at fixed values (ReLU: 0; ReLU6/Hardtanh: two values). The piece is the number of
    kinks strictly below ``z``, so ``z == kink`` belongs to the lower piece (ReLU(0) is "off"). Smooth activations
    (GELU, SiLU, Softplus, sigmoid, tanh, SoLU) are scalar-kink entries with ``exact=False``: their kink is a
    *threshold* (0 by default) and they also give a soft code in (0, 1).
``WindowMax``
    Max pooling: one unit per output element, whose piece is the argmax inside its window (first maximum on ties,
    as ``torch.argmax``). A kink is where two window entries tie.

An entry is resolved from the torch call that applies it (``resolve_call``), so that capture finds ``F.relu`` inside
any module; ``UNSUPPORTED_CALLS`` lists nonlinearities we know but cannot describe, which are errors, never skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from ._kink_scan import _on_device, piece_bytes, scan, triton_ready
from .errors import InvalidInputError, UnsupportedActivationError

__all__ = [
    "Activation",
    "ScalarKinks",
    "WindowMax",
    "Crossings",
    "REGISTRY",
    "get_activation",
    "resolve_call",
    "UNSUPPORTED_CALLS",
]


@dataclass(frozen=True)
class Crossings:
    """Where units change piece along affine segments.

    Attributes
    ----------
    segment : LongTensor (n,)
        Index of the segment (row of ``z0``/``z1``) the crossing lies on.
    unit : LongTensor (n,)
        Flat unit index within the segment's unit tensor.
    t : Tensor (n,)
        Position in [0, 1] along the segment (same dtype as the inputs).
    piece : LongTensor (n,)
        Piece the unit enters at ``t`` (moving from t=0 towards t=1).
    before : LongTensor (n,) or None
        Piece the unit leaves there (the piece it was on just before ``t``), where the caller keeps it.
    """

    segment: torch.Tensor
    unit: torch.Tensor
    t: torch.Tensor
    piece: torch.Tensor
    before: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.t.numel())

    @staticmethod
    def cat(parts: list["Crossings"]) -> "Crossings":
        before = torch.cat([p.before for p in parts]) if parts and all(p.before is not None for p in parts) else None
        return Crossings(*(torch.cat([getattr(p, f) for p in parts]) for f in ("segment", "unit", "t", "piece")),
                         before)


class Activation:
    """A nonlinearity described by its pieces and kinks. Subclasses fill in the three methods.

    Attributes
    ----------
    name : str
        Canonical registry name (``"relu"``, ``"hardtanh"``, ``"max_pool2d"`` ...).
    n_pieces : int
        Number of linear pieces per unit (for smooth entries: pieces of the threshold code).
    exact : bool
        True when the function really is piecewise linear with these pieces; False for threshold codes of smooth
        activations, whose every derived count is approximate.
    ordered : bool
        True when pieces are ordered along one axis (scalar kinks): codes then use a thermometer encoding, so the
        Hamming distance between two codes counts kinks between them. False for categorical pieces (argmax).
    elementwise : bool
        True when each unit's piece depends on its own input only (so units can be selected before coding).
    """

    name: str
    n_pieces: int
    exact: bool
    ordered: bool

    @property
    def bits_per_unit(self) -> int:
        """Bits in a packed code: n_pieces - 1 (thermometer) when ordered, else ceil(log2(n_pieces))."""
        if self.ordered:
            return self.n_pieces - 1
        return max(1, math.ceil(math.log2(self.n_pieces)))

    elementwise: bool = True

    def pieces(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Piece index of every unit (int64), shaped like the activation's output."""
        raise NotImplementedError

    def bits_from_pieces(self, pieces: torch.Tensor) -> torch.Tensor:
        """Code bits (..., bits_per_unit), bool: thermometer when ordered, binary piece index otherwise."""
        j = torch.arange(self.bits_per_unit, device=pieces.device)
        if self.ordered:
            return pieces[..., None] > j
        return ((pieces[..., None] >> j) & 1).bool()

    def crossings(self, z0: torch.Tensor, z1: torch.Tensor, tol: float = 0.0) -> Crossings:  # pragma: no cover
        """Every t in [0, 1] where a unit changes piece while its input moves affinely from z0 to z1.

        ``z0`` and ``z1`` are shaped ``(segments, *unit_input_shape)``. A crossing is reported wherever the piece
        that ``pieces`` assigns changes: at t=0 only when ``z0`` sits exactly on a kink and the unit leaves it, at
        t=1 when ``z1`` lands exactly on one. Crossings come sorted by (segment, t). ``tol``: for max pooling,
        window entries within ``tol * max(floor, |maximum|)`` of the maximum count as equal to it (rounding of entries
        that are equal in exact arithmetic; floor: ``tie_floor``, min(1, the row's largest |entry|)); scalar kinks
        ignore it.
        """
        raise NotImplementedError

    def crossings_along(self, z: torch.Tensor, tol: float = 0.0, order: torch.Tensor | None = None) -> Crossings:
        """``crossings(z[:-1], z[1:], tol)``: segment i runs from row i to row i + 1 (a polyline of points); with
        ``order``, from row ``order[i]`` to row ``order[i + 1]`` (rows kept in the order the points were made)."""
        if order is not None:
            z = z.index_select(0, order)
        return self.crossings(z[:-1], z[1:], tol)

    def soft(self, z: torch.Tensor) -> torch.Tensor | None:
        """Soft code in [0, 1] per unit for smooth activations (0 or 1 only where the gate rounds to it); None for
        piecewise-linear ones."""
        return None

    def on_kink(self, z: torch.Tensor) -> torch.Tensor | None:
        """Per unit, whether ``z`` lies exactly on a kink (its piece there is a tie-break, not a side); None where
        the activation does not say."""
        return None

    def describe(self) -> dict:
        """JSON-safe description, stored beside codes."""
        return {"name": self.name, "n_pieces": self.n_pieces, "exact": self.exact, "ordered": self.ordered}


@dataclass(frozen=True)
class ScalarKinks(Activation):
    """Elementwise activation whose pieces are separated by fixed kink values (sorted, ascending)."""

    name: str
    kinks: tuple[float, ...] = (0.0,)
    exact: bool = True
    soft_fn: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    ordered: bool = True

    @property
    def n_pieces(self) -> int:
        return len(self.kinks) + 1

    def pieces(self, z: torch.Tensor) -> torch.Tensor:
        piece = torch.zeros(z.shape, dtype=torch.int64, device=z.device)
        for k in self.kinks:
            piece += z > k
        return piece

    def crossings(self, z0: torch.Tensor, z1: torch.Tensor, tol: float = 0.0) -> Crossings:
        n_seg = z0.shape[0]
        a, b = z0.reshape(n_seg, math.prod(z0.shape[1:])), z1.reshape(n_seg, math.prod(z1.shape[1:]))
        return self._crossings(a, b, [(a > k, b > k) for k in self.kinks])

    def crossings_along(self, z: torch.Tensor, tol: float = 0.0, order: torch.Tensor | None = None) -> Crossings:
        zf = z.reshape(len(z), -1)
        if len(self.kinks) > 1 and triton_ready(zf) and zf.is_floating_point():  # one kernel, one read of each input
            rows = torch.arange(len(zf), device=zf.device) if order is None else order
            changes, _ = scan(zf, rows, torch.zeros_like(rows), self.kinks)
            return self._changed_pieces(zf, *torch.nonzero(changes, as_tuple=True), order)
        if len(self.kinks) == 1 and order is None:  # each point's side of the kink compared once, not per segment end
            up = zf > self.kinks[0]
            return self._crossings(zf[:-1], zf[1:], [(up[:-1], up[1:])])
        piece = piece_bytes(zf, self.kinks)
        if order is not None:  # the points' pieces in path order: bytes moved, not the inputs
            piece = piece.index_select(0, order)
        return self._changed_pieces(zf, *torch.nonzero(piece[:-1] != piece[1:], as_tuple=True), order)

    def _changed_pieces(self, zf: torch.Tensor, seg: torch.Tensor, unit: torch.Tensor,
                        order: torch.Tensor | None = None) -> Crossings:
        """The crossings along the rows of ``zf`` (rows ``order`` in that order) of the units ``unit`` whose piece
        differs between points ``seg`` and ``seg + 1`` (pairs in row-major order): one per kink between the two
        pieces, in segment order and, within a segment, in (t, kink, unit) order, as ``crossings`` orders its
        kink-by-kink lists."""
        ra, rb = (seg, seg + 1) if order is None else (order[seg], order[seg + 1])
        za, zb = zf[ra, unit], zf[rb, unit]
        pa, pb = self.pieces(za), self.pieces(zb)
        low, n_kinks = torch.minimum(pa, pb), (pa - pb).abs()
        if len(self.kinks) > 1 and len(seg):  # a pair two or more pieces apart crosses each kink between them
            pair = torch.repeat_interleave(torch.arange(len(seg), device=zf.device), n_kinks)
            first = torch.cumsum(n_kinks, 0) - n_kinks
            j = low[pair] + torch.arange(len(pair), device=zf.device) - first[pair]
            seg, unit, za, zb = seg[pair], unit[pair], za[pair], zb[pair]
        else:
            j = low
        return sort_crossings(self.crossings_of(j, seg, unit, za, zb), in_segment_order=True,
                              tie_key=j if len(self.kinks) > 1 else None)

    def _crossings(self, a: torch.Tensor, b: torch.Tensor, sides: list) -> Crossings:
        parts = []
        for j, (up0, up1) in enumerate(sides):
            seg, unit = torch.nonzero(up0 != up1, as_tuple=True)
            parts.append(self.crossings_of(j, seg, unit, a[seg, unit], b[seg, unit]))
        # one kink: nonzero lists (segment, unit) pairs row by row, already in segment order
        return sort_crossings(Crossings.cat(parts), in_segment_order=len(parts) == 1)

    def crossings_of(self, j: int | torch.Tensor, seg: torch.Tensor, unit: torch.Tensor, za: torch.Tensor,
                     zb: torch.Tensor) -> Crossings:
        """The crossings of kink ``j`` (one for all, or one per crossing) by units whose inputs ``za`` (t = 0) and
        ``zb`` (t = 1) lie on different sides of it (not sorted): where the line between them meets the kink, and
        the pieces left and entered there."""
        k = self.kinks[j] if isinstance(j, int) else _on_device(
            self.kinks, za.dtype if za.is_floating_point() else torch.float64, za.device)[j]
        t = ((k - za) / (zb - za)).clamp_(0.0, 1.0)
        # moving up across kink j enters piece j + 1 from piece j; moving down enters piece j from piece j + 1
        up = zb > k
        return Crossings(seg, unit, t, torch.where(up, j + 1, j), torch.where(up, j, j + 1))

    def snapped(self, z: torch.Tensor, ulps: float = 1e3) -> torch.Tensor | None:
        """``z`` with every input within ``ulps`` units of rounding of a kink (relative to the largest input of its
        row, at least 1) put exactly on it, or None when none is off a kink by rounding alone. A point at which a
        unit crosses a kink holds it exactly there in exact arithmetic; a forward pass computes it to rounding."""
        zf = z.reshape(len(z), -1)
        atol = ulps * torch.finfo(z.dtype).eps * zf.abs().amax(1, keepdim=True).clamp_min(1.0)
        near = None
        for k in self.kinks:
            off = (zf - k).abs()
            hit = (off <= atol) & (off > 0)
            if bool(hit.any()):
                near = zf.clone() if near is None else near
                near[hit] = k
        return None if near is None else near.reshape(z.shape)

    def soft(self, z: torch.Tensor) -> torch.Tensor | None:
        return None if self.soft_fn is None else self.soft_fn(z)

    def on_kink(self, z: torch.Tensor) -> torch.Tensor | None:
        on = z == self.kinks[0]
        for k in self.kinks[1:]:
            on |= z == k
        return on

    def describe(self) -> dict:
        return {**super().describe(), "kinks": list(self.kinks)}


@dataclass(frozen=True)
class WindowMax(Activation):
    """Max pooling over (kernel_h, kernel_w) windows; the piece of an output unit is the argmax in its window."""

    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    exact: bool = True
    ordered: bool = False
    elementwise: bool = False

    @property
    def n_pieces(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def _index_dtype(self) -> torch.dtype:
        """The narrowest type that holds a window index, for pieces that are only compared."""
        return torch.uint8 if self.n_pieces <= 256 else torch.int64

    @property
    def _dims(self) -> int:
        """Spatial dimensions of the pooling: 1 for max_pool1d, else 2."""
        return 1 if self.name == "max_pool1d" else 2

    def _as_images(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (batch, channels, h, w): max_pool1d's (N, C, L) has height 1; a layout without channels
        ((N, L) for max_pool1d, (N, H, W) for max_pool2d, which torch pools as one unbatched example) has one."""
        dims = self._dims
        if x.dim() == dims + 1:
            x = x.unsqueeze(1)
        if x.dim() != 4 - (dims == 1):
            raise InvalidInputError(f"{self.name} needs a (batch, channels, {'L' if dims == 1 else 'H, W'}) input; "
                                    f"got shape {tuple(x.shape)}.")
        return x.unsqueeze(2) if dims == 1 else x

    def _as_given(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Undo ``_as_images`` on a result laid out (batch, channels, out_h, out_w, ...)."""
        dims = self._dims
        if dims == 1:
            out = out.squeeze(2)
        return out.squeeze(1) if x.dim() == dims + 1 else out

    def _window_view(self, x: torch.Tensor) -> torch.Tensor:
        """Every window as a strided view, (batch, channels, out_h, out_w, kernel_h, kernel_w), -inf where a window
        hangs over padding (the padded input is the only copy)."""
        x = self._as_images(x)
        h, w = x.shape[2:]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        out_h, out_w = _pool_out(h, kh, sh, ph, dh, self.ceil_mode), _pool_out(w, kw, sw, pw, dw, self.ceil_mode)
        extra_h = max(0, (out_h - 1) * sh + dh * (kh - 1) + 1 - h - 2 * ph)
        extra_w = max(0, (out_w - 1) * sw + dw * (kw - 1) + 1 - w - 2 * pw)
        pads = (pw, pw + extra_w, ph, ph + extra_h)
        xp = F.pad(x, pads, value=-math.inf) if any(pads) else x
        # strided views (no im2col): (n, c, rows, cols, span_h, span_w), then every dilation-th entry
        win = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        return win[:, :, :out_h, :out_w]

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """Window entries, (batch, channels, out_h, out_w, window) with -inf where the window hangs over padding."""
        win = self._window_view(x)
        win = win.reshape(*win.shape[:4], self.n_pieces)
        return self._as_given(win, x)

    def _entries(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The windows' entries in window order, each a strided view (batch, channels, out_h, out_w)."""
        win = self._window_view(x)
        return [win[..., i, j] for i in range(self.kernel[0]) for j in range(self.kernel[1])]

    def maxima(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled output, ``F.max_pool2d``'s values (``F.max_pool1d``'s for (N, C, L) inputs), to the bit: the
        maximum over the windows' strided views (on a CPU in float64 about 4x faster than ATen's pooling, which
        also finds the indices)."""
        out = _max_of(self._entries(x))
        return self._as_given(out, x)

    def first_maxima(self, x: torch.Tensor, tol: float = 0.0, dtype: torch.dtype = torch.int64,
                     floors_out: torch.Tensor | None = None) -> torch.Tensor:
        """``first_max(self.windows(x), tol, tie_floor(x))`` (the piece of every output unit; ``pieces`` when ``tol``
        is 0; with ``floors_out`` ((len(x), 1)), ``tie_floor(x)`` is written there too, block by block while in cache),
        computed on the windows' strided views, a few MiB of ``x`` at a time on a CPU (in cache), instead of gathering
        every window entry into one array first (a slow, strided copy of kernel-size times the output). The first
        maximum is the number of leading entries below the threshold, summed as bytes (``dtype=torch.uint8`` keeps
        it so: half the time of int64 indices, for callers that only compare pieces)."""
        step = len(x)
        if x.device.type == "cpu":
            step = _FIRST_MAX_BYTES // max(1, x[:1].numel() * x.element_size())
        step = max(step, 1)
        out = None
        for a in range(0, len(x), step):
            entries = self._entries(x[a:a + step])
            top = _max_of(entries)
            if tol > 0:
                floor = tie_floor(x[a:a + step])
                if floors_out is not None:
                    floors_out[a:a + step] = floor
                low = _max_threshold(top, tol, floor)
            else:
                low = top
            if out is None:
                out = torch.empty((len(x), *top.shape[1:]), dtype=dtype, device=x.device)
            first = out[a:a + step]
            below = torch.zeros(top.shape, dtype=torch.bool, device=x.device) if len(entries) == 1 else (
                torch.lt(entries[0], low))
            first.copy_(below)  # the last entry is never tested: a window whose others are all below has it at most
            for e in entries[1:-1]:
                below.logical_and_(torch.lt(e, low))
                first.add_(below)
        if out is None:  # no rows
            out = torch.empty((0, *self._window_view(x).shape[1:4]), dtype=dtype, device=x.device)
        return self._as_given(out, x)

    def pieces(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_maxima(z)

    def on_kink(self, z: torch.Tensor) -> torch.Tensor | None:
        """Windows whose maximum is attained by two entries or more (padding never ties: it is -inf)."""
        entries = self._entries(z)
        top = _max_of(entries)
        count = sum((e == top).to(torch.uint8) for e in entries)
        tied = count > 1
        return self._as_given(tied, z)

    def window_index(self, shape: tuple[int, ...], device=None) -> torch.Tensor:
        """Flat input index of every window entry, (units, n_pieces); -1 where the window hangs over padding."""
        idx = torch.arange(math.prod(shape), dtype=torch.float64, device=device).reshape(1, *shape)
        w = self.windows(idx)
        return torch.where(torch.isfinite(w), w, -1.0).long().reshape(-1, self.n_pieces)

    def unit_windows(self, z: torch.Tensor, rows: torch.Tensor, unit: torch.Tensor,
                     index: torch.Tensor | None = None) -> torch.Tensor:
        """Window entries ``(n, n_pieces)`` of output unit ``unit[i]`` in example ``rows[i]`` of ``z`` (-inf on
        padding), without unfolding every window of every example (``index``: ``window_index`` of ``z``'s units)."""
        idx = (self.window_index(tuple(z.shape[1:]), z.device) if index is None else index)[unit]
        vals = z.reshape(len(z), -1)[rows[:, None], idx.clamp(min=0)]
        return torch.where(idx >= 0, vals, torch.full_like(vals, -math.inf))

    def crossings(self, z0: torch.Tensor, z1: torch.Tensor, tol: float = 0.0) -> Crossings:
        n = len(z0)
        f0, f1 = (z0.new_empty((n, 1)), z1.new_empty((n, 1))) if tol > 0 else (None, None)
        first, last = (self.first_maxima(z, tol, self._index_dtype, f).reshape(n, -1) for z, f in ((z0, f0), (z1, f1)))
        return self._changes_between(z0, z1, first, last, tol, floors=(f0, f1) if tol > 0 else None)

    def crossings_along(self, z: torch.Tensor, tol: float = 0.0, order: torch.Tensor | None = None) -> Crossings:
        f = z.new_empty((len(z), 1)) if tol > 0 else None  # ``tie_floor(z)``, filled by ``first_maxima``
        top = self.first_maxima(z, tol, self._index_dtype, f).reshape(len(z), -1)  # once per point, not per end
        if order is None:
            return self._changes_between(z[:-1], z[1:], top[:-1], top[1:], tol,
                                         floors=None if f is None else (f[:-1], f[1:]))
        top = top.index_select(0, order)  # path order: the window indices moved, not the entries
        floors = None if f is None else (f, f)  # indexed by the rows of the segments' ends
        return self._changes_between(z, z, top[:-1], top[1:], tol, (order[:-1], order[1:]), floors)

    def _changes_between(self, z0: torch.Tensor, z1: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                         tol: float, rows: tuple | None = None, floors: tuple | None = None) -> Crossings:
        """``_changes`` of the windows whose first maxima differ between the segments' ends ``z0`` and ``z1``
        (``first``, ``last``: (segments, units)), their entries gathered for those windows only; with ``rows``,
        segment i's ends are rows ``rows[0][i]`` of ``z0`` and ``rows[1][i]`` of ``z1``; ``floors``: ``tie_floor``
        of ``z0``'s and ``z1``'s rows."""
        seg, unit = torch.nonzero(first != last, as_tuple=True)
        index = self.window_index(tuple(z0.shape[1:]), z0.device)
        r0, r1 = (seg, seg) if rows is None else (rows[0][seg], rows[1][seg])
        a, b = self.unit_windows(z0, r0, unit, index), self.unit_windows(z1, r1, unit, index)
        fa, fb = (1.0, 1.0) if floors is None else (floors[0][r0], floors[1][r1])
        return self._changes(seg, unit, a, b, first[seg, unit].long(), last[seg, unit].long(), tol, fa, fb)

    def _changes(self, seg: torch.Tensor, unit: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cur: torch.Tensor,
                 end_piece: torch.Tensor, tol: float, floor_a=1.0, floor_b=1.0) -> Crossings:
        """Changes of the maximal entry of the windows ``(seg, unit)`` whose entries move affinely from ``a`` to ``b``
        (both (n, K), -inf on padding) along their segment, and whose first maxima (``first_max``) at its ends
        differ: ``cur`` at t = 0, ``end_piece`` at t = 1 (ties within ``tol * max(floor, |maximum|)``; ``floor_a``,
        ``floor_b``: the ends' ``tie_floor``, a number or (n, 1)).

        The upper envelope of K lines is convex: each change enters a strictly steeper line, so a window whose
        maximum is the same entry at both ends (the first maximum, as ``pieces`` gives) changes nowhere in between;
        only the others are followed, through at most K - 1 changes. Entries within the tolerance of the maximum at
        an end are set to it there, so rounding between entries that are equal in exact arithmetic (a uniform
        image region) is not read as a change."""
        a, b = _snap_to_max(a, tol, floor_a), _snap_to_max(b, tol, floor_b)
        if tol > 0:
            floor = torch.maximum(torch.as_tensor(floor_a, dtype=a.dtype, device=a.device),
                                  torch.as_tensor(floor_b, dtype=a.dtype, device=a.device)).reshape(-1)  # (n,), (1,)
        if tol > 0 and len(seg):
            # entries within the tolerance of each other at both ends are one line over the segment (the lowest
            # index): rounding between them must not make the envelope switch back and forth in the middle
            k = self.n_pieces
            scale = tol * torch.maximum(torch.maximum(a.amax(-1), b.amax(-1)).abs(), floor)[:, None, None]
            same = ((a[:, :, None] - a[:, None, :]).abs() <= scale) & ((b[:, :, None] - b[:, None, :]).abs() <= scale)
            dup = (same & torch.ones(k, k, dtype=torch.bool, device=a.device).tril(-1)).any(-1)
            a, b = a.masked_fill(dup, -math.inf), b.masked_fill(dup, -math.inf)
            cur, end_piece = a.argmax(dim=-1), b.argmax(dim=-1)
        finite = torch.isfinite(a)
        slope = torch.where(finite, b - a, torch.zeros_like(a))
        t_now = torch.zeros(len(seg), dtype=a.dtype, device=a.device)
        parts = []
        for _ in range(self.n_pieces - 1):
            v_cur = a.gather(-1, cur[:, None])  # current line, value at t=0 and slope
            s_cur = slope.gather(-1, cur[:, None])
            steeper = (slope > s_cur) & finite
            t_meet = (v_cur - a) / (slope - s_cur)
            # lines tied with the current one at t=1 (exactly, after the snap) meet it there, whatever the rounding
            # of the division (else a change landing on t=1 could be lost just past it)
            t_meet = torch.where(b == b.gather(-1, cur[:, None]), torch.ones_like(t_meet), t_meet)
            # a line overtakes where it meets the current one after t_now (ties at t_now: steeper line wins now)
            t_meet = torch.where(steeper & (t_meet >= t_now[:, None]), t_meet, torch.full_like(t_meet, math.inf))
            t_next = t_meet.min(dim=-1).values
            # among lines meeting the current one at the same t, the steepest is entered (lines through one point,
            # e.g. entries that are all 0 there: the envelope goes straight to the steepest, and the others touch it
            # only at that point); "the same t" is within the value tolerance there, not the rounding of t_meet
            at_t = t_meet == t_next[:, None]
            if tol > 0:
                tn = torch.where(torch.isfinite(t_next), t_next, torch.zeros_like(t_next))[:, None]
                v_now = v_cur + s_cur * tn
                near = (a + slope * tn) >= v_now - tol * torch.maximum(v_now.abs(), floor[:, None])
                at_t |= torch.isfinite(t_meet) & near
            nxt = torch.where(at_t, slope, torch.full_like(slope, -math.inf)).argmax(dim=-1)
            # a change that lands on t=1 (within rounding) enters the piece ``pieces`` gives at t=1 (first maximum),
            # so that consecutive segments agree on the piece at their shared end and nothing is counted twice
            at_end = (t_next >= 1.0 - 1e-12) & (t_next <= 1.0)
            t_next = torch.where(at_end, torch.ones_like(t_next), t_next)
            nxt = torch.where(at_end, end_piece, nxt)
            moving = (t_next <= 1.0) & (nxt != cur)
            if not bool(moving.any()):
                break
            r = torch.nonzero(moving).flatten()
            parts.append(Crossings(seg[r], unit[r], t_next[r], nxt[r], cur[r]))
            cur = torch.where(moving, nxt, cur)
            t_now = torch.where(moving, t_next, t_now)
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64, device=a.device)
            return Crossings(empty, empty, torch.zeros(0, dtype=a.dtype, device=a.device), empty, empty)
        return sort_crossings(Crossings.cat(parts))

    def describe(self) -> dict:
        return {**super().describe(), "kernel": list(self.kernel), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation), "ceil_mode": self.ceil_mode}


def argmax_changes(w0: torch.Tensor, w1: torch.Tensor, tol: float = 0.0) -> Crossings:
    """Where the first maximum of each row of K scores changes while they move affinely from ``w0`` (t = 0) to
    ``w1`` (t = 1), both (n, K): max pooling's rule (``WindowMax``) applied to any K scores, e.g. a classifier's
    top class along a path region where its logits are affine. Crossings' ``segment`` is the row, ``unit`` 0,
    ``piece`` the entered index."""
    k = w0.shape[-1]
    f0, f1 = tie_floor(w0), tie_floor(w1)
    first, last = first_max(w0, tol, f0), first_max(w1, tol, f1)
    seg = torch.nonzero(first != last).flatten()
    return WindowMax("argmax", kernel=(1, k), stride=(1, k))._changes(seg, torch.zeros_like(seg), w0[seg], w1[seg],
                                                                       first[seg], last[seg], tol, f0[seg], f1[seg])


def _max_of(entries: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise maximum of same-shaped tensors, as a new contiguous tensor."""
    top = entries[0].clone(memory_format=torch.contiguous_format)
    for e in entries[1:]:
        torch.maximum(top, e, out=top)
    return top


def tie_floor(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` (its first dimension), ``min(1, max |entry|)``: the floor of
    max pooling's tie band ``tol * max(floor, |maximum|)``, shape (rows, 1). Rounding of a point's entries scales with
    the point's own values, so a tie band of at most ``tol`` in absolute terms, not below the point's scale, keeps
    max pooling's pieces scale-invariant where its input is scaled towards 0 (a ray from a tiny alpha had every
    window tied, then "changed" at t = 0); entries that are all exactly 0 tie only exactly."""
    n = len(x)
    flat = x.reshape(n, -1)
    if flat.shape[1] == 0:
        return flat.new_ones((n, 1))
    # amax and amin: a pass each, together 13x faster than torch.aminmax on a CPU here
    return torch.maximum(flat.amax(1), flat.amin(1).neg_()).clamp_max_(1.0)[:, None]


def _floor_like(floor, top: torch.Tensor):
    """``floor`` (a number, or one value per row) broadcast against ``top`` (rows, ...)."""
    if isinstance(floor, torch.Tensor):
        return floor.reshape(len(floor), *[1] * (top.dim() - 1)).to(top.dtype)
    return floor


def _max_threshold(top: torch.Tensor, tol: float, floor=1.0) -> torch.Tensor:
    """``top - tol * max(floor, |top|)``: entries at or above it count as a window's (or row's) maximum (``floor``: a
    number or ``tie_floor``'s value per row). In place on a new array: one temporary instead of four (each a fresh,
    page-faulted array when big)."""
    return top.abs().clamp_min_(_floor_like(floor, top)).mul_(-tol).add_(top)


def _near_max(w: torch.Tensor, tol: float, floor=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    top = w.amax(dim=-1, keepdim=True)
    return top, w >= _max_threshold(top, tol, floor)


def first_max(w: torch.Tensor, tol: float, floor=1.0) -> torch.Tensor:
    """Index of the first window entry within ``tol * max(floor, |maximum|)`` of the maximum (the first maximum, as
    ``torch.argmax`` gives, when ``tol`` is 0). ``floor``: a number, or one value per row of ``w`` (``tie_floor``)."""
    if tol <= 0:
        return w.argmax(dim=-1)
    return _near_max(w, tol, floor)[1].view(torch.uint8).argmax(dim=-1)  # a view: bool and uint8 share their bytes


def _snap_to_max(w: torch.Tensor, tol: float, floor=1.0) -> torch.Tensor:
    """Entries within ``tol * max(floor, |maximum|)`` of their window's maximum set to it (a tie at the maximum)."""
    if tol <= 0:
        return w
    top, near = _near_max(w, tol, floor)
    return torch.where(near, top, w)


_FIRST_MAX_BYTES = 8 << 20  # input rows per block of ``WindowMax.first_maxima`` (2 cores: 2.5x faster than all rows)


def _pool_out(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def lexsort(major: torch.Tensor, minor: torch.Tensor) -> torch.Tensor:
    """Order sorting by ``major``, then ``minor`` (both 1-D): two stable sorts, since a combined key would lose a
    float minor key's precision."""
    order = torch.argsort(minor, stable=True)
    return order[torch.argsort(major[order], stable=True)]


def counts_below(index: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.bincount(index, minlength=n)`` for indices known to lie in [0, n): the same counts without the two
    device-to-host reads (of the minimum and maximum) with which CUDA's bincount sizes its output, each a wait for
    the GPU to finish everything queued before it."""
    return torch.zeros(n, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


def sort_crossings(c: Crossings, in_segment_order: bool = False, tie_key: torch.Tensor | None = None) -> Crossings:
    """``c`` in lexicographic (segment, t) order, a stable sort. Crossings that already come in segment order (one
    kink; checked unless the caller says so) need only the segments with several crossings sorted, which along a
    refined path are few; ``tie_key`` (with ``in_segment_order``) orders crossings there at equal (segment, t)
    before their order in ``c`` does."""
    if len(c) < 2:
        return c
    seg = c.segment
    if in_segment_order or bool((seg[1:] >= seg[:-1]).all()):
        dup = seg[1:] == seg[:-1]
        shared = torch.zeros(len(seg), dtype=torch.bool, device=seg.device)  # a segment with several crossings
        shared[1:] |= dup
        shared[:-1] |= dup
        rows = torch.nonzero(shared).flatten()
        if not len(rows):
            return c
        order = torch.arange(len(seg), device=seg.device)
        keyed = rows if tie_key is None or not in_segment_order else rows[torch.argsort(tie_key[rows], stable=True)]
        order[rows] = keyed[lexsort(seg[keyed], c.t[keyed])]
    else:
        order = lexsort(seg, c.t)
    return Crossings(seg[order], c.unit[order], c.t[order], c.piece[order],
                     None if c.before is None else c.before[order])


# --------------------------------------------------------------------------------------------- soft codes
# Each gate in a form without cancellation: 0.5 * (1 + erf(z / sqrt 2)) lost every digit below 1 for z < 0 (float32:
# 2.98e-8 for Phi(-5.5) = 1.9e-8, exactly 0 from z = -6), and (tanh(z) + 1) / 2 the same way.
def _gelu_gate(z):
    return 0.5 * torch.special.erfc(-z / math.sqrt(2.0))  # Phi(z); torch.special.ndtr cancels too (0 at -6)


def _gelu_tanh_gate(z):
    return torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3))  # (1 + tanh(u)) / 2 = sigmoid(2u)


def _tanh_gate(z):
    return torch.sigmoid(2.0 * z)  # (tanh(z) + 1) / 2


def _erf_gate(z):
    return 0.5 * torch.special.erfc(-z)  # (1 + erf(z)) / 2


def _softplus_gate(z, beta: float = 1.0):
    return torch.sigmoid(beta * z)


def _solu_gate(z):
    return torch.softmax(z, dim=-1)


REGISTRY: dict[str, Activation] = {
    a.name: a
    for a in (
        ScalarKinks("relu"),
        ScalarKinks("leaky_relu"),
        ScalarKinks("prelu"),
        ScalarKinks("abs"),
        ScalarKinks("relu6", kinks=(0.0, 6.0)),
        ScalarKinks("hardtanh", kinks=(-1.0, 1.0)),
        ScalarKinks("gelu", exact=False, soft_fn=_gelu_gate),
        ScalarKinks("gelu_tanh", exact=False, soft_fn=_gelu_tanh_gate),
        ScalarKinks("silu", exact=False, soft_fn=torch.sigmoid),
        ScalarKinks("softplus", exact=False, soft_fn=torch.sigmoid),
        ScalarKinks("sigmoid", exact=False, soft_fn=torch.sigmoid),
        ScalarKinks("tanh", exact=False, soft_fn=_tanh_gate),
        ScalarKinks("erf", exact=False, soft_fn=_erf_gate),
        ScalarKinks("erfc", exact=False, soft_fn=_erf_gate),
        ScalarKinks("ndtr", exact=False, soft_fn=_gelu_gate),
        ScalarKinks("log_ndtr", exact=False, soft_fn=_gelu_gate),
        ScalarKinks("solu", exact=False, soft_fn=_solu_gate),
        WindowMax("max_pool2d", kernel=(2, 2), stride=(2, 2)),
    )
}


def get_activation(name: str, /, **params) -> Activation:
    """Registry entry by name, e.g. ``get_activation("hardtanh", kinks=(0, 6))`` or ``get_activation("relu")``.

    Raises
    ------
    UnsupportedActivationError
        If ``name`` is not registered; the message lists the registered names.
    """
    try:
        base = REGISTRY[name]
    except KeyError:
        raise UnsupportedActivationError(
            f"Unknown activation {name!r}; registered activations are: {', '.join(sorted(REGISTRY))}."
        ) from None
    if not params:
        return base
    return type(base)(**{**_fields(base), **params})


def _fields(a: Activation) -> dict:
    return {f: getattr(a, f) for f in a.__dataclass_fields__}  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ call resolution
def _arg(args, kwargs, i, name, default):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def as_pair(v) -> tuple[int, int]:
    """A torch size argument (``k``, ``(k,)`` or ``(kh, kw)``) as ``(kh, kw)``."""
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (1, 1)
    return (int(v), int(v))


def _hardtanh(args, kwargs):
    lo, hi = float(_arg(args, kwargs, 1, "min_val", -1.0)), float(_arg(args, kwargs, 2, "max_val", 1.0))
    if not lo < hi:
        raise UnsupportedActivationError(f"hardtanh with min_val >= max_val ({lo}, {hi}) is constant, not an "
                                         "activation with kinks")
    if (lo, hi) == (0.0, 6.0):
        return REGISTRY["relu6"]
    return get_activation("hardtanh", kinks=(lo, hi))


def _clamp(args, kwargs):
    lo, hi = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        raise UnsupportedActivationError("clamp with tensor bounds (kinks per unit, or computed by the model) is not "
                                         "supported; give the bounds as numbers")
    kinks = tuple(float(v) for v in (lo, hi) if v is not None)
    if len(kinks) == 2 and not kinks[0] < kinks[1]:
        raise UnsupportedActivationError(f"clamp with min >= max ({kinks[0]}, {kinks[1]}) is constant, not an "
                                         "activation with kinks")
    if kinks == (0.0,) and lo is not None:
        return REGISTRY["relu"]
    if kinks == (0.0, 6.0):
        return REGISTRY["relu6"]
    return get_activation("hardtanh", kinks=kinks, name="clamp")


def _clamp_bound(which: str):
    """``clamp_min(z, m)`` / ``clamp_max(z, m)``: ``torch.clamp`` with that one bound."""
    def resolve(args, kwargs):
        bound = _arg(args, kwargs, 1, which, None)
        return _clamp((args[0],), {which: bound})
    return resolve


def _gelu(args, kwargs):
    return REGISTRY["gelu_tanh" if kwargs.get("approximate", "none") == "tanh" else "gelu"]


def _max_pool(dims: int):
    def resolve(args, kwargs):
        k = _arg(args, kwargs, 1, "kernel_size", None)
        s = _arg(args, kwargs, 2, "stride", None) or k
        p = _arg(args, kwargs, 3, "padding", 0)
        d = _arg(args, kwargs, 4, "dilation", 1)
        ceil = bool(_arg(args, kwargs, 5, "ceil_mode", False))
        if _arg(args, kwargs, 6, "return_indices", False):
            raise UnsupportedActivationError(f"max_pool{dims}d with return_indices=True is not supported")
        lift = (lambda v: (1, as_pair(v)[0])) if dims == 1 else as_pair
        pad = (0, as_pair(p)[0]) if dims == 1 else as_pair(p)
        return WindowMax(f"max_pool{dims}d", kernel=lift(k), stride=lift(s), padding=pad, dilation=lift(d),
                         ceil_mode=ceil)
    return resolve


def _softplus(args, kwargs):
    beta = float(_arg(args, kwargs, 1, "beta", 1.0))
    return REGISTRY["softplus"] if beta == 1.0 else get_activation("softplus", soft_fn=partial(_softplus_gate,
                                                                                              beta=beta))


def _fixed(name):
    return lambda args, kwargs: REGISTRY[name]


T = torch.Tensor
# callable seen by a TorchFunctionMode -> resolver(args, kwargs) giving the registry entry; the unit input is args[0]
CALL_TABLE: dict[Callable, Callable] = {
    **{f: _fixed("relu") for f in (torch.relu, torch.relu_, F.relu, F.relu_, T.relu, T.relu_)},
    **{f: _fixed("leaky_relu") for f in (F.leaky_relu, F.leaky_relu_)},
    **{f: _fixed("prelu") for f in (F.prelu, torch.prelu, T.prelu)},
    **{f: _fixed("abs") for f in (torch.abs, torch.abs_, torch.absolute, T.abs, T.abs_, T.absolute, T.absolute_)},
    F.relu6: _fixed("relu6"),
    **{f: _hardtanh for f in (F.hardtanh, F.hardtanh_)},
    **{f: _clamp for f in (torch.clamp, torch.clamp_, torch.clip, torch.clip_, T.clamp, T.clip, T.clamp_, T.clip_)},
    **{f: _clamp_bound("min") for f in (torch.clamp_min, torch.clamp_min_, T.clamp_min, T.clamp_min_)},
    **{f: _clamp_bound("max") for f in (torch.clamp_max, torch.clamp_max_, T.clamp_max, T.clamp_max_)},
    F.gelu: _gelu,
    **{f: _fixed("silu") for f in (F.silu,)},
    F.softplus: _softplus,
    **{f: _fixed("sigmoid") for f in (torch.sigmoid, torch.sigmoid_, torch.special.expit, F.sigmoid, T.sigmoid,
                                      T.sigmoid_)},
    **{f: _fixed("tanh") for f in (torch.tanh, torch.tanh_, F.tanh, T.tanh, T.tanh_)},
    # a gate written out by hand (Hugging Face's gelu_python and LaplaceActivation): erf(z), Phi(z) = ndtr(z), and
    # their mirrored or logged forms; the code is z > 0 and the soft code the gate rising with z in every form
    **{f: _fixed("erf") for f in (torch.erf, torch.erf_, torch.special.erf, T.erf, T.erf_)},
    **{f: _fixed("erfc") for f in (torch.erfc, torch.erfc_, torch.special.erfc, T.erfc, T.erfc_)},
    torch.special.ndtr: _fixed("ndtr"),
    torch.special.log_ndtr: _fixed("log_ndtr"),
    **{f: _max_pool(1) for f in (F.max_pool1d, torch.max_pool1d)},
    **{f: _max_pool(2) for f in (F.max_pool2d, torch.max_pool2d)},
}

# nonlinearities we know exist but do not describe: a model that calls one is an error, never silently skipped
UNSUPPORTED_CALLS: dict[Callable, str] = {
    f: f.__name__.lstrip("_")
    for f in (
        F.elu, F.elu_, F.selu, F.celu, F.mish, F.hardswish, F.hardsigmoid, F.rrelu, F.glu, F.logsigmoid,
        F.softsign, F.tanhshrink, F.softshrink, F.hardshrink, F.threshold, F.max_pool3d, F.adaptive_max_pool1d,
        F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.fractional_max_pool2d, F.lp_pool1d, F.lp_pool2d,
        F.max_pool1d_with_indices, F.max_pool2d_with_indices, torch.max_pool3d,
        torch.selu, torch.selu_, torch.celu, torch.celu_, torch.rrelu, torch.rrelu_, torch.threshold,
        torch.threshold_, torch.hardshrink, T.hardshrink, F.threshold_,
        # recurrent layers apply their nonlinearity inside one call (nn.RNN, nn.LSTM, nn.GRU and their cells)
        torch.rnn_relu, torch.rnn_relu_cell, torch.rnn_tanh, torch.rnn_tanh_cell, torch.lstm, torch.lstm_cell,
        torch.gru, torch.gru_cell,
    )
}

# operations that bend the network without being sites, by name (in-place and dunder forms too): a maximum or
# minimum of two tensors, a reduction to the largest entry, sorting, rounding, shrinking, and activations called in a
# form the call table does not know. Any operation that turns unit values into integers or booleans (a comparison, a
# cast, argmax) bends it as well, and reading a unit value into Python (``VALUE_READS``) may steer it. ``capture``'s
# ``BendTracker`` follows which values depend on the path and records the bends that reach a site or the output;
# exact paths and slices refuse them (``paths.runner.Runner.hidden_kink``)
BENDING_OPS = frozenset({
    "maximum", "minimum", "fmax", "fmin", "max", "min", "amax", "amin", "aminmax", "sort", "msort", "topk",
    "kthvalue", "median", "nanmedian", "mode", "cummax", "cummin", "logcumsumexp", "sign", "sgn", "heaviside",
    "floor", "ceil", "round", "trunc", "fix", "frac", "copysign", "floor_divide", "floordiv", "rfloordiv",
    "remainder", "fmod", "mod", "rmod", "relu", "relu6", "hardtanh", "leaky_relu", "prelu", "rrelu", "elu", "selu",
    "celu", "threshold", "hardshrink", "softshrink", "abs", "absolute", "clamp", "clip", "clamp_min", "clamp_max",
    "rnn_relu", "rnn_relu_cell",
    "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices", "fractional_max_pool2d",
    # comparisons in place (``gt_``) keep floats; the others give booleans, which bend anyway
    "gt", "ge", "lt", "le", "eq", "ne", "greater", "greater_equal", "less", "less_equal", "not_equal",
    # norms and distances: kinked (1, inf) or not affine; either way not a site
    "norm", "vector_norm", "matrix_norm", "linalg_norm", "linalg_vector_norm", "linalg_matrix_norm", "dist",
    "cdist", "l1_loss", "smooth_l1_loss", "huber_loss",
})
VALUE_READS = frozenset({"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "__contains__",
                         "numpy", "__array__", "equal", "allclose", "is_nonzero"})  # exact names


def resolve_call(func: Callable, args: tuple, kwargs: dict) -> Activation | None:
    """Registry entry for a torch call, None when the call is not a nonlinearity we track.

    Raises
    ------
    UnsupportedActivationError
        If the call is a known nonlinearity that the registry cannot describe.
    """
    resolver = CALL_TABLE.get(func)
    if resolver is not None:
        return resolver(args, kwargs or {})
    if func in UNSUPPORTED_CALLS:
        raise UnsupportedActivationError(
            f"{UNSUPPORTED_CALLS[func]} is not in the kink registry (supported: {', '.join(sorted(REGISTRY))})"
        )
    return None
