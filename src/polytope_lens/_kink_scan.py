"""One pass over a site's unit inputs at the points of many polylines: which units change side of a kink between
consecutive points, and the activation's output at every point.

This is the inner loop of exact paths on a GPU (``paths.exact``, append layout): the unit inputs ``z`` of a site are
held in the order the points were made (rows), and the polylines visit those rows in ``order``. A unit changes side
between consecutive points i and i + 1 of one polyline when ``z[order[i]] > kink`` differs from
``z[order[i + 1]] > kink``; where exactly it crosses is ``ScalarKinks.crossings_of``'s business, for the few pairs
this pass flags. Done with torch operations this is about ten passes over (points x units) values; the Triton
kernel reads each unit input once and writes one byte per unit and segment, plus the output when asked (used when
Triton is importable and the tensors are on a GPU; ``torch_scan`` is the same computation with torch operations, and
the two are tested against each other in Triton's interpreter).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

try:  # Triton comes with CUDA builds of torch; CPU runs never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["scan", "torch_scan", "triton_scan", "triton_ready", "interpolated_outputs"]

_BLOCK_ROWS = 16
_BLOCK_UNITS = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


USE_TRITON = True  # False: always ``torch_scan`` (comparisons: benchmarks/bench_paths.py --scan torch)
_failed: list[str] = []  # the error of a kernel that failed to build or run here (then torch operations are used)


def triton_ready(z: torch.Tensor) -> bool:
    """True when the Triton kernels can take ``z``: Triton is importable, no kernel has failed in this process, and
    ``z`` is on a GPU (or Triton runs its interpreter, ``TRITON_INTERPRET=1``, which takes CPU tensors: the
    tests)."""
    return (USE_TRITON and triton is not None and not _failed
            and (z.is_cuda or (_interpreting() and z.device.type == "cpu")))


@functools.lru_cache(maxsize=64)
def _on_device(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A kink as a one-element tensor, made once per device: a float argument would reach a kernel as float32, and
    a copy from the host per call would wait for the device."""
    return torch.tensor([value], dtype=dtype, device=device)


def _launch(kernel, grid, *args, **meta) -> bool:
    """Run a kernel; on failure (a GPU or Triton build that cannot compile it) warn once, remember, return False."""
    try:
        kernel[grid](*args, **meta)
        return True
    except Exception as e:  # noqa: BLE001 - any build or launch error means: use torch operations instead
        _failed.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"polytope-lens: a Triton kernel failed ({_failed[-1].splitlines()[0][:200]}); exact paths "
                      "use torch operations from now on (same results, slower)", RuntimeWarning, stacklevel=3)
        return False


def scan(z: torch.Tensor, order: torch.Tensor, pid: torch.Tensor, kink: float, offset: torch.Tensor | None = None,
         apply: Callable[[torch.Tensor], torch.Tensor] | None = None, lines: torch.Tensor | None = None):
    """Side changes along polylines and (optionally) the activation's output, in one pass where Triton can.

    Parameters
    ----------
    z : (rows, units) float tensor, contiguous
        Unit inputs, less ``offset``.
    order : (n,) int64
        The polylines' points, in order, as rows of ``z``.
    pid : (n,) int64
        The polyline each point of ``order`` is on; consecutive points of different polylines are no segment.
    kink : float
        The kink (one-kink activations).
    offset : (1, units) or None
        Added to every row of ``z`` before anything else (a bias kept out of the matrix product).
    apply : callable or None
        The activation; the output is computed only when it is given.
    lines : (4, units) or None
        The same activation as the slopes and intercepts of its two pieces, ``(g0, g1, h0, h1)``: ``g1 z + h1``
        above the kink, ``g0 z + h0`` at or below it (``paths.exact.piece_lines``, checked against ``apply``
        there), which the kernel evaluates in its pass instead of ``apply``.

    Returns
    -------
    changes : (n - 1, units) int8
        1 where the unit is on different sides of the kink at points i and i + 1 of one polyline.
    out : (rows, units) or None
        The activation's output at every row of ``z`` (None without ``apply``).
    """
    if triton_ready(z):
        done = triton_scan(z, order, pid, kink, offset, lines if apply is not None else None)
        if done is not None:
            changes, out = done
            if out is None and apply is not None:
                out = apply(z if offset is None else z + offset)
            return changes, out
    return torch_scan(z, order, pid, kink, offset, apply)


def torch_scan(z, order, pid, kink, offset=None, apply=None):
    """``scan`` with torch operations (the activation's output through ``apply``)."""
    zb = z if offset is None else z + offset
    up = (zb > kink).index_select(0, order)
    changes = (up[:-1] != up[1:]) & (pid[:-1] == pid[1:])[:, None]
    return changes.view(torch.int8), (None if apply is None else apply(zb))


def triton_scan(z, order, pid, kink, offset=None, lines=None):
    """``scan`` as one Triton kernel (output from ``lines`` when given); None if the kernel failed."""
    rows, units = z.shape
    n = len(order)
    z = z.contiguous()
    changes = torch.empty((max(n - 1, 0), units), dtype=torch.int8, device=z.device)
    out = torch.empty_like(z) if lines is not None else None
    if n == 0 or units == 0:
        return changes, out
    dummy = z[:1, :1]
    kink_t = _on_device(kink, z.dtype, z.device)
    grid = (triton.cdiv(n, _BLOCK_ROWS), triton.cdiv(units, _BLOCK_UNITS))
    ok = _launch(_scan_kernel, grid, z, order.contiguous(), pid.contiguous(),
                 dummy if offset is None else offset.contiguous(), dummy if lines is None else lines.contiguous(),
                 changes, dummy if out is None else out, n, units, kink_t, HAS_OFFSET=offset is not None,
                 WRITE_OUT=lines is not None, BLOCK_ROWS=_BLOCK_ROWS, BLOCK_UNITS=_BLOCK_UNITS)
    return (changes, out) if ok else None


