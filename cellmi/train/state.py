"""What training holds: the modules, their optimisers, the step; built, checkpointed and resumed here."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cellmi.errors import UserError
from cellmi.hardware import memory_format
from cellmi.log import log
from cellmi.model import Encoder, GlobalCritic, LocalCritic, PriorDiscriminator
from cellmi.settings import Settings, TrainSettings, as_dict
from cellmi.store import StoreMeta
from cellmi.train.checkpoint import FORMAT, load_checkpoint
from cellmi.train.data import content_size
from cellmi.train.distributed import DistInfo

LR_FLOOR = 0.05  # the cosine schedule's last learning rate, as a share of the setting

__all__ = [
    "DIMNet",
    "Trainer",
    "build_trainer",
    "checkpoint_state",
    "model_arch",
    "restore",
    "update_average",
    "wrap_distributed",
]


class DIMNet(nn.Module):
    """Encoder and critics as one module, so DDP averages all their gradients in one pass.

    ``forward`` returns embeddings only; the objective lives in ``cellmi.losses``.
    """

    def __init__(
        self, encoder: Encoder, local_critic: LocalCritic, global_critic: GlobalCritic | None, content: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.local_critic = local_critic
        self.global_critic = global_critic
        self.content_head = nn.Linear(encoder.arch["global_dim"], content)

    def forward(self, x: Tensor, valid: Tensor, share: Tensor | None = None) -> dict[str, Tensor]:
        """x (M, C, H, W), valid (M, h, w) bool[, share (M, h, w) foreground share of each position]
        -> global (M, G), local_emb (M, D, h, w), global_emb (M, D), content (M, K) predicted from
        the global vector [, summary_emb (M, D), global_emb_g (M, D) when the global critic is on]."""
        local = self.encoder.local_map(x)
        global_ = self.encoder.global_from_local(local, share)
        local_emb, global_emb = self.local_critic(local, global_)
        out = {
            "global": global_,
            "local_emb": local_emb,
            "global_emb": global_emb,
            "content": self.content_head(global_),
        }
        if self.global_critic is not None:
            out["summary_emb"], out["global_emb_g"] = self.global_critic(local, global_, valid)
        return out


@dataclass
class Trainer:
    """Modules, optimisers and progress of one training process."""

    net: DIMNet
    prior: PriorDiscriminator
    optim: torch.optim.Optimizer
    prior_optim: torch.optim.Optimizer
    ema: AveragedModel | None = None  # moving average of the encoder's weights (train.ema > 0)
    net_ddp: nn.Module | None = None
    prior_ddp: nn.Module | None = None
    step: int = 0
    train_seconds: float = 0.0

    @property
    def encoder(self) -> Encoder:
        return self.net.encoder

    @property
    def train_net(self) -> nn.Module:
        """The module to call in training: the DDP wrapper when distributed."""
        return self.net if self.net_ddp is None else self.net_ddp

    @property
    def train_prior(self) -> nn.Module:
        return self.prior if self.prior_ddp is None else self.prior_ddp


def model_arch(settings: Settings, in_channels: int) -> dict[str, Any]:
    """Encoder kwargs from the model settings and the store's channel count."""
    m = settings.model
    return {
        "in_channels": in_channels,
        "width": m.width,
        "local_dim": m.local_dim,
        "global_dim": m.global_dim,
        "crop": m.crop,
        "pool": m.pool,
    }


def build_trainer(settings: Settings, in_channels: int, device: torch.device) -> Trainer:
    """Fresh modules (seeded alike on every rank) and Adam optimisers."""
    cfg, m = settings.train, settings.model
    torch.manual_seed(cfg.seed)
    encoder = Encoder(**model_arch(settings, in_channels))
    global_critic = GlobalCritic(m.local_dim, m.global_dim, m.critic_dim) if cfg.alpha > 0 else None
    local_critic = LocalCritic(m.local_dim, m.global_dim, m.critic_dim)
    net = DIMNet(encoder, local_critic, global_critic, content_size(in_channels)).to(device)
    net = net.to(memory_format=memory_format(device, cfg.channels_last))
    prior = PriorDiscriminator(m.global_dim).to(device)
    optim = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    prior_optim = torch.optim.Adam(prior.parameters(), lr=cfg.prior_lr)
    ema = None
    if cfg.ema > 0:
        ema = AveragedModel(encoder, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    return Trainer(net, prior, optim, prior_optim, ema)


def lr_factor(schedule: str, done: float) -> float:
    """The learning rates' share of their setting with ``done`` of the training behind: 1 throughout
    (``constant``), or along a half cosine from 1 to ``LR_FLOOR`` (``cosine``)."""
    if schedule == "constant":
        return 1.0
    return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * min(max(done, 0.0), 1.0)))


