"""The kink registry against hand-computed pieces and brute-force crossing searches."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polytope_lens.errors import UnsupportedActivationError
from polytope_lens.kinks import REGISTRY, WindowMax, get_activation, resolve_call


def test_relu_pieces_zero_is_off():
    """ReLU's piece is 1[z > 0]: the kink itself belongs to the 'off' piece, as ReLU(0) = 0."""
    z = torch.tensor([-1.0, 0.0, 1e-12, 3.0])
    assert REGISTRY["relu"].pieces(z).tolist() == [0, 0, 1, 1]


def test_relu6_has_three_pieces():
    """ReLU6: piece 0 below 0, 1 on (0, 6], 2 above 6; 2 bits per unit."""
    a = REGISTRY["relu6"]
    assert a.pieces(torch.tensor([-2.0, 0.0, 3.0, 6.0, 6.5])).tolist() == [0, 0, 1, 1, 2]
    assert a.n_pieces == 3 and a.bits_per_unit == 2


def test_scalar_crossings_hand_computed():
    """z goes from -1 to 7 on [0, 1]: ReLU6 kinks at 0 and 6 are crossed at t = 1/8 and 7/8."""
    a = REGISTRY["relu6"]
    c = a.crossings(torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([[7.0]], dtype=torch.float64))
    assert c.t.tolist() == [0.125, 0.875]
    assert c.piece.tolist() == [1, 2]
    down = a.crossings(torch.tensor([[7.0]]), torch.tensor([[-1.0]]))
    assert down.piece.tolist() == [1, 0]


def test_crossings_along_rows_equal_crossings_between_row_pairs():
    """The polyline form (one side test per point) gives the same crossings as explicit segment ends, including
    points exactly on a kink."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 3, 5, generator=g, dtype=torch.float64) * 4
    z[7, 0, 1] = 0.0
    z[8, 2, 2] = 6.0
    for name in ("relu", "relu6", "hardtanh", "leaky_relu"):
        act = REGISTRY[name]
        a, b = act.crossings_along(z), act.crossings(z[:-1], z[1:])
        for field in ("segment", "unit", "t", "piece"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)
    pool = WindowMax("max_pool2d", kernel=(2, 2), stride=(2, 2))
    x = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    assert torch.equal(pool.crossings_along(x).t, pool.crossings(x[:-1], x[1:]).t)


def _brute_argmax_changes(w0, w1, n=20001):
    ts = np.linspace(0, 1, n)
    vals = w0[None] + ts[:, None] * (w1 - w0)[None]
    arg = vals.argmax(1)
    return int((arg[1:] != arg[:-1]).sum())


def test_maxpool_crossings_match_dense_sampling():
    """Argmax changes of 2x2 max-pool windows along a segment equal a dense brute-force count."""
    torch.manual_seed(1)
    pool = WindowMax("max_pool2d", kernel=(2, 2), stride=(2, 2))
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x1 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    c = pool.crossings(x0, x1)
    w0 = pool.windows(x0).reshape(3, -1, 4).numpy()
    w1 = pool.windows(x1).reshape(3, -1, 4).numpy()
    brute = sum(_brute_argmax_changes(w0[s, u], w1[s, u]) for s in range(3) for u in range(w0.shape[1]))
    assert len(c) == brute
    # the entered piece is the argmax just after each crossing
    for s, u, t, p in zip(c.segment.tolist(), c.unit.tolist(), c.t.tolist(), c.piece.tolist()):
        after = w0[s, u] + min(t + 1e-7, 1.0) * (w1[s, u] - w0[s, u])
        assert after.argmax() == p


def test_maxpool_pieces_match_torch_indices():
    """The argmax piece agrees with F.max_pool2d's return_indices, with padding and stride 1."""
    x = torch.randn(2, 3, 5, 5)
    pool = WindowMax("max_pool2d", kernel=(3, 3), stride=(1, 1), padding=(1, 1))
    out, idx = F.max_pool2d(x, 3, 1, 1, return_indices=True)
    piece = pool.pieces(x)
    win = pool.windows(x)
    assert torch.equal(win.gather(-1, piece[..., None])[..., 0], out)
    # the flat index of the chosen window element equals torch's index
    oh, ow = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    r = oh - 1 + piece // 3
    c = ow - 1 + piece % 3
    assert torch.equal(r * 5 + c, idx)


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil", [
    ((2, 2), (2, 2), (0, 0), (1, 1), False), ((3, 3), (1, 1), (1, 1), (1, 1), False),
    ((3, 2), (2, 3), (1, 0), (2, 1), True), ((1, 3), (1, 2), (0, 1), (1, 1), True)])
