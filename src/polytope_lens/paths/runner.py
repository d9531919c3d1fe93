"""Running a model at path points through ``capture``, and proving it is affine between its sites.

``Runner`` owns a float64 (or chosen dtype) eval-mode copy of the model, the ordered call sites, and the path: it
evaluates the unit inputs of chosen sites at points ``(pid, t)``, replacing the path site's output by the path point
when the path lives at a site. Everything here is driven by intercepted calls, never by layer classes.

Two facts about the model are established here, both from forward passes only:

* ``affinity_probe``: with every site's output replaced by free values (and the path source free too), each later
  site's unit input must be a jointly affine function of them. Evaluated at two random configurations and their
  midpoint, any nonlinearity that capture does not see (LayerNorm, softmax attention, batch statistics) breaks it.
* ``extract_affine``: given that, the map from (source, site outputs) to each site's unit input is
  ``z_m = sum_l J_ml a_l + c_m``; its blocks are read off by replacing one source by basis vectors. This lets the
  exact engine evaluate the network in pieces (one matrix product per site) instead of re-running prefixes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..capture import (BendTracker, CallSite, PrefixRead, PrefixReplay, ReplayMismatch, SharedPrefix, StopForward,
                       as_module, check_eager, is_batched, model_errors, run)
from ..errors import InvalidInputError, NotPiecewiseLinearError
from ..kinks import ScalarKinks
from .geometry import PathSpec

SRC = "<source>"
REPLAY_SHARE = 8  # recordings of the network before a path's site (``PrefixReplay``) take at most budget / this


def check_dtype(owner: str, dtype) -> None:
    """Exact and sampled runs compute in float64 or float32 (the kernels' and the tolerances' dtypes)."""
    if dtype not in (torch.float64, torch.float32):
        raise InvalidInputError(f"The 'dtype' parameter of {owner} must be torch.float64 or torch.float32. "
                                f"Got {dtype!r}.")


def affine_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of the checks that a map is affine: 1e-9 in float64, 1000 ulps in wider-rounding dtypes
    (1.19e-4 in float32), so rounding is never mistaken for a nonlinearity (LayerNorm or softmax deviate by O(1))."""
    return max(1e-9, 1e3 * torch.finfo(dtype).eps)


