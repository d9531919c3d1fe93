"""Code stores: round trips, atomic publication, and exact resumption after SIGKILL or corruption."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from polytope_lens.codes import spline_codes
from polytope_lens.errors import InvalidInputError, PolytopeLensError
from polytope_lens.extract import extract_to_store
from polytope_lens.store import CodeStoreWriter, read_codes, write_codes


def _codes(n=10, soft=False):
    m = nn.Sequential(nn.Linear(3, 9), nn.ReLU6(), nn.Linear(9, 4), nn.GELU())
    return spline_codes(m, torch.randn(n, 3) * 4, soft=soft)


def test_roundtrip(tmp_path):
    codes = _codes(soft=True)
    write_codes(codes, tmp_path / "c.zarr", meta={"model": "toy"})
    back = read_codes(tmp_path / "c.zarr")
    assert list(back.layers) == list(codes.layers)
    for name in codes.layers:
        assert np.array_equal(back[name].packed, codes[name].packed)
        assert np.array_equal(back[name].pieces(), codes[name].pieces())
    assert np.allclose(back["3.gelu"].soft, codes["3.gelu"].soft, atol=1e-3)
    assert back.meta["model"] == "toy" and back.exact is False and np.array_equal(back.rows, codes.rows)


def test_read_rejects_other_folders(tmp_path):
    with pytest.raises(InvalidInputError, match="not a polytope-lens code store"):
        read_codes(tmp_path)


def test_overwrite_replaces_only_code_stores(tmp_path, monkeypatch):
    """The API's overwrite=True refuses a foreign folder, a file, a symbolic link and the current folder, deleting
    nothing, and replaces a code store; a destination that stops being a store during the run is not deleted."""
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "file.zarr").write_text("mine")
    (tmp_path / "link.zarr").symlink_to(tmp_path / "foreign")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out, why in (("foreign", "without that kind's polytope-lens metadata"), ("file.zarr", "is a file"),
                     ("link.zarr", "symbolic link"), (".", "current folder")):
        with pytest.raises(InvalidInputError, match=why):
            write_codes(_codes(), tmp_path / out if out != "." else out, overwrite=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine" and (tmp_path / "file.zarr").is_file()
    write_codes(_codes(4), tmp_path / "c.zarr")
    write_codes(_codes(6), tmp_path / "c.zarr", overwrite=True)
    assert len(read_codes(tmp_path / "c.zarr")) == 6
    w = CodeStoreWriter(tmp_path / "c.zarr", overwrite=True)
    w.append(_codes())
    (tmp_path / "c.zarr" / "zarr.json").write_text("{}")  # replaced by something else meanwhile
    with pytest.raises(InvalidInputError, match="without that kind's"):
        w.close()
    assert (tmp_path / "c.zarr" / "zarr.json").read_text() == "{}"
    w.abort()


def test_refuses_other_sites(tmp_path):
    w = CodeStoreWriter(tmp_path / "c.zarr")
    w.append(_codes())
    other = spline_codes(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(InvalidInputError, match="Cannot append codes of sites"):
        w.append(other)
    w.abort()


@pytest.fixture
def toy_npy(tmp_path):
    x = np.random.default_rng(1).normal(size=(3000, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "x.npy"


MODEL = "toy:32-256-256-256-10:seed=5"


def _run_cli(out, data, *extra):
    return subprocess.Popen([sys.executable, "-m", "polytope_lens.cli", "codes", "--model", MODEL, "--data",
                             f"npy:{data}", "--out", str(out), "--batch-size", "8", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _same_store(a, b):
    ca, cb = read_codes(a), read_codes(b)
    assert np.array_equal(ca.rows, cb.rows)
    for name in ca.layers:
        assert np.array_equal(ca[name].packed, cb[name].packed), name
    return len(ca)


def test_sigkill_and_resume_equals_uninterrupted(tmp_path, toy_npy):
    """Kill an extraction with SIGKILL at random moments, resume each time: the store equals an uninterrupted one."""
    reference = tmp_path / "ref.zarr"
    extract_to_store(MODEL, f"npy:{toy_npy}", reference, batch_size=8)
    out = tmp_path / "resumed.zarr"
    partial = tmp_path / ".resumed.zarr.partial"
    rng = random.Random(0)
    kills = 0
    for attempt in range(40):
        p = _run_cli(out, toy_npy, "--resume")
        if kills < 3:
            # wait until the run has written some chunks, then kill it at a random moment
            deadline = time.time() + 60
            while not (partial / "manifest.json").exists() and p.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                assert not out.exists()  # nothing is published by a killed run
                continue
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
        break
    assert kills == 3
    assert out.exists() and not partial.exists()
    assert _same_store(out, reference) == 3000


def test_corrupt_chunk_is_detected_and_redone(tmp_path, toy_npy):
    """Flip bytes of a written chunk in a partial store: resume notices it and rewrites from there."""
    out = tmp_path / "c.zarr"
    w = CodeStoreWriter(out, resume=True, fingerprint={"x": 1})
    full = _codes(40)
    # write 4 chunks of the same codes object, then corrupt chunk 1 on disk
    import copy

    def chunk(s):
        c = copy.deepcopy(full)
        c.rows = full.rows[s * 10:(s + 1) * 10] - np.array([s * 10, 0])
        for lc in c.layers.values():
            lc.packed = full.layers[lc.site].packed[s * 10:(s + 1) * 10]
        c.meta["n_examples"] = 10
        return c

    for s in range(4):
        w.append(chunk(s))
    arr = w.group["codes/site_000"]
    arr[10:20] = arr[10:20] ^ 0xFF
    w2 = CodeStoreWriter(out, resume=True, fingerprint={"x": 1})
    assert w2.next_example == 10 and len(w2.chunks) == 1  # chunk 1 is corrupt: redo from there
    with pytest.raises(InvalidInputError, match="different x"):
        CodeStoreWriter(out, resume=True, fingerprint={"x": 2})
    for s in range(1, 4):
        w2.append(chunk(s))
    w2.close()
    back = read_codes(out)
    assert np.array_equal(back.rows, full.rows)
    for name in full.layers:
        assert np.array_equal(back[name].packed, full[name].packed)


def test_chunk_file_that_no_longer_decodes_is_redone(tmp_path, toy_npy):
    """A chunk file of a partial store cut short on disk (its bytes no longer decompress): resume redoes it, and the
    store equals an uninterrupted run's (it raised zstd's error before)."""
    reference = tmp_path / "ref.zarr"
    extract_to_store(MODEL, f"npy:{toy_npy}", reference, batch_size=500)

    class Stop(Exception):
        pass

    def stop_late(n, seen=[0]):
        seen[0] += n
        if seen[0] >= 2000:
            raise Stop

    out = tmp_path / "b.zarr"
    with pytest.raises(Stop):
        extract_to_store(MODEL, f"npy:{toy_npy}", out, batch_size=500, resume=True, progress=stop_late)
    files = sorted((tmp_path / ".b.zarr.partial" / "codes" / "site_000" / "c").rglob("*"))
    first = next(f for f in files if f.is_file())
    first.write_bytes(first.read_bytes()[: len(first.read_bytes()) // 2])
    extract_to_store(MODEL, f"npy:{toy_npy}", out, batch_size=500, resume=True)
    assert _same_store(out, reference) == 3000


def test_resume_refuses_other_model(tmp_path, toy_npy):
    out = tmp_path / "c.zarr"
    p = _run_cli(out, toy_npy, "--resume")
    deadline = time.time() + 60
    while not (tmp_path / ".c.zarr.partial" / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with pytest.raises(InvalidInputError, match="different model"):
        extract_to_store("toy:32-8-10", f"npy:{toy_npy}", out, batch_size=8, resume=True)


@pytest.mark.parametrize("what", ["data", "model"])
def test_resume_refuses_a_file_changed_under_the_same_spec(tmp_path, what):
    """A file: model or npy: data replaced under the same path (same shapes) between an interrupted run and its
    resume was appended to: the store mixed two models' codes (30 of 100 rows differed from a fresh run). The
    fingerprint now holds the content's SHA-256."""
    x = np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)), tmp_path / "m.pt")
    spec, data, out = f"file:{tmp_path / 'm.pt'}", f"npy:{tmp_path / 'd.npy'}", tmp_path / "c.zarr"
    seen = []

    def interrupt(n):
        seen.append(n)
        if len(seen) > 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(spec, data, out, batch_size=10, resume=True, progress=interrupt)
    if what == "data":
        np.save(tmp_path / "d.npy", x + 5)
    else:
        torch.manual_seed(1)
        torch.save(nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)), tmp_path / "m.pt")
    with pytest.raises(InvalidInputError, match=f"made with a different {what}_sha256"):
        extract_to_store(spec, data, out, batch_size=10, resume=True)


