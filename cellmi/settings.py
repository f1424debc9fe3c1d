"""One typed settings tree for every job.

Every field is an environment variable ``CELLMI_<SECTION>__<FIELD>`` and a command-line flag
``--<section>.<field>``; e.g. ``CELLMI_TRAIN__STEPS=500`` is ``--train.steps 500``.
Command-line flags beat environment variables, which beat the defaults below.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cellmi.colours import parse_pairs
from cellmi.errors import UserError

ENV_PREFIX = "CELLMI_"
NESTED = "__"
CHANNEL_NAMES = ("DNA", "pH3", "actin")
TEST_VIEWS = (1, 2, 4, 8)  # dihedral views a window vector may average over (infer.views)
_URL = re.compile(r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|[^:]*|[A-Za-z]:[\\/].*)$")


def check_url(value: str | None) -> str | None:
    """A local path or ``s3://bucket[/prefix]``; anything else (http://, a bad bucket) is refused."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if not _URL.match(value):
        raise ValueError(f"{value!r} is neither a local path nor s3://bucket/prefix")
    return value.rstrip("/") if value.startswith("s3://") else value


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SynthSettings(Section):
    """The synthetic HT29-like screen (the embedded default data set)."""

    seed: int = Field(0, description="Random seed; the same seed gives the same images bit for bit.")
    samples: int = Field(14, ge=2, le=14, description="Number of samples (one phenotype each, at most 14).")
    fields: int = Field(4, ge=1, le=16, description="Fields of view per sample.")
    size: int = Field(512, ge=64, le=4096, description="Field height and width in pixels.")
    variation: Literal["base", "dev", "heldout"] = Field(
        "base",
        description="Plate-, well- and field-level nuisances of real screens added to the draw (density, "
        "stain drift, per-channel vignetting, focus, debris, uneven background, cell size and shape, touching "
        "colonies): base adds none (the original generator, bit for bit), dev the development draws' "
        "variation, heldout wider, for the held-out draws; ranges in docs/quality-protocol.md.",
    )
    raw_out: str | None = Field(
        None,
        description="Write BBBC018-style .DIB files to this folder (local or s3://) instead of a store.",
    )

    _url = field_validator("raw_out")(check_url)


