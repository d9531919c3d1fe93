"""Ray on a local 2-worker cluster: codes, path and cluster give the single-process results; a dead address fails
fast with one line."""

import dataclasses
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from polytope_lens.cli import app
from polytope_lens.errors import MissingDependencyError, PolytopeLensError
from polytope_lens.extract import extract_to_store


def _store(path):
    import zarr

    g = zarr.open_group(str(path), mode="r")
    arrays = {name: np.asarray(g[name][:]) for name in ["rows"] + [f"codes/{k}" for k in g["codes"].array_keys()]}
    return dict(g.attrs), arrays


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                   configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def test_two_ray_workers_write_the_single_process_store(ray_cluster, tmp_path):
    """Every array (codes of each site, rows) and every attribute equal the single-process run's."""
    kw = dict(limit=150, batch_size=32)
    extract_to_store("digits-cnn", "digits", tmp_path / "one.zarr", **kw)
    summary = extract_to_store("digits-cnn", "digits", tmp_path / "ray.zarr", ray_address=ray_cluster,
                               ray_workers=2, **kw)
    a_attrs, a = _store(tmp_path / "one.zarr")
    b_attrs, b = _store(tmp_path / "ray.zarr")
    assert summary["rows"] == 150 and a.keys() == b.keys() and len(a) == 8
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert a_attrs == b_attrs


def test_dead_address_fails_fast(tmp_path):
    """Nothing listens on 127.0.0.1:1: one clear error within seconds, and no store."""
    pytest.importorskip("ray")
    t0 = time.perf_counter()
    with pytest.raises(PolytopeLensError, match=r"No Ray cluster answers at '127.0.0.1:1'"):
        extract_to_store("toy:2-8-2", "npy:" + str(_npy(tmp_path)), tmp_path / "s.zarr", ray_address="127.0.0.1:1")
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "s.zarr").exists()


def test_bad_address_form(tmp_path):
    """An address without a port is refused with the accepted forms."""
    pytest.importorskip("ray")
    with pytest.raises(PolytopeLensError, match="'local', 'auto', 'HOST:PORT'"):
        extract_to_store("toy:2-8-2", "npy:" + str(_npy(tmp_path)), tmp_path / "s.zarr", ray_address="nohost")


def _npy(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32))
    return path


def test_missing_ray_says_how_to_install(monkeypatch, tmp_path):
    """Without Ray installed: MissingDependencyError naming the [scale] extra."""
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(MissingDependencyError, match=r"polytope-lens\[scale\]"):
        extract_to_store("toy:2-8-2", "npy:" + str(_npy(tmp_path)), tmp_path / "s.zarr", ray_address="local")


def test_codes_cli_passes_ray_options(monkeypatch, tmp_path):
    """--ray and --ray-workers reach extract_to_store unchanged; a dead address is one line, exit 1."""
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise PolytopeLensError("stop here")

    monkeypatch.setattr("polytope_lens.extract.extract_to_store", fake)
    r = CliRunner().invoke(app, ["codes", "--model", "toy:2-8-2", "--data", "npy:" + str(_npy(tmp_path)), "--out",
                                 str(tmp_path / "s.zarr"), "--ray", "10.0.0.1:6379", "--ray-workers", "3"])
    assert r.exit_code == 1 and "stop here" in r.output
    assert seen["ray_address"] == "10.0.0.1:6379" and seen["ray_workers"] == 3


# ------------------------------------------------------------------------------------------------- path, cluster
PATH_MODEL = "toy:6-16-16-3:seed=2"


def _pairs_file(tmp_path, n=8):
    rng = np.random.default_rng(0)
    path = tmp_path / "pairs.npz"
    np.savez(path, start=rng.normal(size=(n, 6)), end=rng.normal(size=(n, 6)))
    return path