@pytest.mark.parametrize("tol", [0.0, 1e-9])
def test_first_maxima_on_strided_views_equal_the_first_maximum_of_gathered_windows(monkeypatch, kernel, stride, padding,
                                                                                   dilation, ceil, tol):
    """``WindowMax.first_maxima`` (strided views, a few rows at a time) picks the same entry as ``first_max`` over
    the gathered windows, with exact ties (a flat region), ties within the tolerance and padding, in 2-D and 1-D, as
    int64 indices and as the bytes that crossing detection compares."""
    import polytope_lens.kinks as kinks

    from polytope_lens.kinks import first_max

    monkeypatch.setattr(kinks, "_FIRST_MAX_BYTES", 3 * 8 * 8 * 8)  # three rows per block: blocks end mid-batch
    pool = WindowMax("max_pool2d", kernel=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 8, 8, 8, generator=g, dtype=torch.float64)
    x[:, :, 2:6, 2:6] = 0.5  # exact ties
    x[:, :3, 0, :] = 0.25
    x[:, :3, 0, ::2] += 1e-12  # within the tolerance of each other
    x[4] = -x[4]  # negative maxima (the tolerance is relative to max(1, |max|))
    for xx in (x, x[:, :, 0, :], x[:0]):
        p = pool if xx.dim() == 4 else WindowMax("max_pool1d", kernel=(1, kernel[1]), stride=(1, stride[1]),
                                                 padding=(0, padding[1]), dilation=(1, dilation[1]), ceil_mode=ceil)
        want = first_max(p.windows(xx), tol)
        assert torch.equal(p.first_maxima(xx, tol), want)
        small = p.first_maxima(xx, tol, torch.uint8)
        assert small.dtype == torch.uint8 and torch.equal(small.long(), want)
        if tol == 0:
            assert torch.equal(p.pieces(xx), want)


def test_maxpool_ceil_mode_shape():
    """ceil_mode windows give the same output size as torch."""
    x = torch.randn(1, 1, 7, 7)
    pool = WindowMax("max_pool2d", kernel=(2, 2), stride=(2, 2), ceil_mode=True)
    assert pool.pieces(x).shape == F.max_pool2d(x, 2, 2, ceil_mode=True).shape


@pytest.mark.parametrize("name,ref", [
    ("gelu", lambda z: F.gelu(z) / z),
    ("gelu_tanh", lambda z: F.gelu(z, approximate="tanh") / z),
    ("silu", lambda z: F.silu(z) / z),
])
def test_soft_codes_are_the_gates(name, ref):
    """Soft codes are the gate g(z) with act(z) = z * g(z), in (0, 1)."""
    z = torch.tensor([-3.0, -0.5, 0.7, 2.0], dtype=torch.float64)
    s = REGISTRY[name].soft(z)
    assert torch.allclose(s, ref(z), atol=1e-12)
    assert bool(((s > 0) & (s < 1)).all())
    assert REGISTRY[name].exact is False


def test_solu_soft_code_is_softmax_weight():
    z = torch.randn(2, 5)
    assert torch.allclose(REGISTRY["solu"].soft(z), torch.softmax(z, -1))


def test_resolve_calls():
    """Calls map to registry entries with their parameters (ReLU6 through hardtanh, GELU tanh form, max_pool)."""
    x = torch.randn(2, 3)
    assert resolve_call(F.hardtanh, (x, 0.0, 6.0), {}).name == "relu6"
    assert resolve_call(F.hardtanh, (x,), {"min_val": -2.0, "max_val": 3.0}).kinks == (-2.0, 3.0)
    assert resolve_call(F.gelu, (x,), {"approximate": "tanh"}).name == "gelu_tanh"
    assert resolve_call(torch.clamp, (x,), {"min": 0}).name == "relu"
    # clamp with two bounds, or one other than min=0: a kinked activation named clamp (before: a TypeError)
    both = resolve_call(torch.clamp, (x, -0.5, 0.6), {})
    assert (both.name, both.kinks, both.n_pieces) == ("clamp", (-0.5, 0.6), 3)
    assert resolve_call(torch.Tensor.clamp, (x,), {"min": 0.1}).kinks == (0.1,)
    assert resolve_call(torch.clip, (x,), {"max": 0.3}).kinks == (0.3,)
    assert resolve_call(torch.clamp, (x, 0, 6), {}).name == "relu6"
    with pytest.raises(UnsupportedActivationError, match="min >= max"):
        resolve_call(torch.clamp, (x, 1.0, 0.0), {})
    mp = resolve_call(F.max_pool2d, (x, 3), {"stride": 2, "padding": 1})
    assert (mp.kernel, mp.stride, mp.padding) == ((3, 3), (2, 2), (1, 1))
    assert resolve_call(torch.add, (x, x), {}) is None