class IngestSettings(Section):
    """Raw images to an OME-Zarr store with foreground masks."""

    preset: Literal["bbbc018", "cellomics", "generic"] = Field(
        "bbbc018",
        description="File naming: bbbc018 ({well}-{channel}.DIB, sample = first 4 digits of the well, "
        "field = last digit); cellomics (the ArrayScan export {plate}_{well}f{field}d{channel}.{tif,DIB,C01}, "
        "o{channel} too, sample = well); generic ({sample}_{field}_{channel}.{tif,png,dib,c01}).",
    )
    pattern: str | None = Field(
        None,
        description="Regex with named groups field, channel and sample (or well, with an optional plate), "
        "matched against file names; overrides the preset.",
    )
    channels: CsvList | None = Field(
        None,
        description="Channel names in store order (comma-separated). Where file names carry channel names "
        "(bbbc018, generic) each must occur in them; default DNA,pH3,actin. Where they carry the instrument's "
        "channel indices (cellomics d0, d1 ...), they name the indices found in index order (DNA,pH3,actin "
        "names d0, d1, d2); default ch0, ch1 ...",
    )
    platemap: str | None = Field(
        None,
        description="Plate map (CSV, TSV or Parquet; local or s3://) with Metadata_Plate (optional), "
        "Metadata_Well and any columns, joined onto the images by plate and well; every column reaches the "
        "output tables as Metadata_*.",
    )
    sample_by: CsvList = Field(
        ["well"],
        description="What defines a sample (the fields that pair in training): well (default; plate and well "
        "when there are several plates), or plate-map column(s), e.g. treatment or compound,dose, which makes "
        "the replicate wells of a treatment the fields of one sample.",
    )
    label_by: str | None = Field(
        None,
        description="Plate-map column holding a known label per sample, used only for evaluation (instead of "
        "phenotypes.json).",
    )
    illumination: str = Field(
        "auto",
        description="Illumination correction at ingest, per plate and channel: estimate (a flat-field from all "
        "the plate's fields: per-pixel median, heavily smoothed, divided out), none, auto (estimate when a "
        "plate has at least 10 fields, else none), or a folder of flat-fields named {channel} or "
        "{plate}_{channel} (.tif or .npy).",
    )
    test_samples: CsvList | None = Field(
        None,
        description="Comma-separated sample ids held out for test; overrides the default split.",
    )
    n_test: int = Field(4, ge=0, description="Samples held out for test when test_samples is unset.")
    split_seed: int = Field(0, description="Seed of the shuffle that picks the held-out samples.")
    overwrite: bool = Field(False, description="Replace an existing store instead of refusing.")
    workers: int = Field(
        0, ge=0, description="Parallel readers; 0 means one per CPU core this process may use (a container's CPU set)."
    )
    mask_pixels: int = Field(
        40_000, ge=1_000, description="Pixels sampled per image to fit the foreground mixture."
    )
    chunk: int = Field(256, ge=32, description="Zarr chunk edge in pixels.")
    intensity: Literal["field", "store"] = Field(
        "field",
        description="Intensity normalisation recorded in the store: field (per field, background off each "
        "channel, signal divided by the field's scale, then log(signal + the store's pedestal): a field's gain "
        "cancels, channel ratios stay) or store (log1p of raw counts); both then standardised with the "
        "training samples' statistics.",
    )
    colors: CsvList = Field(
        [],
        description="Display colour of channels as name=RRGGBB pairs (comma-separated, e.g. GFP=00FF00), kept in the "
        "store's NGFF omero metadata and used by the report and napari. A channel not named here takes its name's "
        "colour in the default palette (DNA/DAPI/Hoechst blue, actin/phalloidin red, GFP/pH3 green, RFP/mCherry/Mito "
        "magenta, ER cyan, RNA yellow; docs/outputs.md), else the next unused of green, magenta, cyan, yellow, red, "
        "blue, orange, white.",
    )

    _colors = field_validator("colors", mode="before")(_split_csv)
    _colors_ok = field_validator("colors")(parse_pairs)
    _csv = field_validator("channels", "test_samples", "sample_by", mode="before")(_split_csv)
    _platemap_url = field_validator("platemap")(check_url)

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            compiled = re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        groups = set(compiled.groupindex)
        missing = {"field", "channel"} - groups
        if missing or not groups & {"sample", "well"}:
            raise ValueError(f"needs named groups field, channel and sample or well (has {sorted(groups)})")
        return value

    @field_validator("illumination")
    @classmethod
    def _illumination(cls, value: str) -> str:
        word = value.strip().lower()
        if word in ("auto", "estimate", "none"):
            return word
        checked = check_url(value)
        assert checked is not None
        return checked

    @field_validator("sample_by")
    @classmethod
    def _sample_by(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one column (well, plate or a plate-map column)")
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("needs at least one channel")
        if len(set(value)) != len(value):
            raise ValueError(f"repeated channel in {value}")
        return value


# Encoder size presets (model.size): the widths they set unless given explicitly. Compute per crop grows
# about 4x per step up; large and xl are meant for GPUs, whose headroom the base model leaves unused.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "base": {"width": 16, "local_dim": 128, "critic_dim": 256},
    "large": {"width": 32, "local_dim": 256, "critic_dim": 512},
    "xl": {"width": 64, "local_dim": 512, "critic_dim": 1024},
}


