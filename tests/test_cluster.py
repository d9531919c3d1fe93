"""Clustering of packed codes and activations: planted structure, scores against sklearn, noise policy, errors."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn

from polytope_lens.cluster import (NOISE, ActivationClusterer, CodeClusterer, bit_names, cluster_summary,
                                   clustering_scores, purity, stability, subsample_indices)
from polytope_lens.codes import spline_codes
from polytope_lens.errors import InvalidInputError


def planted_codes(n_clusters=5, per=40, n_bits=128, flip=0.05, seed=0):
    """Packed codes: random prototypes, each member a copy with `flip` of its bits flipped; labels."""
    rng = np.random.default_rng(seed)
    protos = rng.random((n_clusters, n_bits)) < 0.5
    y = np.repeat(np.arange(n_clusters), per)
    bits = protos[y] ^ (rng.random((len(y), n_bits)) < flip)
    return np.packbits(bits, axis=1, bitorder="little"), y, bits


@pytest.mark.parametrize("metric", ["hamming", "jaccard"])
def test_hdbscan_recovers_planted_codes(metric):
    """Prototypes plus 5% bit flips are recovered by HDBSCAN under either distance."""
    X, y, _ = planted_codes()
    est = CodeClusterer(metric=metric, min_cluster_size=10)
    assert est.fit(X) is est
    assert adjusted_rand_score(y, est.labels_) > 0.9
    assert est.n_clusters_ == 5 and est.noise_fraction_ < 0.05
    assert est.labels_.dtype == np.int64 and est.probabilities_.shape == (len(y),)


@pytest.mark.parametrize("method,metric", [("kmeans", "hamming"), ("agglomerative", "hamming"),
                                           ("agglomerative", "jaccard")])
def test_count_methods_recover_planted_codes(method, metric):
    """k-means on unpacked bits and average-linkage clustering find the planted clusters given their count."""
    X, y, _ = planted_codes(flip=0.1)
    est = CodeClusterer(method=method, metric=metric, n_clusters=5).fit(X)
    assert adjusted_rand_score(y, est.labels_) > 0.9 and est.noise_fraction_ == 0.0


def test_code_clusterer_takes_spline_codes():
    """A SplineCodes is clustered on its concatenated packed codes."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU())
    codes = spline_codes(m, torch.randn(60, 3))
    a = CodeClusterer(method="kmeans", n_clusters=3).fit(codes).labels_
    b = CodeClusterer(method="kmeans", n_clusters=3).fit(codes.concat()).labels_
    assert np.array_equal(a, b)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("method", ["kmeans", "hdbscan", "agglomerative"])
def test_activation_clusterer_recovers_blobs(metric, method):
    """Well-separated Gaussian blobs (distinct directions) are found under both metrics and all methods."""
    rng = np.random.default_rng(1)
    centres = np.eye(4, 16) * 10 + 1
    y = np.repeat(np.arange(4), 30)
    X = centres[y] + rng.normal(scale=0.5, size=(len(y), 16))
    est = ActivationClusterer(metric=metric, method=method, n_clusters=None if method == "hdbscan" else 4,
                              min_cluster_size=10).fit(X)
    assert adjusted_rand_score(y, est.labels_) > 0.9


def test_estimators_follow_sklearn_contract():
    """__init__ stores keyword arguments only; get_params/clone round-trip; positional arguments are refused."""
    est = CodeClusterer(metric="jaccard", min_cluster_size=7)
    assert est.get_params()["metric"] == "jaccard" and est.get_params()["min_cluster_size"] == 7
    assert clone(est).get_params() == est.get_params()
    assert not hasattr(est, "labels_")
    with pytest.raises(TypeError):
        CodeClusterer("hamming")
    assert ActivationClusterer(n_clusters=3).fit_predict(np.random.default_rng(0).normal(size=(20, 2))).shape == (20,)


def test_purity_by_hand():
    """Clusters {a,a,b} and {b,b}: (2 + 2) / 5 = 0.8."""
    assert purity([0, 0, 1, 1, 1], [0, 0, 0, 1, 1]) == pytest.approx(0.8)
    assert purity(["x", "y", "z"], [4, 4, 4]) == pytest.approx(1 / 3)


