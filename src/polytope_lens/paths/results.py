"""Result objects of 1-D path analyses and the semantic trace along a path.

``PathResult`` describes one path (crossings, per-site counts, density, breakpoints, crossing records, ties, trace);
``PathBatchResult`` holds the paths of one call with what makes the numbers trustworthy: ``exact``, ``method``,
``dtype`` and ``tolerance``. Both are frozen and give a JSON-safe ``to_dict()``. A batch's paths are a ``PathList``:
the engine's flat arrays per chunk, each ``PathResult`` made when first read, and the batch's counts read straight
from the arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidInputError
from .geometry import ray_alpha

__all__ = ["Trace", "PathResult", "PathList", "PathBatchResult", "trace_from_outputs", "traces_from_outputs"]


@dataclass(frozen=True)
class Trace:
    """What the model outputs along a path, one row per region (exact) or per sample (sampled).

    Attributes
    ----------
    t : ndarray (n,)
        Where the outputs were taken: region midpoints (exact) or sample positions (sampled).
    top_class : ndarray int64 (n,)
        Argmax of the output at each position.
    top_prob : ndarray (n,)
        Softmax probability of that class there (how sure the model is along the path).
    class_changes : ndarray (k,)
        Positions t where the top class changes. Exact mode with every site up to the output processed: every
        change, from the outputs at the breakpoints (affine on each region, so the top class along a region is the
        argmax of affine scores: max pooling's rule, ``kinks.argmax_changes``). Otherwise (sampled mode, ``units=``
        or ``layers=`` stopping early): located by bisection on the model between two positions whose top classes
        differ (to 1e-10 in t; the path's ends count as positions), which finds one change per such pair.
    js : ndarray (n - 1,)
        Jensen-Shannon divergence (nats) between consecutive softmax output distributions.
    """

    t: np.ndarray
    top_class: np.ndarray
    top_prob: np.ndarray
    class_changes: np.ndarray
    js: np.ndarray

    def to_dict(self) -> dict:
        return {"t": self.t.tolist(), "top_class": self.top_class.tolist(), "top_prob": self.top_prob.tolist(),
                "class_changes": self.class_changes.tolist(), "js": self.js.tolist()}


def _js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-300)) - torch.log(b.clamp_min(1e-300))),
                           torch.zeros_like(a)).sum(-1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def trace_from_outputs(t_at: torch.Tensor, logits: torch.Tensor, t_between: torch.Tensor) -> Trace:
    """Trace of one path from outputs (n, classes) taken at ``t_at``; ``t_between`` (n - 1,) are the positions
    reported for a change between consecutive rows."""
    return traces_from_outputs(t_at, logits, t_between, [len(t_at)])[0]


def traces_from_outputs(t_at: torch.Tensor, logits: torch.Tensor, t_between: torch.Tensor,
                        counts: list[int], block_elems: int | None = None) -> list[Trace]:
    """Traces of consecutive paths at once: path i owns ``counts[i]`` rows of ``t_at`` and ``logits`` and the
    ``counts[i] - 1`` next entries of ``t_between``. Softmax, argmax and divergences run over all rows on the
    outputs' device, in blocks of about ``block_elems`` logits, and come to the host once, not once per path (a
    synchronising copy on a GPU). Default blocks: 2 MiB temporaries on the CPU (cache-sized: 64 MiB ones made the
    trace of 784->4x512 paths 1.8x slower), 128 MiB on a GPU (few launches)."""
    if block_elems is None:
        block_elems = 1 << (18 if logits.device.type == "cpu" else 24)
    n, k = logits.shape[0], max(1, logits.shape[-1])
    step = max(2, block_elems // k)  # rows per block
    top, top_p, js = [], [], []
    for r in range(0, n, step - 1):  # blocks overlap by one row, so every consecutive pair is in one
        block = logits[r:r + step].to(torch.float64)
        own = slice(None, step - 1 if r + step < n else None)  # the rows the next block does not start with
        probs = torch.softmax(block, dim=-1)
        top.append(block.argmax(-1)[own])
        top_p.append(probs.gather(-1, top[-1][:, None]).squeeze(-1))
        js.append(_js(probs[:-1], probs[1:]) if len(probs) > 1 else probs.new_zeros(0))
        if r + step >= n:
            break
    top_np = torch.cat(top).cpu().numpy() if n else np.zeros(0, dtype=np.int64)
    top_p_np = torch.cat(top_p).cpu().numpy() if n else np.zeros(0)
    js_np = torch.cat(js).cpu().numpy() if n else np.zeros(0)
    t_np, tb_np = t_at.cpu().numpy(), t_between.cpu().numpy()
    out, r0, b0 = [], 0, 0
    for c in counts:
        tc = top_np[r0:r0 + c]
        change = np.flatnonzero(tc[1:] != tc[:-1])
        out.append(Trace(t_np[r0:r0 + c], tc, top_p_np[r0:r0 + c], tb_np[b0:b0 + max(c - 1, 0)][change],
                         js_np[r0:r0 + max(c - 1, 0)]))
        r0, b0 = r0 + c, b0 + max(c - 1, 0)
    return out


@dataclass(frozen=True)
class PathResult:
    """Boundary crossings along one path.

    Attributes
    ----------
    index : int
        Position of the path in the batch.
    crossings : int
        Number of unit crossings (one per unit and kink crossed) at the reported sites.
    per_layer : dict[str, int]
        Crossings per site name, in execution order.
    density : float
        ``crossings / length``: crossings per unit of Euclidean length in the space the path is drawn in.
    length : float
        Euclidean length of the path.
    t : ndarray (n_breakpoints,)
        Sorted distinct breakpoints, including 0 and 1 (and polyline knots); regions = len(t) - 1 (a polyline
        knot that no crossing lands on splits a region in two).
    records : dict of ndarrays
        One entry per crossing, sorted by t: ``t``, ``site`` (index into ``sites``), ``unit`` (flat unit index in
        the site's unit tensor; the output element for max pooling), ``piece`` (piece entered moving forward).
    sites : tuple of str
        Names of the sites in ``records``.
    ties : int
        Breakpoints where several crossings coincide within the tie tolerance, or where a unit sits on its kink at
        an existing breakpoint (exact mode only; 0 when sampled).
    trace : Trace or None
    alphas : tuple or None
        (alpha0, alpha1) of a ray; ``alpha = alpha0 + t * (alpha1 - alpha0)`` (``alpha(t)``). A ray's ``to_dict``
        gives every position in alpha as well: ``alpha``, ``trace.alpha``, ``trace.class_changes_alpha`` and each
        record's ``alpha``.
    exact : bool or None
        Whether the crossings are exact (False: sampled lower bounds), as the batch says; None when not known.
    """

    index: int
    crossings: int
    per_layer: dict
    density: float
    length: float
    t: np.ndarray
    records: dict
    sites: tuple
    ties: int = 0
    trace: Trace | None = None
    alphas: tuple | None = None
    exact: bool | None = None

    @property
    def n_regions(self) -> int:
        return max(0, len(self.t) - 1)

    def alpha(self, t) -> np.ndarray:
        """Ray parameter alpha at positions t (rays only)."""
        if self.alphas is None:
            raise ValueError("alpha() is only defined for scaling rays.")
        out = ray_alpha(np.asarray(t, dtype=np.float64), self.alphas)
        return out[()] if out.ndim == 0 else out  # a number for a number

    def to_dict(self, records: bool = True) -> dict:
        d = {"index": self.index, "crossings": self.crossings, "per_layer": dict(self.per_layer),
             "density": self.density, "length": self.length, "ties": self.ties, "n_regions": self.n_regions,
             "t": self.t.tolist(), "trace": None if self.trace is None else self.trace.to_dict()}
        if records:
            r = self.records
            d["records"] = [{"t": float(t), "site": self.sites[int(s)], "unit": int(u), "piece": int(p)}
                            for t, s, u, p in zip(r["t"], r["site"], r["unit"], r["piece"])]
        if self.alphas is not None:  # a ray: every position in t also as alpha
            d["alphas"] = list(self.alphas)
            d["alpha"] = self.alpha(self.t).tolist()
            if self.trace is not None:
                d["trace"]["alpha"] = self.alpha(self.trace.t).tolist()
                d["trace"]["class_changes_alpha"] = self.alpha(self.trace.class_changes).tolist()
            if records:
                for rec, a in zip(d["records"], self.alpha(self.records["t"]).tolist()):
                    rec["alpha"] = a
        return d

    def plot(self, ax=None, *, bins: int = 50):
        """Where the crossings lie (histogram stacked by site; a ray's in alpha) and, with a trace, the top-class
        probability with the class changes dashed. Returns the Axes."""
        from ..report.figures import path_figure

        return path_figure(self, ax, bins=bins)

    def _repr_html_(self) -> str:
        from ..report.html import summary_html

        kind = {True: "exact", False: "sampled (lower bound)", None: "not recorded"}[self.exact]
        facts = {"crossings": f"{self.crossings} ({kind})", "length": self.length, "density": self.density,
                 "regions": self.n_regions, "ties": self.ties if self.exact else "not computed (sampled)"}
        if self.alphas is not None:
            facts["alphas"] = f"{self.alphas[0]:g} to {self.alphas[1]:g}"
        if self.trace is not None:
            changes = np.atleast_1d(self.trace.class_changes if self.alphas is None else
                                    self.alpha(self.trace.class_changes))
            listed = ", ".join(f"{c:.6g}" for c in changes[:10]) + (f" ... ({len(changes)} in all)"
                                                                     if len(changes) > 10 else "")
            facts["class changes at " + ("alpha" if self.alphas is not None else "t")] = listed or "none"
        return summary_html(f"Path {self.index}", facts, _site_table(self.per_layer))


@dataclass(frozen=True)
class PathBlock:
    """Flat arrays for consecutive paths ``start, start + 1, ...`` (one engine chunk): records sorted by path and t,
    with per-path offsets into them and into the breakpoints."""

    start: int
    rec_off: np.ndarray  # (c + 1,) path i's records are rec_*[rec_off[i]:rec_off[i + 1]]
    rec_t: np.ndarray
    rec_site: np.ndarray  # site, unit and piece in the narrowest integer type that holds them (``path`` widens)
    rec_unit: np.ndarray
    rec_piece: np.ndarray
    per_site: np.ndarray  # (c, n_sites) crossings per path and site
    lengths: np.ndarray  # (c,)
    sites: tuple
    exact: bool
    pt_off: np.ndarray | None = None  # exact: path i's breakpoints are t[pt_off[i]:pt_off[i + 1]]
    t: np.ndarray | None = None
    ties: np.ndarray | None = None  # (c,) exact: tied breakpoints per path
    traces: dict = field(default_factory=dict)  # i -> Trace
    alphas: tuple | None = None
    knots: np.ndarray | None = None  # sampled polylines: (c, K - 2) inner knots, breakpoints like the crossings

    def __len__(self) -> int:
        return len(self.lengths)

    def path(self, i: int) -> PathResult:
        r0, r1 = int(self.rec_off[i]), int(self.rec_off[i + 1])
        rt = self.rec_t[r0:r1]
        if self.exact:
            bps, ties = self.t[self.pt_off[i]:self.pt_off[i + 1]], int(self.ties[i])
        else:
            inner = self.knots[i] if self.knots is not None else []
            bps, ties = np.unique(np.concatenate([[0.0, 1.0], rt, inner])), 0
        n, length = r1 - r0, float(self.lengths[i])
        return PathResult(index=self.start + i, crossings=n, density=n / length, length=length, t=bps, exact=self.exact,
                          per_layer={s: int(c) for s, c in zip(self.sites, self.per_site[i].tolist())},
                          records={"t": rt, "site": self.rec_site[r0:r1].astype(np.int64),
                                   "unit": self.rec_unit[r0:r1].astype(np.int64),
                                   "piece": self.rec_piece[r0:r1].astype(np.int64)},
                          sites=self.sites, ties=ties, trace=self.traces.get(i), alphas=self.alphas)


class PathList(Sequence):
    """The paths of a batch, in order, from the engine's ``PathBlock``s: each ``PathResult`` is made when first read
    (a GPU finds the crossings of tens of thousands of paths per second, faster than Python makes objects for them),
    and ``counts`` and ``per_site`` come from the arrays directly."""

    def __init__(self, blocks: list[PathBlock] | None = None):
        self._blocks: list[PathBlock] = []
        self._starts: list[int] = []  # each block's first path, for the binary search of __getitem__
        self._n = 0
        self._made: dict[int, PathResult] = {}
        for b in blocks or []:
            self.append(b)

    def append(self, block: PathBlock) -> None:
        if block.start != self._n:
            raise ValueError(f"PathList: a block starting at path {block.start} follows {self._n} paths.")
        self._blocks.append(block)
        self._starts.append(block.start)
        self._n += len(block)

    def __len__(self) -> int:  # kept, not summed over the blocks: every read of a path asks for it
        return self._n

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths, {int(self.counts.sum())} crossings)"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        if i not in self._made:
            k = int(np.searchsorted(self._starts, i, side="right")) - 1
            self._made[i] = self._blocks[k].path(i - self._starts[k])
        return self._made[i]

    @property
    def counts(self) -> np.ndarray:
        return np.concatenate([b.rec_off[1:] - b.rec_off[:-1] for b in self._blocks]).astype(np.int64) \
            if self._blocks else np.zeros(0, dtype=np.int64)

    @property
    def per_site(self) -> np.ndarray:
        """(paths, sites) crossings."""
        return np.concatenate([b.per_site for b in self._blocks]) if self._blocks else np.zeros((0, 0), np.int64)

    @property
    def crossing_t(self) -> np.ndarray:
        """Positions t of every crossing, path after path, without making a ``PathResult`` per path."""
        return np.concatenate([b.rec_t for b in self._blocks] or [np.zeros(0)])

    @property
    def crossing_site(self) -> np.ndarray:
        """Site (index into ``sites``) of every crossing, in the order of ``crossing_t``, int64."""
        return np.concatenate([b.rec_site for b in self._blocks] or [np.zeros(0)]).astype(np.int64)

    def traces(self):
        """The traces the paths have, block by block, without making a ``PathResult`` per path."""
        return (tr for b in self._blocks for tr in b.traces.values())

    @property
    def alphas(self) -> set:
        """The distinct ``(alpha0, alpha1)`` of the blocks (``{None}`` for paths that are not rays)."""
        return {b.alphas for b in self._blocks}


def own_lengths_note(lengths, positions: int) -> str:
    """The note of text paths run at their own lengths (``paths._per_text``): one home for its wording, which
    ``PathBatchResult.concat`` reads back to join the notes of blocks (Ray workers) into one."""
    return (f"{_OWN_LENGTHS}{', '.join(str(n) for n in sorted(set(lengths)))} positions of {positions}): crossings at "
            "padding positions are not counted")


_OWN_LENGTHS = "text rows run at their own lengths ("


_OVERFLOW = "the model's outputs are NaN or infinite at "
_OVERFLOW_REST = " positions of the traces"


def overflow_note(count: int) -> str:
    """The note of traces whose outputs overflow at ``count`` positions: one home for its wording, which
    ``PathBatchResult.concat`` reads back to sum the blocks' counts."""
    return (f"{_OVERFLOW}{count:,}{_OVERFLOW_REST} (it overflows there): their top class, probability and JS are "
            "undefined; the crossings are not affected")


def _merged_length_notes(notes: list[str], missing: bool = False) -> tuple:
    """``notes`` with the own-lengths notes of several blocks joined into one (the union of their lengths).

    ``missing``: some block has no such note while another has one: its texts had no padding (``paths._per_text``
    notes nothing then), so they ran at the full number of positions, which joins the union as a single process
    lists it."""
    own = [n for n in notes if n.startswith(_OWN_LENGTHS)]
    if len(own) < 2 and not (own and missing):
        return tuple(notes)
    lengths, positions = [], None
    for n in own:
        listed, _, rest = n[len(_OWN_LENGTHS):].partition(" positions of ")
        lengths += [int(v) for v in listed.split(", ")]
        positions = rest.partition(")")[0]
    if missing:
        lengths.append(int(positions))
    first = notes.index(own[0])
    kept = [n for n in notes if n not in own]
    kept.insert(first, own_lengths_note(lengths, int(positions)))
    return tuple(kept)


def _merged_overflow_notes(parts_notes: list[tuple]) -> list[str]:
    """The blocks' notes kept once each, with their overflow notes ("outputs are NaN or infinite at N positions")
    joined into one with the total count, where the first one stood (a single process counts every path at once)."""
    notes = list(dict.fromkeys(n for ns in parts_notes for n in ns))
    over = [n for n in notes if n.startswith(_OVERFLOW)]
    if not over:
        return notes
    total = 0
    for ns in parts_notes:  # every block's note, equal ones included
        for n in ns:
            if n.startswith(_OVERFLOW):
                total += int(n[len(_OVERFLOW):].partition(_OVERFLOW_REST)[0].replace(",", ""))
    first = notes.index(over[0])
    kept = [n for n in notes if n not in over]
    kept.insert(first, overflow_note(total))
    return kept


@dataclass(frozen=True)
class PathBatchResult:
    """Crossings along a batch of paths, with how they were computed.

    Attributes
    ----------
    paths : sequence of PathResult (a ``PathList`` from the engine, a list after ``concat``)
    exact : bool
        True for layered breakpoint refinement on a verified piecewise-linear model; False when sampled (counts are
        then lower bounds).
    method : {"exact", "sampled"}
    dtype : str
    tolerance : dict
        ``tie_tol`` and ``value_tol`` (exact: crossings closer than ``tie_tol`` in t are one breakpoint, on rays
        closer than ``tie_tol * |alpha|`` in alpha, ``tie_tol_in``: "alpha, relative"; max-pool entries within
        ``value_tol * max(floor, |maximum|)`` of a window's maximum are tied at it, floor = min(1, the point's largest
        |entry| in the pool's input)) or ``tol`` and
        ``n_samples`` (sampled: bisection width and initial samples per path).
    kind : {"segment", "polyline", "ray"}
    layer : str or None
        Site whose output the paths replace; None for the model input.
    sites : tuple of str
        Sites whose crossings are reported, in execution order.
    notes : tuple of str
        How the engine ran (evaluator, fallbacks), for the record.
    """

    paths: Sequence
    exact: bool
    method: str
    dtype: str
    tolerance: dict
    kind: str
    layer: str | None
    sites: tuple
    notes: tuple = field(default=())
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def concat(cls, parts: list[PathBatchResult], seconds: float | None = None,
               rows: list[list[int]] | None = None) -> PathBatchResult:
        """One result from the results of consecutive blocks of paths (e.g. from Ray workers, ``distributed``), or
        with ``rows`` (each part's path positions in the joined result) of interleaved groups.

        Paths are re-indexed in order; the blocks must agree on how they were computed (exact, method, dtype,
        tolerance, kind, layer, sites), or the joined numbers would mean different things. Notes are kept once each,
        those counting the blocks' own paths joined as one process would write them (the overflow count summed, the
        text lengths united); ``seconds`` defaults to the blocks' sum.
        """
        if not parts:
            raise InvalidInputError("PathBatchResult.concat needs at least one result.")
        first = parts[0]
        for key in ("exact", "method", "dtype", "tolerance", "kind", "layer", "sites"):
            values = [getattr(p, key) for p in parts]
            if any(v != values[0] for v in values[1:]):
                other = next(v for v in values if v != values[0])
                hint = " (pass method='exact' or 'sampled' rather than 'auto')" if key in ("exact", "method") else ""
                raise InvalidInputError(f"Cannot join path results computed with different {key}: {values[0]!r} "
                                        f"and {other!r}{hint}.")
        if rows is None:
            offsets = np.cumsum([0] + [len(p.paths) for p in parts])
            rows = [range(o, o + len(p.paths)) for o, p in zip(offsets.tolist(), parts)]
        paths = [None] * sum(len(p.paths) for p in parts)
        for p, where in zip(parts, rows):
            for r, i in zip(p.paths, where):
                paths[i] = dataclasses.replace(r, index=int(i))
        has_own = [any(n.startswith(_OWN_LENGTHS) for n in p.notes) for p in parts]
        notes = _merged_length_notes(_merged_overflow_notes([p.notes for p in parts]),
                                     missing=any(has_own) and not all(has_own))
        return cls(paths, first.exact, first.method, first.dtype, dict(first.tolerance), first.kind, first.layer,
                   first.sites, notes, float(sum(p.seconds for p in parts)) if seconds is None else float(seconds))

    def __getitem__(self, i) -> PathResult:
        return self.paths[i]

    @property
    def counts(self) -> np.ndarray:
        """Crossings per path, int64 (P,)."""
        if isinstance(self.paths, PathList):
            return self.paths.counts
        return np.array([p.crossings for p in self.paths], dtype=np.int64)

    @property
    def per_site(self) -> np.ndarray:
        """Crossings per path and site, int64 (P, sites), columns in ``sites`` order."""
        if isinstance(self.paths, PathList) and len(self.paths):
            return self.paths.per_site
        return np.array([[p.per_layer.get(s, 0) for s in self.sites] for p in self.paths],
                        dtype=np.int64).reshape(len(self.paths), len(self.sites))

    @property
    def per_layer(self) -> dict:
        """Crossings per site summed over paths ({site: count}; per path: ``per_site``)."""
        return {s: int(c) for s, c in zip(self.sites, self.per_site.sum(0).tolist())}

    @property
    def crossing_t(self) -> np.ndarray:
        """Positions t of every crossing, path after path (float64)."""
        if isinstance(self.paths, PathList):
            return self.paths.crossing_t
        return np.concatenate([p.records["t"] for p in self.paths] or [np.zeros(0)])

    @property
    def crossing_site(self) -> np.ndarray:
        """Site (index into ``sites``) of every crossing, in the order of ``crossing_t``."""
        if isinstance(self.paths, PathList):
            return self.paths.crossing_site
        return np.concatenate([p.records["site"] for p in self.paths] or [np.zeros(0)]).astype(np.int64)

    @property
    def ray_alphas(self) -> tuple | None:
        """``(alpha0, alpha1)`` when every path is a ray over that one range, else None."""
        ranges = self.paths.alphas if isinstance(self.paths, PathList) else {p.alphas for p in self.paths}
        return next(iter(ranges)) if len(ranges) == 1 else None

    def plot(self, ax=None, *, bins: int = 50):
        """Where the crossings lie: the mean number per path in each bin of t (of alpha for rays over one range),
        stacked by site. Returns the Axes."""
        from ..report.figures import batch_figure

        return batch_figure(self, ax, bins=bins)

    def _repr_html_(self) -> str:
        from ..report.html import summary_html, tolerance_text

        counts = self.counts
        how = f"exact, {self.dtype}" if self.exact else f"sampled lower bounds, {self.dtype}"
        return summary_html(
            f"{len(self)} {self.kind}{'s' if len(self) != 1 else ''}: {int(counts.sum())} crossings ({how})",
            {"method": self.method, "tolerance": tolerance_text(self.tolerance),
             "paths drawn at": self.layer or "the input",
             **({"alphas": f"{self.ray_alphas[0]:g} to {self.ray_alphas[1]:g}"} if self.ray_alphas else {}),
             "crossings per path": _spread(counts), "seconds": round(self.seconds, 3)},
            _site_table(self.per_layer), notes=self.notes)

    def to_dict(self, records: bool = False) -> dict:
        return {"exact": self.exact, "method": self.method, "dtype": self.dtype, "tolerance": dict(self.tolerance),
                "kind": self.kind, "layer": self.layer, "sites": list(self.sites), "notes": list(self.notes),
                "seconds": self.seconds, "paths": [p.to_dict(records=records) for p in self.paths]}


def _spread(counts: np.ndarray) -> str:
    """'mean 12.5 (min 3, max 40)' of per-path counts."""
    if not len(counts):
        return "no paths"
    return f"mean {counts.mean():.1f} (min {counts.min()}, max {counts.max()})"


def _site_table(per_layer: dict, n: int = 20) -> str:
    """Crossings per site, in execution order; beyond ``n`` sites the rest are summed in one row."""
    from ..report.html import rows_table

    rows = [[s, c] for s, c in per_layer.items()]
    if len(rows) > n:
        rows = rows[:n] + [[f"{len(rows) - n} more sites", sum(c for _, c in rows[n:])]]
    return rows_table(["site", "crossings"], rows)
