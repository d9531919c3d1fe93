"""ScalableCodeClusterer against exact sklearn HDBSCAN on the same distances; the cluster CLI's outputs and errors."""

import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.cluster import HDBSCAN
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from polytope_lens.cli import app
from polytope_lens.cluster import NOISE, CodeClusterer
from polytope_lens.cluster_scale import ScalableCodeClusterer, knn_graph
from polytope_lens.codes import hamming, jaccard
from polytope_lens.errors import InvalidInputError

pytest.importorskip("faiss")


def planted(n=3000, n_clusters=12, n_bits=512, noise=0.05, seed=0):
    """Prototype codes with per-cluster flip rates in U(2%, 16%), plus uniformly random noise rows (truth NOISE)."""
    rng = np.random.default_rng(seed)
    protos = rng.random((n_clusters, n_bits)) < 0.5
    y = rng.integers(0, n_clusters, n)
    bits = protos[y] ^ (rng.random((n, n_bits)) < rng.uniform(0.02, 0.16, n_clusters)[y, None])
    is_noise = rng.random(n) < noise
    bits[is_noise] = rng.random((int(is_noise.sum()), n_bits)) < 0.5
    y[is_noise] = NOISE
    return np.packbits(bits, axis=1, bitorder="little"), y


def exact_labels(D, min_cluster_size, min_samples=None):
    return HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, metric="precomputed",
                   copy=True).fit(D).labels_


@pytest.fixture(scope="module")
def codes3000():
    return planted()


@pytest.mark.parametrize("metric", ["hamming", "jaccard"])
def test_agrees_with_exact_hdbscan_on_planted_codes(codes3000, metric):
    """3,000 planted codes: ARI >= 0.98 with exact HDBSCAN at the default k (measured 0.994 / 0.996)."""
    X, y = codes3000
    D = (hamming if metric == "hamming" else jaccard)(X)
    ref = exact_labels(D, 20)
    est = ScalableCodeClusterer(metric=metric, min_cluster_size=20).fit(X)
    # flat search: exact for Hamming; Jaccard re-ranks Hamming candidates, an approximate graph
    assert est.knn_exact_ == (metric == "hamming") and est.n_clusters_ == len(set(ref) - {NOISE})
    assert adjusted_rand_score(ref, est.labels_) >= 0.98
    assert adjusted_rand_score(y, est.labels_) >= 0.98


def test_large_k_reproduces_exact_hierarchy(codes3000):
    """With k = 256 the kNN graph holds the full mutual-reachability MST: same merge heights and core distances.

    Labels may still differ by a few rows (measured ARI 0.9994): equal integer merge heights are merged in another
    order than sklearn's Prim MST, which can move rows between clusters born at the same height.
    """
    from sklearn.cluster._hdbscan._linkage import mst_from_mutual_reachability
    from sklearn.cluster._hdbscan._reachability import mutual_reachability_graph

    X, _ = codes3000
    D = hamming(X)
    mst = mst_from_mutual_reachability(mutual_reachability_graph(D.copy(), min_samples=20))
    est = ScalableCodeClusterer(min_cluster_size=20, n_neighbors=256).fit(X)
    assert np.array_equal(np.sort(est.single_linkage_tree_["value"]), np.sort(mst["distance"]))
    assert np.array_equal(est.core_distances_, np.partition(D, 19, axis=1)[:, 19])
    assert adjusted_rand_score(exact_labels(D, 20), est.labels_) >= 0.999


def test_agrees_on_real_digits_cnn_codes():
    """Codes of digits-cnn on 1,797 digits: ARI >= 0.95 with exact HDBSCAN at the default k; 1.0 at k = 128."""
    pytest.importorskip("sklearn")
    from polytope_lens.extract import extract_codes

    X = extract_codes("digits-cnn", "digits", batch_size=256).concat()
    D = hamming(X)
    ref = exact_labels(D, 10, 5)
    default = ScalableCodeClusterer(min_cluster_size=10, min_samples=5).fit(X)
    big = ScalableCodeClusterer(min_cluster_size=10, min_samples=5, n_neighbors=128).fit(X)
    assert adjusted_rand_score(ref, default.labels_) >= 0.95
    assert adjusted_rand_score(ref, big.labels_) >= 0.99


