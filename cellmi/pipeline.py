"""``cellmi run``: ingest -> train -> infer -> cluster in one run folder, reusing finished stages.

    cellmi run                                   # the synthetic screen, embedded Dask cluster, ./cellmi-work
    cellmi run --quick                           # tiny data, few steps: a smoke test
    cellmi run --source /data/BBBC018            # a real screen with the bbbc018 preset
    cellmi run --workdir s3://bucket/run --force # redo every stage

Each stage records its settings and a digest of them (chained with the stages before it) in
``{workdir}/run.json``. A re-run skips stages whose digest is unchanged and whose output is
complete, and redoes the rest. A run folder that holds a different data set is refused unless
``--force``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cellmi import __version__
from cellmi.errors import UserError
from cellmi.log import log
from cellmi.settings import Settings, as_dict, digest
from cellmi.store import STORE_NAME, exists, join, read_bytes, remove, store_complete, write_bytes_atomic
from cellmi.watchdog import set_stage

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
ANALYSIS = "analysis"

# What --quick changes: a few small fields and a short training, for smoke tests and CI.
QUICK = {
    "synth": {"samples": 6, "fields": 2, "size": 192},
    "ingest": {"n_test": 2},
    "model": {"crop": 64, "width": 16, "local_dim": 32, "global_dim": 16, "critic_dim": 32},
    "train": {"steps": 40, "time_budget_s": 30.0, "batch_samples": 4, "fields_per_sample": 2,
              "checkpoint_every": 20},
    "infer": {"workers": 1},
    "cluster": {"neighbors": 8, "gallery": 4, "restarts": 1},
}


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    sections: tuple[str, ...]          # settings that decide the stage's output
    output: str                        # path under workdir whose completeness says "done"
    ignore: tuple[str, ...] = ()       # fields of those sections that do not change the output


STAGES = (
    Stage("ingest", "cellmi.data.ingest", ("source", "synth", "ingest"), STORE_NAME,
          ignore=("overwrite", "workers")),
    Stage("train", "cellmi.train.job", ("model", "train"), CHECKPOINTS,
          ignore=("threads", "loader_threads", "log_every", "dist_timeout_s", "keep_checkpoints")),
    Stage("infer", "cellmi.infer.job", ("infer",), "representations.zarr",
          ignore=("scheduler_address", "workers", "retries", "memory_limit_gb", "fields_per_task")),
    Stage("cluster", "cellmi.analyze.job", ("cluster",), ANALYSIS, ignore=("apply_to",)),
)


def apply_quick(settings: Settings) -> Settings:
    """The settings of ``--quick``: the QUICK table merged over the defaults.

    Settings given explicitly (flag or variable) win: ``--quick --train.steps 10`` trains 10 steps.
    """
    data = settings.model_dump()
    for section, values in QUICK.items():
        given = getattr(settings, section).model_fields_set
        data[section].update({k: v for k, v in values.items() if k not in given})
    return Settings.model_validate(data)


def stage_settings(settings: Settings, stage: Stage) -> dict[str, Any]:
    data = as_dict(settings, redact=False)
    out = {}
    for section in stage.sections:
        value = data[section]
        out[section] = {k: v for k, v in value.items() if k not in stage.ignore} if isinstance(value, dict) else value
    return out


def stage_digests(settings: Settings) -> dict[str, str]:
    """Digest of each stage's settings chained with the digest of the stage before it."""
    digests, previous = {}, ""
    for stage in STAGES:
        previous = digest({"before": previous, "settings": stage_settings(settings, stage)})
        digests[stage.name] = previous
    return digests


def load_run(workdir: str) -> dict[str, Any]:
    url = join(workdir, RUN_FILE)
    if not exists(url):
        return {}
    try:
        return json.loads(read_bytes(url))
    except ValueError:
        raise UserError(f"{url}: run record is not valid JSON; use --force to start the run afresh") from None


