"""CLI slice and complexity commands: wiring, JSON shape, and one-line errors."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from polytope_lens.cli import app
from polytope_lens.models import load_model
from polytope_lens.slices import slice_box

runner = CliRunner()


def test_box_slice_json_and_pictures(tmp_path):
    r = runner.invoke(app, ["slice", "--model", "toy:2-16-16-3:seed=1", "--box", "-1,1,-1,1", "--json",
                            str(tmp_path / "s.json"), "--png", str(tmp_path / "s.png"),
                            "--svg", str(tmp_path / "s.svg")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["num_regions"] == slice_box(load_model("toy:2-16-16-3:seed=1").module).num_regions
    assert d["exact"] is True and abs(d["total_area"] - 4.0) < 1e-9
    assert (tmp_path / "s.png").stat().st_size > 1000 and (tmp_path / "s.svg").read_text().startswith("<?xml")


def test_slice_at_a_layer_of_a_float32_model(tmp_path):
    """--layer with --points on a float32 model (every loaded model is): the site is resolved on the float64 copy
    the slice runs on (it used to run the float32 model on float64 points and fail), and the regions equal the API's
    on the same plane."""
    import torch

    from polytope_lens.paths import site_activations
    from polytope_lens.slices import Plane, slice_plane

    pts = np.random.default_rng(3).normal(size=(3, 6))
    np.save(tmp_path / "p.npy", pts)
    r = runner.invoke(app, ["slice", "--model", "toy:6-16-16-3:seed=2", "--points", str(tmp_path / "p.npy"),
                            "--layer", "1.relu", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "s.json").read_text())
    m = load_model("toy:6-16-16-3:seed=2").module
    x = torch.from_numpy(pts)
    a = site_activations(m, x, layer="1.relu")
    for inputs in (x[:1], x[:1].float()):
        res = slice_plane(m, Plane.through(a[0], a[1], a[2]), layer="1.relu", inputs=inputs)
        assert res.num_regions == d["num_regions"] > 1 and res.sites == ("3.relu",)


def test_complexity_json(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = runner.invoke(app, ["complexity", "--model", "toy:4-8-8-2", "--data", f"npy:{tmp_path / 'x.npy'}",
                            "--radius", "0.5", "--n-dirs", "2", "--exact", "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "c.json").read_text())
    assert len(d["approximate"]["total"]) == 5 and d["approximate"]["exact"] is False
    assert d["exact"]["exact"] is True and all(v >= 1 for v in d["exact"]["total"])
    assert d["approximate"]["n_dirs"] == 2 and "n_dirs" not in d["exact"]  # the exact count has no directions
    regions = d["exact"]["total"]  # --exact prints the exact counts too, not only the approximate table
    assert f"exact: {sum(regions) / len(regions):.2f} regions on average (min {min(regions)}" in " ".join(
        r.stdout.split())


def test_complexity_keeps_float64_points(tmp_path):
    """A float64 point 3e-9 from a ReLU's kink, radius 1e-8: the CLI rounded the data to float32 (moving the point
    ~1e-8 off the kink) and counted 1 region where the API on the same float64 points counts 2. Oracle: the API."""
    import torch

    from polytope_lens.slices import exact_local_complexity, local_complexity

    m = load_model("toy:2-8-3").module
    w, b = m[0].weight.detach().double(), m[0].bias.detach().double()
    x0 = 0.3
    y0 = (3e-9 - b[0].item() - w[0, 0].item() * x0) / w[0, 1].item()
    pts = np.array([[x0, y0], [0.5, -0.25]])
    np.save(tmp_path / "near.npy", pts)
    r = runner.invoke(app, ["complexity", "--model", "toy:2-8-3", "--data", f"npy:{tmp_path / 'near.npy'}",
                            "--radius", "1e-8", "--exact", "--json", str(tmp_path / "lc.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "lc.json").read_text())
    x = torch.from_numpy(pts)
    want_exact = exact_local_complexity(m, x, radius=1e-8).to_dict()["total"]
    want_approx = local_complexity(m, x, radius=1e-8, n_dirs=2).to_dict()["total"]
    assert want_exact[0] == 2  # the point's square crosses the kink
    assert d["exact"]["total"] == want_exact and d["approximate"]["total"] == want_approx


def test_complexity_n_dirs_and_exact_layers(tmp_path):
    """The default --n-dirs (20) is capped at a smaller input dimension, with a note; a larger explicit --n-dirs and
    --exact with --layers are one line naming the options (they used to fail naming the API's 'n_dirs', and --exact
    ignored --layers)."""
    np.save(tmp_path / "v2.npy", np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32))
    base = ["complexity", "--model", "toy:2-16-16-3", "--data", f"npy:{tmp_path / 'v2.npy'}", "--json",
            str(tmp_path / "lc.json")]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    assert "note: --n-dirs is 2, the input dimension" in " ".join(r.stdout.split())
    assert json.loads((tmp_path / "lc.json").read_text())["approximate"]["n_dirs"] == 2
    for extra, match in ((["--n-dirs", "3"], "--n-dirs must be at most the input dimension of"),
                         (["--n-dirs", "0"], "--n-dirs must be at least 1"),
                         (["--limit", "0"], "--limit must be a positive int"),  # the API's message, in flags
                         (["--exact", "--layers", "1.*"], "--exact counts the regions of the whole network")):
        (tmp_path / "lc.json").unlink(missing_ok=True)
        r = runner.invoke(app, base + extra)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and match in lines[0], r.output
        assert not (tmp_path / "lc.json").exists()


@pytest.mark.parametrize("args,match", [
    (["--box", "1,1,-1,1"], "--box must have XMIN < XMAX"),
    (["--box", "-1,1,-1,1", "--units", "3,99"], "--units must hold distinct indices in [0, 8) of '1.relu''s units. "
                                                "Got 2 indices: 99 (out of range)."),
    (["--box", "-1,1,-1,1", "--units", "3,3"], "--units must hold distinct indices in [0, 8) of '1.relu''s units. "
                                               "Got 2 indices: 1 repeated."),
    (["--box", "a,b"], "--box must be four numbers"),
    ([], "exactly one of --box"),
    (["--points", "COLLINEAR"], "collinear"),
    (["--box", "-1,1,-1,1", "--memory-mib", "0"], "--memory-mib must be at least 1"),
    (["--box", "-1,1,-1,1", "--units", "1,x"], "--units must be 'position' or comma-separated"),
])
def test_bad_slices(args, match, tmp_path):
    if "COLLINEAR" in args:
        p = tmp_path / "p.npy"
        np.save(p, np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
        args = ["--points", str(p)]
    r = runner.invoke(app, ["slice", "--model", "toy:2-8-2", "--json", str(tmp_path / "s.json"), *args])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and match.lower() in lines[0].lower(), r.stderr
    assert not (tmp_path / "s.json").exists()


def test_picture_targets_are_named(tmp_path):
    """A bad --png / --svg target: the one line names that option (it said "The JSON output")."""
    (tmp_path / "d").mkdir()
    for opt, target, match in (("--png", tmp_path / "d", "The --png output"),
                               ("--png", tmp_path / "nodir" / "x.png", "The --png output folder"),
                               ("--svg", tmp_path / "d", "The --svg output")):
        r = runner.invoke(app, ["slice", "--model", "toy:2-8-2", "--box", "-1,1,-1,1", "--json",
                                str(tmp_path / "s.json"), opt, str(target)])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {match}"), r.stderr


def test_budget_advice_names_until_only_where_it_helps(tmp_path):
    """Over the memory budget at the first cutting site the advice says --until cannot help; at a later site it
    names the site before."""
    args = ["slice", "--box", "-1,1,-1,1", "--json", str(tmp_path / "s.json"), "--memory-mib", "1"]
    r = runner.invoke(app, args + ["--model", "toy:2-3000-3", "--until", "1.relu"])
    line = " ".join(r.stderr.split())
    assert r.exit_code == 1 and "first site that cuts, so until= (CLI --until) cannot help" in line, r.stderr
    assert "earlier site" not in line
    r = runner.invoke(app, args + ["--model", "toy:2-16-2000-3"])
    line = " ".join(r.stderr.split())
    assert r.exit_code == 1 and "site '3.relu'" in line and "(until='1.relu', CLI --until 1.relu)" in line, line


def test_colour_by_slope_needs_the_whole_model(tmp_path):
    """A slice cut only up to --until has no output maps: colouring by slope or class is one line and writes
    nothing (before: a ValueError traceback); up to the last site it works."""
    args = ["slice", "--model", "toy:2-8-8-3", "--box", "-1,1,-1,1", "--json", str(tmp_path / "s.json"),
            "--png", str(tmp_path / "s.png"), "--color-by", "slope"]
    r = runner.invoke(app, args + ["--until", "1.relu"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "needs the output maps" in lines[0], r.stderr
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.png").exists()
    r = runner.invoke(app, args + ["--until", "3.relu"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_units_option_reaches_the_api(tmp_path):
    """--units cuts with only those units of the last site: the regions equal slice_plane's with units=."""
    from polytope_lens.models import load_model
    from polytope_lens.slices import Plane, slice_plane

    r = runner.invoke(app, ["slice", "--model", "toy:2-8-6-2", "--box", "-1,1,-1,1", "--until", "3.relu",
                            "--units", "0,2,5", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "s.json").read_text())
    want = slice_plane(load_model("toy:2-8-6-2").module, Plane.box(-1, 1), until="3.relu", units=[0, 2, 5])
    assert got["num_regions"] == want.num_regions
    full = slice_plane(load_model("toy:2-8-6-2").module, Plane.box(-1, 1), until="3.relu")
    assert want.num_regions < full.num_regions


