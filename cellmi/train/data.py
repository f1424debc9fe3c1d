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

import functools
import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cellmi.errors import UserError
from cellmi.log import log
from cellmi.settings import TrainSettings
from cellmi.store import ImageStore

__all__ = [
    "Batch",
    "CropLoader",
    "FieldGroup",
    "Shard",
    "ShardPlan",
    "batch_sample_ids",
    "content_size",
    "crop_content",
    "cut_numpy",
    "cut_tensor",
    "dihedral",
    "field_bytes",
    "gaussian_blur",
    "plan_shards",
    "prepare_shard",
    "train_samples",
]

CROP_TRIES = 8
PREFETCH = 2
CONTENT_PERCENTILE = 95.0
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter
READ_THREADS = 4  # fields read and prepared at once while a shard loads
GIB = 2**30


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


# ---------------------------------------------------------------- prepared fields
def field_bytes(channels: int, shape: tuple[int, int], crop: int) -> int:
    """Bytes a prepared field may take at most: float32 pixels, bool mask, int32 foreground
    positions (at most every pixel) and int32 crop foreground counts."""
    height, width = shape
    return (4 * channels + 1 + 4) * height * width + 4 * (height - crop + 1) * (width - crop + 1)


@dataclass
class FieldGroup:
    """Prepared fields of one shape (H, W) on the training device.

    pixels (F, C, H, W) float32 normalised; masks (F, H, W) bool; counts (F, H - crop + 1,
    W - crop + 1) int32 foreground pixels of the crop at each top-left origin; foreground (K,)
    int32 flat positions y * W + x of the foreground pixels, field after field; starts and sizes
    (F,) int64 (on the host) where each field's run begins in ``foreground`` and how long it is.
    """

    pixels: Tensor
    masks: Tensor
    counts: Tensor
    foreground: Tensor
    starts: np.ndarray
    sizes: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])


