"""Inference speed: shared map vs naive, Dask vs one process, S3 (moto) vs local disk, scaling with
workers over many fields, and (with ``--device cuda``) the GPU path.

    python benchmarks/bench_infer.py                    # 8 synthetic 512 px fields + 512 fields of 384 px for scaling
    python benchmarks/bench_infer.py --samples 2 --fields 2 --size 256 --scaling-fields 64   # a quick look
    python benchmarks/bench_infer.py --only scaling gpu --device cuda       # on a GPU machine (see docs/performance.md)

All numbers come from one run on this machine; the encoder is untrained (speed does not depend
on the weights) with the default architecture (256 px crop). Scaling: ``--scaling-fields`` fields
(16 synthetic ones repeated) of ``--scaling-size`` px, every window kept, embedded by 1, 2, 4, ...
Dask workers (up to the cores; warm: workers started and models loaded first); parallel
efficiency at W workers = fields/s at W / (W x fields/s at 1), and the per-task overhead is the
1-worker time per field minus the in-process time per field. GPU: one worker with the resource
GPU=1 gets batches of ``infer.gpu_fields`` fields (prepared on the worker's cores, embedded in
bf16); reported as fields/s for the whole task and for the encoders alone, and the largest
relative difference of bf16 GPU vectors from float32 CPU vectors. Writes benchmarks/out/infer.json
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
MODES = ("shared", "naive")


def make_run(workdir: str, samples: int, fields: int, size: int) -> None:
    """A synthetic store (real generator, GMM masks) and an untrained default-architecture checkpoint."""
    from cellmi.data.synth_job import synth_store
    from cellmi.model import build_encoder
    from cellmi.settings import Settings
    from cellmi.store import join
    from cellmi.train.checkpoint import CHECKPOINT_KEYS, FORMAT, save_checkpoint

    settings = Settings(
        workdir=workdir,
        synth={"samples": samples, "fields": fields, "size": size},
        ingest={"n_test": 1, "workers": 2},
    )
    synth_store(settings, join(workdir, "store.zarr"))
    model = settings.model
    arch = {
        "in_channels": 3,
        "width": model.width,
        "local_dim": model.local_dim,
        "global_dim": model.global_dim,
        "crop": model.crop,
    }
    state = {key: {} for key in CHECKPOINT_KEYS}
    state.update(
        format=FORMAT,
        arch=arch,
        encoder=build_encoder(arch, 1).state_dict(),
        step=1,
        stop_reason="benchmark",
        settings={"model": model.model_dump()},
        channels=["DNA", "pH3", "actin"],
        train_seconds=0.0,
    )
    save_checkpoint(join(workdir, "checkpoints"), state, 1, keep=1)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def encode_all(embed, model, pixels: list, corners, window: int) -> list:
    return [embed(model, p, corners, window, 64) for p in pixels]


def settings_for(workdir: str, **infer):
    from cellmi.settings import Settings

    return Settings(workdir=workdir, force=True, infer={"workers": 2, **infer})


def interleaved(repeats: int, runs: dict) -> dict[str, float]:
    """Fastest of a few runs of each, taking turns, so a busy spell on a shared machine hits all alike."""
    times = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, (fn, *args) in runs.items():
            times[name] = min(times[name], timed(fn, *args)[0])
    return times


def shared_vs_naive(workdir: str, threads: int, fields: int = 4) -> list[dict]:
    """Fields/s in one process: the whole task (DIM + random + hand-crafted) and the DIM encoder alone."""
    import torch

    from cellmi.infer.embed import embed_naive, embed_shared
    from cellmi.infer.job import compute_in_process, make_plan
    from cellmi.infer.task import load_models
    from cellmi.infer.windows import window_grid
    from cellmi.store import open_store

    torch.set_num_threads(threads)
    rows = []
    window = make_plan(settings_for(workdir)).job.window
    for divisor in (2, 4):
        stride = window // divisor
        plans = {
            m: make_plan(settings_for(workdir, stride=stride, mode=m, keep_background=True)) for m in MODES
        }
        job, some = plans["shared"].job, plans["shared"].fields[:fields]
        store = open_store(job.store)
        model = load_models(job.checkpoint, job.checkpoint_sha256, 0).dim
        pixels = [store.normalise(store.read_image(s, f)) for s, f in some]
        corners = window_grid(store.meta.shape, window, stride)
        compute_in_process(job, some[:1], threads)  # warm-up: model load, allocator
        times = interleaved(
            3,
            {
                **{f"{m}_task": (compute_in_process, plans[m].job, some, threads) for m in MODES},
                "shared_encoder": (encode_all, embed_shared, model, pixels, corners, window),
                "naive_encoder": (encode_all, embed_naive, model, pixels, corners, window),
            },
        )
        row = {"stride": stride, "window": window, "windows_per_field": len(corners), "fields": len(some)}
        row.update({f"{k}_fields_per_s": len(some) / v for k, v in times.items()})
        row["task_speedup"] = times["naive_task"] / times["shared_task"]
        row["encoder_speedup"] = times["naive_encoder"] / times["shared_encoder"]
        rows.append(row)
    return rows


def dask_vs_process(workdir: str) -> dict:
    """2 single-thread Dask workers vs one process with 2 torch threads, stride window/2, shared map."""
    import logging

    from distributed import Client, LocalCluster

    from cellmi.infer.fanout import compute_parts
    from cellmi.infer.job import compute_in_process, make_plan, run_inference, run_key
    from cellmi.infer.parts import prepare_parts
    from cellmi.store import remove

    plan = make_plan(settings_for(workdir))
    compute_in_process(plan.job, plan.fields[:1], 2)
    groups = [[f] for f in plan.fields]

    def on_dask(client: Client) -> None:
        remove(plan.job.parts)
        prepare_parts(plan.job.parts, run_key(plan))
        compute_parts(client, plan.job, groups, 0)

    start_s, cluster = timed(
        LocalCluster,
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    with cluster, Client(cluster) as client:
        cold, _ = timed(on_dask, client)  # each worker imports torch and loads the models
        times = interleaved(
            2, {"in_process": (compute_in_process, plan.job, plan.fields, 2), "dask_warm": (on_dask, client)}
        )
        remove(plan.job.parts)
    in_process, runs = times["in_process"], [cold, times["dask_warm"]]
    end_to_end, _ = timed(run_inference, settings_for(workdir))
    n = len(plan.fields)
    return {
        "fields": n,
        "in_process_2_threads_fields_per_s": n / in_process,
        "dask_2x1_cold_fields_per_s": n / runs[0],
        "dask_2x1_warm_fields_per_s": n / runs[1],
        "dask_warm_speedup": in_process / runs[1],
        "cluster_start_s": start_s,
        "end_to_end_cellmi_infer_s": end_to_end,
    }


def read_all(store, fields: list) -> list:
    return [(store.read_image(s, f), store.read_mask(s, f)) for s, f in fields]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_vs_local(workdir: str, samples: int, fields: int, size: int) -> dict:
    """Reading every field (pixels + mask) and the in-process task, from moto S3 and from local disk."""
    import boto3
    from moto.server import ThreadedMotoServer

    from cellmi.infer.job import compute_in_process, make_plan
    from cellmi.store import open_store

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        s3_workdir = "s3://bench/run"
        make_run(s3_workdir, samples, fields, size)
        plans = {"local": make_plan(settings_for(workdir)), "s3": make_plan(settings_for(s3_workdir))}
        stores = {k: open_store(p.job.store) for k, p in plans.items()}
        for plan in plans.values():
            compute_in_process(plan.job, plan.fields[:1], 2)
        times = interleaved(
            2,
            {
                **{f"{k}_read": (read_all, stores[k], p.fields) for k, p in plans.items()},
                **{f"{k}_task": (compute_in_process, p.job, p.fields, 2) for k, p in plans.items()},
            },
        )
        n = len(plans["local"].fields)
        out = {f"{k}_fields_per_s": n / v for k, v in times.items()}
        out["read_slowdown_s3"] = times["s3_read"] / times["local_read"]
        return out
    finally:
        server.stop()


def scaling_run(workdir: str, base: str, fields: int, size: int) -> None:
    """A run folder of ``fields`` fields: the 16 fields of ``base`` (its store and checkpoint) repeated."""
    from cellmi.store import StoreMeta, StoreWriter, open_store

    source = open_store(join_path(base, "store.zarr"))
    images = source.meta.images("all")
    samples = sorted({s for s, _ in images})
    per_sample = -(-fields // len(samples))
    meta = StoreMeta.from_json(
        {**source.meta.to_json(), "fields": {s: [str(f + 1) for f in range(per_sample)] for s in samples}}
    )
    writer = StoreWriter(join_path(workdir, "store.zarr"), meta)
    cache = {}
    for sample in samples:
        own = [f for s, f in images if s == sample]
        for f in range(per_sample):
            key = (sample, own[f % len(own)])
            if key not in cache:
                cache[key] = (source.read_image(*key), source.read_mask(*key))
            writer.write_image(sample, str(f + 1), *cache[key])
    writer.finish()
    shutil.copytree(join_path(base, "checkpoints"), join_path(workdir, "checkpoints"))


def join_path(*parts: str) -> str:
    from cellmi.store import join

    return join(*parts)


def warm_cluster(workers: int, gpu: bool = False):
    import logging

    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
        resources={"GPU": 1} if gpu else None,
    )


def process_cpu() -> float:
    """User + system CPU seconds of this process so far (run on each worker by the client)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fields_per_second(client, plan, groups: list, job=None) -> tuple[float, float]:
    """One pass over ``groups`` (fresh parts) on a warm cluster: fields/s, and the workers' CPU
    milliseconds per field (robust to other users of a shared machine, unlike the wall clock)."""
    from cellmi.infer.fanout import compute_parts
    from cellmi.infer.job import run_key
    from cellmi.infer.parts import prepare_parts
    from cellmi.store import remove

    job = job or plan.job
    warm = groups[: len(client.scheduler_info()["workers"])]  # each worker loads the models once
    for batch in (warm, groups):
        remove(job.parts)
        prepare_parts(job.parts, run_key(plan))
        before = client.run(process_cpu)
        seconds, _ = timed(compute_parts, client, job, batch, 0)
        after = client.run(process_cpu)
    remove(job.parts)
    fields = sum(len(g) for g in groups)
    return fields / seconds, 1000 * sum(after[w] - before.get(w, 0.0) for w in after) / fields


