"""UMAP of window vectors: seeded fit on (a subsample of) the windows, placement of the rest.

Vectors are standardised per feature first (the baselines mix intensities, fractions and
texture on very different scales). Above a size threshold the UMAP is fitted on a seeded
subsample and every other window is placed in the fitted embedding, by one of two methods:

- ``knn`` (default): the weighted mean of the embedding of the window's ``n_neighbors`` nearest
  fitted windows, with UMAP's own membership weights. This is how umap-learn's ``transform``
  starts; it leaves out the optimisation epochs that follow, which cost about 0.5 ms per window
  (510 of 540 s for 10^6 windows) and move points by a fraction of a cluster's width.
- ``umap``: umap-learn's ``transform``, in fixed-size chunks, on a Dask cluster when a client is
  given. With a fixed seed umap-learn gives each new point its own random stream, and an anchor
  row pins the per-call weight scale (see ``_transform_chunk``), so a window's embedding does
  not depend on the chunk it lands in.

Both place each window independently of the others; windows that were part of the fit keep
their fitted coordinates (looked up by value).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.preprocessing import StandardScaler

from cellmi.errors import UserError
from cellmi.log import log
from cellmi.watchdog import gather

# umap-learn picks fewer transform epochs above 10,000 points per call; stay below it so the
# result does not depend on the chunk size.
CHUNK = 5000
# Rows per block of k-nearest-neighbour placement: bounds the (rows, k, D) gather to ~100 MB.
KNN_BLOCK = 65_536
Placement = Literal["knn", "umap"]


@dataclass
class Reducer:
    """A fitted standardiser + UMAP and the (scaled) rows it was fitted on with their embedding."""

    scaler: StandardScaler
    model: Any
    fit_rows: np.ndarray  # (n_fit, F) float32, scaled
    fit_embedding: np.ndarray  # (n_fit, D) float32
    sparse: bool = False  # the model was fitted on the rows as a sparse matrix (see fit_reducer)

    @property
    def dim(self) -> int:
        return int(self.fit_embedding.shape[1])

    def scale(self, x: np.ndarray) -> np.ndarray:
        """(N, F) raw vectors -> (N, F) float32 standardised with the fitted statistics."""
        return np.ascontiguousarray(self.scaler.transform(np.asarray(x, np.float32)), dtype=np.float32)


def subsample_index(n: int, above: int, size: int, seed: int) -> np.ndarray:
    """Sorted row indices to fit on: all ``n`` rows, or a seeded ``size`` of them when ``n > above``."""
    if n <= above:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def make_umap(dim: int, neighbors: int, min_dist: float, seed: int, n: int) -> Any:
    """A seeded UMAP; ``neighbors`` is capped below the number of points ``n``."""
    import umap  # slow import (numba); only jobs that cluster pay for it

    if n < 3:
        raise UserError(f"UMAP needs at least 3 windows to fit, got {n}")
    return umap.UMAP(
        n_components=dim,
        n_neighbors=min(neighbors, n - 1),
        min_dist=min_dist,
        random_state=seed,
        n_jobs=1,
        low_memory=True,
    )


def fit_reducer(
    x: np.ndarray,
    dim: int,
    neighbors: int,
    min_dist: float,
    seed: int,
    subsample_above: int,
    subsample_size: int,
    umap_seed: int | None = None,
) -> Reducer:
    """Fit standardiser + UMAP on (N, F) vectors, or on a seeded subsample when N > subsample_above.

    ``seed`` draws the subsample and, unless ``umap_seed`` is given, seeds UMAP (restarts fit the
    same rows under other UMAP seeds).
    """
    index = subsample_index(len(x), subsample_above, subsample_size, seed)
    scaler = StandardScaler().fit(np.asarray(x[index], np.float32))
    rows = np.ascontiguousarray(scaler.transform(np.asarray(x[index], np.float32)), dtype=np.float32)
    model = make_umap(dim, neighbors, min_dist, seed if umap_seed is None else umap_seed, len(rows))
    log.info("UMAP: fitting %d-d on %d of %d windows", dim, len(rows), len(x))
    # On a subsample umap-learn gets the rows as a sparse matrix: below 4,096 rows it then takes all
    # distances from sklearn's vectorised euclidean instead of calling its numba metric once per pair
    # from Python (4,000 rows: 8 s instead of 17 s, and no compilation of that path; the clusters
    # agree, ARI 0.995). Fits on every window keep the dense input, and their results.
    sparse = len(index) < len(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        embedding = model.fit_transform(csr_matrix(rows) if sparse else rows)
    return Reducer(scaler, model, rows, np.asarray(embedding, np.float32), sparse)


def _transform_chunk(model: Any, rows: np.ndarray, anchor: np.ndarray, sparse: bool = False) -> np.ndarray:
    """(n, F) scaled rows -> (n, D), placed by ``model.transform``.

    umap-learn scales a call's edge weights by the call's largest weight. ``anchor`` is a copy of
    a fitted row: its nearest neighbour is itself at distance 0, weight exactly 1, the largest
    possible, so with it in every chunk a window's placement does not depend on its chunk.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        stacked = np.vstack([anchor[None], rows])
        return np.asarray(model.transform(csr_matrix(stacked) if sparse else stacked), np.float32)[1:]


def fitted_lookup(reducer: Reducer, rows: np.ndarray) -> np.ndarray:
    """(N,) index into the fitted rows for scaled (N, F) rows that were part of the fit, else -1."""
    known = {row.tobytes(): i for i, row in enumerate(reducer.fit_rows)}
    return np.fromiter((known.get(row.tobytes(), -1) for row in rows), dtype=np.int64, count=len(rows))


