"""Unusual but legitimate models: torch-namespace and in-place activations, recurrent layers, TorchScript, pooling on
torch's unbatched layouts, stacked batch axes, models left in train mode, inputs of other types. Each case is checked
against codes computed by hand (a forward pass and the activation's own rule) or against a one-line refusal."""

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polytope_lens as pl
from polytope_lens.errors import InvalidInputError, UnsupportedActivationError
from polytope_lens.paths import path_crossings


class Around(nn.Module):
    """``relu(b(op(a(x))))``: ``op`` applied to the unit inputs ``a(x)``."""

    def __init__(self, op, width=5):
        super().__init__()
        self.a, self.b, self.op = nn.Linear(3, width), nn.Linear(width, 4), op

    def forward(self, x):
        return F.relu(self.b(self.op(self.a(x))))


X = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("op, site, pieces", [
    (lambda z: torch.clamp_(z, -0.5, 0.5), "clamp", lambda z: (z > -0.5).long() + (z > 0.5).long()),
    (lambda z: torch.clip_(z, -0.5, 0.5), "clamp", lambda z: (z > -0.5).long() + (z > 0.5).long()),
    (lambda z: torch.abs_(z), "abs", lambda z: (z > 0).long()),
    (lambda z: z.absolute_(), "abs", lambda z: (z > 0).long()),
    (lambda z: torch.sigmoid_(z), "sigmoid", lambda z: (z > 0).long()),
    (lambda z: torch.tanh_(z), "tanh", lambda z: (z > 0).long()),
    (lambda z: torch.special.expit(z), "sigmoid", lambda z: (z > 0).long()),
    (lambda z: z.prelu(torch.tensor([0.2])), "prelu", lambda z: (z > 0).long()),
])
def test_torch_namespace_and_inplace_activations_are_sites(op, site, pieces):
    torch.manual_seed(1)
    m = Around(op).eval()
    codes = pl.spline_codes(m, X)
    first = [n for n in codes.layers if n != "relu"]
    assert first == [site], list(codes.layers)
    with torch.no_grad():
        z = m.a(X)
    assert (codes[first[0]].pieces() == pieces(z).numpy()).all()


@pytest.mark.parametrize("op", [
    lambda z: torch.selu(z), lambda z: torch.celu(z), lambda z: torch.threshold(z, 0.1, 0.0),
    lambda z: torch.hardshrink(z, 0.5), lambda z: z.hardshrink(0.5), lambda z: torch.rrelu(z),
])
def test_torch_namespace_nonlinearities_we_cannot_describe_are_refused(op):
    with pytest.raises(UnsupportedActivationError, match="not in the kink registry"):
        pl.spline_codes(Around(op).eval(), X)


def test_threshold_is_named_without_its_underscore():
    with pytest.raises(UnsupportedActivationError, match=r"^threshold is not in the kink registry"):
        pl.spline_codes(Around(lambda z: F.threshold(z, 0.1, 0.0)).eval(), X)


@pytest.mark.parametrize("layer", [nn.RNN(3, 4, nonlinearity="relu", batch_first=True),
                                   nn.RNN(3, 4, batch_first=True), nn.LSTM(3, 4, batch_first=True),
                                   nn.GRU(3, 4, batch_first=True)])
def test_recurrent_layers_are_refused_not_skipped(layer):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = layer, nn.Linear(4, 2)

        def forward(self, x):
            return F.relu(self.out(self.rnn(x)[0][:, -1]))

    x = torch.randn(5, 6, 3)
    with pytest.raises(UnsupportedActivationError, match="(rnn|lstm|gru).*called in module 'rnn'"):
        pl.spline_codes(Net().eval(), x)
    with pytest.raises(UnsupportedActivationError):
        path_crossings(Net(), x[:1], x[1:2], method="exact")


def test_erf_gate_written_by_hand_is_a_site_with_gelus_gate():
    """Hugging Face's gelu_python, x * Phi(x) with Phi = (1 + erf(x / sqrt 2)) / 2, written out: a site at erf whose
    soft code is Phi(x), GELU's gate, and whose bits are x > 0."""
    m = Around(lambda z: z * 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))).eval()
    codes = pl.spline_codes(m, X, soft=True)
    assert "erf" in codes.layers and not codes.exact
    with torch.no_grad():
        z = m.a(X)
    assert (codes["erf"].pieces() == (z > 0).long().numpy()).all()
    phi = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
    np.testing.assert_allclose(codes["erf"].soft, phi.numpy(), atol=1e-6)


