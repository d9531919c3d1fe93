"""The Triton kernels of ``_kink_scan`` (imported only when they can run: importing Triton takes ~0.1 s, which CPU
runs need not pay)."""

import triton
import triton.language as tl


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
def scan_kernel(z_ptr, order_ptr, pid_ptr, offset_ptr, lines_ptr, changes_ptr, out_ptr, n, units, kink_ptr,
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