def test_unknown_activation_errors():
    with pytest.raises(UnsupportedActivationError, match="elu is not in the kink registry"):
        resolve_call(F.elu, (torch.randn(2),), {})
    with pytest.raises(UnsupportedActivationError, match="registered activations are"):
        get_activation("swishy")


def test_bits_per_unit():
    assert REGISTRY["relu"].bits_per_unit == 1
    assert WindowMax("max_pool2d", kernel=(3, 3), stride=(2, 2)).bits_per_unit == math.ceil(math.log2(9))


def test_crossings_are_sorted_by_segment_then_t():
    """``sort_crossings`` (only the segments with several crossings are sorted when rows come in segment order) against
    Python's sort of (segment, t), for rows in segment order and in any order."""
    from polytope_lens.kinks import Crossings, sort_crossings
    g = torch.Generator().manual_seed(0)
    seg = torch.sort(torch.randint(0, 40, (200,), generator=g)).values
    t = torch.rand(200, generator=g, dtype=torch.float64)
    t[5] = t[6] if seg[5] == seg[6] else t[5]  # a tie in t keeps its order (stable)
    for perm in (torch.arange(200), torch.randperm(200, generator=g)):
        c = sort_crossings(Crossings(seg[perm], torch.arange(200)[perm], t[perm], torch.zeros(200, dtype=torch.long)))
        want = sorted(range(200), key=lambda i: (int(seg[perm][i]), float(t[perm][i]), i))
        assert c.unit.tolist() == torch.arange(200)[perm][want].tolist()


def test_max_pool_crossings_with_a_tolerance_ignore_rounding_and_keep_real_changes():
    """With ``tol``, window entries within the tolerance of the maximum count as tied at it and entries within it of
    each other at both ends of a segment are one line: rounding noise between equal entries gives no crossing, and
    on generic windows the crossings (segment, unit, t, piece) are exactly those without a tolerance."""
    pool = WindowMax("max_pool2d", kernel=(2, 2), stride=(2, 2))
    g = torch.Generator().manual_seed(3)
    z = torch.randn(50, 2, 4, 4, generator=g, dtype=torch.float64)
    exact, tol = pool.crossings_along(z), pool.crossings_along(z, 1e-9)
    assert len(exact) > 20
    for f in ("segment", "unit", "piece"):
        assert torch.equal(getattr(exact, f), getattr(tol, f))
    assert torch.equal(exact.t, tol.t)
    # every window holds one value, perturbed by a few ulps differently at each point
    base = torch.linspace(-1.0, 1.0, 50, dtype=torch.float64)[:, None, None, None].expand(50, 2, 4, 4)
    noisy = base * (1.0 + 4e-16 * torch.randn(50, 2, 4, 4, generator=g, dtype=torch.float64))
    assert len(pool.crossings_along(noisy)) > 0
    assert len(pool.crossings_along(noisy, 1e-9)) == 0


def test_max_pool_lines_through_one_point_enter_the_steepest_once():
    """Hand case: window entries c_i (t - 0.3) all meet at t = 0.3 (value 0, e.g. entries that are 0 at a point of
    a ray). The envelope goes from the falling line straight to the steepest one: one crossing entering it, not a
    detour through a line that only touches the envelope at that point, whichever line's meeting t rounding puts
    first."""
    pool = WindowMax("max_pool2d", kernel=(1, 4), stride=(1, 4))
    c = torch.tensor([-1.7, 0.9, 1.3, 2.3], dtype=torch.float64)
    seen = set()
    for shift in torch.linspace(-1e-3, 1e-3, 41, dtype=torch.float64):
        cc = c * (1.0 + shift)  # different roundings of the meeting points
        cc[0] = c[0]
        z0, z1 = (cc * (-0.3)).reshape(1, 1, 1, 4), (cc * 0.7).reshape(1, 1, 1, 4)
        cr = pool.crossings(z0, z1, 1e-9)
        assert cr.piece.tolist() == [3] and abs(float(cr.t[0]) - 0.3) < 1e-12
        seen.add(float(cr.t[0]))
    assert len(seen) > 1  # rounding did vary the meeting point