@pytest.mark.parametrize("gate, site", [
    (lambda z: 0.5 * torch.erfc(-z / math.sqrt(2.0)), "erfc"),
    (lambda z: torch.special.erfc(-z / math.sqrt(2.0)) / 2, "erfc"),
    (lambda z: torch.special.log_ndtr(z).exp(), "log_ndtr"),
])
def test_mirrored_and_logged_gates_are_sites(gate, site):
    """Phi written as erfc(-z / sqrt 2) / 2 or exp(log_ndtr(z)) is GELU's gate too: a site (it was skipped, so codes
    beside a ReLU were incomplete), bits u > 0 of its own input u, soft code the gate rising with u."""
    m = Around(lambda z: F.relu(z) + z * gate(z)).eval()
    codes = pl.spline_codes(m, X, soft=True)
    assert site in codes.layers and "relu" in codes.layers and not codes.exact
    with torch.no_grad():
        z = m.a(X)
    u = -z / math.sqrt(2.0) if site == "erfc" else z
    assert (codes[site].pieces() == (u > 0).long().numpy()).all()
    rising = 0.5 * (1 + torch.erf(u)) if site == "erfc" else torch.special.ndtr(u)
    np.testing.assert_allclose(codes[site].soft, rising.numpy(), atol=1e-6)


def test_softplus_soft_code_is_its_gate_with_beta():
    m = Around(lambda z: F.softplus(z, beta=4.0)).eval()
    codes = pl.spline_codes(m, X, soft=True)
    with torch.no_grad():
        z = m.a(X)
    np.testing.assert_allclose(codes["softplus"].soft, torch.sigmoid(4.0 * z).numpy(), atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_modules_are_refused_in_codes_and_paths():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return F.relu(self.out(self.inner(x)))

    with pytest.raises(InvalidInputError, match="Module 'inner' is TorchScript"):
        pl.spline_codes(Net(), X)
    with pytest.raises(InvalidInputError, match="Module 'inner' is TorchScript"):
        path_crossings(Net(), X[:1], X[1:2])
    whole = torch.jit.trace(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), X)
    with pytest.raises(InvalidInputError, match="The model is TorchScript"):
        pl.spline_codes(whole, X)


@torch.jit.script
def _scripted_relu(x):
    return torch.relu(x) * 2.0


class CallsScript(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(F.relu(_scripted_relu(self.a(x))))


def test_torchscript_functions_called_from_forward_are_refused():
    """A @torch.jit.script function called from an eager forward hid its ReLU: codes listed one site of two and an
    exact path missed its crossings. Now refused in one line, naming the module and the function."""
    outer = nn.Sequential(nn.Linear(3, 3), CallsScript())
    with pytest.raises(InvalidInputError, match=r"forward of module '1' \(CallsScript\) calls the TorchScript "
                                                r"function '_scripted_relu'"):
        pl.spline_codes(outer, X)
    with pytest.raises(InvalidInputError, match="calls the TorchScript function"):
        path_crossings(outer, X[:1], X[1:2])

    def logged(forward):
        @functools.wraps(forward)
        def wrapper(self, *args):
            return forward(self, *args)
        return wrapper

    class Decorated(nn.Module):  # a forward under a functools.wraps decorator is unwrapped
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)

        @logged
        def forward(self, x):
            return F.relu(_scripted_relu(self.a(x)))
    with pytest.raises(InvalidInputError, match="calls the TorchScript function '_scripted_relu'"):
        pl.spline_codes(Decorated(), X)