def scaling(workdir: str, worker_counts: list[int], per_task: int, per_worker: int = 0) -> dict:
    """Warm fields/s with 1, 2, 4, ... workers (``per_task`` fields a task; 0: as `cellmi infer` picks),
    parallel efficiency, and the overhead of a task on a worker over the same work in one process.

    ``per_worker``: W workers embed ``per_worker * W`` of the fields (0: all of them for every W), so
    that a many-core machine measures its small W quickly."""
    from distributed import Client
    from threadpoolctl import threadpool_limits

    from cellmi.infer.job import _groups, compute_in_process, make_plan, task_shape

    settings = settings_for(workdir, keep_background=True, device="cpu", fields_per_task=per_task)
    plan = make_plan(settings)
    sample = plan.fields[:16]
    with threadpool_limits(1):  # as on a Dask worker (its nanny sets one BLAS/OpenMP thread)
        compute_in_process(plan.job, sample[:1], 1)
        start = process_cpu()
        in_process, _ = timed(compute_in_process, plan.job, sample, 1)
        in_process_cpu = process_cpu() - start
    rows = []
    for workers in worker_counts:
        fields = plan.fields[: per_worker * workers] if per_worker else plan.fields
        with warm_cluster(workers) as cluster, Client(cluster) as client:
            size = task_shape(settings, plan.job, client, len(fields))[1]
            row = {"workers": workers, "fields": len(fields), "fields_per_task": size}
            row["fields_per_s"], row["cpu_ms_per_field"] = fields_per_second(client, plan, _groups(fields, size))
            if workers == 1:
                _, row["one_field_a_task_cpu_ms_per_field"] = fields_per_second(client, plan, _groups(fields, 1))
        rows.append(row)
    one = rows[0]["fields_per_s"]
    for row in rows:
        row["efficiency"] = row["fields_per_s"] / (row["workers"] * one)
    return {
        "fields": len(plan.fields),
        "shape": list(plan.meta.shape),
        "windows_per_field": len(window_grid_of(plan)),
        "in_process_ms_per_field": 1000 * in_process / len(sample),
        "in_process_cpu_ms_per_field": 1000 * in_process_cpu / len(sample),
        "rows": rows,
    }