class ModelSettings(Section):
    """Encoder architecture (saved with every checkpoint)."""

    size: Literal["base", "large", "xl"] = Field(
        "base",
        description="Size preset: base (width 16, local_dim 128, critic_dim 256), large (32, 256, 512) or xl "
        "(64, 512, 1024), about 1x, 4x and 16x the compute per crop; width, local_dim and critic_dim given "
        "explicitly win.",
    )

    crop: int = Field(
        256, ge=32, le=1024, description="Training crop edge in pixels (multiple of the stride); the window too."
    )
    width: int = Field(
        16, ge=4, le=1024,
        description="Channels of the first conv layer (the trunk widens to 2x and 4x, then local_dim).",
    )
    local_dim: int = Field(128, ge=8, le=2048, description="Channels of the local feature map.")
    global_dim: int = Field(64, ge=2, le=2048, description="Size of the global representation.")
    pool: Literal["mean", "foreground"] = Field(
        "foreground",
        description="Global vector from the plain mean of the local map, or weighted by each position's foreground.",
    )
    critic_dim: int = Field(256, ge=8, le=4096, description="Size of the critic embedding space.")

    @model_validator(mode="before")
    @classmethod
    def _size_preset(cls, data: Any) -> Any:
        """Fill width, local_dim and critic_dim from the size preset where they are not given."""
        if isinstance(data, dict) and isinstance(data.get("size"), str) and data["size"] in MODEL_SIZES:
            return {**MODEL_SIZES[data["size"]], **data}
        return data


def _none_word(value: Any) -> Any:
    """``none``, ``null`` or empty (from a variable or flag) means None."""
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None
    return value


