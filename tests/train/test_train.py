"""The training job: leaves JSD chance, stops on steps or time budget, resumes exactly after a kill."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from cellmi.errors import UserError
from cellmi.losses import JSD_CHANCE
from cellmi.store import STORE_NAME
from cellmi.train.checkpoint import latest_checkpoint, load_checkpoint
from cellmi.train.job import main

from .conftest import make_store, tiny_settings


@pytest.fixture
def workdir(store_dir, tmp_path):
    """A fresh run folder holding a copy of the tiny store."""
    shutil.copytree(os.path.join(store_dir, STORE_NAME), tmp_path / STORE_NAME)
    return str(tmp_path)


def metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "checkpoints", "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def test_loss_leaves_jsd_chance_within_a_bounded_number_of_steps(workdir):
    assert main(tiny_settings(workdir, steps=120, checkpoint_every=1000, crop_pairs=0.0)) == 0
    records = metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 121))
    last = [r["local"] for r in records[-20:]]
    assert sum(last) / len(last) < JSD_CHANCE - 0.3, last
    state = load_checkpoint(latest_checkpoint(os.path.join(workdir, "checkpoints")))
    assert state["step"] == 120 and state["stop_reason"] == "steps"
    assert all(r["crops_per_s"] > 0 and r["gamma"] <= 0.1 and 0 < r["busy"] <= 1 for r in records)


def test_time_budget_stops_training_and_is_recorded(workdir):
    assert main(tiny_settings(workdir, steps=100_000, time_budget_s=1.0, checkpoint_every=1000)) == 0
    url = latest_checkpoint(os.path.join(workdir, "checkpoints"))
    state = load_checkpoint(url)
    assert state["stop_reason"] == "time_budget" and 0 < state["step"] < 100_000
    assert 1.0 <= state["train_seconds"] < 30
    with open(url[:-3] + ".json") as handle:
        sidecar = json.load(handle)
    assert sidecar["stop_reason"] == "time_budget" and sidecar["arch"]["crop"] == 48
    # the budget is spent: a restart resumes and stops at once without training further
    assert main(tiny_settings(workdir, steps=100_000, time_budget_s=1.0, checkpoint_every=1000)) == 0
    assert latest_checkpoint(os.path.join(workdir, "checkpoints")) == url


def test_time_budget_counts_the_wait_for_data(workdir, monkeypatch):
    """A slow loader (0.25 s a batch) spends a 1 s budget in a handful of steps, not in 1 s of compute."""
    from cellmi.train.data import CropLoader

    fast = CropLoader.batch

    def slow(self, step):
        time.sleep(0.25)
        return fast(self, step)

    monkeypatch.setattr(CropLoader, "batch", slow)
    assert main(tiny_settings(workdir, steps=100_000, time_budget_s=1.0, checkpoint_every=1000)) == 0
    state = load_checkpoint(latest_checkpoint(os.path.join(workdir, "checkpoints")))
    assert state["stop_reason"] == "time_budget" and 1 <= state["step"] <= 8, state["step"]
    busy = sorted(r["busy"] for r in metrics(workdir))  # the loop mostly waited for data, and says so
    assert busy[0] >= 0 and busy[len(busy) // 2] < 0.5, busy


def test_resume_refuses_another_architecture(workdir):
    main(tiny_settings(workdir, steps=2))
    settings = tiny_settings(workdir, steps=4)
    settings.model.width = 16
    with pytest.raises(UserError, match="was trained with model"):
        main(settings)


def job_env(workdir: str, **train) -> dict[str, str]:
    """The settings of ``tiny_settings`` as CELLMI_* variables for a ``cellmi train`` process."""
    settings = tiny_settings(workdir, **train)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CELLMI_WORKDIR": workdir}
    for section in ("model", "train"):
        for key, value in getattr(settings, section).model_dump().items():
            env[f"CELLMI_{section}__{key}".upper()] = "null" if value is None else str(value).lower()
    return env


def test_kill_and_resume_equals_straight_training(tmp_path, store_dir):
    k = 12
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    for folder in (straight, killed):
        shutil.copytree(os.path.join(store_dir, STORE_NAME), os.path.join(folder, STORE_NAME))
    # the cosine schedule: the resumed half must also go on at the learning rate it stopped at
    assert main(tiny_settings(straight, steps=2 * k, checkpoint_every=k, ema=0.9, lr_schedule="cosine")) == 0

    # a real process, killed (SIGKILL, no chance to clean up) right after its step-K checkpoint
    env = job_env(killed, steps=2 * k, checkpoint_every=k, ema=0.9, lr_schedule="cosine")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellmi", "train"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    sidecar = os.path.join(killed, "checkpoints", f"step_{k:06d}.json")
    deadline = time.monotonic() + 120
    while not os.path.exists(sidecar) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert latest_checkpoint(os.path.join(killed, "checkpoints")).endswith(f"step_{k:06d}.pt")

    assert main(tiny_settings(killed, steps=2 * k, checkpoint_every=k, ema=0.9, lr_schedule="cosine")) == 0
    a = load_checkpoint(latest_checkpoint(os.path.join(straight, "checkpoints")))
    b = load_checkpoint(latest_checkpoint(os.path.join(killed, "checkpoints")))
    assert a["step"] == b["step"] == 2 * k
    for key in ("encoder", "prior"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    assert int(a["ema"]["updates"]) == int(b["ema"]["updates"]) == 2 * k
    for name, tensor in a["ema"]["encoder"].items():
        torch.testing.assert_close(b["ema"]["encoder"][name], tensor, rtol=0, atol=1e-6, msg=f"ema.{name}")
    for name, tensor in a["critics"]["local"].items():
        torch.testing.assert_close(b["critics"]["local"][name], tensor, rtol=0, atol=1e-6)
    assert [r["step"] for r in metrics(killed)] == list(range(1, 2 * k + 1))


def test_learning_rate_schedules():
    from cellmi.train.state import LR_FLOOR, lr_factor

    assert {lr_factor("constant", d) for d in (0.0, 0.5, 1.0)} == {1.0}
    assert lr_factor("cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.5) == pytest.approx((1 + LR_FLOOR) / 2)
    assert lr_factor("cosine", 1.0) == lr_factor("cosine", 1.5) == pytest.approx(LR_FLOOR)
    falls = [lr_factor("cosine", d / 10) for d in range(11)]
    assert all(a > b for a, b in itertools.pairwise(falls))


def test_cosine_schedule_runs_out_with_the_steps_and_with_the_time_budget(workdir):
    from cellmi.train.state import lr_factor

    assert main(tiny_settings(workdir, steps=20, checkpoint_every=1000, lr=1e-3, lr_schedule="cosine")) == 0
    lrs = [r["lr"] for r in metrics(workdir)]
    assert lrs == pytest.approx([1e-3 * lr_factor("cosine", s / 20) for s in range(20)])
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    # a time budget spent before the steps: the rate follows the clock instead
    assert main(tiny_settings(workdir, steps=100_000, time_budget_s=2.0, checkpoint_every=100_000,
                              lr=1e-3, lr_schedule="cosine")) == 0
    records = metrics(workdir)
    assert records[0]["lr"] == pytest.approx(1e-3)
    assert records[-1]["lr"] < 0.1 * 1e-3  # near the floor at the end of the budget, far from steps' 1 - 1e-4
    assert all(a["lr"] >= b["lr"] for a, b in itertools.pairwise(records))


def test_weight_average_is_the_moving_average_of_the_steps():
    from cellmi.train.state import build_trainer, update_average

    trainer = build_trainer(tiny_settings("unused", ema=0.5), 3, torch.device("cpu"))
    for value in (1.0, 3.0, 7.0):  # the first update copies; then average = 0.5 * average + 0.5 * weights
        for param in trainer.encoder.parameters():
            param.data.fill_(value)
        update_average(trainer)
    for param in trainer.ema.module.parameters():
        torch.testing.assert_close(param, torch.full_like(param, 4.5))
    assert build_trainer(tiny_settings("unused", ema=0.0), 3, torch.device("cpu")).ema is None


def test_inference_loads_the_average_unless_asked_for_the_last_weights(workdir):
    from cellmi.train.checkpoint import load_encoder

    assert main(tiny_settings(workdir, steps=6, ema=0.5)) == 0
    folder = os.path.join(workdir, "checkpoints")
    state = load_checkpoint(latest_checkpoint(folder))
    assert int(state["ema"]["updates"]) == 6
    for average, key in ((True, "average"), (False, "last")):
        encoder, info = load_encoder(folder, average=average)
        assert info["weights"] == key
        saved = state["ema"]["encoder"] if average else state["encoder"]
        for name, tensor in encoder.state_dict().items():
            torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)
    differ = [not torch.equal(state["ema"]["encoder"][n], t) for n, t in state["encoder"].items()]
    assert any(differ)
    # a run resumed without an average (ema 0 before) starts one from the resumed weights
    resumed = os.path.join(os.path.dirname(workdir), "no-average")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints"))
    assert main(tiny_settings(resumed, steps=4, ema=0.0)) == 0
    assert "ema" not in load_checkpoint(latest_checkpoint(os.path.join(resumed, "checkpoints")))
    assert load_encoder(os.path.join(resumed, "checkpoints"))[1]["weights"] == "last"
    assert main(tiny_settings(resumed, steps=6, ema=0.5)) == 0
    assert int(load_checkpoint(latest_checkpoint(os.path.join(resumed, "checkpoints")))["ema"]["updates"]) == 3


def test_training_in_shards_resumes_to_the_weights_of_a_straight_run(tmp_path):
    """Eight samples in four shards (a tiny memory budget), one step per shard visit: a run stopped at step K
    and started again ends with the weights of a run that went straight through."""
    from cellmi.store import join, open_store
    from cellmi.train.data import CropLoader

    k, train = 6, {"batch_samples": 2, "memory_gb": 0.0003, "shard_epochs": 1, "checkpoint_every": 6}
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for folder in (straight, resumed):
        make_store(join(folder, STORE_NAME), samples=8, fields=1)
    settings = tiny_settings(straight, steps=2 * k, **train)
    loader = CropLoader(open_store(join(straight, STORE_NAME)), settings.train, settings.model.crop)
    assert len(loader.plan.shards) == 4 and loader.plan.steps == [1, 1, 1, 1]
    loader.close()
    assert main(settings) == 0
    assert main(tiny_settings(resumed, steps=k, **train)) == 0
    assert main(tiny_settings(resumed, steps=2 * k, **train)) == 0
    a = load_checkpoint(latest_checkpoint(os.path.join(straight, "checkpoints")))
    b = load_checkpoint(latest_checkpoint(os.path.join(resumed, "checkpoints")))
    assert a["step"] == b["step"] == 2 * k
    for name, tensor in a["encoder"].items():
        torch.testing.assert_close(b["encoder"][name], tensor, rtol=0, atol=1e-6, msg=f"encoder.{name}")


def test_sigterm_checkpoints_and_exits_for_a_restart(workdir):
    env = job_env(workdir, steps=100_000, checkpoint_every=100_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellmi", "train"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log_file = os.path.join(workdir, "checkpoints", "metrics.jsonl")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(log_file) and len(metrics(workdir)) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # what Kubernetes, SLURM and torchrun send on preemption
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()[-2000:]
    state = load_checkpoint(latest_checkpoint(os.path.join(workdir, "checkpoints")))
    assert state["step"] >= 3 and state["stop_reason"] is None


@pytest.mark.parametrize("estimator", ["jsd", "infonce", "dv"])
def test_every_estimator_with_the_global_term_trains(workdir, estimator):
    result_code = main(tiny_settings(workdir, steps=4, alpha=0.5, estimator=estimator, checkpoint_every=2))
    assert result_code == 0
    records = metrics(workdir)
    assert len(records) == 4 and all(r["global"] != 0 for r in records)
    assert all(abs(r[k]) < 1e6 for r in records for k in ("loss", "local", "global", "prior_disc"))
    state = load_checkpoint(latest_checkpoint(os.path.join(workdir, "checkpoints")))
    assert set(state["critics"]) == {"local", "global", "content"}


def test_crop_pairs_add_a_second_local_term(tmp_path, store_dir):
    """Same seed, same first batch: the crop-level term adds w times a positive loss to the local term."""
    first = {}
    for weight in (0.0, 0.5):
        workdir = str(tmp_path / f"w{weight}")
        shutil.copytree(store_dir, workdir)
        assert main(tiny_settings(workdir, steps=1, crop_pairs=weight, checkpoint_every=1000)) == 0
        first[weight] = metrics(workdir)[0]["local"]
    assert first[0.0] + 0.1 < first[0.5] < 2 * first[0.0], first


def test_content_term_is_weighted_into_the_loss_and_learns(tmp_path, store_dir):
    """Weight 0 leaves the loss as it was; a positive weight adds w times the content loss, which then
    falls below what the untrained head scores on the same batches."""
    runs = {}
    for weight in (0.0, 2.0):
        workdir = str(tmp_path / f"w{weight}")
        shutil.copytree(store_dir, workdir)
        # no augmentation: the comparison is of the content term, not of how hard the crops are
        assert main(tiny_settings(workdir, steps=40, content=weight, lr=5e-3, checkpoint_every=1000,
                                  augment=False)) == 0
        runs[weight] = metrics(workdir)
    first = {w: r[0] for w, r in runs.items()}
    for record in first.values():
        terms = record["local"] + record["gamma"] * record["prior_gen"]
        assert record["content"] > 0
        assert record["loss"] == pytest.approx(terms + (2.0 if record is first[2.0] else 0.0) * record["content"],
                                               rel=1e-4)
    assert first[0.0]["content"] == pytest.approx(first[2.0]["content"])  # same seed, same head, same batch
    late = {w: sum(r["content"] for r in records[-10:]) / 10 for w, records in runs.items()}
    assert late[2.0] < 0.8 * late[0.0], late
