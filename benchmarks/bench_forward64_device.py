"""Float64 forward passes of EfficientNet-Lite0 on a device: the rate the exact full-network path's passes can reach.

    python benchmarks/bench_forward64_device.py [--device cuda] [--batch 256]

The frontier evaluator (docs/paths.md) runs each breakpoint through the network after the site that made it, in
passes over many points at once; over the first 1/20,000 of chelsea -> coffee those passes are 28.2 G multiply-adds
for 104 crossings, 0.70 of a whole forward pass (385 M) per crossing, and the whole path has 2.30 M crossings
(measured on an H100, stop 24; docs/benchmarks.md): about 1.62 M whole-pass equivalents. This script times plain
float64 forward passes of the model on batches of ``--batch`` images (best of ``--repeat``) with the convolutions as
they come, and the same with the 1 x 1 convolutions run as matrix products over channels (the library's
``_conv64.pointwise_conv2d``, what ``POINTWISE_AS_MATMUL`` turns on; GPUs run float64 matrix products on their
matrix units, convolution libraries may not), each from contiguous images and from channels-last ones (then every
layer keeps that layout and the products need no copies), and on a GPU also with cuDNN's benchmark mode (every
algorithm timed per shape) and where one pass's kernel time goes. It prints the time per image, the float64 rate of
its multiply-adds, and the time 1.62 M images take at that rate: the floor the GPU goal (<= 60 s) has to clear,
before any of the engine's own work. On a CPU it times ATen's float64 convolutions as they come (the engine takes
``polytope_lens._conv64``'s faster ways there: ``bench_conv64.py``), so it is meant for a GPU (``gpu_check.sh
forward64``).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench_paths_efficientnet import layer_calls  # this folder (run as a script)
import polytope_lens._conv64 as conv64
from polytope_lens.models import load_model

# crossings (the whole path, measured at stop 24 on an H100) x the passes' share of a whole pass (stop 21, CPU)
PASSES_FOR_THE_PATH = 2.2996e6 * 28.2 / 104 / 0.385


def timed(fn, dev, repeat: int) -> float:
    """Best of ``repeat`` calls (the caller has run ``fn`` once: its warm-up)."""
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    model = load_model("efficientnet-lite0").module.double().eval().to(dev)
    x = torch.randn(args.batch, 3, 224, 224, dtype=torch.float64, device=dev)
    macs = sum(n for kind, n in layer_calls(model, x[:1]) if kind == "macs")
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; cuDNN "
              f"{torch.backends.cudnn.version()}")
    print(f"EfficientNet-Lite0, float64, batches of {args.batch} images; convolutions and classifier "
          f"{macs / 1e6:.0f} M multiply-adds per image; the full path's passes: about "
          f"{PASSES_FOR_THE_PATH / 1e6:.2f} M images")
    print("| way | seconds per batch | µs per image | float64 TFLOP/s | the path's passes at this "
          "rate (s) |")
    print("|---|---:|---:|---:|---:|", flush=True)
    want = None
    conv64.POINTWISE_AS_MATMUL = {dev.type}  # the library's rule (taken only inside FastConv64 here) ...
    conv64.MAX_IMAGE, conv64.COLUMN_BYTES = 0, 1 << 62  # ... and on a CPU nothing else of _conv64's
    nhwc = x.contiguous(memory_format=torch.channels_last)  # every layer after it keeps that layout
    ways = [("forward, convolutions as they come", None, x, False),
            ("forward, 1 x 1 as matrix products (_conv64.pointwise_conv2d; output copied back to NCHW)",
             conv64.FastConv64, x, False),
            ("forward, channels-last input, convolutions as they come", None, nhwc, False),
            ("forward, channels-last input, 1 x 1 as matrix products (no copies)", conv64.FastConv64, nhwc, False)]
    if dev.type == "cuda":  # cuDNN's benchmark mode times every algorithm once per shape and keeps the fastest
        ways += [("forward, convolutions as they come, cuDNN benchmark mode", None, x, True),
                 ("forward, channels-last input, cuDNN benchmark mode", None, nhwc, True),
                 ("forward, 1 x 1 in one Triton kernel (_conv64.POINTWISE_WAY = 'triton', stop 25)", triton_pointwise,
                  x, False)]
    for name, mode, images, benchmark in ways:
        def run(mode=mode, images=images, benchmark=benchmark):
            torch.backends.cudnn.benchmark = benchmark
            with torch.no_grad(), (mode() if mode else contextlib.nullcontext()):
                return model(images)
        out = run()  # also the warm-up (CUDA context, cuDNN's choice of kernels)
        if want is None:
            want = out
        else:
            err = float(((out - want).abs() / want.abs().clamp_min(1.0)).max())
            name += f" (outputs within {err:.0e} of the first way's)"
        s = timed(run, dev, args.repeat)
        per = s / args.batch
        print(f"| {name} | {s:.3f} | {per * 1e6:.0f} | {2 * macs / per / 1e12:.2f} | {PASSES_FOR_THE_PATH * per:.0f} |",
              flush=True)
    torch.backends.cudnn.benchmark = False
    if dev.type == "cuda":
        kernel_times(model, x, dev)


@contextlib.contextmanager
def triton_pointwise():
    """The 1 x 1 convolutions of a forward pass in ``_conv64``'s Triton kernel (where Triton runs)."""
    import polytope_lens._conv64 as conv64

    conv64.POINTWISE_WAY = "triton"
    try:
        with conv64.FastConv64():
            yield
    finally:
        conv64.POINTWISE_WAY = "matmul"


def kernel_times(model, images, dev) -> None:
    """Where one float64 forward pass's device time goes, by kernel (the convolution kinds, batch norm, ReLU6,
    padding): what fused or custom kernels would have to beat."""
    from torch.profiler import ProfilerActivity, profile

    torch.backends.cudnn.benchmark = False
    with torch.no_grad():
        model(images)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(images)
            torch.cuda.synchronize()
    rows = sorted(((e.self_device_time_total, e.count, e.key) for e in prof.key_averages()
                   if e.self_device_time_total > 0), reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\nkernel time of one pass of {len(images)} images: {total / 1e3:.1f} ms")
    print("| kernel | ms | share | calls |")
    print("|---|---:|---:|---:|")
    for us, n, key in rows[:15]:
        print(f"| {key[:160]} | {us / 1e3:.2f} | {us / total:.1%} | {n} |")


if __name__ == "__main__":
    main()
