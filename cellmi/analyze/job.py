"""``cellmi cluster``: UMAP + Gaussian mixture over window representations; metrics, figures, report.

    cellmi cluster --workdir ./w                          # the held-out samples (split test)
    cellmi cluster --workdir ./w --cluster.split all --cluster.select bic
    cellmi cluster --workdir ./w --cluster.apply_to s3://bucket/other/representations.zarr

Reads ``{workdir}/representations.zarr`` and writes ``{workdir}/analysis/`` (local or s3://):

    clusters_windows.parquet  one row per window of the split: Metadata_sample, Metadata_field,
                              Metadata_y, Metadata_x, Metadata_split, Metadata_fg_fraction,
                              [Metadata_phenotype], cluster, probability, umap_0.., and the
                              baselines' window clusters cluster_random, cluster_handcrafted
    clusters_images.parquet   one row per field: Metadata_sample, Metadata_field, Metadata_split,
                              [Metadata_phenotype], n_windows, fg_share (mean foreground of the kept
                              windows), cover (share of the field in its foreground mask), cluster
                              (the default labels, see cluster.image_labels), share (majority share of
                              the window vote), cluster_vote, cluster_profile (aligned to the vote's
                              cluster ids), focus, blurred
    metrics.json              metrics[feature_set][split][score] for feature sets dim, random,
                              handcrafted; scores in SCORE_KEYS (null where not computed). The
                              chosen split has every score; the other splits ("all" always) only
                              image-level scores of field-profile clustering with one cluster
                              per sample, plus retrieval mAP and 1-NN accuracy (window_probe:
                              the chosen split only).
    umap.png, confusion.png, gallery.png[, bic.png]
    cluster_traits.csv        per window cluster: size, main sample, foreground fraction, and per
                              channel mean intensity, bright area and object size (sampled windows),
                              and the words for what sets the cluster apart (see describe.py)
    maps.zarr/                per field, its channels and its window clusters as an NGFF label image
                              for napari (see maps.py; off with cluster.maps=false)
    model.joblib              standardiser + UMAP + mixture + field-profile model of the DIM vectors
                              (a joblib pickle that this job wrote; load only files you trust)
    report.html               the self-contained report, written last (it marks the stage done)

With ``--cluster.apply_to URL`` the saved model assigns another representations store (or its
``representations.parquet``) to the same clusters and writes ``analysis/applied/``: the same two
tables and a small metrics.json.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from cellmi import __version__
from cellmi.analyze.describe import describe, trait_effects
from cellmi.analyze.figures import Panel, bic_figure, confusion_figure, gallery_figure, umap_figure
from cellmi.analyze.focus import field_focus, sharp_fields
from cellmi.analyze.gallery import (
    cluster_traits,
    composite,
    cut_windows,
    display_range,
    strip_png,
    window_traits,
)
from cellmi.analyze.maps import MAPS, write_maps
from cellmi.analyze.metrics import (
    cluster_scores,
    confusion,
    mean_average_precision,
    nn_accuracy,
    probe_accuracy,
)
from cellmi.analyze.mixture import (
    fit_mixture,
    most_agreed,
    most_probable,
    nearest_to_centre,
    select_by_bic,
    vote,
)
from cellmi.analyze.profiles import (
    ProfileModel,
    align_labels,
    assign_profiles,
    field_profiles,
    fit_profiles,
    relabel,
)
from cellmi.analyze.reduce import CHUNK, Reducer, embed_2d, fit_reducer, place
from cellmi.analyze.report import ClusterView, ReportData, render_report
from cellmi.errors import UserError
from cellmi.hardware import cores
from cellmi.log import log, setup_logging
from cellmi.representations import (
    REPR_ZARR,
    Representations,
    field_columns,
    load_representations,
    read_parquet,
    write_parquet,
)
from cellmi.settings import ClusterSettings, Settings, as_dict
from cellmi.store import ImageStore, exists, join, open_store, read_bytes, remove, write_bytes_atomic
from cellmi.watchdog import dask_config

ANALYSIS = "analysis"
APPLIED = "applied"
MODEL_FILE = "model.joblib"
FEATURE_SETS = ("dim", "random", "handcrafted")
TRAIT_WINDOWS = 64  # windows per cluster whose pixels are measured for the traits table
# Spectral graph neighbourhood cap: 6,000 fields of 430 a sample took 16 s at 430, 1.5 s at 30.
PROFILE_NEIGHBORS_MAX = 32
LOCAL_DASK_ABOVE = 10 * CHUNK  # windows to place before starting a local Dask cluster pays off
SCORE_KEYS = (
    "n_windows",
    "n_images",
    "n_samples",
    "n_clusters",
    "window_ari",
    "window_nmi",
    "window_purity",
    "window_ari_phenotype",
    "window_nmi_phenotype",
    "image_ari",
    "image_nmi",
    "image_purity",
    "image_ari_phenotype",
    "image_nmi_phenotype",
    "image_ari_vote",
    "image_nmi_vote",
    "image_purity_vote",
    "image_ari_profile",
    "image_nmi_profile",
    "image_purity_profile",
    "map",
    "nn_accuracy",
    "window_probe",
)
Focus = dict[tuple[str, str], float]  # (sample, field) -> focus score
OTHER_SPLITS = {"test": ("train", "all"), "train": ("test", "all"), "all": ()}


@contextmanager
def timed(step: str, timings: dict[str, float]) -> Iterator[None]:
    """Log a step's wall time and record it in ``timings``."""
    start = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - start, 2)
    log.info("cluster: %s took %.1f s", step, timings[step])


