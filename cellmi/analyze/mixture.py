"""Gaussian mixtures on the embedding: fixed or BIC-chosen size, window labels, image votes."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from cellmi.errors import UserError
from cellmi.log import log


def fit_mixture(z: np.ndarray, k: int, seed: int, n_init: int = 3) -> GaussianMixture:
    """A full-covariance mixture of ``k`` components fitted to (N, D) points."""
    if k > len(z):
        raise UserError(f"CELLMI_CLUSTER__N_CLUSTERS: {k} clusters but only {len(z)} windows")
    return GaussianMixture(
        n_components=k, covariance_type="full", n_init=n_init, random_state=seed, reg_covar=1e-5
    ).fit(z)


def select_by_bic(
    z: np.ndarray, k_min: int, k_max: int, seed: int
) -> tuple[GaussianMixture, dict[int, float]]:
    """The mixture with the lowest BIC over k in [k_min, k_max] (capped by the point count).

    Returns the best mixture and ``{k: bic}`` for every k tried.
    """
    k_max = min(k_max, len(z) - 1)
    if k_max < k_min:
        raise UserError(f"CELLMI_CLUSTER__BIC_MIN: {k_min} components need more than {len(z)} windows")
    best, scores = None, {}
    for k in range(k_min, k_max + 1):
        gmm = fit_mixture(z, k, seed)
        scores[k] = float(gmm.bic(z))
        if best is None or scores[k] < scores[best.n_components]:
            best = gmm
    assert best is not None
    log.info("BIC chose %d components (range %d-%d)", best.n_components, k_min, k_max)
    return best, scores


def most_agreed(labelings: list[np.ndarray]) -> int:
    """Index of the labeling (of the same items) with the highest mean adjusted Rand index against
    the others: the partition the restarts agree on, not an unlucky one. Ties go to the first."""
    if len(labelings) < 3:
        return 0  # two labelings agree with each other equally
    agree = [
        np.mean([adjusted_rand_score(a, b) for j, b in enumerate(labelings) if j != i])
        for i, a in enumerate(labelings)
    ]
    return int(np.argmax(agree))


def assign(gmm: GaussianMixture, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) points -> cluster id (N,) int and its posterior probability (N,) float32."""
    return most_probable(gmm.predict_proba(z))


def most_probable(proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) cluster probabilities -> the most probable cluster (N,) int and its probability (N,) float32."""
    labels = proba.argmax(axis=1)
    return labels.astype(np.int64), proba[np.arange(len(proba)), labels].astype(np.float32)


def vote(table: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """Majority window cluster per field.

    ``table`` has one row per window with ``sample`` and ``field``; returns one row per field
    (sorted by sample, field) with ``sample, field, cluster, share, n_windows``; ties go to the
    smaller cluster id.
    """
    frame = pd.DataFrame(
        {
            "sample": table["sample"].to_numpy(),
            "field": table["field"].to_numpy(),
            "cluster": np.asarray(labels),
        }
    )
    counts = frame.groupby(["sample", "field", "cluster"], sort=True).size().rename("count").reset_index()
    totals = counts.groupby(["sample", "field"])["count"].transform("sum")
    counts["share"] = counts["count"] / totals
    counts["n_windows"] = totals
    best = counts.sort_values(["sample", "field", "count", "cluster"], ascending=[True, True, False, True])
    best = best.drop_duplicates(["sample", "field"]).reset_index(drop=True)
    return best[["sample", "field", "cluster", "share", "n_windows"]]


def nearest_to_centre(
    gmm: GaussianMixture, z: np.ndarray, labels: np.ndarray, count: int
) -> dict[int, np.ndarray]:
    """Per cluster, row indices of up to ``count`` of its points closest to its mean (Euclidean)."""
    out = {}
    for k in range(gmm.n_components):
        rows = np.flatnonzero(labels == k)
        dist = np.linalg.norm(z[rows] - gmm.means_[k], axis=1)
        out[k] = rows[np.argsort(dist, kind="stable")[:count]]
    return out
