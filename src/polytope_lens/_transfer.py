"""Device-to-host copies that do not stall a GPU: asynchronous copies into page-locked memory, one wait per batch.

A plain ``.cpu()`` waits for the GPU to finish everything queued before it and copies at pageable speed; a batch
of results taken that way costs one wait per array (code extraction, ``codes.py``: a third of a GPT-2-small run in
bfloat16; exact paths, ``paths._collect``: nine waits per chunk).
"""

from __future__ import annotations

from typing import Iterable

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