def window_grid_of(plan):
    from cellmi.infer.windows import window_grid

    return window_grid(plan.meta.shape, plan.job.window, plan.job.stride)


def gpu(workdir: str, gpu_fields: int) -> dict:
    """The batched path on one GPU worker; the encoders alone on the GPU; bf16 GPU vs float32 CPU vectors.

    Without CUDA the same code runs on the CPU in float32 (a dry run of this part of the script).
    """
    from dataclasses import replace

    import numpy as np
    import torch
    from distributed import Client

    from cellmi.infer.embed import embed_batch
    from cellmi.infer.job import _groups, make_plan
    from cellmi.infer.task import compute_device, load_models
    from cellmi.store import open_store

    plan = make_plan(settings_for(workdir, keep_background=True))
    job = replace(plan.job, batched=True)
    with warm_cluster(1, gpu=True) as cluster, Client(cluster) as client:
        whole, _ = fields_per_second(client, plan, _groups(plan.fields, gpu_fields), job)
    store = open_store(job.store)
    some = plan.fields[:gpu_fields]
    norm = np.stack([store.normalise(store.read_image(s, f), store.read_mask(s, f)) for s, f in some])
    corners = [window_grid_of(plan)] * len(some)
    device, precision = compute_device(job)
    cpu = load_models(job.checkpoint, job.checkpoint_sha256, 0).dim
    model = load_models(job.checkpoint, job.checkpoint_sha256, 0, device.type).dim
    pixels = torch.from_numpy(norm).to(device)

    def encode() -> list:
        out = embed_batch(model, pixels, corners, job.window, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    encode()  # warm-up: kernels, allocator
    passes = 5
    seconds, _ = timed(lambda: [encode() for _ in range(passes)])
    half = encode()
    exact = embed_batch(cpu, torch.from_numpy(norm), corners, job.window)
    gaps = [np.linalg.norm(h - e, axis=1) / np.linalg.norm(e, axis=1) for h, e in zip(half, exact, strict=True)]
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (no CUDA: dry run)",
        "fields": len(plan.fields),
        "gpu_fields": gpu_fields,
        "whole_task_fields_per_s": whole,
        "dim_encoder_only_fields_per_s": passes * len(some) / seconds,
        "bf16_vs_float32_max_relative_error": float(np.concatenate(gaps).max()),
    }


