"""Ray extraction: a 2-worker local cluster writes the same store as one process; a dead address fails fast."""

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
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
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