def test_disconnected_knn_graph_is_bridged():
    """Tight far-apart groups give a kNN graph of several components; bridging joins them exactly (ARI 1)."""
    X, _ = planted(n=600, n_clusters=6, noise=0.0, seed=3)
    est = ScalableCodeClusterer(min_cluster_size=10, min_samples=5, n_neighbors=8).fit(X)
    assert est.n_components_ > 1
    assert adjusted_rand_score(exact_labels(hamming(X), 10, 5), est.labels_) == 1.0


def test_hnsw_index_close_to_exact(codes3000):
    """The approximate HNSW graph gives nearly the same clustering as the exact flat one."""
    X, _ = codes3000
    flat = ScalableCodeClusterer(min_cluster_size=20, index="flat").fit(X)
    hnsw = ScalableCodeClusterer(min_cluster_size=20, index="hnsw").fit(X)
    assert not hnsw.knn_exact_ and adjusted_rand_score(flat.labels_, hnsw.labels_) >= 0.95


def test_knn_graph_matches_brute_force():
    """Flat Hamming kNN distances equal the sorted rows of the dense matrix; Jaccard re-ranking is exact there too."""
    X, _ = planted(n=300, seed=1)
    for metric, fn in (("hamming", hamming), ("jaccard", jaccard)):
        D, ind = knn_graph(X, 10, metric=metric, jaccard_candidates=30)
        full = np.sort(fn(X), axis=1)[:, :10]
        assert np.array_equal(D, full), metric
        assert (ind >= 0).all()


def test_sklearn_contract_and_errors():
    """Keyword-only, stores its arguments, clones; bad parameters name parameter, owner and value."""
    est = ScalableCodeClusterer(metric="jaccard", n_neighbors=30)
    assert clone(est).get_params() == est.get_params()
    with pytest.raises(TypeError):
        ScalableCodeClusterer("hamming")
    X, _ = planted(n=100)
    with pytest.raises(InvalidInputError, match="'index' parameter of ScalableCodeClusterer"):
        ScalableCodeClusterer(index="ivf").fit(X)
    with pytest.raises(InvalidInputError, match=r"'n_neighbors' .* \(4\) must be at least min_samples \(5\)"):
        ScalableCodeClusterer(min_cluster_size=5, n_neighbors=4).fit(X)
    with pytest.raises(InvalidInputError, match="2-D uint8"):
        ScalableCodeClusterer().fit(np.zeros((10, 4)))


def test_code_clusterer_scalable_method(codes3000):
    """CodeClusterer(method='scalable') delegates (no row cap), and the dense error names it."""
    X, _ = codes3000
    a = CodeClusterer(method="scalable", min_cluster_size=20).fit(X)
    b = ScalableCodeClusterer(min_cluster_size=20).fit(X)
    assert np.array_equal(a.labels_, b.labels_) and a.n_clusters_ == b.n_clusters_
    with pytest.raises(InvalidInputError, match="method='scalable'"):
        CodeClusterer(max_rows=100).fit(X)


# --------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    from polytope_lens.extract import extract_to_store

    path = tmp_path_factory.mktemp("store") / "digits.zarr"
    extract_to_store("digits-cnn", "digits", path, limit=400, batch_size=100)
    return path


def test_cluster_cli_writes_outputs(digits_store, tmp_path):
    """assignments.npy, rows.npy, clusters.json and an HTML dashboard with image grids; nothing partial left."""
    out = tmp_path / "res"
    r = CliRunner().invoke(app, ["cluster", str(digits_store), "--out", str(out), "--min-cluster-size", "8",
                                 "--layers", "conv.*,head.*"])
    assert r.exit_code == 0, r.output
    labels = np.load(out / "assignments.npy")
    info = json.loads((out / "clusters.json").read_text())
    assert labels.shape == (400,) and labels.dtype == np.int64
    assert np.load(out / "rows.npy").shape == (400, 2)
    assert info["sites"] == ["conv.1.relu", "head.2.relu"] and info["n_clusters"] == len(info["clusters"]) >= 2
    assert sum(c["size"] for c in info["clusters"]) + info["n_noise"] == 400
    page = (out / "index.html").read_text()
    assert page.count("data:image/png") == 1 + min(40, info["n_clusters"])  # sizes chart + one grid per cluster
    assert not list(tmp_path.glob(".*partial"))
    # scored against the data set's labels (sklearn on the clustered rows), each cluster with its majority label
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from polytope_lens.data import load_data
    y = np.asarray(load_data("digits", limit=400).labels)[np.load(out / "rows.npy")[:, 0]]
    kept = labels >= 0
    sc = info["label_scores"]
    assert sc["coverage"] == kept.mean()
    assert abs(sc["nmi"] - normalized_mutual_info_score(y[kept], labels[kept])) < 1e-12
    assert abs(sc["ari"] - adjusted_rand_score(y[kept], labels[kept])) < 1e-12
    for c in info["clusters"]:
        vals, counts = np.unique(y[labels == c["cluster"]], return_counts=True)
        assert str(c["majority"]) == str(vals[counts.argmax()]) and c["majority_share"] == counts.max() / c["size"]