def set_learning_rates(trainer: Trainer, cfg: TrainSettings, done: float) -> None:
    """Both optimisers' learning rates for the next step, ``done`` of the training behind."""
    factor = lr_factor(cfg.lr_schedule, done)
    for optim, lr in ((trainer.optim, cfg.lr), (trainer.prior_optim, cfg.prior_lr)):
        for group in optim.param_groups:
            group["lr"] = lr * factor


def update_average(trainer: Trainer) -> None:
    """Fold the encoder's weights after a step into their moving average (no-op without one)."""
    if trainer.ema is not None:
        trainer.ema.update_parameters(trainer.encoder)


def average_state(ema: AveragedModel) -> dict[str, Any]:
    """The checkpoint entry of the moving average: the averaged encoder's state and how many steps it holds."""
    return {"encoder": ema.module.state_dict(), "updates": ema.n_averaged.detach().clone()}


def wrap_distributed(trainer: Trainer, dist: DistInfo) -> None:
    """Wrap the modules in DDP when there are several processes (after any resume)."""
    if not dist.distributed:
        return
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    trainer.net_ddp = DistributedDataParallel(trainer.net, device_ids=ids)
    trainer.prior_ddp = DistributedDataParallel(trainer.prior, device_ids=ids)


def rng_state() -> dict[str, Any]:
    """torch, numpy and python random states as tensors and lists (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(trainer: Trainer, settings: Settings, meta: StoreMeta, stop_reason: str | None) -> dict:
    """The checkpoint dict: explicit keys, tensors and plain containers only."""
    critics = {"local": trainer.net.local_critic.state_dict(), "content": trainer.net.content_head.state_dict()}
    if trainer.net.global_critic is not None:
        critics["global"] = trainer.net.global_critic.state_dict()
    return {
        "format": FORMAT,
        "arch": dict(trainer.encoder.arch),
        "encoder": trainer.encoder.state_dict(),
        **({"ema": average_state(trainer.ema)} if trainer.ema is not None else {}),
        "critics": critics,
        "prior": trainer.prior.state_dict(),
        "optim": trainer.optim.state_dict(),
        "prior_optim": trainer.prior_optim.state_dict(),
        "step": trainer.step,
        "rng": rng_state(),
        "settings": as_dict(settings),
        "stop_reason": stop_reason,
        "data_stats": {**meta.stats, "intensity": meta.intensity},
        "channels": list(meta.channels),
        "train_seconds": trainer.train_seconds,
    }


def restore(trainer: Trainer, url: str, channels: list[str], restore_rng: bool) -> dict[str, Any]:
    """Load a checkpoint into the trainer; refuse one of another architecture or other channels."""
    state = load_checkpoint(url)
    if state["arch"] != trainer.encoder.arch:
        raise UserError(
            f"{url}: was trained with model {state['arch']}, the settings ask for "
            f"{trainer.encoder.arch}; use another CELLMI_WORKDIR or the same CELLMI_MODEL__* settings"
        )
    if list(state["channels"]) != list(channels):
        raise UserError(f"{url}: was trained on channels {state['channels']}, the store has {channels}")
    critics = state["critics"]
    if ("global" in critics) != (trainer.net.global_critic is not None):
        raise UserError(
            f"{url}: CELLMI_TRAIN__ALPHA switches the global critic on or off; it cannot change "
            "on resume (use another CELLMI_WORKDIR)"
        )
    trainer.encoder.load_state_dict(state["encoder"])
    trainer.net.local_critic.load_state_dict(critics["local"])
    if "content" in critics:  # checkpoints from before the content term have none
        trainer.net.content_head.load_state_dict(critics["content"])
    if trainer.net.global_critic is not None:
        trainer.net.global_critic.load_state_dict(critics["global"])
    restore_average(trainer, state)
    trainer.prior.load_state_dict(state["prior"])
    trainer.optim.load_state_dict(state["optim"])
    trainer.prior_optim.load_state_dict(state["prior_optim"])
    trainer.step = int(state["step"])
    trainer.train_seconds = float(state["train_seconds"])
    if restore_rng:
        set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", url, trainer.step)
    return state


def restore_average(trainer: Trainer, state: dict[str, Any]) -> None:
    """The moving average as saved; from a checkpoint without one (train.ema was 0) it starts afresh
    from the restored weights."""
    if trainer.ema is None:
        return
    saved = state.get("ema")
    if saved is None:
        trainer.ema.module.load_state_dict(trainer.encoder.state_dict())
        trainer.ema.n_averaged.fill_(1)
        log.info("the checkpoint holds no weight average; averaging starts from its weights")
        return
    trainer.ema.module.load_state_dict(saved["encoder"])
    trainer.ema.n_averaged.copy_(saved["updates"])
