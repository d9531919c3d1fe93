"""Results to the host: the staged, background copy (``_transfer.arrays_to_host_async``) gives the same arrays as
``.numpy()``, owning their memory, whether it runs on a background thread or not; exact paths are unchanged by it."""

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


@pytest.mark.parametrize("background", [True, False])
def test_staged_copy_equals_numpy_and_owns_its_memory(monkeypatch, background):
    monkeypatch.setattr(_transfer, "BACKGROUND", background)
    monkeypatch.setattr(_transfer, "_free", {})
    pending = []
    for seed in range(12):  # queued before any is waited for: buffers are taken while earlier copies are still out
        xs = _arrays(seed)
        pending.append((xs, *_transfer.arrays_to_host_async(xs, staged=True)))
    for xs, got, wait in pending:
        wait()
        for x, a in zip(xs, got):
            want = x.numpy()
            assert a.dtype == want.dtype and a.shape == want.shape and np.array_equal(a, want)
            assert a.flags.owndata or a.base is not None and a.base.flags.owndata
            assert not any(np.shares_memory(a, b.numpy()) for b in _transfer._free[torch.device("cpu")])
    # every buffer came back, and the same buffer serves the next batch of that size
    bufs = _transfer._free[torch.device("cpu")]
    assert 1 <= len(bufs) <= 12
    kept = {id(b) for b in bufs}
    _transfer.arrays_to_host(_arrays(0))  # unstaged on the CPU: no buffer taken
    got, wait = _transfer.arrays_to_host_async(_arrays(0), staged=True)
    wait()
    assert {id(b) for b in _transfer._free[torch.device("cpu")]} <= kept


def test_exact_paths_through_the_staged_copy_equal_the_direct_ones(monkeypatch):
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
    monkeypatch.setattr(_transfer, "_free", {})
    for trace in (True, False):
        want = path_crossings(mlp, a, b, trace=trace, **kw)
        with monkeypatch.context() as m:
            m.setattr(paths_mod, "arrays_to_host_async", functools.partial(_transfer.arrays_to_host_async, staged=True))
            got = path_crossings(mlp, a, b, trace=trace, **kw)
        assert len(got.paths._blocks) > 2 and _transfer._free[torch.device("cpu")]  # staged, in several chunks
        assert_same_records(got, want, trace=trace, t_atol=0)
        for p, q in zip(got.paths, want.paths):
            assert np.array_equal(p.t, q.t)
            assert all(p.records[k].dtype == np.int64 for k in ("site", "unit", "piece"))
    block = got.paths._blocks[-1]
    assert (block.rec_site.dtype, block.rec_unit.dtype, block.rec_piece.dtype) == (np.int16, np.int32, np.int8)

