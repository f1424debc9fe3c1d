"""Clustering at scale: placement of windows outside the UMAP subsample, and the whole `cellmi cluster`.

    python benchmarks/bench_cluster.py                                  # 1e4, 1e5, 1e6 + the job on 1e6
    python benchmarks/bench_cluster.py --sizes 10000 100000 --job-windows 100000   # a quicker look
    python benchmarks/bench_cluster.py --sizes 100000 --spread 0.5 0.7 --job-windows 0     # overlapping samples

Part 1 (placement), for each size: synthetic 64-d windows, one Gaussian blob per sample (14
samples, about 170 windows per field, as a 512 px field at stride 32 has), clustered as `cellmi
cluster` clusters one feature set with its default settings: UMAP fitted on a seeded subsample
of 4,000 above 20,000 windows and the Gaussian mixture on its embedding; the other windows
placed by nearest fitted windows (``knn``, the default: their cluster is the neighbours' vote)
and by UMAP's own ``transform`` (the mixture at the place); then the field vote and grouping.
``transform`` runs on every window up to ``--transform-cap`` windows, above that on the windows
of a seeded subset of whole fields (its time then scaled to all windows, marked "est.").
Agreement: ARI between the two placements' window clusters, and between their field-vote
labels, over the windows/fields both placed. ``--spread``: how far apart the samples' blobs are
(1.5: apart; 0.5-0.7: overlapping, the regime where placement decides many windows).

Part 2 (the job): a run folder with an image store (256 px fields, 64 px windows at stride 8:
625 windows a field) and representations of ``--job-windows`` windows with the three feature
sets, then ``cellmi cluster --cluster.split all`` in a fresh process (imports and numba
compilation included), timed as a whole (wall clock and CPU time of its processes) and by
stage (from its metrics.json; stages marked "apart" ran in the second process, beside DIM's).

A warm-up on 6,000 windows pays numba's compilation for part 1, reported apart. Writes
benchmarks/out/cluster.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from cellmi.analyze.job import fit_field_clusters
from cellmi.analyze.metrics import cluster_scores
from cellmi.analyze.mixture import assign, fit_mixture, most_probable, vote
from cellmi.analyze.profiles import field_profiles
from cellmi.analyze.reduce import embed, fit_reducer, place
from cellmi.settings import ClusterSettings

OUT = Path(__file__).resolve().parent / "out"
SAMPLES, DIM, WINDOWS_PER_FIELD = 14, 64, 170
JOB_FIELD, JOB_WINDOW, JOB_STRIDE = 256, 64, 8


def windows(
    n: int, per_field: int = WINDOWS_PER_FIELD, seed: int = 0, spread: float = 1.5
) -> tuple[pd.DataFrame, np.ndarray]:
    """(n,) window table with sample/field/split/fg_fraction and (n, 64) float32 vectors, one blob per
    sample (centres ``spread`` x a standard normal, unit noise: 1.5 apart, 0.25 overlapping);
    about ``per_field`` windows per field (at least 4 fields per sample)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(SAMPLES, DIM)) * spread
    fields = max(4, round(n / (SAMPLES * per_field)))
    image = rng.integers(0, SAMPLES * fields, size=n)
    sample = image // fields
    x = centres[sample] + rng.normal(size=(n, DIM))
    table = pd.DataFrame(
        {
            "sample": np.array([f"S{s:02d}" for s in range(SAMPLES)], dtype=object)[sample],
            "field": (image % fields + 1).astype(str),
            "split": "test",
            "fg_fraction": rng.uniform(0.1, 1.0, size=n),  # the default profile weights windows by it
        }
    )
    return table, x.astype(np.float32)


@contextmanager
def timer(times: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - start, 2)


def field_subset(table: pd.DataFrame, cap: int, seed: int) -> np.ndarray:
    """Row indices of a seeded subset of whole fields holding at most ``cap`` windows (all when fewer)."""
    if len(table) <= cap:
        return np.arange(len(table))
    keys = table["sample"].astype(str) + "_" + table["field"].astype(str)
    codes, uniques = pd.factorize(keys)
    share = cap / len(table)
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(uniques))[: max(1, int(len(uniques) * share))]
    return np.flatnonzero(np.isin(codes, chosen))


