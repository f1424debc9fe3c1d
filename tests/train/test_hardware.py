"""Where bf16 autocast and channels_last apply (CUDA and CPUs with native bf16, nowhere else), and the
default torch threads."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from cellmi import hardware
from cellmi.train.distributed import DistInfo
from cellmi.train.loop import intra_op_threads

CPU = torch.device("cpu")


def test_autocast_only_where_bf16_is_native(native):
    assert hardware.bf16_native(CPU) is native
    assert hardware.bf16_native(torch.device("cuda")) is True
    with hardware.autocast(CPU, True):
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    assert isinstance(hardware.autocast(CPU, False), contextlib.nullcontext)


def test_channels_last_when_asked():
    assert hardware.memory_format(CPU, True) is torch.channels_last
    assert hardware.memory_format(CPU, False) is torch.contiguous_format
    assert hardware.memory_format(torch.device("meta"), True) is torch.contiguous_format


@pytest.mark.parametrize(
    ("cores", "local_world", "expected"), [(2, 1, 1), (16, 1, 15), (16, 4, 3), (1, 1, 1), (2, 2, 1)]
)
def test_default_torch_threads_leave_a_core_to_the_crop_thread(monkeypatch, cores, local_world, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    dist = DistInfo(rank=0, world=local_world, local_rank=0, local_world=local_world, device=CPU)
    assert intra_op_threads(0, dist) == expected
    assert intra_op_threads(5, dist) == 5


def test_ingest_counts_cores_without_loading_torch():
    """Ingest sizes its readers by cores() (the container's CPU set) and stays free of torch's import."""
    code = "import sys, cellmi.data.ingest as i; print(i.cores(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(len(os.sched_getaffinity(0))), "False"]