@dataclass
class Shard:
    """Prepared fields of some whole samples: ``where[sample index]`` gives, per field of that
    sample in store order, its (group, row) in ``groups``."""

    samples: list[int]
    groups: list[FieldGroup]
    where: dict[int, tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        tensors = [t for g in self.groups for t in (g.pixels, g.masks, g.counts, g.foreground)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _crop_counts(mask: np.ndarray, crop: int) -> np.ndarray:
    """(Y, X) bool -> (Y - crop + 1, X - crop + 1) int32 foreground pixels of every crop, by its origin."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])
    return table[crop:, crop:] - table[:-crop, crop:] - table[crop:, :-crop] + table[:-crop, :-crop]


def _field_shape(store: ImageStore, sample: str, field_id: str, crop: int) -> tuple[int, int]:
    """(Y, X) of a field, refused when the crop does not fit in it."""
    shape = store.field_shape(sample, field_id)
    if min(shape) < crop:
        raise UserError(
            f"CELLMI_MODEL__CROP={crop} is larger than field {sample}/{field_id} of {store.url} "
            f"({shape[0]}x{shape[1]})"
        )
    return shape


def _read_field(store: ImageStore, sample: str, field_id: str, crop: int) -> tuple[np.ndarray, ...]:
    """(normalised (C, Y, X) float32, mask (Y, X), flat foreground positions, crop counts) of one field."""
    mask = store.read_mask(sample, field_id)
    pixels = store.normalise(store.read_image(sample, field_id), mask)
    return pixels, mask, np.flatnonzero(mask).astype(np.int32), _crop_counts(mask, crop)


def _stack_group(prepared: list[tuple[np.ndarray, ...]], device: torch.device) -> FieldGroup:
    """Fields of one shape, prepared on the host, as one FieldGroup on ``device``."""
    sizes = np.array([len(p[2]) for p in prepared], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return FieldGroup(
        pixels=torch.from_numpy(np.stack([p[0] for p in prepared])).to(device),
        masks=torch.from_numpy(np.stack([p[1] for p in prepared])).to(device),
        counts=torch.from_numpy(np.stack([p[3] for p in prepared])).to(device),
        foreground=torch.from_numpy(np.concatenate([p[2] for p in prepared])).to(device),
        starts=starts,
        sizes=sizes,
    )


def prepare_shard(
    store: ImageStore, samples: list[str], indices: list[int], crop: int, device: torch.device
) -> Shard:
    """Read and prepare every field of the samples ``indices`` (into ``samples``), in store order."""
    keys = [(i, f) for i in indices for f in store.meta.fields[samples[i]]]
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="cellmi-read") as pool:
        prepared = list(pool.map(lambda key: _read_field(store, samples[key[0]], key[1], crop), keys))
    shapes = sorted({p[1].shape for p in prepared})
    members = [[k for k, p in enumerate(prepared) if p[1].shape == shape] for shape in shapes]
    slot = {keys[k]: (g, row) for g, group in enumerate(members) for row, k in enumerate(group)}
    groups = []
    for group in members:
        groups.append(_stack_group([prepared[k] for k in group], device))
        for k in group:
            prepared[k] = ()  # let the host copy go as soon as it is on the device
    where = {}
    for i in indices:
        pairs = [slot[(i, f)] for f in store.meta.fields[samples[i]]]
        where[i] = (np.array([g for g, _ in pairs]), np.array([r for _, r in pairs]))
    return Shard(list(indices), groups, where)


# ---------------------------------------------------------------- shards and their schedule
def plan_shards(sample_bytes: list[int], budget: int, batch: int) -> list[range]:
    """Consecutive runs of samples (whole samples, store order) to hold in memory one at a time.

    One shard when everything fits the budget; else equal-sized shards of at most half the budget
    each (the next one loads while the current one trains), each holding at least ``batch`` samples.
    """
    total = sum(sample_bytes)
    if total <= budget:
        return [range(len(sample_bytes))]
    cap = budget // 2
    for count in range(2, len(sample_bytes) // batch + 1):
        shards = _split_even(sample_bytes, count)
        sizes = [sum(sample_bytes[i] for i in s) for s in shards]
        if max(sizes) <= cap and min(len(s) for s in shards) >= batch:
            return shards
    need = sum(sorted(sample_bytes)[-batch:]) * 2 / GIB
    raise UserError(
        f"CELLMI_TRAIN__MEMORY_GB={budget / GIB:g}: the {total / GIB:.2f} GiB of prepared training fields "
        f"do not fit, and shards of {batch} samples (CELLMI_TRAIN__BATCH_SAMPLES) need up to {need:.2f} GiB "
        "(two held at once); raise the budget or lower the batch"
    )


def _split_even(sample_bytes: list[int], count: int) -> list[range]:
    """``count`` consecutive runs of samples, cut where the running total crosses each k/count share."""
    ends = np.cumsum(sample_bytes)
    cuts = [int(np.searchsorted(ends, ends[-1] * k / count)) + 1 for k in range(1, count)]
    bounds = [0, *cuts, len(sample_bytes)]
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@dataclass(frozen=True)
class Visit:
    """Where a step falls: the ``number``-th shard visit of the run, which shard, the step within the
    shard's own stream and the seed of that stream."""

    number: int
    shard: int
    local_step: int
    seed: int


class ShardPlan:
    """Shards and the order they are walked in: rounds, each visiting every shard once in a seeded
    order, ``epochs`` passes over the shard's samples (by all ranks together) per visit."""

    def __init__(self, shards: list[range], batch: int, world: int, epochs: int, seed: int) -> None:
        self.shards = shards
        self.seed = seed
        self.steps = [epochs * math.ceil(len(s) / (batch * world)) for s in shards]

    def order(self, round_: int) -> np.ndarray:
        if len(self.shards) == 1:
            return np.zeros(1, np.int64)
        return np.random.default_rng([self.seed, round_, 1]).permutation(len(self.shards))

    def visit(self, step: int) -> Visit:
        """The visit of ``step``. One shard: the plain stream of ``batch_sample_ids``."""
        if len(self.shards) == 1:
            return Visit(0, 0, step, self.seed)
        round_, offset = divmod(step, sum(self.steps))
        for position, shard in enumerate(self.order(round_)):
            if offset < self.steps[shard]:
                seed = int(np.random.SeedSequence([self.seed, int(shard)]).generate_state(1)[0])
                local = round_ * self.steps[shard] + offset  # the shard's stream continues across rounds
                return Visit(round_ * len(self.shards) + position, int(shard), local, seed)
            offset -= self.steps[shard]
        raise AssertionError("unreachable: offset within the round")

    def next_shard(self, visit: Visit) -> int:
        """The shard of the visit after ``visit``."""
        round_, position = divmod(visit.number + 1, len(self.shards))
        return int(self.order(round_)[position])


def _thread_pool(threads: int, name: str, device: torch.device) -> ThreadPoolExecutor:
    """Worker threads whose current CUDA device is ``device`` (so no context lands on another GPU)."""
    def start() -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)

    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name, initializer=start)


