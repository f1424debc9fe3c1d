"""Batched crop operations on any device: where to cut, cutting (turned and mirrored), content statistics,
defocus blur. Each acts on a whole batch in a few tensor operations; on a CPU the two costliest steps
take numpy paths that give exactly the same values.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cellmi.train.fields import FieldGroup

__all__ = [
    "CONTENT_PERCENTILE",
    "CROP_TRIES",
    "content_size",
    "crop_content",
    "crop_origins",
    "cut_numpy",
    "cut_tensor",
    "device_index",
    "dihedral",
    "gaussian_blur",
]

CROP_TRIES = 8
CONTENT_PERCENTILE = 95.0
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter


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
        index = device_index(chosen, images.device)
        for tensor in (images, masks):
            part = tensor.index_select(0, index)
            part = part.flip(axes) if axes else part
            tensor.index_copy_(0, index, part.transpose(-2, -1) if transpose else part)


def device_index(values: np.ndarray, device: torch.device) -> Tensor:
    """Host indices on ``device`` without waiting for work queued there (small, pageable copy)."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device, non_blocking=True)


def crop_origins(
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
    flat = group.foreground[device_index(picks, device)].long() if len(group.foreground) else torch.zeros(
        picks.shape, dtype=torch.long, device=device)
    ys = (flat // width - crop // 2).clamp(0, height - crop)
    xs = (flat % width - crop // 2).clamp(0, width - crop)
    row = device_index(rows, device)
    share = group.counts[row[:, None], ys, xs].double() / crop**2
    good = share >= min_foreground
    choice = torch.where(good.any(1), good.byte().argmax(1), share.argmax(1))[:, None]
    y, x = ys.gather(1, choice).squeeze(1), xs.gather(1, choice).squeeze(1)
    spans = np.array([height - crop + 1, width - crop + 1])
    fallback = device_index((uniform * spans).astype(np.int64), device)
    empty = torch.from_numpy(sizes == 0).to(device, non_blocking=True)
    return torch.where(empty, fallback[:, 0], y), torch.where(empty, fallback[:, 1], x)


def cut_tensor(
    group: FieldGroup, rows: np.ndarray, y: Tensor, x: Tensor, crop: int, turns: np.ndarray, flips: np.ndarray
) -> tuple[Tensor, Tensor]:
    """(m, C, crop, crop) pixels and (m, crop, crop) masks at origins (y, x) of fields ``rows``, turned and
    mirrored (``dihedral``): one gather from sliding-window views of the group, then one operation per
    transform (any device)."""
    row = device_index(rows, group.masks.device)
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