def _assert_same(a, b, where="", tol=1e-12):
    """Equal JSON values, except floats within ``tol`` (class changes: 1e-9, their bisection tolerance)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}", 1e-9 if key == "class_changes" else tol)
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]", tol)
    elif isinstance(a, float) and not isinstance(b, bool):
        assert abs(a - b) <= tol, (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_path_cli_on_two_ray_workers_matches_one_process(ray_cluster, tmp_path):
    """8 pairs over 2 workers: every count, site, unit and piece equals the single-process JSON; positions t (and
    the trace) agree to rounding, since BLAS rounds a row of a product differently in a batch of another size."""
    import json

    pairs = _pairs_file(tmp_path)
    base = ["path", "--model", PATH_MODEL, "--pairs", str(pairs), "--records"]
    r1 = CliRunner().invoke(app, [*base, "--json", str(tmp_path / "one.json")])
    r2 = CliRunner().invoke(app, [*base, "--json", str(tmp_path / "ray.json"), "--ray", ray_cluster,
                                  "--ray-workers", "2"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ray"))
    assert one.pop("seconds") > 0 and two.pop("seconds") > 0
    assert [p["index"] for p in two["paths"]] == list(range(8)) and sum(p["crossings"] for p in one["paths"]) > 50
    for p, q in zip(one["paths"], two["paths"]):
        for key in ("crossings", "per_layer", "ties", "n_regions", "length", "density"):
            assert p[key] == q[key], key
        assert [(c["site"], c["unit"], c["piece"]) for c in p["records"]] == \
            [(c["site"], c["unit"], c["piece"]) for c in q["records"]]
        assert p["trace"]["top_class"] == q["trace"]["top_class"]
    _assert_same(one, two)


def test_path_on_ray_input_errors(ray_cluster):
    """A bare module (workers need a spec), cuda on a cluster without GPUs, and a library error raised on a worker
    (an unknown layer) are each one clean error of the library's own class."""
    import ray
    import torch

    from polytope_lens.errors import InvalidInputError
    from polytope_lens.models import load_model
    from polytope_lens.paths import path_crossings

    bundle = load_model(PATH_MODEL)
    s, e = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="needs the model as a ModelBundle"):
        path_crossings(bundle.module, s, e, ray_address=ray_cluster)
    with pytest.raises(InvalidInputError, match="'ray_workers' parameter must be an int >= 1"):
        path_crossings(bundle, s, e, ray_address=ray_cluster, ray_workers=0)
    if not ray.cluster_resources().get("GPU"):
        with pytest.raises(InvalidInputError, match="has no GPUs"):
            path_crossings(bundle, s, e, device="cuda", ray_address=ray_cluster)
    with pytest.raises(InvalidInputError, match="'nope' matches none"):
        path_crossings(bundle, s, e, layer="nope", inputs=s, ray_address=ray_cluster, ray_workers=2)


def test_path_results_concat():
    """Blocks join in order with re-indexed paths; blocks computed another way (sampled vs exact) are refused."""
    import torch

    from polytope_lens.errors import InvalidInputError
    from polytope_lens.models import load_model
    from polytope_lens.paths import PathBatchResult, path_crossings

    module = load_model(PATH_MODEL).module
    s, e = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    a, b = path_crossings(module, s[:2], e[:2]), path_crossings(module, s[2:], e[2:])
    joined = PathBatchResult.concat([a, b], seconds=1.5)
    assert [p.index for p in joined.paths] == list(range(5)) and joined.seconds == 1.5
    assert joined.counts.tolist() == a.counts.tolist() + b.counts.tolist() and joined.notes == a.notes
    with pytest.raises(InvalidInputError, match="different exact"):
        PathBatchResult.concat([a, path_crossings(module, s[2:], e[2:], method="sampled")])
    # blocks of padded text (Ray workers) each note the lengths they ran at: one note, their union (there was one
    # per block)
    from polytope_lens.paths.results import own_lengths_note

    noted = [dataclasses.replace(r, notes=r.notes + (own_lengths_note(n, 9),)) for r, n in ((a, [5, 7]), (b, [7, 9]))]
    assert PathBatchResult.concat(noted).notes == a.notes + (own_lengths_note([5, 7, 9], 9),)
    assert own_lengths_note([7, 5, 7], 9) == ("text rows run at their own lengths (5, 7 positions of 9): crossings at "
                                              "padding positions are not counted")


