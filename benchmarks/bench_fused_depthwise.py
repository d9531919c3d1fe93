"""Fused float64 steps for the frontier's passes on a GPU: an experiment (the library has the plain 1 x 1 kernel).

    python benchmarks/bench_fused_depthwise.py --device cuda [--batch 256]
    TRITON_INTERPRET=1 python benchmarks/bench_fused_depthwise.py --device cpu --batch 1 --layers 2   (values only)

On an H100 (stop 24, docs/benchmarks.md) the whole full-network EfficientNet-Lite0 path is device time, most of it
the float64 passes after each crossing's site, which run their operators one by one at 3.8 TFLOP/s. Before each
depthwise convolution such a pass applies the site's ReLU6 to the unit inputs, pads the result with zeros
(asymmetrically before the strided layers, which the frontier's fold leaves), and then convolves, with batch norm
folded into the weight and bias. One Triton kernel here does all three: it clamps each input as it is loaded, reads
the padding as masked loads, and adds the bias as it stores. It reads the unit inputs once and writes the next
ones once; the torch way writes and reads the activation and the padded copy in between. A second kernel, the
library's (``polytope_lens._conv_kernels``, whose plain form is ``_conv64``'s opt-in Triton way), does a
1 x 1 convolution the same way (the ReLU6 before a projection as it loads, the bias and a block's residual as it
stores). For every depthwise and 1 x 1 layer of the blocks (not the head's 1 x 1 convolution)
of EfficientNet-Lite0 at its shape, the script checks that the two agree (1e-12 relative), then times both (best of
--repeat, after a warm-up) and prints the sum. A win here would be worth moving into the frontier's graph (a fused
node for site, padding and depthwise convolution); Triton's interpreter checks the values on a CPU, not the speed.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.utils.fusion import fuse_conv_bn_weights

from bench_forward64_device import timed  # this folder (run as a script)
from polytope_lens._conv_kernels import pointwise_kernel  # the library's 1 x 1 kernel (``_conv64.POINTWISE_WAY``)
from polytope_lens.models import load_model


@triton.jit
def relu6_pad_depthwise(z_ptr, w_ptr, b_ptr, out_ptr, C, H, W, OH, OW, K: tl.constexpr, S: tl.constexpr,
                        PT: tl.constexpr, PL: tl.constexpr, BLOCK: tl.constexpr):
    """One image plane's block of outputs: sum over the kernel of clamp(z, 0, 6) (0 outside the image) times the
    weight, plus the bias."""
    plane = tl.program_id(0)  # image * C + channel
    c = plane % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < OH * OW
    oh = offs // OW
    ow = offs % OW
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    base = z_ptr + plane.to(tl.int64) * H * W
    for kh in tl.static_range(K):
        ih = oh * S - PT + kh
        row_ok = inside & (ih >= 0) & (ih < H)
        for kw in tl.static_range(K):
            iw = ow * S - PL + kw
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(base + ih * W + iw, mask=ok, other=0.0)
            v = tl.minimum(tl.maximum(v, 0.0), 6.0)
            acc += v * tl.load(w_ptr + c * K * K + kh * K + kw)
    acc += tl.load(b_ptr + c)
    tl.store(out_ptr + plane.to(tl.int64) * OH * OW + offs, acc, mask=inside)


def fused_pointwise(x, weight, bias, clamp, residual=None, dot=True, bco=32, bci=16, bp=64):
    n, ci, h, w = x.shape
    co = weight.shape[0]
    out = torch.empty(n, co, h, w, dtype=x.dtype, device=x.device)
    grid = (n, triton.cdiv(co, bco), triton.cdiv(h * w, bp))
    pointwise_kernel[grid](x, weight.reshape(co, ci), bias, out if residual is None else residual, out, ci, co,
                           h * w, HAS_BIAS=True, CLAMP=clamp, RESIDUAL=residual is not None, DOT=dot, BCO=bco,
                           BCI=bci, BP=bp)
    return out


def unfused_pointwise(x, weight, bias, clamp, residual=None):
    y = F.conv2d(F.hardtanh(x, 0.0, 6.0) if clamp else x, weight, bias)
    return y if residual is None else y + residual


def fused(z, weight, bias, stride, pads, block=256):
    n, c, h, w = z.shape
    k = weight.shape[-1]
    left, right, top, bottom = pads
    oh = (h + top + bottom - k) // stride + 1
    ow = (w + left + right - k) // stride + 1
    out = torch.empty(n, c, oh, ow, dtype=z.dtype, device=z.device)
    grid = (n * c, triton.cdiv(oh * ow, block))
    relu6_pad_depthwise[grid](z, weight, bias, out, c, h, w, oh, ow, K=k, S=stride, PT=top, PL=left, BLOCK=block)
    return out


def unfused(z, weight, bias, stride, pads):
    """torch's steps as the frontier's folded graph runs them: symmetric padding inside the convolution, the
    asymmetric padding of the strided layers as its own step."""
    left, right, top, bottom = pads
    a = F.hardtanh(z, 0.0, 6.0)
    if left == right and top == bottom:
        return F.conv2d(a, weight, bias, stride, (top, left), 1, z.shape[1])
    return F.conv2d(F.pad(a, pads), weight, bias, stride, 0, 1, z.shape[1])


def input_shapes(model, suffixes: tuple[str, ...]) -> dict:
    """The input shape of every module whose name ends with one of ``suffixes``, for one 224 x 224 image (before
    a layer's own padding)."""
    shapes = {}

    def keep(name):
        def hook(module, args):
            shapes[name] = args[0].shape
        return hook
    hooks = [m.register_forward_pre_hook(keep(name)) for name, m in model.named_modules() if name.endswith(suffixes)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, dtype=torch.float64))
    for h in hooks:
        h.remove()
    return shapes


