"""Prediction 3: validity intervals and density near their ends."""

import numpy as np
import torch
from torch import nn

from polytope_lens.experiments.prediction3 import ray_statistics, validity_interval
from polytope_lens.paths import ray_crossings


def test_validity_interval_planted():
    """Classes 0 on [0, 0.6), 1 on [0.6, 2.5), 2 after: the interval around alpha = 1 is (0.6, 2.5)."""
    alpha = np.linspace(0.005, 3.995, 400)
    top = np.where(alpha < 0.6, 0, np.where(alpha < 2.5, 1, 2))
    lo, hi, c = validity_interval(alpha, top, 1.0)
    assert c == 1 and abs(lo - 0.6) < 0.011 and abs(hi - 2.5) < 0.011
    lo, hi, c = validity_interval(alpha, np.ones(400, int), 1.0)
    assert lo is None and hi is None


class _Planted(nn.Module):
    """Site 'relu' output a (1-D, a = 1 for the input); after it: hidden kinks at alpha = kinks; logits change class
    at alpha = 0.6 and 2.5."""

    def __init__(self, kinks, flips=(0.6, 2.5)):
        super().__init__()
        self.pre = nn.ReLU()
        self.k = torch.tensor(kinks, dtype=torch.float32)
        self.flips = flips
        self.act = nn.ReLU()

    def forward(self, x):
        a = self.pre(x)                                   # (B, 1), the scaled site
        h = self.act(a - self.k.to(a.dtype))              # kinks at alpha = k
        f0, f1 = self.flips
        # three logits, piecewise linear in a: class 0 below f0, 1 between, 2 above
        l0 = -(a - f0) * 10
        l1 = torch.minimum((a - f0) * 10, (f1 - a) * 10)
        l2 = (a - f1) * 10
        return torch.cat([l0, l1, l2], 1) + 1e-6 * h.sum(1, keepdim=True)


def _rays(kinks, n=8):
    m = _Planted(kinks)
    return ray_crossings(m, torch.ones(n, 1), layer="pre.relu", alphas=(0.0, 4.0), method="sampled", n_samples=2000)


def test_planted_interval_and_density_holds():
    """Kinks clustered at the interval ends: recovered interval, density near ends > elsewhere (holds)."""
    kinks = np.concatenate([0.6 + np.linspace(-0.03, 0.03, 10), 2.5 + np.linspace(-0.03, 0.03, 10), [1.5]])
    st = ray_statistics(_rays(kinks), n_boot=200)
    iv = st["intervals"][0]
    assert iv["class"] == 1 and abs(iv["lo"] - 0.6) < 0.01 and abs(iv["hi"] - 2.5) < 0.01
    assert st["entries"][0]["verdict"] == "holds"


def test_kinks_away_from_ends_do_not_hold():
    """Kinks spread away from the ends: density near the ends is lower (does not hold)."""
    kinks = np.concatenate([np.linspace(1.0, 2.2, 20), np.linspace(3.0, 3.9, 10)])
    e = ray_statistics(_rays(kinks), n_boot=200)["entries"][0]
    assert e["value"] < e["baseline"] and e["verdict"] == "does not hold"
