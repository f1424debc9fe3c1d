"""Tiny stores and a tiny encoder with the ``cellmi.model.Encoder`` contract, for inference tests."""

from __future__ import annotations

import numpy as np
import torch

from cellmi.model import Encoder, build_encoder
from cellmi.store import StoreMeta, StoreWriter
from cellmi.train.checkpoint import CHECKPOINT_KEYS, FORMAT, save_checkpoint

CHANNELS = ["DNA", "pH3", "actin"]


TINY = {"in_channels": 3, "width": 4, "local_dim": 8, "global_dim": 6, "crop": 48}


def tiny_encoder(seed: int = 0, **arch: int) -> Encoder:
    """The real encoder, tiny; batch-norm statistics moved off (0, 1) so eval mode matters."""
    encoder = build_encoder({**TINY, **arch}, seed)
    bn = encoder.head[1]
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        bn.running_mean.copy_(torch.rand(bn.num_features, generator=generator) - 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
    return encoder.eval()


def write_checkpoint(
    folder: str,
    seed: int = 1,
    step: int = 7,
    channels: list[str] | None = None,
    data_stats: dict | None = None,
    average_seed: int | None = None,
    **arch: int,
) -> str:
    """A complete checkpoint of ``tiny_encoder(seed)`` through the training code's writer; with
    ``average_seed``, ``tiny_encoder(average_seed)`` stands for its moving average of the weights."""
    encoder = tiny_encoder(seed, **arch)
    full = {**TINY, **arch}
    state = {key: {} for key in CHECKPOINT_KEYS}
    state.update(
        format=FORMAT,
        arch=full,
        encoder=encoder.state_dict(),
        step=step,
        stop_reason="steps",
        settings={"model": {"crop": full["crop"]}},
        channels=channels or list(CHANNELS),
        data_stats=data_stats or {},
        train_seconds=0.0,
    )
    if average_seed is not None:
        state["ema"] = {"encoder": tiny_encoder(average_seed, **arch).state_dict(), "updates": torch.tensor(step)}
    return save_checkpoint(folder, state, step, keep=3)


def blob_field(rng: np.random.Generator, size: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(3, size, size) uint16 with bright discs on a dim noisy background, and the disc mask."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(size // 12, size // 6))):
        cy, cx, r = [*rng.integers(0, size, 2).tolist(), int(rng.integers(6, 14))]
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    pixels = rng.poisson(100, (3, size, size)).astype(np.float64)
    pixels[:, mask] += level * rng.uniform(0.5, 1.5, 3)[:, None]
    return pixels.astype(np.uint16), mask


def make_store(url: str, samples: int = 3, fields: int = 2, size: int = 96, seed: int = 0) -> StoreMeta:
    """A complete image store of ``samples`` x ``fields`` random fields (local path or s3://)."""
    rng = np.random.default_rng(seed)
    ids = [f"S{s:02d}" for s in range(samples)]
    meta = StoreMeta(
        channels=list(CHANNELS),
        fields={s: [str(f + 1) for f in range(fields)] for s in ids},
        split={s: ("test" if i == 0 else "train") for i, s in enumerate(ids)},
        shape=(size, size),
        phenotypes={s: f"pheno{i}" for i, s in enumerate(ids)},
        stats={"mean": [5.0, 5.2, 5.4], "std": [1.0, 1.1, 1.2]},
    )
    writer = StoreWriter(url, meta, chunk=64)
    for i, sample in enumerate(ids):
        for field in meta.fields[sample]:
            pixels, mask = blob_field(rng, size, 800.0 * (i + 1))
            writer.write_image(sample, field, pixels, mask)
    return writer.finish()