def save_run(workdir: str, record: dict[str, Any]) -> None:
    write_bytes_atomic(join(workdir, RUN_FILE), json.dumps(record, indent=2).encode())


def output_complete(workdir: str, stage: Stage) -> bool:
    """Whether the stage's output exists and was marked complete."""
    url = join(workdir, stage.output)
    if stage.name == "train":
        from cellmi.train.checkpoint import latest_checkpoint

        return latest_checkpoint(url) is not None
    if stage.name == "cluster":
        return exists(join(url, "report.html"))
    return store_complete(url)


def check_same_run(workdir: str, record: dict[str, Any], digests: dict[str, str], force: bool) -> None:
    """Refuse a run folder that holds a different data set unless forced."""
    done = record.get("stages", {}).get("ingest")
    if done and done["digest"] != digests["ingest"] and not force:
        raise UserError(f"{workdir}: holds a different run (other data or ingest settings); "
                        "choose another --workdir or pass --force to replace it")
    if not record and exists(join(workdir, STORE_NAME)) and not force:
        raise UserError(f"{workdir}: holds a store that no `cellmi run` recorded; pass --force to replace it")


def _job(stage: Stage) -> Callable[[Settings], int | None]:
    return importlib.import_module(stage.module).main


def run_stage(stage: Stage, settings: Settings) -> float:
    """Remove the stage's old output, run it, return its wall time in seconds."""
    remove(join(settings.workdir, stage.output))
    start = time.perf_counter()
    log.info("== %s ==", stage.name)
    set_stage(f"run ({stage.name})")
    code = _job(stage)(settings) or 0
    if code:
        raise UserError(f"stage {stage.name} failed with exit status {code}")
    return time.perf_counter() - start


def run_pipeline(settings: Settings) -> dict[str, Any]:
    """Run every stage that is not already done with the same settings; return the run record."""
    if settings.quick:
        settings = apply_quick(settings)
    workdir = settings.workdir
    digests = stage_digests(settings)
    record = {} if settings.force else load_run(workdir)
    check_same_run(workdir, load_run(workdir), digests, settings.force)
    record = {"cellmi_version": __version__, "stages": dict(record.get("stages", {}))}
    write_bytes_atomic(join(workdir, "settings.json"), json.dumps(as_dict(settings), indent=2).encode())
    stale = settings.force
    for stage in STAGES:
        done = record["stages"].get(stage.name)
        stale = stale or not done or done["digest"] != digests[stage.name] or not output_complete(workdir, stage)
        if not stale:
            log.info("== %s == unchanged, reusing %s", stage.name, join(workdir, stage.output))
            continue
        record["stages"].pop(stage.name, None)
        save_run(workdir, record)
        seconds = run_stage(stage, settings)
        record["stages"][stage.name] = {
            "digest": digests[stage.name],
            "settings": stage_settings(settings, stage),
            "seconds": round(seconds, 2),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        save_run(workdir, record)
    return record


def headline(workdir: str) -> str:
    """The report path and the held-out scores, for the last lines of the log."""
    metrics_url = join(workdir, ANALYSIS, "metrics.json")
    lines = [f"report: {join(workdir, ANALYSIS, 'report.html')}"]
    if exists(metrics_url):
        metrics = json.loads(read_bytes(metrics_url))
        for name in ("dim", "random", "handcrafted"):
            scores = metrics.get(name, {})
            parts = [f"{split} {key}={value:.3f}" for split, values in scores.items() if isinstance(values, dict)
                     for key, value in values.items() if key in ("image_ari", "window_ari") and value is not None]
            if parts:
                lines.append(f"{name:12s} " + ", ".join(parts))
    return "\n".join(lines)


def main(settings: Settings) -> int:
    record = run_pipeline(settings)
    times = ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in record["stages"].items())
    log.info("done (%s)", times)
    print(headline(settings.workdir if not settings.quick else apply_quick(settings).workdir))
    return 0