def test_cluster_says_when_the_rows_have_one_label(tmp_path):
    """A store whose rows all have one label (austen --limit N: the first passages, all of Emma) reported purity 1,
    NMI 0, ARI 0 without a word; now n_labels is given and the CLI and dashboard say the scores mean nothing."""
    from polytope_lens.data.arrays import LABEL_KEY
    from polytope_lens.extract import extract_to_store

    x = np.random.default_rng(0).normal(size=(120, 2)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, **{LABEL_KEY: np.zeros(120, dtype=np.int64)})
    extract_to_store("toy:2-16-16-2", f"npz:{tmp_path / 'd.npz'}:x", tmp_path / "s.zarr")
    r = CliRunner().invoke(app, ["cluster", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "o"),
                                 "--min-cluster-size", "5"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "clusters.json").read_text())["label_scores"]["n_labels"] == 1
    assert "single label" in r.stderr and "single label" in (tmp_path / "o" / "index.html").read_text()


def test_a_store_of_a_whole_data_set_reloads_its_labels():
    """A store made without a limit reloads its data without one: a limit (even of every item) samples digits by
    class and says so in the provenance, so a full digits store lost its labels, label scores and pictures. Oracle:
    the data set loaded directly; a store made with a limit still reloads with it."""
    from polytope_lens.cluster_report import _load_source
    from polytope_lens.data import load_data

    full = load_data("digits")
    source, why = _load_source({"data": "digits", "fingerprint": {"n_items": len(full)},
                                "data_provenance": full.provenance})
    assert why is None and np.array_equal(source.labels, full.labels) and np.array_equal(source.items, full.items)
    some = load_data("digits", limit=300)
    source, why = _load_source({"data": "digits", "fingerprint": {"n_items": 300}, "data_provenance": some.provenance})
    assert why is None and np.array_equal(source.labels, some.labels)
    other = dict(full.provenance, package="scikit-learn 0.0")
    assert _load_source({"data": "digits", "fingerprint": {"n_items": len(full)}, "data_provenance": other})[0] is None


def test_cluster_dashboard_shows_image_shaped_arrays(tmp_path):
    """Images from an npy: data set (modality 'array', shape (N, 1, 8, 8)) are drawn like an image data set's (the
    dashboard said "neither images nor text"); a flat array still gets no pictures, with the reason."""
    from sklearn.datasets import load_digits

    from polytope_lens.extract import extract_to_store

    images = (load_digits().images[:200, None] * 5.0).astype(np.float32)  # any range: each image is stretched
    for name, arr, grids in (("img", images, True), ("flat", images.reshape(200, -1), False)):
        np.save(tmp_path / f"{name}.npy", arr)
        model = "digits-cnn" if grids else "toy:64-16-16-3"
        extract_to_store(model, f"npy:{tmp_path / name}.npy", tmp_path / f"{name}.zarr", batch_size=100)
        r = CliRunner().invoke(app, ["cluster", str(tmp_path / f"{name}.zarr"), "--out", str(tmp_path / name),
                                     "--min-cluster-size", "5"])
        assert r.exit_code == 0, r.output
        info = json.loads((tmp_path / name / "clusters.json").read_text())
        page = (tmp_path / name / "index.html").read_text()
        assert info["n_clusters"] >= 1
        if grids:
            assert page.count("data:image/png") == 1 + min(40, info["n_clusters"])
        else:
            assert page.count("data:image/png") == 1 and "neither images (or image-shaped arrays) nor text" in page


