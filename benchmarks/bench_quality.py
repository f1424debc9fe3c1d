"""The quality protocol: `cellmi run` with its defaults over synthetic draws x splits, settings chosen
on development draws only, quality reported on held-out draws that play no part in any choice.

    python benchmarks/bench_quality.py                           # every suite (hours on 2 cores)
    python benchmarks/bench_quality.py --suite dev               # where settings may be chosen
    python benchmarks/bench_quality.py --suite dev --set train.steps=3000 --tag steps3000  # a candidate
    python benchmarks/bench_quality.py --suite heldout --draws 6 7 --splits 0   # part of the report
    python benchmarks/bench_quality.py --render                  # report the finished runs, run nothing
    python benchmarks/bench_quality.py --quick                   # tiny data (`cellmi run --quick`), 3 runs

Suites (docs/quality-protocol.md):
  dev      synth.variation=dev, draws 1-5 x splits 0-2
  heldout  synth.variation=heldout (wider nuisances), draws 6-10 x splits 0-2: the reported numbers
  seeds    the first held-out draw and split, training seeds 0, 1, 2: the run-to-run spread

A draw is ``synth.seed``, a split ``ingest.split_seed``. Each run is ``python -m cellmi run`` in its
own folder, out/quality[-tag]/{variation}-d{draw}-s{split}-t{train seed}; a folder that holds a
finished run with the same settings is skipped (run the script again to resume), an unfinished one
is handed back to `cellmi run`, which reuses its finished stages, and one with other settings is
refused. The seeds suite's training seed 0 is the held-out suite's run. Writes
out/quality[-tag].json (every run's scores and the summary) and out/quality[-tag].md: per metric
the mean, the minimum and the share of runs meeting its bar, the bars on the held-out draws, the
seed spread and a row per run.
"""

# No `from __future__ import annotations`: run_all.py loads this file outside sys.modules, where
# dataclasses cannot resolve annotations given as strings.
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cellmi.settings import env_names
from cellmi.train.checkpoint import checkpoint_steps

OUT = Path(__file__).resolve().parent / "out"
SPLITS = (0, 1, 2)
DEV_DRAWS, HELDOUT_DRAWS, TRAIN_SEEDS = (1, 2, 3, 4, 5), (6, 7, 8, 9, 10), (0, 1, 2)
FEATURE_SETS = ("dim", "random", "handcrafted")
# metric name -> (split in metrics.json, score key)
METRICS = {
    "held-out image ARI": ("test", "image_ari"),
    "held-out window ARI": ("test", "window_ari"),
    "all-sample image ARI": ("all", "image_ari"),
    "all-sample field NN accuracy": ("all", "nn_accuracy"),
    "all-sample field mAP": ("all", "map"),
    "held-out window probe accuracy": ("test", "window_probe"),
}
FULL = 1.0 - 1e-9  # an ARI of 1.0, up to rounding


@dataclass(frozen=True)
class Bar:
    """One bar of issue 14 on the held-out draws: ``share`` of runs at ``at_least``, or a ``mean``."""

    metric: str
    at_least: float | None = None
    share: float | None = None
    mean: float | None = None


BARS = (
    Bar("held-out image ARI", at_least=FULL, share=0.9),
    Bar("all-sample image ARI", mean=0.95),
    Bar("all-sample image ARI", at_least=0.9, share=0.9),
    Bar("held-out window ARI", mean=0.8),
    Bar("all-sample field NN accuracy", mean=0.95),
)
SEED_SPREAD = 0.05  # the most all-sample image ARI may differ between training seeds


@dataclass(frozen=True)
class Run:
    """One `cellmi run`: a synthetic draw at a variation level, a split and a training seed."""

    variation: str
    draw: int
    split: int
    train_seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.variation}-d{self.draw}-s{self.split}-t{self.train_seed}"


# ---------------------------------------------------------------- plan


