"""Image-level profiles: window vectors aggregated per field, standardised, PCA, clustered.

This is how image-based profiling summarises a well or field: one vector per field (the mean or
median of its windows), features standardised across fields (z-scores, or normal scores of their
ranks, which an outlying field cannot stretch), a few principal components, then spectral
clustering of the fields' nearest-neighbour graph (default), Ward linkage or a mixture. New fields
are assigned to the nearest cluster centroid; fields that were part of the fit keep their fitted
label (looked up by value), so re-applying a saved model to the same data gives the same labels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm
from sklearn.cluster import AgglomerativeClustering, SpectralClustering
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import QuantileTransformer, StandardScaler

# How evenly ``even`` spreads the windows' say over a field's pixels: the ridge of the least-squares
# fit, in units of the window edge. Smaller evens out more but leans on fewer windows (the corner ones).
# Development draws 1-4 (benchmarks/bench_profiles.py, 12 runs, 256-px windows on 512-px fields),
# all-sample image ARI: 0.907 not evened; ridge 0.12: 0.933, 0.25: 0.939, 0.5: 0.944, 1: 0.930, 2: 0.917.
EVEN_RIDGE = 0.5


def axis_weights(starts: np.ndarray, window: int, ridge: float = EVEN_RIDGE) -> np.ndarray:
    """Weights (S,) for windows of edge ``window`` starting at ``starts`` along one axis, so that
    the weights of the windows covering a pixel add up to about the same for every pixel.

    Overlapping windows cover a field's middle many times and its edges once (with a window of half
    the field, the centre pixel is in every window, a corner pixel in one); plain means therefore
    describe the middle of a field. The weights solve a ridge least-squares fit of equal coverage
    (ridge ``ridge * window``, which keeps them from resting on the edge windows alone); the
    largest is 1.
    """
    starts = np.unique(np.asarray(starts, np.int64))
    pixels = np.arange(starts[0], starts[-1] + window)
    cover = ((pixels[:, None] >= starts[None]) & (pixels[:, None] < starts[None] + window)).astype(np.float64)
    gram = cover.T @ cover + ridge * window * np.eye(len(starts))
    weights = np.maximum(np.linalg.solve(gram, cover.sum(axis=0)), 0.0)
    return weights / max(float(weights.max()), 1e-12)


def coverage_weights(table: pd.DataFrame, window: int, ridge: float = EVEN_RIDGE) -> np.ndarray:
    """(N,) weight of each window (rows with ``y``, ``x`` corners) that evens out pixel coverage."""
    weights = []
    for axis in ("y", "x"):
        at = table[axis].to_numpy(np.int64)
        starts = np.unique(at)
        weights.append(axis_weights(starts, window, ridge)[np.searchsorted(starts, at)])
    return weights[0] * weights[1]


def field_codes(table: pd.DataFrame) -> tuple[np.ndarray, pd.Index]:
    """Each window's field as a code (fields sorted by sample, then field) and the fields' keys."""
    keys = table["sample"].astype(str) + "\x00" + table["field"].astype(str)
    return pd.factorize(keys, sort=True)


def field_profiles(
    table: pd.DataFrame, x: np.ndarray, how: str = "mean", density: bool = False, window: int | None = None,
    ridge: float = EVEN_RIDGE,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Aggregate (N, F) window vectors per field: ``mean``, ``median``, ``weighted`` (a mean
    weighted by each window's ``fg_fraction``, so windows mostly of background count less) or
    ``even`` (weighted, and each window's weight also times ``coverage_weights`` for windows of
    edge ``window``, so that every part of the field has about the same say).

    ``table`` has one row per window with ``sample``, ``field``, ``split`` and ``fg_fraction``, and
    may have ``cover``: the share of the window's field that its foreground mask covers.
    Returns the fields (one row each, sorted by sample then field: ``sample, field, split,
    n_windows, fg_share[, cover]``, ``fg_share`` the mean foreground fraction of the field's kept
    windows) and their profiles (n_fields, F) float32, or (n_fields, F + 1) with ``density``, the
    last column then the field's ``cover`` (``fg_share`` where the table has no cover: a rougher
    measure of density, as windows of little foreground were dropped before).
    """
    codes, uniques = field_codes(table)
    values = np.asarray(x, np.float64)
    if how in ("weighted", "even"):
        weight = np.maximum(table["fg_fraction"].to_numpy(np.float64), 1e-6)[:, None]
        if how == "even":
            if window is None:
                raise ValueError("aggregation 'even' needs the window edge")
            weight = weight * np.maximum(coverage_weights(table, window, ridge), 1e-6)[:, None]
        sums = pd.DataFrame(values * weight).groupby(codes, sort=True).sum().to_numpy()
        profiles = (sums / pd.Series(weight[:, 0]).groupby(codes, sort=True).sum().to_numpy()[:, None])
        profiles = profiles.astype(np.float32)
    else:
        grouped = pd.DataFrame(values).groupby(codes, sort=True)
        profiles = (grouped.median() if how == "median" else grouped.mean()).to_numpy(np.float32)
    first = pd.Series(np.arange(len(codes))).groupby(codes, sort=True).first().to_numpy()
    share = pd.Series(table["fg_fraction"].to_numpy(np.float64)).groupby(codes, sort=True).mean().to_numpy()
    fields = pd.DataFrame(
        {
            "sample": table["sample"].to_numpy()[first],
            "field": table["field"].to_numpy()[first],
            "split": table["split"].to_numpy()[first],
            "n_windows": np.bincount(codes, minlength=len(uniques)),
            "fg_share": share.astype(np.float32),
        }
    )
    if "cover" in table:
        fields["cover"] = table["cover"].to_numpy(np.float32)[first]
    if density:
        measure = fields["cover"] if "cover" in fields else fields["fg_share"]
        profiles = np.concatenate([profiles, measure.to_numpy(np.float32)[:, None]], axis=1)
    return fields, profiles


