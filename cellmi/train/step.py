"""One optimisation step: the DIM objective for encoder and critics, then the prior discriminator's own."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from cellmi.hardware import autocast, autocast_dtype, memory_format
from cellmi.losses import (
    content_loss,
    global_mi_loss,
    local_mi_loss,
    prior_discriminator_loss,
    prior_generator_loss,
    prior_weight,
)
from cellmi.model import Encoder
from cellmi.settings import TrainSettings
from cellmi.train.data import Batch
from cellmi.train.distributed import DistInfo, all_gather_tensor, all_gather_with_grad
from cellmi.train.state import Trainer, update_average

__all__ = ["METRICS", "StepInputs", "batch_layout", "frozen", "step_inputs", "train_step"]

# Names of the values train_step returns, in order.
METRICS = ("loss", "local", "global", "content", "prior_gen", "prior_disc", "gamma", "grad_norm")


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters of ``module`` excluded from autograd for the duration, so the encoder's
    generator term cannot move the discriminator."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _gathered(tensor: Tensor, with_grad: bool, gather: bool) -> Tensor:
    if not gather:
        return tensor
    if with_grad:
        return all_gather_with_grad(tensor)
    return all_gather_tensor(tensor)


@dataclass
class StepInputs:
    """A batch as the step takes it, M = B * N crops: x (M, C, H, W) in the step's memory format and
    autocast dtype, sample ids (M,), valid local positions (M, h, w) bool, foreground share of each local
    position (M, h, w), content targets (M, K)."""

    x: Tensor
    ids: Tensor
    valid: Tensor
    share: Tensor
    content: Tensor


def step_inputs(
    batch: Batch, pool_mask: Callable[[Tensor], Tensor], cfg: TrainSettings, device: torch.device
) -> StepInputs:
    """``batch`` laid out for the step. The loader's thread calls this (``CropLoader.batches``), so the
    step's own thread only trains: the copy into channels_last bf16 and the mask pooling took a sixth of
    a CPU step. The bf16 copy is the one autocast would make at the first convolution, so no value changes."""
    n = batch.images.shape[1]
    dtype = autocast_dtype(device, cfg.amp) or batch.images.dtype
    layout = memory_format(device, cfg.channels_last)
    # cast, then lay out: one copy doing both is twice as slow on a CPU
    x = batch.images.flatten(0, 1).to(device, dtype, non_blocking=True).contiguous(memory_format=layout)
    share = pool_mask(batch.masks.flatten(0, 1).to(device))
    ids = batch.samples.to(device).repeat_interleave(n)
    content = batch.content.flatten(0, 1).to(device)
    return StepInputs(x, ids, share >= cfg.local_foreground, share, content)


def batch_layout(encoder: Encoder, cfg: TrainSettings, device: torch.device) -> Callable[[Batch], StepInputs]:
    """``step_inputs`` for ``encoder``'s local grid, as a function of the batch alone (what the loader's
    thread applies, ``CropLoader.batches``)."""
    return partial(step_inputs, pool_mask=encoder.pool_mask, cfg=cfg, device=device)


def _mi_terms(
    out: dict[str, Tensor], ids: Tensor, valid: Tensor, cfg: TrainSettings, gather: bool
) -> tuple[Tensor, Tensor]:
    """Local and global MI losses; with ``gather`` the crops of all ranks serve as pairs."""
    local_emb = _gathered(out["local_emb"], True, gather)
    local_ids = _gathered(ids, False, gather)
    local_valid = _gathered(valid.to(torch.uint8), False, gather).bool()
    local = local_mi_loss(local_emb, out["global_emb"], local_ids, ids, local_valid, cfg.estimator)
    if cfg.crop_pairs > 0:
        crops = torch.arange(len(local_ids), device=ids.device)
        first = torch.distributed.get_rank() * len(ids) if gather else 0  # this rank's rows of the gather
        own = local_mi_loss(local_emb, out["global_emb"], crops, crops[first : first + len(ids)], local_valid,
                            cfg.estimator)
        local = local + cfg.crop_pairs * own
    if "summary_emb" not in out:
        return local, torch.zeros((), device=local.device)
    summary = _gathered(out["summary_emb"], True, gather)
    return local, global_mi_loss(summary, out["global_emb_g"], local_ids, ids, cfg.estimator)


def _prior_samples(
    shape: torch.Size, cfg: TrainSettings, step: int, rank: int, device: torch.device
) -> Tensor:
    """Uniform prior samples, a function of (seed, step, rank) like the batches."""
    rng = np.random.default_rng([cfg.seed, step, rank, 2])
    return torch.from_numpy(rng.random(tuple(shape), dtype=np.float32)).to(device, non_blocking=True)


def _encoder_step(trainer: Trainer, inputs: StepInputs, cfg: TrainSettings, dist: DistInfo) -> tuple[Tensor, ...]:
    """Encoder + critics: MI terms and the prior's generator term; returns the loss terms and the codes."""
    with autocast(dist.device, cfg.amp):
        out = trainer.train_net(inputs.x, inputs.valid, inputs.share)
    local, global_ = _mi_terms(out, inputs.ids, inputs.valid, cfg, cfg.gather_negatives and dist.distributed)
    # always in the graph (weight 0 included), so DDP sees the head used on every step
    content = content_loss(out["content"], inputs.content)
    codes = torch.sigmoid(out["global"].float())
    with frozen(trainer.prior):
        generator = prior_generator_loss(trainer.prior(codes))
    gamma = prior_weight(cfg.gamma, trainer.step, cfg.prior_ramp_steps)
    loss = cfg.beta * local + cfg.alpha * global_ + cfg.content * content + gamma * generator
    trainer.optim.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(trainer.net.parameters(), cfg.grad_clip)
    trainer.optim.step()
    update_average(trainer)
    return loss, local, global_, content, generator, torch.tensor(gamma), grad_norm, codes.detach()


def _prior_step(trainer: Trainer, codes: Tensor, cfg: TrainSettings, dist: DistInfo) -> Tensor:
    """The discriminator's own step: uniform prior samples against the (detached) codes."""
    real = _prior_samples(codes.shape, cfg, trainer.step, dist.rank, dist.device)
    logits = trainer.train_prior(torch.cat([real, codes]))
    disc = prior_discriminator_loss(logits[: len(real)], logits[len(real) :])
    trainer.prior_optim.zero_grad(set_to_none=True)
    disc.backward()
    trainer.prior_optim.step()
    return disc


def train_step(trainer: Trainer, inputs: StepInputs | Batch, cfg: TrainSettings, dist: DistInfo) -> Tensor:
    """One step of encoder + critics, then one of the prior discriminator; returns the METRICS (detached).
    A ``Batch`` is laid out here (``step_inputs``), in the step's own time."""
    if isinstance(inputs, Batch):
        inputs = batch_layout(trainer.encoder, cfg, dist.device)(inputs)
    loss, local, global_, content, generator, gamma, grad_norm, codes = _encoder_step(trainer, inputs, cfg, dist)
    disc = _prior_step(trainer, codes, cfg, dist)
    values = [loss, local, global_, content, generator, disc, gamma.to(codes.device, non_blocking=True), grad_norm]
    return torch.stack([v.detach().float().reshape(()) for v in values])