def plan(suite: str, draws: list[int] | None, splits: list[int] | None, quick: bool) -> list[Run]:
    """The runs of one suite, in order; ``draws`` and ``splits`` replace the defaults (the seeds
    suite takes the first of each)."""
    own, other = (DEV_DRAWS, HELDOUT_DRAWS) if suite == "dev" else (HELDOUT_DRAWS, DEV_DRAWS)
    draws = draws or list(own[:1] if quick else own)
    splits = splits or list(SPLITS[:1] if quick else SPLITS)
    crossing = sorted(set(draws) & set(other))
    if crossing:
        raise SystemExit(f"--draws {crossing[0]}: a draw of the other suite; dev and held-out draws never mix")
    if suite == "seeds":
        return [Run("heldout", draws[0], splits[0], seed) for seed in (TRAIN_SEEDS[:2] if quick else TRAIN_SEEDS)]
    variation = "dev" if suite == "dev" else "heldout"
    return [Run(variation, d, s) for d in draws for s in splits]


def run_env(run: Run, workdir: Path, overrides: list[str], quick: bool) -> dict[str, str]:
    """The environment of one run: no CELLMI_* from outside, the run's data, seed and overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLMI_")}
    env.update(
        CELLMI_WORKDIR=str(workdir),
        CELLMI_SYNTH__SEED=str(run.draw),
        CELLMI_SYNTH__VARIATION=run.variation,
        CELLMI_INGEST__SPLIT_SEED=str(run.split),
        CELLMI_TRAIN__SEED=str(run.train_seed),
    )
    if quick:
        env["CELLMI_QUICK"] = "true"
    for item in overrides:
        env[setting_env(item)] = item.partition("=")[2]
    return env


def setting_env(item: str) -> str:
    """``train.steps=3000`` -> ``CELLMI_TRAIN__STEPS``."""
    return "CELLMI_" + item.partition("=")[0].strip().upper().replace(".", "__")


# ---------------------------------------------------------------- running and resuming

RECORD = "bench.json"  # the protocol's own record in each run folder


def identity(run: Run, overrides: list[str], quick: bool) -> dict:
    return {"run": asdict(run), "overrides": sorted(overrides), "quick": quick}


def state(workdir: Path, ident: dict) -> str:
    """'new', 'unfinished' or 'finished' for a run folder; exits on a folder of another run."""
    path = workdir / RECORD
    if not path.exists():
        if workdir.exists() and any(workdir.iterdir()):
            raise SystemExit(f"{workdir}: holds files this protocol did not record; use another --tag or --out")
        return "new"
    record = json.loads(path.read_text())
    if record["identity"] != ident:
        raise SystemExit(f"{workdir}: holds a run with other settings ({record['identity']}); use another --tag")
    done = record.get("finished") and (workdir / "analysis" / "metrics.json").exists()
    return "finished" if done else "unfinished"


def seed_from(source: Path, workdir: Path) -> None:
    """Start a new run folder from a finished run of another tag: its data, checkpoints and vectors
    hard-linked (every stage `cellmi run` redoes deletes its output and writes it anew, so the
    source is never changed), its top-level records and logs copied."""
    if not (source / RECORD).exists() or not json.loads((source / RECORD).read_text()).get("finished"):
        raise SystemExit(f"{source}: no finished run to reuse")
    records = [item for item in source.iterdir() if item.is_file() and item.name.endswith((".json", ".log"))]
    shutil.copytree(source, workdir, copy_function=os.link,
                    ignore=lambda folder, names: [item.name for item in records] if folder == str(source) else [])
    for item in records:
        if item.name != RECORD:
            shutil.copy2(item, workdir / item.name)


def execute(run: Run, workdir: Path, overrides: list[str], quick: bool, reuse: Path | None = None) -> None:
    """Run (or resume) `cellmi run` in ``workdir``; its record says finished only after success.
    With ``reuse`` (a folder of finished runs), a new run starts from the same run there."""
    ident = identity(run, overrides, quick)
    status = state(workdir, ident)
    if status == "finished":
        print(f"{run.name}: finished before, skipped", flush=True)
        return
    reused = reuse / run.name if reuse is not None and status == "new" else None
    if reused is not None:
        seed_from(reused, workdir)
    print(f"{run.name}: {'resuming' if status == 'unfinished' else 'running'}"
          f"{f' from {reused}' if reused else ''}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RECORD).write_text(json.dumps({"identity": ident, "finished": False}, indent=2))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cellmi", "run"],
        env=run_env(run, workdir, overrides, quick),
        capture_output=True,
        text=True,
    )
    wall = round(time.perf_counter() - start, 1)
    (workdir / "cellmi.log").write_text(proc.stderr)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{run.name} failed (exit {proc.returncode}): {last}; log: {workdir / 'cellmi.log'}")
    record = {"identity": ident, "finished": True, "wall_s": wall}
    if reused is not None:  # this call redid only some stages: the run's time is its stages' times
        stages = json.loads((workdir / "run.json").read_text())["stages"]
        record.update(wall_s=round(sum(v["seconds"] for v in stages.values()), 1), reused_from=str(reused))
    (workdir / RECORD).write_text(json.dumps(record, indent=2))


# ---------------------------------------------------------------- scores


def scores(metrics: dict) -> dict[str, dict[str, float | None]]:
    """metrics.json of one run -> {feature set: {metric name: value}}."""
    out = {}
    for feature_set in FEATURE_SETS:
        found = metrics.get(feature_set, {})
        out[feature_set] = {name: (found.get(split) or {}).get(key) for name, (split, key) in METRICS.items()}
    return out


def dim_ahead(run_scores: dict[str, dict[str, float | None]]) -> bool:
    """Whether DIM beats both baselines on all-sample image ARI and on held-out window ARI."""
    for metric in ("all-sample image ARI", "held-out window ARI"):
        dim = run_scores["dim"][metric]
        others = [run_scores[b][metric] for b in FEATURE_SETS[1:]]
        if dim is None or any(o is not None and dim <= o for o in others):
            return False
    return True


def collect(run: Run, workdir: Path) -> dict | None:
    """The finished run's record, stage times and scores; None if it has not finished."""
    record_path, metrics_path = workdir / RECORD, workdir / "analysis" / "metrics.json"
    if not (record_path.exists() and metrics_path.exists()):
        return None
    record = json.loads(record_path.read_text())
    if not record.get("finished"):
        return None
    stages = json.loads((workdir / "run.json").read_text())["stages"]
    run_scores = scores(json.loads(metrics_path.read_text()))
    return {
        **asdict(run),
        "name": run.name,
        "overrides": record["identity"]["overrides"],
        "quick": record["identity"]["quick"],
        "wall_s": record.get("wall_s"),
        "reused_from": record.get("reused_from"),
        "stages_s": {k: v["seconds"] for k, v in stages.items()},
        "steps": trained_steps(workdir),
        "scores": run_scores,
        "dim_ahead": dim_ahead(run_scores),
    }


