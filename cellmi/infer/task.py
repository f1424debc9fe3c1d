"""What one Dask task does: embed a few fields and write each as a part.

The task carries only URLs and numbers (:class:`InferJob`); each worker process loads the
models from the checkpoint URL once and keeps them (:func:`load_models`, cached by URL and
hash), so the weights are never pickled into tasks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from cellmi.infer.embed import EncoderLike, embed_naive, embed_shared, embed_views
from cellmi.infer.handcrafted import window_features
from cellmi.infer.parts import FieldResult, done_names, write_part
from cellmi.infer.windows import foreground_fraction, window_grid
from cellmi.store import ImageStore, S3Limits, image_name, open_store, set_s3_limits

__all__ = ["InferJob", "Models", "embed_field", "load_models", "run_task"]


@dataclass(frozen=True)
class InferJob:
    """Everything a task needs, as plain values (cheap to send with every task)."""

    store: str
    checkpoint: str
    checkpoint_sha256: str
    parts: str
    window: int
    stride: int
    mode: Literal["shared", "naive"]
    views: int
    min_foreground: float
    keep_background: bool
    batch_windows: int
    baseline_seed: int
    run_id: str
    s3: S3Limits  # the client's timeouts.s3_*: workers elsewhere do not see its flags


@dataclass(frozen=True)
class Models:
    """The trained encoder and the same architecture untrained (baseline), both in eval mode."""

    dim: EncoderLike
    random: EncoderLike


@functools.lru_cache(maxsize=2)
def load_models(checkpoint: str, sha256: str, baseline_seed: int) -> Models:
    """Load once per process; ``sha256`` is part of the key so a replaced checkpoint is reloaded."""
    from cellmi.train.checkpoint import build_encoder, load_encoder

    encoder, meta = load_encoder(checkpoint, device="cpu")
    untrained = build_encoder(meta["arch"], baseline_seed)
    untrained.eval()
    encoder.eval()
    return Models(dim=encoder, random=untrained)


@functools.lru_cache(maxsize=2)
def _store(url: str, run_id: str) -> ImageStore:
    """Opened once per run and process; a store re-ingested at the same URL is never served stale."""
    return open_store(url)


def embed_field(job: InferJob, store: ImageStore, models: Models, sample: str, field: str) -> FieldResult:
    """Windows of one field with their foreground fraction and the three feature sets."""
    raw = store.read_image(sample, field)
    mask = store.read_mask(sample, field)
    corners = window_grid(raw.shape[1:], job.window, job.stride)
    fg = foreground_fraction(mask, corners, job.window)
    keep = np.ones(len(corners), bool) if job.keep_background else fg >= job.min_foreground
    corners, fg = corners[keep], fg[keep]
    norm = store.normalise(raw, mask)
    embed = embed_shared if job.mode == "shared" else embed_naive
    args = (norm, corners, job.window, job.batch_windows, mask, job.views)
    features = {
        "dim": embed_views(embed, models.dim, *args),
        "random": embed_views(embed, models.random, *args),
        "handcrafted": window_features(raw, norm, mask, corners, job.window),
    }
    return FieldResult(
        sample,
        field,
        corners[:, 0].astype(np.int32),
        corners[:, 1].astype(np.int32),
        fg,
        fg < job.min_foreground,
        features,
    )


def run_task(job: InferJob, fields: list[tuple[str, str]], threads: int = 1) -> list[str]:
    """Embed the fields not done yet and write their parts; returns the names computed here."""
    torch.set_num_threads(threads)
    set_s3_limits(job.s3)
    store = _store(job.store, job.run_id)
    models = load_models(job.checkpoint, job.checkpoint_sha256, job.baseline_seed)
    done = done_names(job.parts) if len(fields) > 1 else set()
    computed = []
    for sample, field in fields:
        name = image_name(sample, field)
        if name in done:  # an earlier attempt of this task got this far
            continue
        write_part(job.parts, embed_field(job, store, models, sample, field), job.run_id)
        computed.append(name)
    return computed