def test_outputs_are_written_all_or_none_whatever_their_names(tmp_path, monkeypatch):
    """A JSON name of 253 bytes (the file system takes 255; the temporary file's name was 5 bytes longer) is written
    with its picture; a name of 305 bytes is one line naming the limit and leaves no picture (a traceback and a
    written PNG before)."""
    monkeypatch.chdir(tmp_path)
    base = ["slice", "--model", "toy:2-8-8-3", "--box", "-1,1,-1,1", "--png", "d.png", "--json"]
    r = runner.invoke(app, base + ["j" * 248 + ".json"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "j" * 248 + ".json"]
    for p in tmp_path.iterdir():
        p.unlink()
    r = runner.invoke(app, base + ["k" * 300 + ".json"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "305 bytes long" in lines[0], r.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- arrays in another byte order or of non-real values
def test_big_endian_points_and_data_give_what_the_native_arrays_give(tmp_path):
    """slice --points, complexity, sites and codes crashed in torch on >f8 / >f4 arrays ("byte order different from
    the native byte order"). Oracle: the same values in native byte order give the same results."""
    from polytope_lens.store import read_codes

    x = np.random.default_rng(2).normal(size=(3, 2))
    swapped = np.dtype(np.float64).newbyteorder("S")
    np.save(tmp_path / "n.npy", x)
    np.save(tmp_path / "s.npy", x.astype(swapped))
    np.save(tmp_path / "s4.npy", x.astype(np.float32).astype(np.dtype(np.float32).newbyteorder("S")))
    np.save(tmp_path / "n4.npy", x.astype(np.float32))

    def run(*args, drop=("data", "seconds", "points")):
        r = runner.invoke(app, [*args, "--json", str(tmp_path / "o.json")])
        assert r.exit_code == 0, r.output
        d = json.loads((tmp_path / "o.json").read_text())
        return {k: v for k, v in d.items() if k not in drop}

    for native, other in (("n.npy", "s.npy"), ("n4.npy", "s4.npy")):
        n, s = str(tmp_path / native), str(tmp_path / other)
        assert run("slice", "--model", "toy:2-8-8-3", "--points", s) == run("slice", "--model", "toy:2-8-8-3",
                                                                             "--points", n)
        assert run("complexity", "--model", "toy:2-8-3", "--data", f"npy:{s}") == \
            run("complexity", "--model", "toy:2-8-3", "--data", f"npy:{n}")
        sites = [runner.invoke(app, ["sites", "--model", "toy:2-8-3", "--data", f"npy:{p}"]) for p in (s, n)]
        assert sites[0].exit_code == 0 and sites[0].stdout == sites[1].stdout, sites[0].output
        for p, store in ((s, "s.zarr"), (n, "n.zarr")):
            r = runner.invoke(app, ["codes", "--model", "toy:2-8-3", "--data", f"npy:{p}", "--out",
                                    str(tmp_path / store), "--overwrite"])
            assert r.exit_code == 0, r.output
        got, want = read_codes(tmp_path / "s.zarr"), read_codes(tmp_path / "n.zarr")
        assert np.array_equal(got.concat(), want.concat()) and np.array_equal(got.rows, want.rows)


def test_points_of_strings_or_complex_numbers_are_one_line(tmp_path):
    """--points of strings printed a traceback (torch.from_numpy); complex points were cut to their real part with a
    NumPy warning. Oracle: the exact one-line message and no JSON."""
    for arr, dtype in ((np.array([["a", "b"], ["c", "d"], ["e", "f"]]), "<U1"),
                       (np.array([[0, 0], [1, 0], [0, 1]]) + 0.5j, "complex128")):
        p = tmp_path / "p.npy"
        np.save(p, arr)
        r = runner.invoke(app, ["slice", "--model", "toy:2-8-3", "--points", str(p), "--json",
                                str(tmp_path / "o.json")])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        want = f"error: --points {str(p)!r} must hold real numbers; it holds {dtype}."
        assert r.exit_code == 1 and lines == [want], r.output
        assert not (tmp_path / "o.json").exists()