def test_content_digest_takes_any_tensor_and_object_labels():
    """The resume digest crashed on a sparse buffer (a model spline_codes takes), hashed a negative view as its
    storage, and hashed object arrays' addresses (different in every process). Oracle: equal contents give equal
    digests; a different value a different one."""
    from types import SimpleNamespace

    from polytope_lens.data import DataSource
    from polytope_lens.extract import content_digest

    def digest(buffers, labels=None):
        m = nn.Module()
        for k, v in buffers.items():
            m.register_buffer(k, v)
        return content_digest(SimpleNamespace(module=m), DataSource("x", "array", np.zeros((2, 1)), labels))

    eye = torch.eye(3)
    assert digest({"a": eye.to_sparse()}) == digest({"a": eye.to_sparse()}) != digest({"a": (2 * eye).to_sparse()})
    assert digest({"a": eye.to_sparse_csr()})["model_sha256"]
    v = torch.tensor([1.0, 2.0])
    assert digest({"a": v}) != digest({"a": torch._neg_view(v)}) == digest({"a": -v})
    labels = [np.array(["cat", "dog"], dtype=object), np.array(["c" + "at", "d" + "og"], dtype=object)]
    assert digest({}, labels[0]) == digest({}, labels[1]) != digest({}, np.array(["dog", "cat"], dtype=object))


