"""Device-to-host copies that do not stall a GPU.

A plain ``.cpu()`` waits for the GPU to finish everything queued before it and copies at pageable speed; a batch
of results taken that way costs one wait per array. Two ways round it:

* ``to_host`` + ``wait_for_copies``: asynchronous copies into page-locked memory, one wait per batch (code
  extraction, ``codes.py``: a third of a GPT-2-small run in bfloat16 was such waits). Code extraction through
  ``arrays_to_host_async`` instead was slower on an H100 (stop 19: 0.93 vs 0.97 of the plain forward's speed in
  float32, 0.68 vs 0.81 in bfloat16; docs/benchmarks.md), so it keeps these.
* ``arrays_to_host_async``: a batch packed into one copy, into a page-locked buffer that is kept and reused, and
  copied out on a background thread while the GPU gets on with the next chunk (exact paths, ``paths._collect``:
  tens of millions of crossing records per minute, whose page-locked allocations alone cost a fifth of the run).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch



def to_host(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the host. From a GPU: an asynchronous copy into page-locked memory, which the copy engine overlaps
    with later work; ``wait_for_copies`` must run before the bytes are read."""
    if x.device.type != "cuda":
        return x.cpu()
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host


def wait_for_copies(hosts: Iterable[torch.Tensor]) -> None:
    """Wait for the copies of ``to_host`` behind ``hosts`` (once per batch), on every GPU (the data need not be on
    the current one)."""
    if any(h.is_pinned() for h in hosts):
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


# ``arrays_to_host_async`` copies a batch out of its page-locked buffer on a background thread while the caller goes
# on (False: before it returns). Comparisons: benchmarks/bench_paths.py --transfer
BACKGROUND = True
_free: dict = {}  # device -> page-locked byte buffers not in use
_lock = threading.Lock()


@functools.cache
def _worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="polytope-lens-to-host")


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _take_buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    """A host buffer of at least ``nbytes`` for results from ``device`` (page-locked for a GPU): a free one, else a
    new one with a quarter to spare (allocating page-locked memory took about a second per GB on the H100 hosts
    measured, so buffers are kept and reused)."""
    with _lock:
        free = _free.setdefault(device, [])
        fits = [i for i, b in enumerate(free) if b.numel() >= nbytes]
        if fits:
            return free.pop(min(fits, key=lambda i: free[i].numel()))  # by position: == on tensors compares values
        free.clear()  # smaller buffers would only pin memory: a run's results come in similar sizes
    return torch.empty(-(-(nbytes + nbytes // 4) // 2**20) * 2**20, dtype=torch.uint8,
                       pin_memory=device.type == "cuda")


def _give_back(device: torch.device, buf: torch.Tensor) -> None:
    with _lock:
        _free.setdefault(device, []).append(buf)


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def arrays_to_host(xs: list[torch.Tensor]) -> list[np.ndarray]:
    """``xs`` as host arrays that own their memory (``arrays_to_host_async``, waited for)."""
    arrays, wait = arrays_to_host_async(xs)
    wait()
    return arrays


def arrays_to_host_async(xs: list[torch.Tensor], staged: bool | None = None) -> tuple[list[np.ndarray],
                                                                                      Callable[[], None]]:
    """``xs`` as host arrays that own their memory, and the function to call before they are read.

    From a GPU (``staged``; None: when ``xs`` are on one) the arrays are packed into one byte buffer there (each
    aligned to 8 bytes) and copied in one piece, on a stream of its own, into a reused page-locked buffer, from which
    a background thread copies them into the returned arrays: the caller can queue the GPU's next work meanwhile,
    and results held for a long time neither pin memory nor cost a page-locked allocation each (784->4x512 exact
    paths on an H100: docs/benchmarks.md). Other arrays are returned as ``.numpy()`` views unless ``staged`` (the
    same steps with an ordinary buffer: the tests)."""
    if not xs:
        return [], _done
    dev = xs[0].device
    cuda = dev.type == "cuda"
    if not (cuda if staged is None else staged):
        return [x.cpu().numpy() for x in xs], _done
    flats = [x.contiguous().reshape(-1).view(torch.uint8) for x in xs]
    sizes, offsets, total = [f.numel() for f in flats], [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // 8) * 8
    packed = torch.empty(total, dtype=torch.uint8, device=dev)
    for f, o, n in zip(flats, offsets, sizes):
        packed[o:o + n].copy_(f)
    del flats
    buf, done = _take_buffer(dev, total), None
    if cuda:
        stream = _copy_stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            buf[:total].copy_(packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        packed.record_stream(stream)  # not reused by the caching allocator before the copy has read it
    else:
        buf[:total].copy_(packed)
    arrays = [np.empty(tuple(x.shape), dtype=_np_dtype(x.dtype)) for x in xs]

    def fill() -> None:
        try:
            if done is not None:
                done.synchronize()
            raw = buf.numpy()
            for a, o, n in zip(arrays, offsets, sizes):
                np.copyto(a.reshape(-1).view(np.uint8), raw[o:o + n])
        finally:
            _give_back(dev, buf)

    if not BACKGROUND:
        fill()
        return arrays, _done
    return arrays, _worker().submit(fill).result


def _done() -> None:
    return None
