"""Critics of the DIM objective: encode-and-dot-product scorers and the prior discriminator.

The critics only embed; scores and losses are computed by ``cellmi.losses``.
"""

from __future__ import annotations

from torch import Tensor, nn

from cellmi.model.encoder import NEGATIVE_SLOPE, he_init

__all__ = ["GlobalCritic", "LocalCritic", "PriorDiscriminator"]


class _Projection(nn.Module):
    """Two-layer embedding with a linear shortcut; 1x1 convs for maps, linear layers for vectors."""

    def __init__(self, in_dim: int, out_dim: int, spatial: bool) -> None:
        super().__init__()

        def layer(i: int, o: int) -> nn.Module:
            return nn.Conv2d(i, o, 1) if spatial else nn.Linear(i, o)

        self.path = nn.Sequential(
            layer(in_dim, out_dim), nn.LeakyReLU(NEGATIVE_SLOPE), layer(out_dim, out_dim)
        )
        self.shortcut = layer(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.path(x) + self.shortcut(x)


class LocalCritic(nn.Module):
    """Embeds local features and global vectors into one space for local-global dot-product scores."""

    def __init__(self, local_dim: int, global_dim: int, dim: int) -> None:
        super().__init__()
        self.local_net = _Projection(local_dim, dim, spatial=True)
        self.global_net = _Projection(global_dim, dim, spatial=False)
        he_init(self)

    def forward(self, local: Tensor, global_: Tensor) -> tuple[Tensor, Tensor]:
        """(N, L, h, w) local map, (N, G) global -> (N, D, h, w), (N, D) embeddings."""
        return self.local_net(local), self.global_net(global_)


class GlobalCritic(nn.Module):
    """Embeds a crop summary (foreground mean of its local map) and global vectors for global scores."""

    def __init__(self, local_dim: int, global_dim: int, dim: int) -> None:
        super().__init__()
        self.summary_net = _Projection(local_dim, dim, spatial=False)
        self.global_net = _Projection(global_dim, dim, spatial=False)
        he_init(self)

    def forward(self, local: Tensor, global_: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(N, L, h, w) local map, (N, G) global, (N, h, w) bool foreground -> (N, D), (N, D)."""
        weight = valid.unsqueeze(1).to(local.dtype)
        summary = (local * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp(min=1.0)
        return self.summary_net(summary), self.global_net(global_)


class PriorDiscriminator(nn.Module):
    """Tells samples of the uniform prior on [0, 1]^G from sigmoid(global vector)."""

    def __init__(self, global_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(global_dim, hidden),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Linear(hidden, hidden // 4),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Linear(hidden // 4, 1),
        )
        he_init(self)

    def forward(self, z: Tensor) -> Tensor:
        """(N, G) points in [0, 1]^G -> (N,) logits, positive meaning "drawn from the prior"."""
        return self.net(z).squeeze(1)
