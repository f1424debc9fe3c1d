"""UMAP reducer: subsample fit, chunked placement in process and on a real Dask cluster."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellmi.analyze.mixture import assign, fit_mixture
from cellmi.analyze.reduce import embed, fit_reducer, subsample_index
from cellmi.errors import UserError


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


def test_subsample_fit_places_the_rest_consistently(fitted):
    x, truth, reducer = fitted
    assert len(reducer.fit_rows) == 90
    z = embed(reducer, x, chunk=50)
    index = subsample_index(len(x), 100, 90, 0)
    np.testing.assert_array_equal(z[index], reducer.fit_embedding)  # fitted windows keep their place
    np.testing.assert_allclose(embed(reducer, x, chunk=5000), z)  # independent of the chunk size
    np.testing.assert_allclose(embed(reducer, x[::-1], chunk=37), z[::-1])  # and of the row order
    labels, _ = assign(fit_mixture(reducer.fit_embedding, 3, seed=0), z)
    assert pd.crosstab(labels, truth).to_numpy().max(axis=0).sum() == len(x)


@pytest.mark.slow  # a worker process imports and compiles umap: ~25 s
def test_dask_placement_equals_in_process(fitted):
    from distributed import Client, LocalCluster

    x, _, reducer = fitted
    expected = embed(reducer, x, chunk=40)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        got = embed(reducer, x, client=client, chunk=40)
    np.testing.assert_allclose(got, expected)


def test_too_few_windows_is_a_user_error():
    with pytest.raises(UserError, match="at least 3 windows"):
        fit_reducer(np.zeros((2, 4), np.float32), 2, 15, 0.0, 0, 100, 100)
