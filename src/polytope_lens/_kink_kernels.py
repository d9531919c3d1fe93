"""The Triton kernels of ``_kink_scan`` (imported only when they can run: importing Triton takes ~0.1 s, which CPU
runs need not pay)."""

import triton
import triton.language as tl


@triton.jit
def _rows(z_ptr, row_a, row_b, mask_a, mask_b, u, in_u, units, offset_ptr, HAS_OFFSET: tl.constexpr):
    """Rows ``row_a`` and ``row_b`` of ``z`` at units ``u``, plus the per-unit offset when there is one."""
    za = tl.load(z_ptr + row_a[:, None] * units + u[None, :], mask=mask_a, other=0.0)
    zb = tl.load(z_ptr + row_b[:, None] * units + u[None, :], mask=mask_b, other=0.0)
    if HAS_OFFSET:
        c = tl.load(offset_ptr + u, mask=in_u, other=0.0)[None, :]
        za = za + c
        zb = zb + c
    return za, zb


@triton.jit
def _through_lines(v, up, lines_ptr, u, in_u, units):
    """The activation's output at unit inputs ``v``: the line above the kink where ``up``, the one below elsewhere
    (``lines``: slopes below and above, then intercepts below and above, one row of units each)."""
    g0 = tl.load(lines_ptr + u, mask=in_u, other=0.0)[None, :]
    g1 = tl.load(lines_ptr + units + u, mask=in_u, other=0.0)[None, :]
    h0 = tl.load(lines_ptr + 2 * units + u, mask=in_u, other=0.0)[None, :]
    h1 = tl.load(lines_ptr + 3 * units + u, mask=in_u, other=0.0)[None, :]
    return tl.where(up, v * g1 + h1, v * g0 + h0)


@triton.jit(do_not_specialize=["n"])
def lerp_kernel(z_ptr, left_ptr, right_ptr, u_ptr, offset_ptr, lines_ptr, out_ptr, n, units, kink_ptr,
                HAS_OFFSET: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_UNITS: tl.constexpr):
    i = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    u = tl.program_id(1) * BLOCK_UNITS + tl.arange(0, BLOCK_UNITS)
    in_u = u < units
    here = i < n
    m = here[:, None] & in_u[None, :]
    lo = tl.load(left_ptr + i, mask=here, other=0)
    hi = tl.load(right_ptr + i, mask=here, other=0)
    w = tl.load(u_ptr + i, mask=here, other=0.0)[:, None]
    za, zb = _rows(z_ptr, lo, hi, m, m, u, in_u, units, offset_ptr, HAS_OFFSET)
    d = zb - za
    v = tl.where(w < 0.5, za + w * d, zb - d * (1.0 - w))  # torch.lerp's two forms
    kink = tl.load(kink_ptr)
    y = _through_lines(v, v > kink, lines_ptr, u, in_u, units)
    tl.store(out_ptr + i[:, None].to(tl.int64) * units + u[None, :], y, mask=m)


@triton.jit(do_not_specialize=["n"])
def scan_kernel(z_ptr, order_ptr, pid_ptr, offset_ptr, lines_ptr, changes_ptr, out_ptr, n, units, kink_ptr,
                HAS_OFFSET: tl.constexpr, WRITE_OUT: tl.constexpr, N_KINKS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
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
    z0, z1 = _rows(z_ptr, row, row1, m0, m1, u, in_u, units, offset_ptr, HAS_OFFSET)
    kink = tl.load(kink_ptr)
    up0 = z0 > kink
    if N_KINKS == 1:
        change = up0 != (z1 > kink)
    else:  # the pieces: how many kinks lie below each input
        piece0 = up0.to(tl.int32)
        piece1 = (z1 > kink).to(tl.int32)
        for j in tl.static_range(1, N_KINKS):
            kj = tl.load(kink_ptr + j)
            piece0 += (z0 > kj).to(tl.int32)
            piece1 += (z1 > kj).to(tl.int32)
        change = piece0 != piece1
    change = change & (p0 == p1)[:, None]
    tl.store(changes_ptr + i[:, None].to(tl.int64) * units + u[None, :], change.to(tl.int8), mask=m1)
    if WRITE_OUT:  # one kink (``scan`` checks)
        y = _through_lines(z0, up0, lines_ptr, u, in_u, units)
        tl.store(out_ptr + row[:, None] * units + u[None, :], y, mask=m0)