class TrainSettings(Section):
    """Deep InfoMax training (single process or under torchrun)."""

    steps: int = Field(3000, ge=1, description="Optimisation steps.")
    time_budget_s: float | None = Field(
        220.0,
        gt=0,
        description="Stop after this many seconds of training (wall clock of the loop, waits for data included, "
        "checkpoint writes not) even if steps remain (none: no limit).",
    )
    batch_samples: int = Field(8, ge=2, description="B: samples per batch (per process).")
    fields_per_sample: int = Field(
        4,
        ge=1,
        description="N: fields of view per sample in a batch. Fewer fit more steps in the time budget but make a "
        "sample's positives only part of it: 2 gave 1.7x the steps and lower scores on 6 development runs.",
    )
    lr: float = Field(
        1e-3,
        gt=0,
        description="Adam learning rate of encoder and critics. 0.002 scored lower on 15 development runs "
        "(field nearest-neighbour accuracy down on 8, up on 2).",
    )
    prior_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the prior discriminator.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="Learning rates (lr, prior_lr) held constant, or falling along a half cosine to 5% of them as "
        "training runs out (of steps or of time budget, whichever runs out first; resumed runs go on where they "
        "stopped).",
    )
    estimator: Literal["jsd", "infonce", "dv"] = Field("jsd", description="Mutual-information estimator.")
    alpha: float = Field(0.0, ge=0, description="Weight of the global MI term.")
    beta: float = Field(1.0, ge=0, description="Weight of the local MI term.")
    gamma: float = Field(0.1, ge=0, description="Weight of the prior-matching term.")
    prior_ramp_steps: int = Field(300, ge=0, description="Steps over which gamma ramps up from 0.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    min_foreground: float = Field(0.15, ge=0, le=1, description="Least foreground fraction of a crop.")
    augment: bool = Field(True, description="Flips, 90-degree rotations and microscope nuisances.")
    aug_gain: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Nuisance gain jitter: each crop channel scaled by up to 1 +- this. Off by default: field "
        "normalisation already takes the gain off, and a per-channel jitter teaches the encoder to ignore a "
        "channel's level (the pH3 of a mitotic arrest).",
    )
    aug_blur: float = Field(0.25, ge=0, le=1, description="Share of crops blurred like a defocused field.")
    aug_blur_sigma: float = Field(
        3.5,
        gt=0,
        le=16,
        description="Largest Gaussian blur sigma in pixels (drawn from 0.5 up to this): as far as a badly "
        "defocused field blurs.",
    )
    aug_tilt: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Share of the crops not blurred that get a focus gradient instead: sharp at one edge, blurred "
        "towards the opposite one (up to aug_blur_sigma), as in a tilted sample or a curved plate bottom. "
        "0 turns it off.",
    )
    local_foreground: float = Field(
        0.1, ge=0, le=1, description="Local positions seeing less foreground than this are left out of the loss."
    )
    crop_pairs: float = Field(
        1.0,
        ge=0,
        description="Weight of a second local term with crop-level pairs (a crop's own positions are its only "
        "positives): keeps per-crop detail that sample-level pairs average away.",
    )
    content: float = Field(
        3.0,
        ge=0,
        description="Weight of the content term: a linear head on the global vector predicts its crop's foreground "
        "mean, spread and bright tail per channel and its foreground share, so the vector keeps what varies within "
        "samples (such as pH3-bright mitoses), which sample-level pairs teach it to ignore.",
    )
    ema: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Decay of an exponential moving average of the encoder's weights, updated every step and saved "
        "in each checkpoint, which inference then uses (infer.ema); 0.998 averages over roughly the last 500 steps. "
        "0 (default): no average; on 6 development runs 0.998 moved all-sample image ARI by +0.015 and held-out "
        "image ARI by -0.02 on average (same trainings embedded both ways): no gain beyond run-to-run noise.",
    )
    gather_negatives: bool = Field(True, description="Gather negatives across processes (all_gather).")
    checkpoint_every: int = Field(200, ge=1, description="Write a checkpoint every K steps.")
    keep_checkpoints: int = Field(3, ge=1, description="Newest checkpoints kept.")
    memory_gb: float = Field(
        4.0,
        gt=0,
        description="Memory for prepared training fields per process (GiB, on the training device): a set that "
        "does not fit is walked in shards of whole samples, two held at once.",
    )
    shard_epochs: int = Field(
        16,
        ge=1,
        description="Passes over a shard's samples before moving on to the next (when sharded): long enough for the "
        "next shard to load meanwhile.",
    )
    seed: int = Field(0, description="Base seed; each process uses seed + rank.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")
    amp: bool = Field(
        True,
        description="bf16 autocast where bf16 is native: CUDA, and CPUs with AMX or AVX-512 BF16 (training 1.5x "
        "faster there); ignored on other CPUs, where it would be emulated.",
    )
    channels_last: bool = Field(True, description="channels_last memory format (CUDA and CPU convolutions).")
    threads: int = Field(
        0,
        ge=0,
        description="Torch threads per process; 0: this machine's cores / processes on it, less one for the crop "
        "thread.",
    )
    loader_threads: int = Field(
        0,
        ge=0,
        description="Threads making batches ahead of the step per process (each a few batched tensor operations "
        "on the training device); 0 means one.",
    )
    dist_timeout_s: float = Field(300.0, gt=0, description="Timeout of collective operations.")
    log_every: int = Field(20, ge=1, description="Steps between metrics-file lines.")

    _no_budget = field_validator("time_budget_s", mode="before")(_none_word)


