"""Deep InfoMax training: crop loading, distributed helpers, checkpoints and the loop."""

from cellmi.train.checkpoint import (
    build_encoder,
    latest_checkpoint,
    load_checkpoint,
    load_encoder,
    save_checkpoint,
)
from cellmi.train.data import Batch, CropLoader
from cellmi.train.loop import TrainResult, run_training

__all__ = [
    "Batch",
    "CropLoader",
    "TrainResult",
    "build_encoder",
    "latest_checkpoint",
    "load_checkpoint",
    "load_encoder",
    "run_training",
    "save_checkpoint",
]