# ---------------------------------------------------------------- input
def load_input(url: str) -> Representations:
    """A representations store, or its Parquet table (which holds the DIM features only)."""
    if not url.endswith(".parquet"):
        return load_representations(url)
    if not exists(url):
        raise UserError(f"{url}: no such representations table")
    frame = read_parquet(url)
    meta = {c: f"Metadata_{c}" for c in ("sample", "field", "split", "y", "x", "fg_fraction", "background")}
    missing = [v for v in meta.values() if v not in frame.columns]
    feats = [c for c in frame.columns if c.startswith("f") and c[1:].isdigit()]
    if missing or not feats:
        raise UserError(
            f"{url}: not a representations table (missing {missing or 'feature columns f000...'})"
        )
    table = pd.DataFrame({k: frame[v].to_numpy() for k, v in meta.items()})
    if "Metadata_field_cover" in frame.columns:
        table["cover"] = frame["Metadata_field_cover"].to_numpy(np.float32)
    return Representations(table, {"dim": frame[feats].to_numpy(np.float32)}, {})


def usable_windows(reps: Representations, url: str) -> Representations:
    """Foreground windows only, every feature finite; bad input is a UserError naming ``url``."""
    if "dim" not in reps.features:
        raise UserError(f"{url}: no 'dim' feature set in the representations")
    for name, matrix in reps.features.items():
        if not np.isfinite(matrix).all():
            raise UserError(f"{url}: feature set {name!r} holds NaN or infinite values")
    keep = ~reps.table["background"].to_numpy(bool)
    if not keep.any():
        raise UserError(f"{url}: no foreground windows to cluster")
    return reps if keep.all() else reps.subset(keep)


def split_rows(reps: Representations, split: str, url: str) -> Representations:
    """Windows of one split (``all``: every window); an empty split is a UserError."""
    if split == "all":
        return reps
    rows = reps.table["split"].to_numpy() == split
    if not rows.any():
        present = sorted(set(reps.table["split"]))
        raise UserError(
            f"{url}: no windows in split {split!r} (present: {present}); set CELLMI_CLUSTER__SPLIT"
        )
    return reps.subset(rows)


def window_of(reps: Representations) -> int | None:
    """The window edge the representations were made with (None where not recorded: a Parquet table)."""
    window = reps.attrs.get("window")
    return int(window) if window else None


def aggregation(how: str, window: int | None) -> str:
    """``how``, or ``weighted`` where ``even`` has no window edge to work with."""
    if how == "even" and window is None:
        log.warning("cluster: the input does not record its window edge; fields are aggregated 'weighted', "
                    "not 'even'")
        return "weighted"
    return how


def profiles_of(
    table: pd.DataFrame, x: np.ndarray, how: str, density: bool, window: int | None
) -> tuple[pd.DataFrame, np.ndarray]:
    """``field_profiles`` with aggregation ``how`` as far as the window edge allows."""
    return field_profiles(table, x, aggregation(how, window), density, window)


def phenotype_map(reps: Representations) -> dict[str, str]:
    return {str(k): str(v) for k, v in (reps.attrs.get("phenotypes") or {}).items()}


@contextmanager
def dask_client(settings: Settings, to_place: int) -> Iterator[Any]:
    """A Dask client when many windows must be placed by UMAP's transform: the configured scheduler,
    else a local cluster (k-nearest-neighbour placement runs here and needs none)."""
    address = settings.infer.scheduler_address or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if settings.cluster.placement != "umap":
        to_place = 0
    if to_place == 0 or (not address and to_place < LOCAL_DASK_ABOVE):
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set(dask_config(settings.timeouts)):  # a scheduler that stops answering is given up on
        if address:
            with Client(address, timeout=f"{settings.timeouts.dask_s:g}s") as client:
                yield client
            return
        workers = settings.infer.workers or cores()
        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            yield client


# ---------------------------------------------------------------- clustering
@dataclass
class Clustering:
    """One feature set clustered on the chosen split: windows (N,) and fields (M,)."""

    reducer: Reducer
    mixture: GaussianMixture
    z: np.ndarray  # (N, D) clustering embedding
    labels: np.ndarray  # (N,) window cluster
    prob: np.ndarray  # (N,) its posterior probability
    fields: pd.DataFrame  # (M,) sample, field, split, n_windows, cluster_vote, share, cluster_profile
    profiles: np.ndarray  # (M, F) field profiles
    profile_model: ProfileModel
    bic: dict[int, float]


Measure = Callable[[ImageStore, list[tuple[str, str]]], dict[tuple[str, str], float]]


def field_measure(
    reps: Representations, name: str, measure: Measure | None, without: str, none_is_nan: bool = True
) -> dict[tuple[str, str], float] | None:
    """Each field's ``name`` (``focus``, ``cover``) as inference recorded it in the representations'
    attributes, or, where it did not for every field, ``measure`` on their image store. None where
    ``measure`` is None or the store is unavailable (a warning then says what the job does
    ``without`` it). A recorded null is NaN with ``none_is_nan`` (nothing to measure) and counts as
    not recorded otherwise."""
    pairs = list(reps.table[["sample", "field"]].astype(str).drop_duplicates().itertuples(index=False, name=None))
    recorded = reps.attrs.get(name) or {}
    if all(f in recorded.get(s, {}) and (none_is_nan or recorded[s][f] is not None) for s, f in pairs):
        return {(s, f): np.nan if recorded[s][f] is None else float(recorded[s][f]) for s, f in pairs}
    if measure is None:
        return None
    try:
        return measure(open_store(str(reps.attrs["store"])), pairs)
    except (UserError, OSError, KeyError) as err:
        log.warning("cluster: %s (image store unavailable: %s)", without, err)
        return None