@pytest.mark.parametrize("index,metric", [("flat", "hamming"), ("hnsw", "jaccard")])
def test_cluster_on_two_ray_workers_matches_one_process(ray_cluster, index, metric):
    """3,000 planted codes: the kNN search sharded over 2 workers gives the single-process labels, row for row
    (faiss answers each query on its own: exact flat and HNSW alike)."""
    pytest.importorskip("faiss")
    from test_cluster_scale import planted

    from polytope_lens.cluster_scale import ScalableCodeClusterer

    X, _ = planted()
    kw = {"min_cluster_size": 20, "index": index, "metric": metric}
    one = ScalableCodeClusterer(**kw).fit(X)
    two = ScalableCodeClusterer(**kw, ray_address=ray_cluster, ray_workers=2).fit(X)
    assert one.n_clusters_ >= 10 and np.array_equal(one.labels_, two.labels_)
    assert np.array_equal(one.core_distances_, two.core_distances_)
    assert np.array_equal(one.probabilities_, two.probabilities_)


def test_dead_address_path_and_cluster_cli(tmp_path):
    """--ray 127.0.0.1:1 on path and cluster: one line, exit 1, no traceback, no JSON and no results folder."""
    pytest.importorskip("ray")
    pytest.importorskip("faiss")
    store = tmp_path / "s.zarr"
    extract_to_store("toy:2-8-2", "npy:" + str(_npy(tmp_path)), store)
    runs = {
        tmp_path / "p.json": ["path", "--model", PATH_MODEL, "--pairs", str(_pairs_file(tmp_path)), "--json",
                              str(tmp_path / "p.json"), "--ray", "127.0.0.1:1"],
        tmp_path / "res": ["cluster", str(store), "--out", str(tmp_path / "res"), "--min-cluster-size", "5",
                           "--ray", "127.0.0.1:1"],
    }
    for target, args in runs.items():
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1 and "No Ray cluster answers at '127.0.0.1:1'" in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not target.exists() and not list(tmp_path.glob(".*partial"))
    for args in runs.values():  # --ray-workers without --ray
        r = CliRunner().invoke(app, args[:-2] + ["--ray-workers", "2"])
        assert r.exit_code == 1 and "--ray-workers needs --ray" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------ fixes of the Ray hunt
def test_edited_bundle_is_refused_on_ray(ray_cluster, tmp_path):
    """Workers reload the model from its spec: a bundle edited in memory is refused in one line (no store), where
    it used to be coded with the spec's weights under the edited model's fingerprint; an unedited bundle still
    gives the single-process store. The same check guards the path workers (given the bundle)."""
    import torch

    from polytope_lens.data import load_data
    from polytope_lens.distributed import ray_path_crossings
    from polytope_lens.errors import InvalidInputError
    from polytope_lens.models import load_model
    from polytope_lens.paths import path_crossings

    src = load_data("npy:" + str(_npy_4(tmp_path)))
    bundle = load_model("toy:4-16-16-3:seed=0")
    extract_to_store(bundle, src, tmp_path / "one.zarr", batch_size=4)
    extract_to_store(bundle, src, tmp_path / "ray.zarr", batch_size=4, ray_address=ray_cluster, ray_workers=2)
    (a_attrs, a), (b_attrs, b) = _store(tmp_path / "one.zarr"), _store(tmp_path / "ray.zarr")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) and a_attrs == b_attrs
    with torch.no_grad():
        bundle.module[0].bias.add_(5.0)
    with pytest.raises(InvalidInputError, match=r"model in memory differs from what spec 'toy:4-16-16-3:\S*' "
                                                r"loads on the workers.*file:PATH"):
        extract_to_store(bundle, src, tmp_path / "edited.zarr", batch_size=4, ray_address=ray_cluster,
                         ray_workers=2)
    assert not (tmp_path / "edited.zarr").exists()
    s = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="model in memory differs"):
        ray_path_crossings(ray_cluster, bundle, s, -s, workers=2)
    with pytest.raises(InvalidInputError, match="model in memory differs"):  # the public call hands on the bundle
        path_crossings(bundle, s, -s, ray_address=ray_cluster, ray_workers=2)
    with pytest.raises(InvalidInputError, match=r"The 'ray_workers' parameter of path_crossings needs 'ray_address'"):
        path_crossings(bundle, s, -s, ray_workers=2)  # it ran in one process, ignoring ray_workers


def _npy_4(tmp_path, n=8):
    path = tmp_path / "x4.npy"
    np.save(path, np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32))
    return path


