"""Training batches: B samples x N fields x C x H x W crops centred on foreground.

A batch depends only on (seed, step, rank), never on what was read before, so a resumed run sees
exactly the batches an uninterrupted run would have seen, and a prefetch thread cannot change them.
Samples are dealt to ranks from one shuffled stream per epoch: within an epoch each sample goes
to one rank, and every rank takes the same number of steps.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from cellmi.errors import UserError
from cellmi.settings import TrainSettings
from cellmi.store import ImageStore

__all__ = [
    "Batch",
    "CropLoader",
    "FieldCache",
    "batch_sample_ids",
    "content_size",
    "crop_content",
    "crop_origin",
    "train_samples",
]

CROP_TRIES = 8
PREFETCH = 2
CONTENT_PERCENTILE = 95.0


@dataclass
class Batch:
    """images (B, N, C, H, W) float32 normalised; masks (B, N, H, W) bool; samples (B,) int64 ids;
    content (B, N, K) float32 statistics of each crop before nuisances (``crop_content``)."""

    images: torch.Tensor
    masks: torch.Tensor
    samples: torch.Tensor
    content: torch.Tensor


@dataclass
class CachedField:
    pixels: np.ndarray  # (C, Y, X) float32, normalised (ImageStore.normalise)
    mask: np.ndarray  # (Y, X) bool foreground
    foreground: np.ndarray  # (K, 2) int32 coordinates of foreground pixels


class FieldCache:
    """Bounded LRU cache of normalised fields and their masks; safe to share between threads."""

    def __init__(self, store: ImageStore, capacity: int) -> None:
        self.store = store
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], CachedField] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, sample: str, field_id: str) -> CachedField:
        key = (sample, field_id)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        item = self._read(sample, field_id)
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item

    def _read(self, sample: str, field_id: str) -> CachedField:
        mask = self.store.read_mask(sample, field_id)
        pixels = self.store.normalise(self.store.read_image(sample, field_id), mask)
        return CachedField(pixels, mask, np.argwhere(mask).astype(np.int32))


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
        raise UserError(
            f"CELLMI_MODEL__CROP={crop} is larger than the fields of {store.url} "
            f"({meta.shape[0]}x{meta.shape[1]})"
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


def crop_origin(
    field: CachedField, crop: int, min_foreground: float, rng: np.random.Generator
) -> tuple[int, int]:
    """Top-left (y, x) of a crop centred on a random foreground pixel.

    Up to CROP_TRIES centres are drawn; the first whose crop has ``min_foreground`` foreground wins,
    else the one with most foreground. A field without foreground gives a uniform random crop.
    """
    height, width = field.mask.shape
    if len(field.foreground) == 0:
        return int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
    best, best_share = (0, 0), -1.0
    for _ in range(CROP_TRIES):
        cy, cx = field.foreground[rng.integers(len(field.foreground))]
        y = int(np.clip(cy - crop // 2, 0, height - crop))
        x = int(np.clip(cx - crop // 2, 0, width - crop))
        share = float(field.mask[y : y + crop, x : x + crop].mean())
        if share >= min_foreground:
            return y, x
        if share > best_share:
            best, best_share = (y, x), share
    return best


def content_size(channels: int) -> int:
    """Length of ``crop_content`` for this many channels."""
    return 3 * channels + 1


def crop_content(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(C, H, W) normalised crop, (H, W) mask -> (3C + 1,) float32: per channel the foreground mean,
    standard deviation and 95th percentile, then the foreground share (all pixels when none)."""
    values = pixels[:, mask] if mask.any() else pixels.reshape(len(pixels), -1)
    stats = [values.mean(axis=1), values.std(axis=1), np.percentile(values, CONTENT_PERCENTILE, axis=1)]
    return np.concatenate([*stats, [mask.mean()]]).astype(np.float32)


