"""UMAP of window vectors: seeded fit on (a subsample of) the windows, chunked assignment of the rest.

Vectors are standardised per feature first (the baselines mix intensities, fractions and
texture on very different scales). Above a size threshold the UMAP is fitted on a seeded
subsample and every other window is placed with ``transform`` in fixed-size chunks, on a Dask
cluster when a client is given. With a fixed seed umap-learn gives each new point its own
random stream, and an anchor row pins the per-call weight scale (see ``_transform_chunk``), so a
window's embedding does not depend on the chunk it lands in; windows that were part of the fit
keep their fitted coordinates (looked up by value).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.preprocessing import StandardScaler

from cellmi.errors import UserError
from cellmi.log import log
from cellmi.watchdog import gather

# umap-learn picks fewer transform epochs above 10,000 points per call; stay below it so the
# result does not depend on the chunk size.
CHUNK = 5000


@dataclass
class Reducer:
    """A fitted standardiser + UMAP and the (scaled) rows it was fitted on with their embedding."""

    scaler: StandardScaler
    model: Any
    fit_rows: np.ndarray  # (n_fit, F) float32, scaled
    fit_embedding: np.ndarray  # (n_fit, D) float32

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
) -> Reducer:
    """Fit standardiser + UMAP on (N, F) vectors, or on a seeded subsample when N > subsample_above."""
    index = subsample_index(len(x), subsample_above, subsample_size, seed)
    scaler = StandardScaler().fit(np.asarray(x[index], np.float32))
    rows = np.ascontiguousarray(scaler.transform(np.asarray(x[index], np.float32)), dtype=np.float32)
    model = make_umap(dim, neighbors, min_dist, seed, len(rows))
    log.info("UMAP: fitting %d-d on %d of %d windows", dim, len(rows), len(x))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        embedding = model.fit_transform(rows)
    return Reducer(scaler, model, rows, np.asarray(embedding, np.float32))


def _transform_chunk(model: Any, rows: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """(n, F) scaled rows -> (n, D), placed by ``model.transform``.

    umap-learn scales a call's edge weights by the call's largest weight. ``anchor`` is a copy of
    a fitted row: its nearest neighbour is itself at distance 0, weight exactly 1, the largest
    possible, so with it in every chunk a window's placement does not depend on its chunk.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        return np.asarray(model.transform(np.vstack([anchor[None], rows])), np.float32)[1:]


def fitted_lookup(reducer: Reducer, rows: np.ndarray) -> np.ndarray:
    """(N,) index into the fitted rows for scaled (N, F) rows that were part of the fit, else -1."""
    known = {row.tobytes(): i for i, row in enumerate(reducer.fit_rows)}
    return np.fromiter((known.get(row.tobytes(), -1) for row in rows), dtype=np.int64, count=len(rows))


def embed(reducer: Reducer, x: np.ndarray, client: Any = None, chunk: int = CHUNK) -> np.ndarray:
    """(N, F) raw vectors -> (N, D) embedding: fitted rows as fitted, the rest by chunked ``transform``.

    With a Dask ``client`` the chunks run as tasks on its workers, else in this process; both give
    the same numbers.
    """
    rows = reducer.scale(x)
    out = np.empty((len(rows), reducer.dim), np.float32)
    found = fitted_lookup(reducer, rows)
    out[found >= 0] = reducer.fit_embedding[found[found >= 0]]
    todo = np.flatnonzero(found < 0)
    if not len(todo):
        return out
    pieces = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    log.info("UMAP: placing %d windows in %d chunks%s", len(todo), len(pieces), " on Dask" if client else "")
    anchor = reducer.fit_rows[0]
    if client is None:
        results = [_transform_chunk(reducer.model, rows[p], anchor) for p in pieces]
    else:
        model = client.scatter(reducer.model, broadcast=True)
        n = len(pieces)
        futures = client.map(
            _transform_chunk, [model] * n, [rows[p] for p in pieces], [anchor] * n, pure=False
        )
        results = gather(futures, f"the Dask cluster {client.scheduler.address}")
    for piece, result in zip(pieces, results, strict=True):
        out[piece] = result
    return out


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
        return index, np.asarray(model.fit_transform(rows), np.float32)
