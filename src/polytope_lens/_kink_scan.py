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

import contextlib
import functools
import os
import warnings
from collections.abc import Callable

import torch

__all__ = ["scan", "torch_scan", "triton_scan", "triton_ready", "interpolated_outputs", "piece_bytes"]

_BLOCK_ROWS = 16
_BLOCK_UNITS = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


USE_TRITON = True  # False: always ``torch_scan`` (comparisons: benchmarks/bench_paths.py --scan torch)
_failed: list[str] = []  # the error of a kernel that failed to build or run here (then torch operations are used)


@functools.cache
def _kernels():
    """The kernel module, or None without Triton (CUDA builds of torch bring it; imported on first use)."""
    try:
        from . import _kink_kernels
    except ImportError:  # pragma: no cover - depends on the install
        return None
    return _kink_kernels


def triton_ready(z: torch.Tensor) -> bool:
    """True when the Triton kernels can take ``z``: ``z`` is on a GPU (or Triton runs its interpreter,
    ``TRITON_INTERPRET=1``, which takes CPU tensors: the tests), Triton is importable, and no kernel has failed in
    this process."""
    return (USE_TRITON and not _failed and (z.is_cuda or (_interpreting() and z.device.type == "cpu"))
            and _kernels() is not None)


@functools.lru_cache(maxsize=64)
def _on_device(value: float | tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A kink (or the kinks) as a tensor, made once per device: a float argument would reach a kernel as float32,
    and a copy from the host per call would wait for the device."""
    return torch.tensor(value if isinstance(value, tuple) else [value], dtype=dtype, device=device)


def _as_kinks(kink: float | tuple[float, ...]) -> tuple[float, ...]:
    """One kink or several, as a tuple."""
    return (kink,) if isinstance(kink, (int, float)) else tuple(kink)


def piece_bytes(z: torch.Tensor, kinks: tuple[float, ...]) -> torch.Tensor:
    """Each unit input's piece, the number of ``kinks`` below it, as bytes (one comparison per kink, no wider
    integers: what the scans compare between points)."""
    piece = (z > kinks[0]).view(torch.uint8)
    for k in kinks[1:]:
        piece = piece + (z > k).view(torch.uint8)
    return piece


def _launch(kernel, grid, *args, **meta) -> bool:
    """Run a kernel; on failure (a GPU or Triton build that cannot compile it) warn once, remember, return False."""
    on = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    try:
        # Triton launches on the current CUDA device: the tensors' own (a path on cuda:1)
        with torch.cuda.device(on) if on is not None and on.type == "cuda" else contextlib.nullcontext():
            kernel[grid](*args, **meta)
        return True
    except torch.OutOfMemoryError:  # the device's limit, not the kernel's: a piece of a path is retried smaller
        raise
    except Exception as e:  # noqa: BLE001 - any build or launch error means: use torch operations instead
        _failed.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"polytope-lens: a Triton kernel failed ({_failed[-1].splitlines()[0][:200]}); exact paths "
                      "use torch operations from now on (same results, slower)", RuntimeWarning, stacklevel=3)
        return False


def scan(z: torch.Tensor, order: torch.Tensor, pid: torch.Tensor, kink: float | tuple[float, ...],
         offset: torch.Tensor | None = None, apply: Callable[[torch.Tensor], torch.Tensor] | None = None,
         lines: torch.Tensor | None = None):
    """Piece changes along polylines and (optionally) the activation's output, in one pass where Triton can.

    Parameters
    ----------
    z : (rows, units) float tensor, contiguous
        Unit inputs, less ``offset``.
    order : (n,) int64
        The polylines' points, in order, as rows of ``z``.
    pid : (n,) int64
        The polyline each point of ``order`` is on; consecutive points of different polylines are no segment.
    kink : float or tuple of floats
        The kink, or the kinks in ascending order (the piece is the number of kinks below the unit input).
    offset : (1, units) or None
        Added to every row of ``z`` before anything else (a bias kept out of the matrix product).
    apply : callable or None
        The activation; the output is computed only when it is given.
    lines : (4, units) or None
        The same activation as the slopes and intercepts of its two pieces, ``(g0, g1, h0, h1)``: ``g1 z + h1``
        above the kink, ``g0 z + h0`` at or below it (``paths.exact.piece_lines``, checked against ``apply``
        there), which the kernel evaluates in its pass instead of ``apply`` (one kink only).

    Returns
    -------
    changes : (n - 1, units) int8
        1 where the unit is on different pieces at points i and i + 1 of one polyline.
    out : (rows, units) or None
        The activation's output at every row of ``z`` (None without ``apply``).
    """
    kinks = _as_kinks(kink)
    if lines is not None and len(kinks) != 1:
        raise ValueError("scan: lines describe a one-kink activation")
    if triton_ready(z):
        done = triton_scan(z, order, pid, kinks, offset, lines if apply is not None else None)
        if done is not None:
            changes, out = done
            if out is None and apply is not None:
                out = apply(z if offset is None else z + offset)
            return changes, out
    return torch_scan(z, order, pid, kinks, offset, apply)


def torch_scan(z, order, pid, kink, offset=None, apply=None):
    """``scan`` with torch operations (the activation's output through ``apply``)."""
    zb = z if offset is None else z + offset
    up = piece_bytes(zb, _as_kinks(kink)).index_select(0, order)
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
    kinks = _as_kinks(kink)
    kink_t = _on_device(kinks, z.dtype, z.device)
    grid = (-(-n // _BLOCK_ROWS), -(-units // _BLOCK_UNITS))
    ok = _launch(_kernels().scan_kernel, grid, z, order.contiguous(), pid.contiguous(),
                 dummy if offset is None else offset.contiguous(), dummy if lines is None else lines.contiguous(),
                 changes, dummy if out is None else out, n, units, kink_t, HAS_OFFSET=offset is not None,
                 WRITE_OUT=lines is not None, N_KINKS=len(kinks), BLOCK_ROWS=_BLOCK_ROWS, BLOCK_UNITS=_BLOCK_UNITS)
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
    grid = (-(-n // _BLOCK_ROWS), -(-units // _BLOCK_UNITS))
    ok = _launch(_kernels().lerp_kernel, grid, z.contiguous(), left.contiguous(), right.contiguous(), u.contiguous(),
                 dummy if offset is None else offset.contiguous(), lines.contiguous(), out, n, units, kink_t,
                 HAS_OFFSET=offset is not None, BLOCK_ROWS=_BLOCK_ROWS, BLOCK_UNITS=_BLOCK_UNITS)
    return out if ok else None
