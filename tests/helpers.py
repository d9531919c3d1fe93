"""Assertions shared by test modules (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np


def assert_same_records(got, want, trace: bool = True, t_atol: float = 1e-12) -> None:
    """Two path batches give the same crossings: counts, per-layer counts, ties, positions (to ``t_atol``), units,
    pieces, and with ``trace`` the same top classes and JS divergences."""
    assert got.counts.tolist() == want.counts.tolist()
    for p, q in zip(got.paths, want.paths):
        assert p.per_layer == q.per_layer and p.ties == q.ties
        np.testing.assert_allclose(p.records["t"], q.records["t"], rtol=0, atol=t_atol)
        assert (p.records["unit"] == q.records["unit"]).all() and (p.records["piece"] == q.records["piece"]).all()
        if trace:
            assert (p.trace.top_class == q.trace.top_class).all()
            np.testing.assert_allclose(p.trace.js, q.trace.js, rtol=1e-9, atol=1e-14)
