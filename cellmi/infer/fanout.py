"""Dask fan-out: an embedded LocalCluster or an existing scheduler, one task per group of fields."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask
import torch
from distributed import Client, LocalCluster, as_completed

from cellmi.errors import InfrastructureError, UserError, first_line, is_infrastructure
from cellmi.hardware import cores
from cellmi.infer.task import InferJob, run_task
from cellmi.log import log, progress
from cellmi.settings import InferSettings, TimeoutSettings
from cellmi.watchdog import dask_config, mark_progress, waiting

__all__ = ["compute_parts", "dask_client", "gpu_workers", "scheduler_address"]


def scheduler_address(settings: InferSettings) -> str | None:
    """The scheduler to connect to: the setting, else ``DASK_SCHEDULER_ADDRESS``, else none."""
    return settings.scheduler_address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


@contextmanager
def dask_client(settings: InferSettings, timeouts: TimeoutSettings) -> Iterator[Client]:
    """A client of the configured scheduler, or of a LocalCluster started here and closed after.

    Dask's connect and TCP timeouts (and the embedded scheduler's worker heartbeat limit) are
    ``timeouts.dask_s`` for as long as the client is open.
    """
    with dask.config.set(dask_config(timeouts)):
        address = scheduler_address(settings)
        cluster = None
        if address:
            client = _connect(address, timeouts.dask_s)
        else:
            cluster, client = _local_cluster(settings)
        log.info("Dask dashboard: %s", client.dashboard_link)
        try:
            yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _connect(address: str, timeout_s: float) -> Client:
    """A client of an existing scheduler; an unreachable one is an infrastructure fault (it may be
    starting, or gone), a malformed address a user error."""
    try:
        client = Client(address, timeout=f"{timeout_s:g}s")
    except ValueError:  # Dask's parser: its message repeats the address without its scheme (unredactable)
        raise UserError(
            f"{address}: not a Dask scheduler address (CELLMI_INFER__SCHEDULER_ADDRESS or "
            "DASK_SCHEDULER_ADDRESS); expected e.g. tcp://scheduler:8786"
        ) from None
    except (OSError, TimeoutError) as err:
        raise InfrastructureError(
            f"cannot reach the Dask scheduler {address} within {timeout_s:g} s (CELLMI_INFER__SCHEDULER_ADDRESS or "
            f"DASK_SCHEDULER_ADDRESS; CELLMI_TIMEOUTS__DASK_S): {first_line(err)}"
        ) from None
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    log.info("connected to Dask scheduler %s (%d workers)", address, workers)
    return client


def _local_cluster(settings: InferSettings) -> tuple[LocalCluster, Client]:
    gpu = settings.device == "auto" and torch.cuda.is_available()
    # with a GPU, one worker feeds it (preparing fields on prep_threads threads); else one per core
    workers = 1 if gpu else settings.workers or cores()
    # A worker that dies mid-task counts against allowed-failures, not the task's retries.
    with dask.config.set({"distributed.scheduler.allowed-failures": max(settings.retries, 1)}):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            resources={"GPU": 1} if gpu else None,
            # A failed task is reported once, in one line, by compute_parts; the workers' own
            # "Compute Failed" records (a traceback each, per retry) only at --log_level DEBUG.
            silence_logs=logging.ERROR if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL,
        )
    where = " with the GPU" if gpu else ""
    log.info("started a local Dask cluster: %d worker process(es) x 1 thread%s", workers, where)
    return cluster, Client(cluster)


def gpu_workers(client: Client) -> int:
    """Workers that offer a ``GPU`` resource (``dask worker --resources GPU=1``)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return sum(1 for w in workers if (w.get("resources") or {}).get("GPU", 0) >= 1)


def compute_parts(client: Client, job: InferJob, groups: list[list[tuple[str, str]]], retries: int) -> int:
    """Run one task per group of fields with a progress bar; returns the fields computed.

    Batched tasks (``job.batched``) need a worker's ``GPU`` resource. Every task runs to the end even
    when some fail, so a re-run only has the failed fields left. A field done is progress for the
    watchdog; a failed task is not.
    """
    futures = {
        client.submit(
            run_task,
            job,
            group,
            key=f"infer-{group[0][0]}_{group[0][1]}-{job.run_id}",
            pure=False,
            retries=retries,
            resources={"GPU": 1} if job.batched else None,
        ): group
        for group in groups
    }
    total = sum(len(g) for g in groups)
    computed, failed = 0, []
    with progress(total=total, unit="field", desc="infer") as bar, waiting(
        f"the Dask cluster {client.scheduler.address}"
    ):
        for future in as_completed(futures):
            group = futures[future]
            try:
                computed += len(future.result())
                mark_progress()
            except Exception as err:
                failed.append((group, err))
            bar.update(len(group))
    if failed:
        raise task_failures(failed, len(groups), retries)
    return computed


def task_failures(
    failed: list[tuple[list[tuple[str, str]], Exception]], tasks: int, retries: int
) -> UserError | InfrastructureError:
    """One error for the failed tasks: an infrastructure fault when every failure was one (storage
    or network), else a user error naming the first failure of another kind."""
    infra = [is_infrastructure(err) for _, err in failed]
    group, err = next(((g, e) for (g, e), i in zip(failed, infra, strict=True) if not i), failed[0])
    (sample, field) = group[0]
    count = sum(len(g) for g, _ in failed)
    # A task of several fields may have finished some before it failed: say tasks, not "fields failed".
    message = (
        f"{len(failed)} of {tasks} task(s) ({count} field(s)) failed after {retries} retries, "
        f"first {sample}_{field}: {type(err).__name__}: {err}; "
        "re-run to finish them (fields done before a failure are kept)"
    )
    return InfrastructureError(message) if all(infra) else UserError(message)
