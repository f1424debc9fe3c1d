"""`cellmi infer` end to end: Dask == in-process, S3, a killed worker, resume, refusals."""

from __future__ import annotations

import logging
import os
import signal
import sys

import cloudpickle
import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from cellmi.analyze.focus import field_focus
from cellmi.errors import InfrastructureError, UserError
from cellmi.infer.job import assemble, compute_in_process, make_plan, run_inference, run_key, task_shape
from cellmi.infer.parts import PARTS_NAME, FieldResult, pack, prepare_parts, write_parts
from cellmi.infer.windows import foreground_fraction, window_grid
from cellmi.representations import load_representations, read_parquet
from cellmi.settings import Settings, TimeoutSettings
from cellmi.store import exists, image_name, join, open_store
from tests.infer.standin import CHANNELS, make_store, write_checkpoint

torch.set_num_threads(1)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the kill plugin travels to the workers

SAMPLES, FIELDS, SIZE = 3, 2, 96


def make_run(workdir: str, samples: int = SAMPLES, fields: int = FIELDS) -> str:
    """A run folder with a small store and one checkpoint; returns the checkpoint URL."""
    make_store(join(workdir, "store.zarr"), samples=samples, fields=fields, size=SIZE)
    return write_checkpoint(join(workdir, "checkpoints"))


def settings_for(workdir: str, force: bool = False, **infer) -> Settings:
    infer = {"workers": 2, "retries": 1, "stride": None, "min_foreground": 0.2, **infer}
    return Settings(workdir=workdir, force=force, infer=infer)


def expected(settings: Settings):
    plan = make_plan(settings)
    return plan, assemble(plan, compute_in_process(plan.job, plan.fields))


def assert_same(got, want) -> None:
    """Same rows in the same order; vectors equal up to float noise of other thread counts."""
    for column in ("sample", "field", "split", "y", "x", "background"):
        assert got.table[column].tolist() == want.table[column].tolist(), column
    np.testing.assert_allclose(got.table["fg_fraction"], want.table["fg_fraction"], atol=1e-7)
    for name in ("dim", "random", "handcrafted"):
        np.testing.assert_allclose(
            got.features[name], want.features[name], rtol=1e-5, atol=1e-5, err_msg=name
        )


def assert_each_field_once(reps, settings: Settings) -> None:
    keys = list(zip(reps.table["sample"], reps.table["field"], reps.table["y"], reps.table["x"], strict=True))
    assert len(keys) == len(set(keys))
    store = open_store(join(settings.workdir, "store.zarr"))
    corners = window_grid((SIZE, SIZE), reps.attrs["window"], reps.attrs["stride"])
    for sample, field in store.meta.images():
        fg = foreground_fraction(store.read_mask(sample, field), corners, reps.attrs["window"])
        rows = (reps.table["sample"] == sample) & (reps.table["field"] == field)
        assert rows.sum() == (fg >= settings.infer.min_foreground).sum(), (sample, field)


