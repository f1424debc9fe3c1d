"""Training batches: B samples x N fields x C x H x W crops centred on foreground.

Every training field is prepared once (normalised, its mask, the flat positions of its foreground
pixels and the foreground count of the crop at every origin) and held as tensors on the training
device, fields of one shape stacked together. A batch is then cut, flipped, rotated and blurred as
a handful of batched tensor operations on that device. Sets larger than ``train.memory_gb`` are
split into shards of whole samples, consecutive in store order (sequential reads), walked one
after another while the next one loads.

A batch depends only on (seed, step, rank), never on what was read before, so a resumed run sees
exactly the batches an uninterrupted run would have seen, and a prefetch thread cannot change them.
The random draws are made on the CPU with numpy, so the batches do not depend on the device either.
Samples are dealt to ranks from one shuffled stream per epoch: within an epoch each sample goes
to one rank, and every rank takes the same number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cellmi.errors import UserError
from cellmi.log import log
from cellmi.settings import TrainSettings
from cellmi.store import ImageStore
from cellmi.train.crops import (
    content_size,
    crop_content,
    crop_origins,
    cut_numpy,
    cut_tensor,
    device_index,
    focus_ramps,
    gaussian_blur,
)
from cellmi.train.fields import (
    GIB,
    ResidentShards,
    Shard,
    ShardPlan,
    device_threads,
    field_bytes,
    field_shape,
    plan_shards,
    prepare_shard,
)

__all__ = ["Batch", "CropLoader", "batch_sample_ids", "content_size", "train_samples"]

PREFETCH = 2


@dataclass
class Batch:
    """images (B, N, C, H, W) float32 normalised; masks (B, N, H, W) bool; samples (B,) int64 ids;
    content (B, N, K) float32 statistics of each crop before nuisances (``crop_content``)."""

    images: torch.Tensor
    masks: torch.Tensor
    samples: torch.Tensor
    content: torch.Tensor


def train_samples(store: ImageStore, batch_samples: int, crop: int) -> list[str]:
    """The store's training samples, checked against the batch size and crop size."""
    meta = store.meta
    samples = [s for s in meta.samples_in("train") if meta.fields[s]]
    if len(samples) < 2:
        raise UserError(f"{store.url}: needs at least 2 training samples with fields, has {len(samples)}")
    if batch_samples > len(samples):
        raise UserError(
            f"CELLMI_TRAIN__BATCH_SAMPLES={batch_samples} exceeds the {len(samples)} training "
            f"samples of {store.url}"
        )
    if min(meta.shape) < crop:
        sample = samples[0]
        raise UserError(
            f"CELLMI_MODEL__CROP={crop} is larger than field {sample}/{meta.fields[sample][0]} of {store.url} "
            f"({meta.shape[0]}x{meta.shape[1]}; every field of the store has that size)"
        )
    return samples


def batch_sample_ids(n_samples: int, batch: int, world: int, rank: int, step: int, seed: int) -> np.ndarray:
    """(batch,) sample indices of ``rank`` at ``step``.

    Positions ``step*batch*world + rank*batch + i`` of a stream made of one seeded permutation of
    the samples per epoch.
    """
    start = (step * world + rank) * batch
    positions = np.arange(start, start + batch)
    epochs, offsets = np.divmod(positions, n_samples)
    perms = {e: np.random.default_rng([seed, int(e)]).permutation(n_samples) for e in np.unique(epochs)}
    return np.array([perms[e][o] for e, o in zip(epochs, offsets, strict=True)], dtype=np.int64)


