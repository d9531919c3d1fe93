"""Capture finds activations by call, names them by module path, and cleans up after itself."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytope_lens.capture import list_sites, run, select_sites
from polytope_lens.errors import InvalidInputError, UnsupportedActivationError


class Functional(nn.Module):
    """A Lucent-style block: functional calls inside a custom module, one op called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = torch.relu(self.b(h))
        return h.relu() + F.leaky_relu(h - 1.0, 0.1)


class Shared(nn.Module):
    """One activation module called twice (EfficientNet's _swish pattern)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.act = nn.Linear(3, 5), nn.Linear(5, 5), nn.ReLU6()

    def forward(self, x):
        return self.act(self.l2(self.act(self.l1(x))))


def test_functional_calls_are_found_and_numbered():
    """F.relu, torch.relu and Tensor.relu in one module are separate sites, numbered in call order."""
    m = Functional()
    sites = list_sites(m, lambda: m(torch.randn(2, 4)))
    assert [s.name for s in sites] == ["relu", "relu#1", "relu#2", "leaky_relu"]
    assert [s.order for s in sites] == [0, 1, 2, 3]


def test_shared_module_is_captured_per_call():
    m = Shared()
    sites = list_sites(m, lambda: m(torch.randn(2, 3)))
    assert [s.name for s in sites] == ["act.relu6", "act.relu6#1"]
    assert all(s.module_path == "act" for s in sites)


def test_nested_paths():
    m = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 3), nn.Tanh()))
    sites = list_sites(m, lambda: m(torch.randn(1, 2)))
    assert [s.name for s in sites] == ["1.0.relu", "1.2.tanh"]


def test_handler_sees_pre_activation_even_inplace():
    """With nn.ReLU(inplace=True) the handler still gets the pre-activation values, also when it keeps them without
    a copy (the call overwrites its input after the handler returns); a replacement reaches code that reads the
    mutated input instead of the return value."""
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True))
    x = torch.randn(5, 3)
    seen = {}
    run(m, lambda: m(x), lambda site, z: [seen.setdefault(site.name, z), None][1])
    assert torch.allclose(seen["1.relu"], m[0](x))

    class ReadsInput(nn.Module):
        def forward(self, x):
            F.relu(x, inplace=True)  # result ignored
            return x
    y = run(ReadsInput(), lambda: ReadsInput()(x.clone()), lambda site, z: torch.full_like(z, 7.0))
    assert torch.equal(y, torch.full_like(x, 7.0))


def test_activations_on_integer_tensors_are_not_sites():
    """A clamp or abs of integer positions (T5's relative-position buckets) is not a unit of the network's function
    of its input: no site, and no error."""
    class Buckets(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            bucket = torch.abs(torch.arange(x.shape[1]).clamp(0, 2) - 1)
            return torch.relu(self.lin(x)) + bucket.sum()
    m = Buckets()
    assert [s.name for s in list_sites(m, lambda: m(torch.randn(2, 3)))] == ["relu"]


def test_handler_can_replace_output():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(2, 3)
    out = run(m, lambda: m(x), lambda site, z: 2 * F.relu(z))
    assert torch.allclose(out, m[2](2 * F.relu(m[0](x))))


class _OutResized(nn.Module):
    """A site written with out= into an empty tensor, which torch resizes to the result."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        buf = torch.empty(0, dtype=x.dtype)
        torch.clamp(self.a(x), min=0, out=buf)
        return self.b(buf)


def test_a_site_written_with_out_into_a_tensor_of_another_shape_is_followed():
    """torch.clamp(h, min=0, out=buf) into an empty buf: a replacement was returned but not written into buf (the
    shapes differ), which the caller reads, so a replacing pass, paths and slices ended in a raw 'mat1 and mat2
    shapes cannot be multiplied'. Oracles: the replacement applied by hand; the relu's on/off pattern; the model
    written without out=."""
    from polytope_lens import spline_codes
    from polytope_lens.paths import path_crossings

    m = _OutResized().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        h = m.a(x)
        assert [s.name for s in list_sites(m, lambda: m(x))] == ["relu"]
        assert torch.allclose(run(m, lambda: m(x), lambda site, z: 2 * z.clamp(min=0)), m.b(2 * h.clamp(min=0)))
    assert (spline_codes(m, x)["relu"].pieces() == (h > 0).long().numpy()).all()
    plain = nn.Sequential(m.a, nn.ReLU(), m.b)
    got = path_crossings(m, 3 * x, -3 * x).counts.tolist()  # through the origin: most units turn
    assert got == path_crossings(plain, 3 * x, -3 * x).counts.tolist() and sum(got) >= 6


def test_unknown_activation_names_op_and_module():
    class Elu(nn.Module):
        def forward(self, x):
            return F.elu(x)

    m = nn.Sequential(nn.Linear(2, 2), Elu())
    with pytest.raises(UnsupportedActivationError, match=r"elu is not in the kink registry.*module '1'"):
        list_sites(m, lambda: m(torch.randn(1, 2)))


def test_hooks_removed_after_error():
    """A failing forward pass leaves no global hook or mode behind."""
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())

    def boom(site, z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run(m, lambda: m(torch.randn(1, 2)), boom)
    assert not nn.modules.module._global_forward_pre_hooks
    assert not nn.modules.module._global_forward_hooks
    assert torch.relu(torch.tensor([-1.0])).item() == 0.0


def test_composite_activation_module_is_one_site():
    """Hugging Face's NewGELUActivation (a tanh formula) is one gelu_tanh site; its inner tanh is not a site."""
    from transformers.activations import NewGELUActivation

    m = nn.Sequential(nn.Linear(3, 4), NewGELUActivation())
    x = torch.randn(2, 3)
    seen = {}
    run(m, lambda: m(x), lambda site, z: seen.setdefault(site.name, z))
    assert list(seen) == ["1.gelu_tanh"]
    assert torch.allclose(seen["1.gelu_tanh"], m[0](x))


def test_select_sites_globs_and_errors():
    m = Functional()
    sites = list_sites(m, lambda: m(torch.randn(1, 4)))
    assert [s.name for s in select_sites(sites, "relu*")] == ["relu", "relu#1", "relu#2"]
    assert [s.name for s in select_sites(sites, "leaky*,relu#1")] == ["relu#1", "leaky_relu"]
    with pytest.raises(InvalidInputError, match="matches none of the model's 4 activation sites"):
        select_sites(sites, "blocks.*")


class _Prefixed(nn.Module):
    """conv -> ReLU6 (called twice through one module, EfficientNet's _swish) -> conv -> the same ReLU6 again (the
    replayed site, ``act.relu6#1``) -> a residual add that reads a tensor made before it -> linear. ``flip`` changes
    the calls made before the site."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.act, self.head = nn.ReLU6(), nn.Linear(2 * 5 * 5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.flip = False

    def forward(self, x):
        h = self.act(self.c1(x))
        if self.flip:
            h = h * 1.0
        u = self.c2(h)
        return self.head((self.act(u) + h).flatten(1))


def test_a_replayed_prefix_gives_the_plain_passs_values_without_computing_it(monkeypatch):
    """``PrefixReplay``: the pass that records computes as usual; later passes return the recorded outputs of every
    call before the site (no convolution is computed there), the site keeps its name (``act.relu6#1``, the second
    call of one module: the counters are restored; the first call is replayed, so the handler sees only the site),
    its replacement and everything after it run as usual, and the
    result equals the plain pass's to the bit. Outputs nothing reads from the site on become stride-0 placeholders,
    those read after it (the residual) are kept. A pass that makes other calls raises ``ReplayMismatch`` and leaves
    grad mode as it was."""
    import sys

    from polytope_lens.capture import PrefixReplay, ReplayMismatch

    capture = sys.modules["polytope_lens.capture"]  # the package's ``capture`` is the function
    m = _Prefixed().double().eval()
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    computed = []
    real = capture.conv_call
    monkeypatch.setattr(capture, "conv_call", lambda f, a, k: computed.append(f) or real(f, a, k))

    def passes(rep, replay=None):
        seen = []

        def handler(site, z):
            seen.append(site.name)
            return rep if site.name == "act.relu6#1" else None
        return run(m, lambda: m(x), handler, replay=replay), seen

    rp = PrefixReplay("act.relu6#1")
    rep1, rep2 = torch.rand(2, 2, 5, 5, dtype=torch.float64), torch.rand(2, 2, 5, 5, dtype=torch.float64)
    plain1, names = passes(rep1)
    plain2, _ = passes(rep2)
    computed.clear()
    recorded, _ = passes(rep1, rp)
    n_recording = len(computed)
    assert F.conv2d in computed
    before = rp.nbytes()
    rp.compact()
    assert rp.recorded and torch.equal(recorded, plain1) and 0 < rp.nbytes() < before
    kept = [out for _, out, _ in rp.calls if isinstance(out, torch.Tensor) and out.stride() != (0,) * out.dim()]
    assert kept and all(out.numel() == 2 * 2 * 5 * 5 for out in kept)  # the residual's h (and the site's input)
    for rep, plain in ((rep2, plain2), (rep1, plain1)):
        computed.clear()
        out, seen = passes(rep, rp)
        assert torch.equal(out, plain) and names == ["act.relu6", "act.relu6#1"] and seen == ["act.relu6#1"]
        assert F.conv2d not in computed and len(computed) < n_recording
    m.flip = True
    with pytest.raises(ReplayMismatch):
        passes(rep1, rp)
    assert torch.is_grad_enabled()


def test_a_recording_changed_in_place_after_its_site_is_spoiled():
    """``h += relu(...)`` on a tensor made before the site (the site at that ReLU) changes a recorded output after the
    site: the next replayed pass would start from this pass's sum, so the recording is marked spoiled (and the paths
    engine stops replaying); an in-place site writing its output into its recorded input is not such a change."""
    from polytope_lens.capture import PrefixReplay

    class Accumulates(nn.Module):
        def __init__(self, in_place_site):
            super().__init__()
            self.lin, self.in_place_site = nn.Linear(3, 3), in_place_site

        def forward(self, x):
            h = self.lin(x)
            if self.in_place_site:
                return F.relu(h, inplace=True) * 2.0
            u = F.relu(h * 2.0)
            h += u
            return h

    x = torch.randn(4, 3)
    for in_place_site in (False, True):
        m = Accumulates(in_place_site)
        rp = PrefixReplay("relu")
        for rep in (torch.rand(4, 3), torch.rand(4, 3)):
            out = run(m, lambda: m(x), lambda s, z, rep=rep: rep, replay=rp)
            assert rp.recorded and rp.spoiled != in_place_site
            if in_place_site:
                rp.compact()
                assert torch.equal(out, 2.0 * rep)


class _Declared(nn.Module):
    """A GELU-like nonlinearity the capture cannot see (ndtr): its input is declared as a site."""

    def __init__(self):
        super().__init__()
        self.pre, self.out = nn.Linear(2, 4), nn.Linear(4, 3)
        self.hook_dict = {"blocks.0.hook_pre": self.pre, "blocks.0.mlp.pre_act": self.pre}

    def forward(self, x):
        return self.out(torch.special.ndtr(self.pre(x)))


def test_declared_sites_must_name_a_module_or_hook():
    """A declared path or hook name that the model lacks was dropped without a word; now it is an error with the
    close name. A path, the preferred hook name and another hook name of the same module all declare it."""
    m = _Declared()
    x = torch.randn(3, 2)
    assert [s.name for s in list_sites(m, lambda: m(x))] == ["ndtr"]
    for key in ("pre", "blocks.0.hook_pre", "blocks.0.mlp.pre_act"):
        sites = list_sites(m, lambda: m(x), declared_sites={key: "relu"})
        assert [(s.module_path, s.activation.name) for s in sites] == [("pre", "relu"), ("", "ndtr")]
    for decl, close in (({"pree": "relu"}, "pre"), ({"pre": "relu", "blocks.0.hook_pree": "relu"},
                                                    "blocks.0.hook_pre")):
        with pytest.raises(InvalidInputError, match=f"names '{list(decl)[-1]}', which is not a module path or hook "
                                                    rf"name of the model \(did you mean '{close}'\?\)"):
            list_sites(m, lambda: m(x), declared_sites=decl)
    with pytest.raises(InvalidInputError, match="'declared_sites' parameter must be a dict"):
        list_sites(m, lambda: m(x), declared_sites=[("pre", "relu")])


def test_select_sites_refuses_layers_that_are_not_strings():
    m = Functional()
    sites = list_sites(m, lambda: m(torch.randn(1, 4)))
    assert [s.name for s in select_sites(sites, ("relu", "relu#2"))] == ["relu", "relu#2"]
    for bad in (1, [1], ["relu", None], 2.5):
        with pytest.raises(InvalidInputError, match="'layers' parameter must be a site name or glob"):
            select_sites(sites, bad)


def test_a_bundles_one_named_input_reaches_the_parameter_it_names_in_paths_and_slices():
    """Found at stop 36: a ``ModelInputs`` of one tensor lost its name on the way to paths and slices (its points are
    the bare tensor), which then called ``model(x)``: a ``forward(self, mask=None, x=None)`` got the points as
    ``mask``. Oracle: the same layers behind a plain ``forward(self, x)`` give the same counts, and the model records
    the argument it was given."""
    from polytope_lens.models import ModelInputs
    from polytope_lens.paths import path_crossings, polyline_crossings
    from polytope_lens.slices import exact_local_complexity, local_complexity, slice_through

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.l1, self.l2 = nn.Linear(3, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.l2(torch.relu(self.l1(x)))

    class MaskFirst(Plain):
        def forward(self, mask=None, x=None):
            if mask is not None or x is None:
                raise ValueError("the points reached 'mask'")
            return super().forward(x)

    t = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keyed, plain = MaskFirst().double(), Plain().double()
    plain.load_state_dict(keyed.state_dict())
    inp = ModelInputs({"x": t})
    got = path_crossings(keyed, inp[:2], inp[1:3], trace=False).counts.tolist()
    assert got == path_crossings(plain, t[:2], t[1:3], trace=False).counts.tolist() and sum(got) > 0
    assert (polyline_crossings(keyed, ModelInputs({"x": t[None]}), trace=False).counts.tolist()
            == polyline_crossings(plain, t[None], trace=False).counts.tolist())
    assert (slice_through(keyed, inp[0], inp[1], inp[2]).num_regions
            == slice_through(plain, t[:1], t[1:2], t[2:3]).num_regions)
    assert (local_complexity(keyed, inp, radius=0.5, n_dirs=2).total.tolist()
            == local_complexity(plain, t, radius=0.5, n_dirs=2).total.tolist())
    assert (exact_local_complexity(keyed, inp, radius=0.5).total.tolist()
            == exact_local_complexity(plain, t, radius=0.5).total.tolist())


def test_numpy_inputs_in_another_byte_order_run_and_complex_ones_are_refused():
    """API arrays go through the one check of file arrays (``data.arrays.real_array``): big-endian arrays give the
    native ones' codes; complex, string arrays are refused in one line (complex reached the model, whose dtype error
    asked whether the inputs had the right shape). Oracle: the native-order array's codes."""
    from polytope_lens import spline_codes

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
    x = np.random.default_rng(0).normal(size=(4, 3))
    want, got = spline_codes(m, x.astype(np.float32)), spline_codes(m, x.astype(">f4"))
    assert all(np.array_equal(want.layers[k].packed, got.layers[k].packed) for k in want.layers)
    for bad, kind in [(x.astype(complex), "complex128"), (np.full((4, 3), "a"), "<U1")]:
        with pytest.raises(InvalidInputError, match=f"A NumPy input must hold real numbers; it holds {kind}."):
            spline_codes(m, bad)
