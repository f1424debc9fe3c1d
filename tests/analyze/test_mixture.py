"""Mixture size by BIC, window votes, field profiles and label alignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import adjusted_rand_score

from cellmi.analyze.job import PROFILE_NEIGHBORS_MAX, cluster_windows, fields_per_sample, fit_field_clusters
from cellmi.analyze.mixture import assign, fit_mixture, most_agreed, nearest_to_centre, select_by_bic, vote
from cellmi.analyze.profiles import (
    CONSENSUS_ITEMS,
    RankScaler,
    align_labels,
    assign_profiles,
    axis_weights,
    consensus,
    field_profiles,
    fit_profiles,
    relabel,
    weighted_average_linkage,
)
from cellmi.errors import UserError
from cellmi.settings import ClusterSettings


def blobs(k: int, n: int = 150, dim: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-30, 30, size=(k, dim))
    truth = np.repeat(np.arange(k), n)
    return centres[truth] + rng.normal(size=(k * n, dim)), truth


@pytest.mark.parametrize("k", [3, 5])
def test_bic_recovers_the_number_of_well_separated_blobs(k):
    z, truth = blobs(k, seed=k)
    gmm, scores = select_by_bic(z, 2, 8, seed=0)
    assert gmm.n_components == k
    assert sorted(scores) == list(range(2, 9)) and min(scores, key=scores.get) == k
    labels, prob = assign(gmm, z)
    assert pd.crosstab(labels, truth).to_numpy().max(axis=0).sum() == len(z)  # every blob is one cluster
    assert prob.min() > 0.9


def test_mixture_refuses_more_clusters_than_points():
    with pytest.raises(UserError, match="N_CLUSTERS"):
        fit_mixture(np.zeros((3, 2)), 4, seed=0)


def test_vote_majority_share_and_ties():
    table = pd.DataFrame({"sample": ["a"] * 5 + ["b"] * 4, "field": ["1"] * 5 + ["1"] * 4})
    labels = np.array([2, 2, 1, 2, 0, 3, 1, 1, 3])  # a/1: 2 wins 3 of 5; b/1: tie 1 vs 3 -> 1
    out = vote(table, labels)
    assert out[["sample", "cluster"]].values.tolist() == [["a", 2], ["b", 1]]
    np.testing.assert_allclose(out["share"], [0.6, 0.5])
    assert out["n_windows"].tolist() == [5, 4]


def test_nearest_to_centre_picks_the_closest_points():
    z, _ = blobs(2, n=50, seed=1)
    gmm = fit_mixture(z, 2, seed=0)
    labels, _ = assign(gmm, z)
    picks = nearest_to_centre(gmm, z, labels, 3)
    for k, rows in picks.items():
        dist = np.linalg.norm(z[labels == k] - gmm.means_[k], axis=1)
        np.testing.assert_allclose(np.linalg.norm(z[rows] - gmm.means_[k], axis=1), np.sort(dist)[:3])


def test_field_profiles_mean_and_median():
    table = pd.DataFrame(
        {"sample": ["b", "a", "a", "a"], "field": ["1", "2", "2", "2"], "split": ["test"] * 4,
         "fg_fraction": [0.5, 0.1, 0.3, 0.6]}  # field a: weights 1 : 3 : 6 of 10
    )
    x = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 3.0], [5.0, 6.0]])
    fields, mean = field_profiles(table, x, "mean")
    assert fields[["sample", "field", "n_windows"]].values.tolist() == [["a", "2", 3], ["b", "1", 1]]
    np.testing.assert_allclose(fields["fg_share"], [1.0 / 3, 0.5], rtol=1e-6)
    np.testing.assert_allclose(mean, [[2.0, 3.0], [1.0, 1.0]])
    _, median = field_profiles(table, x, "median")
    np.testing.assert_allclose(median, [[1.0, 3.0], [1.0, 1.0]])
    _, weighted = field_profiles(table, x, "weighted")
    np.testing.assert_allclose(weighted, [[3.3, 4.5], [1.0, 1.0]], rtol=1e-6)
    _, dense = field_profiles(table, x, "weighted", density=True)
    np.testing.assert_allclose(dense, [[3.3, 4.5, 1.0 / 3], [1.0, 1.0, 0.5]], rtol=1e-6)
    covered, dense = field_profiles(table.assign(cover=[0.7, 0.2, 0.2, 0.2]), x, "weighted", density=True)
    np.testing.assert_allclose(covered["cover"], [0.2, 0.7])  # the mask's cover, not the windows' mean
    np.testing.assert_allclose(dense, [[3.3, 4.5, 0.2], [1.0, 1.0, 0.7]], rtol=1e-6)


def _coverage(starts: np.ndarray, window: int, weights: np.ndarray) -> np.ndarray:
    """How much weight of the windows covers each pixel of the axis."""
    pixels = np.arange(starts[0], starts[-1] + window)
    return ((pixels[:, None] >= starts) & (pixels[:, None] < starts + window)) @ weights


def test_axis_weights_even_out_how_often_windows_cover_each_pixel():
    starts = np.arange(0, 257, 32)  # 256-px windows every 32 px over 512 px: the middle covered 8 times
    plain = _coverage(starts, 256, np.ones(len(starts)))
    weights = axis_weights(starts, 256)
    even = _coverage(starts, 256, weights)
    assert plain.std() / plain.mean() > 0.4
    assert even.std() / even.mean() < 0.6 * plain.std() / plain.mean()  # halfway: see EVEN_RIDGE
    np.testing.assert_allclose(weights, weights[::-1], atol=1e-9)  # symmetric, edges the heaviest
    assert weights.max() == 1.0 and weights[0] == pytest.approx(1.0) and weights.min() > 0
    tiles = np.arange(0, 512, 128)  # windows that tile the axis already cover it evenly
    np.testing.assert_allclose(axis_weights(tiles, 128), 1.0)


def test_even_profiles_give_every_part_of_the_field_its_share():
    """A field whose left quarter holds feature 1 and the rest feature 0: the pixel average is 0.25.
    Overlapping windows see the middle most, so their plain mean is far lower (0.14); evened, it is
    about twice as near (0.19: the ridge keeps the middle windows in)."""
    starts = np.arange(0, 257, 32)
    y, x = (a.ravel() for a in np.meshgrid(starts, starts, indexing="ij"))
    share = np.clip(128 - x, 0, 256) / 256.0  # of each window's pixels, those in the left quarter
    table = pd.DataFrame({"sample": "a", "field": "1", "split": "test", "y": y, "x": x, "fg_fraction": 1.0})
    vectors = np.column_stack([share, 1 - share])
    _, weighted = field_profiles(table, vectors, "weighted")
    _, even = field_profiles(table, vectors, "even", window=256)
    assert abs(weighted[0, 0] - 0.25) > 0.1
    assert abs(even[0, 0] - 0.25) < 0.55 * abs(weighted[0, 0] - 0.25)
    with pytest.raises(ValueError, match="window"):
        field_profiles(table, vectors, "even")


def _density_pair_set() -> tuple[np.ndarray, np.ndarray]:
    """6 samples x 4 fields of 12 features plus the foreground share last: samples 0 and 1 have the
    same vectors (their fields scatter alike) and differ only in how densely cells cover them."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(6, 12)) * 10
    centres[1] = centres[0]
    truth = np.repeat(np.arange(6), 4)
    x = centres[truth] + rng.normal(size=(24, 12))
    share = np.array([0.25, 0.45, 0.3, 0.35, 0.2, 0.4])[truth] + rng.normal(size=24) * 0.01
    return np.column_stack([x, share]).astype(np.float32), truth


