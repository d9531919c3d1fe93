"""A fused float64 depthwise step for the frontier's passes on a GPU: an experiment, not used by the library yet.

    python benchmarks/bench_fused_depthwise.py --device cuda [--batch 256]
    TRITON_INTERPRET=1 python benchmarks/bench_fused_depthwise.py --device cpu --batch 1 --layers 2   (values only)

On an H100 (stop 24, docs/benchmarks.md) the whole full-network EfficientNet-Lite0 path is device time, most of it
the float64 passes after each crossing's site, which run their operators one by one at 3.8 TFLOP/s. Before each
depthwise convolution such a pass applies the site's ReLU6 to the unit inputs, pads the result with zeros
(asymmetrically before the strided layers, which the frontier's fold leaves), and then convolves, with batch norm
folded into the weight and bias. One Triton kernel here does all three: it clamps each input as it is loaded, reads
the padding as masked loads, and adds the bias as it stores. It reads the unit inputs once and writes the next
ones once; the torch way writes and reads the activation and the padded copy in between. For every depthwise layer
of EfficientNet-Lite0 at its shape, the script checks that the two agree (1e-12 relative), then times both (best of
--repeat, after a warm-up) and prints the sum. A win here would be worth moving into the frontier's graph (a fused
node for site, padding and depthwise convolution); Triton's interpreter checks the values on a CPU, not the speed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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
    return F.conv2d(F.pad(F.hardtanh(z, 0.0, 6.0), pads), weight, bias, stride, 0, 1, z.shape[1])


def depthwise_layers(model):
    """(channels, height, width, weight, bias, stride, padding (left, right, top, bottom)) of every depthwise
    convolution, at a 224 x 224 image, with its batch norm folded in (as the frontier's graph has it)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    shapes = {}
    def keep(name):
        def hook(module, args):
            shapes[name] = args[0].shape  # the input before the layer's own padding
        return hook
    hooks = [m.register_forward_pre_hook(keep(name)) for name, m in model.named_modules()
             if name.endswith("_depthwise_conv")]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, dtype=torch.float64))
    for h in hooks:
        h.remove()
    layers = []
    for name, shape in shapes.items():
        conv = model.get_submodule(name)
        bn = model.get_submodule(name.replace("_depthwise_conv", "_bn1"))
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias)
        pad = getattr(conv, "static_padding", None)
        pads = tuple(pad.padding) if isinstance(pad, torch.nn.ZeroPad2d) else (0, 0, 0, 0)
        layers.append((shape[1], shape[2], shape[3], w.detach(), b.detach(), conv.stride[0], pads))
    return layers


def timed(fn, dev, repeat):
    best = float("inf")
    for _ in range(repeat):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


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
    g = torch.Generator(device="cpu").manual_seed(0)
    print(f"float64 depthwise steps of EfficientNet-Lite0 (ReLU6, zero padding, depthwise convolution with batch "
          f"norm folded), batches of {args.batch} images on {args.device}")
    print("| channels x height x width | kernel, stride, padding | torch (ms) | fused (ms) | max relative difference |")
    print("|---|---|---:|---:|---:|", flush=True)
    total = [0.0, 0.0]
    for c, h, w, weight, bias, stride, pads in layers:
        z = (3 * torch.randn(args.batch, c, h, w, generator=g, dtype=torch.float64)).to(dev)
        weight, bias = weight.to(dev), bias.to(dev)
        want = unfused(z, weight, bias, stride, pads)
        got = fused(z, weight, bias, stride, pads)
        err = float(((got - want).abs() / want.abs().clamp_min(1.0)).max())
        if not err <= 1e-12:
            raise SystemExit(f"the fused kernel differs from torch by {err:.1e} at {c} x {h} x {w}")
        times = [timed(lambda: unfused(z, weight, bias, stride, pads), dev, args.repeat),
                 timed(lambda: fused(z, weight, bias, stride, pads), dev, args.repeat)]
        total = [a + b for a, b in zip(total, times)]
        print(f"| {c} x {h} x {w} | {weight.shape[-1]}, {stride}, {pads} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} "
              f"| {err:.0e} |", flush=True)
    print(f"| all {len(layers)} layers | | {total[0] * 1e3:.2f} | {total[1] * 1e3:.2f} | |")


if __name__ == "__main__":
    main()