class KillOnce(WorkerPlugin):
    """Kills its worker process (SIGKILL) when an inference task starts there, once per marker file."""

    name = "kill-once"

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" and str(key).startswith("infer-") and not os.path.exists(self.marker):
            with open(self.marker, "w") as handle:
                handle.write(f"{key} {os.getpid()}")
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster():
    """An existing cluster, as on Kubernetes or SLURM: infer connects to it and starts nothing."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as local:
        yield local


def test_inference_embeds_with_the_weight_average_unless_told_not_to(tmp_path):
    averaged, plain = str(tmp_path / "averaged"), str(tmp_path / "plain")
    make_store(join(averaged, "store.zarr"), samples=2, fields=1, size=SIZE)
    write_checkpoint(join(averaged, "checkpoints"), seed=1, average_seed=2)
    make_store(join(plain, "store.zarr"), samples=2, fields=1, size=SIZE)
    write_checkpoint(join(plain, "checkpoints"), seed=2)
    plan, average = expected(settings_for(averaged))
    last_plan, last = expected(settings_for(averaged, ema=False))
    assert (plan.attrs["weights"], last_plan.attrs["weights"]) == ("average", "last")
    assert run_key(plan) != run_key(last_plan)  # parts of the other weights are never reused
    _, seed2 = expected(settings_for(plain))
    np.testing.assert_allclose(average.features["dim"], seed2.features["dim"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(average.features["dim"], last.features["dim"], atol=1e-3)


def test_the_pooled_readout_gives_both_encoders_local_dim_wide_vectors(tmp_path):
    workdir = str(tmp_path / "run")
    make_store(join(workdir, "store.zarr"), samples=2, fields=1, size=SIZE)
    write_checkpoint(join(workdir, "checkpoints"))
    head_plan, head = expected(settings_for(workdir))
    plan, pooled = expected(settings_for(workdir, readout="both"))
    assert plan.attrs["readout"] == "both" and run_key(plan) != run_key(head_plan)
    for name in ("dim", "random"):
        width = head.features[name].shape[1]
        assert pooled.features[name].shape[1] == width + 8  # the tiny encoder's local_dim
        np.testing.assert_allclose(pooled.features[name][:, :width], head.features[name], rtol=1e-5, atol=1e-6)


def test_dask_result_equals_in_process_result(tmp_path):
    workdir = str(tmp_path / "run")
    ckpt = make_run(workdir)
    settings = settings_for(workdir)
    plan, want = expected(settings)
    outcome = run_inference(settings)  # embedded LocalCluster, 2 single-thread workers
    got = load_representations(join(workdir, "representations.zarr"))
    assert (
        outcome.computed == SAMPLES * FIELDS
        and outcome.reused == 0
        and outcome.windows == len(got.table) > 20
    )
    assert_same(got, want)
    assert_each_field_once(got, settings)
    assert not got.table["background"].any()
    attrs = got.attrs
    assert (attrs["window"], attrs["stride"], attrs["checkpoint"]) == (48, 24, ckpt)
    assert attrs["checkpoint_sha256"] == plan.job.checkpoint_sha256 and len(attrs["checkpoint_sha256"]) == 64
    assert attrs["store"] == os.path.abspath(join(workdir, "store.zarr"))
    assert attrs["phenotypes"]["S01"] == "pheno1" and attrs["settings"]["infer"]["workers"] == 2
    assert len(attrs["handcrafted_names"]) == got.features["handcrafted"].shape[1] == 13 * len(CHANNELS) + 1
    assert got.features["dim"].shape[1] == 6 and not np.allclose(got.features["dim"], got.features["random"])
    store = open_store(join(workdir, "store.zarr"))  # each field's focus score, as the cluster job measured it
    focus = {(s, f): v for s, fields in attrs["focus"].items() for f, v in fields.items()}
    assert focus == pytest.approx(field_focus(store, store.meta.images())) and len(focus) == SAMPLES * FIELDS
    cover = {(s, f): v for s, fields in attrs["cover"].items() for f, v in fields.items()}
    assert cover == pytest.approx({(s, f): store.read_mask(s, f).mean() for s, f in store.meta.images()})
    assert len(set(cover.values())) > 1
    frame = read_parquet(join(workdir, "representations.parquet"))
    assert frame["Metadata_sample"].tolist() == got.table["sample"].tolist()
    assert {"Metadata_fg_fraction", "Metadata_split", "Metadata_phenotype"} <= set(frame.columns)
    keys = zip(frame["Metadata_sample"], frame["Metadata_field"], strict=True)
    np.testing.assert_allclose(frame["Metadata_field_cover"], [cover[k] for k in keys], rtol=1e-6)
    np.testing.assert_array_equal(frame[[f"f{i:03d}" for i in range(6)]].to_numpy(), got.features["dim"])
    assert not exists(join(workdir, PARTS_NAME))
    with pytest.raises(UserError, match="already exist; pass --force"):
        run_inference(settings)
    with pytest.raises(UserError, match="not a multiple of the encoder stride"):
        run_inference(settings_for(workdir, force=True, window=50))
    assert len(load_representations(join(workdir, "representations.zarr")).table) == outcome.windows


def test_gpu_workers_get_batches_with_the_same_vectors(tmp_path, caplog):
    """Workers offering a GPU resource get batched tasks (here without CUDA: the same code in float32
    on the CPU), with two dihedral views; the vectors equal the one-field-at-a-time path's."""
    workdir = str(tmp_path / "run")
    make_run(workdir)
    _, want = expected(settings_for(workdir, views=2))
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        resources={"GPU": 1},
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as gpu_cluster, caplog.at_level(logging.INFO, logger="cellmi"):
        settings = settings_for(workdir, views=2, gpu_fields=4, scheduler_address=gpu_cluster.scheduler_address)
        outcome = run_inference(settings)
    assert "1 GPU worker(s); batches of 4 fields" in caplog.text
    assert outcome.computed == SAMPLES * FIELDS
    got = load_representations(join(workdir, "representations.zarr"))
    assert_same(got, want)
    assert_each_field_once(got, settings)


def test_cpu_tasks_hold_several_fields_when_there_are_many(tmp_path, cluster):
    """Auto: each of the 2 workers gets at least 4 tasks, a task at most 8 fields; a set value wins."""
    workdir = str(tmp_path / "run")
    make_run(workdir)
    settings = settings_for(workdir)
    job = make_plan(settings).job
    with Client(cluster) as client:
        sizes = [task_shape(settings, job, client, fields)[1] for fields in (7, 40, 1000)]
        fixed = task_shape(settings_for(workdir, fields_per_task=3), job, client, 1000)
    assert sizes == [1, 5, 8]
    assert fixed == (job, 3) and not fixed[0].batched


