"""Clustering time for 1e4, 1e5 and 1e6 synthetic 64-d windows, with the subsample path.

    python benchmarks/bench_cluster.py                       # sizes 1e4 1e5 1e6, in-process placement
    python benchmarks/bench_cluster.py --sizes 10000 100000 --dask-workers 2

Windows are Gaussian blobs, one per sample (14 samples x 4 fields), standing in for DIM vectors.
Each size runs what ``cellmi cluster`` runs for one feature set with its default settings
(UMAP fitted on a seeded subsample of 10,000 above 20,000 windows, the rest placed in chunks,
Gaussian mixture, window vote, field profiles + Ward). A first warm-up on 6,000 windows pays
numba's compilation, which is reported apart. Writes benchmarks/out/cluster.json and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from cellmi.analyze.job import fit_field_clusters
from cellmi.analyze.metrics import cluster_scores
from cellmi.analyze.mixture import assign, fit_mixture, vote
from cellmi.analyze.profiles import field_profiles
from cellmi.analyze.reduce import embed, fit_reducer
from cellmi.settings import ClusterSettings

OUT = Path(__file__).resolve().parent / "out"
SAMPLES, FIELDS, DIM = 14, 4, 64


def windows(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """(n,) window table with sample/field/split/fg_fraction and (n, 64) float32 vectors, one blob per sample."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(SAMPLES, DIM)) * 1.5
    image = rng.integers(0, SAMPLES * FIELDS, size=n)
    sample = image // FIELDS
    x = centres[sample] + rng.normal(size=(n, DIM))
    table = pd.DataFrame(
        {
            "sample": [f"S{s:02d}" for s in sample],
            "field": (image % FIELDS + 1).astype(str),
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


def run_size(n: int, cfg: ClusterSettings, client) -> dict:
    table, x = windows(n)
    times: dict[str, float] = {}
    with timer(times, "umap_fit_s"):
        reducer = fit_reducer(
            x, cfg.umap_dim, cfg.neighbors, cfg.min_dist, cfg.seed, cfg.subsample_above, cfg.subsample_size
        )
    with timer(times, "place_s"):
        z = embed(reducer, x, client)
    with timer(times, "mixture_s"):
        gmm = fit_mixture(reducer.fit_embedding, SAMPLES, cfg.seed)
        labels, _ = assign(gmm, z)
    with timer(times, "vote_profiles_s"):
        votes = vote(table, labels)
        fields, profiles = field_profiles(table, x, cfg.aggregate)
        fit_field_clusters(fields, profiles, cfg, SAMPLES, focus={})  # what `cellmi cluster` runs
    times["total_s"] = round(sum(times.values()), 2)
    return {
        "windows": n,
        "fitted_on": len(reducer.fit_rows),
        **times,
        "window_ari": cluster_scores(table["sample"], labels)["ari"],
        "image_ari_vote": cluster_scores(votes["sample"], votes["cluster"])["ari"],
    }


@contextmanager
def maybe_client(workers: int):
    if not workers:
        yield None
        return
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


def table_md(rows: list[dict]) -> str:
    cols = [
        "windows",
        "fitted_on",
        "umap_fit_s",
        "place_s",
        "mixture_s",
        "vote_profiles_s",
        "total_s",
        "window_ari",
        "image_ari_vote",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [
            f"{row[c]:.3f}" if "ari" in c else (f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]))
            for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dask-workers", type=int, default=0, help="place windows on a local Dask cluster")
    parser.add_argument("--out", default=str(OUT / "cluster.json"))
    args = parser.parse_args()
    cfg = ClusterSettings()
    warm: dict[str, float] = {}
    with timer(warm, "warmup_s"):
        # above 4,096 fitted points umap-learn switches to pynndescent: compile that path too
        run_size(6_000, cfg.model_copy(update={"subsample_above": 5_000, "subsample_size": 4_500}), None)
    rows = []
    with maybe_client(args.dask_workers) as client:
        for n in args.sizes:
            rows.append(run_size(n, cfg, client))
            print(table_md(rows[-1:]).splitlines()[-1], flush=True)
    result = {
        "benchmark": "cluster",
        "settings": cfg.model_dump(),
        "dask_workers": args.dask_workers,
        "warmup_s": warm["warmup_s"],
        "rows": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"\nwarm-up (numba compilation) {warm['warmup_s']:.1f} s; placement "
        f"{'on ' + str(args.dask_workers) + ' Dask workers' if args.dask_workers else 'in process'}\n"
    )
    print(table_md(rows))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
