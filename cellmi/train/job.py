"""``cellmi train``: Deep InfoMax training on the store's training samples, resumable.

    cellmi train --workdir ./run                                   # one process
    torchrun --nproc-per-node 2 -m cellmi train --workdir ./run    # DDP, gloo on CPU / NCCL on CUDA
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint host:29500 -m cellmi train ...

Reads {workdir}/store.zarr and writes {workdir}/checkpoints/step_*.pt (+ .json sidecars) and
{workdir}/checkpoints/metrics.jsonl. A new start resumes from the newest complete checkpoint there.
Stops at CELLMI_TRAIN__STEPS or CELLMI_TRAIN__TIME_BUDGET_S of training, whichever comes first;
SIGTERM (preemption) writes a checkpoint and exits with status 143.
"""

from __future__ import annotations

from cellmi.errors import UserError
from cellmi.model.encoder import Encoder
from cellmi.settings import Settings
from cellmi.train.distributed import barrier, init_distributed, teardown
from cellmi.train.loop import SIGNAL_EXIT, run_training


def check_settings(settings: Settings) -> None:
    """Refuse a crop the encoder cannot take, before any process group or data is touched."""
    m = settings.model
    try:
        Encoder(1, m.width, m.local_dim, m.global_dim, m.crop)
    except ValueError as err:
        raise UserError(f"CELLMI_MODEL__CROP={m.crop}: {err}") from None


def main(settings: Settings) -> int:
    check_settings(settings)
    dist = init_distributed(settings.train.device, settings.train.dist_timeout_s)
    try:
        result = run_training(settings, dist)
        barrier()
    finally:
        teardown()
    return SIGNAL_EXIT if result.stop_reason == "signal" else 0