def table(report: dict) -> str:
    lines = ["| measurement | value |", "|---|---|"]
    for row in report.get("shared_vs_naive", []):
        s = f"stride {row['stride']} ({row['windows_per_field']} windows/field)"
        lines += [
            f"| {s}: shared map, whole task | {row['shared_task_fields_per_s']:.2f} fields/s |",
            f"| {s}: naive, whole task | {row['naive_task_fields_per_s']:.2f} fields/s |",
            f"| {s}: shared / naive, whole task | {row['task_speedup']:.1f}x |",
            f"| {s}: shared / naive, DIM encoder only | {row['encoder_speedup']:.1f}x |",
        ]
    lines += scaling_lines(report)
    if "dask_vs_process" not in report:
        return "\n".join(lines)
    d = report["dask_vs_process"]
    lines += [
        f"| one process, 2 torch threads | {d['in_process_2_threads_fields_per_s']:.2f} fields/s |",
        f"| Dask LocalCluster 2 x 1 thread, cold | {d['dask_2x1_cold_fields_per_s']:.2f} fields/s |",
        f"| Dask LocalCluster 2 x 1 thread, warm | {d['dask_2x1_warm_fields_per_s']:.2f} fields/s |",
        f"| Dask warm / one process | {d['dask_warm_speedup']:.2f}x |",
        f"| LocalCluster start-up | {d['cluster_start_s']:.1f} s |",
        f"| `cellmi infer` end to end ({d['fields']} fields) | {d['end_to_end_cellmi_infer_s']:.1f} s |",
    ]
    s3 = report["s3_vs_local"]
    lines += [
        f"| read field + mask, local disk | {s3['local_read_fields_per_s']:.1f} fields/s |",
        f"| read field + mask, S3 (moto on loopback) | {s3['s3_read_fields_per_s']:.1f} fields/s |",
        f"| whole task from local / from S3 | {s3['local_task_fields_per_s']:.2f} / "
        f"{s3['s3_task_fields_per_s']:.2f} fields/s |",
    ]
    return "\n".join(lines)