def run_size(n: int, cfg: ClusterSettings, transform_cap: int, spread: float = 1.5) -> dict:
    table, x = windows(n, spread=spread)
    times: dict[str, float] = {}
    with timer(times, "umap_fit_s"):
        reducer = fit_reducer(
            x, cfg.umap_dim, cfg.neighbors, cfg.min_dist, cfg.seed, cfg.subsample_above, cfg.subsample_size
        )
    with timer(times, "mixture_s"):
        gmm = fit_mixture(reducer.fit_embedding, SAMPLES, cfg.seed)
        fitted = gmm.predict_proba(reducer.fit_embedding)
    with timer(times, "place_knn_s"):  # as `cellmi cluster`: the neighbours' vote gives the cluster
        _, proba = place(reducer, x, placement="knn", carry=fitted)
        labels, _ = most_probable(proba)
    subset = field_subset(table, transform_cap, cfg.seed)
    with timer(times, "place_umap_s"):
        labels_umap, _ = assign(gmm, embed(reducer, x[subset], placement="umap"))
    if len(subset) < n:
        times["place_umap_s"] = round(times["place_umap_s"] * n / len(subset), 1)
    with timer(times, "vote_profiles_s"):
        votes = vote(table, labels)
        fields, profiles = field_profiles(table, x, cfg.aggregate)
        fit_field_clusters(fields, profiles, cfg, SAMPLES, focus={})  # what `cellmi cluster` runs
    sub = table.iloc[subset]
    votes_knn, votes_umap = vote(sub, labels[subset]), vote(sub, labels_umap)
    times["total_s"] = round(sum(v for k, v in times.items() if k != "place_umap_s"), 2)
    return {
        "windows": n,
        "spread": spread,
        "fields": len(fields),
        "fitted_on": len(reducer.fit_rows),
        "transform_on": len(subset),
        **times,
        "knn_speedup": round(times["place_umap_s"] / max(times["place_knn_s"], 1e-3), 1),
        "ari_knn_vs_umap_windows": cluster_scores(labels_umap, labels[subset])["ari"],
        "ari_knn_vs_umap_fields": cluster_scores(votes_umap["cluster"], votes_knn["cluster"])["ari"],
        "window_ari": cluster_scores(table["sample"], labels)["ari"],
        "window_ari_umap": cluster_scores(sub["sample"], labels_umap)["ari"],
        "image_ari_vote": cluster_scores(votes["sample"], votes["cluster"])["ari"],
    }


# ---------------------------------------------------------------- part 2: the whole job
def job_store(url: str, fields: int) -> None:
    """An image store of 14 samples x ``fields`` fields of 256 px (bright discs; 4 distinct per sample)."""
    from cellmi.store import StoreMeta, StoreWriter

    rng = np.random.default_rng(0)
    ids = [f"S{s:02d}" for s in range(SAMPLES)]
    meta = StoreMeta(
        channels=["DNA", "pH3", "actin"],
        fields={s: [str(f + 1) for f in range(fields)] for s in ids},
        split={s: ("test" if i < 4 else "train") for i, s in enumerate(ids)},
        shape=(JOB_FIELD, JOB_FIELD),
        phenotypes={s: f"phenotype {i}" for i, s in enumerate(ids)},
        stats={"mean": [5.0, 5.0, 5.0], "std": [1.0, 1.0, 1.0]},
    )
    yy, xx = np.mgrid[:JOB_FIELD, :JOB_FIELD]
    writer = StoreWriter(url, meta)
    for i, sample in enumerate(ids):
        looks = []
        for _ in range(4):
            mask = np.zeros((JOB_FIELD, JOB_FIELD), bool)
            for cy, cx in rng.integers(0, JOB_FIELD, (20, 2)):
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= (8 + i) ** 2
            pixels = rng.poisson(100, (3, JOB_FIELD, JOB_FIELD)) + mask * 200 * (i + 1)
            looks.append((pixels.astype(np.uint16), mask))
        for f in range(fields):
            writer.write_image(sample, str(f + 1), *looks[f % 4])
    writer.finish()


def job_representations(store_url: str, fields: int, seed: int = 0):
    """Every window of every field (625 each): DIM blobs per sample, weaker ones for the baselines."""
    from cellmi.infer.handcrafted import feature_names
    from cellmi.infer.windows import window_grid
    from cellmi.representations import Representations
    from cellmi.store import open_store

    store = open_store(store_url)
    corners = window_grid((JOB_FIELD, JOB_FIELD), JOB_WINDOW, JOB_STRIDE)
    images = store.meta.images("all")
    n = len(images) * len(corners)
    rng = np.random.default_rng(seed)
    sample_of = np.repeat([int(s[1:]) for s, _ in images], len(corners))
    names = feature_names(store.meta.channels)
    widths = {"dim": DIM, "random": DIM, "handcrafted": len(names)}
    centres = {k: rng.normal(size=(SAMPLES, d)) for k, d in widths.items()}
    scale = {"dim": 1.5, "random": 0.3, "handcrafted": 0.5}
    features = {
        k: (c[sample_of] * scale[k] + rng.normal(size=(n, c.shape[1]))).astype(np.float32) for k, c in centres.items()
    }
    table = pd.DataFrame(
        {
            "sample": np.repeat([s for s, _ in images], len(corners)),
            "field": np.repeat([f for _, f in images], len(corners)),
            "split": np.repeat([store.meta.split[s] for s, _ in images], len(corners)),
            "y": np.tile(corners[:, 0], len(images)).astype(np.int32),
            "x": np.tile(corners[:, 1], len(images)).astype(np.int32),
            "fg_fraction": rng.uniform(0.1, 1.0, n).astype(np.float32),
            "background": np.zeros(n, bool),
        }
    )
    from cellmi.analyze.focus import field_focus

    focus: dict[str, dict[str, float]] = {}
    for (sample, field), score in field_focus(store, images).items():  # as inference records it
        focus.setdefault(sample, {})[field] = score
    attrs = {
        "focus": focus,
        "window": JOB_WINDOW,
        "stride": JOB_STRIDE,
        "store": store_url,
        "phenotypes": store.meta.phenotypes,
        "channels": store.meta.channels,
        "handcrafted_names": names,
        "checkpoint": "benchmark",
    }
    return Representations(table, features, attrs)