class ResidentShards:
    """Prepared shards held in memory, at most ``keep``; loads happen on one background thread."""

    def __init__(self, load, device: torch.device, keep: int = 2) -> None:
        self._load = load
        self._keep = keep
        self._items: OrderedDict[int, Future[Shard]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = _thread_pool(1, "cellmi-shards", device)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, shard: int) -> Shard:
        return self._future(shard).result()

    def prefetch(self, shard: int) -> None:
        self._future(shard)

    def _future(self, shard: int) -> Future[Shard]:
        with self._lock:
            if shard not in self._items:
                while len(self._items) >= self._keep:
                    self._items.popitem(last=False)
                self._items[shard] = self._pool.submit(self._load, shard)
            self._items.move_to_end(shard)
            return self._items[shard]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._items.clear()


# ---------------------------------------------------------------- batched crop operations
def content_size(channels: int) -> int:
    """Length of ``crop_content`` for this many channels."""
    return 3 * channels + 1


@functools.cache
def _tail(pixels: int) -> int:
    """How many of the largest values of a crop of ``pixels`` pixels hold its CONTENT_PERCENTILE."""
    n = np.arange(1, pixels + 1)
    low = np.floor((n - 1) * (CONTENT_PERCENTILE / 100))
    return int((n - 1 - low).max()) + 1


def crop_content(pixels: Tensor, masks: Tensor) -> Tensor:
    """(M, C, H, W) normalised crops, (M, H, W) masks -> (M, 3C + 1) float32: per channel the foreground
    mean, standard deviation and 95th percentile (linear interpolation, as numpy), then the foreground
    share; a crop without foreground uses all its pixels.

    Sums are float32 matrix products (full precision: training never enables TF32); the two values
    around the percentile are selected with numpy on the CPU, by one top-k per crop and channel elsewhere.
    """
    m, c = pixels.shape[:2]
    values = pixels.reshape(m, c, -1)
    weight = masks.reshape(m, 1, -1).to(values.dtype)
    count = weight.sum(-1)
    weight += (count == 0).to(values.dtype).unsqueeze(-1)  # (M, 1, P): 1 for the pixels that count
    used, n = weight.bool(), weight.sum(-1)
    mean = torch.bmm(values, weight.transpose(1, 2)).squeeze(-1) / n
    deviation = (values - mean.unsqueeze(-1)).mul_(weight).reshape(m * c, 1, -1)
    std = (torch.bmm(deviation, deviation.transpose(1, 2)).reshape(m, c) / n).sqrt()
    position = (n.double() - 1) * (CONTENT_PERCENTILE / 100)
    below = position.floor()
    above = torch.minimum(below + 1, n.double() - 1)
    select = _order_numpy if values.device.type == "cpu" else _order_topk
    a, b = select(values, used, below.long(), above.long())
    t = position - below
    tail = torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)  # numpy's lerp
    return torch.cat([mean, std, tail.float(), count / values.shape[-1]], dim=1)