def test_scores_match_sklearn_and_noise_policies():
    """NMI/ARI equal sklearn's; noise as a cluster, excluded, or as singletons follows the stated policy."""
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    p = np.array([5, 5, NOISE, 7, 7, NOISE, 9, 9])
    s = clustering_scores(y, p)
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(y, p))
    assert s["ari"] == pytest.approx(adjusted_rand_score(y, p))
    assert s["purity"] == pytest.approx(7 / 8)  # noise group {0, 1} has majority 1 of 2
    assert s["n_clusters"] == 3 and s["noise_fraction"] == pytest.approx(0.25) and s["coverage"] == 1.0
    ex = clustering_scores(y, p, noise="exclude")
    keep = p != NOISE
    assert ex["coverage"] == pytest.approx(0.75) and ex["purity"] == 1.0
    assert ex["ari"] == pytest.approx(adjusted_rand_score(y[keep], p[keep]))
    single = clustering_scores(y, p, noise="singleton")
    q = p.copy()
    q[~keep] = [100, 101]
    assert single["purity"] == 1.0 and single["nmi"] == pytest.approx(normalized_mutual_info_score(y, q))
    assert np.isnan(clustering_scores([0, 1], [NOISE, NOISE], noise="exclude")["nmi"])


def test_stability_planted_vs_random():
    """Subsample stability is ~1 on planted clusters and lower on structureless codes; rounds can be shared."""
    X, _, _ = planted_codes()
    idx = subsample_indices(len(X), n_rounds=4, fraction=0.8, random_state=0)
    assert all(len(i) == 160 and len(np.unique(i)) == 160 for i in idx)
    est = CodeClusterer(min_cluster_size=10).fit(X)
    assert stability(est, X, indices=idx).min() > 0.9
    noise = np.random.default_rng(3).integers(0, 256, size=(200, 16), dtype=np.uint8)
    kms = ActivationClusterer(n_clusters=5).fit(np.unpackbits(noise, axis=1).astype(float))
    planted_km = ActivationClusterer(n_clusters=5).fit(np.unpackbits(X, axis=1).astype(float))
    assert (stability(kms, np.unpackbits(noise, axis=1).astype(float), indices=idx).mean()
            < stability(planted_km, np.unpackbits(X, axis=1).astype(float), indices=idx).mean())


def test_cluster_summary_finds_defining_units():
    """Bits constant within a planted cluster and rare outside it are its top defining units."""
    X, y, bits = planted_codes(n_clusters=3, per=20, n_bits=32, flip=0.0)
    s = cluster_summary(y, X, y=y, top_k=5)
    assert [c.size for c in s.clusters] == [20, 20, 20] and s.n_noise == 0 and s.n_bits == 32
    for c in s.clusters:
        assert c.majority == c.cluster and c.majority_share == 1.0
        assert c.n_constant == 32  # no flips: every bit constant within the cluster
        top = c.units[0]
        assert top["p_in"] in (0.0, 1.0) and abs(top["p_in"] - top["p_out"]) == max(
            abs(u["p_in"] - u["p_out"]) for u in c.units)
    labels = y.copy()
    labels[:3] = NOISE
    s2 = cluster_summary(labels, X, max_members=4)
    assert s2.n_noise == 3 and all(len(c.members) == 4 for c in s2.clusters)
    assert s2.to_dict()["clusters"][0]["size"] in (17, 20)


