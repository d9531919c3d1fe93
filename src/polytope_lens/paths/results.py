"""Result objects of 1-D path analyses and the semantic trace along a path.

``PathResult`` describes one path (crossings, per-site counts, density, breakpoints, crossing records, ties, trace);
``PathBatchResult`` holds the paths of one call with what makes the numbers trustworthy: ``exact``, ``method``,
``dtype`` and ``tolerance``. Both are frozen and give a JSON-safe ``to_dict()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidInputError

__all__ = ["Trace", "PathResult", "PathBatchResult", "trace_from_outputs", "traces_from_outputs"]


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
        Sorted distinct breakpoints, including 0 and 1 (and polyline knots); regions = len(t) - 1.
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
        (alpha0, alpha1) of a ray; ``alpha = alpha0 + t * (alpha1 - alpha0)``.
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

    @property
    def n_regions(self) -> int:
        return max(0, len(self.t) - 1)

    def alpha(self, t) -> np.ndarray:
        """Ray parameter alpha at positions t (rays only)."""
        if self.alphas is None:
            raise ValueError("alpha() is only defined for scaling rays.")
        a0, a1 = self.alphas
        return a0 + np.asarray(t) * (a1 - a0)

    def to_dict(self, records: bool = True) -> dict:
        d = {"index": self.index, "crossings": self.crossings, "per_layer": dict(self.per_layer),
             "density": self.density, "length": self.length, "ties": self.ties, "n_regions": self.n_regions,
             "t": self.t.tolist(), "trace": None if self.trace is None else self.trace.to_dict()}
        if self.alphas is not None:
            d["alphas"] = list(self.alphas)
        if records:
            r = self.records
            d["records"] = [{"t": float(t), "site": self.sites[int(s)], "unit": int(u), "piece": int(p)}
                            for t, s, u, p in zip(r["t"], r["site"], r["unit"], r["piece"])]
        return d


@dataclass(frozen=True)
class PathBatchResult:
    """Crossings along a batch of paths, with how they were computed.

    Attributes
    ----------
    paths : list of PathResult
    exact : bool
        True for layered breakpoint refinement on a verified piecewise-linear model; False when sampled (counts are
        then lower bounds).
    method : {"exact", "sampled"}
    dtype : str
    tolerance : dict
        ``tie_tol`` and ``value_tol`` (exact: crossings closer than ``tie_tol`` in t are one breakpoint; max-pool
        entries within ``value_tol * max(1, |maximum|)`` of a window's maximum are tied at it) or ``tol`` and
        ``n_samples`` (sampled: bisection width and initial samples per path).
    kind : {"segment", "polyline", "ray"}
    layer : str or None
        Site whose output the paths replace; None for the model input.
    sites : tuple of str
        Sites whose crossings are reported, in execution order.
    notes : tuple of str
        How the engine ran (evaluator, fallbacks), for the record.
    """

    paths: list
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
    def concat(cls, parts: list[PathBatchResult], seconds: float | None = None) -> PathBatchResult:
        """One result from the results of consecutive blocks of paths (e.g. from Ray workers, ``distributed``).

        Paths are re-indexed in order; the blocks must agree on how they were computed (exact, method, dtype,
        tolerance, kind, layer, sites), or the joined numbers would mean different things. Notes are kept once each;
        ``seconds`` defaults to the blocks' sum.
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
        paths, offset = [], 0
        for p in parts:
            paths += [dataclasses.replace(r, index=offset + r.index) for r in p.paths]
            offset += len(p.paths)
        notes = tuple(dict.fromkeys(n for p in parts for n in p.notes))
        return cls(paths, first.exact, first.method, first.dtype, dict(first.tolerance), first.kind, first.layer,
                   first.sites, notes, float(sum(p.seconds for p in parts)) if seconds is None else float(seconds))

    def __getitem__(self, i) -> PathResult:
        return self.paths[i]

    @property
    def counts(self) -> np.ndarray:
        """Crossings per path, int64 (P,)."""
        return np.array([p.crossings for p in self.paths], dtype=np.int64)

    @property
    def per_layer(self) -> dict:
        """Crossings per site summed over paths."""
        return {s: int(sum(p.per_layer.get(s, 0) for p in self.paths)) for s in self.sites}

    def to_dict(self, records: bool = False) -> dict:
        return {"exact": self.exact, "method": self.method, "dtype": self.dtype, "tolerance": dict(self.tolerance),
                "kind": self.kind, "layer": self.layer, "sites": list(self.sites), "notes": list(self.notes),
                "seconds": self.seconds, "paths": [p.to_dict(records=records) for p in self.paths]}