def trained_steps(workdir: Path) -> int | None:
    """The step training stopped at (its newest checkpoint): with a time budget it depends on the machine."""
    steps = checkpoint_steps(str(workdir / "checkpoints"))
    return steps[0][0] if steps else None


# ---------------------------------------------------------------- summary


def _values(results: list[dict], feature_set: str, metric: str) -> list[float]:
    return [r["scores"][feature_set][metric] for r in results if r["scores"][feature_set][metric] is not None]


def bar_of(metric: str) -> Bar | None:
    """The share-style bar of a metric, if it has one."""
    return next((b for b in BARS if b.metric == metric and b.at_least is not None), None)


def metric_rows(results: list[dict]) -> list[dict]:
    """Per metric and feature set: runs, mean, minimum, and the share of runs meeting the metric's bar."""
    rows = []
    for metric in METRICS:
        bar = bar_of(metric)
        for feature_set in FEATURE_SETS:
            values = _values(results, feature_set, metric)
            if not values:
                continue
            rows.append(
                {
                    "metric": metric,
                    "features": feature_set,
                    "runs": len(values),
                    "mean": sum(values) / len(values),
                    "min": min(values),
                    "share_meeting": None if bar is None else sum(v >= bar.at_least for v in values) / len(values),
                }
            )
    return rows


