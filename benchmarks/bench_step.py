"""Where a CPU training step's time goes: the step on one batch held fixed under variants of its settings,
and the loader's batch stage by stage.

    python benchmarks/bench_step.py                  # both parts (about 4 minutes on 2 cores)
    python benchmarks/bench_step.py --parts step --variants default compiled

Step (``--parts step``): ``train_step`` with the default model and batch (crop 256, B=8, N=4) on one batch
of random crops held fixed, each variant in its own process (torch threads and compilation hold for a
whole process): ``default`` (today's settings, one torch thread, bf16 where native), ``float32``
(``train.amp=false``), ``contiguous`` (``train.channels_last=false``), ``two-threads`` (two torch
threads, nothing else running), ``compiled`` (``torch.compile`` of the encoder and critics; the first
step, which compiles, is reported apart), ``foreach`` (Adam's multi-tensor update). ms/step is the median
of --repeats timings of --steps steps, after 5 untimed ones.

Loader (``--parts loader``): the prepared-field ``CropLoader`` of ``cellmi train`` on the synthetic screen
(made once, as in bench_train.py), one batch after another, the step's layout (``step_inputs``) included,
as on the loader's thread; then the same batches under cProfile for the time of each stage: cutting
crops (turns and mirrors included), content targets, nuisances (blur, focus gradient) and the layout.

Whether a second torch thread pays beside the loader's thread is ``bench_train.py --parts layouts
--layouts 1x1 1x2`` (``cellmi train`` itself). Writes benchmarks/out/step[-tag].json and prints tables.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train's store and settings helpers

from bench_train import _steps, random_batch, screen_store, settings_for

OUT = Path(__file__).resolve().parent / "out"
VARIANTS = {
    "default": ([], 1),
    "float32": (["train.amp=false"], 1),
    "contiguous": (["train.channels_last=false"], 1),
    "two-threads": ([], 2),
    "compiled": ([], 1),
    "foreach": ([], 1),
}
# loader stages: cProfile's cumulative time of these functions, per batch
STAGES = {"cut": "_crops", "content": "crop_content", "nuisances": "_nuisance", "layout": "step_inputs"}


def fixed_step(variant: str, steps: int, repeats: int) -> dict:
    """ms per ``train_step`` of ``variant`` on one random batch held fixed (run in a process of its own)."""
    from cellmi.train.distributed import DistInfo
    from cellmi.train.state import build_trainer
    from cellmi.train.step import batch_layout

    overrides, threads = VARIANTS[variant]
    torch.set_num_threads(threads)
    settings = settings_for(overrides, OUT / "step-work")
    cpu = torch.device("cpu")
    trainer = build_trainer(settings, 3, cpu)
    if variant == "compiled":
        trainer.net_ddp = torch.compile(trainer.net)  # train_net is the wrapper when there is one
    if variant == "foreach":
        trainer.optim = torch.optim.Adam(trainer.net.parameters(), lr=settings.train.lr, foreach=True)
    fixed = itertools.repeat(batch_layout(trainer.encoder, settings.train, cpu)(random_batch(settings)))
    dist = DistInfo(0, 1, 0, 1, cpu)
    first = _steps(trainer, fixed, settings, dist, 1)[0]
    _steps(trainer, fixed, settings, dist, 4)
    timings = [_steps(trainer, fixed, settings, dist, steps)[0] / steps * 1000 for _ in range(repeats)]
    return {"variant": variant, "threads": threads, "overrides": overrides, "first_step_s": round(first, 2),
            "ms_per_step": round(statistics.median(timings), 1), "ms_all": [round(t, 1) for t in timings]}


def step_part(args) -> list[dict]:
    runs = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--one", variant, "--steps", str(args.steps),
                   "--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{variant}: {runs[-1]['ms_per_step']} ms/step", flush=True)
    base = next((r["ms_per_step"] for r in runs if r["variant"] == "default"), None)
    for run in runs:
        run["vs_default"] = round(base / run["ms_per_step"], 2) if base else None
    return runs


def loader_part(args) -> dict:
    """ms per batch of the loader (layout included) and the share of each stage."""
    from cellmi.store import open_store
    from cellmi.train.data import CropLoader
    from cellmi.train.state import build_trainer
    from cellmi.train.step import batch_layout

    torch.set_num_threads(1)
    workdir = screen_store()
    settings = settings_for([], workdir)
    cpu = torch.device("cpu")
    loader = CropLoader(open_store(str(workdir / "store.zarr")), settings.train, settings.model.crop, device=cpu)
    layout = batch_layout(build_trainer(settings, 3, cpu).encoder, settings.train, cpu)
    try:
        for step in range(3):
            layout(loader.batch(step))
        start = time.perf_counter()
        for step in range(args.steps):
            layout(loader.batch(step))
        per_batch = (time.perf_counter() - start) / args.steps * 1000
        profile = cProfile.Profile()
        profile.runcall(lambda: [layout(loader.batch(step)) for step in range(args.steps)])
    finally:
        loader.close()
    cumulative = {func[2]: row[3] for func, row in pstats.Stats(profile).stats.items()}
    stages = {name: round(cumulative.get(func, 0.0) / args.steps * 1000, 1) for name, func in STAGES.items()}
    return {"ms_per_batch": round(per_batch, 1), "stage_ms_profiled": stages}


def table(report: dict) -> str:
    lines = []
    if "step" in report:
        lines += ["| step variant | torch threads | ms/step | vs default | first step (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['threads']} | {r['ms_per_step']} | {r['vs_default']} | {r['first_step_s']} |"
                  for r in report["step"]]
    if "loader" in report:
        loader = report["loader"]
        lines += ["", f"loader: {loader['ms_per_batch']} ms a batch (layout included), by stage under cProfile:", "",
                  "| stage | ms a batch |", "|---|---|"]
        lines += [f"| {name} | {ms} |" for name, ms in loader["stage_ms_profiled"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["step", "loader"], default=["step", "loader"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10, help="steps (or batches) per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per step variant; the median is reported")
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)  # a variant's own process
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(fixed_step(args.one, args.steps, args.repeats)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": {"cpus": os.cpu_count() or 1, "platform": platform.platform(),
                                "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2)}}
    if "step" in args.parts:
        report["step"] = step_part(args)
    if "loader" in args.parts:
        report["loader"] = loader_part(args)
    tag = f"-{args.tag}" if args.tag else ""
    (OUT / f"step{tag}.json").write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
