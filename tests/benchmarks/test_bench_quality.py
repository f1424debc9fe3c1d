"""The quality protocol (benchmarks/bench_quality.py): its plan, its guards, its summary, and one real
quick run that it resumes instead of repeating."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_quality.py"
_spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)


def metrics_json(test_image=1.0, test_window=0.9, all_image=0.96, nn=0.97, base=0.3) -> dict:
    """A metrics.json as `cellmi cluster` writes it (feature set -> split -> score), baselines at ``base``."""

    def one(ti, tw, ai, n):
        return {"test": {"image_ari": ti, "window_ari": tw, "nn_accuracy": 1.0, "map": 1.0},
                "train": {"image_ari": ai}, "all": {"image_ari": ai, "window_ari": None, "nn_accuracy": n, "map": 0.9}}

    return {"format": 1, "split": "test", "dim": one(test_image, test_window, all_image, nn),
            "random": one(base, base, base, base), "handcrafted": one(base, base, base, base)}


def result(name: str, suites: list[str], **scores) -> dict:
    found = bq.scores(metrics_json(**scores))
    return {"name": name, "suites": suites, "wall_s": 1.0, "stages_s": {"train": 1.0}, "scores": found,
            "dim_ahead": bq.dim_ahead(found)}


def test_plan_runs_each_draw_split_once_and_keeps_dev_and_heldout_apart():
    args = bq.parse_args([])
    runs = bq.planned(args)
    by_suite = {s: [r for r, suites in runs.items() if s in suites] for s in ("dev", "heldout", "seeds")}
    assert len(by_suite["dev"]) == len(by_suite["heldout"]) == 15 and len(by_suite["seeds"]) == 3
    assert {r.variation for r in by_suite["dev"]} == {"dev"}
    assert {r.variation for r in by_suite["heldout"] + by_suite["seeds"]} == {"heldout"}
    assert not {r.draw for r in by_suite["dev"]} & {r.draw for r in by_suite["heldout"]}
    assert len(runs) == 32  # the seeds suite's training seed 0 is a held-out run, run once
    assert [r.train_seed for r in by_suite["seeds"]] == [0, 1, 2]
    quick = bq.planned(bq.parse_args(["--quick"]))
    assert len(quick) == 3 and bq.parse_args(["--quick"]).tag == "quick"
    part = bq.plan("heldout", [7, 8], [1], quick=False)
    assert [(r.draw, r.split) for r in part] == [(7, 1), (8, 1)]
    with pytest.raises(SystemExit, match="--draws 6: a draw of the other suite"):
        bq.plan("dev", [1, 6], None, quick=False)


def test_settings_are_chosen_on_dev_only_and_must_exist(capsys):
    assert bq.parse_args(["--suite", "dev", "--set", "train.steps=3000"]).set == ["train.steps=3000"]
    for argv in (["--set", "train.steps=3000"], ["--suite", "seeds", "--set", "train.steps=3000"],
                 ["--suite", "dev", "--set", "train.stepz=3000"], ["--suite", "dev", "--set", "train.steps"]):
        with pytest.raises(SystemExit) as stop:
            bq.parse_args(argv)
        assert stop.value.code == 2
    assert "--set" in capsys.readouterr().err
    machine = bq.parse_args(["--suite", "heldout", "--set", "train.threads=2", "--allow-heldout-set"])
    assert machine.set == ["train.threads=2"]


def test_each_run_gets_its_data_split_seed_and_nothing_from_outside(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLMI_TRAIN__STEPS", "7")  # a stray setting must not leak into the protocol
    env = bq.run_env(bq.Run("heldout", 8, 2, 1), tmp_path, ["cluster.seed=3"], quick=True)
    cellmi = {k: v for k, v in env.items() if k.startswith("CELLMI_")}
    assert cellmi == {"CELLMI_WORKDIR": str(tmp_path), "CELLMI_SYNTH__SEED": "8", "CELLMI_SYNTH__VARIATION": "heldout",
                      "CELLMI_INGEST__SPLIT_SEED": "2", "CELLMI_TRAIN__SEED": "1", "CELLMI_QUICK": "true",
                      "CELLMI_CLUSTER__SEED": "3"}


def test_a_run_folder_is_new_unfinished_finished_or_refused(tmp_path):
    run = bq.Run("dev", 1, 0)
    ident = bq.identity(run, [], quick=False)
    folder = tmp_path / run.name
    assert bq.state(folder, ident) == "new"
    folder.mkdir()
    (folder / bq.RECORD).write_text(json.dumps({"identity": ident, "finished": False}))
    assert bq.state(folder, ident) == "unfinished"
    (folder / bq.RECORD).write_text(json.dumps({"identity": ident, "finished": True}))
    assert bq.state(folder, ident) == "unfinished"  # recorded finished, but its metrics are gone
    (folder / "analysis").mkdir()
    (folder / "analysis" / "metrics.json").write_text("{}")
    assert bq.state(folder, ident) == "finished"
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        bq.state(folder, bq.identity(run, ["train.steps=5"], quick=False))
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "run.json").write_text("{}")
    with pytest.raises(SystemExit, match="did not record"):
        bq.state(stray, ident)


def test_summary_gives_mean_min_share_and_each_bar():
    held = [result(f"h{i}", ["heldout"], test_window=0.85) for i in range(9)]
    held.append(result("h9", ["heldout", "seeds"], test_image=0.7, all_image=0.92, test_window=0.75))
    seeds = [result(f"s{i}", ["seeds"], all_image=a) for i, a in enumerate((0.95, 0.99))]
    summary = bq.summarise(held + seeds + [result("d0", ["dev"], all_image=0.5)])
    rows = {(r["metric"], r["features"]): r for r in summary["heldout"]["metrics"]}
    image = rows[("held-out image ARI", "dim")]
    assert image["runs"] == 10 and image["min"] == pytest.approx(0.7) and image["share_meeting"] == pytest.approx(0.9)
    assert image["mean"] == pytest.approx(0.97)
    assert rows[("held-out image ARI", "random")]["mean"] == pytest.approx(0.3)
    bars = {(c["metric"], c["bar"]): c for c in summary["heldout"]["bars"]}
    assert bars[("held-out image ARI", ">= 1.0 on >= 90% of draw-splits")]["met"]
    assert bars[("all-sample image ARI", "mean >= 0.95")]["found"] == pytest.approx(0.956)
    assert bars[("all-sample image ARI", ">= 0.9 on >= 90% of draw-splits")]["met"]
    assert bars[("held-out window ARI", "mean >= 0.8")]["found"] == pytest.approx(0.84)
    assert bars[("DIM above both baselines", "on every draw-split")]["met"]
    spread = summary["seeds"]["spread"]
    assert spread["runs"] == 3 and spread["spread"] == pytest.approx(0.07) and not spread["met"]
    assert summary["dev"]["metrics"][0]["runs"] == 1 and "bars" not in summary["dev"]
    markdown = bq.table(held + seeds)
    assert "Held-out draws" in markdown and "| h9 |" in markdown and "not met" in markdown
    assert "changed from the defaults" not in markdown
    held[0]["overrides"] = ["train.threads=2"]
    assert "Settings changed from the defaults: `train.threads=2`" in bq.table(held)


def test_a_bar_fails_when_one_run_too_many_misses_it():
    held = [result(f"h{i}", ["heldout"]) for i in range(8)]
    held += [result(f"m{i}", ["heldout"], test_image=0.8) for i in range(2)]
    held.append(result("behind", ["heldout"], all_image=0.2))  # the random baseline scores 0.3
    bars = {c["metric"]: c for c in bq.check_bars(held) if "mean" not in c["bar"]}
    assert not bars["held-out image ARI"]["met"] and bars["held-out image ARI"]["found"] == pytest.approx(9 / 11)
    assert not bars["DIM above both baselines"]["met"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_protocol_runs_reports_and_then_resumes_instead_of_repeating(tmp_path):
    """One real `cellmi run --quick` through the protocol; the second call finds it finished."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLMI_")}

    def protocol(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--suite", "heldout", "--out", str(tmp_path),
                               *flags], env=env, capture_output=True, text=True, timeout=540)

    first = protocol()
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "quality-quick.json").read_text())
    (run,) = report["results"]
    assert run["name"] == "heldout-d6-s0-t0" and run["suites"] == ["heldout"]
    assert all(run["scores"][fs]["all-sample image ARI"] is not None for fs in bq.FEATURE_SETS)
    assert run["scores"]["dim"]["all-sample field NN accuracy"] is not None
    assert run["steps"] == 40  # --quick trains 40 steps; the table shows them
    checked = {c["metric"] for c in report["summary"]["heldout"]["bars"]}
    assert checked >= {"held-out image ARI", "DIM above both baselines"}
    markdown = (tmp_path / "quality-quick.md").read_text()
    assert "Held-out draws" in markdown and "Quick runs" in markdown
    assert "| heldout-d6-s0-t0 |" in markdown and "| 40 |" in markdown
    run_json = tmp_path / "quality-quick" / "heldout-d6-s0-t0" / "run.json"
    before = run_json.stat().st_mtime_ns
    again = protocol()
    assert again.returncode == 0 and "finished before, skipped" in again.stdout
    assert run_json.stat().st_mtime_ns == before
    other = protocol("--set", "train.steps=5", "--allow-heldout-set")
    assert other.returncode != 0 and "holds a run with other settings" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and run_json.stat().st_mtime_ns == before
    reuse_and_rescore(protocol, tmp_path)