def bar_text(bar: Bar) -> str:
    if bar.mean is not None:
        return f"mean >= {bar.mean:g}"
    level = "1.0" if bar.at_least == FULL else f"{bar.at_least:g}"
    return f">= {level} on >= {bar.share:.0%} of draw-splits"


def check_bars(results: list[dict]) -> list[dict]:
    """Every bar of issue 14 against the held-out runs (DIM), plus DIM ahead of both baselines."""
    checks = []
    for bar in BARS:
        values = _values(results, "dim", bar.metric)
        if not values:
            found, met = None, False
        elif bar.mean is not None:
            found = sum(values) / len(values)
            met = found >= bar.mean
        else:
            found = sum(v >= bar.at_least for v in values) / len(values)
            met = found >= bar.share
        checks.append({"metric": bar.metric, "bar": bar_text(bar), "found": found, "met": met})
    ahead = [r["dim_ahead"] for r in results]
    checks.append({"metric": "DIM above both baselines", "bar": "on every draw-split",
                   "found": sum(ahead) / len(ahead) if ahead else None, "met": bool(ahead) and all(ahead)})
    return checks


def seed_spread(results: list[dict]) -> dict | None:
    """Spread (max - min) of all-sample image ARI over the training seeds of the seeds suite."""
    values = _values(results, "dim", "all-sample image ARI")
    if len(values) < 2:
        return None
    spread = max(values) - min(values)
    return {"runs": len(values), "spread": spread, "bar": SEED_SPREAD, "met": spread <= SEED_SPREAD}


def summarise(results: list[dict]) -> dict:
    """Per suite: metric rows; on the held-out suite the bars; on the seeds suite the spread."""
    by_suite = {s: [r for r in results if s in r["suites"]] for s in ("dev", "heldout", "seeds")}
    summary = {s: {"metrics": metric_rows(rs)} for s, rs in by_suite.items() if rs}
    if by_suite["heldout"]:
        summary["heldout"]["bars"] = check_bars(by_suite["heldout"])
    if by_suite["seeds"]:
        summary["seeds"]["spread"] = seed_spread(by_suite["seeds"])
    return summary


# ---------------------------------------------------------------- tables


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def metrics_table(rows: list[dict]) -> str:
    """One line per metric: DIM's runs, mean, minimum and share meeting the bar; the baselines' means."""
    found = {(r["metric"], r["features"]): r for r in rows}
    lines = ["| metric | runs | DIM mean | DIM min | DIM share meeting the bar | random mean | hand-crafted mean |",
             "|---|---|---|---|---|---|---|"]
    for metric in METRICS:
        dim = found.get((metric, "dim"))
        if dim is None:
            continue
        share = "-" if dim["share_meeting"] is None else f"{dim['share_meeting']:.0%}"
        base = [_num(found[(metric, b)]["mean"]) if (metric, b) in found else "-" for b in FEATURE_SETS[1:]]
        lines.append(f"| {metric} | {dim['runs']} | {_num(dim['mean'])} | {_num(dim['min'])} | {share} | "
                     + " | ".join(base) + " |")
    return "\n".join(lines)


def bars_table(checks: list[dict]) -> str:
    lines = ["| bar (held-out draws, DIM) | needed | found | met |", "|---|---|---|---|"]
    for c in checks:
        found = _num(c["found"]) if "mean" in c["bar"] else ("-" if c["found"] is None else f"{c['found']:.0%}")
        lines.append(f"| {c['metric']} | {c['bar']} | {found} | {'yes' if c['met'] else 'no'} |")
    return "\n".join(lines)