def scaling_lines(report: dict) -> list[str]:
    lines = []
    sc = report.get("scaling")
    if sc:
        where = f"fields of {sc['shape'][0]}x{sc['shape'][1]} px, {sc['windows_per_field']} windows each"
        for row in sc["rows"]:
            lines.append(
                f"| {row['workers']} Dask worker(s), {row['fields']} {where}, {row['fields_per_task']} a task | "
                f"{row['fields_per_s']:.2f} fields/s, parallel efficiency {row['efficiency']:.2f}, "
                f"{row['cpu_ms_per_field']:.0f} CPU ms/field |"
            )
        first = sc["rows"][0]
        lines += [
            f"| CPU ms per field: one process / 1 worker, 1 field a task / 1 worker, "
            f"{first['fields_per_task']} fields a task | {sc['in_process_cpu_ms_per_field']:.0f} / "
            f"{first['one_field_a_task_cpu_ms_per_field']:.0f} / {first['cpu_ms_per_field']:.0f} |"
        ]
    g = report.get("gpu")
    if g:
        lines += [
            f"| GPU ({g['device']}), 1 worker, batches of {g['gpu_fields']}: whole task | "
            f"{g['whole_task_fields_per_s']:.1f} fields/s |",
            f"| GPU, DIM encoder alone (bf16) | {g['dim_encoder_only_fields_per_s']:.1f} fields/s |",
            f"| bf16 GPU vs float32 CPU vectors, largest relative difference | "
            f"{g['bf16_vs_float32_max_relative_error']:.4f} |",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--fields", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--scaling-fields", type=int, default=512)
    parser.add_argument("--scaling-size", type=int, default=384)
    parser.add_argument("--fields-per-task", type=int, default=0, help="0: as `cellmi infer` picks")
    parser.add_argument(
        "--fields-per-worker", type=int, default=0, help="W workers embed this many x W fields (0: all)"
    )
    parser.add_argument("--gpu-fields", type=int, default=32)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda adds the GPU part")
    parser.add_argument("--only", nargs="+", choices=("speed", "scaling", "gpu"), default=None)
    args = parser.parse_args()
    parts = set(args.only or ["speed", "scaling"] + (["gpu"] if args.device == "cuda" else []))
    from cellmi.infer.task import cores
    from cellmi.log import setup_logging

    setup_logging("WARNING")
    workdir = str(OUT / "infer-run")
    shutil.rmtree(workdir, ignore_errors=True)
    make_run(workdir, args.samples, args.fields, args.size)
    load_before = os.getloadavg()[0]
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "data": {"samples": args.samples, "fields": args.fields, "size": args.size},
    }
    if "speed" in parts:
        report["shared_vs_naive"] = shared_vs_naive(workdir, threads=2)
        report["dask_vs_process"] = dask_vs_process(workdir)
        report["s3_vs_local"] = s3_vs_local(workdir, args.samples, args.fields, args.size)
    if parts & {"scaling", "gpu"}:
        base, many = str(OUT / "infer-base"), str(OUT / "infer-many")
        for folder in (base, many):
            shutil.rmtree(folder, ignore_errors=True)
        make_run(base, 4, 4, args.scaling_size)
        scaling_run(many, base, args.scaling_fields, args.scaling_size)
        counts = [1] + [2**i for i in range(1, 8) if 2**i <= cores()]
        if "scaling" in parts:
            report["scaling"] = scaling(many, counts, args.fields_per_task, args.fields_per_worker)
        if "gpu" in parts:
            report["gpu"] = gpu(many, args.gpu_fields)
    # other users of a shared machine skew timings: record how busy it was
    report["machine"]["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "infer.json").write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