def test_content_digest_sees_quantized_weights():
    """A dynamically quantized Linear keeps its weight in a (weight, bias) tuple in the state dict, which the digest
    skipped: two different quantized models had one digest, so --resume appended one model's codes to the other's."""
    import warnings
    from types import SimpleNamespace

    from polytope_lens.data import DataSource
    from polytope_lens.extract import content_digest

    def quantized(seed):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates eager quantization
            return torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
                                                          {nn.Linear}, dtype=torch.qint8)

    src = DataSource("x", "array", np.zeros((2, 1)), None)
    a, b, a_again = (content_digest(SimpleNamespace(module=quantized(s)), src)["model_sha256"] for s in (0, 1, 0))
    assert a == a_again != b


@pytest.mark.parametrize("resume", [False, True])
def test_a_refused_publish_leaves_no_partial_store_or_a_resumable_one(tmp_path, resume):
    """A store whose destination appeared during the run is refused at the end; the partial store was left behind
    with its manifest already deleted (so --resume started over). Now: removed without resume, resumable with it."""
    codes = spline_codes(nn.Sequential(nn.Linear(2, 4), nn.ReLU()), torch.randn(5, 2))
    w = CodeStoreWriter(tmp_path / "s", resume=resume)
    w.append(codes)
    (tmp_path / "s").mkdir()
    with pytest.raises(InvalidInputError, match="appeared while this run was writing"):
        with w:
            pass
    partial = tmp_path / ".s.partial"
    assert partial.exists() == resume and (partial / "manifest.json").exists() == resume
    if resume:
        (tmp_path / "s").rmdir()
        with CodeStoreWriter(tmp_path / "s", resume=True) as again:
            assert again.n_rows == 5
        assert not (tmp_path / "s" / "manifest.json").exists() and not partial.exists()
        mask = os.umask(0)
        os.umask(mask)
        assert (tmp_path / "s").stat().st_mode & 0o777 == 0o777 & ~mask


