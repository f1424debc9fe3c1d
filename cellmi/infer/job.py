"""``cellmi infer``: a checkpoint and an image store -> window representations, fanned out on Dask.

    cellmi infer                                          # embedded LocalCluster, one worker per core
    cellmi infer --workdir s3://bucket/run --infer.stride 32
    DASK_SCHEDULER_ADDRESS=tcp://scheduler:8786 cellmi infer   # an existing cluster (k8s, SLURM)

Reads ``{workdir}/store.zarr`` and the newest checkpoint in ``{workdir}/checkpoints`` (or
``CELLMI_INFER__CHECKPOINT``); writes ``{workdir}/representations.zarr`` and
``{workdir}/representations.parquet``. Each field is one part in ``representations.parts``
(see :mod:`cellmi.infer.parts`); a re-run after a crash computes only the fields without a part.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from cellmi import __version__
from cellmi.errors import UserError
from cellmi.infer.embed import activation_bytes
from cellmi.infer.fanout import compute_parts, dask_client, gpu_workers
from cellmi.infer.handcrafted import feature_names
from cellmi.infer.parts import PARTS_NAME, FieldResult, done_names, prepare_parts, read_parts
from cellmi.infer.task import InferJob, embed_field, models_for
from cellmi.infer.windows import check_geometry, window_grid
from cellmi.log import log
from cellmi.representations import (
    REPR_PARQUET,
    REPR_ZARR,
    Representations,
    sort_order,
    to_frame,
    write_parquet,
    write_representations,
)
from cellmi.settings import Settings, as_dict, digest
from cellmi.store import (
    STORE_NAME,
    StoreMeta,
    filesystem,
    image_name,
    is_s3,
    join,
    open_store,
    remove,
    s3_limits,
    store_complete,
)

__all__ = ["InferOutcome", "Plan", "assemble", "compute_in_process", "main", "make_plan", "run_inference"]

CHECKPOINTS = "checkpoints"
GB = 1024**3


@dataclass
class Plan:
    """A validated inference run: the task description plus what the client needs to gather."""

    job: InferJob
    meta: StoreMeta
    fields: list[tuple[str, str]]
    attrs: dict[str, Any]
    task_bytes: int


@dataclass
class InferOutcome:
    """Fields in the store, computed by this run, reused from an interrupted one; windows written."""

    fields: int
    computed: int
    reused: int
    windows: int


def _absolute(url: str) -> str:
    """Workers may run elsewhere or in another folder: hand them absolute paths."""
    return url if is_s3(url) else os.path.abspath(url)


def resolve_checkpoint(settings: Settings) -> str:
    """The checkpoint file to use: the setting (file, or folder -> newest) or the newest in the run."""
    from cellmi.train.checkpoint import latest_checkpoint

    url = _absolute(settings.infer.checkpoint or join(settings.workdir, CHECKPOINTS))
    where = "CELLMI_INFER__CHECKPOINT" if settings.infer.checkpoint else "the run folder"
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise UserError(
            f"{url}: no checkpoint here ({where}); run `cellmi train` first or set CELLMI_INFER__CHECKPOINT"
        )
    if fs.isdir(path):
        newest = latest_checkpoint(url)
        if newest is None:
            raise UserError(f"{url}: folder holds no checkpoint; run `cellmi train` first")
        return _absolute(newest)
    return url


def checkpoint_sha256(url: str) -> str:
    """sha256 of the checkpoint file (of its files in name order when it is a folder)."""
    fs, path = filesystem(url)
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    digest_ = hashlib.sha256()
    for name in files:
        with fs.open(name, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 22), b""):
                digest_.update(block)
    return digest_.hexdigest()


def _training_crop(meta: dict[str, Any], url: str) -> int:
    try:
        return int(meta["settings"]["model"]["crop"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{url}: checkpoint records no model.crop; set CELLMI_INFER__WINDOW") from None


def _stride(requested: int | None, window: int, encoder_stride: int) -> int:
    """The set stride, or half a window rounded down to the encoder grid (never below one step)."""
    if requested is not None:
        return requested
    return max(encoder_stride, (window // 2) // encoder_stride * encoder_stride)


def estimate_task_bytes(
    encoder: torch.nn.Module, channels: int, shape: tuple[int, int], window: int, mode: str, batch: int
) -> int:
    """Peak memory of one task: the field's pixels and mask, the encoder's activations, the weights.

    Activations are measured on one window and scaled to the field (shared map) or the batch (naive).
    """
    probe, _ = activation_bytes(encoder, channels, window)
    pixels = shape[0] * shape[1]
    scale = pixels / window**2 if mode == "shared" else batch
    weights = sum(p.numel() for p in encoder.parameters()) * 4
    # per pixel: raw, normalised and tensor copies, mask, fg table, hand-crafted float64 tables
    per_pixel = channels * (2 + 4 + 4 + 24) + 1 + 16
    return int(pixels * per_pixel + probe * scale + 2 * weights)


def make_plan(settings: Settings) -> Plan:
    """Open the store and checkpoint, validate geometry and memory; nothing is computed yet."""
    from cellmi.train.checkpoint import load_encoder

    infer = settings.infer
    store_url = _absolute(join(settings.workdir, STORE_NAME))
    meta = open_store(store_url).meta
    ckpt = resolve_checkpoint(settings)
    encoder, ckpt_meta = load_encoder(ckpt, device="cpu", average=infer.ema)
    if ckpt_meta.get("channels") and list(ckpt_meta["channels"]) != meta.channels:
        raise UserError(
            f"{ckpt}: checkpoint was trained on channels {list(ckpt_meta['channels'])}, "
            f"the store has {meta.channels}"
        )
    trained_on = (ckpt_meta.get("data_stats") or {}).get("intensity")
    if trained_on and trained_on != meta.intensity:
        raise UserError(
            f"{ckpt}: checkpoint was trained on {trained_on!r} intensities, the store has {meta.intensity!r} "
            "(CELLMI_INGEST__INTENSITY); re-ingest with the training setting"
        )
    window = infer.window or _training_crop(ckpt_meta, ckpt)
    stride = _stride(infer.stride, window, encoder.stride)
    check_geometry(window, stride, encoder.stride, meta.shape)
    if infer.stride is None and stride != window // 2:
        log.info("stride %d: half the window rounded to the encoder stride %d", stride, encoder.stride)
    task_bytes = estimate_task_bytes(
        encoder, len(meta.channels), meta.shape, window, infer.mode, infer.batch_windows
    )
    if task_bytes > infer.memory_limit_gb * GB:
        raise UserError(
            f"CELLMI_INFER__MEMORY_LIMIT_GB (--infer.memory_limit_gb): a task needs about "
            f"{task_bytes / GB:.3g} GB ({meta.shape[0]}x{meta.shape[1]} fields, {infer.mode} mode, window "
            f"{window}), above the limit {infer.memory_limit_gb:g}; raise it or use --infer.mode naive"
        )
    sha = checkpoint_sha256(ckpt)
    job = InferJob(
        store=store_url,
        checkpoint=ckpt,
        checkpoint_sha256=sha,
        parts=_absolute(join(settings.workdir, PARTS_NAME)),
        window=window,
        stride=stride,
        mode=infer.mode,
        views=infer.views,
        min_foreground=infer.min_foreground,
        keep_background=infer.keep_background,
        batch_windows=infer.batch_windows,
        baseline_seed=infer.baseline_seed,
        run_id=uuid.uuid4().hex[:12],
        s3=s3_limits(),
        precision=infer.precision,
        prep_threads=infer.prep_threads,
        ema=infer.ema,
        readout=infer.readout,
    )
    attrs = {
        "window": window,
        "stride": stride,
        "encoder_stride": int(encoder.stride),
        "mode": infer.mode,
        "views": infer.views,
        "readout": infer.readout,
        "min_foreground": infer.min_foreground,
        "keep_background": infer.keep_background,
        "checkpoint": ckpt,
        "checkpoint_sha256": sha,
        "checkpoint_step": ckpt_meta.get("step"),
        "weights": ckpt_meta["weights"],
        "store": store_url,
        "settings": as_dict(settings),
        "cellmi_version": __version__,
        "phenotypes": meta.phenotypes,
        "field_metadata": meta.metadata,
        "channels": meta.channels,
        "handcrafted_names": feature_names(meta.channels),
        "baseline_seed": infer.baseline_seed,
    }
    return Plan(job=job, meta=meta, fields=meta.images("all"), attrs=attrs, task_bytes=task_bytes)


def run_key(plan: Plan) -> str:
    """Digest of everything that decides a field's part: parts with another key are not reused."""
    job = plan.job
    return digest(
        {
            "store": job.store,
            "store_meta": plan.meta.to_json(),
            "sha": job.checkpoint_sha256,
            "window": job.window,
            "stride": job.stride,
            "mode": job.mode,
            "views": job.views,
            "min_foreground": job.min_foreground,
            "keep_background": job.keep_background,
            "baseline_seed": job.baseline_seed,
            "precision": job.precision,  # of batched tasks on a GPU (a run may mix GPU and CPU parts)
            "ema": job.ema,
            "readout": job.readout,
            "version": __version__,
        }
    )