class InferSettings(Section):
    """Sliding-window inference on a Dask cluster."""

    checkpoint: str | None = Field(
        None, description="Checkpoint file or folder (local or s3://); default: newest in {workdir}/checkpoints."
    )
    window: int | None = Field(None, ge=16, description="Window edge; default: the training crop.")
    stride: int | None = Field(
        32, ge=1, description="Window step in pixels (a multiple of the encoder stride); none: half a window."
    )
    min_foreground: float = Field(0.1, ge=0, le=1, description="Windows with less foreground are dropped.")
    _half_window = field_validator("stride", mode="before")(_none_word)
    keep_background: bool = Field(False, description="Keep background windows, flagged, instead of dropping.")
    ema: bool = Field(
        True,
        description="Embed with the checkpoint's moving average of the encoder weights (train.ema) when it holds "
        "one; false: its last weights.",
    )
    views: int = Field(
        1,
        description="Test-time views: each window's vector is the mean over this many dihedral views of its "
        "field (1: as is; 2: and flipped; 4: quarter turns; 8: turns and flips); costs that many passes.",
    )
    readout: Literal["head", "pooled", "both"] = Field(
        "head",
        description="Where a window's vector is read: head (the global vector the training shapes), pooled (the "
        "foreground-weighted mean of the local map that feeds the head, local_dim wide) or both side by side. "
        "The untrained baseline is read the same way.",
    )
    mode: Literal["shared", "naive"] = Field(
        "shared", description="shared: one feature map per field; naive: encode each window alone."
    )
    scheduler_address: str | None = Field(
        None, description="Existing Dask scheduler; DASK_SCHEDULER_ADDRESS is used when this is unset."
    )
    workers: int = Field(
        0,
        ge=0,
        description="Local cluster worker processes; 0 means one per CPU core this process may use (a container's "
        "CPU set).",
    )
    fields_per_task: int = Field(
        0,
        ge=0,
        description="Fields per Dask task on CPU workers (a task writes its fields as one part); 0: as many as "
        "leave each worker at least 4 tasks, at most 8.",
    )
    retries: int = Field(3, ge=0, description="Retries of a failed task.")
    batch_windows: int = Field(64, ge=1, description="Windows per forward pass in naive mode.")
    device: Literal["auto", "cpu"] = Field(
        "auto",
        description="auto: when Dask workers offer a GPU resource (dask worker --resources GPU=1; the embedded "
        "cluster has one such worker on a machine with CUDA), every field goes to them in batches of gpu_fields; "
        "cpu: one field at a time on any worker.",
    )
    gpu_fields: int = Field(
        32, ge=1, description="Fields per task on a GPU worker: fields of one shape share each forward pass."
    )
    precision: Literal["bf16", "float32"] = Field(
        "bf16",
        description="Precision of the encoder's conv trunk on a GPU (bf16 autocast; vectors within ~1 % of "
        "float32); pooling and head stay float32. On the CPU always float32.",
    )
    prep_threads: int = Field(
        0, ge=0, description="Threads reading and preparing the fields of a GPU task; 0: the worker's cores."
    )
    baseline_seed: int = Field(0, description="Seed of the untrained encoder of the random baseline.")
    memory_limit_gb: float = Field(
        4.0, gt=0, description="Refuse settings whose estimated per-task memory exceeds this."
    )

    @field_validator("views")
    @classmethod
    def _views(cls, value: int) -> int:
        if value not in TEST_VIEWS:
            raise ValueError(f"must be 1, 2, 4 or 8, got {value}")
        return value