def mask_cover(store: ImageStore, fields: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """Share of each (sample, field) of the store in its foreground mask."""
    return {(s, f): float(store.read_mask(s, f).mean()) for s, f in fields}


def with_cover(reps: Representations, from_store: bool) -> Representations:
    """``reps`` with a ``cover`` column: the share of each window's field that its foreground mask
    covers, as inference measured it or (``from_store``) from the image store for representations
    made before it did. Unchanged where the table has it already (read from a Parquet table) or
    where neither is at hand (field profiles then use the windows' foreground share)."""
    if "cover" in reps.table and np.isfinite(reps.table["cover"].to_numpy(np.float64)).all():
        return reps
    cover = field_measure(reps, "cover", mask_cover if from_store else None,
                          "field cover from the windows' foreground share", none_is_nan=False)
    if cover is None:
        return reps
    index = pd.MultiIndex.from_arrays([reps.table["sample"].astype(str), reps.table["field"].astype(str)])
    table = reps.table.assign(cover=pd.Series(cover).reindex(index).to_numpy(np.float32))
    return Representations(table, reps.features, reps.attrs)


def fields_focus(reps: Representations, cfg: ClusterSettings) -> Focus:
    """Focus score of every field of the representations (none when QC is off): as inference measured
    it, or, for representations without it, from their image store."""
    if cfg.focus_qc <= 0:
        return {}
    return field_measure(reps, "focus", field_focus, "no focus check") or {}


def cluster_windows(
    x: np.ndarray, cfg: ClusterSettings, k: int, select: str, client: Any
) -> tuple[Reducer, GaussianMixture, np.ndarray, np.ndarray, dict[int, float]]:
    """(N, F) vectors -> fitted reducer, mixture, (N, D) embedding, (N, K) cluster probabilities and
    BIC scores (when chosen by BIC).

    UMAP and the mixture are fitted ``cfg.restarts`` times on the same windows (seeds ``cfg.seed``,
    ``cfg.seed`` + 1, ...) and the fit whose clusters agree best with the others' is kept. A window
    placed by ``knn`` takes the weighted mean of its neighbours' probabilities (a vote of the fitted
    windows nearest it in the feature space); one placed by ``umap`` (or fitted) the mixture's at its
    place in the embedding.
    """
    fits = [fit_windows(x, cfg, k, select, cfg.seed + r) for r in range(cfg.restarts)]
    best = most_agreed([gmm.predict(reducer.fit_embedding) for reducer, gmm, _ in fits])
    if len(fits) > 1:
        log.info("window clusters: restart %d of %d agrees best with the others", best + 1, len(fits))
    reducer, gmm, bic = fits[best]
    z, proba = place_clusters(reducer, gmm, x, client, cfg.placement)
    return reducer, gmm, z, proba, bic


def fit_windows(
    x: np.ndarray, cfg: ClusterSettings, k: int, select: str, seed: int
) -> tuple[Reducer, GaussianMixture, dict[int, float]]:
    """One fit of UMAP (on the windows ``cfg.seed`` draws) and the mixture on its embedding."""
    reducer = fit_reducer(
        x, cfg.umap_dim, cfg.neighbors, cfg.min_dist, cfg.seed, cfg.subsample_above, cfg.subsample_size, seed
    )
    if select == "bic":
        gmm, bic = select_by_bic(reducer.fit_embedding, cfg.bic_min, cfg.bic_max, seed)
    else:
        gmm, bic = fit_mixture(reducer.fit_embedding, k, seed), {}
    return reducer, gmm, bic


def place_clusters(
    reducer: Reducer, gmm: GaussianMixture, x: np.ndarray, client: Any, placement: str
) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) vectors -> (N, D) embedding and (N, K) cluster probabilities: with ``knn`` a placed
    window votes with its neighbours' probabilities, with ``umap`` the mixture's at its place."""
    carry = gmm.predict_proba(reducer.fit_embedding) if placement == "knn" else None
    z, proba = place(reducer, x, client, placement=placement, carry=carry)
    return z, gmm.predict_proba(z) if proba is None else proba


def fit_field_clusters(
    fields: pd.DataFrame, profiles: np.ndarray, cfg: ClusterSettings, k: int, focus: Focus
) -> tuple[ProfileModel, np.ndarray]:
    """Field clusters fitted on every field, or on the fields in focus alone (then the blurred ones
    are assigned to the nearest); returns the model and each field's label.

    Adds ``focus`` and ``blurred`` columns to ``fields``.
    """
    keys = zip(fields["sample"].astype(str), fields["field"].astype(str), strict=True)
    fields["focus"] = np.array([focus.get(key, np.nan) for key in keys], np.float32)
    sharp = sharp_fields(fields["focus"].to_numpy(), cfg.focus_qc, least=k)
    fields["blurred"] = ~sharp
    fit = np.ones(len(fields), bool) if cfg.fit_blurred else sharp
    neighbors = cfg.profile_neighbors or fields_per_sample(fields[fit])
    model, _ = fit_profiles(
        profiles[fit], k, cfg.profile_dims, cfg.seed, cfg.profile_method, cfg.profile_scale, neighbors,
        cfg.profile_density,
    )
    return model, assign_profiles(model, profiles)


def fields_per_sample(fields: pd.DataFrame) -> int:
    """The median number of fields a sample has: the natural neighbourhood of a field in the graph;
    at most ``PROFILE_NEIGHBORS_MAX`` (more neighbours only make the graph slower to cut)."""
    return min(PROFILE_NEIGHBORS_MAX, max(2, round(float(fields.groupby("sample", observed=True).size().median()))))


def cluster_fields(
    table: pd.DataFrame, x: np.ndarray, labels: np.ndarray, cfg: ClusterSettings, k: int, focus: Focus,
    window: int | None,
) -> tuple[pd.DataFrame, np.ndarray, ProfileModel]:
    """Vote and profile labels per field; profile ids are aligned to the vote's ids."""
    fields, profiles = profiles_of(table, x, cfg.aggregate, cfg.profile_density > 0, window)
    votes = vote(table, labels).rename(columns={"cluster": "cluster_vote"})
    fields = fields.merge(votes.drop(columns="n_windows"), on=["sample", "field"], how="left", validate="1:1")
    model, plabels = fit_field_clusters(fields, profiles, cfg, k, focus)
    mapping = align_labels(fields["cluster_vote"].to_numpy(), plabels, groups=len(model.centroids))
    model, plabels = relabel(model, plabels, mapping)
    fields["cluster_profile"] = plabels
    return fields, profiles, model


