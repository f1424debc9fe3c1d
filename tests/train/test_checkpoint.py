"""Checkpoints: atomic files + sidecars, newest complete wins, corrupt skipped, pickled code refused."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from cellmi.errors import UserError
from cellmi.log import log
from cellmi.model import Encoder
from cellmi.store import join
from cellmi.train.checkpoint import (
    CHECKPOINT_KEYS,
    build_encoder,
    latest_checkpoint,
    load_checkpoint,
    load_encoder,
    save_checkpoint,
)
from tests.clirun import CodePayload

ARCH = {"in_channels": 3, "width": 8, "local_dim": 16, "global_dim": 8, "crop": 48, "pool": "mean"}


def state_for(encoder: Encoder, step: int) -> dict:
    state = {key: {} for key in CHECKPOINT_KEYS}
    state.update(
        format=1,
        arch=dict(encoder.arch),
        encoder=encoder.state_dict(),
        step=step,
        settings={"train": {"steps": 10}},
        stop_reason=None,
        channels=["DNA", "pH3", "actin"],
        data_stats={"mean": [1.0, 2.0, 3.0], "std": [1.0, 1.0, 1.0]},
        train_seconds=1.5,
        rng={"torch": torch.get_rng_state(), "python": [3, [1, 2], None]},
    )
    return state


def encoders(count: int) -> list[Encoder]:
    return [build_encoder(ARCH, seed) for seed in range(count)]


def test_save_writes_file_and_sidecar_keeps_the_newest_and_loads_back(tmp_path):
    folder = str(tmp_path / "checkpoints")
    models = encoders(4)
    for i, model in enumerate(models):
        url = save_checkpoint(folder, state_for(model, 10 * (i + 1)), 10 * (i + 1), keep=2)
    assert url.endswith("step_000040.pt")
    kept = ["step_000030.json", "step_000030.pt", "step_000040.json", "step_000040.pt"]
    assert sorted(os.listdir(folder)) == kept
    sidecar = json.loads((tmp_path / "checkpoints" / "step_000040.json").read_text())
    assert sidecar["arch"] == ARCH and sidecar["step"] == 40 and sidecar["settings"]["train"]["steps"] == 10
    assert latest_checkpoint(folder) == url
    state = load_checkpoint(url)
    assert state["step"] == 40 and state["rng"]["python"] == [3, [1, 2], None]
    encoder, info = load_encoder(folder)  # a folder means its newest checkpoint
    assert not encoder.training and info["step"] == 40 and info["channels"] == ["DNA", "pH3", "actin"]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x)[1], models[3](x)[1], rtol=0, atol=0)


def test_a_corrupt_or_unfinished_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    folder = str(tmp_path)
    first, second = encoders(2)
    good = save_checkpoint(folder, state_for(first, 5), 5, keep=5)
    bad = save_checkpoint(folder, state_for(second, 10), 10, keep=5)
    with open(bad, "r+b") as handle:  # a torn write: the tail is missing
        handle.truncate(os.path.getsize(bad) // 2)
    torch.save(state_for(second, 15), str(tmp_path / "step_000015.pt"))  # killed before its sidecar
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        assert latest_checkpoint(folder) == good
    finally:
        log.removeHandler(handler)
    warned = " ".join(r.getMessage() for r in records)
    assert "step_000015.pt" in warned and "step_000010.pt" in warned
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(bad)


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    state = state_for(encoders(1)[0], 1)
    state["settings"] = CodePayload(str(marker))
    url = str(tmp_path / "step_000001.pt")
    torch.save(state, url)
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(url)
    with pytest.raises(UserError, match="refused to load"):
        load_encoder(url)
    assert not marker.exists()


def test_an_incompatible_architecture_is_a_user_error(tmp_path):
    model = encoders(1)[0]
    state = state_for(model, 1)
    state["arch"] = {**ARCH, "width": 16}  # weights of width 8 under a width-16 description
    save_checkpoint(str(tmp_path / "a"), state, 1, keep=1)
    with pytest.raises(UserError, match="do not fit the encoder architecture"):
        load_encoder(str(tmp_path / "a"))
    state["arch"] = {**ARCH, "depth": 3}
    save_checkpoint(str(tmp_path / "b"), state, 1, keep=1)
    with pytest.raises(UserError, match="incompatible architecture"):
        load_encoder(str(tmp_path / "b"))
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_encoder(str(tmp_path))


def test_checkpoints_on_s3(s3_env):
    folder = join(s3_env, "run", "checkpoints")
    assert latest_checkpoint(folder) is None
    first, second = encoders(2)
    save_checkpoint(folder, state_for(first, 1), 1, keep=1)
    url = save_checkpoint(folder, state_for(second, 2), 2, keep=1)
    assert latest_checkpoint(folder) == url == f"{folder}/step_000002.pt"
    encoder, info = load_encoder(folder)
    assert info["step"] == 2
    torch.testing.assert_close(encoder.trunk[0].weight, second.trunk[0].weight, rtol=0, atol=0)