def test_max_pool_change_onto_a_tie_at_the_segment_end_is_kept():
    """Entry 1 is the maximum along the segment and entry 0 catches up with it exactly at t = 1 (equal there, as
    clamped entries are): at t = 1 the first maximum is entry 0, so the window changes piece there, once, whatever
    the rounding of the meeting point (before: lost when it rounded just past 1, in about half of these windows)."""
    pool = WindowMax("max_pool2d", kernel=(1, 2), stride=(1, 2))
    g = torch.Generator().manual_seed(0)
    end = torch.rand(200, generator=g, dtype=torch.float64) + 0.5
    lo = end - torch.rand(200, generator=g, dtype=torch.float64)
    hi = lo + (end - lo) * torch.rand(200, generator=g, dtype=torch.float64)
    z0 = torch.stack([lo, hi], -1).reshape(200, 1, 1, 2)
    z1 = torch.stack([end, end], -1).reshape(200, 1, 1, 2)
    for tol in (0.0, 1e-9):
        cr = pool.crossings(z0, z1, tol)
        assert cr.segment.tolist() == list(range(200))
        assert bool((cr.t == 1.0).all()) and bool((cr.piece == 0).all())


def test_crossings_along_orders_ties_and_double_jumps_as_crossings():
    """Units that jump over both kinks of ReLU6 in one segment (up and down), and crossings of different kinks at
    exactly the same t, come in the same order from the polyline form (one piece comparison per point) as from the
    kink-by-kink form: (segment, t), then kink, then unit."""
    act = REGISTRY["relu6"]
    # segment 0: unit 0 rises -1 -> 7 (both kinks), unit 1 falls 7 -> -1 (both kinks), unit 2 crosses 6 at t = 0.5
    # (5 -> 7) and unit 3 crosses 0 at t = 0.5 (-1 -> 1): ties across kinks; segment 1: unit 3 back down over 0
    z = torch.tensor([[-1.0, 7.0, 5.0, -1.0, 3.0], [7.0, -1.0, 7.0, 1.0, 3.0], [7.0, -1.0, 7.0, -1.0, 3.0]],
                     dtype=torch.float64)
    a, b = act.crossings_along(z), act.crossings(z[:-1], z[1:])
    for field in ("segment", "unit", "t", "piece"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.segment.tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert a.t.tolist() == [0.125, 0.125, 0.5, 0.5, 0.875, 0.875, 0.5]
    assert a.unit.tolist() == [0, 1, 3, 2, 1, 0, 3]  # at t = 0.125 kink 0 then kink 1; at 0.5 kink 0 (unit 3) first
    assert a.piece.tolist() == [1, 1, 1, 2, 0, 2, 0]
    g = torch.Generator().manual_seed(5)
    for trial in range(20):  # many ties: inputs on a coarse grid
        z = torch.randint(-3, 10, (12, 7), generator=g).double() * 1.0
        for name in ("relu6", "hardtanh"):
            a, b = REGISTRY[name].crossings_along(z), REGISTRY[name].crossings(z[:-1], z[1:])
            for field in ("segment", "unit", "t", "piece"):
                assert torch.equal(getattr(a, field), getattr(b, field)), (trial, name, field)


def test_crossings_along_rows_in_another_order_equal_the_reordered_rows():
    """``order`` (rows kept in the order points were made, visited in path order) gives exactly the crossings of
    the rows reordered first, for every family, with ties (a coarse grid) and points on kinks."""
    g = torch.Generator().manual_seed(11)
    z = torch.randint(-3, 9, (30, 2, 4, 4), generator=g).double()
    order = torch.randperm(30, generator=g)
    for name in ("relu", "relu6", "hardtanh", "leaky_relu"):
        act = REGISTRY[name]
        a, b = act.crossings_along(z, order=order), act.crossings_along(z[order])
        for field in ("segment", "unit", "t", "piece", "before"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)
    pool = WindowMax("max_pool2d", kernel=(2, 2), stride=(2, 2))
    x = torch.randn(9, 2, 4, 4, generator=g, dtype=torch.float64)
    x[:, :, :2, :2] = torch.randint(0, 2, (9, 2, 2, 2), generator=g).double()  # tied windows
    order = torch.randperm(9, generator=g)
    for tol in (0.0, 1e-9):
        a, b = pool.crossings_along(x, tol, order=order), pool.crossings_along(x[order], tol)
        assert len(b) > 5
        for field in ("segment", "unit", "t", "piece", "before"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (tol, field)


def test_snapped_puts_rounding_neighbours_of_a_kink_on_it():
    """ReLU6: entries within 1000 ulps of the row's scale of 0 or 6 land exactly there; farther ones, exact ones and
    rows with nothing to move are left alone (None)."""
    act = get_activation("relu6")
    eps = torch.finfo(torch.float64).eps
    z = torch.tensor([[5e-17, -3e-16, 6 + 8 * eps, 1e-9, 0.0, 2.0]], dtype=torch.float64)
    got = act.snapped(z)
    assert got.tolist() == [[0.0, 0.0, 6.0, 1e-9, 0.0, 2.0]]
    assert act.snapped(torch.tensor([[0.0, 1e-9, 6.0]], dtype=torch.float64)) is None


def test_soft_codes_keep_their_digits_far_below_the_kink():
    """Gates computed as 0.5 * (1 + erf(.)) or (tanh + 1) / 2 cancel for negative inputs: float32 GELU gave 2.98e-8
    for Phi(-5.5) = 1.9e-8 and 0 from -6 on (MiniLM had 1,485 soft values of exactly 0). Oracle: scipy in float64."""
    from scipy.special import erfc, expit, ndtr

    z = np.array([-13.0, -9.0, -6.0, -5.5, -2.0, 0.0, 1.5, 4.0], dtype=np.float32)
    zt = torch.from_numpy(z)
    z64 = z.astype(np.float64)
    k = np.sqrt(2 / np.pi)
    oracle = {"gelu": ndtr(z64), "ndtr": ndtr(z64), "log_ndtr": ndtr(z64), "tanh": expit(2 * z64),
              "erf": erfc(-z64) / 2, "erfc": erfc(-z64) / 2, "gelu_tanh": expit(2 * k * (z64 + 0.044715 * z64 ** 3)),
              "sigmoid": expit(z64), "silu": expit(z64)}
    for name, want in oracle.items():
        got = REGISTRY[name].soft(zt).numpy().astype(np.float64)
        normal = want > 1e-37  # float32's normal range; below it subnormals lose relative precision by design
        np.testing.assert_allclose(got[normal], want[normal], rtol=1e-5, err_msg=name)  # float32 rounding of z
        assert (got[want > 1e-44] > 0).all(), name  # not 0 wherever float32 holds the gate


def test_max_pool_pieces_and_changes_do_not_depend_on_the_inputs_scale():
    """Max pooling's ties (``tol * max(floor, |max|)``, floor = min(1, the example's largest |entry|)) are relative
    below 1: scaling an example by 1e-12 keeps its first maxima and its changes along a segment, ties rounded apart
    included (0.1 + 0.2 vs 0.3). Oracle: the unscaled example's pieces and changes (a scale leaves every argmax and
    every crossing position unchanged in exact arithmetic)."""
    pool = WindowMax("max_pool2d", kernel=(2, 2), stride=(2, 2))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.1 + 0.2, 0.3  # equal in exact arithmetic, one ulp apart here
    x[:, :, 1, :2] = 0.0
    y = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64)
    want = pool.first_maxima(x, 1e-9)
    assert (want[:, :, 0, 0] == 0).all()  # the tie goes to the first entry
    ref = pool.crossings(x, y, 1e-9)
    for s in (1e-12, 1e-200):
        assert torch.equal(pool.first_maxima(x * s, 1e-9), want)
        got = pool.crossings(x * s, y * s, 1e-9)
        for f in ("segment", "unit", "piece"):
            assert torch.equal(getattr(got, f), getattr(ref, f))
        torch.testing.assert_close(got.t, ref.t, rtol=1e-12, atol=0)
    # above 1 the band is tol * |max| as before; an example of zeros ties only exactly
    zeros = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    assert pool.first_maxima(zeros, 1e-9).item() == 0
    tiny = zeros.clone()
    tiny[0, 0, 1, 1] = 1e-300
    assert pool.first_maxima(tiny, 1e-9).item() == 3
