"""Batched crop operations on any device: where to cut, cutting (turned and mirrored), content statistics,
defocus blur. Each acts on a whole batch in a few tensor operations; on a CPU the two costliest steps
(cutting, content) take numpy paths that give the same values (the sums to float rounding; tested).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cellmi.data.nuisance import ramp_along
from cellmi.train.fields import FieldGroup

__all__ = [
    "CONTENT_PERCENTILE",
    "CROP_TRIES",
    "content_numpy",
    "content_size",
    "content_tensor",
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
    share; a crop without foreground uses all its pixels. Numpy crop by crop on a CPU (``content_numpy``),
    batched tensor operations elsewhere (``content_tensor``)."""
    return content_numpy(pixels, masks) if pixels.device.type == "cpu" else content_tensor(pixels, masks)


def _ranks(n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Foreground counts (M, 1) -> the ascending ranks below and above the percentile, and its fraction
    between them, as numpy's ``linear`` method places it."""
    position = (n.double() - 1) * (CONTENT_PERCENTILE / 100)
    below = position.floor()
    return below.long(), torch.minimum(below + 1, n.double() - 1).long(), position - below


def _interpolate(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Between the values of the two ranks, as numpy's ``_lerp`` does (float64)."""
    return torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)


def content_tensor(pixels: Tensor, masks: Tensor) -> Tensor:
    """``crop_content`` on any device: float32 matrix products for the sums (full precision: training never
    enables TF32), one top-k per crop and channel for the percentile."""
    m, c = pixels.shape[:2]
    values = pixels.reshape(m, c, -1)
    weight = masks.reshape(m, 1, -1).to(values.dtype)
    count = weight.sum(-1)
    weight += (count == 0).to(values.dtype).unsqueeze(-1)  # (M, 1, P): 1 for the pixels that count
    n = weight.sum(-1)
    mean = torch.bmm(values, weight.transpose(1, 2)).squeeze(-1) / n
    deviation = (values - mean.unsqueeze(-1)).mul_(weight).reshape(m * c, 1, -1)
    std = (torch.bmm(deviation, deviation.transpose(1, 2)).reshape(m, c) / n).sqrt()
    top = torch.where(weight.bool(), values, -torch.inf).topk(min(_tail(values.shape[-1]), values.shape[-1]), -1)
    below, above, t = _ranks(n)
    last = n.long() - 1  # top is descending: ascending rank r sits at last - r
    a, b = (top.values.gather(-1, (last - r).expand(m, c).unsqueeze(-1)).squeeze(-1).double() for r in (below, above))
    return torch.cat([mean, std, _interpolate(a, b, t).float(), count / values.shape[-1]], dim=1)


def content_numpy(pixels: Tensor, masks: Tensor) -> Tensor:
    """``crop_content`` for CPU tensors, crop by crop with the fastest numpy calls for each part: the pixels
    that count taken out by ``compress``, one partition at the lower rank (the upper rank is the least
    value above it), sums as matrix products."""
    m, c = pixels.shape[:2]
    values, fg = pixels.numpy().reshape(m, c, -1), masks.numpy().reshape(m, -1)
    count = fg.sum(axis=1)
    n = np.where(count > 0, count, fg.shape[1])
    below, above, t = (r.numpy()[:, 0] for r in _ranks(torch.from_numpy(n)[:, None]))
    stats = np.empty((4, m, c), np.float64)  # mean, std, the values of ranks below and above
    for i in range(m):
        taken = np.compress(fg[i], values[i], axis=1) if count[i] else values[i].copy()
        taken.partition(below[i], axis=1)
        stats[2, i] = taken[:, below[i]]
        stats[3, i] = taken[:, above[i] :].min(axis=1)
        mean = taken @ np.ones(n[i], np.float32) / n[i]
        deviation = taken - mean[:, None].astype(np.float32)
        stats[0, i] = mean
        stats[1, i] = np.sqrt((deviation[:, None, :] @ deviation[:, :, None])[:, 0, 0] / n[i])
    tail = _interpolate(torch.from_numpy(stats[2]), torch.from_numpy(stats[3]), torch.from_numpy(t)[:, None])
    moments = torch.from_numpy(stats[:2].astype(np.float32))
    share = torch.from_numpy((count / fg.shape[1]).astype(np.float32))[:, None]
    return torch.cat([moments[0], moments[1], tail.float(), share], dim=1)


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
    own = _radii(sigmas)[:, None]
    kernels = np.exp(-0.5 / sigmas[:, None] ** 2 * offsets**2) * (np.abs(offsets) <= own)
    return kernels / kernels.sum(axis=1, keepdims=True)


def gaussian_blur(images: Tensor, sigmas: np.ndarray) -> Tensor:
    """(M, C, H, W) images, (M,) sigmas in pixels -> each image blurred over H and W with its own sigma.

    The same filter as ``scipy.ndimage.gaussian_filter(image, (0, s, s), mode="reflect")``, as one
    depthwise convolution per axis for the crops of each kernel radius (one kernel length for all
    would cost the largest radius on every crop).
    """
    radii = _radii(sigmas)
    lengths = np.unique(radii)
    if len(lengths) == 1:  # no copies in and out
        return _blur(images, sigmas, int(lengths[0]))
    out = torch.empty_like(images)
    for radius in lengths:
        chosen = np.flatnonzero(radii == radius)
        index = device_index(chosen, images.device)
        out.index_copy_(0, index, _blur(images.index_select(0, index), sigmas[chosen], int(radius)))
    return out


def _radii(sigmas: np.ndarray) -> np.ndarray:
    """Kernel radius of each sigma, as scipy's."""
    return (BLUR_TRUNCATE * np.asarray(sigmas, float) + 0.5).astype(int)


def _blur(images: Tensor, sigmas: np.ndarray, radius: int) -> Tensor:
    """``gaussian_blur`` with kernels of one ``radius`` (at least each sigma's own)."""
    m, c, h, w = images.shape
    kernels = torch.from_numpy(_gaussian_kernels(sigmas, radius).astype(np.float32))
    kernels = kernels.to(images.device, non_blocking=True)
    weight = kernels.repeat_interleave(c, dim=0)[:, None]  # (M * C, 1, K)
    x = F.conv2d(_reflect_pad(images.reshape(1, m * c, h, w), radius, 2), weight[..., None], groups=m * c)
    x = F.conv2d(_reflect_pad(x, radius, 3), weight[:, :, None], groups=m * c)
    return x.reshape(m, c, h, w)


def focus_ramps(angles: np.ndarray, size: int, device: torch.device) -> Tensor:
    """(K,) directions in radians -> (K, 1, size, size) ramps rising from 0 at one edge of the crop to
    1 at the opposite one along each direction (the synthetic screens' focus gradient)."""
    grid = torch.linspace(-1.0, 1.0, size, device=device)
    cos = torch.from_numpy(np.cos(angles).astype(np.float32)).to(device)[:, None, None]
    sin = torch.from_numpy(np.sin(angles).astype(np.float32)).to(device)[:, None, None]
    return ramp_along(grid[None, None, :], grid[None, :, None], cos, sin)[:, None]


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
    if len(group.foreground):
        flat = group.foreground[device_index(picks, device)].long()
    else:  # no field of this shape has foreground: every crop takes the uniform fallback below
        flat = torch.zeros(picks.shape, dtype=torch.long, device=device)
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
