"""Global vectors of the windows of one field: shared local map (default) or each window alone.

Both paths take an encoder with the ``cellmi.model.Encoder`` contract: ``stride``,
``local_size(window)``, ``local_map(x)`` (N, C, H, W) -> (N, L, h, w) with unpadded convs,
``pool_mask(mask)`` (N, H, W) -> (N, h, w) foreground share on the same grid,
``global_from_local(local, share)`` (N, L, m, m) -> (N, G), and ``forward(x, mask)`` -> (local, global).
The foreground mask, when given, only weights the pooling (encoders with ``pool="foreground"``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from cellmi.infer.windows import map_groups
from cellmi.settings import TEST_VIEWS

__all__ = [
    "VIEWS",
    "EncoderLike",
    "activation_bytes",
    "embed_batch",
    "embed_naive",
    "embed_shared",
    "embed_views",
    "local_maps",
    "view_of",
]

VIEWS = TEST_VIEWS  # how many of the field's dihedral transforms each window's vector may average over


class EncoderLike(Protocol):
    stride: int

    def local_size(self, window: int) -> int: ...
    def local_map(self, x: torch.Tensor) -> torch.Tensor: ...
    def pool_mask(self, mask: torch.Tensor) -> torch.Tensor: ...
    def global_from_local(self, local: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor: ...
    def __call__(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _global_dim(encoder: EncoderLike, channels: int, window: int, device: torch.device | None = None) -> int:
    probe = torch.zeros(1, channels, window, window, device=device)
    return int(encoder(probe)[1].shape[1])


def _mask_tensor(mask: np.ndarray | None) -> torch.Tensor | None:
    return None if mask is None else torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))


@torch.inference_mode()
def embed_shared(
    encoder: EncoderLike,
    pixels: np.ndarray,
    corners: np.ndarray,
    window: int,
    batch: int = 256,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """One local map per group of aligned windows, each window's global vector from its cut.

    pixels (C, Y, X) float32 normalised, corners (n, 2) as (y, x)[, mask (Y, X) foreground] -> (n, G)
    float32. The mask's pooled share is cut on the same grid as the local map.
    """
    m = encoder.local_size(window)
    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    fg = _mask_tensor(mask)
    out: np.ndarray | None = None
    for group in map_groups(corners, window, encoder.stride):
        y0, x0, y1, x1 = group.box
        local = encoder.local_map(image[None, :, y0:y1, x0:x1])[0]  # (L, h, w)
        share = encoder.pool_mask(fg[None, y0:y1, x0:x1])[0] if fg is not None else None  # (h, w)
        for start in range(0, len(group.rows), batch):
            cells = group.cells[start : start + batch]
            cuts = torch.stack([local[:, r : r + m, c : c + m] for r, c in cells])
            shares = torch.stack([share[r : r + m, c : c + m] for r, c in cells]) if share is not None else None
            vectors = encoder.global_from_local(cuts, shares).float().numpy()
            if out is None:
                out = np.zeros((len(corners), vectors.shape[1]), np.float32)
            out[group.rows[start : start + batch]] = vectors
    if out is None:
        return np.zeros((0, _global_dim(encoder, pixels.shape[0], window)), np.float32)
    return out


@torch.inference_mode()
def embed_naive(
    encoder: EncoderLike,
    pixels: np.ndarray,
    corners: np.ndarray,
    window: int,
    batch: int = 64,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Each window encoded alone, ``batch`` windows per forward pass.

    pixels (C, Y, X) float32 normalised, corners (n, 2) as (y, x)[, mask (Y, X) foreground] -> (n, G)
    float32.
    """
    if len(corners) == 0:
        return np.zeros((0, _global_dim(encoder, pixels.shape[0], window)), np.float32)
    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    fg = _mask_tensor(mask)
    parts = []
    for start in range(0, len(corners), batch):
        chunk = corners[start : start + batch]
        crops = torch.stack([image[:, y : y + window, x : x + window] for y, x in chunk])
        masks = torch.stack([fg[y : y + window, x : x + window] for y, x in chunk]) if fg is not None else None
        parts.append(encoder(crops, masks)[1].float().numpy())
    return np.concatenate(parts).astype(np.float32)