def test_naive_mode_and_kept_background_in_process(tmp_path):
    workdir = str(tmp_path / "run")
    make_run(workdir)
    _, shared = expected(settings_for(workdir, keep_background=True, stride=16))
    _, naive = expected(settings_for(workdir, keep_background=True, stride=16, mode="naive", batch_windows=5))
    assert_same(naive, shared)
    assert len(shared.table) == SAMPLES * FIELDS * len(window_grid((SIZE, SIZE), 48, 16))
    flags = shared.table["background"].to_numpy()
    assert flags.any() and (~flags).any()
    np.testing.assert_array_equal(flags, shared.table["fg_fraction"].to_numpy() < 0.2)


def test_store_and_checkpoint_on_s3_output_to_s3(s3_env, tmp_path):
    workdir, local = f"{s3_env}/run", str(tmp_path / "local")
    for folder in (workdir, local):  # the same seeds: the same pixels and weights in both places
        make_run(folder, samples=2, fields=1)
    _, want = expected(settings_for(local))
    outcome = run_inference(settings_for(workdir, workers=1))  # the worker reads store and checkpoint from S3
    got = load_representations(join(workdir, "representations.zarr"))
    assert outcome.computed == 2
    assert_same(got, want)
    assert got.attrs["checkpoint"] == f"{workdir}/checkpoints/step_000007.pt"
    assert got.attrs["store"] == f"{workdir}/store.zarr"
    assert (
        read_parquet(join(workdir, "representations.parquet"))["Metadata_y"].tolist()
        == got.table["y"].tolist()
    )
    assert not exists(join(workdir, PARTS_NAME))


def test_a_killed_worker_loses_and_duplicates_no_field(tmp_path, cluster):
    workdir = str(tmp_path / "run")
    make_run(workdir)
    settings = settings_for(workdir, scheduler_address=cluster.scheduler_address)
    _, want = expected(settings)
    marker = str(tmp_path / "killed")
    with Client(cluster) as client:
        client.register_plugin(KillOnce(marker))
        try:
            outcome = run_inference(settings)
        finally:
            client.unregister_worker_plugin(KillOnce.name)
    assert os.path.exists(marker), "no worker was killed: the test tested nothing"
    got = load_representations(join(workdir, "representations.zarr"))
    assert outcome.computed == SAMPLES * FIELDS
    assert_same(got, want)
    assert_each_field_once(got, settings)


def test_rerun_after_a_crash_computes_only_the_missing_fields(tmp_path, cluster):
    workdir = str(tmp_path / "run")
    make_run(workdir)
    settings = settings_for(workdir, scheduler_address=cluster.scheduler_address)
    plan, want = expected(settings)
    # The state a crash leaves: two fields done (marked with a sentinel so a recompute would show),
    # one attempt written without its done marker, the final store never written.
    prepare_parts(plan.job.parts, run_key(plan))
    done = plan.fields[:2]
    for sample, field in done:
        rows = (want.table["sample"] == sample) & (want.table["field"] == field)
        part = want.subset(rows.to_numpy())
        write_parts(
            plan.job.parts,
            [
                FieldResult(
                    sample,
                    field,
                    part.table["y"].to_numpy(),
                    part.table["x"].to_numpy(),
                    part.table["fg_fraction"].to_numpy(),
                    part.table["background"].to_numpy(),
                    {k: np.full_like(v, 42.0) for k, v in part.features.items()},
                )
            ],
            run_id="crashed",
        )
    stray = FieldResult(
        *plan.fields[2],
        np.zeros(1, np.int32),
        np.zeros(1, np.int32),
        np.zeros(1, np.float32),
        np.zeros(1, bool),
        {k: np.zeros((1, 3), np.float32) for k in want.features},
    )
    with open(os.path.join(plan.job.parts, f"{stray.name}.deadbeef.npz"), "wb") as handle:
        handle.write(pack([stray]))

    outcome = run_inference(settings)
    assert (outcome.computed, outcome.reused) == (SAMPLES * FIELDS - 2, 2)
    got = load_representations(join(workdir, "representations.zarr"))
    reused = got.table.apply(lambda r: (r["sample"], r["field"]) in done, axis=1).to_numpy()
    assert reused.any() and (got.features["dim"][reused] == 42.0).all()
    fresh = ~reused
    np.testing.assert_allclose(got.features["dim"][fresh], want.features["dim"][fresh], atol=1e-5)
    assert_each_field_once(got, settings)