def same_values(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """Equal shapes, and every entry within ``tol * max(1, max |want|)`` of ``want`` (an evaluation shortcut
    reproduces the plain one up to rounding)."""
    return got.shape == want.shape and bool(((got - want).abs() <= tol * want.abs().max().clamp_min(1.0)).all())


def logits_of(out) -> torch.Tensor | None:
    """The tensor of class scores in a model output (tensor, ``.logits``, or first element), as (n, classes)."""
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return None
    if out.dim() == 1:
        out = out[:, None]
    if out.dim() > 2:
        out = out.reshape(out.shape[0], -1, out.shape[-1])[:, -1]
    if out.shape[1] == 1:
        out = torch.cat([torch.zeros_like(out), out], dim=1)
    return out


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device``, or a one-line error when it is not one or is not available here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInputError(f"The 'device' parameter must be a torch device such as 'cpu' or 'cuda'. Got "
                                f"{device!r}.") from None
    if dev.type not in ("cpu", "cuda"):  # meta, mps, xpu...: tensors there fail later with a traceback
        raise InvalidInputError(f"The 'device' parameter must be 'cpu' or 'cuda' (or 'cuda:N'). Got {device!r}.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"The 'device' parameter is {device!r}, but torch {torch.__version__} here has no CUDA "
                                "device; use 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidInputError(f"The 'device' parameter is {device!r}, but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s).")
    return dev


def prepare_model(model: nn.Module, dtype, device) -> nn.Module:
    """A copy of ``model`` (or of a ``ModelBundle``'s module) in ``dtype`` on ``device``, in eval mode (dropout off,
    BatchNorm on running statistics)."""
    model = as_module(model)
    check_eager(model)
    m = copy.deepcopy(model).to(device=check_device(device), dtype=dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def index_inputs(base, idx: torch.Tensor):
    """Rows ``idx`` of a tensor or of every tensor in a mapping."""
    if isinstance(base, torch.Tensor):
        return base[idx]
    return {k: (v[idx] if is_batched(v) else v) for k, v in base.items()}


@dataclass
class Affine:
    """``z_m = sum_{l in deps[m]} a_l @ jt[m, l] + c[m]`` for every processed site m (and "output" when affine).

    ``jt[m, l]`` is (d_l, d_m) (the transposed Jacobian block); ``c[m]`` is (1, d_m) or (P, d_m) for site paths.
    """

    deps: dict
    jt: dict
    c: dict


class Runner:
    """A prepared model: dtype/device copy in eval mode, its sites, and the paths."""

    def __init__(self, model: nn.Module, fwd: Callable, spec: PathSpec, *, dtype, device, memory_budget: int,
                 capture_kwargs: dict, owner: str, probe_input, probe_name: str | None = None):
        self.model = model  # already a prepared copy (see ``prepare_model``)
        self.fwd = fwd
        self.spec = spec
        self.dtype, self.device = dtype, torch.device(device)
        self.tol = affine_tol(dtype)
        self.budget = int(memory_budget)
        self.ckw = capture_kwargs
        self.owner = owner
        seen: dict = {}

        def record(site, z):
            seen[site.name] = (site, z.detach())
        # ``probe_name``: what the probe is one row of, for the error a model that cannot take it gives
        what = probe_name or ("points" if spec.site is None else "'inputs'")
        # a model may write into its input (x.relu_()): the probe pass runs on a copy of the caller's row (a view of
        # a path's start or a plane's origin would otherwise be moved by it)
        probe_input = index_inputs(probe_input, torch.zeros(1, dtype=torch.long, device=self.device))
        bends = BendTracker(source=spec.site)  # bends outside the sites, on the probe pass (``hidden_kink``)
        if spec.site is None:
            bends.seed(probe_input)
        bends.seed_static([*self.model.parameters(), *self.model.buffers()])
        with model_errors(fwd, probe_input, owner, what):
            out = run(self.model, lambda: self.fwd(probe_input), record, bends=bends, **capture_kwargs)
        bends.reaches(out, math.inf)
        bends.release()
        self.hidden = bends.found
        scores = logits_of(out)
        self.has_output = scores is not None  # class scores (text encoders have none)
        self.n_outputs = 0 if scores is None else int(scores.shape[1])
        self.all_sites: list[CallSite] = [s for s, _ in seen.values()]
        self.out_shape = {}
        for name, (site, z) in seen.items():
            if site.apply is None:
                self.out_shape[name] = tuple(z.shape[1:])
            else:
                self.out_shape[name] = tuple(site.apply(z).shape[1:])
        self.z_shape = {name: tuple(z.shape[1:]) for name, (_, z) in seen.items()}
        if spec.site is None:
            self.processed = list(self.all_sites)
        else:
            order = next(s.order for s in self.all_sites if s.name == spec.site)
            self.processed = [s for s in self.all_sites if s.order > order]
        # a site whose unit input does not depend on the path (a clamp of parameters) has no crossings on it
        self.constant_sites = bends.constant
        checked = {s.name for s in self.processed} | ({spec.site} if spec.site is not None else set())
        for site, z in seen.values():  # the probe is one example: a followed site's unit input holds it first
            if site.name in checked and site.name not in self.constant_sites and (z.dim() == 0 or z.shape[0] != 1):
                raise InvalidInputError(
                    f"{owner}: site {site.name!r} applies its nonlinearity to a tensor of shape {tuple(z.shape)} for "
                    "one example; paths and slices need the batch on its own first axis, of size 1 here (a "
                    "sequence-first layer such as nn.TransformerEncoderLayer(batch_first=False), or a reshape that "
                    "merges the batch with another axis, puts it elsewhere).")
        self.processed = [s for s in self.processed if s.name not in self.constant_sites]
        self.names = [s.name for s in self.processed]
        n_units = sum(math.prod(self.z_shape[n]) for n in self.names)
        self.row_bytes = 8 * (4 * n_units + 4 * sum(math.prod(self.out_shape[n]) for n in self.names)
                              + 4 * math.prod(spec.shape) + 64)
        self._share_prefix: bool | None = None if spec.site is not None and self.names else False
        # the network before the path's site, recorded once per set of paths and replayed (``PrefixReplay``) while
        # the recordings fit 1 / REPLAY_SHARE of the budget; None until checked on this model (with ``share_prefix``)
        self._replay: bool | None = None
        self._replays: dict[tuple, PrefixReplay] = {}  # path ids fed to the model -> recording, oldest first

    @property
    def share_prefix(self) -> bool:
        """Whether point evaluations run the network before the path's site once per path (checked on first use,
        so runs that never evaluate points on the graph route do not pay for the check)."""
        if self._share_prefix is None:
            self._share_prefix = False  # the check itself evaluates points the plain way first
            self._share_prefix = self._shared_prefix_agrees()
        return self._share_prefix

    def _replay_for(self, paths: torch.Tensor) -> PrefixReplay | None:
        """The recording of the network before the path's site for the inputs of paths ``paths`` (made on first use;
        the oldest dropped while the recordings take more than 1 / ``REPLAY_SHARE`` of the budget), or None when
        replays are off for this model."""
        if not self._replay:
            return None
        key = tuple(paths.tolist())
        rp = self._replays.pop(key, None) or PrefixReplay(self.spec.site)
        self._replays[key] = rp  # most recently used last
        return rp

    def _keep_replays(self) -> None:
        total = 0
        for key in reversed(list(self._replays)):
            total += self._replays[key].nbytes() if self._replays[key].recorded else 0
            if total > self.budget // REPLAY_SHARE:
                del self._replays[key]

    def _shared_prefix_agrees(self) -> bool:
        """Whether running the network before the path's site once per path (``SharedPrefix``) gives this model's
        unit inputs and output (when it has class scores) at a few path points (to rounding); models whose later
        code reuses early tensors in ways the expansion does not see fall back to one full forward pass per point."""
        k = min(2, self.spec.n_paths)
        pid = torch.arange(k, device=self.device).repeat_interleave(3)
        t = torch.tensor([0.0, 0.37, 1.0] * k, dtype=self.dtype, device=self.device)
        try:
            self._share_prefix = False
            full = self.eval_points(pid, t, self.names, want_output=self.has_output)
            self._share_prefix = True
            shared = self.eval_points(pid, t, self.names, want_output=self.has_output)
        except torch.OutOfMemoryError:  # the device's limit, not a failure of the shortcut
            raise
        except Exception:  # noqa: BLE001 - any failure of the shortcut means: do not use it
            return False
        finally:
            self._share_prefix = False
        agrees = all(key in shared and same_values(shared[key], v, self.tol) for key, v in full.items())
        if agrees:  # the recorded prefix, replayed (the first evaluation records it): to the bit, or not used
            try:
                self._share_prefix, self._replay = True, True
                first, again = (self.eval_points(pid, t, self.names, want_output=self.has_output) for _ in range(2))
                self._replay = all(torch.equal(first[k], v) and torch.equal(again[k], v) for k, v in shared.items())
            except torch.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001
                self._replay = False
            finally:
                self._share_prefix = False
                if not self._replay:
                    self._replays.clear()
        return agrees

    # --------------------------------------------------------------------------------------- raw forward
    def _run(self, inp, n: int, replace: Callable[[CallSite, int], torch.Tensor | None], record: set,
             stop_after: str | None, want_output: bool = False, shared: SharedPrefix | None = None,
             replay: PrefixReplay | None = None):
        out: dict = {}

        def handler(site, z):
            if site.name in record:
                v = z.detach().reshape(n, -1)
                # a replayed pass returns the recording's tensors, which an in-place site of a later pass may write
                # into (the path's points copied into its input): keep a copy, not a view of them
                out[site.name] = v.clone() if replay is not None else v
            rep = replace(site, n, z)
            if site.name == stop_after and not want_output:
                raise StopForward
            return rep
        recording = replay is not None and not replay.recorded
        try:
            res = run(self.model, lambda: self.fwd(inp), handler, shared=shared, replay=replay, **self.ckw)
        except ReplayMismatch:  # the model made other calls than when recorded: no more replays, this pass in full
            self._replay = False
            self._replays.clear()
            out.clear()
            shared = None if shared is None else SharedPrefix(
                shared.index, inp, rows=None if shared.index is not None else shared.rows, at=shared.at)
            res = run(self.model, lambda: self.fwd(inp), handler, shared=shared, **self.ckw)
        if recording:
            replay.compact()
        if replay is not None and replay.spoiled:  # changed in place after the site: no more replays
            self._replay = False
            self._replays.clear()
        elif recording:
            self._keep_replays()
        if want_output:
            out["output"] = logits_of(res)
        return out

    def rows_per_batch(self) -> int:
        return max(1, self.budget // (4 * self.row_bytes))

    def eval_points(self, pid: torch.Tensor, t: torch.Tensor, names: list[str], want_output: bool = False) -> dict:
        """Unit inputs (n, units) of sites ``names`` (and model scores when asked) at path points."""
        res: dict = {k: [] for k in names + (["output"] if want_output else [])}
        for _, o in self.eval_point_batches(pid, t, names, want_output):
            for k in res:
                res[k].append(o[k])
        return {k: torch.cat(v) for k, v in res.items()}

    def eval_point_batches(self, pid: torch.Tensor, t: torch.Tensor | None, names: list[str],
                           want_output: bool = False, at: str | None = None,
                           z_at: Callable[[slice], torch.Tensor] | None = None, ends="every point",
                           points: Callable[[slice], torch.Tensor] | None = None):
        """``eval_points`` batch by batch (as many rows as the memory budget allows): yields ``(rows, values)``,
        ``rows`` a slice of the points, so callers can place each batch without concatenating them first.

        ``points``: the points themselves instead of positions ``t`` on the paths, ``points(rows)`` (rows x
        ``spec.shape``) for a slice of them (2-D slices evaluate plane points this way; ``t`` is then None).

        ``at``, ``z_at``: the points were just made by site ``at`` and their unit inputs there are ``z_at(rows)``
        (rows x units, for a slice of the points); its output is then ``site.apply(z_at)`` (a crossed unit exactly
        on its kink, not rounding's neighbour), and the forward pass before ``at`` can run on fewer rows than the
        points (``ends``):

        * ``"every point"``: no reduction (the network before a path's site still runs once per path when
          ``share_prefix``);
        * ``"one row"``: one row, and the rest of the pass must not read a tensor made before ``at``
          (``PrefixRead`` otherwise);
        * ``(left, right, u, end_pid, end_t)``: the ends of each point's interval (points ``left[i]``, ``right[i]``
          of ``end_pid, end_t``), between which every tensor before ``at`` is affine in t; a prefix tensor read
          later is interpolated at ``u[i]``.
        """
        stop = max(names, key=self.names.index) if names else None
        step = self.rows_per_batch()
        snap = None  # the sites whose outputs at interval ends are interpolated, when they are
        if at is not None and isinstance(ends, tuple):
            snap = {e.name for e in self.processed[:self.names.index(at)] if isinstance(e.activation, ScalarKinks)}
        for s in range(0, len(pid), step):
            p, tt = pid[s:s + step], None if t is None else t[s:s + step]
            n = len(p)
            zb = None if at is None else z_at(slice(s, s + n))
            reduced = not (at is None or ends == "every point")
            if not reduced:
                rp, rt = p, tt
            else:
                if ends == "one row":
                    rp, rt = p[:1], tt[:1]

                    def rows(x):
                        raise PrefixRead(f"the forward pass after {at} reads a tensor made before it")
                else:
                    left, right, u, end_pid, end_t = ends
                    uniq, inv = torch.unique(torch.cat([left[s:s + step], right[s:s + step]]), return_inverse=True)
                    rp, rt = end_pid[uniq], end_t[uniq]

                    def rows(x, il=inv[:n], ir=inv[n:], ub=u[s:s + step], m=len(uniq)):
                        if x.dim() == 0 or x.shape[0] != m:
                            raise PrefixRead(f"a tensor made before {at} has no row per prefix point")
                        a, b = x[il], x[ir]
                        if not x.is_floating_point():
                            if not torch.equal(a, b):
                                raise PrefixRead(f"an integer tensor made before {at} differs between interval ends")
                            return a
                        return torch.lerp(a, b, ub.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))))
            x = self.spec.points(rp, rt) if points is None else points(slice(s, s + n))
            shared = replay = None
            if self.spec.site is None:
                inp = x
            elif not reduced and self.share_prefix:  # the network up to the path's site runs once per path
                uniq, inv = torch.unique(p, return_inverse=True)
                inp = index_inputs(self.spec.base, uniq)
                shared = SharedPrefix(inv, inp)
                replay = self._replay_for(uniq)
            else:
                inp = index_inputs(self.spec.base, rp)
                if ends == "one row" and self.share_prefix:  # that row's network before the path's site: replayed
                    replay = self._replay_for(rp)
            if reduced:
                shared = SharedPrefix(inputs=inp, rows=rows, at=at)

            def rep(site, n_, z, x=x, zb=zb):
                if site.name == self.spec.site:
                    return x.reshape(len(x), *self.out_shape[site.name])
                if site.name == at:
                    return site.apply(zb.reshape(len(zb), *self.z_shape[at]))
                if snap is not None and site.name in snap:
                    # an interval's end that an earlier site made holds its crossed units exactly on their kinks
                    # (as the pass that made it did); interpolating rounding's neighbour instead would carry it into
                    # every point between the ends, a unit on its kink over the interval then on its wrong side
                    near = site.activation.snapped(z)
                    return None if near is None else site.apply(near)
                return None
            o = self._run(inp, n, rep, set(names), stop, want_output, shared, replay)
            for k in names + (["output"] if want_output else []):
                if o.get(k) is None:
                    raise InvalidInputError(f"Site {k!r} did not run at some points of {self.owner}; the model's call "
                                            "graph depends on its input, which exact analyses do not support.")
            yield slice(s, s + n), o

    # --------------------------------------------------------------------------------- leaf-replaced runs
    def _leaf_run(self, values: dict, n: int, record: set, want_output: bool) -> dict:
        """Run with the source and every processed site's output replaced by ``values[name]`` (n, d) (zeros when
        absent); the model input is the source (input paths) or the first path's real input (site paths)."""
        src = values.get(SRC)
        if self.spec.site is None:
            if src is None:
                src = torch.zeros(n, math.prod(self.spec.shape), dtype=self.dtype, device=self.device)
            inp = src.reshape(n, *self.spec.shape)
        else:
            inp = index_inputs(self.spec.base, torch.zeros(n, dtype=torch.long, device=self.device))
        names = set(self.names)

        def replace(site, n_, z):
            if site.name == self.spec.site:
                v = values.get(SRC)
            elif site.name in names:
                v = values.get(site.name)
            else:
                return None
            shape = self.out_shape[site.name]
            if v is None:
                return torch.zeros(n_, *shape, dtype=self.dtype, device=self.device)
            return v.reshape(n_, *shape)
        stop = max(record, key=self.names.index) if record and not want_output else None
        return self._run(inp, n, replace, record, stop, want_output)

    def leaf_dims(self) -> dict:
        d = {SRC: math.prod(self.spec.shape)}
        d.update({n: math.prod(self.out_shape[n]) for n in self.names})
        return d

    def hidden_kink(self, sites: list[CallSite]) -> str | None:
        """The first operation that bends the network outside its sites (``capture.BendTracker``: a comparison of
        values that depend on the path, a maximum of two tensors, rounding...) and reaches the unit input of one of
        ``sites`` or, when they run to the model's last site, its output; None if there is none. The affinity
        probe can miss such a bend (its random values may never reach it), so exact methods refuse it by name."""
        last = max((s.order for s in sites), default=-1)
        if last == max((s.order for s in self.all_sites if s.name not in self.constant_sites), default=-1):
            last = math.inf
        for bend, order in self.hidden:
            if order <= last:
                target = next((f"the unit input of site {s.name!r}" for s in self.all_sites if s.order == order),
                              "the model's output")
                return f"{bend} reaches {target}"
        return None

    @staticmethod
    def bend_error(hidden: str, advice: str = "") -> NotPiecewiseLinearError:
        """The error exact methods raise for ``hidden_kink``'s description (``advice``: what else the caller can
        offer, e.g. the sampled mode)."""
        return NotPiecewiseLinearError(f"not piecewise-linear as capture sees it: {hidden}, a bend that is no "
                                       "activation the kink registry follows; write it as one (F.relu, F.leaky_relu, "
                                       f"torch.clamp, F.max_pool2d...){advice}.")

    def affinity_probe(self, want_output: bool, seed: int = 0) -> tuple[list[str], bool]:
        """Sites whose unit input is not affine in (source, earlier site outputs); and whether the output is."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        dims = self.leaf_dims()
        vals = {}
        for k, d in dims.items():
            a = torch.randn(2, d, generator=g, dtype=torch.float64).to(self.device, self.dtype)
            vals[k] = torch.cat([a, a.mean(0, keepdim=True)])
        o = self._leaf_run(vals, 3, set(self.names), want_output)
        bad = []
        for k in self.names + (["output"] if want_output else []):
            z = o.get(k)
            if z is None:
                if k == "output":
                    return bad, False
                continue
            err = (z[2] - 0.5 * (z[0] + z[1])).abs().max()
            scale = z[:2].abs().max().clamp_min(1.0)
            if not bool(err <= self.tol * scale):
                if k == "output":
                    return bad, False
                bad.append(k)
        return bad, True if want_output else False

    def extract_affine(self, want_output: bool) -> Affine | None:
        """Jacobian blocks between sites, or None when they would not fit in half the memory budget."""
        dims = self.leaf_dims()
        zd = {n: math.prod(self.z_shape[n]) for n in self.names}
        order = [SRC] + self.names
        targets = list(self.names) + (["output"] if want_output else [])
        est = sum(dims[l] * zd[m] for i, l in enumerate(order) for m in self.names[i:])
        if 8 * est > self.budget // 2:
            return None
        jt, c, deps = {}, {}, {m: [] for m in targets}
        base_rows = None
        for i, leaf in enumerate(order):
            later = set(self.names[i:])
            if not later and not want_output:
                continue
            d = dims[leaf]
            step = max(1, min(d + 1, self.budget // (8 * self.row_bytes)))
            rows: dict = {}
            for s in range(0, d + 1, step):
                r = torch.arange(s, min(d + 1, s + step), device=self.device)
                basis = torch.zeros(len(r), d, dtype=self.dtype, device=self.device)
                nz = r > 0
                basis[nz.nonzero().flatten(), r[nz] - 1] = 1.0
                o = self._leaf_run({leaf: basis}, len(r), later, want_output)
                for k, v in o.items():
                    if v is not None:
                        rows.setdefault(k, []).append(v)
            rows = {k: torch.cat(v) for k, v in rows.items()}
            if base_rows is None:
                base_rows = {k: v[0:1] for k, v in rows.items()}
            for m, z in rows.items():
                if m != "output" and m not in later:
                    continue
                block = z[1:] - z[0:1]
                if bool((block != 0).any()):
                    jt[m, leaf] = block.contiguous()
                    deps[m].append(leaf)
        if want_output and "output" not in base_rows:
            targets.remove("output")
            deps.pop("output", None)
            want_output = False
        if self.spec.site is None:
            c = {m: base_rows[m] for m in targets}
        else:
            # constants differ per path: every branch that does not pass through the path site sees the real input
            res = {m: [] for m in targets}
            step = self.rows_per_batch()
            for s in range(0, self.spec.n_paths, step):
                p = torch.arange(s, min(self.spec.n_paths, s + step), device=self.device)
                inp = index_inputs(self.spec.base, p)
                names = set(self.names)

                def replace(site, n_, z):
                    if site.name == self.spec.site or site.name in names:
                        return torch.zeros(n_, *self.out_shape[site.name], dtype=self.dtype, device=self.device)
                    return None
                o = self._run(inp, len(p), replace, set(self.names), None if want_output else
                              (max(self.names, key=self.names.index) if self.names else None), want_output)
                for m in targets:
                    res[m].append(o[m])
            c = {m: torch.cat(v) for m, v in res.items()}
        return Affine(deps, jt, c)
