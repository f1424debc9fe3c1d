"""What one Dask task does: embed a few fields and write them as one part.

The task carries only URLs and numbers (:class:`InferJob`); each worker process loads the
models from the checkpoint URL once and keeps them (:func:`load_models`, cached by URL, hash and
device), so the weights are never pickled into tasks. A CPU task embeds its fields one by one;
a batched task (sent to workers with a ``GPU`` resource) prepares its fields on several threads
(read, normalise, hand-crafted features) and embeds all fields of one shape in one forward pass
per map group, in bf16 on a GPU (:func:`cellmi.infer.embed.embed_batch`).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from cellmi.analyze.focus import focus_score
from cellmi.hardware import cores
from cellmi.infer.embed import EncoderLike, embed_batch, embed_naive, embed_shared, embed_views, view_of
from cellmi.infer.handcrafted import window_features
from cellmi.infer.parts import FieldResult, done_names, write_parts
from cellmi.infer.windows import foreground_fraction, window_grid
from cellmi.store import ImageStore, S3Limits, image_name, open_store, set_s3_limits

__all__ = [
    "InferJob",
    "Models",
    "Prepared",
    "embed_batched",
    "embed_field",
    "load_models",
    "models_for",
    "prepare_field",
    "run_task",
]


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
    batched: bool = False  # many fields per forward pass (tasks sent to GPU workers)
    precision: Literal["bf16", "float32"] = "bf16"  # of the conv trunk in batched tasks on a GPU
    prep_threads: int = 0  # threads preparing the fields of a batched task; 0: the process's cores
    ema: bool = True  # the checkpoint's moving average of the weights, when it holds one
    readout: str = "head"  # where a window's vector is read (cellmi.model.encoder.READOUTS)


@dataclass(frozen=True)
class Models:
    """The trained encoder and the same architecture untrained (baseline), both in eval mode."""

    dim: EncoderLike
    random: EncoderLike


@functools.lru_cache(maxsize=2)
def load_models(
    checkpoint: str, sha256: str, baseline_seed: int, device: str = "cpu", ema: bool = True, readout: str = "head"
) -> Models:
    """Load once per process; ``sha256`` is part of the key so a replaced checkpoint is reloaded.
    Both encoders are read out at ``readout``."""
    from cellmi.model.encoder import Readout
    from cellmi.train.checkpoint import build_encoder, load_encoder

    encoder, meta = load_encoder(checkpoint, device="cpu", average=ema)
    untrained = build_encoder(meta["arch"], baseline_seed)
    return Models(
        dim=Readout(encoder, readout).to(device).eval(), random=Readout(untrained, readout).to(device).eval()
    )


def models_for(job: InferJob, device: str = "cpu") -> Models:
    """The job's encoders on ``device`` (loaded once per process)."""
    return load_models(job.checkpoint, job.checkpoint_sha256, job.baseline_seed, device, job.ema, job.readout)


@functools.lru_cache(maxsize=2)
def _store(url: str, run_id: str) -> ImageStore:
    """Opened once per run and process; a store re-ingested at the same URL is never served stale."""
    return open_store(url)


@dataclass
class Prepared:
    """One field read and ready to embed: normalised pixels (C, Y, X) float32, mask (Y, X), the kept
    windows' corners (n, 2) and foreground fractions (n,), their hand-crafted features, the focus score
    and the share of the field's pixels in its foreground mask (how much of it cells cover)."""

    sample: str
    field: str
    norm: np.ndarray
    mask: np.ndarray
    corners: np.ndarray
    fg: np.ndarray
    handcrafted: np.ndarray
    focus: float
    cover: float


def prepare_field(job: InferJob, store: ImageStore, sample: str, field: str) -> Prepared:
    """Everything about one field but the encoders: read, kept windows, normalise, hand-crafted
    features, and the focus score (measured here, where the pixels are read anyway)."""
    raw = store.read_image(sample, field)
    mask = store.read_mask(sample, field)
    corners = window_grid(raw.shape[1:], job.window, job.stride)
    fg = foreground_fraction(mask, corners, job.window)
    keep = np.ones(len(corners), bool) if job.keep_background else fg >= job.min_foreground
    corners, fg = corners[keep], fg[keep]
    norm = store.normalise(raw, mask)
    handcrafted = window_features(raw, norm, mask, corners, job.window)
    focus = focus_score(np.log1p(raw[0].astype(np.float32)), mask)
    return Prepared(sample, field, norm, mask, corners, fg, handcrafted, focus, float(mask.mean()))