def _order_topk(values: Tensor, used: Tensor, below: Tensor, above: Tensor) -> tuple[Tensor, Tensor]:
    """(M, C, P) values, (M, 1, P) which count, ascending ranks (M, 1) among those -> the values of both
    ranks, (M, C) float64 each, from one top-k selection of the largest (any device)."""
    m, c, pixels = values.shape
    top = torch.where(used, values, -torch.inf).topk(min(_tail(pixels), pixels), -1).values  # descending
    last = used.sum(-1) - 1
    pick = [top.gather(-1, (last - rank).expand(m, c).unsqueeze(-1)).squeeze(-1) for rank in (below, above)]
    return pick[0].double(), pick[1].double()


def _order_numpy(values: Tensor, used: Tensor, below: Tensor, above: Tensor) -> tuple[Tensor, Tensor]:
    """As ``_order_topk``, for CPU tensors: numpy partitions of the pixels that count, crop by crop
    (several times faster than torch's top-k on a CPU)."""
    pixels, keep = values.numpy(), used.numpy()[:, 0]
    low, high = below.numpy()[:, 0], above.numpy()[:, 0]
    out = np.empty((2, *values.shape[:2]), np.float64)
    for i in range(len(pixels)):
        part = np.partition(pixels[i][:, keep[i]], (low[i], high[i]), axis=1)
        out[:, i] = part[:, low[i]], part[:, high[i]]
    return torch.from_numpy(out[0]), torch.from_numpy(out[1])


def _reflect_pad(x: Tensor, radius: int, dim: int) -> Tensor:
    """``x`` padded by ``radius`` on both sides of ``dim``, mirrored as scipy's ``reflect`` (d c b a | a b c d),
    again and again when the radius exceeds the size."""
    size = x.shape[dim]
    if radius <= size:  # two flipped slices: far cheaper than a gather along the last axis
        first, last = x.narrow(dim, 0, radius).flip(dim), x.narrow(dim, size - radius, radius).flip(dim)
        return torch.cat([first, x, last], dim=dim)
    index = torch.arange(-radius, size + radius, device=x.device) % (2 * size)
    return x.index_select(dim, torch.where(index >= size, 2 * size - 1 - index, index))


def _gaussian_kernels(sigmas: np.ndarray, radius: int) -> np.ndarray:
    """(M,) sigmas -> (M, 2 * radius + 1) kernels, each as scipy builds it (its own radius, normalised)."""
    offsets = np.arange(-radius, radius + 1)
    own = (BLUR_TRUNCATE * sigmas + 0.5).astype(int)[:, None]
    kernels = np.exp(-0.5 / sigmas[:, None] ** 2 * offsets**2) * (np.abs(offsets) <= own)
    return kernels / kernels.sum(axis=1, keepdims=True)


def gaussian_blur(images: Tensor, sigmas: np.ndarray) -> Tensor:
    """(M, C, H, W) images, (M,) sigmas in pixels -> each image blurred over H and W with its own sigma.

    The same filter as ``scipy.ndimage.gaussian_filter(image, (0, s, s), mode="reflect")``, as one
    depthwise convolution per axis for the whole batch.
    """
    m, c, h, w = images.shape
    radius = int(BLUR_TRUNCATE * float(sigmas.max()) + 0.5)
    kernels = torch.from_numpy(_gaussian_kernels(sigmas, radius).astype(np.float32))
    kernels = kernels.to(images.device, non_blocking=True)
    weight = kernels.repeat_interleave(c, dim=0)[:, None]  # (M * C, 1, K)
    x = F.conv2d(_reflect_pad(images.reshape(1, m * c, h, w), radius, 2), weight[..., None], groups=m * c)
    x = F.conv2d(_reflect_pad(x, radius, 3), weight[:, :, None], groups=m * c)
    return x.reshape(m, c, h, w)