def test_bit_names_skip_padding_and_name_units():
    """Columns map to (site, unit, kink) with each site's padding bits dropped."""
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 5), nn.ReLU6())
    codes = spline_codes(m, torch.randn(7, 2))
    cols, names = bit_names(codes)
    assert len(cols) == 3 + 5 * 2
    assert cols[:3].tolist() == [0, 1, 2] and cols[3] == 8  # second site starts at the next byte
    assert names[3] == {"site": "3.relu6", "unit": 0, "index": [0], "bit": 0}  # planar: every unit's bit 0 first
    assert names[4]["unit"] == 1 and names[8] == {"site": "3.relu6", "unit": 0, "index": [0], "bit": 1}
    unpacked = np.unpackbits(codes.concat(), axis=1, bitorder="little")[:, cols]
    assert np.array_equal(unpacked[:, :3], codes["1.relu"].pieces())
    pieces = codes["3.relu6"].pieces()
    for c, name in zip(range(3, 13), names[3:]):  # each named column is that unit's thermometer bit
        assert np.array_equal(unpacked[:, c], (pieces[:, name["unit"]] > name["bit"]).astype(np.uint8))


@pytest.mark.parametrize("bad,match", [
    (np.zeros((0, 4), np.uint8), "empty codes"),
    (np.zeros((5, 4), np.float32), "packed codes, a 2-D uint8 array"),
    (np.zeros(5, np.uint8), "packed codes, a 2-D uint8 array"),
])
def test_code_clusterer_rejects_bad_codes(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        CodeClusterer().fit(bad)


@pytest.mark.parametrize("kwargs,match", [
    ({"metric": "euclid"}, r"The 'metric' parameter of CodeClusterer must be one of 'hamming', 'jaccard'\. Got "),
    ({"method": "dbscan"}, "The 'method' parameter of CodeClusterer must be one of"),
    ({"min_cluster_size": 1}, r"The 'min_cluster_size' parameter of CodeClusterer must be an int >= 2\. Got 1"),
    ({"method": "kmeans"}, "'n_clusters' parameter of CodeClusterer is required with method='kmeans'"),
    ({"method": "kmeans", "n_clusters": 50}, r"must be at most the number of rows \(20\)"),
    ({"method": "kmeans", "metric": "jaccard", "n_clusters": 2}, "k-means works under the Hamming distance only"),
    ({"max_rows": 10}, r"dense 20 x 20 distance matrix .* above max_rows=10; .*method='kmeans'"),
    ({"cluster_selection_epsilon": -1.0},
     r"The 'cluster_selection_epsilon' parameter of CodeClusterer must be a float >= 0\. Got -1\.0"),
    ({"cluster_selection_epsilon": float("nan")}, "'cluster_selection_epsilon' parameter of CodeClusterer"),
    ({"method": "kmeans", "n_clusters": 3, "n_init": 0}, r"The 'n_init' parameter of CodeClusterer must be an int >= "),
])
def test_code_clusterer_rejects_bad_params(kwargs, match):
    X = np.random.default_rng(0).integers(0, 256, size=(20, 2), dtype=np.uint8)
    with pytest.raises(InvalidInputError, match=match):
        CodeClusterer(**kwargs).fit(X)


def test_bad_activations_and_labels():
    with pytest.raises(InvalidInputError, match="'metric' parameter of ActivationClusterer"):
        ActivationClusterer(metric="hamming", n_clusters=2).fit(np.zeros((4, 2)))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        ActivationClusterer(n_clusters=2).fit(np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]]))
    with pytest.raises(InvalidInputError, match="empty activations"):
        ActivationClusterer(n_clusters=2).fit(np.zeros((0, 3)))
    with pytest.raises(InvalidInputError, match="got 3 labels and 2 cluster labels"):
        clustering_scores([0, 1, 2], [0, 1])
    with pytest.raises(InvalidInputError, match="'noise' parameter of purity"):
        purity([0, 1], [0, 1], noise="drop")
    with pytest.raises(InvalidInputError, match="got 2 cluster labels for 3 code rows"):
        cluster_summary([0, 1], np.zeros((3, 1), np.uint8))


def test_hdbscan_min_cluster_size_above_the_rows_is_one_line():
    """sklearn's HDBSCAN raised "min_samples (30) must be at most the number of samples" (its min_samples defaults
    to min_cluster_size); the scalable clusterer already said it in the toolkit's words."""
    X = np.random.default_rng(0).integers(0, 256, (20, 4), dtype=np.uint8)
    for est, data in ((CodeClusterer(min_cluster_size=30), X),
                      (ActivationClusterer(method="hdbscan", min_cluster_size=30), X.astype(float))):
        with pytest.raises(InvalidInputError, match=r"'min_cluster_size' parameter of \w+ \(30\) must be at most the "
                                                    r"number of rows \(20"):
            est.fit(data)