def cluster_feature_set(
    reps: Representations, name: str, cfg: ClusterSettings, k: int, select: str, client: Any, focus: Focus
) -> Clustering:
    x = reps.features[name]
    reducer, gmm, z, proba, bic = cluster_windows(x, cfg, k, select, client)
    labels, prob = most_probable(proba)
    fields, profiles, model = cluster_fields(reps.table, x, labels, cfg, gmm.n_components, focus, window_of(reps))
    return Clustering(reducer, gmm, z, labels, prob, fields, profiles, model, bic)


# ---------------------------------------------------------------- scores
def empty_scores() -> dict[str, Any]:
    return dict.fromkeys(SCORE_KEYS)


def _scores(truth: np.ndarray, pred: np.ndarray, prefix: str, suffix: str = "") -> dict[str, Any]:
    found = cluster_scores(truth, pred)
    return {f"{prefix}_{k}{suffix}": v for k, v in found.items() if suffix != "_phenotype" or k != "purity"}


def _phenotypes_of(samples: pd.Series, phen: dict[str, str]) -> np.ndarray | None:
    values = samples.astype(str).map(phen)
    return None if values.isna().any() else values.to_numpy()


def image_scores(
    fields: pd.DataFrame, labels: np.ndarray, suffix: str, phen: dict[str, str]
) -> dict[str, Any]:
    out = _scores(fields["sample"].astype(str).to_numpy(), labels, "image", suffix)
    truth = _phenotypes_of(fields["sample"], phen)
    if suffix == "" and truth is not None:
        out.update(_scores(truth, labels, "image", "_phenotype"))
    return out


def retrieval_scores(model: ProfileModel, profiles: np.ndarray, fields: pd.DataFrame) -> dict[str, Any]:
    """Own-sample retrieval of standardised field profiles: mAP and 1-NN accuracy."""
    scaled = model.scale(profiles)
    samples = fields["sample"].astype(str).to_numpy()
    return {"map": mean_average_precision(scaled, samples), "nn_accuracy": nn_accuracy(scaled, samples)}


def primary_scores(
    reps: Representations, c: Clustering, cfg: ClusterSettings, phen: dict[str, str], x: np.ndarray
) -> dict:
    """Every score on the clustered split; ``x`` the clustered (N, F) window vectors."""
    table, fields = reps.table, c.fields
    out = empty_scores()
    out.update(
        n_windows=len(table),
        n_images=len(fields),
        n_samples=int(table["sample"].nunique()),
        n_clusters=int(c.mixture.n_components),
    )
    out.update(_scores(table["sample"].astype(str).to_numpy(), c.labels, "window"))
    truth = _phenotypes_of(table["sample"], phen)
    if truth is not None:
        out.update(_scores(truth, c.labels, "window", "_phenotype"))
    out.update(image_scores(fields, fields["cluster_vote"].to_numpy(), "_vote", phen))
    out.update(image_scores(fields, fields["cluster_profile"].to_numpy(), "_profile", phen))
    out.update(image_scores(fields, fields[f"cluster_{cfg.image_labels}"].to_numpy(), "", phen))
    out.update(retrieval_scores(c.profile_model, c.profiles, fields))
    out["window_probe"] = probe_accuracy(x, table["sample"].to_numpy(), table["field"].to_numpy(), cfg.seed)
    return out


def profile_split(
    reps: Representations, split: str, name: str, cfg: ClusterSettings, phen: dict[str, str], focus: Focus
) -> tuple[dict, pd.DataFrame] | None:
    """Image-level scores of a split from field profiles alone (one cluster per sample); no UMAP."""
    sub = reps if split == "all" else reps.subset(reps.table["split"].to_numpy() == split)
    if sub.table["sample"].nunique() < 2:
        return None
    fields, profiles = profiles_of(sub.table, sub.features[name], cfg.aggregate, cfg.profile_density > 0,
                                   window_of(sub))
    k = int(fields["sample"].nunique())
    model, labels = fit_field_clusters(fields, profiles, cfg, k, focus)
    fields["cluster_profile"] = labels
    out = empty_scores()
    out.update(n_images=len(fields), n_samples=k, n_clusters=int(labels.max()) + 1)
    out.update(image_scores(fields, labels, "_profile", phen))
    out.update(image_scores(fields, labels, "", phen))
    out.update(retrieval_scores(model, profiles, fields))
    return out, fields


