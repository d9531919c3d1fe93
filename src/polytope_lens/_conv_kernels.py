"""The Triton kernel of ``_conv64.pointwise_conv2d``'s Triton way (imported only when it can run: importing Triton
takes ~0.1 s, which CPU runs need not pay)."""

import triton
import triton.language as tl


@triton.jit
def pointwise_kernel(x_ptr, w_ptr, b_ptr, out_ptr, CI: tl.constexpr, CO, P, HAS_BIAS: tl.constexpr,
                     BCO: tl.constexpr, BCI: tl.constexpr, BP: tl.constexpr):
    """One image's block of output channels and positions of a 1 x 1 convolution: the weight (CO x CI) times the
    image's (CI x P) inputs (contiguous images), plus the bias; float64 products and sums (``tl.dot``)."""
    img = tl.program_id(0).to(tl.int64)
    co = tl.program_id(1) * BCO + tl.arange(0, BCO)
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    acc = tl.zeros([BCO, BP], dtype=tl.float64)
    for c0 in range(0, CI, BCI):
        ci = c0 + tl.arange(0, BCI)
        w = tl.load(w_ptr + co[:, None] * CI + ci[None, :], mask=(co[:, None] < CO) & (ci[None, :] < CI), other=0.0)
        x = tl.load(x_ptr + img * CI * P + ci[:, None] * P + p[None, :], mask=(ci[:, None] < CI) & (p[None, :] < P),
                    other=0.0)
        acc += tl.dot(w, x)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co < CO, other=0.0)[:, None]
    inside = (co[:, None] < CO) & (p[None, :] < P)
    tl.store(out_ptr + img * CO * P + co[:, None] * P + p[None, :], acc, mask=inside)
