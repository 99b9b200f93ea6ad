"""Unit tests for compeffdist_ray.clustering: similarities and bounded affinity propagation."""

from __future__ import annotations

import numpy as np
import pytest

from compeffdist_ray.clustering import assign_to_exemplars, cluster_attributes, similarity_matrix

N_BLOBS, PER_BLOB, DIM = 4, 30, 16


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(N_BLOBS, DIM)) * 10.0
    x = np.concatenate([c + rng.normal(size=(PER_BLOB, DIM)) for c in centers])
    truth = np.repeat(np.arange(N_BLOBS), PER_BLOB)
    counts = rng.integers(1, 50, size=len(x)).astype(float)
    return x, truth, counts


def _same_partition(labels, truth):
    """True when labels and truth group the points identically (up to renaming)."""
    pairs = set(zip(labels.tolist(), truth.tolist()))
    return len(pairs) == len(set(labels.tolist())) == len(set(truth.tolist()))


# ------------------------------------------------------------------------------------------
# similarity_matrix
# ------------------------------------------------------------------------------------------


def test_neg_sq_euclidean_matches_direct_computation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    direct = -((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1)
    np.testing.assert_allclose(similarity_matrix(a, b), direct, rtol=1e-10, atol=1e-10)
    s = similarity_matrix(a)
    assert s.shape == (7, 7)
    np.testing.assert_allclose(s, s.T, atol=1e-12)
    assert np.all(np.diag(s) == 0.0)  # clamped: never a tiny positive distance
    assert np.all(s <= 0.0)


def test_neg_sq_euclidean_of_identical_far_points_is_zero():
    a = np.full((2, 3), 1e4)
    assert np.all(similarity_matrix(a) == 0.0)


def test_cosine_matches_direct_computation():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(3, 5))
    direct = np.array([[u @ v / np.linalg.norm(u) / np.linalg.norm(v) for v in b] for u in a])
    np.testing.assert_allclose(similarity_matrix(a, b, kind="cosine"), direct, rtol=1e-10)
    np.testing.assert_allclose(np.diag(similarity_matrix(a, kind="cosine")), 1.0)


def test_cosine_is_scale_invariant_and_zero_vector_safe():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    s = similarity_matrix(a, kind="cosine")
    assert np.isfinite(s).all()
    assert s[0, 2] == pytest.approx(1.0)
    assert s[0, 1] == 0.0


def test_assign_to_exemplars_in_blocks_matches_one_block():
    rng = np.random.default_rng(3)
    x, ex = rng.normal(size=(50, 4)), rng.normal(size=(5, 4))
    full = assign_to_exemplars(x, ex, "neg_sq_euclidean", block=1000)
    small = assign_to_exemplars(x, ex, "neg_sq_euclidean", block=7)
    np.testing.assert_array_equal(full, small)
    direct = ((x[:, None, :] - ex[None, :, :]) ** 2).sum(-1).argmin(axis=1)
    np.testing.assert_array_equal(full, direct)


# ------------------------------------------------------------------------------------------
# cluster_attributes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["none", "preference", "duplicate"])
def test_finds_the_blobs(blobs, weighting):
    x, truth, counts = blobs
    res = cluster_attributes(x, counts, frequency_weighting=weighting, preference_percentile=10.0)
    assert len(res.exemplars) == N_BLOBS
    assert res.labels.shape == (len(x),)
    assert set(res.labels.tolist()) == set(range(N_BLOBS))
    assert _same_partition(res.labels, truth)
    # one exemplar per blob, and each exemplar labels itself
    assert sorted(truth[res.exemplars].tolist()) == list(range(N_BLOBS))
    np.testing.assert_array_equal(res.labels[res.exemplars], np.arange(len(res.exemplars)))
    assert res.info["converged"] is True


def test_duplicate_weighting_repeats_points(blobs):
    x, _, counts = blobs
    res = cluster_attributes(x, counts, frequency_weighting="duplicate", preference_percentile=10.0)
    expected = int(np.maximum(1, np.rint(np.log1p(counts))).sum())
    assert res.info["points"] == expected > len(x)
    assert len(set(res.exemplars.tolist())) == len(res.exemplars)  # duplicates collapse


def test_finds_the_blobs_with_cosine():
    rng = np.random.default_rng(5)
    dirs = np.eye(DIM)[:N_BLOBS] * 10
    x = np.concatenate([d + rng.normal(scale=0.5, size=(PER_BLOB, DIM)) for d in dirs])
    truth = np.repeat(np.arange(N_BLOBS), PER_BLOB)
    res = cluster_attributes(x, np.ones(len(x)), similarity="cosine", frequency_weighting="none",
                             preference_percentile=10.0)
    assert len(res.exemplars) == N_BLOBS
    assert _same_partition(res.labels, truth)


@pytest.mark.parametrize("weighting", ["preference", "duplicate"])
def test_max_points_bound_every_point_labelled_and_tail_lands_with_its_blob(blobs, weighting):
    x, truth, _ = blobs
    # counts make the most frequent 40 points (the core) span all four blobs
    counts = np.array([100.0 - (i % PER_BLOB) for i in range(len(x))])
    res = cluster_attributes(x, counts, frequency_weighting=weighting, preference_percentile=10.0, max_points=40)
    assert res.info["clustered_attributes"] < len(x)
    assert res.info["assigned_attributes"] == len(x) - res.info["clustered_attributes"]
    assert res.labels.shape == (len(x),)
    assert (res.labels >= 0).all() and (res.labels < len(res.exemplars)).all()
    assert _same_partition(res.labels, truth)
    core = np.argsort(-counts, kind="stable")[: res.info["clustered_attributes"]]
    assert set(res.exemplars.tolist()) <= set(core.tolist())  # exemplars come from the core


def test_higher_preference_percentile_gives_at_least_as_many_clusters():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 8))
    counts = np.ones(len(x))
    n = [len(cluster_attributes(x, counts, frequency_weighting="none", preference_percentile=p).exemplars)
         for p in (1.0, 25.0, 75.0, 99.0)]
    assert n == sorted(n)
    assert n[-1] > n[0]


def test_preference_weighting_favours_frequent_exemplars():
    # two tight pairs: the more frequent point of each pair should be its exemplar
    x = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0]])
    counts = np.array([1.0, 100.0, 100.0, 1.0])
    res = cluster_attributes(x, counts, frequency_weighting="preference", preference_percentile=50.0,
                             preference_weight=0.05)
    assert sorted(res.exemplars.tolist()) == [1, 2]


def test_single_point_and_empty_input():
    res = cluster_attributes(np.ones((1, 3)), np.array([5.0]))
    assert res.labels.tolist() == [0] and res.exemplars.tolist() == [0]
    with pytest.raises(ValueError):
        cluster_attributes(np.zeros((0, 3)), np.zeros(0))


def test_deterministic(blobs):
    x, _, counts = blobs
    a = cluster_attributes(x, counts, preference_percentile=10.0, seed=0)
    b = cluster_attributes(x, counts, preference_percentile=10.0, seed=0)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.exemplars, b.exemplars)