class CropLoader:
    """Deterministic batches of one rank, with a small prefetch thread.

    ``batch(step)`` is a pure function of (seed, step, rank) and the store; iterate with
    ``batches(start)``; ``close()`` stops the threads. Prepared fields live on ``device``.
    """

    def __init__(
        self,
        store: ImageStore,
        cfg: TrainSettings,
        crop: int,
        rank: int = 0,
        world: int = 1,
        threads: int = 1,
        device: torch.device | None = None,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.crop = crop
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.samples = train_samples(store, cfg.batch_samples, crop)
        stats = store.meta.stats
        self.mean = torch.tensor(stats["mean"], dtype=torch.float32, device=self.device)[:, None, None]
        self.std = torch.tensor(stats["std"], dtype=torch.float32, device=self.device)[:, None, None]
        channels = len(store.meta.channels)
        sample_bytes = [
            sum(field_bytes(channels, field_shape(store, s, f, crop), crop) for f in store.meta.fields[s])
            for s in self.samples
        ]
        shards = plan_shards(sample_bytes, int(cfg.memory_gb * GIB), cfg.batch_samples)
        self.plan = ShardPlan(shards, cfg.batch_samples, world, cfg.shard_epochs, cfg.seed)
        self.resident = ResidentShards(self._load, self.device)
        if len(shards) > 1:
            log.info("training fields in %d shards of whole samples (train.memory_gb=%g)", len(shards), cfg.memory_gb)
        else:
            self.resident.get(0)  # prepared now: the first step does not wait, bad fields fail early
        self.threads = max(1, threads)
        self._pool = device_threads(self.threads, "cellmi-crops", self.device)

    def _load(self, shard: int) -> Shard:
        return prepare_shard(self.store, self.samples, list(self.plan.shards[shard]), self.crop, self.device)

    def batch(self, step: int) -> Batch:
        cfg = self.cfg
        visit = self.plan.visit(step)
        shard = self.resident.get(visit.shard)
        local = batch_sample_ids(len(shard.samples), cfg.batch_samples, self.world, self.rank, visit.local_step,
                                 visit.seed)
        ids = np.array(shard.samples, np.int64)[local]
        rng = np.random.default_rng([cfg.seed, step, self.rank, 1])
        aug_rng = np.random.default_rng([cfg.seed, step, self.rank, 3])  # apart, so augmenting moves no crop
        groups, rows = self._fields(shard, ids, rng)
        turns, flips = np.zeros((2, len(rows)), np.int64)
        if cfg.augment:
            turns, flips = aug_rng.integers(4, size=len(rows)), aug_rng.integers(2, size=len(rows))
        images, masks = self._crops(shard, groups, rows, rng, turns, flips)
        content = crop_content(images, masks)  # before the nuisances; turns and mirrors change no statistic
        if cfg.augment:
            self._nuisance(images, aug_rng)
        b, n = len(ids), cfg.fields_per_sample
        return Batch(
            images.reshape(b, n, *images.shape[1:]),
            masks.reshape(b, n, *masks.shape[1:]),
            device_index(ids, self.device),
            content.view(b, n, -1),
        )

    def _fields(self, shard: Shard, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(group, row) of the N fields drawn for each sample, (B * N,) each, sample after sample."""
        n = self.cfg.fields_per_sample
        groups, rows = [], []
        for sample in ids:
            group, row = shard.where[int(sample)]
            chosen = rng.choice(len(row), n, replace=len(row) < n)
            groups.append(group[chosen])
            rows.append(row[chosen])
        return np.concatenate(groups), np.concatenate(rows)

    def _crops(
        self,
        shard: Shard,
        groups: np.ndarray,
        rows: np.ndarray,
        rng: np.random.Generator,
        turns: np.ndarray,
        flips: np.ndarray,
    ) -> tuple[Tensor, Tensor]:
        """(M, C, crop, crop) pixels and (M, crop, crop) masks of fields (groups, rows), turned and mirrored."""
        cut = cut_numpy if self.device.type == "cpu" else cut_tensor
        crop, least = self.crop, self.cfg.min_foreground
        if len(np.unique(groups)) == 1:
            group = shard.groups[int(groups[0])]
            return cut(group, rows, *crop_origins(group, rows, crop, least, rng), crop, turns, flips)
        channels = len(self.store.meta.channels)
        images = torch.empty(len(rows), channels, crop, crop, device=self.device)
        masks = torch.empty(len(rows), crop, crop, dtype=torch.bool, device=self.device)
        for g in np.unique(groups):
            mine = np.flatnonzero(groups == g)
            group = shard.groups[int(g)]
            origin = crop_origins(group, rows[mine], crop, least, rng)
            pixels, mask = cut(group, rows[mine], *origin, crop, turns[mine], flips[mine])
            index = device_index(mine, self.device)
            images.index_copy_(0, index, pixels)
            masks.index_copy_(0, index, mask)
        return images, masks

    def _nuisance(self, images: Tensor, rng: np.random.Generator) -> None:
        """In place, on normalised (M, C, H, W) crops: sometimes defocus blur, sometimes a focus
        gradient, per-channel gain.

        All act on linear intensities; in the log domain a gain g is a shift of log(g) / std. The
        blurs undo the log with expm1, which in ``field`` mode gives signal + pedestal - 1 rather than
        the signal: a constant per channel, which a normalised blur carries through unchanged.
        """
        cfg = self.cfg
        m, c = images.shape[:2]
        blur = rng.random(m) < cfg.aug_blur
        blurred = np.flatnonzero(blur)
        sigmas = rng.uniform(0.5, cfg.aug_blur_sigma, size=m)[blurred]
        if len(blurred):
            self._defocus(images, blurred, sigmas, None)
        if cfg.aug_tilt > 0:  # drawn only when on, so that the other draws stay those of earlier runs
            tilted = np.flatnonzero((rng.random(m) < cfg.aug_tilt) & ~blur)
            far, angles = rng.uniform(1.0, cfg.aug_blur_sigma, size=m)[tilted], rng.uniform(0, 2 * np.pi, m)[tilted]
            if len(tilted):
                self._defocus(images, tilted, far, focus_ramps(angles, images.shape[-1], self.device))
        if cfg.aug_gain > 0:
            gain = rng.uniform(np.log1p(-cfg.aug_gain), np.log1p(cfg.aug_gain), size=(m, c, 1, 1))
            images += torch.from_numpy(gain.astype(np.float32)).to(self.device, non_blocking=True) / self.std

    def _defocus(self, images: Tensor, chosen: np.ndarray, sigmas: np.ndarray, ramps: Tensor | None) -> None:
        """In place: crops ``chosen`` blurred by ``sigmas`` px, everywhere or (``ramps``, (K, 1, H, W)
        from 0 to 1) in proportion to the ramp: sharp at one edge, blurred at the opposite one."""
        index = device_index(chosen, self.device)
        raw = images.index_select(0, index).mul_(self.std).add_(self.mean).expm1_()
        blurred = gaussian_blur(raw, sigmas)
        if ramps is not None:
            blurred = torch.lerp(raw, blurred, ramps)
        images.index_copy_(0, index, blurred.clamp_(min=0).log1p_().sub_(self.mean).div_(self.std))

    def batches(self, start: int, finish: Callable[[Batch], Any] | None = None) -> Iterator[Any]:
        """Batches of steps start, start+1, ...; the next ones are made while the caller trains, and
        the next shard (if any) loads while the current one is walked. ``finish``, when given, is applied
        to each batch on the loader's thread too (the step's layout of it, ``step_inputs``).

        Each batch is a pure function of its step, so several threads make the same stream.
        """
        make = self.batch if finish is None else lambda step: finish(self.batch(step))
        ahead = max(PREFETCH, 2 * self.threads)
        pending: list[Future[Any]] = [self._pool.submit(make, start + i) for i in range(ahead)]
        step, visit = start + ahead, -1
        while True:
            now = self.plan.visit(step - ahead)
            if len(self.plan.shards) > 1 and now.number != visit:
                visit = now.number
                self.resident.prefetch(self.plan.next_shard(now))
            batch = pending.pop(0).result()
            pending.append(self._pool.submit(make, step))
            step += 1
            yield batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.resident.close()