def test_failing_writer_keeps_a_valid_partial_store(tmp_path, toy_npy, monkeypatch):
    """A writer that fails mid-way (disk full) gives a clean error; the partial store resumes to the right result."""
    reference = tmp_path / "ref.zarr"
    extract_to_store(MODEL, f"npy:{toy_npy}", reference, batch_size=500)
    out = tmp_path / "c.zarr"
    calls = {"n": 0}
    orig = CodeStoreWriter._write_manifest

    def full_disk(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return orig(self)

    monkeypatch.setattr(CodeStoreWriter, "_write_manifest", full_disk)
    with pytest.raises(PolytopeLensError, match="No space left on device.*--resume"):
        extract_to_store(MODEL, f"npy:{toy_npy}", out, batch_size=500, resume=True)
    monkeypatch.setattr(CodeStoreWriter, "_write_manifest", orig)
    assert not out.exists()
    extract_to_store(MODEL, f"npy:{toy_npy}", out, batch_size=500, resume=True)
    assert _same_store(out, reference) == 3000


def test_removing_a_partial_store_outlasts_a_write_in_flight(tmp_path):
    """Ctrl-C stops the call waiting for a chunk write, not the write: a file that lands after the removal began (here
    from a thread, 20 ms in) must not leave the partial folder behind."""
    import threading

    from polytope_lens.store import _remove_partial

    folder = tmp_path / ".c.zarr.partial"
    (folder / "codes").mkdir(parents=True)

    def late_write():
        time.sleep(0.02)
        (folder / "codes" / "site_000").mkdir(parents=True, exist_ok=True)
        (folder / "codes" / "site_000" / "zarr.json").write_text("{}")
    writer = threading.Thread(target=late_write)
    writer.start()
    _remove_partial(folder)
    writer.join()
    assert not folder.exists()


def test_meta_is_checked_before_anything_is_written(tmp_path):
    """NumPy scalars in meta are stored as Python numbers; a value JSON cannot hold, a non-dict meta or chunk_rows < 1
    is a one-line error that leaves nothing on disk; a failure while closing removes the partial store too."""
    codes = _codes(5)
    write_codes(codes, tmp_path / "ok.zarr", meta={"n_items": np.int64(5), "scale": np.float32(0.5), "tag": ["a"]})
    back = read_codes(tmp_path / "ok.zarr").meta
    assert back["n_items"] == 5 and type(back["n_items"]) is int and back["scale"] == 0.5 and back["tag"] == ["a"]
    for meta, why in (({"t": torch.tensor(1)}, "'t': Tensor"), ({"s": {1, 2}}, "'s': set"),
                      ({"a": np.zeros(2)}, "'a': ndarray"), ([("a", 1)], "must be a dict")):
        with pytest.raises(InvalidInputError, match=why):
            write_codes(codes, tmp_path / "bad.zarr", meta=meta)
    for rows in (0, -1, True, 2.5):
        with pytest.raises(InvalidInputError, match="'chunk_rows' parameter of CodeStoreWriter must be an int >= 1"):
            CodeStoreWriter(tmp_path / "bad.zarr", chunk_rows=rows)
    w = CodeStoreWriter(tmp_path / "bad.zarr", chunk_rows=3)
    w.append(codes)
    w.meta = {"x": object()}  # past the check: the attributes cannot be written
    with pytest.raises(TypeError):
        w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.zarr"]


@pytest.mark.parametrize("key", ["format", "version", "n_rows", "exact", "dtype", "selection", "layers",
                                 "fingerprint", "chunks"])
def test_meta_cannot_overwrite_the_stores_own_attributes(tmp_path, key):
    codes = _codes(5)
    with pytest.raises(InvalidInputError, match=f"must not set the store's own attributes .*Got '{key}'"):
        write_codes(codes, tmp_path / "s.zarr", meta={"model": "toy", key: 999})
    assert not list(tmp_path.iterdir())
    write_codes(codes, tmp_path / "s.zarr", meta={"model": "toy"})
    back = read_codes(tmp_path / "s.zarr")
    assert len(back) == back.meta["n_rows"] == 5 and back.meta["exact"] is False and back.meta["model"] == "toy"


def test_write_codes_takes_spline_codes(tmp_path):
    codes = _codes(5)
    with pytest.raises(InvalidInputError, match="must be a SplineCodes .* Got LayerCodes .*layers='1.relu6'"):
        write_codes(codes["1.relu6"], tmp_path / "s.zarr")
    w = CodeStoreWriter(tmp_path / "s.zarr")
    with pytest.raises(InvalidInputError, match="'codes' parameter of CodeStoreWriter.append must be a SplineCodes"):
        w.append(codes["1.relu6"])
    w.abort()
    assert not list(tmp_path.iterdir())


def test_extract_checks_limit_and_keywords_with_a_data_source(tmp_path):
    """A DataSource meets the spec string's limit check (limit=-1 used to code 9 of 10 items, True 1); a valid limit
    codes the same rows as the spec; a keyword typo names extract_codes and the close parameter."""
    from polytope_lens.data import load_data
    from polytope_lens.extract import extract_codes

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32))
    spec = f"npy:{tmp_path / 'x.npy'}"
    source = load_data(spec)
    for limit in (-1, 0, True, 2.5, "3"):
        for data in (spec, source):
            with pytest.raises(InvalidInputError, match="'limit' parameter of load_data must be a positive int"):
                extract_codes("toy:2-8-2", data, limit=limit)
        with pytest.raises(InvalidInputError, match="'limit' parameter"):
            extract_to_store("toy:2-8-2", source, tmp_path / "s.zarr", limit=limit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
    a, b = extract_codes("toy:2-8-2", spec, limit=3), extract_codes("toy:2-8-2", source, limit=np.int64(3))
    assert len(b) == 3 and np.array_equal(a.concat(), b.concat()) and np.array_equal(b.rows[:, 0], [0, 1, 2])
    with pytest.raises(InvalidInputError, match=r"extract_codes got an unexpected keyword argument 'layer' \(did you "
                                                r"mean 'layers'\?\)"):
        extract_codes("toy:2-8-2", source, layer="*relu*")


def _damage_attrs(path, change):
    import json

    meta = json.loads((path / "zarr.json").read_text())
    change(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))


