"""End-to-end time and clustering quality of `cellmi run` with its default settings, over 3 splits.

    python benchmarks/bench_quality.py                 # splits 0 1 2, default settings
    python benchmarks/bench_quality.py --splits 0 --set train.time_budget_s=120 --tag short
    python benchmarks/bench_quality.py --rescore       # same runs, metrics after `cellmi cluster` was re-run
    python benchmarks/bench_quality.py --draw 1 --tag seed1   # new images: every seed set to 1

Each split holds out a different 4 of the 14 synthetic samples (CELLMI_INGEST__SPLIT_SEED).
Writes benchmarks/out/quality[-tag].json and prints a Markdown table: stage times, and ARI for DIM
and both baselines at window and image level, held-out and all samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
SEEDS = ("synth.seed", "train.seed", "cluster.seed", "infer.baseline_seed")
BAR = {"test image_ari": 1.0, "test window_ari": 0.5, "all image_ari": 0.9}


def run_split(split: int, overrides: list[str], tag: str) -> dict:
    workdir = OUT / f"quality{tag}" / f"split{split}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLMI_")}
    env.update({"CELLMI_WORKDIR": str(workdir), "CELLMI_INGEST__SPLIT_SEED": str(split), "CELLMI_FORCE": "true"})
    for item in overrides:
        key, value = item.split("=", 1)
        env["CELLMI_" + key.upper().replace(".", "__")] = value
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cellmi", "run"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"split {split} failed:\n{proc.stderr[-3000:]}")
    run = json.loads((workdir / "run.json").read_text())
    metrics = json.loads((workdir / "analysis" / "metrics.json").read_text())
    return {"split": split, "wall_s": round(wall, 1),
            "stages_s": {k: v["seconds"] for k, v in run["stages"].items()}, "metrics": metrics}


def score(metrics: dict, feature_set: str, split: str, key: str) -> float | None:
    value = metrics.get(feature_set, {}).get(split, {}).get(key)
    return None if value is None else float(value)


def table(results: list[dict]) -> str:
    rows = ["| split | wall (s) | ingest | train | infer | cluster | features | test image ARI | test window ARI "
            "| all image ARI |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        st = res["stages_s"]
        for fs in ("dim", "random", "handcrafted"):
            vals = [score(res["metrics"], fs, "test", "image_ari"), score(res["metrics"], fs, "test", "window_ari"),
                    score(res["metrics"], fs, "all", "image_ari")]
            shown = " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
            times = (f"{res['wall_s']:.0f} | {st.get('ingest', 0):.0f} | {st.get('train', 0):.0f} | "
                     f"{st.get('infer', 0):.0f} | {st.get('cluster', 0):.0f}") if fs == "dim" else " | | | |"
            rows.append(f"| {res['split'] if fs == 'dim' else ''} | {times} | {fs} | {shown} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="section.field=value override")
    parser.add_argument("--tag", default="")
    parser.add_argument("--draw", type=int, help="seed of a fresh synthetic draw, also used for training, "
                        "clustering and the random baseline (default: the embedded data, seed 0)")
    parser.add_argument("--rescore", action="store_true",
                        help="keep the timed runs, re-read metrics.json of each split (after `cellmi cluster` again)")
    args = parser.parse_args()
    tag = f"-{args.tag}" if args.tag else ""
    if args.draw is not None:
        args.set = [f"{key}={args.draw}" for key in SEEDS] + args.set
    if args.rescore:
        results = json.loads((OUT / f"quality{tag}.json").read_text())["results"]
        for res in results:
            res["metrics"] = json.loads((OUT / f"quality{tag}" / f"split{res['split']}" / "analysis" /
                                         "metrics.json").read_text())
            res["rescored"] = True
    else:
        results = [run_split(split, args.set, tag) for split in args.splits]
    dim = [r["metrics"]["dim"] for r in results]
    summary = {
        "min test image_ari": min(m["test"]["image_ari"] for m in dim),
        "min test window_ari": min(m["test"]["window_ari"] for m in dim),
        "min all image_ari": min(m.get("all", {}).get("image_ari", float("nan")) for m in dim),
        "max wall_s": max(r["wall_s"] for r in results),
    }
    summary["meets bar"] = all(summary[f"min {k}"] >= v for k, v in BAR.items())
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "overrides": args.set, "results": results, "summary": summary}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"quality{tag}.json").write_text(json.dumps(report, indent=2))
    print(table(results))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
