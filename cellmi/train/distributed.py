"""Small distributed helpers; process layout comes from torchrun's own variables (RANK, WORLD_SIZE, ...)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cellmi.errors import UserError

__all__ = [
    "DistInfo",
    "all_gather_tensor",
    "all_gather_with_grad",
    "barrier",
    "broadcast_object",
    "init_distributed",
    "is_main_process",
    "max_over_ranks",
    "mean_over_ranks",
    "pick_device",
    "teardown",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place: global rank, world size, rank on the node, processes on the node, device."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(kind: str, local_rank: int) -> torch.device:
    """``auto``: CUDA when available; ``cuda`` without a GPU is a user error."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("CELLMI_TRAIN__DEVICE=cuda but no CUDA device is available")
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_kind: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); one process: no group."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = pick_device(device_kind, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=dt.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world, local_rank, local_world, device)


def teardown() -> None:
    """Leave the process group if there is one (safe to call always, also after errors)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s value on every rank (pickled; small objects only)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value's maximum over ranks (so that all ranks stop at the same step, at the same learning rate)."""
    if not dist.is_initialized():
        return list(values)
    value = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.tolist()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a tensor over ranks (no gradient)."""
    if not dist.is_initialized():
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's part (all_reduce, then slice)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return all_gather_tensor(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's part
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(n, ...) per rank -> (world * n, ...) in rank order; gradients flow back to each rank's part."""
    if not dist.is_initialized():
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """(n, ...) per rank -> (world * n, ...) in rank order, without gradient (ids, masks)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