@pytest.mark.parametrize("args,match", [
    (["cluster", "NOSTORE", "--out", "OUT"], "is not a polytope-lens code store"),
    (["cluster", "STORE", "--out", "OUT", "--metric", "cosine"], "--metric must be one of 'hamming', 'jaccard'"),
    (["cluster", "STORE", "--out", "OUT", "--layers", "nope*"], "No site of the store matches"),
])
def test_cluster_cli_fails_cleanly(digits_store, tmp_path, args, match):
    """Bad inputs: one line, exit 1, no results folder."""
    out = tmp_path / "res"
    args = [str(tmp_path / "none") if a == "NOSTORE" else str(digits_store) if a == "STORE" else
            str(out) if a == "OUT" else a for a in args]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and match in r.output.replace("\n", " ")
    assert "Traceback" not in r.output and not out.exists()


def test_cluster_overwrite_replaces_only_results(digits_store, tmp_path, monkeypatch):
    """cluster --overwrite refuses the current folder, its own input store, a file and a foreign folder (one line,
    nothing deleted; it used to empty the cwd or replace its input) and replaces an earlier results folder."""
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.txt").write_text("a")
    (tmp_path / "f.txt").write_text("f")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    store_files = sorted(digits_store.rglob("*"))
    for out, why in ((".", "current folder"), (str(digits_store), "this command's input"),
                     (str(digits_store.parent), "this command's input"), ("f.txt", "is a file"),
                     ("foreign", "without that kind's polytope-lens metadata")):
        r = CliRunner().invoke(app, ["cluster", str(digits_store), "--out", out, "--overwrite",
                                     "--min-cluster-size", "8", "--limit", "100"])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1, r.output
        assert "--overwrite replaces only a polytope-lens cluster results folder" in lines[0] and why in lines[0]
    assert sorted(tmp_path.rglob("*")) == before and sorted(digits_store.rglob("*")) == store_files
    for limit in ("100", "60"):
        r = CliRunner().invoke(app, ["cluster", str(digits_store), "--out", "res", "--overwrite",
                                     "--min-cluster-size", "8", "--limit", limit])
        assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "res" / "assignments.npy").shape == (60,)


def test_jaccard_graph_is_labelled_exact_only_when_every_row_is_a_candidate():
    """Jaccard re-ranks Hamming candidates: a neighbour outside them can be missed, so the graph is approximate
    (it was labelled exact before) unless every row is a candidate, where it equals brute force."""
    rng = np.random.default_rng(3)
    X = np.packbits(rng.random((102, 40)) < rng.random((102, 1)), axis=1, bitorder="little")
    few = ScalableCodeClusterer(metric="jaccard", min_cluster_size=5, n_neighbors=16, jaccard_candidates=2).fit(X)
    assert not few.knn_exact_
    every = ScalableCodeClusterer(metric="jaccard", min_cluster_size=5, n_neighbors=16, jaccard_candidates=7).fit(X)
    assert every.knn_exact_  # 16 * 7 >= 102 rows
    D, _ = knn_graph(X, 16, metric="jaccard", index="flat", jaccard_candidates=7)
    brute = np.sort(jaccard(X, X), axis=1)[:, :16]
    np.testing.assert_allclose(np.sort(D, axis=1), brute, atol=1e-12)
    assert ScalableCodeClusterer(metric="hamming", min_cluster_size=5).fit(X).knn_exact_


@pytest.mark.parametrize("kwargs,match", [
    ({"index": "flta"}, r"The 'index' parameter of knn_graph must be one of 'auto', 'flat', 'hnsw'\. Got 'flta'"),
    ({"metric": "cosine"}, r"The 'metric' parameter of knn_graph must be one of 'hamming', 'jaccard'\. Got 'cosine'"),
    ({"n_neighbors": 0}, r"The 'n_neighbors' parameter of knn_graph must be an int >= 1\. Got 0"),
    ({"chunk_rows": 0}, r"The 'chunk_rows' parameter of knn_graph must be an int >= 1\. Got 0"),
])
def test_knn_graph_validates_its_arguments(kwargs, match):
    """A typo or "auto" built an approximate HNSW index; a bad metric gave a broadcast error, k=0 an AssertionError."""
    X, _ = planted(n=50, n_bits=64)
    with pytest.raises(InvalidInputError, match=match):
        knn_graph(X, **{"n_neighbors": 5, **kwargs})