def interpolated_outputs(z: torch.Tensor, left: torch.Tensor, right: torch.Tensor, u: torch.Tensor, kink: float,
                         lines: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor | None:
    """The activation's output at new points between rows ``left`` and ``right`` of ``z`` (plus ``offset``), at
    relative positions ``u``: ``lines``' activation of ``torch.lerp``'s interpolation, in one Triton pass
    (``triton_ready(z)`` must hold); None if the kernel failed. Units that cross their kink at a new point are the
    caller's to set."""
    n, units = len(u), z.shape[1]
    out = torch.empty((n, units), dtype=z.dtype, device=z.device)
    if n == 0 or units == 0:
        return out
    dummy = z[:1, :1]
    kink_t = _on_device(kink, z.dtype, z.device)
    grid = (triton.cdiv(n, _BLOCK_ROWS), triton.cdiv(units, _BLOCK_UNITS))
    ok = _launch(_lerp_kernel, grid, z.contiguous(), left.contiguous(), right.contiguous(), u.contiguous(),
                 dummy if offset is None else offset.contiguous(), lines.contiguous(), out, n, units, kink_t,
                 HAS_OFFSET=offset is not None, BLOCK_ROWS=_BLOCK_ROWS, BLOCK_UNITS=_BLOCK_UNITS)
    return out if ok else None


if triton is not None:
    @triton.jit(do_not_specialize=["n"])
    def _lerp_kernel(z_ptr, left_ptr, right_ptr, u_ptr, offset_ptr, lines_ptr, out_ptr, n, units, kink_ptr,
                     HAS_OFFSET: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_UNITS: tl.constexpr):
        i = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        u = tl.program_id(1) * BLOCK_UNITS + tl.arange(0, BLOCK_UNITS)
        in_u = u < units
        here = i < n
        m = here[:, None] & in_u[None, :]
        lo = tl.load(left_ptr + i, mask=here, other=0)
        hi = tl.load(right_ptr + i, mask=here, other=0)
        w = tl.load(u_ptr + i, mask=here, other=0.0)[:, None]
        za = tl.load(z_ptr + lo[:, None] * units + u[None, :], mask=m, other=0.0)
        zb = tl.load(z_ptr + hi[:, None] * units + u[None, :], mask=m, other=0.0)
        if HAS_OFFSET:
            c = tl.load(offset_ptr + u, mask=in_u, other=0.0)[None, :]
            za = za + c
            zb = zb + c
        d = zb - za
        v = tl.where(w < 0.5, za + w * d, zb - d * (1.0 - w))  # torch.lerp's two forms
        kink = tl.load(kink_ptr)
        g0 = tl.load(lines_ptr + u, mask=in_u, other=0.0)[None, :]
        g1 = tl.load(lines_ptr + units + u, mask=in_u, other=0.0)[None, :]
        h0 = tl.load(lines_ptr + 2 * units + u, mask=in_u, other=0.0)[None, :]
        h1 = tl.load(lines_ptr + 3 * units + u, mask=in_u, other=0.0)[None, :]
        y = tl.where(v > kink, v * g1 + h1, v * g0 + h0)
        tl.store(out_ptr + i[:, None].to(tl.int64) * units + u[None, :], y, mask=m)

    @triton.jit(do_not_specialize=["n"])
    def _scan_kernel(z_ptr, order_ptr, pid_ptr, offset_ptr, lines_ptr, changes_ptr, out_ptr, n, units, kink_ptr,
                     HAS_OFFSET: tl.constexpr, WRITE_OUT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_UNITS: tl.constexpr):
        # a block of consecutive points (and the point after it) times a block of units
        i = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        u = tl.program_id(1) * BLOCK_UNITS + tl.arange(0, BLOCK_UNITS)
        in_u = u < units
        here, nxt = i < n, i + 1 < n
        row = tl.load(order_ptr + i, mask=here, other=0)
        row1 = tl.load(order_ptr + i + 1, mask=nxt, other=0)
        p0 = tl.load(pid_ptr + i, mask=here, other=-1)
        p1 = tl.load(pid_ptr + i + 1, mask=nxt, other=-2)
        m0 = here[:, None] & in_u[None, :]
        m1 = nxt[:, None] & in_u[None, :]
        z0 = tl.load(z_ptr + row[:, None] * units + u[None, :], mask=m0, other=0.0)
        z1 = tl.load(z_ptr + row1[:, None] * units + u[None, :], mask=m1, other=0.0)
        if HAS_OFFSET:
            c = tl.load(offset_ptr + u, mask=in_u, other=0.0)[None, :]
            z0 = z0 + c
            z1 = z1 + c
        kink = tl.load(kink_ptr)
        up0 = z0 > kink
        change = (up0 != (z1 > kink)) & (p0 == p1)[:, None]
        tl.store(changes_ptr + i[:, None].to(tl.int64) * units + u[None, :], change.to(tl.int8), mask=m1)
        if WRITE_OUT:
            g0 = tl.load(lines_ptr + u, mask=in_u, other=0.0)[None, :]
            g1 = tl.load(lines_ptr + units + u, mask=in_u, other=0.0)[None, :]
            h0 = tl.load(lines_ptr + 2 * units + u, mask=in_u, other=0.0)[None, :]
            h1 = tl.load(lines_ptr + 3 * units + u, mask=in_u, other=0.0)[None, :]
            y = tl.where(up0, z0 * g1 + h1, z0 * g0 + h0)
            tl.store(out_ptr + row[:, None] * units + u[None, :], y, mask=m0)
