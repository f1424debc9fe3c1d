"""UMAP reducer: subsample fit; placement by nearest fitted windows and by UMAP's transform, which
agree; transform in process and on a real Dask cluster."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellmi.analyze.mixture import assign, fit_mixture, most_probable
from cellmi.analyze.reduce import embed, fit_reducer, membership, nearest_fitted, place, subsample_index
from cellmi.errors import UserError
from cellmi.settings import Settings


def _blobs(n_per: int = 100, k: int = 3, dim: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, dim)) * 5
    truth = np.repeat(np.arange(k), n_per)
    return (centres[truth] + rng.normal(size=(len(truth), dim))).astype(np.float32), truth


@pytest.fixture(scope="module")
def fitted():
    x, truth = _blobs()
    reducer = fit_reducer(
        x, dim=4, neighbors=10, min_dist=0.0, seed=0, subsample_above=100, subsample_size=90
    )
    return x, truth, reducer


def test_subsample_index_is_seeded_and_sorted():
    assert subsample_index(50, 100, 10, 0).tolist() == list(range(50))
    a, b = subsample_index(1000, 100, 40, 7), subsample_index(1000, 100, 40, 7)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 40 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, subsample_index(1000, 100, 40, 8))


@pytest.mark.parametrize("placement", ["knn", "umap"])
def test_subsample_fit_places_the_rest_consistently(fitted, placement):
    x, truth, reducer = fitted
    assert len(reducer.fit_rows) == 90
    z = embed(reducer, x, chunk=50, placement=placement)
    index = subsample_index(len(x), 100, 90, 0)
    np.testing.assert_array_equal(z[index], reducer.fit_embedding)  # fitted windows keep their place
    np.testing.assert_allclose(embed(reducer, x, chunk=5000, placement=placement), z)  # any chunk size
    np.testing.assert_allclose(embed(reducer, x[::-1], chunk=37, placement=placement), z[::-1])  # any order
    labels, _ = assign(fit_mixture(reducer.fit_embedding, 3, seed=0), z)
    assert pd.crosstab(labels, truth).to_numpy().max(axis=0).sum() == len(x)


def _touching_blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four 10-d Gaussian blobs whose tails overlap, so that placement decides some windows."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, n)
    centres = rng.normal(size=(4, 10)) * 1.6
    return (centres[truth] + rng.normal(size=(n, 10))).astype(np.float32), truth


def test_knn_placement_agrees_with_umap_transform():
    """Same clusters for nearly every window (the neighbours' vote against the mixture at transform's
    place), and each window placed near where transform puts it."""
    from sklearn.metrics import adjusted_rand_score

    x, truth = _touching_blobs(1200)
    reducer = fit_reducer(x, dim=4, neighbors=15, min_dist=0.0, seed=0, subsample_above=600, subsample_size=600)
    gmm = fit_mixture(reducer.fit_embedding, 4, seed=0)
    knn, proba = place(reducer, x, placement="knn", carry=gmm.predict_proba(reducer.fit_embedding))
    umap = embed(reducer, x, placement="umap")
    voted, by_transform = most_probable(proba)[0], assign(gmm, umap)[0]
    assert adjusted_rand_score(voted, by_transform) >= 0.9
    assert adjusted_rand_score(truth, voted) >= adjusted_rand_score(truth, by_transform) - 0.02
    spread = np.linalg.norm(reducer.fit_embedding - reducer.fit_embedding.mean(axis=0), axis=1).mean()
    assert np.median(np.linalg.norm(knn - umap, axis=1)) < 0.1 * spread
    # the check can fail: placing every window at a random fitted window's spot is far off
    shuffled = reducer.fit_embedding[np.random.default_rng(0).integers(0, 600, len(x))]
    assert np.median(np.linalg.norm(shuffled - umap, axis=1)) > 0.5 * spread


def test_the_vote_carries_the_fitted_windows_values(fitted):
    """Fitted windows keep their own values; a placed one gets its neighbours' weighted mean."""
    x, _, reducer = fitted
    values = np.random.default_rng(0).random((len(reducer.fit_rows), 3))
    _, carried = place(reducer, x, placement="knn", carry=values)
    index = subsample_index(len(x), 100, 90, 0)
    np.testing.assert_allclose(carried[index], values)
    rest = np.setdiff1d(np.arange(len(x)), index)
    indices, dists = nearest_fitted(reducer, reducer.scale(x[rest]), 10)
    weights = membership(dists)
    want = (weights[:, :, None] * values[indices]).sum(axis=1) / weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(carried[rest], want, rtol=1e-5)
    assert place(reducer, x, placement="umap", carry=values)[1] is None


def test_membership_weights_fall_with_distance_like_umaps():
    """umap-learn's weights for a new point: exp(-d / sigma), sigma set so that the weights past the
    first sum to log2(k) (umap-learn's ``smooth_knn_dist`` skips the first neighbour)."""
    dists = np.array([[0.5, 1.0, 1.5, 3.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    weights = membership(dists)
    assert np.all(np.diff(weights[0]) < 0) and np.allclose(weights[1], weights[1, 0])
    np.testing.assert_allclose(weights[:, 1:].sum(axis=1), np.log2(4), rtol=1e-3)


def test_nearest_fitted_windows_are_exact(fitted):
    """The same neighbours and distances as sklearn's exhaustive search."""
    from sklearn.neighbors import NearestNeighbors

    x, _, reducer = fitted
    rows = reducer.scale(x + np.random.default_rng(1).normal(size=x.shape))
    indices, dists = nearest_fitted(reducer, rows, 10)
    want_d, want_i = NearestNeighbors(n_neighbors=10).fit(reducer.fit_rows).kneighbors(rows)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(dists, want_d, rtol=1e-4, atol=1e-4)


def test_placement_is_a_setting():
    assert Settings().cluster.placement == "knn"
    assert Settings(cluster={"placement": "umap"}).cluster.placement == "umap"
    with pytest.raises(ValueError, match="placement"):
        Settings(cluster={"placement": "nearest"})


@pytest.mark.slow  # a worker process imports and compiles umap: ~25 s
def test_dask_transform_equals_in_process(fitted):
    from distributed import Client, LocalCluster

    x, _, reducer = fitted
    expected = embed(reducer, x, chunk=40, placement="umap")
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        got = embed(reducer, x, client=client, chunk=40, placement="umap")
    np.testing.assert_allclose(got, expected)


def test_too_few_windows_is_a_user_error():
    with pytest.raises(UserError, match="at least 3 windows"):
        fit_reducer(np.zeros((2, 4), np.float32), 2, 15, 0.0, 0, 100, 100)
