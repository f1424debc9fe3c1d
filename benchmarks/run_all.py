"""Run every benchmark and write one JSON + Markdown summary (what docs/results.md shows).

    python benchmarks/run_all.py                      # all of them (about 50 minutes on 2 cores)
    python benchmarks/run_all.py --only train infer   # some of them
    python benchmarks/run_all.py --render-only        # tables from the JSON already in benchmarks/out

Each benchmark is its own script with its own JSON in benchmarks/out; this one runs them one after
another (never side by side: they measure speed) and gathers their tables into
benchmarks/out/benchmarks.md and benchmarks/out/benchmarks.json, with the machine they ran on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
# name -> (script, JSON it writes, the script's table function, the JSON key it tabulates or None for
# the whole report); quality last: it is the longest
BENCHES = {
    "train": ("bench_train.py", "train.json", "table", None),
    "step": ("bench_step.py", "step.json", "table", None),
    "infer": ("bench_infer.py", "infer.json", "table", None),
    "cluster": ("bench_cluster.py", "cluster.json", "table", None),
    "quality": ("bench_quality.py", "quality.json", "table", "results"),
}
TITLES = {
    "train": "Training speed",
    "step": "Where a CPU training step's time goes",
    "infer": "Inference speed",
    "cluster": "Clustering time by number of windows",
    "quality": "Quality protocol: `cellmi run` defaults on development and held-out synthetic draws",
}


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run(name: str) -> float:
    script = HERE / BENCHES[name][0]
    start = time.monotonic()
    print(f"== {name}: {script.name}", flush=True)
    subprocess.run([sys.executable, str(script)], check=True)
    return time.monotonic() - start


def table(name: str, report: object) -> str:
    """The benchmark's own Markdown table of its JSON report."""
    script, _, function, key = BENCHES[name]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    render = getattr(module, function)
    return render(report if key is None else report[key])


def render(names: list[str], wall: dict[str, float]) -> tuple[dict, str]:
    info = machine()
    reports, parts = {}, [f"Machine: {info['cpus']} CPUs, {info['platform']}, Python {info['python']}, "
                          f"torch {info['torch']}" + (f", {info['cuda']}" if info["cuda"] else "") + "\n"]
    for name in names:
        path = OUT / BENCHES[name][1]
        if not path.exists():
            parts.append(f"### {TITLES[name]}\n\nnot run (no {path.name})\n")
            continue
        reports[name] = json.loads(path.read_text())
        parts.append(f"### {TITLES[name]}\n\n{table(name, reports[name]).strip()}\n")
    return {"machine": info, "wall_s": wall, "reports": reports}, "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    parser.add_argument("--render-only", action="store_true", help="only gather the existing JSON")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    wall = {} if args.render_only else {name: round(run(name), 1) for name in args.only}
    summary, markdown = render(list(BENCHES), wall)
    (OUT / "benchmarks.json").write_text(json.dumps(summary, indent=2))
    (OUT / "benchmarks.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
