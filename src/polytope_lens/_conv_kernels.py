"""Triton kernels for float64 convolutions (``_conv64``'s Triton ways; imported only when they can run: importing
Triton takes ~0.1 s, which CPU runs need not pay).

* ``pointwise_kernel``: a 1 x 1 convolution of contiguous images, optionally with a clamp applied to its input as it
  is loaded (the clamp site before it) and a residual added as it stores;
* ``clamp_depthwise_kernel``: a clamp site, zero padding and a depthwise convolution in one pass.

Both read a site's unit inputs once and write the next values once: torch's separate steps write and read the
site's output (and its padded copy) in between. ``benchmarks/bench_fused_depthwise.py`` times them against those
steps at every such layer of EfficientNet-Lite0; the frontier evaluator runs them
(``frontier.FUSE_SITE_CONVOLUTIONS``)."""

import triton
import triton.language as tl


@triton.jit
def pointwise_kernel(x_ptr, w_ptr, b_ptr, lim_ptr, r_ptr, out_ptr, CI: tl.constexpr, CO, P, HAS_BIAS: tl.constexpr,
                     CLAMP: tl.constexpr, HAS_HI: tl.constexpr, RESIDUAL: tl.constexpr, BCO: tl.constexpr,
                     BCI: tl.constexpr, BP: tl.constexpr):
    """One image's block of output channels and positions of a 1 x 1 convolution: the weight (CO x CI) times the
    image's (CI x P) inputs (contiguous images), each input clamped to [lim[0], lim[1]] as it is loaded when CLAMP
    (no upper bound unless HAS_HI), plus the bias and, when RESIDUAL, the same block of ``r``; the products and
    sums by ``tl.dot`` in float64 (which needs BCI >= 16)."""
    img = tl.program_id(0).to(tl.int64)
    co = tl.program_id(1) * BCO + tl.arange(0, BCO)
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    acc = tl.zeros([BCO, BP], dtype=tl.float64)
    if CLAMP:
        lo = tl.load(lim_ptr)
        if HAS_HI:
            hi = tl.load(lim_ptr + 1)
    for c0 in range(0, CI, BCI):
        ci = c0 + tl.arange(0, BCI)
        w = tl.load(w_ptr + co[:, None] * CI + ci[None, :], mask=(co[:, None] < CO) & (ci[None, :] < CI), other=0.0)
        x = tl.load(x_ptr + img * CI * P + ci[:, None] * P + p[None, :], mask=(ci[:, None] < CI) & (p[None, :] < P),
                    other=0.0)
        if CLAMP:  # masked entries meet a zero weight or are not stored
            x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.clamp keeps it
            if HAS_HI:
                x = tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)
        acc += tl.dot(w, x)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co < CO, other=0.0)[:, None]
    where = img * CO * P + co[:, None] * P + p[None, :]
    inside = (co[:, None] < CO) & (p[None, :] < P)
    if RESIDUAL:
        acc += tl.load(r_ptr + where, mask=inside, other=0.0)
    tl.store(out_ptr + where, acc, mask=inside)


@triton.jit
def clamp_depthwise_kernel(z_ptr, w_ptr, b_ptr, lim_ptr, out_ptr, PER_IMAGE, C, H, W, OH, OW, KH: tl.constexpr,
                           KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_HI: tl.constexpr, BLOCK: tl.constexpr):
    """A block of one image's outputs (contiguous; channels and positions as one index, so small images fill the
    block as well as large ones; 32-bit index arithmetic within the image) of a depthwise convolution of the
    zero-padded clamp of ``z``: each output is the bias plus the sum over the kernel of clamp(z, lim[0], lim[1])
    times the channel's weight, 0 in place of the clamp outside the image (the padding is of the site's output)."""
    img = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < PER_IMAGE
    ow = offs % OW
    rest = offs // OW
    oh = rest % OH
    c = rest // OH
    lo = tl.load(lim_ptr)
    if HAS_HI:
        hi = tl.load(lim_ptr + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    base = z_ptr + img * C * H * W + c * (H * W)
    for kh in tl.static_range(KH):
        ih = oh * SH - PT + kh
        row_ok = inside & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = ow * SW - PL + kw
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.maximum(tl.load(base + ih * W + iw, mask=ok, other=0.0), lo, propagate_nan=tl.PropagateNan.ALL)
            if HAS_HI:
                v = tl.minimum(v, hi, propagate_nan=tl.PropagateNan.ALL)
            v = tl.where(ok, v, 0.0)
            acc += v * tl.load(w_ptr + c * (KH * KW) + (kh * KW + kw), mask=inside, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=inside, other=0.0)
    tl.store(out_ptr + img * PER_IMAGE + offs, acc, mask=inside)