def local_maps(encoder: EncoderLike, pixels: torch.Tensor, precision: torch.dtype | None) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, h, w) float32 local maps; the conv trunk under autocast to ``precision``
    (e.g. torch.bfloat16) when given, the result back in float32 for pooling and the head."""
    if precision is None:
        return encoder.local_map(pixels)
    with torch.autocast(device_type=pixels.device.type, dtype=precision):
        return encoder.local_map(pixels).float()


@torch.inference_mode()
def embed_batch(
    encoder: EncoderLike,
    pixels: torch.Tensor,
    corners: list[np.ndarray],
    window: int,
    masks: torch.Tensor | None = None,
    precision: torch.dtype | None = None,
    chunk: int = 4096,
) -> list[np.ndarray]:
    """Shared-map embedding of B fields of one shape in one forward pass per map group (GPU batches).

    pixels (B, C, Y, X) float32 normalised on the encoder's device, corners: per field (n_b, 2) as
    (y, x)[, masks (B, Y, X) foreground] -> per field (n_b, G) float32. Groups of aligned windows
    (:func:`map_groups`) are taken over all fields' corners together, so each group's map is computed
    for the whole batch at once; each window is cut from its own field's map, as in ``embed_shared``.
    """
    m = encoder.local_size(window)
    every = np.concatenate([np.asarray(c, np.int64).reshape(-1, 2) for c in corners])
    owner = np.repeat(np.arange(len(corners)), [len(c) for c in corners])
    out: np.ndarray | None = None
    for group in map_groups(every, window, encoder.stride):
        y0, x0, y1, x1 = group.box
        tiles = local_maps(encoder, pixels[:, :, y0:y1, x0:x1], precision).unfold(2, m, 1).unfold(3, m, 1)
        shares = None  # (B, h', w', m, m) foreground share of each window's positions
        if masks is not None:
            shares = encoder.pool_mask(masks[:, y0:y1, x0:x1]).unfold(1, m, 1).unfold(2, m, 1)
        for start in range(0, len(group.rows), chunk):
            rows, cells = group.rows[start : start + chunk], group.cells[start : start + chunk]
            b, r, c = (torch.as_tensor(v, device=pixels.device) for v in (owner[rows], cells[:, 0], cells[:, 1]))
            cut = tiles[b, :, r, c]  # (n, L, m, m)
            vectors = encoder.global_from_local(cut, None if shares is None else shares[b, r, c]).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(every), vectors.shape[1]), np.float32)
            out[rows] = vectors
    if out is None:
        width = _global_dim(encoder, pixels.shape[1], window, pixels.device)
        return [np.zeros((0, width), np.float32) for _ in corners]
    return np.split(out, np.cumsum([len(c) for c in corners])[:-1])


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


def view_of(
    pixels: np.ndarray, mask: np.ndarray | None, corners: np.ndarray, window: int, view: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Dihedral transform ``view`` (0-7: ``view % 4`` quarter turns, then a left-right flip from 4 on)
    of a field (C, Y, X), its mask (Y, X) and window corners (n, 2) as (y, x): the same windows,
    seen turned."""
    turns, flip = view % 4, view >= 4
    pix, msk, cor = pixels, mask, np.asarray(corners).copy()
    for _ in range(turns):  # counter-clockwise: (y, x) -> (width - x - window, y)
        width = pix.shape[-1]
        pix = np.rot90(pix, 1, axes=(-2, -1))
        msk = None if msk is None else np.rot90(msk, 1)
        cor = np.stack([width - cor[:, 1] - window, cor[:, 0]], axis=1)
    if flip:
        width = pix.shape[-1]
        pix, msk = pix[..., ::-1], None if msk is None else msk[:, ::-1]
        cor = np.stack([cor[:, 0], width - cor[:, 1] - window], axis=1)
    return np.ascontiguousarray(pix), None if msk is None else np.ascontiguousarray(msk), cor


def embed_views(
    embed, encoder: EncoderLike, pixels: np.ndarray, corners: np.ndarray, window: int, batch: int,
    mask: np.ndarray | None = None, views: int = 1,
) -> np.ndarray:
    """Mean of ``embed`` (embed_shared or embed_naive) over the first ``views`` dihedral views of the field.

    Cells have no preferred orientation, so a window's vector averaged over turns and flips keeps
    its content and loses orientation noise.
    """
    if views not in VIEWS:
        raise ValueError(f"views {views} is not one of {VIEWS}")
    total = None
    for view in range(views):
        pix, msk, cor = view_of(pixels, mask, corners, window, view)
        vectors = embed(encoder, pix, cor, window, batch, msk)
        total = vectors if total is None else total + vectors
    return (total / views).astype(np.float32)
