"""What this machine offers: the CPU cores a process may use, and where bf16 and channels_last pay
(CUDA, and CPUs that compute bf16 in hardware).

On a CPU with AMX or AVX-512 BF16, oneDNN runs bf16 convolutions in channels_last layout about
1.5 times as fast as float32 (`cellmi train` of the default encoder on 2 cores: 335 crops/s against
221); on other CPUs bf16 is emulated and slower, so it stays off there.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: ingest asks for cores() without loading it
    import torch

__all__ = ["autocast", "autocast_dtype", "bf16_native", "cores", "memory_format"]


def cores() -> int:
    """CPU cores this process may use (a container's CPU set, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (CUDA, or a CPU with AMX / AVX-512 BF16)."""
    import torch

    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 when autocast is asked for and bf16 is native on ``device``; otherwise None (no autocast)."""
    import torch

    return torch.bfloat16 if enabled and bf16_native(device) else None


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when asked for and native there; otherwise no change."""
    import torch

    dtype = autocast_dtype(device, enabled)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    """channels_last where asked for (CUDA and CPU convolutions both prefer it), else contiguous."""
    import torch

    return torch.channels_last if channels_last and device.type in ("cuda", "cpu") else torch.contiguous_format