def runs_table(results: list[dict]) -> str:
    head = ["run", "wall (s)", "train (s)", "steps"] + [f"DIM {m}" for m in METRICS] + ["DIM ahead"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["name"], _num(r["wall_s"], ".0f"), _num(r["stages_s"].get("train"), ".0f"),
                 _num(r.get("steps"), "d")]
        cells += [_num(r["scores"]["dim"][m]) for m in METRICS] + ["yes" if r["dim_ahead"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    """The protocol's Markdown report of a list of run results (what run_all.py shows)."""
    summary = summarise(results)
    titles = {"dev": "Development draws (settings may be chosen here)",
              "heldout": "Held-out draws (reported; never used for choices)",
              "seeds": "Training seeds on one held-out draw-split"}
    parts = []
    changed = sorted({item for r in results for item in r.get("overrides", [])})
    if changed:
        parts.append("Settings changed from the defaults: " + ", ".join(f"`{c}`" for c in changed) + "\n")
    if any(r.get("quick") for r in results):
        parts.append("Quick runs (`cellmi run --quick` data and training): a smoke test, not a measurement.\n")
    for suite, title in titles.items():
        if suite not in summary:
            continue
        parts.append(f"#### {title}\n\n{metrics_table(summary[suite]['metrics'])}\n")
        if "bars" in summary[suite]:
            parts.append(bars_table(summary[suite]["bars"]) + "\n")
        spread = summary[suite].get("spread")
        if spread:
            verdict = "met" if spread["met"] else "not met"
            parts.append(f"All-sample image ARI spread over {spread['runs']} training seeds: "
                         f"{spread['spread']:.3f} (bar <= {spread['bar']:g}: {verdict})\n")
    parts.append(f"#### Runs\n\n{runs_table(results)}\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", choices=("dev", "heldout", "seeds"), default=["dev", "heldout", "seeds"])
    parser.add_argument("--draws", type=int, nargs="+", help="draws (synth.seed) instead of the suite's own")
    parser.add_argument("--splits", type=int, nargs="+", help="splits (ingest.split_seed) instead of 0 1 2")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a setting for every run (a candidate, on the dev suite)")
    parser.add_argument("--allow-heldout-set", action="store_true",
                        help="allow --set on held-out draws, for settings of the machine (e.g. train.threads), "
                             "never of the method")
    parser.add_argument("--tag", default="", help="name of this set of runs (out/quality-TAG)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the runs and reports")
    parser.add_argument("--quick", action="store_true", help="`cellmi run --quick` data, one draw-split per suite")
    parser.add_argument("--render", action="store_true", help="only report the runs that have finished")
    parser.add_argument("--reuse", metavar="TAG", help="start each new run from the same finished run of "
                        "out/quality-TAG, so `cellmi run` redoes only the stages whose settings differ (a "
                        "clustering change re-scores the same trained encoders)")
    args = parser.parse_args(argv)
    known = env_names()
    bad = [item for item in args.set if "=" not in item or setting_env(item) not in known]
    if bad:
        parser.error(f"--set {bad[0]!r}: not SECTION.FIELD=VALUE with a known setting, e.g. train.steps=3000")
    if args.set and set(args.suite) - {"dev"} and not args.allow_heldout_set:
        parser.error("--set: settings are chosen on the dev suite only; held-out draws run the defaults "
                     "(--allow-heldout-set for settings of the machine)")
    if args.quick and not args.tag:
        args.tag = "quick"
    return args


def planned(args: argparse.Namespace) -> dict[Run, list[str]]:
    """Every run of the chosen suites, each once, with the suites it serves."""
    runs: dict[Run, list[str]] = {}
    for suite in args.suite:
        for run in plan(suite, args.draws, args.splits, args.quick):
            runs.setdefault(run, []).append(suite)
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = args.out / ("quality" + (f"-{args.tag}" if args.tag else ""))
    runs = planned(args)
    if not args.render:
        reuse = args.out / f"quality-{args.reuse}" if args.reuse else None
        for run in runs:
            execute(run, folder / run.name, args.set, args.quick, reuse)
    results = []
    for run, suites in runs.items():
        found = collect(run, folder / run.name)
        if found is not None:
            results.append({**found, "suites": suites})
    if not results:
        raise SystemExit(f"{folder}: no finished runs of the chosen suites to report")
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "overrides": args.set,
        "quick": args.quick,
        "results": results,
        "summary": summarise(results),
    }
    markdown = table(results)
    json_path, md_path = folder.parent / f"{folder.name}.json", folder.parent / f"{folder.name}.md"
    folder.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    md_path.write_text(markdown)
    print(markdown)
    print(f"written: {json_path}, {md_path}")


if __name__ == "__main__":
    main()