class RankScaler:
    """Each feature replaced by the normal score of its rank among the fitted fields.

    A fitted field of rank r (from 0) among m maps to the standard normal quantile at
    (r + 0.5) / m; new values are interpolated between the fitted ones and clipped to their range.
    """

    def fit(self, x: np.ndarray) -> RankScaler:
        self.m = len(x)
        self.quantiles = QuantileTransformer(n_quantiles=self.m, output_distribution="uniform").fit(x)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        uniform = self.quantiles.transform(np.asarray(x, np.float64))
        return norm.ppf((uniform * (self.m - 1) + 0.5) / self.m)


def make_scaler(scale: str) -> StandardScaler | RankScaler:
    if scale == "rank":
        return RankScaler()
    if scale == "standard":
        return StandardScaler()
    raise ValueError(f"unknown profile scaling {scale!r} (expected 'standard' or 'rank')")


@dataclass
class ProfileModel:
    """Standardiser + PCA of field profiles and the cluster centroids in PCA space."""

    scaler: StandardScaler | RankScaler
    pca: PCA | None
    centroids: np.ndarray  # (k, P)
    fit_rows: np.ndarray  # (n_fit, P) float32 reduced profiles of the fitted fields
    fit_labels: np.ndarray  # (n_fit,) their labels
    weights: np.ndarray | None = None  # (F,) each standardised feature's weight; None: all 1 (and no density column)

    def scale(self, profiles: np.ndarray) -> np.ndarray:
        """(M, F) -> (M, F) standardised (and weighted) profiles (the space retrieval metrics use)."""
        scaled = self.scaler.transform(np.asarray(profiles, np.float32))
        return (scaled if self.weights is None else scaled * self.weights).astype(np.float32)

    def reduce(self, profiles: np.ndarray) -> np.ndarray:
        """(M, F) -> (M, P) standardised and PCA-reduced profiles (the space that is clustered)."""
        scaled = self.scale(profiles)
        return (self.pca.transform(scaled) if self.pca is not None else scaled).astype(np.float32)


