"""Fused float64 steps for the frontier's passes on a GPU: the library's kernels against torch's separate steps.

    python benchmarks/bench_fused_depthwise.py --device cuda [--batch 256]
    TRITON_INTERPRET=1 python benchmarks/bench_fused_depthwise.py --device cpu --batch 1 --layers 2   (values only)

On an H100 (stop 24, docs/benchmarks.md) the whole full-network EfficientNet-Lite0 path is device time, most of it
the float64 passes after each crossing's site, which run their operators one by one. Before each depthwise
convolution such a pass applies the site's ReLU6 to the unit inputs, pads the result with zeros (asymmetrically
before the strided layers, which the frontier's fold leaves), and then convolves, with batch norm folded into the
weight and bias; before each 1 x 1 projection it applies the ReLU6, convolves and adds the block's input. The
library's ``_conv64.clamp_conv2d`` (the kernels of ``polytope_lens._conv_kernels``; the frontier runs them with
``frontier.FUSE_SITE_CONVOLUTIONS``) does each in one kernel: it clamps each input as it is loaded, reads the
padding as masked loads, and adds the bias and the residual as it stores, so it reads the unit inputs once and writes
the next values once; the torch way writes and reads the activation and the padded copy in between. For every
depthwise and 1 x 1 layer of the blocks (not the head's 1 x 1 convolution) of EfficientNet-Lite0 at its shape, the
script checks that the two agree (1e-12 relative), then times both (best of --repeat, after a warm-up) and prints
the sums. Stop 25 measured an earlier form of the depthwise kernel here (one program per image plane: 4x faster
than torch at 112 x 112, 4.5x slower at 7 x 7 x 1,152); stop 26's takes all images, channels and positions as one
index. Triton's interpreter checks the values on a CPU, not the speed.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from bench_forward64_device import timed  # this folder (run as a script)
from polytope_lens._conv64 import clamp_conv2d  # the library's fused kernels (``frontier.FUSE_SITE_CONVOLUTIONS``)
from polytope_lens.models import load_model


def fused_pointwise(x, weight, bias, clamp, residual=None):
    out = torch.empty(len(x), weight.shape[0], *x.shape[2:], dtype=x.dtype, device=x.device)
    if not clamp_conv2d(x, (0.0, 6.0) if clamp else None, weight, bias, 1, (0, 0, 0, 0), residual, out):
        raise SystemExit("the 1 x 1 kernel failed here (see the warning)")
    return out


def unfused_pointwise(x, weight, bias, clamp, residual=None):
    y = F.conv2d(F.hardtanh(x, 0.0, 6.0) if clamp else x, weight, bias)
    return y if residual is None else y + residual


def fused(z, weight, bias, stride, pads):
    n, c, h, w = z.shape
    k = weight.shape[-1]
    left, right, top, bottom = pads
    oh = (h + top + bottom - k) // stride + 1
    ow = (w + left + right - k) // stride + 1
    out = torch.empty(n, c, oh, ow, dtype=z.dtype, device=z.device)
    if not clamp_conv2d(z, (0.0, 6.0), weight, bias, stride, pads, None, out):
        raise SystemExit("the depthwise kernel failed here (see the warning)")
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

    def depthwise_cases():
        for c, h, w, weight, bias, stride, pads in layers:
            z = 3 * torch.randn(args.batch, c, h, w, dtype=torch.float64, device=dev)
            weight, bias = weight.to(dev), bias.to(dev)
            yield (f"{c} x {h} x {w} | {weight.shape[-1]}, {stride}, {pads}",
                   lambda: unfused(z, weight, bias, stride, pads), lambda: fused(z, weight, bias, stride, pads))

    table(f"float64 depthwise steps of EfficientNet-Lite0 (ReLU6, zero padding, depthwise convolution with batch norm "
          f"folded; torch pads symmetric layers inside the convolution, as the frontier's fold does), batches of "
          f"{args.batch} images on {args.device}", "channels x height x width | kernel, stride, padding",
          depthwise_cases(), len(layers), dev, args.repeat)
    ones = pointwise_layers(model)
    ones = ones[:args.layers] if args.layers else ones

    def pointwise_cases():
        for c, h, w, weight, bias, clamp, skip in ones:
            x = 3 * torch.randn(args.batch, c, h, w, dtype=torch.float64, device=dev)
            weight, bias = weight.to(dev), bias.to(dev)
            res = 3 * torch.randn(args.batch, weight.shape[0], h, w, dtype=torch.float64, device=dev) if skip else None
            yield (f"{c} x {h} x {w} -> {weight.shape[0]} | {clamp}, {skip}",
                   lambda: unfused_pointwise(x, weight, bias, clamp, res),
                   lambda: fused_pointwise(x, weight, bias, clamp, res))

    table(f"\nfloat64 1 x 1 steps (ReLU6 before projections, the convolution with batch norm folded, the residual "
          f"where the block keeps its input), batches of {args.batch} images; fused: one kernel with tl.dot",
          "in x height x width -> out | ReLU6, residual", pointwise_cases(), len(ones), dev, args.repeat)


def table(title: str, columns: str, cases, n: int, dev, repeat: int) -> None:
    """One markdown table: per case (its first columns, torch's way, the fused way) both times and their largest
    difference, then the sums over the ``n`` cases."""
    print(title)
    print(f"| {columns} | torch (ms) | fused (ms) | max relative difference |")
    print("|---|---|---:|---:|---:|", flush=True)
    total = [0.0, 0.0]
    for cells, torch_fn, fused_fn in cases:
        err, times = compared(torch_fn, fused_fn, dev, repeat, cells)
        total = [a + b for a, b in zip(total, times)]
        print(f"| {cells} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} | {err:.0e} |", flush=True)
    print(f"| all {n} layers | | {total[0] * 1e3:.2f} | {total[1] * 1e3:.2f} | |")


if __name__ == "__main__":
    main()