# ---------------------------------------------------------------- tables
def _meta(table: pd.DataFrame, phen: dict[str, str], columns: tuple[str, ...],
          fmeta: dict[str, dict[str, str]] | None) -> dict[str, Any]:
    out = {f"Metadata_{c}": table[c].to_numpy() for c in columns}
    if phen:
        out["Metadata_phenotype"] = table["sample"].astype(str).map(phen).to_numpy()
    out.update(field_columns(table, fmeta))
    return out


def window_frame(
    table: pd.DataFrame,
    labels: np.ndarray,
    prob: np.ndarray,
    z: np.ndarray,
    phen: dict[str, str],
    others: dict[str, np.ndarray],
    fmeta: dict[str, dict[str, str]] | None = None,
) -> pd.DataFrame:
    """One row per window: Metadata_* columns (the field's too), cluster, probability, umap_*,
    cluster_<baseline>."""
    data = _meta(table, phen, ("sample", "field", "y", "x", "split", "fg_fraction"), fmeta)
    data.update(cluster=labels, probability=prob)
    data.update({f"umap_{i}": z[:, i] for i in range(z.shape[1])})
    data.update({f"cluster_{name}": values for name, values in others.items()})
    return pd.DataFrame(data)


def image_frame(fields: pd.DataFrame, default: str, phen: dict[str, str],
                fmeta: dict[str, dict[str, str]] | None = None) -> pd.DataFrame:
    """One row per field: Metadata_* columns (plate, well, plate map too), n_windows, fg_share, cover,
    cluster, share, cluster_vote, cluster_profile, focus, blurred."""
    data = _meta(fields, phen, ("sample", "field", "split"), fmeta)
    data.update(
        n_windows=fields["n_windows"].to_numpy(),
        fg_share=fields["fg_share"].to_numpy(),
        cover=fields["cover"].to_numpy() if "cover" in fields else np.nan,
        cluster=fields[f"cluster_{default}"].to_numpy(),
        share=fields["share"].to_numpy(),
        cluster_vote=fields["cluster_vote"].to_numpy(),
        cluster_profile=fields["cluster_profile"].to_numpy(),
        focus=fields["focus"].to_numpy() if "focus" in fields else np.nan,
        blurred=fields["blurred"].to_numpy() if "blurred" in fields else False,
    )
    return pd.DataFrame(data)


# ---------------------------------------------------------------- model file
def save_model(url: str, bundle: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    joblib.dump(bundle, buffer, compress=3)
    write_bytes_atomic(url, buffer.getvalue())


def load_model(url: str) -> dict[str, Any]:
    if not exists(url):
        raise UserError(f"{url}: no saved clustering model (run `cellmi cluster` without apply_to first)")
    bundle = joblib.load(io.BytesIO(read_bytes(url)))
    if not isinstance(bundle, dict) or bundle.get("format") != 1:
        raise UserError(f"{url}: not a cellmi clustering model")
    return bundle


def model_bundle(c: Clustering, cfg: ClusterSettings, window: int | None) -> dict[str, Any]:
    return {
        "format": 1,
        "cellmi_version": __version__,
        "feature_set": "dim",
        "feature_dim": int(c.reducer.fit_rows.shape[1]),
        "reducer": c.reducer,
        "mixture": c.mixture,
        "profiles": c.profile_model,
        "aggregate": aggregation(cfg.aggregate, window),
        "window": window,
        "image_labels": cfg.image_labels,
        "split": cfg.split,
    }


# ---------------------------------------------------------------- figures and galleries
def umap_panels(
    reps: Representations,
    primary: Representations,
    c: Clustering,
    cfg: ClusterSettings,
    other: tuple[str, pd.DataFrame] | None,
) -> list[Panel]:
    """2-D UMAP panels of the clustered split and, beside it, the other split (a seeded subsample)."""
    index, xy = embed_2d(primary.features["dim"], cfg.neighbors, cfg.seed, cfg.figure_points)
    panels = [
        Panel(cfg.split, xy, primary.table["sample"].to_numpy()[index], c.labels[index], "window cluster")
    ]
    if other is not None:
        split, fields = other
        sub = reps.subset(reps.table["split"].to_numpy() == split)
        index, xy = embed_2d(sub.features["dim"], cfg.neighbors, cfg.seed, cfg.figure_points)
        keyed = fields.set_index(["sample", "field"])["cluster_profile"]
        clusters = keyed.reindex(
            pd.MultiIndex.from_arrays([sub.table["sample"], sub.table["field"]])
        ).to_numpy()
        panels.append(
            Panel(split, xy, sub.table["sample"].to_numpy()[index], clusters[index], "field-profile cluster")
        )
    return panels


def _trait_rows(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == k))[:TRAIT_WINDOWS] for k in np.unique(labels)]
    return np.sort(np.concatenate(picks))


@dataclass
class PixelViews:
    """What the pixels of the clustered windows give the report: per-group views, the gallery figure,
    the traits table (one row per group) and the store's channels with their display colours."""

    views: list[ClusterView]
    gallery: bytes
    traits: pd.DataFrame
    channels: list[tuple[str, str]]