def fit_profiles(
    profiles: np.ndarray,
    k: int,
    dims: int,
    seed: int,
    method: str = "ward",
    scale: str = "standard",
    neighbors: int = 4,
    density: float = 0.0,
) -> tuple[ProfileModel, np.ndarray]:
    """Cluster (M, F) field profiles into at most ``min(k, M)`` groups; returns the model and (M,) labels.

    ``scale`` is ``standard`` (z-scores) or ``rank`` (normal scores of ranks); with ``density`` > 0
    the last column (the foreground share, see ``field_profiles``) counts that many times one
    standardised feature (its weight in the distances between fields) and the rest once. PCA keeps
    ``min(dims, M - 1, F)`` components (none when that is below 2). ``method`` is ``ward``,
    ``gmm`` or ``spectral``; ``neighbors`` is the spectral graph's neighbourhood, each field
    included in its own (the consensus of the sizes around it is taken).
    """
    profiles = np.asarray(profiles, np.float32)
    m = len(profiles)
    weights = None
    if density > 0:
        weights = np.ones(profiles.shape[1], np.float32)
        weights[-1] = density
    scaler = make_scaler(scale).fit(profiles)
    scaled = scaler.transform(profiles)
    if weights is not None:
        scaled = scaled * weights
    n_comp = min(dims, m - 1, profiles.shape[1])
    pca = PCA(n_components=n_comp, random_state=seed).fit(scaled) if n_comp >= 2 else None
    rows = (pca.transform(scaled) if pca is not None else scaled).astype(np.float32)
    labels = _cluster_rows(rows, max(1, min(k, m)), seed, method, neighbors)
    centroids = np.stack([rows[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    return ProfileModel(scaler, pca, centroids, rows, labels, weights), labels


def _cluster_rows(rows: np.ndarray, k: int, seed: int, method: str, neighbors: int) -> np.ndarray:
    """(M, P) -> (M,) labels 0..n-1 with n <= k, every label used."""
    if k == 1 or len(rows) < 2:
        return np.zeros(len(rows), np.int64)
    if method == "gmm":
        labels = GaussianMixture(k, covariance_type="diag", n_init=5, random_state=seed).fit_predict(rows)
    elif method == "spectral" and k < len(rows):
        labels = _spectral(rows, k, seed, neighbors)
    elif method in ("ward", "spectral"):
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(rows)
    else:
        raise ValueError(f"unknown profile clustering {method!r} (expected 'ward', 'gmm' or 'spectral')")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def _spectral(rows: np.ndarray, k: int, seed: int, neighbors: int) -> np.ndarray:
    """Consensus of spectral clusterings at ``neighbors`` - 1, ``neighbors`` and ``neighbors`` + 1.

    The neighbourhood is the one sensitive number of the graph; one training run can leave two
    samples linked at one size and apart at the next, so no single size is trusted alone.
    """
    sizes = sorted({max(2, neighbors - 1), max(2, neighbors), neighbors + 1})
    return consensus([_spectral_once(rows, k, seed, size) for size in sizes], k)


def _spectral_once(rows: np.ndarray, k: int, seed: int, neighbors: int) -> np.ndarray:
    model = SpectralClustering(
        k,
        affinity="nearest_neighbors",
        n_neighbors=max(2, min(neighbors, len(rows))),
        assign_labels="cluster_qr",
        random_state=seed,
    )
    with warnings.catch_warnings():
        # A graph that falls apart into groups of fields is the clear case, not a failure.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return model.fit_predict(rows)


# Up to this many items the consensus links items (an items x items matrix, ~0.25 s at 2,000);
# above it, groups of items that every labeling treats alike (a few per cluster), same linkage.
CONSENSUS_ITEMS = 2048


def consensus(labelings: list[np.ndarray], k: int) -> np.ndarray:
    """``k`` groups of the items that the labelings most often put together (average linkage on
    the share of labelings that separate two items).

    Items with the same label in every labeling are at distance 0 and merge first, so above
    ``CONSENSUS_ITEMS`` items the linkage starts from those groups, weighted by their size; the
    result is the same up to how ties between equally distant groups are broken.
    """
    stack = np.stack([np.asarray(labels) for labels in labelings], axis=1)  # (M, L)
    if len(stack) <= CONSENSUS_ITEMS:
        apart = 1.0 - (stack[:, None, :] == stack[None, :, :]).mean(axis=2)
        return AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(apart)
    groups, inverse, sizes = np.unique(stack, axis=0, return_inverse=True, return_counts=True)
    apart = 1.0 - (groups[:, None, :] == groups[None, :, :]).mean(axis=2)
    return weighted_average_linkage(apart, sizes, k)[inverse.ravel()]


def weighted_average_linkage(dist: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """(G, G) distances between groups of ``sizes`` (G,) items -> (G,) labels of ``k`` clusters.

    Average linkage (UPGMA) as if each group were its items: the two nearest clusters merge, and a
    merged cluster's distance to any other is the size-weighted mean of its parts' distances.
    """
    dist = np.array(dist, np.float64)
    np.fill_diagonal(dist, np.inf)
    weight = np.asarray(sizes, np.float64).copy()
    owner = np.arange(len(dist))
    for _ in range(len(dist) - k):
        i, j = sorted(divmod(int(np.argmin(dist)), len(dist)))
        merged = (weight[i] * dist[i] + weight[j] * dist[j]) / (weight[i] + weight[j])
        dist[i], dist[:, i] = merged, merged
        dist[i, i] = np.inf
        dist[j], dist[:, j] = np.inf, np.inf
        weight[i] += weight[j]
        owner[owner == j] = i
    return np.unique(owner, return_inverse=True)[1]


def assign_profiles(model: ProfileModel, profiles: np.ndarray) -> np.ndarray:
    """(M, F) profiles -> (M,) labels: fitted fields keep theirs, others go to the nearest centroid."""
    rows = model.reduce(profiles)
    dist = np.linalg.norm(rows[:, None, :] - model.centroids[None, :, :], axis=2)
    labels = dist.argmin(axis=1).astype(np.int64)
    known = {row.tobytes(): i for i, row in enumerate(model.fit_rows)}
    for i, row in enumerate(rows):
        j = known.get(row.tobytes())
        if j is not None:
            labels[i] = model.fit_labels[j]
    return labels


def align_labels(reference: np.ndarray, labels: np.ndarray, groups: int = 0) -> dict[int, int]:
    """A one-to-one relabelling of ``labels`` that best matches ``reference`` (Hungarian on overlap).

    Labels left without a partner get fresh ids after the largest reference id, as do the ids
    below ``groups`` that ``labels`` never shows (a group only the fitted fields fell in).
    """
    ref_ids, lab_ids = np.unique(reference), np.unique(labels)
    overlap = np.array([[np.sum((labels == a) & (reference == b)) for b in ref_ids] for a in lab_ids])
    rows, cols = linear_sum_assignment(-overlap)
    mapping = {int(lab_ids[r]): int(ref_ids[c]) for r, c in zip(rows, cols, strict=True)}
    fresh = int(ref_ids.max(initial=-1)) + 1
    for a in np.union1d(lab_ids, np.arange(groups)):
        if int(a) not in mapping:
            mapping[int(a)] = fresh
            fresh += 1
    return mapping


def relabel(
    model: ProfileModel, labels: np.ndarray, mapping: dict[int, int]
) -> tuple[ProfileModel, np.ndarray]:
    """Apply ``mapping`` (covering every group of the model) to labels, the model's fitted labels
    and the order of its centroids."""
    new = np.array([mapping[int(v)] for v in labels], np.int64)
    size = max(mapping.values()) + 1
    centroids = np.full((size, model.centroids.shape[1]), np.inf, np.float32)
    for old, target in mapping.items():
        centroids[target] = model.centroids[old]
    fit_labels = np.array([mapping[int(v)] for v in model.fit_labels], np.int64)
    return ProfileModel(model.scaler, model.pca, centroids, model.fit_rows, fit_labels, model.weights), new