def test_a_lazy_module_that_raises_is_not_a_reason_to_fail():
    """The TorchScript check reads attributes of the modules a forward names; a lazy module (transformers') can raise
    anything for a name it cannot import, which made spline_codes fail."""
    import types

    class Lazy(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError(f"cannot import {name}")
    lazy = Lazy("lazyops")
    globals()["lazyops"] = lazy
    try:
        class UsesLazy(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(3, 4)

            def forward(self, x):
                if x is None:
                    return lazyops.missing(x)  # noqa: F821 - named, never called
                return F.relu(self.a(x))
        assert "relu" in pl.spline_codes(UsesLazy(), X).layers
    finally:
        del globals()["lazyops"]


class PoolUnbatched(nn.Module):
    """Max pooling on torch's unbatched layouts: max_pool2d of (N, H, W) maps, max_pool1d of (N, L) signals."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims
        self.a = nn.Linear(8, 36 if dims == 2 else 12)
        self.b = nn.Linear(9 if dims == 2 else 4, 3)

    def forward(self, x):
        z = self.a(x)
        if self.dims == 2:
            return self.b(F.max_pool2d(z.view(-1, 6, 6), 2).flatten(1))
        return self.b(F.max_pool1d(z, 3))

    def windows(self, z):
        if self.dims == 2:
            return z.view(len(z), 6, 6).unfold(1, 2, 2).unfold(2, 2, 2).reshape(len(z), 9, 4)
        return z.unfold(1, 3, 3)


@pytest.mark.parametrize("dims", [1, 2])
def test_max_pool_on_unbatched_layouts_codes_and_exact_paths(dims):
    torch.manual_seed(dims)
    m = PoolUnbatched(dims).double().eval()
    x = torch.randn(40, 8, dtype=torch.float64)
    codes = pl.spline_codes(m, x)
    name = f"max_pool{dims}d"
    with torch.no_grad():
        want = m.windows(m.a(x)).argmax(-1)
    assert (codes[name].pieces().reshape(40, -1) == want.numpy()).all()
    a, b = x[:2], x[2:4]
    res = path_crossings(m, a, b, method="exact", trace=False)
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64)[:, None, None]
    with torch.no_grad():
        arg = m.windows(m.a((a + t * (b - a)).reshape(-1, 8))).argmax(-1).reshape(len(t), 2, -1)
    dense = (arg[1:] != arg[:-1]).sum((0, 2))
    assert res.counts.tolist() == dense.tolist()


def test_batch_axis_is_found_with_two_probe_sizes():
    """A nonlinearity of two branches stacked on a new first axis (2, N, D), and one of a (2, k) parameter, have no
    row per example: left out of all sites (named: a one-line error), not coded as 2 rows."""
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
            self.raw = nn.Parameter(torch.randn(2, 3))

        def forward(self, x):
            scale = F.softplus(self.raw)
            return F.relu(torch.stack([self.a(x), self.b(x)])).sum(0) + F.relu(self.a(x) * scale[0])

    x = torch.randn(10, 4)
    codes = pl.spline_codes(Stacked().eval(), x, batch_size=4)
    assert list(codes.layers) == ["relu#1"] and codes.concat().shape == (10, 1)
    with pytest.raises(InvalidInputError, match="no row per example"):
        pl.spline_codes(Stacked().eval(), x, layers="relu")


def test_codes_of_a_model_in_train_mode_are_its_eval_codes_and_change_nothing():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 8), nn.ReLU())
    m[1].running_mean.normal_()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.training
    x = torch.randn(50, 3)
    got = [pl.spline_codes(m, x, batch_size=b).concat() for b in (64, 7, 7)]
    assert all((g == got[0]).all() for g in got)
    assert m.training and all(mod.training for mod in m.modules())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    m.eval()
    with torch.no_grad():
        want = np.concatenate([np.packbits((m[:3](x) > 0).numpy(), axis=1, bitorder="little"),
                               np.packbits((m(x) > 0).numpy(), axis=1, bitorder="little")], axis=1)
    assert (got[0] == want).all()


def test_inputs_numpy_mappings_with_constants_and_bad_types():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 5)

        def forward(self, x, scale=None, flag=False):
            h = self.lin(x)
            return F.relu(-h if flag else h * (1.0 if scale is None else scale))

    m = Scaled().eval()
    x = torch.randn(6, 3)
    with torch.no_grad():
        on = (m.lin(x) > 0).numpy()
    plain = pl.spline_codes(m, x.numpy().astype(np.float64))  # float64 arrays go in the model's dtype
    assert (plain["relu"].pieces() == on).all()
    flipped = pl.spline_codes(m, {"x": x, "flag": True}, batch_size=4)
    assert (flipped["relu"].pieces() == (~on & (m.lin(x) != 0).detach().numpy())).all()
    scaled = pl.spline_codes(m, {"x": x, "scale": torch.tensor(2.0)})
    assert (scaled["relu"].pieces() == on).all()
    reversed_rows = np.ascontiguousarray(x.numpy()[::-1])  # torch.from_numpy refuses negative strides, byte swaps
    for arr in (x.numpy()[::-1], reversed_rows.astype(">f4")):
        assert (pl.spline_codes(m, arr)["relu"].pieces() == on[::-1]).all()
    with pytest.raises(InvalidInputError, match="must be a tensor, a NumPy array or a mapping of them.*Got tuple"):
        pl.spline_codes(m, (x,))
    with pytest.raises(InvalidInputError, match="different numbers of examples"):
        pl.spline_codes(m, {"x": x, "scale": torch.ones(4, 1)})
    with pytest.raises(InvalidInputError, match=r"raised RuntimeError on the inputs of spline_codes \(one row of "
                                                r"shape \(4,\)\).*Are they of the shape the model takes"):
        pl.spline_codes(m, torch.randn(3, 4))


def test_misspelt_keywords_name_the_closest_parameter():
    m = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    with pytest.raises(InvalidInputError, match="spline_codes got an unexpected keyword argument 'layer' "
                                                r"\(did you mean 'layers'\?\)"):
        pl.spline_codes(m, torch.randn(3, 2), layer="1.relu")
    from polytope_lens.codes import CodeExtractor
    with pytest.raises(InvalidInputError, match=r"CodeExtractor got an unexpected keyword argument 'progress'\. Its"):
        CodeExtractor(m, progress=print)  # progress goes to its __call__; not suggested as itself
    with pytest.raises(InvalidInputError, match=r"path_crossings .* 'mthod' \(did you mean 'method'\?\)"):
        path_crossings(m, torch.randn(1, 2), torch.randn(1, 2), mthod="exact")
    from polytope_lens.slices import slice_box
    with pytest.raises(InvalidInputError, match=r"slice_plane .* 'untill' \(did you mean 'until'\?\)"):
        slice_box(m, untill="1.relu")