def pixel_views(reps: Representations, c: Clustering, cfg: ClusterSettings) -> PixelViews:
    """Per window cluster: gallery strip, traits and the words for them, from the image store the
    representations name."""
    store = open_store(str(reps.attrs["store"]))
    window = int(reps.attrs["window"])
    nearest = nearest_to_centre(c.mixture, c.z, c.labels, cfg.gallery)
    gallery_rows = np.concatenate(list(nearest.values()))
    trait_rows = _trait_rows(c.labels, cfg.seed)
    rows = np.unique(np.concatenate([gallery_rows, trait_rows]))
    crops, masks, scaled = cut_windows(store, reps.table.iloc[rows][["sample", "field", "y", "x"]], window)
    where = {int(r): i for i, r in enumerate(rows)}
    colours = store.channel_colours()
    low, high = display_range([crops[where[int(r)]] for r in gallery_rows])
    images = {
        k: [composite(crops[where[int(r)]], colours, low, high) for r in idx] for k, idx in nearest.items()
    }
    picked = [where[int(r)] for r in trait_rows]
    sampled = window_traits([scaled[i] for i in picked], [masks[i] for i in picked], store.meta.channels)
    sampled["cluster"] = c.labels[trait_rows]
    words = describe(trait_effects(sampled))
    traits = cluster_traits(
        c.labels, reps.table["sample"].astype(str).to_numpy(), reps.table["fg_fraction"].to_numpy(), sampled
    )
    traits["distinguishing"] = ["; ".join(words.get(int(k), [])) for k in traits["cluster"]]
    views = [
        ClusterView(int(k), strip_png(images.get(int(k), [])), t, words.get(int(k), []))
        for k, t in zip(traits["cluster"], traits.drop(columns="distinguishing").to_dict("records"), strict=True)
    ]
    channels = list(zip(store.meta.channels, colours, strict=True))
    return PixelViews(views, gallery_figure(images), traits, channels)


def cluster_maps(reps: Representations, c: Clustering, out: str, max_fields: int) -> str:
    """Write the napari cluster maps of the clustered windows; returns the maps' URL."""
    url = join(out, MAPS)
    windows = reps.table[["sample", "field", "y", "x"]].assign(cluster=c.labels)
    store = open_store(str(reps.attrs["store"]))
    write_maps(url, store, windows, int(reps.attrs["window"]), c.mixture.n_components, max_fields=max_fields)
    return url


def figures(
    reps: Representations,
    primary: Representations,
    c: Clustering,
    cfg: ClusterSettings,
    other: tuple[str, pd.DataFrame] | None,
) -> dict[str, tuple[str, bytes]]:
    """PNG name -> (caption, bytes) for the UMAP, confusion and (when chosen by BIC) BIC figures."""
    out = {
        "umap.png": (
            f"UMAP (2-D, for display) of the {cfg.split} windows"
            + (f" and the {other[0]} windows" if other else "")
            + ", by sample and by cluster",
            umap_figure(umap_panels(reps, primary, c, cfg, other)),
        )
    }
    samples = primary.table["sample"].astype(str).to_numpy()
    tables = [
        ("windows", confusion(samples, c.labels)),
        (
            f"images ({cfg.image_labels})",
            confusion(c.fields["sample"].astype(str).to_numpy(), c.fields[f"cluster_{cfg.image_labels}"]),
        ),
    ]
    out["confusion.png"] = (
        "Cluster-by-sample confusion (colour: share of each sample)",
        confusion_figure(tables),
    )
    if c.bic:
        out["bic.png"] = ("BIC by number of mixture components", bic_figure(c.bic, c.mixture.n_components))
    return out


# ---------------------------------------------------------------- the job
def provenance(url: str, reps: Representations, timings: dict[str, float]) -> dict[str, Any]:
    import sklearn
    import umap

    attrs = {k: v for k, v in reps.attrs.items() if k != "settings"}
    return {
        "representations": url,
        "representations_attrs": attrs,
        "inference_settings": reps.attrs.get("settings"),
        "cellmi_version": __version__,
        "umap_version": umap.__version__,
        "sklearn_version": sklearn.__version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "timings_s": timings,
    }


def _feature_sets(reps: Representations, baselines: bool) -> list[str]:
    names = [n for n in FEATURE_SETS if n in reps.features and (n == "dim" or baselines)]
    missing = [n for n in FEATURE_SETS[1:] if baselines and n not in reps.features]
    if missing:
        log.warning("cluster: baselines %s are not in the representations; not scored", missing)
    return names


def score_feature_set(
    reps: Representations,
    primary: Representations,
    name: str,
    cfg: ClusterSettings,
    k: int,
    select: str,
    client: Any,
    focus: Focus,
) -> tuple[Clustering, dict[str, Any], dict[str, tuple[dict, pd.DataFrame]], dict[str, float]]:
    """Cluster one feature set on the chosen split and score it there and on the other splits.

    Returns the clustering, scores by split, the other splits' (scores, fields) by "name/split",
    and the steps' seconds.
    """
    phen, timings = phenotype_map(reps), {}
    with timed(f"cluster {name}", timings):
        c = cluster_feature_set(primary, name, cfg, k, select, client, focus)
    scores = {cfg.split: primary_scores(primary, c, cfg, phen, primary.features[name])}
    others = {}
    with timed(f"profiles {name}", timings):
        for split in OTHER_SPLITS[cfg.split]:
            found = profile_split(reps, split, name, cfg, phen, focus)
            if found is not None:
                scores[split] = found[0]
                others[f"{name}/{split}"] = found
    return c, scores, others, timings