def folded(conv, bn):
    """The weight and bias of ``conv`` with batch norm ``bn`` folded in (as the frontier's graph has them)."""
    w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    return w.detach(), b.detach()


def depthwise_layers(model):
    """(channels, height, width, weight, bias, stride, padding (left, right, top, bottom)) of every depthwise
    convolution, with its batch norm folded in."""
    layers = []
    for name, shape in input_shapes(model, ("_depthwise_conv",)).items():
        conv = model.get_submodule(name)
        pad = getattr(conv, "static_padding", None)
        pads = tuple(pad.padding) if isinstance(pad, torch.nn.ZeroPad2d) else (0, 0, 0, 0)
        layers.append((shape[1], shape[2], shape[3], *folded(conv, model.get_submodule(name.replace(
            "_depthwise_conv", "_bn1"))), conv.stride[0], pads))
    return layers


def pointwise_layers(model):
    """(in channels, height, width, weight, bias, clamp, residual) of every 1 x 1 convolution in the blocks, with its
    batch norm folded in: expansions (their input is a block's input, no activation) and projections (after the
    depthwise layer's ReLU6; a residual where the block keeps its input)."""
    layers = []
    for name, shape in input_shapes(model, ("_expand_conv", "_project_conv")).items():
        conv = model.get_submodule(name)
        block = model.get_submodule(name.rsplit(".", 1)[0])
        bn = model.get_submodule(name.replace("_expand_conv", "_bn0").replace("_project_conv", "_bn2"))
        project = name.endswith("_project_conv")
        args = block._block_args
        skip = project and block.id_skip and args.stride == 1 and args.input_filters == args.output_filters
        layers.append((shape[1], shape[2], shape[3], *folded(conv, bn), project, skip))
    return layers


