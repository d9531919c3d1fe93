"""Device-to-host copies that do not stall a GPU.

A plain ``.cpu()`` waits for the GPU to finish everything queued before it and copies at pageable speed; a batch
of results taken that way costs one wait per array. Two ways round it:

* ``to_host`` + ``wait_for_copies``: asynchronous copies into page-locked memory, one wait per batch (code
  extraction, ``codes.py``: a third of a GPT-2-small run in bfloat16 was such waits). Code extraction through
  ``arrays_to_host_async``'s first version (whole batches through a pool of page-locked buffers, then copied out
  as now) was slower on an H100 (stop 19: 0.93 vs 0.97 of the plain forward's speed in float32, 0.68 vs 0.81 in
  bfloat16; docs/benchmarks.md), so it keeps these.
* ``arrays_to_host_async``: a batch packed into one buffer on the GPU and brought over by a background thread
  through two small page-locked slots that are made once, while the GPU gets on with the next chunk (exact paths,
  ``paths._collect``: tens of millions of crossing records per minute, whose page-locked allocations alone cost a
  fifth of the run).
"""

from __future__ import annotations

import functools
import os
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


# ``arrays_to_host_async`` copies a batch out on a background thread while the caller goes on (False: the caller
# waits for it). Comparisons: benchmarks/bench_paths.py --transfer
BACKGROUND = True
_SLOT_BYTES = 8 << 20  # a batch travels through two page-locked slots of this size, in turn


@functools.cache
def _worker() -> ThreadPoolExecutor:
    """The one thread that copies batches out (one at a time: it alone uses the slots)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="polytope-lens-to-host")


os.register_at_fork(after_in_child=_worker.cache_clear)  # a forked child has no copy of the thread: make its own


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@functools.cache
def _slots(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two host buffers of ``_SLOT_BYTES`` for batches from ``device``, made once (page-locked for a GPU: that
    allocation took about a second per GB on the H100 hosts measured, so results are never allocated so)."""
    pinned = device.type == "cuda"
    return tuple(torch.empty(_SLOT_BYTES, dtype=torch.uint8, pin_memory=pinned) for _ in range(2))


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def arrays_to_host(xs: list[torch.Tensor], staged: bool | None = None) -> list[np.ndarray]:
    """``xs`` as host arrays (``arrays_to_host_async``, waited for)."""
    arrays, wait = arrays_to_host_async(xs, staged)
    wait()
    return arrays


def arrays_to_host_async(xs: list[torch.Tensor], staged: bool | None = None) -> tuple[list[np.ndarray],
                                                                                      Callable[[], None]]:
    """``xs`` as host arrays, and the function to call before they are read.

    From a GPU (``staged``; None: when ``xs`` are on one) the arrays are packed into one byte buffer there (each
    aligned to 8 bytes), and a background thread brings it over in slices through two page-locked slots in turn
    (one slice crosses while the one before is copied out) into one ordinary host buffer, of which the returned
    arrays are views: the caller can queue the GPU's next work meanwhile, and no page-locked memory is allocated per
    batch (784->4x512 exact paths on an H100: docs/benchmarks.md). Other arrays are returned as ``.numpy()`` views
    unless ``staged`` (the same steps with ordinary slots: the tests)."""
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
    host = np.empty(total, dtype=np.uint8)
    arrays = [host[o:o + n].view(_np_dtype(x.dtype)).reshape(tuple(x.shape))
              for x, o, n in zip(xs, offsets, sizes)]
    ready = None
    if cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(dev))
    wait = _worker().submit(_copy_out, packed, host, ready).result
    if not BACKGROUND:
        wait()
        return arrays, _done
    return arrays, wait


def _copy_out(packed: torch.Tensor, host: np.ndarray, ready) -> None:
    """``packed`` (once ``ready`` has passed on its GPU) into ``host``, slice by slice through the two slots: the
    copy of slice i + 1 to its slot runs while slice i is copied out of the other. ``packed`` is held until its
    last slice has arrived, so the caching allocator cannot hand its memory out earlier."""
    dev = packed.device
    slots = _slots(dev)
    cuda = dev.type == "cuda"
    stream = _copy_stream(dev) if cuda else None
    if cuda:
        stream.wait_event(ready)
    prev = None  # (slot, event, start, length) of the slice in flight
    for i, start in enumerate(range(0, len(host), _SLOT_BYTES)):
        n = min(_SLOT_BYTES, len(host) - start)
        slot, arrived = slots[i % 2], None
        if cuda:
            with torch.cuda.device(dev), torch.cuda.stream(stream):
                slot[:n].copy_(packed[start:start + n], non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record(stream)
        else:
            slot[:n].copy_(packed[start:start + n])
        if prev is not None:
            _land(*prev, host)
        prev = (slot, arrived, start, n)
    if prev is not None:
        _land(*prev, host)


def _land(slot: torch.Tensor, arrived, start: int, n: int, host: np.ndarray) -> None:
    if arrived is not None:
        arrived.synchronize()
    np.copyto(host[start:start + n], slot[:n].numpy())


def _done() -> None:
    return None
