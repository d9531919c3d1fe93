"""The CLI: wiring, summaries, and bad inputs that must give one clear line, exit 1 and leave nothing behind."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from polytope_lens.cli import app
from polytope_lens.store import read_codes

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def toy_data(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    return path, x


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and "polytope-lens" in r.output and "torch" in r.output


def test_codes_writes_store_matching_hand_computation(tmp_path, toy_data):
    """The store holds the codes of the toy MLP, equal to signs computed from its weights."""
    path, x = toy_data
    out = tmp_path / "codes.zarr"
    r = invoke("codes", "--model", "toy:4-8-8-3:seed=3", "--data", f"npy:{path}", "--out", out,
               "--batch-size", 7, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    assert "20 rows of exact polytope codes" in r.output
    codes = read_codes(out)
    from polytope_lens.models import load_model

    mlp = load_model("toy:4-8-8-3:seed=3").module
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    z1 = torch.from_numpy(x) @ linears[0].weight.T + linears[0].bias
    first = next(iter(codes.layers.values()))
    assert np.array_equal(first.pieces(), (z1 > 0).detach().numpy())
    assert codes.rows[:, 0].tolist() == list(range(20))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["exact"] is True and summary["rows"] == 20 and summary["model"].startswith("toy:")
    assert read_codes(out).meta["data_provenance"]


def test_sites_lists_in_order():
    r = invoke("sites", "--model", "toy:2-5-5-2")
    assert r.exit_code == 0
    assert "2 activation sites" in r.output


def test_sites_runs_a_trained_cnn_on_its_own_data():
    """Without --data the example input comes from the data the model reads (digits for digits-cnn, not photos)."""
    r = invoke("sites", "--model", "digits-cnn")
    assert r.exit_code == 0, r.output
    names = [ln.split("│")[2].strip() for ln in r.output.splitlines() if ln.count("│") > 3]
    assert names[0] == "stem.2.relu" and "pool1.max_pool2d" in names and len(names) == 7


def _elu_model(tmp_path):
    p = tmp_path / "elu.pt"
    torch.save(nn.Sequential(nn.Linear(4, 3), nn.ELU()), p)
    return p


BAD = {
    "unknown model spec": (lambda t, d: ["--model", "resnet9000", "--data", f"npy:{d}"], "resnet9000"),
    "unknown data spec": (lambda t, d: ["--model", "toy:4-5-3", "--data", "imagenet"], "imagenet"),
    "unknown activation": (lambda t, d: ["--model", f"file:{_elu_model(t)}", "--data", f"npy:{d}"],
                           "elu is not in the kink registry"),
    "missing model file": (lambda t, d: ["--model", f"file:{t}/none.pt", "--data", f"npy:{d}"], "none.pt"),
    "layer pattern matching nothing": (lambda t, d: ["--model", "toy:4-5-3", "--data", f"npy:{d}", "--layers",
                                                     "blocks.*"], "matches none"),
    "wrong input shape": (lambda t, d: ["--model", "toy:5-6-3", "--data", f"npy:{d}"], "shape"),
    "NaN input": (lambda t, d: ["--model", "toy:4-5-3", "--data", f"npy:{_nan(t)}"], "NaN"),
    "empty text": (lambda t, d: ["--model", "toy:4-5-3", "--data", f"text:{_empty(t)}"], "empty"),
    "unwritable output folder": (lambda t, d: ["--model", "toy:4-5-3", "--data", f"npy:{d}", "--out",
                                               f"{d}/sub/codes.zarr"], "does not exist"),
    "bad unit selection": (lambda t, d: ["--model", "toy:4-5-3", "--data", f"npy:{d}", "--units", "pixels"],
                           "--units must be one of"),
    "position protocol on an MLP": (lambda t, d: ["--model", "toy:4-5-3", "--data", f"npy:{d}", "--units",
                                                  "position"], "needs (batch, channels, height, width)"),
    "bad position": (lambda t, d: ["--model", "toy:4-5-3", "--data", f"npy:{d}", "--position", "middle"],
                     "--position must be two fractions"),
    "zero batch size": (lambda t, d: ["--model", "toy:4-5-3", "--data", f"npy:{d}", "--batch-size", "0"],
                        "--batch-size must"),
    "text data for a vector model": (lambda t, d: ["--model", "toy:4-5-3", "--data", "pydoc", "--limit", "2"],
                                     "text"),
    "a model that cannot take the data": (lambda t, d: ["--model", f"file:{_cnn_model(t)}", "--data", f"npy:{d}"],
                                          "the model raised runtimeerror on the items of the data"),
    "brackets in a message kept": (lambda t, d: ["--model", "toy:4-5-3", "--data", f"npy:{d}", "--layers",
                                                 "[ab]*"], "'[ab]*' matches none"),
}


def _cnn_model(tmp_path):
    """A saved CNN without an input shape: vectors from an .npy reach its convolution and fail inside it."""
    p = tmp_path / "cnn.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), p)
    return p


def _nan(t):
    p = t / "nan.npy"
    a = np.zeros((3, 4), np.float32)
    a[1, 2] = np.nan
    np.save(p, a)
    return p


def _empty(t):
    p = t / "empty.txt"
    p.write_text("   \n")
    return p


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_no_store(case, tmp_path, toy_data):
    """Each bad input: exit code 1, one line naming the problem, no traceback, no store written."""
    args, expected = BAD[case]
    argv = args(tmp_path, toy_data[0])
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "codes.zarr")]
    r = runner.invoke(app, ["codes", *argv])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert expected.lower() in lines[0].lower()
    assert not (tmp_path / "codes.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".codes.zarr.tmp")]


def test_existing_output_needs_overwrite(tmp_path, toy_data):
    out = tmp_path / "c.zarr"
    assert invoke("codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out", out).exit_code == 0
    r = runner.invoke(app, ["codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out", str(out)])
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = invoke("codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out", out, "--overwrite")
    assert r.exit_code == 0


def test_missing_optional_package(monkeypatch, tmp_path):
    """A model whose package is absent: one line saying how to install it."""
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    r = runner.invoke(app, ["codes", "--model", "efficientnet-lite0", "--data", "skimage", "--out",
                            str(tmp_path / "e.zarr")])
    assert r.exit_code == 1
    assert "pip install" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "e.zarr").exists()


def test_failure_midway_leaves_no_store(tmp_path, monkeypatch, toy_data):
    """An error after some chunks were written removes the temporary store."""
    import polytope_lens.store as store

    calls = {"n": 0}
    orig = store.CodeStoreWriter.append

    def failing(self, codes, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise store.PolytopeLensError("disk full (simulated)")
        return orig(self, codes, **kw)

    monkeypatch.setattr(store.CodeStoreWriter, "append", failing)
    r = runner.invoke(app, ["codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--batch-size", "5",
                            "--out", str(tmp_path / "c.zarr")])
    assert r.exit_code == 1 and "disk full" in r.stderr
    assert list(tmp_path.iterdir()) == [toy_data[0]]


def test_out_of_memory_is_one_line(monkeypatch):
    """An allocation failure (torch's CPU allocator raises RuntimeError) is one line naming the size, exit 1; other
    RuntimeErrors still surface as they are."""
    import polytope_lens.models as models

    def no_memory(spec):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 40000000000 bytes. Error code 12")
    monkeypatch.setattr(models, "load_model", no_memory)
    r = invoke("sites", "--model", "toy:2-5-2")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1
    assert lines[0] == ("error: out of memory (tried to allocate 40000000000 bytes); the model does not fit in memory "
                        "here (it runs one example); use a smaller model.")  # sites has no --memory-mib to lower

    def broken(spec):
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(models, "load_model", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        invoke("sites", "--model", "toy:2-5-2")


def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def test_overwrite_replaces_only_a_code_store(tmp_path, toy_data, monkeypatch):
    """--overwrite never deletes the current folder, a parent of it, a plain file or a foreign folder: one line,
    before the model loads, nothing deleted (it used to rmtree whatever --out named); a code store is replaced."""
    import polytope_lens.models as models

    work = tmp_path / "work"
    (work / "precious").mkdir(parents=True)
    (work / "precious" / "x.txt").write_text("x")
    (work / "afile.txt").write_text("a")
    (work / "keep.txt").write_text("k")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(work / "precious")
    load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec: pytest.fail("the model loaded before the check"))
    for out, why in ((".", "current folder or one of its parents"), ("..", "current folder or one of its parents"),
                     (work / "precious", "current folder"), (work / "afile.txt", "is a file"),
                     (tmp_path, "one of its parents")):
        r = runner.invoke(app, ["codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out", str(out),
                                "--overwrite"])
        line = _one_error_line(r)
        assert "--overwrite replaces only a polytope-lens code store" in line and why in line, line
    monkeypatch.chdir(work)
    r = runner.invoke(app, ["codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out", "precious",
                            "--overwrite"])
    assert "without that kind's polytope-lens metadata" in _one_error_line(r)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    monkeypatch.setattr(models, "load_model", load)
    assert invoke("codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out", "st").exit_code == 0
    r = invoke("codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out", "st", "--overwrite",
               "--limit", 7)
    assert r.exit_code == 0 and len(read_codes(work / "st")) == 7


def test_codes_json_target_checked_before_the_run(tmp_path, toy_data):
    """--json naming a folder: one line before anything is coded (it used to publish the store, then fail with an
    IsADirectoryError traceback); the JSON is written atomically otherwise."""
    (tmp_path / "d").mkdir()
    r = runner.invoke(app, ["codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out",
                            str(tmp_path / "st"), "--json", str(tmp_path / "d")])
    assert "The JSON output" in _one_error_line(r) and "is a folder" in r.stderr
    assert not (tmp_path / "st").exists() and not list(tmp_path.glob(".st*"))


def test_shape_mismatch_counts_the_data_items(tmp_path):
    """50 rows of 3 features on a 2-input model: the error counts 50 items, not the batch's 32."""
    np.save(tmp_path / "v3.npy", np.zeros((50, 3), np.float32))
    r = runner.invoke(app, ["codes", "--model", "toy:2-4-2", "--data", f"npy:{tmp_path / 'v3.npy'}", "--out",
                            str(tmp_path / "st")])
    assert "has 50 items of shape (3,)" in _one_error_line(r)


def test_bad_data_key_lists_only_choosable_labels(tmp_path):
    """digits' labels are the digits 0-9, which always read as row numbers: the error does not offer them."""
    r = runner.invoke(app, ["path", "--model", "toy:64-4-2", "--from", "digits@abc", "--to", "digits@1", "--json",
                            str(tmp_path / "p.json")])
    line = _one_error_line(r)
    assert "'abc' is not a row index (0 to 1796)" in line and "always read as row indices" in line
    assert "labels (0, 1" not in line


def test_sites_of_a_model_that_cannot_take_the_data_is_one_line(tmp_path, toy_data):
    r = runner.invoke(app, ["sites", "--model", f"file:{_cnn_model(tmp_path)}", "--data", f"npy:{toy_data[0]}"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "The model raised RuntimeError" in lines[0], r.stderr


def test_cluster_error_names_the_option_the_user_set(tmp_path, toy_data):
    """min_samples defaults to min_cluster_size: too large a --min-cluster-size is named as such, by its flag."""
    out = tmp_path / "c.zarr"
    assert invoke("codes", "--model", "toy:4-8-3", "--data", f"npy:{toy_data[0]}", "--out", out).exit_code == 0
    r = runner.invoke(app, ["cluster", str(out), "--out", str(tmp_path / "cl"), "--min-cluster-size", "1000"])
    line = " ".join(r.stderr.split())
    assert r.exit_code == 1 and "error: --min-cluster-size (1000) must be at most the number of rows (20)." == line, \
        r.stderr


def test_sites_of_a_file_model_without_an_input_shape_asks_for_data(tmp_path):
    """A saved CNN's input shape cannot be read from its first layer: the error asks for --data (it used to run the
    model on a data set 'zeros' of one number that the user never gave)."""
    r = runner.invoke(app, ["sites", "--model", f"file:{_cnn_model(tmp_path)}"])
    assert r.exit_code == 1 and "input shape is unknown" in r.stderr and "--data" in r.stderr
    assert "zeros" not in r.stderr
    np.save(tmp_path / "img.npy", np.zeros((2, 1, 5, 5), np.float32))
    r = runner.invoke(app, ["sites", "--model", f"file:{_cnn_model(tmp_path)}", "--data",
                            f"npy:{tmp_path / 'img.npy'}"])
    assert r.exit_code == 0 and "1.relu" in r.stdout


def test_file_model_whose_class_cannot_be_imported_says_how_to_fix_it(tmp_path):
    """torch.load finds a pickled module's class by the module that defined it: say so (PYTHONPATH, __main__)."""
    import subprocess
    import sys

    script = ("import torch\nfrom torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n"
              "        super().__init__(); self.l = nn.Linear(2, 2)\n    def forward(self, x):\n"
              "        return torch.relu(self.l(x))\n"
              f"torch.save(Net(), {str(tmp_path / 'net.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    r = runner.invoke(app, ["sites", "--model", f"file:{tmp_path / 'net.pt'}"])
    assert r.exit_code == 1 and "AttributeError" in r.stderr and "__main__" in r.stderr and "PYTHONPATH" in r.stderr


def test_extract_codes_names_what_it_takes():
    from polytope_lens.errors import InvalidInputError
    from polytope_lens.extract import extract_codes

    with pytest.raises(InvalidInputError, match="'model' parameter takes a model spec.*got Sequential.*spline_codes"):
        extract_codes(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "digits")
    with pytest.raises(InvalidInputError, match="'data' parameter takes a data spec.*got Tensor"):
        extract_codes("toy:4-5-3", torch.zeros(3, 4))


def test_out_of_memory_advice_names_only_options_the_command_has():
    """The out-of-memory line told 'sites' to lower --memory-mib, an option it does not have. Oracle: each command's
    own options, as Click parses them."""
    import re

    from typer.main import get_command

    from polytope_lens.cli import _OOM_ADVICE

    group = get_command(app)
    for name, cmd in group.commands.items():
        flags = {f for p in cmd.params for f in p.opts}
        advice = _OOM_ADVICE.get(cmd.callback.__name__)
        if name == "models":
            continue  # lists specs; nothing to run out of memory
        assert advice is not None, name
        named = re.findall(r"--[a-z-]+", advice)
        assert set(named) <= flags, (name, named)
        assert ("--memory-mib" in named) == ("--memory-mib" in flags and name != "codes"), name


def test_cluster_says_whether_the_codes_are_exact(tmp_path, toy_data):
    """Clusters of threshold codes (GELU) were presented like polytope clusters: only clusters.json said
    exact_codes false. The summary line and index.html now say which; the oracle is the store's own flag
    (read_codes(...).exact, from the activation registry)."""
    for act, want in (("gelu", False), ("relu", True)):
        store = tmp_path / f"{act}.zarr"
        assert invoke("codes", "--model", f"toy:4-16-16-3:{act}", "--data", f"npy:{toy_data[0]}", "--out",
                      store).exit_code == 0
        assert read_codes(store).exact is want
        r = invoke("cluster", store, "--out", tmp_path / f"cl_{act}", "--min-cluster-size", 3)
        assert r.exit_code == 0, r.output
        line = " ".join(r.stdout.split())
        page = (tmp_path / f"cl_{act}" / "index.html").read_text()
        assert json.loads((tmp_path / f"cl_{act}" / "clusters.json").read_text())["exact_codes"] is want
        if want:
            assert "rows of exact polytope codes (" in line and "approximate threshold" not in line, line
            assert "<p>codes: exact polytope codes</p>" in page and "approximate threshold" not in page
        else:
            assert "rows of approximate threshold codes of smooth activations (" in line, line
            assert "<strong>approximate threshold codes of smooth activations</strong> (they do not name true " \
                   "polytopes" in page


def test_codes_json_cannot_be_the_store(tmp_path, toy_data, monkeypatch):
    """--json naming the --out store (or a file inside it) published the store, then failed naming an internal temp
    file (or wrote the summary into the store). One line before the model loads; nothing written or changed."""
    import polytope_lens.models as models

    store = tmp_path / "st"
    assert invoke("codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out", store).exit_code == 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(models, "load_model", lambda spec: pytest.fail("the model loaded before the check"))
    monkeypatch.chdir(tmp_path)
    for out, js, extra, why in ((tmp_path / "new", tmp_path / "new", [], "names the --out store"),
                                ("new", store / ".." / "new", [], "names the --out store"),
                                (store, store / "s.json", ["--overwrite"], "is inside the --out store")):
        r = runner.invoke(app, ["codes", "--model", "toy:4-5-3", "--data", f"npy:{toy_data[0]}", "--out", str(out),
                                "--json", str(js), *extra])
        assert why in _one_error_line(r), r.stderr
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("argv,message", [
    (["complexity", "--model", "toy:2-8-3", "--data", "digits", "--json", "o.json", "--limit", "abc"],
     "Invalid value for '--limit'"),
    (["complexity", "--model", "toy:2-8-3", "--data", "digits", "--json", "o.json", "--radius", "1e-2x"],
     "Invalid value for '--radius'"),
    (["complexity", "--model", "toy:2-8-3", "--data", "digits", "--json"], "Option '--json' requires an argument"),
    (["codes", "--data", "digits", "--out", "st"], "Missing option '--model'"),
    (["sites", "--model", "toy:2-8-3", "--limt", "3"], "No such option: --limt"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line_exit_1(argv, message, tmp_path, monkeypatch):
    """Wrong option types, missing values or options, unknown options or commands: Click's message on one line and
    exit 1 (they were Click's boxed usage text and exit 2); nothing runs or is written. Through the console
    script too (its own process), where Click's standalone handling applies."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, argv)
    line = _one_error_line(r)
    assert message in line and r.stdout == "", line
    p = subprocess.run([sys.executable, "-c", "import sys; from polytope_lens.cli import app; sys.exit(app())",
                        *argv], capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ,
                                                                                  "COLUMNS": "60"})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert p.stdout == "" and list(tmp_path.iterdir()) == []


def test_help_and_version_still_work():
    for argv in (["--help"], ["complexity", "--help"], ["--version"]):
        r = runner.invoke(app, argv)
        assert r.exit_code == 0 and r.stderr == "", (argv, r.output)
        assert ("Usage:" in r.stdout) != (argv == ["--version"]), r.stdout
    r = runner.invoke(app, [])  # no arguments: the help, as before
    assert "Usage:" in r.output and "error:" not in r.output