def result_of(job: InferJob, field: Prepared, dim: np.ndarray, random: np.ndarray) -> FieldResult:
    return FieldResult(
        field.sample,
        field.field,
        field.corners[:, 0].astype(np.int32),
        field.corners[:, 1].astype(np.int32),
        field.fg,
        field.fg < job.min_foreground,
        {"dim": dim, "random": random, "handcrafted": field.handcrafted},
        field.focus,
        field.cover,
    )


def embed_field(job: InferJob, store: ImageStore, models: Models, sample: str, field: str) -> FieldResult:
    """Windows of one field with their foreground fraction, the three feature sets and the focus score."""
    p = prepare_field(job, store, sample, field)
    embed = embed_shared if job.mode == "shared" else embed_naive
    args = (p.norm, p.corners, job.window, job.batch_windows, p.mask, job.views)
    return result_of(job, p, embed_views(embed, models.dim, *args), embed_views(embed, models.random, *args))


def embed_batched(
    job: InferJob, models: Models, fields: list[Prepared], device: torch.device, precision: torch.dtype | None
) -> list[FieldResult]:
    """Fields of one shape embedded together: per view, one ``embed_batch`` per encoder."""
    totals = {"dim": [0.0] * len(fields), "random": [0.0] * len(fields)}
    for view in range(job.views):
        seen = [view_of(f.norm, f.mask, f.corners, job.window, view) for f in fields]
        pixels = torch.from_numpy(np.stack([v[0] for v in seen])).to(device)
        masks = torch.from_numpy(np.stack([v[1] for v in seen]).astype(np.float32)).to(device)
        corners = [v[2] for v in seen]
        for name in totals:
            encoder = getattr(models, name)
            vectors = embed_batch(encoder, pixels, corners, job.window, masks, precision)
            totals[name] = [t + v for t, v in zip(totals[name], vectors, strict=True)]
    return [
        result_of(job, f, (d / job.views).astype(np.float32), (r / job.views).astype(np.float32))
        for f, d, r in zip(fields, totals["dim"], totals["random"], strict=True)
    ]


def compute_device(job: InferJob) -> tuple[torch.device, torch.dtype | None]:
    """The GPU in bf16 (or float32 by ``job.precision``) when this process has one, else the CPU in float32."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), None
    return torch.device("cuda"), torch.bfloat16 if job.precision == "bf16" else None


def run_batched(job: InferJob, store: ImageStore, fields: list[tuple[str, str]]) -> list[FieldResult]:
    """Prepare the fields on several threads, then embed each group of one shape in one batch."""
    device, precision = compute_device(job)
    models = models_for(job, device.type)
    threads = job.prep_threads or cores()
    with ThreadPoolExecutor(threads) as pool:
        prepared = list(pool.map(lambda f: prepare_field(job, store, *f), fields))
    by_shape: dict[tuple[int, ...], list[Prepared]] = {}
    for p in prepared:
        by_shape.setdefault(p.norm.shape, []).append(p)
    done = {r.name: r for group in by_shape.values() for r in embed_batched(job, models, group, device, precision)}
    return [done[image_name(s, f)] for s, f in fields]


def run_task(job: InferJob, fields: list[tuple[str, str]], threads: int = 1) -> list[str]:
    """Embed the fields not done yet and write them as one part; returns the names computed here."""
    torch.set_num_threads(threads)
    set_s3_limits(job.s3)
    store = _store(job.store, job.run_id)
    names = [image_name(sample, field) for sample, field in fields]
    done = done_names(job.parts, names) if len(fields) > 1 else set()  # an earlier attempt got this far
    todo = [f for f, n in zip(fields, names, strict=True) if n not in done]
    if job.batched:
        results = run_batched(job, store, todo)
    else:
        models = models_for(job)
        results = [embed_field(job, store, models, s, f) for s, f in todo]
    write_parts(job.parts, results, job.run_id)
    return [r.name for r in results]