# (quarter turns, mirror) -> (axes to flip, then transpose?): np.rot90(x, turns, (-2, -1)), then
# x[..., ::-1] when mirrored, as one flip and a transposed view.
_DIHEDRAL = {
    (0, 1): ((-1,), False),
    (1, 0): ((-1,), True),
    (1, 1): ((-2, -1), True),
    (2, 0): ((-2, -1), False),
    (2, 1): ((-2,), False),
    (3, 0): ((-2,), True),
    (3, 1): ((), True),
}


def dihedral(images: Tensor, masks: Tensor, turns: np.ndarray, flips: np.ndarray) -> None:
    """In place on (M, C, H, W) images and (M, H, W) masks (H = W): crop i rotated by ``turns[i]``
    quarter turns (as np.rot90), then mirrored left-right if ``flips[i]``; one operation per
    distinct transform in the batch."""
    for (turn, flip), (axes, transpose) in _DIHEDRAL.items():
        chosen = np.flatnonzero((turns == turn) & (flips == flip))
        if not len(chosen):
            continue
        index = _device_index(chosen, images.device)
        for tensor in (images, masks):
            part = tensor.index_select(0, index)
            part = part.flip(axes) if axes else part
            tensor.index_copy_(0, index, part.transpose(-2, -1) if transpose else part)


