"""Held-out window grouping on finished runs, again under several clustering seeds, beside the window probe.

    python benchmarks/bench_windows.py --tags base-dev                 # cluster seeds 0, 1, 2
    python benchmarks/bench_windows.py --tags base-dev lr1e3 --seeds 0 1 2 3 4
    python benchmarks/bench_windows.py --tags base-dev --restarts 3 --tag restarts3

The encoder and the window vectors stay as each run left them; only `cellmi cluster`'s window step
(UMAP, then the Gaussian mixture, one group per held-out sample) runs again with each
``cluster.seed`` (and ``--restarts`` fits per seed, one by default). With one fit held-out window
ARI moves with that seed alone, so a setting's change in it is worth something only beside this
spread; ``--restarts 3`` measures how much keeping the most agreed of three fits narrows it. The
window probe (``probe_accuracy``: a linear classifier trained on the other fields of each held-out
sample) does not depend on the seed. Writes
out/windows[-tag].json and .md: per run the window ARI of each seed, their range and the probe, then
the means over runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cellmi.analyze import job
from cellmi.analyze.metrics import cluster_scores, probe_accuracy
from cellmi.representations import load_representations
from cellmi.settings import ClusterSettings

OUT = Path(__file__).resolve().parent / "out"


def score_run(folder: Path, seeds: list[int], restarts: int) -> dict:
    """Window ARI of the held-out windows under each cluster seed, and their probe accuracy."""
    url = str(folder / "representations.zarr")
    reps = job.split_rows(job.usable_windows(load_representations(url), url), "test", url)
    samples, x = reps.table["sample"].astype(str).to_numpy(), reps.features["dim"]
    k = len(np.unique(samples))
    ari = []
    for seed in seeds:
        _, _, _, proba, _ = job.cluster_windows(x, ClusterSettings(seed=seed, restarts=restarts), k, "fixed", None)
        ari.append(cluster_scores(samples, proba.argmax(axis=1))["ari"])
    probe = probe_accuracy(x, samples, reps.table["field"].to_numpy())
    return {"window_ari": ari, "range": max(ari) - min(ari), "probe": probe}


def table(results: dict[str, dict], seeds: list[int]) -> str:
    head = ["run", *(f"window ARI, seed {s}" for s in seeds), "range", "probe"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["window_ari"])
                     + f" | {r['range']:.3f} | {r['probe']:.3f} |")
    ari = np.array([r["window_ari"] for r in results.values()])
    ranges = np.array([r["range"] for r in results.values()])
    probes = np.array([r["probe"] for r in results.values()])
    lines.append("| mean | " + " | ".join(f"{v:.3f}" for v in ari.mean(axis=0))
                 + f" | {ranges.mean():.3f} (max {ranges.max():.3f}) | {probes.mean():.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", nargs="+", required=True, help="quality folders (out/quality-TAG) of finished runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="cluster.seed values")
    parser.add_argument("--restarts", type=int, default=1, help="cluster.restarts of each fit")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--tag", default="", help="name of the report (out/windows-TAG)")
    args = parser.parse_args(argv)
    runs = sorted(run for tag in args.tags for run in (args.out / f"quality-{tag}").glob("*")
                  if (run / "representations.zarr").exists())
    if not runs:
        raise SystemExit(f"no finished runs under {args.out} for tags {args.tags}")
    results = {}
    for run in runs:
        scored = results[f"{run.parent.name}/{run.name}"] = score_run(run, args.seeds, args.restarts)
        print(run.name, [round(v, 3) for v in scored["window_ari"]], round(scored["probe"], 3), flush=True,
              file=sys.stderr)
    name = "windows" + (f"-{args.tag}" if args.tag else "")
    markdown = table(results, args.seeds)
    report = {"seeds": args.seeds, "restarts": args.restarts, "runs": results}
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