def test_activation_clusterer_validates_its_own_params_and_refuses_complex():
    """n_init=0 and a negative epsilon were sklearn errors naming KMeans / HDBSCAN; complex input lost its
    imaginary part."""
    A = np.random.default_rng(0).normal(size=(40, 3))
    with pytest.raises(InvalidInputError, match="'n_init' parameter of ActivationClusterer must be an int >= 1"):
        ActivationClusterer(n_clusters=3, n_init=0).fit(A)
    with pytest.raises(InvalidInputError, match="'cluster_selection_epsilon' parameter of ActivationClusterer"):
        ActivationClusterer(method="hdbscan", cluster_selection_epsilon=-0.5).fit(A)
    with pytest.raises(InvalidInputError, match="2-D real numeric array .* complex128"):
        ActivationClusterer(n_clusters=2).fit(A + 1j)


def test_cosine_agglomerative_takes_an_all_zero_row():
    """An all-zero activation row (every ReLU off) crashed sklearn's cosine agglomerative clustering; it is now at
    cosine distance 1 from every other row, as in the HDBSCAN path. Oracle: scipy's average linkage on that matrix
    computed by hand."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(0)
    directions = np.array([[1.0, 1, 0], [0, 1, 1], [1, 0, 1]])  # 60 degrees apart: cosine distance 0.5
    A = np.maximum(directions[np.arange(31) % 3] + rng.normal(scale=0.05, size=(31, 3)), 0)
    A[7] = 0
    U = A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-300)
    D = np.clip(1 - U @ U.T, 0, None)
    D[A.sum(1) == 0] = D[:, A.sum(1) == 0] = 1.0
    np.fill_diagonal(D, 0)
    for k in (2, 4):  # the zero row alone, then with the three directions
        expected = fcluster(linkage(squareform(D, checks=False), "average"), k, "maxclust")
        got = ActivationClusterer(metric="cosine", method="agglomerative", n_clusters=k).fit(A).labels_
        assert len(np.unique(expected)) == k and adjusted_rand_score(expected, got) == 1.0
        assert (got == got[7]).sum() == 1
    with pytest.raises(InvalidInputError, match="dense 31 x 31 distance matrix"):
        ActivationClusterer(metric="cosine", method="agglomerative", n_clusters=3, max_rows=10).fit(A)


def test_stability_checks_the_rows_and_takes_lists():
    """A fitted estimator's labels_ must belong to X (fitted on 20 rows, X of 40 scored rows 0-19 silently; the
    reverse raised IndexError); a list X (it raised TypeError) gives the ARI computed by hand."""
    X, _, _ = planted_codes(per=10)
    with pytest.raises(InvalidInputError, match="fitted on 20 rows .* X of 50 rows"):
        stability(CodeClusterer(min_cluster_size=3).fit(X[:20]), X, n_rounds=2)
    with pytest.raises(InvalidInputError, match="fitted on 50 rows .* X of 20 rows"):
        stability(CodeClusterer(min_cluster_size=3).fit(X), X[:20], n_rounds=2)
    with pytest.raises(InvalidInputError, match=r"'indices' parameter of stability .* in \[0, 50\)"):
        stability(CodeClusterer(min_cluster_size=3), X, indices=[np.arange(48, 51)])
    A = np.random.default_rng(1).normal(size=(30, 3))
    A[:15] += 4
    idx = subsample_indices(30, n_rounds=3, fraction=0.5, random_state=2)
    est = ActivationClusterer(n_clusters=3).fit(A)
    by_hand = [adjusted_rand_score(est.labels_[i], ActivationClusterer(n_clusters=3).fit(A[i]).labels_) for i in idx]
    np.testing.assert_allclose(stability(ActivationClusterer(n_clusters=3), A.tolist(), indices=idx), by_hand)
