"""The Deep InfoMax encoder: an unpadded conv trunk gives the local map, a pooled head the global vector.

Intensity and cell density must reach the representation, so the trunk has no normalisation
layer (batch-norm would rescale intensity away) and the global vector is a *mean* over the local
map (max-pooling forgets how many cells there are). Batch-norm sits only in the global head,
where it helps optimisation without touching the map.

Every conv is unpadded, so a window cut from the local map of a whole field (on the stride grid)
equals the local map of that window encoded alone; inference relies on this.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["POOLS", "READOUTS", "STEM_FROM", "Encoder", "Readout", "build_encoder", "he_init", "layer_plan"]

# Pooling of the local map into the global vector: plain mean, or weighted by foreground share.
POOLS = ("mean", "foreground")
# Where a window's vector is read: the head's output (what the training objective shapes), the
# pooled local map that feeds the head, or both side by side.
READOUTS = ("head", "pooled", "both")
# Weight of a pure-background position; keeps the weighted mean defined when a crop has no cells.
FOREGROUND_EPS = 1e-3

NEGATIVE_SLOPE = 0.2
# Crops of at least this edge get a stride-2 stem: a 128 px crop then costs what a 64 px crop
# costs in the trunk and gives the same 9x9 local grid (prototype, DESIGN.md section 7); crops of
# twice that edge get a stride-4 stem, for the same cost and grid again.
STEM_FROM = 128
# (kernel, stride, output channels as a multiple of width; None means local_dim)
_STEM = (2, 2, 1)
_WIDE_STEM = (4, 4, 1)
_TRUNK = ((3, 1, 1), (4, 2, 2), (3, 1, 2), (4, 2, 4), (3, 1, 4), (3, 1, None))


def layer_plan(width: int, local_dim: int, crop: int) -> list[tuple[int, int, int]]:
    """The conv layers as (kernel, stride, out_channels), a stem first when ``crop >= STEM_FROM``."""
    stem = (_WIDE_STEM,) if crop >= 2 * STEM_FROM else (_STEM,) if crop >= STEM_FROM else ()
    spec = stem + _TRUNK
    return [(k, s, local_dim if m is None else m * width) for k, s, m in spec]


def he_init(module: nn.Module) -> None:
    """He (Kaiming) initialisation for LeakyReLU layers, zero biases; leaves norm layers alone."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class Encoder(nn.Module):
    """Local feature map and global vector of image crops.

    ``local_map``: (N, C, H, W) -> (N, L, h, w) with h = local_size(H); ``global_from_local``:
    (N, L, h, w) -> (N, G); ``forward`` returns both.
    """

    def __init__(
        self, in_channels: int, width: int, local_dim: int, global_dim: int, crop: int, pool: str = "mean"
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r} is not one of {POOLS}")
        self.pool = pool
        self.arch = {
            "in_channels": in_channels,
            "width": width,
            "local_dim": local_dim,
            "global_dim": global_dim,
            "crop": crop,
            "pool": pool,
        }
        plan = layer_plan(width, local_dim, crop)
        self.geometry = [(k, s) for k, s, _ in plan]
        self.stride = math.prod(s for _, s in self.geometry)
        layers: list[nn.Module] = []
        channels = in_channels
        for kernel, stride, out in plan:
            layers += [nn.Conv2d(channels, out, kernel, stride), nn.LeakyReLU(NEGATIVE_SLOPE)]
            channels = out
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(local_dim, local_dim),
            nn.BatchNorm1d(local_dim),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Linear(local_dim, global_dim),
        )
        he_init(self)
        if crop % self.stride or self.local_size(crop) < 1:
            raise ValueError(
                f"crop {crop} must be a multiple of the stride {self.stride} and at least "
                f"the receptive field {self.receptive_field}"
            )

    @property
    def receptive_field(self) -> int:
        """Edge in pixels of the input region one local position sees."""
        field, jump = 1, 1
        for kernel, stride in self.geometry:
            field += (kernel - 1) * jump
            jump *= stride
        return field

    def local_size(self, window: int) -> int:
        """Edge of the local map of a ``window`` x ``window`` input (window % stride == 0); may be <= 0."""
        if window % self.stride:
            raise ValueError(f"window {window} is not a multiple of the stride {self.stride}")
        size = window
        for kernel, stride in self.geometry:
            size = (size - kernel) // stride + 1
        return size

    def local_map(self, x: Tensor) -> Tensor:
        """(N, C, H, W) normalised images -> (N, L, h, w) local features (unpadded convs)."""
        return self.trunk(x)

    def global_from_local(self, local: Tensor, share: Tensor | None = None) -> Tensor:
        """(N, L, h, w) local map -> (N, G) global vector: pooled over positions, then the head.

        With ``pool="foreground"`` and ``share`` (N, h, w), the foreground share of each position
        (``pool_mask``), positions are weighted by it, so background does not dilute the cells; a
        crop without foreground falls back to the plain mean.
        """
        return self.head(self.pooled(local, share))

    def pooled(self, local: Tensor, share: Tensor | None = None) -> Tensor:
        """(N, L, h, w) local map -> (N, L): the mean over positions that feeds the head (see
        ``global_from_local``)."""
        if self.pool == "foreground" and share is not None:
            weight = share.to(local.dtype).unsqueeze(1) + FOREGROUND_EPS
            return (local * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
        return local.mean(dim=(2, 3))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(N, C, H, W)[, (N, H, W) foreground mask] -> ((N, L, h, w) local map, (N, G) global vector)."""
        local = self.local_map(x)
        share = self.pool_mask(mask) if mask is not None else None
        return local, self.global_from_local(local, share)

    def pool_mask(self, mask: Tensor) -> Tensor:
        """(N, H, W) foreground mask -> (N, h, w) foreground share seen by each local position.

        Average-pools through the same kernels and strides as the trunk, so the grid matches
        ``local_map`` exactly.
        """
        out = mask.float().unsqueeze(1)
        for kernel, stride in self.geometry:
            out = F.avg_pool2d(out, kernel, stride)
        return out.squeeze(1)


def build_encoder(arch: dict[str, Any], seed: int) -> Encoder:
    """An encoder of architecture ``arch`` (Encoder kwargs) with untrained, seeded weights, in eval mode.

    The global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(**arch)
    return encoder.eval()


class Readout(nn.Module):
    """An encoder whose window vector is read at ``readout`` (one of ``READOUTS``): the head's output
    (the encoder as trained), the pooled local map before the head, or both concatenated.

    Inference only; it has the same contract as ``Encoder`` (local map, pool mask, geometry).
    """

    def __init__(self, encoder: Encoder, readout: str = "head") -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout {readout!r} is not one of {READOUTS}")
        self.encoder = encoder
        self.readout = readout
        self.stride = encoder.stride

    def local_size(self, window: int) -> int:
        return self.encoder.local_size(window)

    def local_map(self, x: Tensor) -> Tensor:
        return self.encoder.local_map(x)

    def pool_mask(self, mask: Tensor) -> Tensor:
        return self.encoder.pool_mask(mask)

    def global_from_local(self, local: Tensor, share: Tensor | None = None) -> Tensor:
        pooled = self.encoder.pooled(local, share)
        if self.readout == "pooled":
            return pooled
        head = self.encoder.head(pooled)
        return head if self.readout == "head" else torch.cat([head, pooled], dim=1)

    # Encoder's own composition of local map, mask pooling and global_from_local, which here reads out.
    forward = Encoder.forward
