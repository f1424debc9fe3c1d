"""Tiny image stores for training tests: blobs whose size, count and brightness depend on the sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellmi.settings import Settings
from cellmi.store import STORE_NAME, StoreMeta, StoreWriter, join
from tests.clirun import clean_env

CHANNELS = ["DNA", "pH3", "actin"]


def blob_field(sample: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(3, size, size) uint16 and its (size, size) foreground; sample sets blob radius, count, colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    radius = 3 + 2 * (sample % 3)
    colour = np.array([1500, 400 + 900 * (sample % 2), 3000 - 600 * (sample % 4)], float)
    mask = np.zeros((size, size), bool)
    pixels = rng.poisson(80, (3, size, size)).astype(float)
    for _ in range(2 + sample % 3 * 2):
        cy, cx = rng.integers(radius, size - radius, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        mask |= disc
        pixels[:, disc] += colour[:, None] * rng.uniform(0.8, 1.2)
    return pixels.astype(np.uint16), mask


def make_store(url: str, samples: int = 4, fields: int = 2, size: int = 64, test: int = 0) -> StoreMeta:
    ids = [f"{s:04d}" for s in range(samples)]
    meta = StoreMeta(
        channels=list(CHANNELS),
        fields={s: [str(f + 1) for f in range(fields)] for s in ids},
        split={s: ("test" if i >= samples - test else "train") for i, s in enumerate(ids)},
        shape=(size, size),
    )
    writer = StoreWriter(url, meta, chunk=64)
    logs = []
    for i, s in enumerate(ids):
        for f in range(fields):
            pixels, mask = blob_field(i, 100 * i + f, size)
            writer.write_image(s, str(f + 1), pixels, mask)
            logs.append(np.log1p(pixels[:, mask].astype(float)))
    values = np.concatenate(logs, axis=1)
    meta.stats = {"mean": values.mean(axis=1).tolist(), "std": values.std(axis=1).tolist()}
    return writer.finish()


def tiny_settings(workdir: str, **train) -> Settings:
    """Small model and batches: crop 48 (5x5 local map), width 8, B=4, N=2, one thread."""
    cfg = {
        "steps": 10,
        "time_budget_s": None,
        "batch_samples": 4,
        "fields_per_sample": 2,
        "checkpoint_every": 5,
        "log_every": 1,
        "threads": 1,
        "device": "cpu",
        "prior_ramp_steps": 5,
    }
    cfg.update(train)
    return Settings(
        workdir=workdir,
        model={"crop": 48, "width": 8, "local_dim": 32, "global_dim": 16, "critic_dim": 32},
        train=cfg,
    )


def train_env(workdir: str, **train) -> dict[str, str]:
    """``tiny_settings`` as CELLMI_* variables for a ``cellmi train`` process."""
    settings = tiny_settings(workdir, **train)
    env = {"CELLMI_WORKDIR": workdir}
    for section in ("model", "train"):
        for key, value in getattr(settings, section).model_dump().items():
            env[f"CELLMI_{section}__{key}".upper()] = "null" if value is None else str(value).lower()
    return clean_env(env)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory) -> str:
    """A workdir holding a 4-sample, 2-field, 64 px store (read-only for tests: copy to write)."""
    workdir = str(tmp_path_factory.mktemp("tiny"))
    make_store(join(workdir, STORE_NAME))
    return workdir


@pytest.fixture(params=[True, False], ids=["bf16-cpu", "plain-cpu"])
def native(request, monkeypatch) -> bool:
    """The CPU computes bf16 natively (AMX / AVX-512 BF16) or not, whatever this machine has."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: request.param, raising=False)
    return request.param