def test_parts_of_other_settings_are_not_reused(tmp_path, cluster):
    workdir = str(tmp_path / "run")
    make_run(workdir)
    old = make_plan(settings_for(workdir, stride=16))
    prepare_parts(old.job.parts, run_key(old))
    write_parts(old.job.parts, [compute_in_process(old.job, old.fields[:1])[image_name(*old.fields[0])]], "old")
    outcome = run_inference(settings_for(workdir, scheduler_address=cluster.scheduler_address))
    assert (outcome.computed, outcome.reused) == (SAMPLES * FIELDS, 0)


def test_no_window_above_the_foreground_threshold_is_an_error(tmp_path, cluster):
    workdir = str(tmp_path / "run")
    make_run(workdir, samples=2, fields=1)
    with pytest.raises(UserError, match=r"MIN_FOREGROUND.*no window of any field has 1 foreground"):
        run_inference(settings_for(workdir, scheduler_address=cluster.scheduler_address, min_foreground=1.0))
    assert not exists(join(workdir, "representations.zarr"))


def test_bad_settings_are_refused_before_any_work(tmp_path):
    workdir = str(tmp_path / "run")
    make_run(workdir)
    with pytest.raises(
        UserError, match=r"CELLMI_INFER__WINDOW.*50 is not a multiple of the encoder stride 4"
    ):
        make_plan(settings_for(workdir, window=50))
    with pytest.raises(UserError, match=r"CELLMI_INFER__STRIDE.*10 is not a positive multiple"):
        make_plan(settings_for(workdir, stride=10))
    with pytest.raises(
        UserError, match=r"MEMORY_LIMIT_GB.*needs about [\d.e-]+ GB \(96x96 fields, shared mode"
    ):
        make_plan(settings_for(workdir, memory_limit_gb=1e-5))
    with pytest.raises(UserError, match="no checkpoint here"):
        make_plan(settings_for(workdir, checkpoint=str(tmp_path / "nowhere")))
    other = str(tmp_path / "other")
    write_checkpoint(other, channels=["a", "b", "c"])
    with pytest.raises(UserError, match=r"trained on channels \['a', 'b', 'c'\]"):
        make_plan(settings_for(workdir, checkpoint=other))
    field_trained = str(tmp_path / "field-trained")
    write_checkpoint(field_trained, data_stats={"intensity": "field"})  # the stand-in store is "store"
    with pytest.raises(UserError, match=r"trained on 'field' intensities, the store has 'store'.*INTENSITY"):
        make_plan(settings_for(workdir, checkpoint=field_trained))
    assert not exists(join(workdir, PARTS_NAME)) and not exists(join(workdir, "representations.zarr"))


def test_memory_estimate_grows_with_the_field(tmp_path):
    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    for folder, size in ((small, 96), (big, 192)):
        make_store(join(folder, "store.zarr"), samples=2, fields=1, size=size)
        write_checkpoint(join(folder, "checkpoints"))
    a = make_plan(settings_for(small)).task_bytes
    b = make_plan(settings_for(big)).task_bytes
    assert 3.5 < b / a < 4.5
    naive = make_plan(settings_for(big, mode="naive", batch_windows=1)).task_bytes
    assert naive < b


def test_an_unreachable_scheduler_is_one_clear_error(tmp_path, monkeypatch):
    """Not there (yet, or any more): an infrastructure fault, safe to retry, after timeouts.dask_s."""
    import socket

    workdir = str(tmp_path / "run")
    make_run(workdir, samples=2, fields=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", f"tcp://127.0.0.1:{port}")
    settings = settings_for(workdir).model_copy(update={"timeouts": TimeoutSettings(dask_s=2)})
    refused = rf"cannot reach the Dask scheduler tcp://127.0.0.1:{port} within 2 s"
    with pytest.raises(InfrastructureError, match=refused):
        run_inference(settings)


def test_cli_refusal_is_one_line_with_exit_status_2(tmp_path):
    import subprocess

    workdir = str(tmp_path / "run")
    make_run(workdir, samples=2, fields=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLMI_")}
    proc = subprocess.run(
        [sys.executable, "-m", "cellmi", "infer", "--workdir", workdir, "--infer.stride", "10"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("cellmi infer: error: CELLMI_INFER__STRIDE")


def _model_loads() -> tuple[int, int]:
    from cellmi.infer.task import load_models

    info = load_models.cache_info()
    return info.misses, info.hits + info.misses


def test_each_worker_loads_the_models_once(tmp_path, cluster):
    workdir = str(tmp_path / "run")
    make_run(workdir)
    with Client(cluster) as client:
        before = client.run(_model_loads)
        run_inference(settings_for(workdir, scheduler_address=cluster.scheduler_address))
        after = client.run(_model_loads)
    loads = sum(after[w][0] - before.get(w, (0, 0))[0] for w in after)
    calls = sum(after[w][1] - before.get(w, (0, 0))[1] for w in after)
    assert calls == SAMPLES * FIELDS  # one task per field asked for the models ...
    assert 1 <= loads <= len(after)  # ... and each worker read the checkpoint at most once
