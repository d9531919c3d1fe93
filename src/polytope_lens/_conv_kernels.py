"""The Triton kernel of ``_conv64.pointwise_conv2d``'s Triton way (imported only when it can run: importing Triton
takes ~0.1 s, which CPU runs need not pay). ``benchmarks/bench_fused_depthwise.py`` times it with its fused ReLU6
prologue and residual epilogue, the next steps for the frontier's passes."""

import triton
import triton.language as tl


@triton.jit
def pointwise_kernel(x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, CI: tl.constexpr, CO, P, HAS_BIAS: tl.constexpr,
                     CLAMP: tl.constexpr, RESIDUAL: tl.constexpr, DOT: tl.constexpr, BCO: tl.constexpr,
                     BCI: tl.constexpr, BP: tl.constexpr):
    """One image's block of output channels and positions of a 1 x 1 convolution: the weight (CO x CI) times the
    image's (CI x P) inputs (contiguous images), clamped to [0, 6] as they are loaded when CLAMP (a ReLU6 before
    the convolution), plus the bias and, when RESIDUAL, the same block of ``r``. DOT: ``tl.dot`` (float64 products
    and sums), else broadcast products summed (where float64 ``tl.dot`` does not build)."""
    img = tl.program_id(0).to(tl.int64)
    co = tl.program_id(1) * BCO + tl.arange(0, BCO)
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    acc = tl.zeros([BCO, BP], dtype=tl.float64)
    for c0 in range(0, CI, BCI):
        ci = c0 + tl.arange(0, BCI)
        w = tl.load(w_ptr + co[:, None] * CI + ci[None, :], mask=(co[:, None] < CO) & (ci[None, :] < CI), other=0.0)
        x = tl.load(x_ptr + img * CI * P + ci[:, None] * P + p[None, :], mask=(ci[:, None] < CI) & (p[None, :] < P),
                    other=0.0)
        if CLAMP:
            x = tl.minimum(tl.maximum(x, 0.0), 6.0)
        if DOT:
            acc += tl.dot(w, x)
        else:
            acc += tl.sum(w[:, :, None] * x[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co < CO, other=0.0)[:, None]
    where = img * CO * P + co[:, None] * P + p[None, :]
    inside = (co[:, None] < CO) & (p[None, :] < P)
    if RESIDUAL:
        acc += tl.load(r_ptr + where, mask=inside, other=0.0)
    tl.store(out_ptr + where, acc, mask=inside)