def test_density_weight_tells_apart_samples_that_differ_only_in_density():
    x, truth = _density_pair_set()
    pair = truth < 2
    for profiles, density, apart in ((x[:, :-1], 0.0, False), (x, 2.0, True)):
        model, labels = fit_profiles(profiles, 6, dims=8, seed=0, method="spectral", scale="rank", neighbors=4,
                                     density=density)
        found = pd.crosstab(labels[pair], truth[pair]).to_numpy()
        assert (found.max(axis=0).sum() == pair.sum() and len(found) == 2) == apart, density
    scaled = model.scale(x)
    np.testing.assert_allclose(scaled[:, -1], 2.0 * model.scaler.transform(x)[:, -1], rtol=1e-5)
    np.testing.assert_allclose(scaled[:, :-1], model.scaler.transform(x)[:, :-1], rtol=1e-5)


def test_profile_clusters_align_and_reassign():
    x, truth = blobs(3, n=6, dim=10, seed=2)
    model, labels = fit_profiles(x, 3, dims=4, seed=0)
    assert model.pca is not None and model.pca.n_components_ == 4
    assert pd.crosstab(labels, truth).to_numpy().max(axis=0).sum() == len(x)
    mapping = align_labels(truth, labels)
    model, aligned = relabel(model, labels, mapping)
    np.testing.assert_array_equal(aligned, truth)
    np.testing.assert_array_equal(assign_profiles(model, x), truth)  # fitted fields keep theirs
    np.testing.assert_array_equal(assign_profiles(model, x + 0.01), truth)  # new ones: nearest centroid


