"""Results to the host: the staged, background copy (``_transfer.arrays_to_host_async``) gives the same arrays as
``.numpy()``, in memory of their own, whether the caller waits or not; exact paths are unchanged by it."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from helpers import assert_same_records
from polytope_lens import _transfer
from polytope_lens.paths import path_crossings


def _arrays(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1001, generator=g, dtype=torch.float64),
            torch.randint(-9, 9, (7,), generator=g).to(torch.int16),
            torch.arange(-3, 10, dtype=torch.int8).reshape(13, 1), torch.rand(5, 3, generator=g) > 0.5,
            torch.randint(0, 2**30, (3, 3), generator=g).to(torch.int32)[:, 1],  # not contiguous
            torch.zeros(0, dtype=torch.int64), torch.tensor(2.5, dtype=torch.float32)]


@pytest.fixture
def small_slots(monkeypatch):
    """Slots of 40 bytes, so that a batch crosses in many slices, some splitting an array."""
    monkeypatch.setattr(_transfer, "_SLOT_BYTES", 40)
    _transfer._slots.cache_clear()
    yield
    _transfer._slots.cache_clear()


@pytest.mark.parametrize("background", [True, False])
def test_staged_copy_equals_numpy(monkeypatch, small_slots, background):
    monkeypatch.setattr(_transfer, "BACKGROUND", background)
    pending = []
    for seed in range(12):  # queued before any is waited for
        xs = _arrays(seed)
        pending.append((xs, *_transfer.arrays_to_host_async(xs, staged=True)))
    for _, _, wait in pending:
        wait()
    assert _transfer._slots.cache_info().misses == 1  # made once (by the one thread that uses them)
    slots = _transfer._slots(torch.device("cpu"))
    for xs, got, _ in pending:
        for x, a in zip(xs, got):
            want = x.numpy()
            assert a.dtype == want.dtype and a.shape == want.shape and np.array_equal(a, want)
            assert not any(np.shares_memory(a, b.numpy()) for b in slots)
            assert not np.shares_memory(a, want)
    assert _transfer.arrays_to_host([], staged=True) == []


def test_exact_paths_through_the_staged_copy_equal_the_direct_ones(monkeypatch, small_slots):
    """The records, breakpoints and traces of a batch of exact paths taken through the staged background copy
    (as on a GPU), in several chunks, equal those taken as views; the narrow integer types of the stored records
    come back as int64."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.LeakyReLU(0.1),
                              torch.nn.Linear(24, 3))
    g = torch.Generator().manual_seed(1)
    a, b = 3 * torch.randn(60, 5, generator=g), 3 * torch.randn(60, 5, generator=g)
    kw = dict(memory_budget=1 << 20)  # several chunks
    import polytope_lens.paths as paths_mod
    for trace in (True, False):
        want = path_crossings(mlp, a, b, trace=trace, **kw)
        with monkeypatch.context() as m:
            m.setattr(paths_mod, "arrays_to_host_async", functools.partial(_transfer.arrays_to_host_async, staged=True))
            got = path_crossings(mlp, a, b, trace=trace, **kw)
        assert len(got.paths._blocks) > 2 and _transfer._slots.cache_info().misses == 1  # staged, in chunks
        assert_same_records(got, want, trace=trace, t_atol=0)
        for p, q in zip(got.paths, want.paths):
            assert np.array_equal(p.t, q.t)
            assert all(p.records[k].dtype == np.int64 for k in ("site", "unit", "piece"))
    block = got.paths._blocks[-1]
    assert (block.rec_site.dtype, block.rec_unit.dtype, block.rec_piece.dtype) == (np.int16, np.int32, np.int8)



def _child_copy(q) -> None:
    got = _transfer.arrays_to_host([torch.arange(10)], staged=True)
    q.put(got[0].tolist())


def test_a_forked_child_gets_its_own_copy_thread():
    """After the copy thread has run, a forked child (which has no copy of it) still gets its batches."""
    import multiprocessing as mp
    _transfer.arrays_to_host([torch.arange(3)], staged=True)  # the parent's thread exists
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_copy, args=(q,))
    p.start()
    p.join(30)
    if p.is_alive():  # hung: no thread to run its copy
        p.kill()
    assert p.exitcode == 0 and q.get(timeout=5) == list(range(10))
