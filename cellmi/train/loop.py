"""The training loop: resume, step until the step count or the time budget, log, checkpoint."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from cellmi.hardware import cores
from cellmi.log import log, progress
from cellmi.settings import Settings
from cellmi.store import STORE_NAME, ImageStore, filesystem, is_s3, join, open_store, write_bytes_atomic
from cellmi.train.checkpoint import latest_checkpoint, save_checkpoint
from cellmi.train.data import CropLoader
from cellmi.train.distributed import DistInfo, broadcast_object, max_over_ranks, mean_over_ranks
from cellmi.train.state import (
    Trainer,
    build_trainer,
    checkpoint_state,
    restore,
    set_learning_rates,
    wrap_distributed,
)
from cellmi.train.step import METRICS, StepInputs, batch_layout, train_step
from cellmi.watchdog import mark_progress, waiting

__all__ = ["CHECKPOINTS", "METRICS_FILE", "MetricsLog", "TrainResult", "run_training"]

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SIGNAL_EXIT = 128 + signal.SIGTERM


@dataclass
class TrainResult:
    """How a run ended: the step, why it stopped, rank 0's final checkpoint, the last metrics line."""

    step: int
    stop_reason: str  # "steps" | "time_budget" | "signal"
    checkpoint: str | None  # URL of the last checkpoint written (rank 0), else None
    last_metrics: dict[str, float] = field(default_factory=dict)
    trainer: Trainer | None = field(default=None, repr=False)  # the trained modules, for callers in-process


class MetricsLog:
    """JSON lines at ``{workdir}/checkpoints/metrics.jsonl``, rewritten whole (S3 cannot append).

    On resume, lines after the resumed step are dropped: those steps are trained again.
    """

    def __init__(self, url: str, keep_until: int) -> None:
        self.url = url
        self.fs, self.path = filesystem(url)  # one client for the whole run (S3 clients are slow to make)
        self.lines: list[str] = []
        if keep_until > 0 and self.fs.exists(self.path):
            old = self.fs.cat_file(self.path).decode().splitlines()
            self.lines = [line for line in old if line.strip() and json.loads(line)["step"] <= keep_until]

    def add(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record))
        data = ("\n".join(self.lines) + "\n").encode()
        if is_s3(self.url):
            with waiting(self.url):
                self.fs.pipe_file(self.path, data)  # a single PUT: readers see the old or the new file
        else:
            write_bytes_atomic(self.url, data)