def compute_in_process(
    job: InferJob, fields: list[tuple[str, str]], threads: int = 1
) -> dict[str, FieldResult]:
    """The same per-field work in this process, without Dask or parts (reference for tests/benchmarks)."""
    torch.set_num_threads(threads)
    store = open_store(job.store)
    models = models_for(job)
    return {image_name(s, f): embed_field(job, store, models, s, f) for s, f in fields}


def assemble(plan: Plan, results: dict[str, FieldResult]) -> Representations:
    """One Representations from per-field results, rows sorted by (sample, field, y, x)."""
    parts = [results[image_name(s, f)] for s, f in plan.fields]
    table = pd.DataFrame(
        {
            "sample": np.concatenate([np.full(len(p.y), p.sample, dtype=object) for p in parts]),
            "field": np.concatenate([np.full(len(p.y), p.field, dtype=object) for p in parts]),
            "split": np.concatenate(
                [np.full(len(p.y), plan.meta.split[p.sample], dtype=object) for p in parts]
            ),
            "y": np.concatenate([p.y for p in parts]).astype(np.int32),
            "x": np.concatenate([p.x for p in parts]).astype(np.int32),
            "fg_fraction": np.concatenate([p.fg_fraction for p in parts]).astype(np.float32),
            "background": np.concatenate([p.background for p in parts]).astype(bool),
        }
    )
    features = {
        k: np.concatenate([p.features[k] for p in parts]).astype(np.float32)
        for k in ("dim", "random", "handcrafted")
    }
    order = sort_order(table)
    attrs = dict(plan.attrs, focus=field_table(parts, "focus"), cover=field_table(parts, "cover"))
    return Representations(table.iloc[order].reset_index(drop=True), {k: v[order] for k, v in features.items()}, attrs)