def _last_chunk(path, array):
    return sorted(p for p in (path / array / "c").rglob("*") if p.is_file())[-1]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: __import__("shutil").rmtree(p / "rows"), "its array 'rows' is missing"),
    (lambda p: __import__("shutil").rmtree(p / "codes" / "site_000"), "its array 'codes/site_000' is missing"),
    (lambda p: __import__("shutil").rmtree(p / "soft"), "its array 'soft/site_001' is missing"),
    (lambda p: _last_chunk(p, "codes/site_000").write_bytes(_last_chunk(p, "codes/site_000").read_bytes()[:5]),
     "its array 'codes/site_000' cannot be read (RuntimeError: Zstd decompression error: invalid input data)"),
    (lambda p: _last_chunk(p, "rows").write_bytes(b"x" * 40),
     "its array 'rows' cannot be read (RuntimeError: Zstd decompression error: invalid input data)"),
    (lambda p: (p / "codes" / "site_001" / "zarr.json").write_text("{"),
     "its array 'codes/site_001' cannot be read (JSONDecodeError: Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1))"),
    (lambda p: _damage_attrs(p, lambda a: a.pop("layers")), "its zarr.json attributes lack 'layers'"),
    (lambda p: _damage_attrs(p, lambda a: a.pop("selection")), "its zarr.json attributes lack 'selection'"),
    (lambda p: _damage_attrs(p, lambda a: a.update(layers=5)),
     "its zarr.json attribute 'layers' is malformed (TypeError: 'int' object is not iterable)"),
    (lambda p: _damage_attrs(p, lambda a: a["layers"][0].pop("key")),
     "its zarr.json attribute 'layers' is malformed (KeyError: 'key')"),
], ids=["rows", "site", "soft", "chunk", "rows-chunk", "array-json", "layers", "selection", "layers-int", "layer-key"])
def test_a_damaged_store_is_one_line_naming_it_and_the_damage(tmp_path, damage, reason):
    """A store with an array, a chunk or an attribute missing or damaged printed a traceback (KeyError, zstd's
    RuntimeError, TypeError). Oracle: the exact one-line message, from read_codes and from the cluster command."""
    from typer.testing import CliRunner

    from polytope_lens.cli import app

    path = tmp_path / "s.zarr"
    write_codes(_codes(40, soft=True), path)
    damage(path)
    with pytest.raises(InvalidInputError) as info:
        read_codes(path)
    assert str(info.value) == f"{str(path)!r} is a damaged polytope-lens code store: {reason}."
    r = CliRunner().invoke(app, ["cluster", str(path), "--out", str(tmp_path / "c"), "--min-cluster-size", "5"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and lines == [f"error: {info.value}"], r.output
    assert not (tmp_path / "c").exists()


def test_a_chunk_file_deleted_or_swapped_is_caught_by_the_writers_checksums(tmp_path):
    """Found at stop 36: zarr reads a deleted chunk file as its fill value and a chunk file swapped in from another
    store as valid codes, so read_codes returned zeros or another data set's codes without a word. It now checks each
    chunk against the sha256 its writer recorded. Oracle: the intact store reads back the codes written."""
    import shutil

    import torch
    from torch import nn

    from polytope_lens.codes import spline_codes
    from polytope_lens.errors import InvalidInputError
    from polytope_lens.store import read_codes, write_codes

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 9), nn.ReLU(), nn.Linear(9, 4), nn.ReLU())
    a, b = spline_codes(m, torch.randn(50, 3)), spline_codes(m, torch.randn(50, 3))
    write_codes(a, tmp_path / "a")
    write_codes(b, tmp_path / "b")
    got = read_codes(tmp_path / "a")
    for site in a.layers:
        assert np.array_equal(got.layers[site].packed, a.layers[site].packed)
    for name, damage in [("deleted", lambda p: p.unlink()),
                         ("swapped", lambda p: shutil.copyfile(tmp_path / "b" / p.relative_to(tmp_path / "c"), p))]:
        shutil.rmtree(tmp_path / "c", ignore_errors=True)
        shutil.copytree(tmp_path / "a", tmp_path / "c")
        chunk = sorted((tmp_path / "c" / "codes" / "site_000" / "c").rglob("*"))[-1]
        damage(chunk)
        with pytest.raises(InvalidInputError, match=r"is a damaged polytope-lens code store: rows 0 to 49 \(chunk 0\) "
                                                    r"do not match the checksum its writer recorded"):
            read_codes(tmp_path / "c")