class ClusterSettings(Section):
    """UMAP + Gaussian mixture, metrics, figures and report."""

    split: Literal["test", "train", "all"] = Field("test", description="Which samples to cluster.")
    umap_dim: int = Field(8, ge=2, le=100, description="UMAP dimension used for clustering.")
    neighbors: int = Field(15, ge=2, description="UMAP n_neighbors.")
    min_dist: float = Field(0.0, ge=0, le=1, description="UMAP min_dist of the clustering embedding.")
    n_clusters: int | None = Field(None, ge=1, description="Mixture components; default: samples in split.")
    select: Literal["fixed", "bic"] = Field("fixed", description="fixed: n_clusters; bic: best BIC in range.")
    bic_min: int = Field(2, ge=1, description="Smallest component count tried by BIC.")
    bic_max: int = Field(20, ge=1, description="Largest component count tried by BIC.")
    image_labels: Literal["profile", "vote"] = Field(
        "profile", description="Per-image labels from aggregated field profiles or from the window vote."
    )
    aggregate: Literal["even", "weighted", "mean", "median"] = Field(
        "even",
        description="Window-to-field aggregation: even (weighted by each window's foreground fraction and evened "
        "out so that every part of a field has about the same say, not mostly its middle, which overlapping "
        "windows cover most), weighted (by foreground fraction alone), mean, or median.",
    )
    profile_density: float = Field(
        1.5,
        ge=0,
        description="Weight of a field's cover (the share of the field its foreground mask covers: how densely "
        "cells grow) as one more feature of its profile, in standardised features (2: it counts like 4 of the "
        "window vectors' features in distances between fields); 0 leaves it out. Window vectors are pooled over "
        "foreground and barely see density. Chosen on development draws 1-4 (12 runs, weights 0-8): all-sample "
        "image ARI 0.944 -> 0.957, field nearest-neighbour accuracy 0.930 -> 0.938 at 1.5; above 2 density "
        "outweighs morphology. Representations without the cover (made before it was measured) take it from "
        "the image store, else from the windows' mean foreground.",
    )
    profile_dims: int = Field(16, ge=2, description="PCA dimensions of field profiles before clustering.")
    profile_scale: Literal["rank", "standard"] = Field(
        "rank",
        description="Standardisation of field profiles across fields: normal scores of ranks, or z-scores.",
    )
    profile_method: Literal["spectral", "ward", "gmm"] = Field(
        "spectral",
        description="Clustering of field profiles: spectral clustering of their nearest-neighbour graph, "
        "Ward linkage, or a diagonal Gaussian mixture.",
    )
    profile_neighbors: int | None = Field(
        None,
        ge=2,
        description="Nearest fields (itself included) each field is linked to in the spectral graph; the "
        "consensus of this size and one either side is taken. Default: the median number of fields per sample, "
        "at most 32.",
    )
    focus_qc: float = Field(
        0.67,
        ge=0,
        lt=1,
        description="Fields whose focus score is below this fraction of the split's median are flagged blurred "
        "(the blurred column of the image table); 0 turns the check off.",
    )
    fit_blurred: bool = Field(
        True,
        description="Blurred fields take part in fitting the field clusters (the spectral graph still links "
        "them to their own sample's fields); false leaves them out and assigns them to the nearest cluster.",
    )
    figure_points: int = Field(
        3000, ge=100, description="Windows per panel of the 2-D UMAP figure (a seeded subsample above it)."
    )
    subsample_above: int = Field(
        20_000, ge=100, description="Fit UMAP and GMM on a subsample when there are more windows."
    )
    subsample_size: int = Field(
        4_000,
        ge=100,
        description="Size of that subsample. Up to 4,095 UMAP finds exact neighbours (above, pynndescent, whose "
        "compilation costs ~30 s a process); raise it for many clusters (~300 windows a cluster).",
    )
    placement: Literal["knn", "umap"] = Field(
        "knn",
        description="How windows outside the UMAP subsample are placed: knn, the weighted mean of the "
        "embedding of their nearest fitted windows (how UMAP's transform starts; ~30 s per 10^6 windows on 2 cores); "
        "umap, UMAP's transform itself (on Dask above 50,000 windows; ~5 ms a window below 4,096 fitted "
        "windows, where umap-learn compares every pair, ~0.5 ms above).",
    )
    baselines: bool = Field(True, description="Also score an untrained encoder and hand-crafted features.")
    baselines_apart_above: int = Field(
        20_000,
        ge=0,
        description="From this many windows to cluster on, with 2 or more cores and a fixed cluster count, the "
        "baselines are clustered in a second process while DIM is clustered in the first (same results).",
    )
    gallery: int = Field(8, ge=1, description="Windows per cluster in the gallery.")
    seed: int = Field(0, description="Seed of UMAP, the mixture and subsampling.")
    restarts: int = Field(
        3,
        ge=1,
        description="Fits of UMAP and the window mixture, under seeds seed, seed + 1, ...; the one whose clusters "
        "agree best with the others' (mean adjusted Rand index over the fitted windows) is kept. One fit's "
        "window clusters move with its seed alone (held-out window ARI by up to 0.24 on a development run); "
        "the most agreed of 3 avoids the unlucky fits, at 3x the window step's time. 1: a single fit.",
    )
    apply_to: str | None = Field(
        None, description="Assign this representations table/store to the saved clusters instead of fitting."
    )
    maps: bool = Field(
        True,
        description="Write analysis/maps.zarr: each clustered field's channels with its window clusters as an NGFF "
        "label image, for napari (a copy of those fields' pixels; false skips it).",
    )
    maps_max_fields: int = Field(
        256,
        ge=0,
        description="Most fields given a cluster map (about 55 ms each): above it, every sample's first fields "
        "in turn; 0: every field.",
    )

    _url = field_validator("apply_to")(check_url)

    @model_validator(mode="after")
    def _bic_range(self) -> ClusterSettings:
        if self.bic_min > self.bic_max:
            raise ValueError("bic_min must not exceed bic_max")
        return self