def test_knn_graph_auto_is_exact_up_to_flat_max_rows():
    """index="auto" means what it means in ScalableCodeClusterer: the exact flat search up to flat_max_rows rows
    (it silently built HNSW). Oracle: the sorted rows of the dense Hamming matrix."""
    X, _ = planted(n=3000, n_bits=128, seed=2)
    D, ind = knn_graph(X, 10, index="auto")
    assert np.array_equal(D, np.sort(hamming(X), axis=1)[:, :10]) and (ind >= 0).all()
    hnsw = knn_graph(X, 10, index="hnsw")
    assert np.array_equal(knn_graph(X, 10, index="auto", flat_max_rows=2999)[0], hnsw[0])


def nested_codes(m=10):
    """Groups A1, A2, B1, B2 of m codes: each member is its group's centre with one bit of its own flipped (members
    2 apart); A1-A2 and B1-B2 centres 8 bits apart, A and B 64. With min_cluster_size=5, A splits into A1 and A2
    (and B into B1, B2) at mutual-reachability distance 8."""
    centres = np.zeros((4, 128), np.uint8)
    centres[[1, 3], 64:72] = 1
    centres[[2, 3], :64] = 1
    bits = np.repeat(centres, m, axis=0)
    bits[np.arange(4 * m), 72 + np.tile(np.arange(m), 4)] ^= 1
    return np.packbits(bits, axis=1, bitorder="little"), np.repeat(np.arange(4), m)


def test_cluster_selection_epsilon_merges_clusters_born_below_it():
    """sklearn 1.9.1's epsilon step raises TypeError under NumPy >= 2.4 whenever epsilon changes the selection
    (scikit-learn #33219), e.g. any epsilon above every distance. Hand-computed oracle: below 8 the four groups,
    above 8 A and B, above every distance still A and B (the root's children; allow_single_cluster is off)."""
    X, g = nested_codes()
    for eps, truth in ((0.0, g), (5.0, g), (9.0, g // 2), (20.0, g // 2), (1000.0, g // 2)):
        for est in (CodeClusterer(min_cluster_size=5, cluster_selection_epsilon=eps),
                    ScalableCodeClusterer(min_cluster_size=5, cluster_selection_epsilon=eps)):
            labels = est.fit(X).labels_
            assert adjusted_rand_score(truth, labels) == 1.0 and (labels != NOISE).all(), (type(est).__name__, eps)
    with pytest.raises(InvalidInputError, match="'cluster_selection_epsilon' parameter of ScalableCodeClusterer"):
        ScalableCodeClusterer(cluster_selection_epsilon=float("nan")).fit(X)


def test_epsilon_selection_equals_sklearns_wherever_sklearn_runs():
    """Labels and probabilities equal sklearn's tree_to_labels for every epsilon it does not crash on (all of them,
    once sklearn is fixed); Euclidean blobs, rounded to make ties, with and without allow_single_cluster."""
    from sklearn.cluster._hdbscan._tree import tree_to_labels

    from polytope_lens.cluster_scale import _tree_labels

    rng = np.random.default_rng(1)
    compared = 0
    for t in range(40):
        P = rng.normal(size=(int(rng.integers(10, 80)), 2))
        P[: len(P) // 2] += rng.uniform(1, 6)
        P = np.round(P * 2) / 2 if t % 2 else P
        mcs, single = int(rng.integers(2, 8)), bool(t % 4 == 0)
        tree = HDBSCAN(min_cluster_size=mcs, allow_single_cluster=single, copy=True).fit(P)._single_linkage_tree_
        for eps in (0.0, 0.1, 0.5, 1.0, 2.0, 50.0):
            try:
                want = tree_to_labels(tree, mcs, "eom", single, eps, None)
            except TypeError:  # scikit-learn #33219
                continue
            got = _tree_labels(tree, mcs, single, eps)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
            compared += eps > 0
    assert compared > 50