def _unlike_chunks():
    """(label, first chunk, unlike second chunk, message) for chunks a store of the first cannot hold."""
    import copy
    import dataclasses

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 9), nn.ReLU6(), nn.Linear(9, 4), nn.GELU())
    x = torch.randn(6, 3)
    hard, soft = spline_codes(m, x), spline_codes(m, x, soft=True)
    f64 = spline_codes(copy.deepcopy(m).double(), x.double())
    tokens = dataclasses.replace(hard, selection={"kind": "tokens", "k": 6, "skip": 100})
    other_act = spline_codes(nn.Sequential(nn.Linear(3, 9), nn.ReLU(), nn.Linear(9, 4), nn.GELU()), x)
    other_act.layers = {new: dataclasses.replace(lc, site=new)
                        for new, lc in zip(hard.layers, other_act.layers.values())}
    return [("dtype", hard, f64, "Cannot append codes of dtype 'float64' to a store of dtype 'float32'"),
            ("selection", hard, tokens, "Cannot append codes of unit selection .*'tokens'.* to a store of unit "
                                        r"selection \{'kind': 'all'\}"),
            ("soft after hard", hard, soft, "Cannot append codes with soft codes .* to a store without them"),
            ("hard after soft", soft, hard, "Cannot append codes without soft codes .* to a store with them"),
            ("activation", hard, other_act, "Cannot append codes of site .* with activation .*'relu'.* to a store "
                                            "where it has .*'relu6'")]