def reuse_and_rescore(protocol, tmp_path: Path) -> None:
    """--reuse: a run that differs in clustering alone starts from the finished run, redoes the
    cluster stage only and leaves the source as it was."""
    source = tmp_path / "quality-quick" / "heldout-d6-s0-t0"
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*") if p.is_file()}
    old_metrics = (source / "analysis" / "metrics.json").read_text()
    rescored = protocol("--tag", "even", "--reuse", "quick", "--set", "cluster.aggregate=weighted",
                        "--allow-heldout-set")
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    assert f"running from {source}" in rescored.stdout
    old_stages = json.loads((source / "run.json").read_text())["stages"]
    new_stages = json.loads((tmp_path / "quality-even" / source.name / "run.json").read_text())["stages"]
    assert [new_stages[s]["finished"] == old_stages[s]["finished"] for s in ("ingest", "train", "infer", "cluster")] \
        == [True, True, True, False]
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*") if p.is_file()} == before
    assert (source / "analysis" / "metrics.json").read_text() == old_metrics
    (run,) = json.loads((tmp_path / "quality-even.json").read_text())["results"]
    assert run["reused_from"] == str(source) and run["overrides"] == ["cluster.aggregate=weighted"]
    assert run["wall_s"] == pytest.approx(sum(v["seconds"] for v in new_stages.values()), abs=0.2)