def compared(torch_fn, fused_fn, dev, repeat: int, where: str) -> tuple[float, list[float]]:
    """The largest difference of the fused output from torch's (relative, above 1; more than 1e-12 stops the run),
    and the best times of torch's way and the fused one."""
    want, got = torch_fn(), fused_fn()  # also the warm-up (and the kernel's compilation)
    err = float(((got - want).abs() / want.abs().clamp_min(1.0)).max())
    if not err <= 1e-12:
        raise SystemExit(f"the fused kernel differs from torch by {err:.1e} at {where}")
    return err, [timed(torch_fn, dev, repeat), timed(fused_fn, dev, repeat)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=0, help="only the first N depthwise layers (0: all)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    model = load_model("efficientnet-lite0").module.double().eval()
    layers = depthwise_layers(model)
    layers = layers[:args.layers] if args.layers else layers
    torch.manual_seed(0)  # inputs made on the device: a host would take minutes for 14 GB of them
    print(f"float64 depthwise steps of EfficientNet-Lite0 (ReLU6, zero padding, depthwise convolution with batch "
          f"norm folded; torch pads symmetric layers inside the convolution, as the frontier's fold does), batches of "
          f"{args.batch} images on {args.device}")
    print("| channels x height x width | kernel, stride, padding | torch (ms) | fused (ms) | max relative difference |")
    print("|---|---|---:|---:|---:|", flush=True)
    total = [0.0, 0.0]
    for c, h, w, weight, bias, stride, pads in layers:
        z = 3 * torch.randn(args.batch, c, h, w, dtype=torch.float64, device=dev)
        weight, bias = weight.to(dev), bias.to(dev)
        err, times = compared(lambda: unfused(z, weight, bias, stride, pads),
                              lambda: fused(z, weight, bias, stride, pads), dev, args.repeat, f"{c} x {h} x {w}")
        total = [a + b for a, b in zip(total, times)]
        print(f"| {c} x {h} x {w} | {weight.shape[-1]}, {stride}, {pads} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} "
              f"| {err:.0e} |", flush=True)
    print(f"| all {len(layers)} layers | | {total[0] * 1e3:.2f} | {total[1] * 1e3:.2f} | |")
    ones = pointwise_layers(model)
    ones = ones[:args.layers] if args.layers else ones
    print(f"\nfloat64 1 x 1 steps (ReLU6 before projections, the convolution with batch norm folded, the residual "
          f"where the block keeps its input), batches of {args.batch} images; fused with tl.dot and, where that "
          "fails to build, with broadcast products (these spill registers: their time says little)")
    print("| in x height x width -> out | ReLU6, residual | torch (ms) | fused (ms) | max relative difference |")
    print("|---|---|---:|---:|---:|", flush=True)
    total, dot = [0.0, 0.0], None
    for c, h, w, weight, bias, clamp, skip in ones:
        x = 3 * torch.randn(args.batch, c, h, w, dtype=torch.float64, device=dev)
        weight, bias = weight.to(dev), bias.to(dev)
        res = 3 * torch.randn(args.batch, weight.shape[0], h, w, dtype=torch.float64, device=dev) if skip else None
        if dot is None:  # the first layer tells whether float64 tl.dot builds here
            try:
                fused_pointwise(x, weight, bias, clamp, res, dot=True)
                dot = True
            except Exception as e:  # noqa: BLE001 - a Triton build without float64 tl.dot: the other way
                print(f"(tl.dot in float64 failed here: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
                dot = False
        err, times = compared(lambda: unfused_pointwise(x, weight, bias, clamp, res),
                              lambda: fused_pointwise(x, weight, bias, clamp, res, dot=dot), dev, args.repeat,
                              f"1 x 1, {c} x {h} x {w}")
        total = [a + b for a, b in zip(total, times)]
        print(f"| {c} x {h} x {w} -> {weight.shape[0]} | {clamp}, {skip} | {times[0] * 1e3:.2f} | "
              f"{times[1] * 1e3:.2f} | {err:.0e} |", flush=True)
    print(f"| all {len(ones)} layers | | {total[0] * 1e3:.2f} | {total[1] * 1e3:.2f} | |")


if __name__ == "__main__":
    main()