def _device_index(values: np.ndarray, device: torch.device) -> Tensor:
    """Host indices on ``device`` without waiting for work queued there (small, pageable copy)."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device, non_blocking=True)


def _origins(
    group: FieldGroup, rows: np.ndarray, crop: int, min_foreground: float, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Top-left (y, x), each (m,), of crops centred on random foreground pixels of fields ``rows``.

    Per crop CROP_TRIES centres are drawn; the first whose crop has ``min_foreground`` foreground wins,
    else the one with most foreground. A field without foreground gives a uniform random crop.
    """
    device = group.masks.device
    height, width = group.shape
    draws, uniform = rng.random((len(rows), CROP_TRIES)), rng.random((len(rows), 2))
    sizes = group.sizes[rows]
    picks = group.starts[rows][:, None] + (draws * sizes[:, None]).astype(np.int64)
    picks = np.minimum(picks, max(len(group.foreground) - 1, 0))
    flat = group.foreground[_device_index(picks, device)].long() if len(group.foreground) else torch.zeros(
        picks.shape, dtype=torch.long, device=device)
    ys = (flat // width - crop // 2).clamp(0, height - crop)
    xs = (flat % width - crop // 2).clamp(0, width - crop)
    row = _device_index(rows, device)
    share = group.counts[row[:, None], ys, xs].double() / crop**2
    good = share >= min_foreground
    choice = torch.where(good.any(1), good.byte().argmax(1), share.argmax(1))[:, None]
    y, x = ys.gather(1, choice).squeeze(1), xs.gather(1, choice).squeeze(1)
    spans = np.array([height - crop + 1, width - crop + 1])
    fallback = _device_index((uniform * spans).astype(np.int64), device)
    empty = torch.from_numpy(sizes == 0).to(device, non_blocking=True)
    return torch.where(empty, fallback[:, 0], y), torch.where(empty, fallback[:, 1], x)


def cut_tensor(
    group: FieldGroup, rows: np.ndarray, y: Tensor, x: Tensor, crop: int, turns: np.ndarray, flips: np.ndarray
) -> tuple[Tensor, Tensor]:
    """(m, C, crop, crop) pixels and (m, crop, crop) masks at origins (y, x) of fields ``rows``, turned and
    mirrored (``dihedral``): one gather from sliding-window views of the group, then one operation per
    transform (any device)."""
    row = _device_index(rows, group.masks.device)
    windows = group.pixels.unfold(2, crop, 1).unfold(3, crop, 1)  # (F, C, Y', X', crop, crop) view
    mask_windows = group.masks.unfold(1, crop, 1).unfold(2, crop, 1)
    images, masks = windows[row, :, y, x], mask_windows[row, y, x]
    dihedral(images, masks, turns, flips)
    return images, masks


def cut_numpy(
    group: FieldGroup, rows: np.ndarray, y: Tensor, x: Tensor, crop: int, turns: np.ndarray, flips: np.ndarray
) -> tuple[Tensor, Tensor]:
    """As ``cut_tensor`` for CPU tensors: per crop one copy of a turned, mirrored numpy view of the field
    (numpy views may run backwards, torch's may not)."""
    pixels, masks = group.pixels.numpy(), group.masks.numpy()
    images = np.empty((len(rows), pixels.shape[1], crop, crop), np.float32)
    out = np.empty((len(rows), crop, crop), bool)
    for i, (row, top, left, turn, flip) in enumerate(zip(rows, y.tolist(), x.tolist(), turns, flips, strict=True)):
        image = np.rot90(pixels[row, :, top : top + crop, left : left + crop], turn, (1, 2))
        mask = np.rot90(masks[row, top : top + crop, left : left + crop], turn)
        images[i], out[i] = (image[..., ::-1], mask[..., ::-1]) if flip else (image, mask)
    return torch.from_numpy(images), torch.from_numpy(out)


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
            sum(field_bytes(channels, _field_shape(store, s, f, crop), crop) for f in store.meta.fields[s])
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
        self._pool = _thread_pool(self.threads, "cellmi-crops", self.device)

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
            _device_index(ids, self.device),
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
            return cut(group, rows, *_origins(group, rows, crop, least, rng), crop, turns, flips)
        channels = len(self.store.meta.channels)
        images = torch.empty(len(rows), channels, crop, crop, device=self.device)
        masks = torch.empty(len(rows), crop, crop, dtype=torch.bool, device=self.device)
        for g in np.unique(groups):
            mine = np.flatnonzero(groups == g)
            group = shard.groups[int(g)]
            origin = _origins(group, rows[mine], crop, least, rng)
            pixels, mask = cut(group, rows[mine], *origin, crop, turns[mine], flips[mine])
            index = _device_index(mine, self.device)
            images.index_copy_(0, index, pixels)
            masks.index_copy_(0, index, mask)
        return images, masks

    def _nuisance(self, images: Tensor, rng: np.random.Generator) -> None:
        """In place, on normalised (M, C, H, W) crops: sometimes defocus blur, per-channel gain.

        Both act on linear intensities; in the log domain a gain g is a shift of log(g) / std. The
        blur undoes the log with expm1, which in ``field`` mode gives signal + pedestal - 1 rather than
        the signal: a constant per channel, which a normalised blur carries through unchanged.
        """
        cfg = self.cfg
        m, c = images.shape[:2]
        blurred = np.flatnonzero(rng.random(m) < cfg.aug_blur)
        sigmas = rng.uniform(0.5, cfg.aug_blur_sigma, size=m)[blurred]
        if len(blurred):
            index = _device_index(blurred, self.device)
            raw = torch.expm1(images.index_select(0, index) * self.std + self.mean)
            raw = gaussian_blur(raw, sigmas)
            images.index_copy_(0, index, (torch.log1p(raw.clamp(min=0)) - self.mean) / self.std)
        if cfg.aug_gain > 0:
            gain = rng.uniform(np.log1p(-cfg.aug_gain), np.log1p(cfg.aug_gain), size=(m, c, 1, 1))
            images += torch.from_numpy(gain.astype(np.float32)).to(self.device, non_blocking=True) / self.std

    def batches(self, start: int) -> Iterator[Batch]:
        """Batches of steps start, start+1, ...; the next ones are made while the caller trains, and
        the next shard (if any) loads while the current one is walked.

        Each batch is a pure function of its step, so several threads make the same stream.
        """
        ahead = max(PREFETCH, 2 * self.threads)
        pending: list[Future[Batch]] = [self._pool.submit(self.batch, start + i) for i in range(ahead)]
        step, visit = start + ahead, -1
        while True:
            now = self.plan.visit(step - ahead)
            if len(self.plan.shards) > 1 and now.number != visit:
                visit = now.number
                self.resident.prefetch(self.plan.next_shard(now))
            batch = pending.pop(0).result()
            pending.append(self._pool.submit(self.batch, step))
            step += 1
            yield batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.resident.close()