def run_job(workdir: Path, target: int) -> dict:
    """Write the run folder, then time `cellmi cluster --cluster.split all` in a fresh process."""
    from cellmi.representations import write_representations

    fields = max(1, round(target / (SAMPLES * ((JOB_FIELD - JOB_WINDOW) // JOB_STRIDE + 1) ** 2)))
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    job_store(str(workdir / "store.zarr"), fields)
    reps = job_representations(str(workdir / "store.zarr"), fields)
    write_representations(str(workdir / "representations.zarr"), reps)
    setup_s = time.perf_counter() - start
    command = [sys.executable, "-m", "cellmi", "cluster", "--workdir", str(workdir), "--cluster.split", "all"]
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    metrics = json.loads((workdir / "analysis" / "metrics.json").read_text())
    return {
        "windows": len(reps.table),
        "fields": SAMPLES * fields,
        "setup_s": round(setup_s, 1),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),  # both processes: on a busy machine the wall clock overstates
        "stages_s": metrics["timings_s"],
        "image_ari": metrics["dim"]["all"]["image_ari"],
        "window_ari": metrics["dim"]["all"]["window_ari"],
    }


# ---------------------------------------------------------------- tables
PLACEMENT_COLUMNS = [
    "windows",
    "spread",
    "fields",
    "umap_fit_s",
    "place_knn_s",
    "place_umap_s",
    "knn_speedup",
    "mixture_s",
    "vote_profiles_s",
    "total_s",
    "ari_knn_vs_umap_windows",
    "ari_knn_vs_umap_fields",
    "window_ari",
    "window_ari_umap",
    "image_ari_vote",
]


def _cell(row: dict, column: str) -> str:
    value = row[column]
    if column == "place_umap_s" and row["transform_on"] < row["windows"]:
        return f"{value} (est.)"
    if "ari" in column:
        return f"{value:.3f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table_md(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(PLACEMENT_COLUMNS) + " |", "|" + "---|" * len(PLACEMENT_COLUMNS)]
    lines += ["| " + " | ".join(_cell(row, c) for c in PLACEMENT_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def job_md(job: dict) -> str:
    lines = [
        f"`cellmi cluster --cluster.split all` on {job['windows']:,} windows of {job['fields']:,} fields "
        f"(three feature sets), fresh process: **{job['wall_s']} s** wall, {job['cpu_s']} s CPU "
        f"(window ARI {job['window_ari']:.3f}, image ARI {job['image_ari']:.3f})",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds} |" for name, seconds in job["stages_s"].items()]
    return "\n".join(lines)


def table(report: dict) -> str:
    """Both parts as Markdown (what run_all.py gathers)."""
    parts = [table_md(report["rows"])]
    if report.get("job"):
        parts.append(job_md(report["job"]))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--transform-cap", type=int, default=20_000, help="most windows placed by UMAP's transform per size"
    )
    parser.add_argument("--job-windows", type=int, default=1_000_000, help="windows of part 2; 0 skips it")
    parser.add_argument(
        "--spread", type=float, nargs="+", default=[1.5], help="blob spreads (0.25: samples overlap)"
    )
    parser.add_argument("--out", default=str(OUT / "cluster.json"))
    args = parser.parse_args()
    from cellmi.log import setup_logging

    setup_logging("WARNING")
    cfg = ClusterSettings()
    load_before = os.getloadavg()[0]
    warm: dict[str, float] = {}
    with timer(warm, "warmup_s"):
        # both of umap-learn's neighbour searches: exact (the 4,000 subsample) and pynndescent (above 4,096)
        run_size(6_000, cfg.model_copy(update={"subsample_above": 5_000}), 1000)
        run_size(6_000, cfg, 1000)
    rows = []
    for spread in args.spread:
        for n in args.sizes:
            rows.append(run_size(n, cfg, args.transform_cap, spread))
            print(table_md(rows[-1:]).splitlines()[-1], flush=True)
    job = run_job(OUT / "cluster-run", args.job_windows) if args.job_windows else None
    result = {
        "benchmark": "cluster",
        "settings": cfg.model_dump(),
        "warmup_s": warm["warmup_s"],
        "rows": rows,
        "job": job,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # other users of a shared machine skew timings: record how busy it was
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwarm-up (numba compilation) {warm['warmup_s']:.1f} s\n")
    print(table(result))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