def test_relabel_keeps_a_group_only_fitted_fields_fell_in():
    x, truth = blobs(3, n=6, dim=10, seed=2)
    model, labels = fit_profiles(x, 3, dims=4, seed=0)
    shown = labels != labels[0]  # the labelled fields leave the first group empty
    mapping = align_labels(truth[shown], labels[shown], groups=3)
    model, aligned = relabel(model, labels[shown], mapping)
    kept = np.unique(model.fit_labels)  # ids without a group hold an infinite centroid, never nearest
    assert len(kept) == 3 and np.isfinite(model.centroids[kept]).all() and set(aligned) < set(kept)
    np.testing.assert_array_equal(assign_profiles(model, x)[shown], aligned)


def test_align_labels_gives_unmatched_labels_fresh_ids():
    mapping = align_labels(np.array([0, 0, 1, 1]), np.array([7, 7, 8, 9]))
    assert mapping[7] == 0 and mapping[8] == 1 and mapping[9] == 2


def test_rank_scaler_gives_normal_scores_of_ranks_and_clips_new_values():
    x = np.array([[3.0, 0.5], [1.0, 0.1], [2.0, 0.3], [10.0, 0.2]])
    scaler = RankScaler().fit(x)
    ranks = np.array([[2, 3], [0, 0], [1, 2], [3, 1]])
    np.testing.assert_allclose(scaler.transform(x), norm.ppf((ranks + 0.5) / 4), atol=1e-9)
    outlier = x.copy()
    outlier[3, 0] = 1e6  # ranks, not distances: an outlying field moves no other field
    np.testing.assert_allclose(RankScaler().fit(outlier).transform(outlier), scaler.transform(x), atol=1e-9)
    new = scaler.transform(np.array([[-50.0, 9.0], [2.5, 0.25]]))
    np.testing.assert_allclose(new[0], norm.ppf([0.5 / 4, 3.5 / 4]), atol=1e-9)  # clipped to the fitted range
    assert norm.ppf(1.5 / 4) < new[1, 0] < norm.ppf(2.5 / 4)  # between its neighbours' scores


def _outlying_field_set() -> tuple[np.ndarray, np.ndarray]:
    """5 samples x 4 fields: samples 0 and 1 close together, sample 2 with one field far off."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 12)) * 20
    centres[1] = centres[0] + 3.0 / np.sqrt(12)  # 3 apart
    truth = np.repeat(np.arange(5), 4)
    x = centres[truth] + rng.normal(size=(20, 12)) * 0.15
    x[8] += 6.0 / np.sqrt(12)  # 6 from its sample's other fields, still nearer them than anything else
    return x, truth


def test_spectral_keeps_an_outlying_field_with_its_sample_where_ward_splits_it():
    x, truth = _outlying_field_set()
    _, ward = fit_profiles(x, 5, dims=8, seed=0, method="ward", scale="standard")
    assert pd.crosstab(ward, truth).to_numpy().max(axis=0).sum() < len(x)  # Ward merges 0+1, splits 2
    for scale in ("standard", "rank"):
        model, spectral = fit_profiles(x, 5, dims=8, seed=0, method="spectral", scale=scale, neighbors=4)
        assert pd.crosstab(spectral, truth).to_numpy().max(axis=0).sum() == len(x), scale
        np.testing.assert_array_equal(assign_profiles(model, x), spectral)
    with pytest.raises(ValueError, match="unknown profile clustering 'tree'"):
        fit_profiles(x, 5, dims=8, seed=0, method="tree")


def test_consensus_keeps_what_most_labelings_agree_on():
    majority = np.array([0, 0, 1, 1, 2, 2])
    runs = [majority, np.array([5, 5, 3, 3, 4, 4]), np.array([0, 1, 1, 1, 2, 2])]  # ids need not agree
    found = consensus(runs, 3)
    assert pd.crosstab(found, majority).to_numpy().max(axis=0).sum() == 6


def test_consensus_of_many_fields_links_groups_of_alike_fields():
    """Above CONSENSUS_ITEMS fields the linkage starts from groups of fields every labeling treats
    alike; the majority still wins, and the few odd fields join their majority's group."""
    rng = np.random.default_rng(0)
    majority = rng.integers(0, 4, CONSENSUS_ITEMS + 500)
    runs = []
    for run in range(3):
        labels = majority.copy()
        odd = np.arange(len(labels)) % 20 == run  # each run errs on 5 % of the fields, other ones
        labels[odd] = (labels[odd] + 1) % 4
        runs.append(np.random.default_rng(run).permutation(4)[labels])  # ids need not agree
    found = consensus(runs, 4)
    assert pd.crosstab(found, majority).to_numpy().max(axis=0).sum() == len(majority)