def score_baseline(
    reps: Representations, primary: Representations, name: str, cfg: ClusterSettings, k: int, focus: Focus, level: int
) -> tuple[np.ndarray, dict[str, Any], dict[str, float]]:
    """``score_feature_set`` of a baseline in a process of its own: window labels, scores, seconds."""
    setup_logging(logging.getLevelName(level))
    with threadpool_limits(1):  # one core each: this process and the one clustering DIM
        c, scores, _, timings = score_feature_set(reps, primary, name, cfg, k, "fixed", None, focus)
    return c.labels, scores, timings


def only(reps: Representations, name: str) -> Representations:
    """The same windows with one feature set (what a baseline's process needs to be sent)."""
    return Representations(reps.table, {name: reps.features[name]}, reps.attrs)


@contextmanager
def baseline_process(cfg: ClusterSettings, names: list[str], windows: int, client: Any) -> Iterator[Any]:
    """A second process for the baselines, while DIM is clustered here: when there are baselines, a
    core for them, enough windows to pay for the process's start (imports and numba compilation),
    a fixed cluster count (by BIC the baselines wait for DIM's) and no Dask placement."""
    apart = len(names) > 1 and cores() >= 2 and windows >= cfg.baselines_apart_above
    if not apart or cfg.select != "fixed" or client is not None:
        yield None
        return
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        log.info("cluster: baselines %s in a second process", ", ".join(names[1:]))
        yield pool


def run_analysis(settings: Settings) -> dict[str, Any]:
    """Cluster every feature set, score, write tables, model, figures, metrics and the report."""
    cfg, timings = settings.cluster, {}
    url, out = join(settings.workdir, REPR_ZARR), join(settings.workdir, ANALYSIS)
    with timed("load", timings):
        reps = with_cover(usable_windows(load_representations(url), url), cfg.profile_density > 0)
    primary = split_rows(reps, cfg.split, url)
    k = cfg.n_clusters or int(primary.table["sample"].nunique())
    with timed("focus", timings):
        focus = fields_focus(reps, cfg)
    metrics: dict[str, Any] = {
        "format": 1,
        "split": cfg.split,
        "image_labels": cfg.image_labels,
        "select": cfg.select,
        "score_keys": list(SCORE_KEYS),
    }
    names = _feature_sets(reps, cfg.baselines)
    labels: dict[str, np.ndarray] = {}
    n = len(primary.table)
    with (
        dask_client(settings, n - cfg.subsample_size if n > cfg.subsample_above else 0) as client,
        baseline_process(cfg, names, n, client) as pool,
    ):
        args = (cfg, k, focus, log.getEffectiveLevel())
        pending = {
            name: pool.submit(score_baseline, only(reps, name), only(primary, name), name, *args)
            for name in (names[1:] if pool else [])
        }
        with threadpool_limits(1 if pending else None):  # the other core is the baselines' process's
            dim, metrics["dim"], others, spent = score_feature_set(
                reps, primary, "dim", cfg, k, cfg.select, client, focus
            )
            timings.update(spent)
            pictures = dim_pictures(settings, out, reps, primary, dim, others, timings, url)
        for name in names[1:]:
            if name not in pending:  # the baselines use DIM's cluster count
                c, metrics[name], _, spent = score_feature_set(
                    reps, primary, name, cfg, dim.mixture.n_components, "fixed", client, focus
                )
                timings.update(spent)
                labels[name] = c.labels
        for name, future in pending.items():
            with timed(f"waiting for {name}", timings):
                labels[name], metrics[name], spent = future.result()
            timings.update({f"{step} (apart)": seconds for step, seconds in spent.items()})
    metrics["n_clusters"] = int(dim.mixture.n_components)
    metrics["bic"] = {str(kk): v for kk, v in dim.bic.items()} or None
    baseline_labels = {name: labels[name] for name in names[1:]}
    write_outputs(settings, out, reps, primary, dim, baseline_labels, pictures, metrics, timings, url)
    return metrics


@dataclass
class Pictures:
    """What the DIM clustering shows: figures (PNG name -> caption, bytes), its pixel views (None
    without the image store), the maps' URL (None without maps) and notes for the report."""

    pngs: dict[str, tuple[str, bytes]]
    pixels: PixelViews | None
    maps: str | None
    notes: list[str]