class TimeoutSettings(Section):
    """How long to wait on storage (S3) and Dask before giving up: exit status 75, safe to retry."""

    s3_connect_s: float = Field(10.0, gt=0, description="Seconds to open a connection to the S3 endpoint.")
    s3_read_s: float = Field(
        20.0,
        gt=0,
        description="Seconds an S3 request may wait for the next bytes of an answer (uploading: for the endpoint to "
        "take the next bytes) before it is retried.",
    )
    s3_attempts: int = Field(
        5,
        ge=1,
        le=20,
        description="Tries of each S3 request (the first included), with exponential backoff between them; with "
        "the defaults an endpoint that stays silent is given up on within about two minutes.",
    )
    dask_s: float = Field(
        60.0,
        gt=0,
        description="Dask connect and TCP timeouts, and (embedded cluster) how long a worker may miss its heartbeats "
        "before its tasks move to another worker.",
    )
    stall_s: float = Field(
        600.0,
        gt=0,
        description="A stage waiting on storage or Dask that makes no progress (no field, step or file done) for this "
        "long stops with one line naming what it waited on, exit status 75.",
    )


class Settings(BaseSettings):
    """All of cellmi's settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED,
        extra="forbid",
        validate_default=True,
        nested_model_default_partial_update=True,
    )

    workdir: str = Field("./cellmi-work", description="Run folder, local path or s3://bucket/prefix.")
    source: str | None = Field(None, description="Raw images to ingest (folder or s3://); unset: synthetic.")
    quick: bool = Field(False, description="Tiny data and few steps: a smoke test in under two minutes.")
    force: bool = Field(False, description="Redo finished stages and replace existing outputs.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    synth: SynthSettings = Field(default_factory=SynthSettings, description="Synthetic data set.")
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="Ingest of raw images.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="Encoder architecture.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Training.")
    infer: InferSettings = Field(default_factory=InferSettings, description="Inference.")
    cluster: ClusterSettings = Field(default_factory=ClusterSettings, description="Clustering and report.")
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings, description="Storage and Dask timeouts.")

    _urls = field_validator("workdir", "source")(check_url)


SECTIONS = ("synth", "ingest", "model", "train", "infer", "cluster", "timeouts")


def env_names() -> set[str]:
    """Every environment variable name the settings tree accepts."""
    names = set()
    for name, info in Settings.model_fields.items():
        names.add(f"{ENV_PREFIX}{name}".upper())
        section = info.annotation
        if name in SECTIONS:
            for sub in section.model_fields:  # type: ignore[union-attr]
                names.add(f"{ENV_PREFIX}{name}{NESTED}{sub}".upper())
    return names


def check_env(environ: dict[str, str] | None = None) -> None:
    """Refuse ``CELLMI_*`` variables that name no setting (typos are errors, not ignored)."""
    environ = os.environ if environ is None else environ
    known = env_names()
    unknown = sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if unknown:
        raise UserError(f"{unknown[0]}: unknown setting (see `cellmi config` for the valid names)")


def as_dict(settings: BaseModel, redact: bool = True) -> dict[str, Any]:
    """Settings as plain nested JSON types; credentials inside URLs are redacted."""
    data = settings.model_dump(mode="json")
    return _redact(data) if redact else data


_USERINFO = re.compile(r"(://)[^/@\s]+@")


def redact(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://***@host`` anywhere in a text (messages, logs)."""
    return _USERINFO.sub(r"\1***@", text)


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def digest(data: Any) -> str:
    """Short stable hash of JSON-able settings, used to tell whether a stage must be redone."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
