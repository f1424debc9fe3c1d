"""Scores of a clustering against known labels, and image-based-profiling retrieval metrics.

Clustering scores (ARI, NMI, purity, confusion table) compare predicted cluster ids with a
known grouping (sample or phenotype). Retrieval scores ask how well a field's profile finds the
other fields of its own sample: mean average precision as copairs computes it (cosine
similarity, every other profile ranked, AP per query, mean per group, then mean over groups)
and 1-nearest-neighbour accuracy. The window probe asks how well a linear classifier tells the
samples apart from one window's vector, trained on some fields of each sample and tested on the
others: what the vectors hold, apart from how UMAP and the mixture happen to cut them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

PROBE_WINDOWS = 20_000  # windows the probe keeps at most (a random subset above): seconds, not minutes
PROBE_C = 0.1  # inverse L2 strength: vectors of 64+ features and a few hundred windows a sample


def purity(truth: Sequence, pred: Sequence) -> float:
    """Share of items whose cluster's most common true label is their own label."""
    table = pd.crosstab(np.asarray(pred), np.asarray(truth))
    return float(table.to_numpy().max(axis=1).sum() / max(len(truth), 1))


def confusion(truth: Sequence, pred: Sequence) -> pd.DataFrame:
    """Counts, rows = cluster ids (sorted), columns = true labels (sorted)."""
    table = pd.crosstab(
        pd.Series(np.asarray(pred), name="cluster"), pd.Series(np.asarray(truth), name="truth")
    )
    return table.sort_index().sort_index(axis=1)


def cluster_scores(truth: Sequence, pred: Sequence) -> dict[str, float | None]:
    """``{"ari", "nmi", "purity"}``; all None when there are fewer than two true groups."""
    # integer codes first: the scores depend only on the groups, and strings sort slowly (10^6 windows)
    truth, pred = pd.factorize(np.asarray(truth))[0], pd.factorize(np.asarray(pred))[0]
    if len(truth) == 0 or len(np.unique(truth)) < 2:
        return {"ari": None, "nmi": None, "purity": None}
    return {
        "ari": float(adjusted_rand_score(truth, pred)),
        "nmi": float(normalized_mutual_info_score(truth, pred)),
        "purity": purity(truth, pred),
    }


def cosine_similarity(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, N) cosine similarities; zero vectors have similarity 0 to everything."""
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return unit @ unit.T


def average_precision(x: np.ndarray, groups: Sequence) -> np.ndarray:
    """AP of each row of (N, D) ``x`` retrieving the other rows of its group; NaN without positives.

    Every other row is ranked by cosine similarity (descending, ties in row order); AP is the
    mean of precision@k over the ranks k of the positives.
    """
    groups = np.asarray(groups)
    sims = cosine_similarity(x)
    n = len(groups)
    ap = np.full(n, np.nan)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        order = others[np.argsort(-sims[i, others], kind="stable")]
        relevant = groups[order] == groups[i]
        if not relevant.any():
            continue
        hits = np.cumsum(relevant)
        precision = hits / np.arange(1, len(order) + 1)
        ap[i] = float(precision[relevant].mean())
    return ap


def mean_average_precision(x: np.ndarray, groups: Sequence) -> float | None:
    """mAP of (N, D) profiles: AP per query, averaged per group, then over groups (copairs-style)."""
    ap = average_precision(x, groups)
    frame = pd.DataFrame({"group": np.asarray(groups), "ap": ap}).dropna()
    if frame.empty:
        return None
    return float(frame.groupby("group")["ap"].mean().mean())


def nearest_other(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N,) index of each row's most cosine-similar other row."""
    sims = cosine_similarity(x)
    np.fill_diagonal(sims, -np.inf)
    return np.argmax(sims, axis=1)


def nn_accuracy(x: np.ndarray, groups: Sequence) -> float | None:
    """Share of rows of (N, D) ``x`` whose most cosine-similar other row has the same group.

    Rows whose group has no other member are left out; None when no row is left.
    """
    groups = np.asarray(groups)
    if len(groups) < 2:
        return None
    sizes = pd.Series(groups).map(pd.Series(groups).value_counts()).to_numpy()
    keep = sizes > 1
    if not keep.any():
        return None
    return float((groups[nearest_other(x)] == groups)[keep].mean())


def field_folds(samples: Sequence, fields: Sequence) -> np.ndarray:
    """(N,) fold of each window: its field's rank among its sample's fields, modulo the fewest
    fields any sample has, so that every fold holds out some fields of every sample."""
    by_sample = pd.Series(np.asarray(fields).astype(str)).groupby(np.asarray(samples).astype(str))
    rank = by_sample.rank(method="dense").to_numpy(np.int64) - 1
    return rank % max(1, int(by_sample.nunique().min()))


def probe_accuracy(x: np.ndarray, samples: Sequence, fields: Sequence, seed: int = 0) -> float | None:
    """Share of windows whose sample a linear classifier (standardised features, L2 logistic
    regression) names right when trained on the windows of the other folds (``field_folds``).

    None with fewer than two samples or a sample of only one field (nothing to hold out).
    """
    x, samples, fields = np.asarray(x), np.asarray(samples).astype(str), np.asarray(fields)
    if len(np.unique(samples)) < 2:
        return None
    if len(samples) > PROBE_WINDOWS:
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), PROBE_WINDOWS, replace=False))
        x, samples, fields = x[keep], samples[keep], fields[keep]
    x = x.astype(np.float64)  # once, after the subset: not per fold, never the whole table
    folds = field_folds(samples, fields)
    if folds.max() < 1:
        return None
    right = 0
    for fold in range(folds.max() + 1):
        test = folds == fold
        model = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=2000))
        model.fit(x[~test], samples[~test])
        right += int((model.predict(x[test]) == samples[test]).sum())
    return right / len(samples)