def field_table(parts: list[FieldResult], measure: str) -> dict[str, dict[str, float | None]]:
    """{sample: {field: value}} of one per-field measure (``focus`` or ``cover``; None where not
    measured: no foreground, or parts written before the measure existed)."""
    out: dict[str, dict[str, float | None]] = {}
    for part in parts:
        value = float(getattr(part, measure))
        out.setdefault(part.sample, {})[part.field] = None if np.isnan(value) else value
    return out


# Fields per CPU task when fields_per_task is 0 (auto): few enough that every worker gets at least
# TASKS_PER_WORKER tasks (balance), many enough to share a task's fixed costs (scheduling, one part write).
TASKS_PER_WORKER, MAX_FIELDS_PER_TASK = 4, 8


def task_shape(settings: Settings, job: InferJob, client: Any, fields: int) -> tuple[InferJob, int]:
    """Batched tasks of ``gpu_fields`` fields when workers offer a GPU (and the device is auto), else
    CPU tasks of ``fields_per_task`` (0: auto); returns the job the tasks carry and the fields per task."""
    infer = settings.infer
    gpus = gpu_workers(client) if infer.device == "auto" else 0
    if gpus:
        log.info("infer: %d GPU worker(s); batches of %d fields, %s", gpus, infer.gpu_fields, infer.precision)
        return replace(job, batched=True), infer.gpu_fields
    if infer.fields_per_task:
        return job, infer.fields_per_task
    workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    return job, max(1, min(MAX_FIELDS_PER_TASK, fields // (TASKS_PER_WORKER * workers)))


def _groups(fields: list[tuple[str, str]], size: int) -> list[list[tuple[str, str]]]:
    return [fields[i : i + size] for i in range(0, len(fields), size)]


def run_inference(settings: Settings) -> InferOutcome:
    """Plan, compute the missing fields on Dask, gather the parts, write the outputs."""
    out_url = join(settings.workdir, REPR_ZARR)
    if store_complete(out_url) and not settings.force:
        raise UserError(f"{out_url}: representations already exist; pass --force to compute them again")
    plan = make_plan(settings)  # validates everything before anything is removed or computed
    job = plan.job
    remove(out_url)  # forced, or incomplete: a crash during the final write
    log.info(
        "infer: %d fields x %d windows, window %d, stride %d, %s map, checkpoint %s (~%.2f GB per task)",
        len(plan.fields),
        len(window_grid(plan.meta.shape, job.window, job.stride)),
        job.window,
        job.stride,
        job.mode,
        job.checkpoint,
        plan.task_bytes / GB,
    )
    prepare_parts(job.parts, run_key(plan), fresh=settings.force)
    done = done_names(job.parts)
    todo = [(s, f) for s, f in plan.fields if image_name(s, f) not in done]
    if done:
        log.info("resuming: %d fields already done, %d to compute", len(plan.fields) - len(todo), len(todo))
    computed = 0
    if todo:
        with dask_client(settings.infer, settings.timeouts) as client:
            job, size = task_shape(settings, job, client, len(todo))
            computed = compute_parts(client, job, _groups(todo, size), settings.infer.retries)
    reps = assemble(plan, read_parts(job.parts, [image_name(s, f) for s, f in plan.fields]))
    if len(reps.table) == 0:
        raise UserError(
            f"CELLMI_INFER__MIN_FOREGROUND (--infer.min_foreground): no window of any field has "
            f"{job.min_foreground:g} foreground; lower it or set CELLMI_INFER__KEEP_BACKGROUND=true"
        )
    write_parquet(join(settings.workdir, REPR_PARQUET), to_frame(reps, "dim"))
    write_representations(out_url, reps)  # marks the store complete last
    remove(job.parts)
    log.info("wrote %d windows to %s", len(reps.table), out_url)
    return InferOutcome(
        fields=len(plan.fields),
        computed=computed,
        reused=len(plan.fields) - len(todo),
        windows=len(reps.table),
    )


def main(settings: Settings) -> int:
    """``cellmi infer`` (see the module docstring for how to launch it)."""
    run_inference(settings)
    return 0