def dim_pictures(
    settings: Settings,
    out: str,
    reps: Representations,
    primary: Representations,
    dim: Clustering,
    others: dict[str, tuple[dict, pd.DataFrame]],
    timings: dict[str, float],
    url: str,
) -> Pictures:
    """Figures, galleries, traits table and maps of the DIM clustering (writes cluster_traits.csv and
    the maps); needs nothing of the baselines, so it runs while their process works."""
    cfg = settings.cluster
    other_split = next(iter(OTHER_SPLITS[cfg.split]), None)
    other = (other_split, others[f"dim/{other_split}"][1]) if f"dim/{other_split}" in others else None
    with timed("figures", timings):
        pngs = figures(reps, primary, dim, cfg, other)
    notes = [
        f"{len(primary.table)} windows of split {cfg.split!r} from {url}",
        f"{dim.mixture.n_components} clusters ({cfg.select}); image labels: {cfg.image_labels}",
    ]
    pixels: PixelViews | None = None
    maps: str | None = None
    with timed("galleries", timings):
        try:
            pixels = pixel_views(primary, dim, cfg)
            pngs["gallery.png"] = ("Windows nearest each cluster centre", pixels.gallery)
            write_bytes_atomic(join(out, "cluster_traits.csv"), pixels.traits.to_csv(index=False).encode())
        except (UserError, OSError, KeyError) as err:
            log.warning("cluster: no galleries or traits (image store unavailable: %s)", err)
            notes.append(f"galleries and traits unavailable: {err}")
    with timed("maps", timings):
        if cfg.maps and pixels is not None:
            maps = cluster_maps(primary, dim, out, cfg.maps_max_fields)
        else:
            remove(join(out, MAPS))  # maps of an earlier clustering would not match these clusters
    return Pictures(pngs, pixels, maps, notes)


def write_outputs(
    settings: Settings,
    out: str,
    reps: Representations,
    primary: Representations,
    dim: Clustering,
    baseline_labels: dict[str, np.ndarray],
    pictures: Pictures,
    metrics: dict[str, Any],
    timings: dict[str, float],
    url: str,
) -> None:
    """Tables, model, figures, metrics, and the report last (it marks the stage done)."""
    cfg, phen = settings.cluster, phenotype_map(reps)
    fmeta = reps.attrs.get("field_metadata")
    with timed("tables and model", timings):
        save_model(join(out, MODEL_FILE), model_bundle(dim, cfg, window_of(reps)))
        write_parquet(
            join(out, "clusters_windows.parquet"),
            window_frame(primary.table, dim.labels, dim.prob, dim.z, phen, baseline_labels, fmeta),
        )
        images = image_frame(dim.fields, cfg.image_labels, phen, fmeta)
        write_parquet(join(out, "clusters_images.parquet"), images)
    pngs, pixels = pictures.pngs, pictures.pixels
    for name, (_, png) in pngs.items():
        write_bytes_atomic(join(out, name), png)
    metrics["timings_s"] = timings
    write_bytes_atomic(join(out, "metrics.json"), json.dumps(metrics, indent=2).encode())
    report = ReportData(
        title=f"cellmi clustering report: {settings.workdir}",
        metrics=metrics,
        settings=as_dict(settings),
        provenance=provenance(url, reps, timings),
        figures=[pngs[n] for n in ("umap.png", "confusion.png", "bic.png") if n in pngs],
        clusters=pixels.views if pixels else [],
        notes=pictures.notes,
        fields=images,
        channels=pixels.channels if pixels else [],
        maps=pictures.maps,
    )
    write_bytes_atomic(join(out, "report.html"), render_report(report).encode())
    log.info("cluster: report at %s", join(out, "report.html"))


def apply_saved(settings: Settings) -> dict[str, Any]:
    """Assign the windows of ``cluster.apply_to`` to the clusters of the saved model."""
    out = join(settings.workdir, ANALYSIS)
    bundle = load_model(join(out, MODEL_FILE))
    url = str(settings.cluster.apply_to)
    reps = with_cover(usable_windows(load_input(url), url), bundle["profiles"].weights is not None)
    x = reps.features[bundle["feature_set"]]
    if x.shape[1] != bundle["feature_dim"]:
        raise UserError(
            f"{url}: {x.shape[1]}-d vectors, but the saved model was fitted on {bundle['feature_dim']}-d ones"
        )
    with dask_client(settings, len(x) if len(x) > CHUNK else 0) as client:
        z, proba = place_clusters(bundle["reducer"], bundle["mixture"], x, client, settings.cluster.placement)
    labels, prob = most_probable(proba)
    model: ProfileModel = bundle["profiles"]
    window = window_of(reps) or bundle.get("window")  # a Parquet table does not record it; the fit did
    fields, profiles = profiles_of(reps.table, x, bundle["aggregate"], model.weights is not None, window)
    votes = vote(reps.table, labels).rename(columns={"cluster": "cluster_vote"}).drop(columns="n_windows")
    fields = fields.merge(votes, on=["sample", "field"], how="left", validate="1:1")
    fields["cluster_profile"] = assign_profiles(model, profiles)
    phen = phenotype_map(reps)
    target = join(out, APPLIED)
    write_parquet(
        join(target, "clusters_windows.parquet"),
        window_frame(reps.table, labels, prob, z, phen, {}, reps.attrs.get("field_metadata")),
    )
    write_parquet(join(target, "clusters_images.parquet"),
                  image_frame(fields, bundle["image_labels"], phen, reps.attrs.get("field_metadata")))
    samples = reps.table["sample"].astype(str).to_numpy()
    metrics = {
        "source": url,
        "n_windows": len(x),
        "n_images": len(fields),
        **_scores(samples, labels, "window"),
        **image_scores(fields, fields["cluster_vote"].to_numpy(), "_vote", {}),
        **image_scores(fields, fields["cluster_profile"].to_numpy(), "_profile", {}),
    }
    write_bytes_atomic(join(target, "metrics.json"), json.dumps(metrics, indent=2).encode())
    log.info("cluster: assigned %d windows of %s to the saved clusters -> %s", len(x), url, target)
    return metrics


def main(settings: Settings) -> int:
    """Entry point of ``cellmi cluster``."""
    if settings.cluster.apply_to:
        apply_saved(settings)
    else:
        run_analysis(settings)
    return 0
