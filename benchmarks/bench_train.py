"""Training speed: the input pipeline (old loader against new, 50 against 500 fields, busy share), crops/s
with 1 and 2 processes, FLOPs per crop, achieved FLOP/s against matmul peak.

    python benchmarks/bench_train.py                  # everything (default model and batch: crop 256, B=8, N=4)
    python benchmarks/bench_train.py --parts input    # the input pipeline only (a few minutes on 2 cores)
    python benchmarks/bench_train.py --steps 120 --set model.width=32 --tag w32
    python benchmarks/bench_train.py --parts input --device cuda --tag gpu --input-n 4 32 64 --sizes base large

Input pipeline (``--parts input``): in one process, the step loop of ``cellmi train`` (prefetching loader,
``train_step``) with today's defaults, on three stores made once under benchmarks/out/train-input: the
synthetic screen (14 samples x 4 fields, 512 px, 40 training fields), and 10 and 100 training samples x 5
fields of 384 x 512 cut from it (50 and 500 fields). "old" is the loader of commit OLD_REF (per-crop numpy
in one thread, a 64-field cache), loaded from git; "new" is this checkout's. Busy is the share of the
loop's wall time not spent waiting for a batch; "vs compute" is the loop's crops/s over the crops/s of the
same steps on one batch held fixed. On a GPU only "new" runs (no git there), at several N.

Layouts (``--parts layouts``): makes a synthetic store once (benchmarks/out/train-work/store.zarr, 14
samples x 2 fields, 512 px), then runs ``cellmi train`` as 1 process (1 and 2 threads) and ``torchrun
--nproc-per-node 2 -m cellmi train``, each from scratch, best of --repeats. Crops/s is the steady rate after
the first logged interval, from metrics.jsonl. ``--parts probe``: how much crop intensity and foreground
share survive mean/max pooling with and without batch-norm in the trunk, on untrained encoders.
Writes benchmarks/out/train[-tag].json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

OUT = Path(__file__).resolve().parent / "out"
WORK = OUT / "train-work"
INPUT = OUT / "train-input"
OLD_REF = "4437060"  # main before the prepared-field loader (issue 15): its cellmi/train/data.py is "old"


def clean_env(overrides: list[str], workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLMI_")}
    env["CELLMI_WORKDIR"] = str(workdir)
    for item in overrides:
        key, value = item.split("=", 1)
        env["CELLMI_" + key.upper().replace(".", "__")] = value
    return env


def make_store() -> None:
    if (WORK / "store.zarr" / "zarr.json").exists():
        return
    env = clean_env(["synth.fields=2"], WORK)
    subprocess.run([sys.executable, "-m", "cellmi", "synth"], env=env, check=True, capture_output=True)


def matmul_peak(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """Best of 3 float32 matmul rates in GFLOP/s with ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def machine_peak(cores: int) -> dict:
    """Matmul peak of the machine: one process with all cores, and one 1-thread process per core at once.

    The larger counts: on a shared machine a multi-threaded matmul loses much to thread contention.
    """
    with ProcessPoolExecutor(max_workers=cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        per_process = list(pool.map(matmul_peak, [1] * cores))
    together = matmul_peak(cores)
    return {
        "one_process_all_threads": round(together, 1),
        "per_core_processes": round(sum(per_process), 1),
        "one_thread": round(max(per_process), 1),
        "peak": round(max(together, sum(per_process)), 1),
    }


def settings_for(overrides: list[str], workdir: Path):
    """Settings as ``cellmi train`` would read them from CELLMI_* variables with these overrides."""
    from cellmi.settings import Settings

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(clean_env(overrides, workdir))
    try:
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def random_batch(settings, seed: int = 0):
    """A batch of the settings' shape (B samples x N fields of 3-channel crops) of random pixels and masks."""
    from cellmi.train.data import Batch, content_size

    cfg, crop = settings.train, settings.model.crop
    b, n = cfg.batch_samples, cfg.fields_per_sample
    g = torch.Generator().manual_seed(seed)
    images, masks = torch.randn(b, n, 3, crop, crop, generator=g), torch.rand(b, n, crop, crop, generator=g) > 0.5
    return Batch(images, masks, torch.arange(b), torch.randn(b, n, content_size(3), generator=g))


def flops_per_crop(overrides: list[str]) -> tuple[float, dict]:
    """FLOPs of one training step (encoder + critics forward/backward, prior step) divided by its crops."""
    from cellmi.train.distributed import DistInfo
    from cellmi.train.state import build_trainer
    from cellmi.train.step import train_step

    settings = settings_for(overrides, WORK)
    cfg, crop = settings.train, settings.model.crop
    trainer = build_trainer(settings, 3, torch.device("cpu"))
    b, n = cfg.batch_samples, cfg.fields_per_sample
    batch = random_batch(settings)
    dist = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        train_step(trainer, batch, cfg, dist)
    encoder_params = sum(p.numel() for p in trainer.encoder.parameters())
    return counter.get_total_flops() / (b * n), {
        "crop": crop,
        "batch_samples": b,
        "fields_per_sample": n,
        "width": settings.model.width,
        "encoder_params": encoder_params,
    }


def train_rate(procs: int, threads: int, steps: int, overrides: list[str]) -> dict:
    """Run training from scratch; crops/s over the logged intervals after the first."""
    workdir = OUT / f"train-work-{procs}p{threads}t"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / "store.zarr").symlink_to(WORK / "store.zarr")
    log_every = max(1, steps // 6)
    env = clean_env(
        [
            f"train.steps={steps}",
            "train.time_budget_s=none",
            f"train.log_every={log_every}",
            f"train.checkpoint_every={steps}",
            f"train.threads={threads}",
            *overrides,
        ],
        workdir,
    )
    env["OMP_NUM_THREADS"] = str(threads)
    if procs == 1:
        cmd = [sys.executable, "-m", "cellmi", "train"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            "-m",
            "cellmi",
            "train",
        ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{procs}-process training failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (workdir / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    settings = json.loads((workdir / "checkpoints" / f"step_{steps:06d}.json").read_text())["settings"]
    crops_per_step = settings["train"]["batch_samples"] * settings["train"]["fields_per_sample"] * procs
    rate = (last["step"] - first["step"]) * crops_per_step / (last["time_s"] - first["time_s"])
    return {
        "processes": procs,
        "threads": threads,
        "steps": steps,
        "crops_per_step": crops_per_step,
        "crops_per_s": round(rate, 1),
        "wall_s": round(wall, 1),
        "loss_first": first["loss"],
        "loss_last": last["loss"],
    }


def _variant_globals(encoder, x: torch.Tensor, pool: str, trunk_norm: bool) -> torch.Tensor:
    """Global vectors of an untrained encoder with max/mean pooling, optionally batch-norm after each conv."""
    h = x
    for layer in encoder.trunk:
        h = layer(h)
        if trunk_norm and isinstance(layer, torch.nn.Conv2d):
            h = torch.nn.functional.batch_norm(
                h, None, None, training=True
            )  # batch statistics, as in training
    pooled = h.mean(dim=(2, 3)) if pool == "mean" else h.amax(dim=(2, 3))
    return encoder.head(pooled)


def pooling_probe(crops: int = 512, seeds: int = 3) -> dict:
    """How much crop intensity and foreground share a linear probe reads from global vectors (CV R^2).

    Untrained encoders of the default architecture, four variants: mean or max pooling, with or
    without batch-norm in the trunk. Crops as training draws them (no augmentation), batches of 32.
    """
    import numpy as np
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import cross_val_score

    from cellmi.model import build_encoder
    from cellmi.settings import Settings
    from cellmi.store import open_store
    from cellmi.train.data import CropLoader

    torch.set_num_threads(1)
    settings = Settings(train={"augment": False, "batch_samples": 8, "fields_per_sample": 4})
    store = open_store(str(WORK / "store.zarr"))
    loader = CropLoader(store, settings.train, settings.model.crop)
    batches = [loader.batch(step) for step in range(crops // 32)]
    loader.close()
    x = [b.images.flatten(0, 1) for b in batches]
    masks = torch.cat([b.masks.flatten(0, 1) for b in batches]).float()
    raw = torch.cat(x)  # normalised log intensity; its mean over the crop is the intensity target
    targets = {
        "intensity": raw.mean(dim=(2, 3)).numpy(),
        "foreground": masks.mean(dim=(1, 2)).numpy()[:, None],
    }
    arch = {
        "in_channels": 3,
        "width": settings.model.width,
        "local_dim": settings.model.local_dim,
        "global_dim": settings.model.global_dim,
        "crop": settings.model.crop,
    }
    out = {}
    for pool in ("mean", "max"):
        for norm in (False, True):
            name = f"{pool} pool{', batch-norm trunk' if norm else ''}"
            scores = {k: [] for k in targets}
            for seed in range(seeds):
                encoder = build_encoder(arch, seed)
                with torch.no_grad():
                    feats = torch.cat([_variant_globals(encoder, xb, pool, norm) for xb in x]).numpy()
                for key, target in targets.items():
                    r2 = [
                        cross_val_score(
                            RidgeCV(alphas=np.logspace(-3, 3, 13)), feats, target[:, c], cv=5
                        ).mean()
                        for c in range(target.shape[1])
                    ]
                    scores[key].append(float(np.mean(r2)))
            out[name] = {k: round(float(np.mean(v)), 3) for k, v in scores.items()}
    return out


# ---------------------------------------------------------------- input pipeline
def screen_store() -> Path:
    """The default synthetic screen (``cellmi synth``), made once."""
    workdir = INPUT / "screen"
    if not (workdir / "store.zarr" / "zarr.json").exists():
        subprocess.run([sys.executable, "-m", "cellmi", "synth"], env=clean_env([], workdir), check=True,
                       capture_output=True)
    return workdir


def field_set(name: str, samples: int, fields: int, shape: tuple[int, int]) -> Path:
    """A store of ``samples`` training samples x ``fields`` fields of ``shape``, cut from the screen's fields
    (so the pixels, masks and intensity statistics are the synthetic screen's), made once."""
    from cellmi.store import StoreMeta, StoreWriter, open_store

    workdir = INPUT / name
    url = workdir / "store.zarr"
    if (url / "zarr.json").exists():
        return workdir
    source = open_store(str(screen_store() / "store.zarr"))
    images = source.meta.images()
    ids = [f"s{i:04d}" for i in range(samples)]
    meta = StoreMeta(channels=list(source.meta.channels), fields={s: [str(f + 1) for f in range(fields)] for s in ids},
                     split=dict.fromkeys(ids, "train"), shape=shape, stats=source.meta.stats,
                     intensity=source.meta.intensity, pedestal=source.meta.pedestal)
    writer = StoreWriter(str(url), meta, overwrite=True)
    for k, (sample, field) in enumerate((s, str(f + 1)) for s in ids for f in range(fields)):
        at = images[k % len(images)]
        y = (k // len(images)) % (source.meta.shape[0] - shape[0] + 1)  # another cut on each pass over the screen
        pixels, mask = source.read_image(*at), source.read_mask(*at)
        writer.write_image(sample, field, pixels[:, y : y + shape[0], : shape[1]], mask[y : y + shape[0], : shape[1]])
    writer.finish()
    return workdir


def old_loader(ref: str) -> types.ModuleType | None:
    """cellmi/train/data.py of commit ``ref`` as a module, or None without git or that commit."""
    done = subprocess.run(["git", "show", f"{ref}:cellmi/train/data.py"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)
    if done.returncode:
        return None
    path = INPUT / f"data_{ref}.py"
    path.write_text(done.stdout)
    spec = importlib.util.spec_from_file_location(f"cellmi_data_{ref}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(trainer, batches, settings, dist, steps: int) -> tuple[float, float]:
    """Wall seconds of ``steps`` training steps on ``batches`` and the seconds spent waiting for them."""
    from cellmi.train.step import train_step

    _sync(dist.device)
    wait, start = 0.0, time.perf_counter()
    for _ in range(steps):
        asked = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - asked
        train_step(trainer, batch, settings.train, dist)
    _sync(dist.device)
    return time.perf_counter() - start, wait


class Contender:
    """One way of feeding the step loop: a loader (shared by contenders that differ only in torch threads),
    its batch stream, a trainer, and the time it has been given so far."""

    def __init__(self, name: str, settings, loader, batches, threads: int, dist, info: dict) -> None:
        from cellmi.train.state import build_trainer

        self.name, self.settings, self.loader, self.batches, self.threads = name, settings, loader, batches, threads
        self.info = info  # what to report beside the rates
        self.trainer = build_trainer(settings, len(loader.store.meta.channels), dist.device)
        self.fixed = None
        self.wall = self.stepping = self.wait = self.fixed_wall = 0.0
        self.steps = 0

    def drain(self) -> None:
        """Wait for the batches its loader is making ahead (one loader thread): they are its own work."""
        self.loader._pool.submit(lambda: None).result()

    def run(self, steps: int, dist) -> None:
        """``steps`` steps on the stream, then the same on one batch held fixed (the compute alone)."""
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        stepping, wait = _steps(self.trainer, self.batches, self.settings, dist, steps)
        self.drain()
        self.wall += time.perf_counter() - start
        self.stepping += stepping
        self.wait += wait
        self.steps += steps
        self.fixed = self.fixed or next(self.batches)
        self.fixed_wall += _steps(self.trainer, itertools.repeat(self.fixed), self.settings, dist, steps)[0]

    def result(self) -> dict:
        cfg = self.settings.train
        crops = self.steps * cfg.batch_samples * cfg.fields_per_sample
        return {
            "crops_per_s": round(crops / self.wall, 1),
            "busy": round(1 - self.wait / self.stepping, 3),  # of the loop itself, as metrics.jsonl has it
            "compute_crops_per_s": round(crops / self.fixed_wall, 1),
            "vs_compute": round(self.fixed_wall / self.wall, 3),
        }


def race(contenders: list[Contender], rounds: int, chunk: int, warmup: int, dist) -> None:
    """Rounds of ``chunk`` steps per contender, in a rotating order, so that a machine whose load changes
    over minutes (shared cores) weighs on all of them alike."""
    for contender in contenders:
        contender.run(warmup, dist)
        contender.wall = contender.stepping = contender.wait = contender.fixed_wall = 0.0
        contender.steps = 0
    for r in range(rounds):
        for contender in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            contender.run(chunk, dist)


def make_loaders(store, cfg, crop: int, old, shards, device: torch.device) -> tuple[dict, dict]:
    """The loaders to race, by name, and the seconds each took to start: this checkout's ("new"), the old
    one when given, and this checkout's with the shard settings ``shards`` when given."""
    from cellmi.train.data import CropLoader

    made, prepare = {}, {}
    todo = [("new", cfg)] + ([("old", cfg)] if old is not None else []) + ([("new, shards", shards)] if shards else [])
    for name, settings in todo:
        started = time.perf_counter()
        if name == "old":
            shim = types.SimpleNamespace(**settings.model_dump(), cache_fields=64)
            made[name] = old.CropLoader(store, shim, crop, 0, 1, 1)
        else:
            made[name] = CropLoader(store, settings, crop, 0, 1, settings.loader_threads or 1, device)
        prepare[name] = round(time.perf_counter() - started, 1)
    return made, prepare


def input_runs(args) -> list[dict]:
    """Per batch shape, every store's contenders raced against each other (so "500 against 50 fields" is
    measured under the same load as "new against old"); then the sharded loader alone."""
    from cellmi.hardware import cores
    from cellmi.model import build_encoder
    from cellmi.store import open_store
    from cellmi.train.distributed import DistInfo
    from cellmi.train.loop import intra_op_threads
    from cellmi.train.state import model_arch
    from cellmi.train.step import batch_layout

    device = torch.device(args.device)
    dist = DistInfo(0, 1, 0, 1, device)
    old = old_loader(args.old_ref) if device.type == "cpu" else None
    stores = {"screen": screen_store()}
    if device.type == "cpu":
        stores.update(fields50=field_set("fields50", 10, 5, (384, 512)),
                      fields500=field_set("fields500", 100, 5, (384, 512)))
    old_threads = max(1, cores() - 1)  # the old default: a core kept back for the loader thread
    runs = []
    for n, size in itertools.product(args.input_n, args.sizes):
        contenders, alone, loaders = [], [], []
        for set_name, workdir in stores.items():
            store = open_store(str(workdir / "store.zarr"))
            settings = settings_for([f"train.fields_per_sample={n}", f"model.size={size}", *args.set], workdir)
            threads = intra_op_threads(settings.train.threads, dist)
            shards = None
            if set_name == "fields500":
                shards = settings_for([f"train.fields_per_sample={n}", f"model.size={size}", "train.memory_gb=0.5",
                                       *args.set], workdir).train
            made, prepare = make_loaders(store, settings.train, settings.model.crop, old, shards, device)
            loaders += made.values()
            # the old loader's batches are laid out in the step, as they were then
            encoder = build_encoder(model_arch(settings, len(store.meta.channels)), 0)
            layout = batch_layout(encoder, settings.train, device)
            streams = {name: loader.batches(0, None if name == "old" else layout) for name, loader in made.items()}
            entries = [("new", "new", threads)] + ([("old", "old", old_threads)] if "old" in made else [])
            if device.type == "cpu" and threads != old_threads:
                entries.append(("new, old threads", "new", old_threads))
            info = {"store": set_name, "fields": len(store.meta.images("train")), "n": n, "size": size,
                    "crops_per_step": settings.train.batch_samples * n}
            for name, loader, count in entries:
                contenders.append(Contender(name, settings, made[loader], streams[loader], count, dist,
                                            {**info, "prepare_s": prepare[loader]}))
            if "new, shards" in made:  # alone: its background loads would slow the others
                alone.append(Contender("new, shards", settings, made["new, shards"], streams["new, shards"],
                                       threads, dist, {**info, "prepare_s": prepare["new, shards"]}))
        race(contenders, args.rounds, args.chunk, args.warmup, dist)
        for contender in alone:
            race([contender], args.rounds, args.chunk, args.warmup, dist)
        for loader in loaders:
            loader.close()
        for contender in contenders + alone:
            run = {**contender.result(), **contender.info, "loader": contender.name, "torch_threads": contender.threads}
            print(json.dumps(run), flush=True)
            runs.append(run)
    return runs


def input_ratios(runs: list[dict]) -> dict:
    """The targets of issue 15 as ratios: new over old on each store, 500 over 50 fields."""
    rate = {(r["store"], r["loader"], r["n"], r["size"]): r["crops_per_s"] for r in runs}
    out = {}
    for (store, loader, n, size), value in rate.items():
        old = rate.get((store, "old", n, size))
        if loader != "old" and old:
            out[f"{loader} / old, {store}, N={n}, {size}"] = round(value / old, 2)
        small = rate.get(("fields50", loader, n, size))
        if store == "fields500" and small:
            out[f"500 / 50 fields, {loader}, N={n}, {size}"] = round(value / small, 2)
    return out


def input_table(section: dict) -> str:
    rows = [
        "| store | training fields | loader | N | size | crops/step | torch threads | crops/s | busy "
        "| vs compute | compute crops/s | prepare (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["runs"]:
        rows.append(
            f"| {r['store']} | {r['fields']} | {r['loader']} | {r['n']} | {r['size']} | {r['crops_per_step']} "
            f"| {r['torch_threads']} | {r['crops_per_s']:.0f} | {r['busy'] * 100:.0f}% | {r['vs_compute'] * 100:.0f}% "
            f"| {r['compute_crops_per_s']:.0f} | {r['prepare_s']:.1f} |"
        )
    rows += ["", "| ratio | value |", "|---|---|"]
    rows += [f"| {name} | {value:.2f}x |" for name, value in section["ratios"].items()]
    rows.append("")
    rows.append(f"Device: {section['device']}; {section['rounds']} rounds of {section['chunk']} steps per "
                f"contender, in turn, after {section['warmup']} untimed.")
    return "\n".join(rows)


def table(report: dict) -> str:
    parts = []
    if "input" in report:
        parts.append(input_table(report["input"]))
    if "runs" in report:
        parts.append(layout_table(report))
    probe = report.get("pooling_probe_r2")
    if probe:
        rows = ["| untrained encoder variant | R^2 crop intensity | R^2 foreground share |", "|---|---|---|"]
        rows += [f"| {name} | {v['intensity']:.2f} | {v['foreground']:.2f} |" for name, v in probe.items()]
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def layout_table(report: dict) -> str:
    rows = [
        "| processes x threads | crops/step | crops/s | GFLOP/s achieved | % of matmul peak "
        "| loss first -> last |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        rows.append(
            f"| {run['processes']} x {run['threads']} | {run['crops_per_step']} | {run['crops_per_s']:.0f} | "
            f"{run['achieved_gflops']:.1f} | {run['peak_fraction'] * 100:.0f}% | "
            f"{run['loss_first']:.3f} -> {run['loss_last']:.3f} |"
        )
    model = report["model"]
    rows.append("")
    rows.append(
        f"FLOPs per crop (train step): {report['gflop_per_crop'] * 1000:.0f} MFLOP; crop {model['crop']}, "
        f"width {model['width']}, B={model['batch_samples']} x N={model['fields_per_sample']}; "
        f"matmul peak {report['matmul_peak_gflops']:.1f} GFLOP/s ({report['machine']['cpus']} cores)"
    )
    return "\n".join(rows)


def layouts(args) -> dict:
    """``cellmi train`` as 1 and 2 processes: crops/s, achieved FLOP/s against the matmul peak."""
    make_store()
    peaks = machine_peak(os.cpu_count() or 1)
    peak = peaks["peak"]
    flops, model = flops_per_crop(args.set)
    runs = []
    for layout in args.layouts:
        procs, threads = (int(v) for v in layout.split("x"))
        tries = [train_rate(procs, threads, args.steps, args.set) for _ in range(args.repeats)]
        run = max(tries, key=lambda r: r["crops_per_s"])  # the machine is shared: best of the repeats
        run["crops_per_s_all"] = [r["crops_per_s"] for r in tries]
        run["achieved_gflops"] = round(flops * run["crops_per_s"] / 1e9, 2)
        run["peak_fraction"] = round(run["achieved_gflops"] / peak, 3)
        runs.append(run)
    return {"matmul_peak_gflops": round(peak, 1), "matmul_peaks": peaks, "gflop_per_crop": round(flops / 1e9, 4),
            "model": model, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["input", "layouts", "probe"],
                        default=["input", "layouts", "probe"])
    parser.add_argument("--steps", type=int, default=60, help="steps of each layout run")
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["1x2", "1x1", "2x1"],
        help="PROCESSESxTHREADS runs (default: 1x2 1x1 2x1)",
    )
    parser.add_argument("--set", action="append", default=[], help="section.field=value override")
    parser.add_argument("--repeats", type=int, default=2, help="runs per layout or input run; the best is reported")
    parser.add_argument("--device", default="cpu", help="device of the input runs: cpu or cuda")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the input race")
    parser.add_argument("--chunk", type=int, default=5, help="steps per contender and round of the input race")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each contender before the race")
    parser.add_argument("--input-n", type=int, nargs="+", default=[4], help="fields per sample (N) of the input runs")
    parser.add_argument("--sizes", nargs="+", default=["base"], help="model.size of the input runs")
    parser.add_argument("--old-ref", default=OLD_REF, help="commit whose loader is 'old'")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    INPUT.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": {
            "cpus": os.cpu_count() or 1,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "settings": args.set,
    }
    if "input" in args.parts:
        runs = input_runs(args)
        report["input"] = {"device": report["machine"]["gpu"] or args.device, "rounds": args.rounds,
                           "chunk": args.chunk, "warmup": args.warmup, "runs": runs, "ratios": input_ratios(runs)}
    if "layouts" in args.parts:
        report.update(layouts(args))
    if "probe" in args.parts:
        report["pooling_probe_r2"] = pooling_probe()
    tag = f"-{args.tag}" if args.tag else ""
    (OUT / f"train{tag}.json").write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