def _geometric(
    pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random 90-degree rotation and flip of (C, H, W) pixels and (H, W) mask."""
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    pixels, mask = np.rot90(pixels, turns, axes=(1, 2)), np.rot90(mask, turns)
    if flip:
        pixels, mask = pixels[:, :, ::-1], mask[:, ::-1]
    return pixels, mask


def _nuisance(
    pixels: np.ndarray, mean: np.ndarray, std: np.ndarray, cfg: TrainSettings, rng: np.random.Generator
) -> np.ndarray:
    """Microscope nuisances on normalised (C, H, W) pixels: per-channel gain, sometimes defocus blur.

    Both act on linear intensities; in the log domain a gain g is a shift of log(g) / std. The
    blur undoes the log with expm1, which in ``field`` mode gives signal + pedestal - 1 rather than
    the signal: a constant per channel, which a normalised blur carries through unchanged.
    """
    if rng.random() < cfg.aug_blur:
        sigma = rng.uniform(0.5, cfg.aug_blur_sigma)
        raw = np.expm1(pixels * std + mean)
        raw = gaussian_filter(raw, sigma=(0, sigma, sigma), mode="reflect")
        pixels = (np.log1p(np.maximum(raw, 0)) - mean) / std
    if cfg.aug_gain > 0:
        gain = rng.uniform(np.log1p(-cfg.aug_gain), np.log1p(cfg.aug_gain), size=(len(pixels), 1, 1))
        pixels = pixels + (gain / std).astype(np.float32)
    return pixels


class CropLoader:
    """Deterministic batches of one rank, with a small prefetch thread.

    ``batch(step)`` is a pure function of (seed, step, rank) and the store; iterate with
    ``batches(start)``; ``close()`` stops the prefetch thread.
    """

    def __init__(
        self, store: ImageStore, cfg: TrainSettings, crop: int, rank: int = 0, world: int = 1, threads: int = 1
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.crop = crop
        self.rank, self.world = rank, world
        self.samples = train_samples(store, cfg.batch_samples, crop)
        self.cache = FieldCache(store, cfg.cache_fields)
        stats = store.meta.stats
        self.mean = np.asarray(stats["mean"], np.float32)[:, None, None]
        self.std = np.asarray(stats["std"], np.float32)[:, None, None]
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="cellmi-crops")

    def batch(self, step: int) -> Batch:
        cfg = self.cfg
        ids = batch_sample_ids(len(self.samples), cfg.batch_samples, self.world, self.rank, step, cfg.seed)
        rng = np.random.default_rng([cfg.seed, step, self.rank, 1])
        aug_rng = np.random.default_rng([cfg.seed, step, self.rank, 3])  # apart, so augmenting moves no crop
        images, masks, content = [], [], []
        for sample_index in ids:
            sample = self.samples[sample_index]
            fields = self.store.meta.fields[sample]
            chosen = rng.choice(
                len(fields), cfg.fields_per_sample, replace=len(fields) < cfg.fields_per_sample
            )
            for f in chosen:
                pixels, mask, stats = self._crop(self.cache.get(sample, fields[f]), rng, aug_rng)
                images.append(pixels)
                masks.append(mask)
                content.append(stats)
        b, n = len(ids), cfg.fields_per_sample
        image_t = torch.from_numpy(np.stack(images).astype(np.float32, copy=False))
        mask_t = torch.from_numpy(np.stack(masks))
        return Batch(
            image_t.view(b, n, *image_t.shape[1:]),
            mask_t.view(b, n, *mask_t.shape[1:]),
            torch.from_numpy(ids),
            torch.from_numpy(np.stack(content)).view(b, n, -1),
        )

    def _crop(
        self, field: CachedField, rng: np.random.Generator, aug_rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A crop, its mask and its content, measured before nuisances so the content is not theirs."""
        y, x = crop_origin(field, self.crop, self.cfg.min_foreground, rng)
        pixels = field.pixels[:, y : y + self.crop, x : x + self.crop]
        mask = field.mask[y : y + self.crop, x : x + self.crop]
        content = crop_content(pixels, mask)
        if self.cfg.augment:
            pixels, mask = _geometric(pixels, mask, aug_rng)
            pixels = _nuisance(pixels, self.mean, self.std, self.cfg, aug_rng)
        return np.ascontiguousarray(pixels), np.ascontiguousarray(mask), content

    def batches(self, start: int) -> Iterator[Batch]:
        """Batches of steps start, start+1, ...; the next ones are read while the caller trains.

        Each batch is a pure function of its step, so several threads make the same stream.
        """
        ahead = max(PREFETCH, 2 * self.threads)
        pending: list[Future[Batch]] = [self._pool.submit(self.batch, start + i) for i in range(ahead)]
        step = start + ahead
        while True:
            batch = pending.pop(0).result()
            pending.append(self._pool.submit(self.batch, step))
            step += 1
            yield batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