def nearest_fitted(reducer: Reducer, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) scaled rows -> indices (N, k) of their nearest fitted rows and the distances (N, k).

    Exact search (faiss's flat index: 1.8x sklearn's brute force on one core).
    """
    import faiss

    index = faiss.IndexFlatL2(reducer.fit_rows.shape[1])
    index.add(np.ascontiguousarray(reducer.fit_rows, np.float32))
    squared, indices = index.search(np.ascontiguousarray(rows, np.float32), k)
    return indices.astype(np.int64), np.sqrt(np.maximum(squared, 0.0))


def membership(dists: np.ndarray) -> np.ndarray:
    """(N, k) distances to the nearest fitted rows -> (N, k) UMAP membership weights.

    As umap-learn's ``transform``: a per-row bandwidth from ``smooth_knn_dist`` (local connectivity
    0), weight ``exp(-d / sigma)``.
    """
    from umap.umap_ import smooth_knn_dist

    dists = np.ascontiguousarray(dists, np.float32)
    sigmas, rhos = smooth_knn_dist(dists, float(dists.shape[1]), local_connectivity=0.0)
    gap = np.maximum(dists - rhos[:, None], 0.0)
    return np.exp(-gap / np.maximum(sigmas[:, None], 1e-12))


def place_knn(
    reducer: Reducer, rows: np.ndarray, carry: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, F) scaled rows -> (N, D): weighted mean of the embedding of their nearest fitted rows;
    with ``carry`` (n_fit, K) values of the fitted rows, also (N, K): the same weighted mean of those."""
    k = min(int(reducer.model.n_neighbors), len(reducer.fit_rows))
    out = np.empty((len(rows), reducer.dim), np.float32)
    carried = None if carry is None else np.empty((len(rows), carry.shape[1]), np.float64)
    for start in range(0, len(rows), KNN_BLOCK):
        block = slice(start, start + KNN_BLOCK)
        indices, dists = nearest_fitted(reducer, rows[block], k)
        weights = membership(dists)
        weights /= weights.sum(axis=1, keepdims=True)
        out[block] = np.einsum("nk,nkd->nd", weights, reducer.fit_embedding[indices])
        if carried is not None:
            carried[block] = np.einsum("nk,nkc->nc", weights, carry[indices])
    return out, carried


def place_umap(reducer: Reducer, rows: np.ndarray, client: Any = None, chunk: int = CHUNK) -> np.ndarray:
    """(N, F) scaled rows -> (N, D) by umap-learn's ``transform`` in chunks, on Dask when given a client."""
    pieces = [np.arange(i, min(i + chunk, len(rows))) for i in range(0, len(rows), chunk)]
    anchor = reducer.fit_rows[0]
    sparse = reducer.sparse
    if client is None:
        results = [_transform_chunk(reducer.model, rows[p], anchor, sparse) for p in pieces]
    else:
        model = client.scatter(reducer.model, broadcast=True)
        n = len(pieces)
        futures = client.map(
            _transform_chunk, [model] * n, [rows[p] for p in pieces], [anchor] * n, [sparse] * n, pure=False
        )
        results = gather(futures, f"the Dask cluster {client.scheduler.address}")
    return np.concatenate(results) if results else np.zeros((0, reducer.dim), np.float32)


def place(
    reducer: Reducer,
    x: np.ndarray,
    client: Any = None,
    chunk: int = CHUNK,
    placement: Placement = "knn",
    carry: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, F) raw vectors -> (N, D) embedding: fitted rows as fitted, the rest placed by ``placement``.

    ``knn`` runs in this process (``client`` unused); ``umap`` runs ``transform`` in chunks of
    ``chunk`` rows, as Dask tasks with a ``client``, else here; both give the same numbers.
    ``carry`` (n_fit, K), values of the fitted rows (e.g. their mixture posteriors), comes back as
    (N, K) with ``knn``: fitted rows keep theirs, the others get their neighbours' weighted mean (a
    nearest-neighbour vote); with ``umap`` None (the caller derives them from the embedding).
    """
    rows = reducer.scale(x)
    out = np.empty((len(rows), reducer.dim), np.float32)
    found = fitted_lookup(reducer, rows)
    known = found >= 0
    out[known] = reducer.fit_embedding[found[known]]
    carried = None
    if carry is not None and placement == "knn":
        carried = np.empty((len(rows), carry.shape[1]), np.float64)
        carried[known] = carry[found[known]]
    todo = np.flatnonzero(~known)
    if not len(todo):
        return out, carried
    where = " on Dask" if client is not None and placement == "umap" else ""
    log.info("UMAP: placing %d windows (%s)%s", len(todo), placement, where)
    if placement == "knn":
        out[todo], votes = place_knn(reducer, rows[todo], carry)
        if carried is not None:
            carried[todo] = votes
    else:
        out[todo] = place_umap(reducer, rows[todo], client, chunk)
    return out, carried


def embed(
    reducer: Reducer, x: np.ndarray, client: Any = None, chunk: int = CHUNK, placement: Placement = "knn"
) -> np.ndarray:
    """(N, F) raw vectors -> (N, D) embedding (see :func:`place`)."""
    return place(reducer, x, client, chunk, placement)[0]


def embed_2d(x: np.ndarray, neighbors: int, seed: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D UMAP of at most ``cap`` seeded rows of (N, F) vectors, for figures.

    Returns (index (M,), embedding (M, 2)); the rows are standardised first.
    """
    index = subsample_index(len(x), cap, cap, seed)
    if len(index) < 3:
        return index, np.zeros((len(index), 2), np.float32)
    rows = StandardScaler().fit_transform(np.asarray(x[index], np.float32)).astype(np.float32)
    model = make_umap(2, neighbors, 0.1, seed, len(rows))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        return index, np.asarray(model.fit_transform(csr_matrix(rows)), np.float32)  # sparse: see fit_reducer
