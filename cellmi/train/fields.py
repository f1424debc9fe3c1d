"""Training fields prepared once and held on the training device, and the shards of sets too large for it.

A prepared field is its normalised pixels, its mask, the flat positions of its foreground pixels and
the foreground count of the crop at every origin; fields of one shape are stacked into one tensor
each. When all of them do not fit ``train.memory_gb``, consecutive runs of whole samples (sequential
reads, sample-level pairs) are held one at a time, the next loading while the current one is walked.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cellmi.errors import UserError
from cellmi.store import ImageStore

__all__ = [
    "GIB",
    "FieldGroup",
    "ResidentShards",
    "Shard",
    "ShardPlan",
    "Visit",
    "device_threads",
    "field_bytes",
    "field_shape",
    "plan_shards",
    "prepare_shard",
]

READ_THREADS = 4  # fields read and prepared at once while a shard loads
GIB = 2**30


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


def field_shape(store: ImageStore, sample: str, field_id: str, crop: int) -> tuple[int, int]:
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


def device_threads(threads: int, name: str, device: torch.device) -> ThreadPoolExecutor:
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
        self._pool = device_threads(1, "cellmi-shards", device)

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
