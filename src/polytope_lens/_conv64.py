"""Float64 convolutions and max pooling on the CPU, faster than ATen's fallbacks for them.

ATen has no oneDNN kernel for float64, and its convolution fallback is slow in two ways that the exact engines'
forward passes (one to a hundred images at a time) meet all the time:

* a grouped convolution runs as one convolution per group: EfficientNet-Lite0's depthwise layers are about 9,000
  calls of a few microseconds of work each per forward pass, half of a one-image float64 pass. ``depthwise_conv2d``
  adds the kernel's kh x kw shifted copies of the input instead, each scaled per channel (one pass over the output
  per kernel entry), in the layout that keeps its inner loop long: channels first when an image's output has more
  positions than channels, channels last otherwise; the batch is taken a few images at a time;
* a batch is unfolded (im2col) for all of its images before one product: at 90 images of 16 x 28 x 28 through a
  3 x 3 convolution that buffer is 81 MB and the call takes 38 ms, against 8 ms for the same images two at a time.
  Ungrouped calls whose batch unfolds to more than 4 x ``COLUMN_BYTES`` are run by ATen on slices of the batch
  whose unfolded images take at most ``COLUMN_BYTES`` (1 x 1 kernels are not unfolded, and are left alone); ATen
  computes each image on its own, so the values are the same to the bit (tested).

``conv_call`` (what ``capture``'s mode ends every intercepted call with; ``FastConv64`` is the same as a mode of its
own) sends ``F.conv2d`` calls on float64 CPU tensors the right way; everything else runs unchanged. A depthwise call
(groups = input channels = output channels) takes ``depthwise_conv2d`` when an image has at most ``MAX_IMAGE``
elements; which way it goes depends only on its layer, never on the batch size, so a point gets the same values
whichever batch evaluates it; calls that autograd must follow (grad enabled, an input that requires it) are left to
ATen. Its values equal ATen's up to the rounding of the sums' order (tested to 1e-13 relative).

Max pooling without indices (``F.max_pool2d`` on batched images, ``F.max_pool1d`` on batched sequences) is the
maximum over the windows' strided views (``WindowMax.maxima``), equal to ATen's to the bit (a maximum does not round)
and about 4x faster on a 90-image batch of 16 x 28 x 28, since ATen's CPU pooling also finds every window's argmax.

On the device types in ``POINTWISE_AS_MATMUL`` (none by default), a float64 1 x 1 convolution (stride 1, no padding,
one group: most of a MobileNet-style network's multiply-adds) runs as one matrix product over channels in
channels-last layout (``pointwise_conv2d``): a GPU runs float64 matrix products on its matrix units, a convolution
library may not. Its output has the memory format ATen would give (channels-last when the input or the weight
suggests it): for a channels-last input a view of the product, which the next 1 x 1 convolution reads without a
copy; otherwise copied back to contiguous (code after a convolution may ``view`` its output).
On the CPU ATen's 1 x 1 convolutions are matrix products already, and the channels-last outputs slow the layers
after them (measured at stops 22 and 23); on an H100 (stop 24) plain float64 passes were 28 % slower with it than
with cuDNN's convolutions, so no device takes it by default (``benchmarks/gpu_check.sh forward64``). With
``POINTWISE_WAY = "triton"`` such a convolution of contiguous images is one Triton kernel instead (``tl.dot`` in
float64): on an H100 (stop 25, ``benchmarks/bench_fused_depthwise.py``) a kernel of this kind ran EfficientNet-Lite0's
1 x 1 layers 1.1-2.9x faster than cuDNN's at batch 256; an opt-in until the engine measures it on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format  # ATen's choice of memory format, as torch's own decompositions
from torch.overrides import TorchFunctionMode

from .errors import UnsupportedActivationError
from .kinks import as_pair, resolve_call

MAX_IMAGE = 1 << 21  # elements of one input image (C x H x W): above it ATen's loop over channels is as fast
_CHUNK = 1 << 20  # elements of the input taken at once by depthwise_conv2d (8 MiB of float64)
COLUMN_BYTES = 2 << 20  # unfolded images per ATen call on an ungrouped convolution (at least one image)
POINTWISE_AS_MATMUL: set[str] = set()  # device types whose float64 1 x 1 convolutions are matrix products
# how they run there: "matmul" (torch's matrix product) or "triton" (one Triton kernel over contiguous images, where
# Triton runs; torch's product elsewhere or if the kernel fails): an opt-in until measured in the engine on a GPU
POINTWISE_WAY = "matmul"
_CONV2D = (F.conv2d, torch.conv2d)
_POOLS = (F.max_pool2d, F.max_pool1d)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0,
                     dilation=1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` for ``x`` of shape (N, C, H, W) and
    ``weight`` of shape (C, 1, kh, kw), as kh x kw scaled, shifted adds (zero padding)."""
    (sh, sw), (ph, pw), (dh, dw) = as_pair(stride), as_pair(padding), as_pair(dilation)
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    out = x.new_empty(n, c, ho, wo)
    channels_last = c > ho * wo
    k = weight.reshape(c, kh * kw)
    if channels_last:
        k = k.t().contiguous()  # (kh * kw, c): one contiguous row of per-channel weights per kernel entry
    step = max(1, _CHUNK // max(1, c * hp * wp))
    for a in range(0, n, step):
        xa = x[a:a + step]
        m = len(xa)
        if channels_last:
            xp = x.new_zeros(m, hp, wp, c) if ph or pw else x.new_empty(m, hp, wp, c)  # zeros: only the padding
            xp[:, ph:ph + h, pw:pw + w].copy_(xa.permute(0, 2, 3, 1))
            acc = x.new_empty(m, ho, wo, c)
        else:
            xp = F.pad(xa, (pw, pw, ph, ph)) if ph or pw else xa
            acc = out[a:a + m]
        b = None if bias is None else (bias if channels_last else bias.view(-1, 1, 1))
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
                cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
                xs = xp[:, rows, cols] if channels_last else xp[:, :, rows, cols]
                kij = k[i * kw + j] if channels_last else k[:, i * kw + j].view(c, 1, 1)
                if i or j:
                    acc.addcmul_(xs, kij)
                elif b is None:  # the first kernel entry writes the sum's first term: no pass to zero it first
                    torch.mul(xs, kij, out=acc)
                else:
                    torch.addcmul(b, xs, kij, out=acc)
        if channels_last:
            out[a:a + m].copy_(acc.permute(0, 3, 1, 2))
    return out


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1 x 1 ``weight`` (C_out, C_in, 1, 1) as one matrix product over channels:
    (N H W, C_in) @ (C_in, C_out), in ATen's memory format: channels-last (a view of the product, no copy) for a
    channels-last input, contiguous otherwise (code after the call may ``view`` it)."""
    n, c, h, w = x.shape
    if POINTWISE_WAY == "triton" and x.is_contiguous():
        y = _triton_pointwise(x, weight, bias)
        if y is not None:
            return y
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when ``x`` is channels-last already
    wt = weight.reshape(weight.shape[0], c).t()
    y = torch.mm(rows, wt) if bias is None else torch.addmm(bias, rows, wt)
    y = y.view(n, h, w, weight.shape[0]).permute(0, 3, 1, 2)
    # ATen's rule for a convolution's output: channels-last when the input or the weight suggests it (a tensor of
    # one channel or 1 x 1 images is both, and suggests contiguous)
    channels_last = torch.channels_last in (suggest_memory_format(x), suggest_memory_format(weight))
    return y if channels_last else y.contiguous()


def _triton_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``pointwise_conv2d`` of contiguous images as one Triton kernel (contiguous output, as ATen gives for them);
    None where Triton cannot run it here (``_kink_scan.triton_ready``) or the kernel failed (warned once)."""
    from . import _kink_scan

    if not _kink_scan.triton_ready(x) or not _pointwise_fits(x.shape[1], weight.shape[0], x.shape[2] * x.shape[3]):
        return None
    out = torch.empty((len(x), weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device)
    return out if _launch_site_conv(x, None, weight, bias, 1, (0, 0, 0, 0), None, out) else None


_DW_BLOCK = 256  # outputs per program of the depthwise kernel
_PW_BLOCKS = (32, 16, 64)  # output channels, input channels (tl.dot's inner size, at least 16) and positions per
#                            program of the 1 x 1 kernel


def site_conv_ready(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride,
                    pads: tuple[int, int, int, int]) -> bool:
    """Whether ``clamp_conv2d`` can run this call here: float64 contiguous images on a device where Triton runs
    (``_kink_scan.triton_ready``), and either a depthwise weight (C, 1, kh, kw) or a 1 x 1 weight with stride 1 and
    no padding, float64 and on ``z``'s device like the bias."""
    from . import _kink_scan

    if z.dtype != torch.float64 or z.dim() != 4 or not z.is_contiguous() or not _kink_scan.triton_ready(z):
        return False
    if any(t is not None and (t.dtype != z.dtype or t.device != z.device) for t in (weight, bias)):
        return False
    c = z.shape[1]
    if bias is not None and bias.shape != (weight.shape[0],):
        return False
    if _is_depthwise(weight, c):  # one image's outputs within a grid axis
        (sh, sw), (kh, kw) = as_pair(stride), weight.shape[2:]
        oh, ow = (z.shape[2] + pads[2] + pads[3] - kh) // sh + 1, (z.shape[3] + pads[0] + pads[1] - kw) // sw + 1
        return oh > 0 and ow > 0 and c * oh * ow < 65535 * _DW_BLOCK and math.prod(z.shape[1:]) < 1 << 30
    return weight.shape[1:] == (c, 1, 1) and as_pair(stride) == (1, 1) and not any(pads) and _pointwise_fits(
        c, weight.shape[0], z.shape[2] * z.shape[3])


def _is_depthwise(weight: torch.Tensor, c: int) -> bool:
    """Whether ``weight`` is a depthwise convolution's over ``c`` channels: (c, 1, kh, kw), c > 1."""
    return weight.shape[0] == c and weight.shape[1] == 1 and c > 1


def _pointwise_fits(c: int, co: int, p: int) -> bool:
    """Whether the 1 x 1 kernel's grid and 32-bit offsets within an image hold ``c`` input and ``co`` output
    channels of ``p`` positions."""
    return -(-co // _PW_BLOCKS[0]) < 65535 and -(-p // _PW_BLOCKS[2]) < 65535 and max(c, co) * p < 1 << 31


def clamp_conv2d(z: torch.Tensor, limits: tuple, weight: torch.Tensor, bias: torch.Tensor | None, stride,
                 pads: tuple[int, int, int, int], residual: torch.Tensor | None, out: torch.Tensor) -> bool:
    """``out = conv2d(F.pad(clamp(z, *limits), pads), weight, bias, stride) (+ residual)`` in one Triton kernel
    (``_conv_kernels``): a clamp site (``limits``: min, max or None) with the zero padding (``F.pad``'s order: left,
    right, top, bottom) and the depthwise or 1 x 1 convolution (``site_conv_ready``) that read its output, and for a
    1 x 1 one a residual added. The site's output is never written. False: the kernel failed (warned once, and
    Triton is not used again in this process; ``out`` holds nothing then)."""
    return _launch_site_conv(z, limits, weight, bias, stride, pads, residual, out)


def _launch_site_conv(z, limits, weight, bias, stride, pads, residual, out) -> bool:
    from . import _conv_kernels, _kink_scan

    n, c, h, w = z.shape
    clamp = limits is not None
    lim = _kink_scan._on_device(tuple(float(v) for v in limits if v is not None) if clamp else (0.0,), z.dtype,
                                z.device)
    has_hi = clamp and limits[1] is not None
    b = z if bias is None else bias.contiguous()
    if _is_depthwise(weight, c):
        (sh, sw), (kh, kw) = as_pair(stride), weight.shape[2:]
        left, _, top, _ = pads
        per_image = out[0].numel()
        return _kink_scan._launch(_conv_kernels.clamp_depthwise_kernel, (n, -(-per_image // _DW_BLOCK)), z,
                                  weight.contiguous(), b, lim, out, per_image, c, h, w, out.shape[2], out.shape[3],
                                  KH=kh, KW=kw, SH=sh, SW=sw, PT=top, PL=left, HAS_BIAS=bias is not None, HAS_HI=has_hi,
                                  BLOCK=_DW_BLOCK)
    co, p = weight.shape[0], h * w
    bco, bci, bp = _PW_BLOCKS
    return _kink_scan._launch(_conv_kernels.pointwise_kernel, (n, -(-co // bco), -(-p // bp)), z,
                              weight.reshape(co, c).contiguous(), b, lim, out if residual is None else residual, out,
                              c, co, p, HAS_BIAS=bias is not None, CLAMP=clamp, HAS_HI=has_hi,
                              RESIDUAL=residual is not None, BCO=bco, BCI=bci, BP=bp)


def _float64_conv(args: tuple, kwargs: dict) -> dict | None:
    """The arguments of a ``conv2d`` call by name, when its input is a float64 batch of images, else None."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    call = dict(zip(names, args), **kwargs)
    x, w = call.get("input"), call.get("weight")
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)):
        return None
    if x.dtype != torch.float64 or x.dim() != 4 or w.dim() != 4 or w.dtype != x.dtype:
        return None
    return call


def _pointwise(call: dict) -> bool:
    """Whether a float64 ``conv2d`` call should run as ``pointwise_conv2d``: its device type is in
    ``POINTWISE_AS_MATMUL``, its kernel 1 x 1 with stride 1, no padding, one group, and autograd does not follow it."""
    x, w, b = call["input"], call["weight"], call.get("bias")
    if x.device.type not in POINTWISE_AS_MATMUL or w.shape[2:] != (1, 1) or call.get("groups", 1) != 1:
        return False
    if w.shape[1] != x.shape[1] or not (b is None or (b.dim() == 1 and len(b) == len(w) and b.dtype == x.dtype
                                                      and b.device == x.device)):
        return False  # ATen's own error message
    if x.numel() == 0:
        return False  # an empty batch: nothing to gain
    if any(e != 1 for e in as_pair(call.get("stride", 1)) + as_pair(call.get("dilation", 1))):
        return False
    padding = call.get("padding", 0)
    if isinstance(padding, str):
        if padding not in ("valid", "same"):  # a 1 x 1 kernel with "same" pads nothing
            return False
    elif any(e != 0 for e in as_pair(padding)):
        return False
    return not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, w, b)))


def _depthwise(call: dict) -> tuple | None:
    """``depthwise_conv2d``'s arguments for a call it should run, else None."""
    x, w, groups, padding = call["input"], call["weight"], call.get("groups", 1), call.get("padding", 0)
    if padding == "valid":
        padding = 0
    if isinstance(padding, str) or not (groups == x.shape[1] == w.shape[0] > 1 and w.shape[1] == 1):
        return None
    if x.shape[1] * x.shape[2] * x.shape[3] > MAX_IMAGE:
        return None
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (x, w, call.get("bias"))):
        return None  # the first kernel entry is written with out=, which autograd does not follow
    return x, w, call.get("bias"), call.get("stride", 1), padding, call.get("dilation", 1)


def _images_per_call(call: dict) -> int:
    """Images per ATen call for an ungrouped convolution: as many as unfold within ``COLUMN_BYTES``, or the whole
    batch when it unfolds within 4 x ``COLUMN_BYTES`` or is not unfolded at all (a 1 x 1 kernel) or is grouped
    (slices would repeat ATen's loop over groups once per slice)."""
    x, w = call["input"], call["weight"]
    c_in, kh, kw = w.shape[1:]
    if call.get("groups", 1) != 1 or kh * kw == 1:
        return len(x)
    sh, sw = as_pair(call.get("stride", 1))
    column_bytes = 8 * c_in * kh * kw * -(-x.shape[2] // sh) * -(-x.shape[3] // sw)  # per image, about
    if len(x) * column_bytes <= 4 * COLUMN_BYTES:
        return len(x)
    return max(1, COLUMN_BYTES // column_bytes)


def _pooled(func, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A float64 CPU ``max_pool2d`` (batched images) or ``max_pool1d`` (batched sequences) call without indices, as
    ``WindowMax.maxima``; None for any other call."""
    x = args[0] if args else kwargs.get("input")
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float64 and x.device.type == "cpu"):
        return None
    if x.dim() != (4 if func is F.max_pool2d else 3) or (x.requires_grad and torch.is_grad_enabled()):
        return None
    try:  # the registry parses the call's arguments
        return resolve_call(func, args, kwargs).maxima(x)
    except UnsupportedActivationError:  # return_indices=True: ATen's
        return None


def conv_call(func, args: tuple, kwargs: dict):
    """``func(*args, **kwargs)``, with float64 CPU ``conv2d`` and max pooling calls (and 1 x 1 convolutions on the
    devices in ``POINTWISE_AS_MATMUL``) run the faster way (the module docstring). ``capture``'s mode ends every call
    it intercepts here (one mode, not a second one that every operation of a forward pass would go through), and a
    max-pool site's output at new unit inputs is computed here too."""
    if func in _POOLS:
        out = _pooled(func, args, kwargs)
        if out is not None:
            return out
    if func in _CONV2D:
        call = _float64_conv(args, kwargs)
        if call is not None and _pointwise(call):
            return pointwise_conv2d(call["input"], call["weight"], call.get("bias"))
        if call is not None and call["input"].device.type == "cpu":
            dw_args = _depthwise(call)
            if dw_args is not None:
                return depthwise_conv2d(*dw_args)
            step = _images_per_call(call)
            x = call.pop("input")
            if len(x) > step:
                return torch.cat([func(x[a:a + step], **call) for a in range(0, len(x), step)])
    return func(*args, **kwargs)


class FastConv64(TorchFunctionMode):
    """``conv_call`` for every call in a ``with`` block, for use without ``capture``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return conv_call(func, args, kwargs or {})