def intra_op_threads(threads: int, dist: DistInfo) -> int:
    """Torch threads per process: ``threads``, or for 0 this machine's cores shared by the local
    processes, less one (at least 1) for the crop thread, whose tensor operations run beside the step.

    On 2 cores, one step thread and the crop thread: 335 crops/s in bf16 against 259 with two step
    threads (oneDNN's bf16 kernels suffer most from a contended core); float32 221 against 224.
    """
    if threads:
        return threads
    return max(1, cores() // max(1, dist.local_world) - 1)


@contextmanager
def torch_threads(threads: int, dist: DistInfo) -> Iterator[int]:
    """Torch intra-op threads for the run (``intra_op_threads``), restored afterwards (callers in-process
    keep theirs)."""
    before = torch.get_num_threads()
    threads = intra_op_threads(threads, dist)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


@contextmanager
def sigterm_flag() -> Iterator[dict[str, bool]]:
    """{"set": True} once SIGTERM arrives (preemption), so the loop can checkpoint and stop."""
    flag = {"set": False}

    def handler(signum: int, frame: Any) -> None:
        flag["set"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def share_done(trainer: Trainer, settings: Settings) -> float:
    """Share of the training done: of the steps or of the time budget, whichever is further on."""
    cfg = settings.train
    done = trainer.step / cfg.steps
    if cfg.time_budget_s is not None:
        done = max(done, trainer.train_seconds / cfg.time_budget_s)
    return min(done, 1.0)


def stop_reason(trainer: Trainer, settings: Settings, signalled: bool, dist: DistInfo) -> tuple[str | None, float]:
    """Why to stop now (steps reached, time budget spent, SIGTERM; None: go on) and the share of the
    training done, both the same on every rank."""
    cfg = settings.train
    if trainer.step >= cfg.steps:
        return "steps", 1.0
    over = cfg.time_budget_s is not None and trainer.train_seconds >= cfg.time_budget_s
    over, interrupted, done = max_over_ranks([over, signalled, share_done(trainer, settings)], dist.device)
    if interrupted:
        return "signal", done
    return ("time_budget" if over else None), done


def resume(trainer: Trainer, ckpt_dir: str, store: ImageStore, dist: DistInfo) -> tuple[int, str | None]:
    """Continue from the newest complete checkpoint (rank 0 picks it for all); (step, its stop reason)."""
    url = broadcast_object(latest_checkpoint(ckpt_dir) if dist.rank == 0 else None)
    if url is None:
        return 0, None
    state = restore(trainer, url, store.meta.channels, restore_rng=dist.rank == 0)
    return trainer.step, state["stop_reason"]


def _record(trainer: Trainer, values: torch.Tensor, crops_per_s: float, busy: float) -> dict[str, Any]:
    record: dict[str, Any] = {
        "step": trainer.step,
        "time_s": round(trainer.train_seconds, 3),
        "crops_per_s": round(crops_per_s, 2),
        "busy": round(busy, 4),
        "lr": trainer.optim.param_groups[0]["lr"],
    }
    record.update({name: round(float(v), 6) for name, v in zip(METRICS, values.tolist(), strict=True)})
    return record


@dataclass
class _Run:
    """Everything one training run holds while it steps."""

    settings: Settings
    dist: DistInfo
    store: ImageStore
    trainer: Trainer
    loader: CropLoader
    metrics: MetricsLog | None  # rank 0 only
    bar: Any
    saved: tuple[int, str | None]  # (step, stop reason) of the newest checkpoint on disk
    result: TrainResult
    window_start: float = field(default_factory=time.perf_counter)
    window_sum: torch.Tensor | None = None  # METRICS summed over the steps since the last log line
    window_steps: int = 0
    window_wait: float = 0.0  # seconds the loop waited for batches since the last log line

    @property
    def ckpt_dir(self) -> str:
        return join(self.settings.workdir, CHECKPOINTS)

    @property
    def crops_per_step(self) -> int:
        cfg = self.settings.train
        return cfg.batch_samples * cfg.fields_per_sample * self.dist.world


def _start(settings: Settings, dist: DistInfo, threads: int) -> _Run:
    """Open the store, build or resume the modules, start the loader and the rank-0 logs."""
    store = open_store(join(settings.workdir, STORE_NAME))
    trainer = build_trainer(settings, len(store.meta.channels), dist.device)
    ckpt_dir = join(settings.workdir, CHECKPOINTS)
    saved = resume(trainer, ckpt_dir, store, dist)
    wrap_distributed(trainer, dist)
    loader = CropLoader(
        store, settings.train, settings.model.crop, dist.rank, dist.world, settings.train.loader_threads or 1,
        dist.device,
    )
    main = dist.rank == 0
    metrics = MetricsLog(join(ckpt_dir, METRICS_FILE), keep_until=trainer.step) if main else None
    bar = progress(total=settings.train.steps, initial=trainer.step, desc="train", unit="step", disable=not main)
    run = _Run(
        settings, dist, store, trainer, loader, metrics, bar, saved, TrainResult(trainer.step, "steps", None)
    )
    log.info(
        "training on %s, %d process(es) x %d thread(s), %d crops/step, steps %d..%d",
        dist.device,
        dist.world,
        threads,
        run.crops_per_step,
        trainer.step,
        settings.train.steps,
    )
    return run


def _save(run: _Run, stop: str | None) -> str:
    cfg, trainer = run.settings.train, run.trainer
    url = save_checkpoint(
        run.ckpt_dir,
        checkpoint_state(trainer, run.settings, run.store.meta, stop),
        trainer.step,
        cfg.keep_checkpoints,
    )
    run.saved = (trainer.step, stop)
    return url


def _log(run: _Run, values: torch.Tensor) -> None:
    """Metrics averaged over the steps since the last line and over ranks (every rank takes part);
    rank 0 writes and shows them."""
    elapsed = time.perf_counter() - run.window_start
    rate = run.crops_per_step * run.window_steps / elapsed
    values = mean_over_ranks(values)
    run.result.last_metrics = _record(run.trainer, values, rate, 1 - run.window_wait / elapsed)
    if run.metrics is not None:
        run.metrics.add(run.result.last_metrics)
    run.bar.set_postfix(loss=f"{float(values[0]):.4f}", crops_s=f"{rate:.0f}")
    run.window_start, run.window_sum, run.window_steps, run.window_wait = time.perf_counter(), None, 0, 0.0


def _step(run: _Run, batches: Iterator[StepInputs]) -> None:
    """One step on the next batch; the time budget counts the wait for it."""
    cfg, trainer = run.settings.train, run.trainer
    started = time.perf_counter()
    batch = next(batches)
    run.window_wait += time.perf_counter() - started
    values = train_step(trainer, batch, cfg, run.dist)
    trainer.step += 1
    trainer.train_seconds += time.perf_counter() - started
    run.window_sum = values if run.window_sum is None else run.window_sum + values
    run.window_steps += 1
    run.bar.update(1)
    mark_progress()
    if trainer.step % cfg.log_every == 0:
        _log(run, run.window_sum / run.window_steps)
    if trainer.step % cfg.checkpoint_every == 0 and trainer.step < cfg.steps and run.dist.rank == 0:
        _save(run, None)


def run_training(settings: Settings, dist: DistInfo) -> TrainResult:
    """Train from scratch or from the newest checkpoint until the steps or the time budget are spent.

    Rank 0 writes a checkpoint every ``checkpoint_every`` steps and a final one recording the stop reason.
    """
    with torch_threads(settings.train.threads, dist) as threads:
        run = _start(settings, dist, threads)
        try:
            # A step waits on crops from the store and, under torchrun, on the other processes.
            with sigterm_flag() as signalled, waiting(f"the next training step ({dist.world} process(es))"):
                layout = batch_layout(run.trainer.encoder, settings.train, dist.device)
                batches = run.loader.batches(run.trainer.step, layout)
                while True:
                    reason, done = stop_reason(run.trainer, settings, signalled["set"], dist)
                    if reason is not None:
                        break
                    set_learning_rates(run.trainer, settings.train, done)
                    _step(run, batches)
        finally:
            run.bar.close()
            run.loader.close()
        final = None if reason == "signal" else reason
        if dist.rank == 0 and run.saved != (run.trainer.step, final):
            run.result.checkpoint = _save(run, final)
    run.result.step, run.result.stop_reason, run.result.trainer = run.trainer.step, reason, run.trainer
    log.info(
        "stopped at step %d (%s) after %.1f s of training",
        run.trainer.step,
        reason,
        run.trainer.train_seconds,
    )
    return run.result