def test_driver_error_stops_the_actors(ray_cluster, tmp_path, monkeypatch):
    """An error raised in this process while the chunks are consumed (here by the store writer) stops the actors at
    once, even while its traceback is kept (as a notebook keeps it): their CPUs are free and the next run completes
    (it waited forever for them)."""
    import threading

    import ray

    from polytope_lens.store import CodeStoreWriter

    path = "npy:" + str(_npy_4(tmp_path, 12))
    real, calls = CodeStoreWriter.append, []

    def fail_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("driver-side failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CodeStoreWriter, "append", fail_second)
    with pytest.raises(RuntimeError, match="driver-side failure") as kept:
        extract_to_store("toy:4-8-3", path, tmp_path / "a.zarr", batch_size=2, ray_address=ray_cluster,
                         ray_workers=2)
    monkeypatch.setattr(CodeStoreWriter, "append", real)
    deadline = time.time() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2, ray.available_resources()
    done = []
    worker = threading.Thread(target=lambda: done.append(extract_to_store(
        "toy:4-8-3", path, tmp_path / "b.zarr", batch_size=2, ray_address=ray_cluster, ray_workers=2)), daemon=True)
    worker.start()
    worker.join(60)
    assert done and done[0]["rows"] == 12 and kept.value is not None


@pytest.mark.parametrize("workers", [0, "two", 2])
def test_ray_workers_without_address_is_refused(tmp_path, workers):
    """ray_workers without ray_address is one line (it was ignored, invalid values included); with an address an
    invalid value is refused before anything starts."""
    from polytope_lens.errors import InvalidInputError

    path = "npy:" + str(_npy(tmp_path))
    with pytest.raises(InvalidInputError, match="'ray_workers' parameter needs 'ray_address'"):
        extract_to_store("toy:2-8-2", path, tmp_path / "s.zarr", ray_workers=workers)
    if workers != 2:
        with pytest.raises(InvalidInputError, match="'ray_workers' parameter must be an int >= 1"):
            extract_to_store("toy:2-8-2", path, tmp_path / "s.zarr", ray_address="127.0.0.1:1", ray_workers=workers)
    assert not (tmp_path / "s.zarr").exists()


def test_empty_data_on_ray_is_refused_as_in_one_process(ray_cluster, tmp_path):
    """A DataSource with no items: the single-process error ("has no items"), not a misleading no-rows one."""
    from polytope_lens.data import load_data
    from polytope_lens.errors import InvalidInputError

    src = load_data("npy:" + str(_npy_4(tmp_path))).subset(slice(0, 0))
    messages = []
    for kw in ({}, {"ray_address": ray_cluster, "ray_workers": 2}):
        with pytest.raises(InvalidInputError, match="has no items") as e:
            extract_to_store("toy:4-8-3", src, tmp_path / "s.zarr", **kw)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and not (tmp_path / "s.zarr").exists()


def test_ray_path_notes_equal_one_process(ray_cluster, tmp_path):
    """The overflow note counts every path (the blocks' counts summed, equal ones included), as one process does;
    a text block without padding (no note of its own) ran at the full length, which joins the lengths' union."""
    import torch
    from torch import nn

    from polytope_lens.models import load_model
    from polytope_lens.paths import PathBatchResult, path_crossings
    from polytope_lens.paths.results import own_lengths_note

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        m[2].weight.mul_(1e308)  # the outputs overflow on part of every path
    torch.save(m, tmp_path / "overflow.pt")
    bundle = load_model(f"file:{tmp_path / 'overflow.pt'}")
    rng = np.random.default_rng(0)
    s, e = torch.tensor(rng.normal(size=(4, 2)) * 300), torch.tensor(rng.normal(size=(4, 2)) * 300)
    one = path_crossings(bundle, s, e)
    two = path_crossings(bundle, s, e, ray_address=ray_cluster, ray_workers=2)
    assert any("NaN or infinite" in n for n in one.notes) and one.notes == two.notes
    assert one.counts.tolist() == two.counts.tolist()
    # blocks with equal overflow counts: summed, not collapsed into one
    a, b = path_crossings(bundle, s[:2], e[:2]), path_crossings(bundle, s[:2], e[:2])
    both = path_crossings(bundle, torch.cat([s[:2], s[:2]]), torch.cat([e[:2], e[:2]]))
    assert PathBatchResult.concat([a, b]).notes == both.notes
    # text: a block of unpadded texts (no own-lengths note) ran at all 9 positions
    noted = dataclasses.replace(a, notes=a.notes + (own_lengths_note([5], 9),))
    assert PathBatchResult.concat([noted, a]).notes[-1] == own_lengths_note([5, 9], 9)
