"""Global vectors of the windows of one field: shared local map (default) or each window alone.

Both paths take an encoder with the ``cellmi.model.Encoder`` contract: ``stride``,
``local_size(window)``, ``local_map(x)`` (N, C, H, W) -> (N, L, h, w) with unpadded convs,
``global_from_local(local)`` (N, L, m, m) -> (N, G), and ``forward(x)`` -> (local, global).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from cellmi.infer.windows import map_groups

__all__ = ["EncoderLike", "activation_bytes", "embed_naive", "embed_shared"]


class EncoderLike(Protocol):
    stride: int

    def local_size(self, window: int) -> int: ...
    def local_map(self, x: torch.Tensor) -> torch.Tensor: ...
    def global_from_local(self, local: torch.Tensor) -> torch.Tensor: ...
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _global_dim(encoder: EncoderLike, channels: int, window: int) -> int:
    probe = torch.zeros(1, channels, window, window)
    return int(encoder(probe)[1].shape[1])


@torch.inference_mode()
def embed_shared(
    encoder: EncoderLike, pixels: np.ndarray, corners: np.ndarray, window: int, batch: int = 256
) -> np.ndarray:
    """One local map per group of aligned windows, each window's global vector from its cut.

    pixels (C, Y, X) float32 normalised, corners (n, 2) as (y, x) -> (n, G) float32.
    """
    m = encoder.local_size(window)
    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    out: np.ndarray | None = None
    for group in map_groups(corners, window, encoder.stride):
        y0, x0, y1, x1 = group.box
        local = encoder.local_map(image[None, :, y0:y1, x0:x1])[0]  # (L, h, w)
        for start in range(0, len(group.rows), batch):
            cells = group.cells[start : start + batch]
            cuts = torch.stack([local[:, r : r + m, c : c + m] for r, c in cells])
            vectors = encoder.global_from_local(cuts).float().numpy()
            if out is None:
                out = np.zeros((len(corners), vectors.shape[1]), np.float32)
            out[group.rows[start : start + batch]] = vectors
    if out is None:
        return np.zeros((0, _global_dim(encoder, pixels.shape[0], window)), np.float32)
    return out


@torch.inference_mode()
def embed_naive(
    encoder: EncoderLike, pixels: np.ndarray, corners: np.ndarray, window: int, batch: int = 64
) -> np.ndarray:
    """Each window encoded alone, ``batch`` windows per forward pass.

    pixels (C, Y, X) float32 normalised, corners (n, 2) as (y, x) -> (n, G) float32.
    """
    if len(corners) == 0:
        return np.zeros((0, _global_dim(encoder, pixels.shape[0], window)), np.float32)
    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    parts = []
    for start in range(0, len(corners), batch):
        crops = torch.stack(
            [image[:, y : y + window, x : x + window] for y, x in corners[start : start + batch]]
        )
        parts.append(encoder(crops)[1].float().numpy())
    return np.concatenate(parts).astype(np.float32)


def _numel(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(v) for v in value)
    return 0


@torch.inference_mode()
def activation_bytes(encoder: torch.nn.Module, channels: int, size: int) -> tuple[int, tuple[int, ...]]:
    """Peak float32 bytes of ``local_map`` on one (channels, size, size) input, and the map's shape.

    The peak is the largest input+output pair over the leaf modules (inference frees the rest).
    """
    sizes: list[int] = []
    hooks = [
        mod.register_forward_hook(lambda _m, inp, out: sizes.append(_numel(inp) + _numel(out)))
        for mod in encoder.modules()
        if not list(mod.children())
    ]
    try:
        local = encoder.local_map(torch.zeros(1, channels, size, size))  # type: ignore[operator]
    finally:
        for hook in hooks:
            hook.remove()
    peak = max(sizes, default=0) + channels * size * size + local.numel()
    return 4 * peak, tuple(local.shape[1:])