@pytest.mark.parametrize("case", range(5), ids=["dtype", "selection", "soft_after_hard", "hard_after_soft",
                                                "activation"])
@pytest.mark.parametrize("resume", [False, True])
def test_refuses_chunks_unlike_the_first(tmp_path, case, resume):
    """A chunk of another dtype, unit selection, soft setting or activation than the store's first chunk is refused
    in one line before anything of it is written (the store's attributes describe the first chunk only), like a
    chunk of other sites; without resume the context manager removes the partial store, with resume the store
    keeps exactly the first chunk and a resumed run continues it."""
    _, first, second, why = _unlike_chunks()[case]
    out = tmp_path / "c.zarr"
    with pytest.raises(InvalidInputError, match=why):
        with CodeStoreWriter(out, resume=resume, fingerprint={"x": 1}) as w:
            w.append(first)
            w.append(second)
    assert not out.exists()
    if not resume:
        assert not list(tmp_path.iterdir())
        return
    assert w.n_rows == len(first) and all(a.shape[0] == len(first) for a in w._arrays())
    w2 = CodeStoreWriter(out, resume=True, fingerprint={"x": 1})  # the refusal is the same after a resume
    assert w2.n_rows == len(first)
    with pytest.raises(InvalidInputError, match=why):
        w2.append(second)
    w2.close()
    back = read_codes(out)  # oracle: the store equals its first chunk, with the first chunk's attributes
    assert (back.dtype, back.selection, len(back)) == (first.dtype, first.selection, len(first))
    for name, lc in first.layers.items():
        assert np.array_equal(back.layers[name].packed, lc.packed)
        assert (back.layers[name].soft is None) == (lc.soft is None)
        assert back.layers[name].activation == lc.activation


def test_like_chunks_are_still_appended(tmp_path):
    """Chunks of the same dtype, selection, soft setting and activations as the first go on being accepted."""
    out = tmp_path / "c.zarr"
    first = _codes(6, soft=True)
    with CodeStoreWriter(out) as w:
        w.append(first)
        w.append(first)
    back = read_codes(out)
    assert len(back) == 12 and any(lc.soft is not None for lc in first.layers.values())
    for name, lc in first.layers.items():
        assert np.array_equal(back.layers[name].packed, np.concatenate([lc.packed, lc.packed]))
        assert (back.layers[name].soft is None) == (lc.soft is None)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan"),
                                   [1.0, float("nan")], {"a": {"b": float("-inf")}}])
def test_meta_refuses_nan_and_infinities(tmp_path, value):
    """NaN and infinities are not JSON numbers: json would write them into zarr.json as bare NaN / Infinity tokens
    that strict readers refuse, so check_meta refuses them in one line, as other non-JSON values, before anything is
    written. Oracle: every zarr.json of a store that is written parses as strict JSON."""
    import json

    codes = _codes(3)
    for make in (lambda: write_codes(codes, tmp_path / "s.zarr", meta={"x": value}),
                 lambda: CodeStoreWriter(tmp_path / "s.zarr", meta={"ok": 1, "x": value})):
        with pytest.raises(InvalidInputError, match=r"must hold JSON values .*Got 'x': -?(nan|inf) is not a JSON "):
            make()
        assert not list(tmp_path.iterdir())
    write_codes(codes, tmp_path / "s.zarr", meta={"x": None, "big": 1e308, "y": [0.5, {"z": -2.0}]})

    def strict(token):
        raise ValueError(f"not JSON: {token}")

    for f in (tmp_path / "s.zarr").rglob("zarr.json"):
        json.loads(f.read_text(), parse_constant=strict)
    assert read_codes(tmp_path / "s.zarr").meta["y"] == [0.5, {"z": -2.0}]