def test_weighted_average_linkage_equals_average_linkage_of_the_items():
    """A group of n items counts as n items: the same clusters as scipy's average linkage on them."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(1)
    for _ in range(20):
        groups, k = int(rng.integers(5, 25)), int(rng.integers(2, 5))
        points, sizes = rng.normal(size=(groups, 3)), rng.integers(1, 5, groups)
        dist = np.linalg.norm(points[:, None] - points[None], axis=2)
        items = np.repeat(np.arange(groups), sizes)
        expected = fcluster(linkage(squareform(dist[items][:, items], checks=False), "average"), k, "maxclust")
        found = weighted_average_linkage(dist, sizes, k)[items]
        assert pd.crosstab(found, expected).to_numpy().max(axis=0).sum() == len(items)
        assert len(np.unique(found)) == k


def test_fields_per_sample_and_which_fields_fit_the_clusters():
    x, truth = _outlying_field_set()
    fields = pd.DataFrame({"sample": [f"s{t}" for t in truth], "field": [str(i % 4) for i in range(20)]})
    assert fields_per_sample(fields) == 4
    assert fields_per_sample(fields.iloc[::4]) == 2  # one field a sample: never below 2
    many = pd.DataFrame({"sample": np.repeat(["a", "b"], 400), "field": np.arange(800).astype(str)})
    assert fields_per_sample(many) == PROFILE_NEIGHBORS_MAX  # a big screen's graph stays cheap to cut
    focus = {(s, f): 1.0 for s, f in zip(fields["sample"], fields["field"], strict=True)}
    focus[("s2", "0")] = 0.1  # the outlying field is also the blurred one
    for fit_blurred, fitted in ((True, 20), (False, 19)):
        cfg = ClusterSettings(fit_blurred=fit_blurred, profile_dims=8)
        model, labels = fit_field_clusters(fields.copy(), x, cfg, 5, focus)
        assert len(model.fit_rows) == fitted and len(labels) == 20
    out = fields.copy()
    fit_field_clusters(out, x, ClusterSettings(), 5, focus)
    assert out["blurred"].tolist() == [i == 8 for i in range(20)]


def test_most_agreed_keeps_the_partition_the_others_share():
    truth = np.repeat(np.arange(3), 20)
    shuffled = np.random.default_rng(0).permutation(truth)
    renamed = (truth + 1) % 3  # the same partition under other ids
    assert most_agreed([shuffled, truth, renamed]) in (1, 2)
    assert most_agreed([truth, shuffled, renamed]) == 0  # a tie goes to the first
    assert most_agreed([shuffled, truth]) == 0  # two fits cannot outvote each other


def test_window_restarts_keep_one_of_the_single_fits():
    z, _ = blobs(4, n=60, dim=6, seed=3)
    x = np.concatenate([z, np.random.default_rng(1).normal(size=(len(z), 10))], axis=1).astype(np.float32)
    cfg = ClusterSettings(seed=5, restarts=3, umap_dim=3)
    singles = [cluster_windows(x, cfg.model_copy(update={"seed": s, "restarts": 1}), 4, "fixed", None)[3]
               for s in (5, 6, 7)]
    kept = cluster_windows(x, cfg, 4, "fixed", None)[3]
    agree = [adjusted_rand_score(kept.argmax(1), single.argmax(1)) for single in singles]
    assert max(agree) == pytest.approx(1.0)
