"""Field-profile variants on finished runs: the saved window vectors of each run grouped again.

    python benchmarks/bench_profiles.py --tags blur35 blur35-d34          # development runs only
    python benchmarks/bench_profiles.py --tags blur35 --ridges 0.25 0.5 1 --density 0 1 2
    python benchmarks/bench_profiles.py --tags base --scales 512 128   # profiles from other window edges

The encoder, the data and the vectors stay as each run left them; only the step from window vectors
to field groups changes: ``weighted`` (foreground-weighted mean of the windows), ``even`` at each
``--ridges`` value (the same, evened out over the field; see ``axis_weights``), and, for the default
ridge, each ``--density`` weight (the field's cover, the share of it in its foreground mask, as one
more profile feature; the others leave it out) and each ``--fg-powers`` power of the windows'
foreground in their weight (0: not weighted by foreground). With ``--open``, for each radius and each
``--open-weights`` weight, the field's open space (the share of it farther than the radius from its
foreground mask: the room between cells, a second measure of density) joins the profile at that weight
beside the cover as a plain feature. With ``--scales``, each run's encoder (its
checkpoint) embeds its fields (its store) again with windows of each edge given, and each scale's
profile is scored alone and beside the run's own (both with the cover, as ``cluster`` does): the
multi-scale question, asked without training anew. With ``--misplaced``, the default profile's
misplaced fields too: each field whose nearest field (cosine, on the scaled profiles, as the field
nearest-neighbour accuracy finds it) is of another sample, counted by sample pair, by held-out or
training sample and by whether focus QC flags it. Grouping is `cellmi cluster`'s profile
step with its defaults (spectral consensus on rank-scaled profiles, one group per sample), on all
samples and on the held-out ones. Settings are chosen on development runs only
(quality-protocol.md): pass folders of dev runs. Writes out/profiles[-tag].json and .md: per
variant, the mean and minimum over runs of all-sample image ARI, held-out image ARI and all-sample
field nearest-neighbour accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import distance_transform_edt

from cellmi.analyze import job
from cellmi.analyze.metrics import nearest_other
from cellmi.analyze.profiles import EVEN_RIDGE, field_profiles
from cellmi.infer.embed import embed_shared
from cellmi.infer.windows import foreground_fraction, window_grid
from cellmi.representations import load_representations
from cellmi.settings import ClusterSettings, InferSettings
from cellmi.store import open_store
from cellmi.train.checkpoint import load_encoder

OUT = Path(__file__).resolve().parent / "out"
SCORES = ("all-sample image ARI", "held-out image ARI", "all-sample field NN accuracy")


def group(reps, split: str, recipe: tuple, cfg: ClusterSettings, focus, opens: dict) -> dict:
    """Image ARI and field NN accuracy of one split grouped from profiles of one recipe. With an open-space
    radius, the field's cover joins as a plain feature and its open space (``opens[radius]``) last, weighted
    ``density``."""
    _, how, ridge, density, power, radius = recipe
    sub = reps if split == "all" else reps.subset(reps.table["split"].to_numpy() == split)
    window = job.window_of(sub)
    table = sub.table.assign(fg_fraction=sub.table["fg_fraction"] ** power)
    fields, profiles = field_profiles(table, sub.features["dim"], how, density > 0, window, ridge)
    if radius:
        keys = zip(fields["sample"].astype(str), fields["field"].astype(str), strict=True)
        profiles = np.hstack([profiles, np.array([[opens[radius][key]] for key in keys], np.float32)])
    return grouped(fields, profiles, cfg.model_copy(update={"profile_density": density}), focus,
                   job.phenotype_map(reps))


def grouped(fields, profiles: np.ndarray, cfg: ClusterSettings, focus, phen: dict) -> dict:
    """Image ARI and field NN accuracy of ``fields`` grouped from their ``profiles`` as ``cluster`` groups
    them, one group per sample."""
    k = int(fields["sample"].nunique())
    model, labels = job.fit_field_clusters(fields, profiles, cfg, k, focus)
    image = job.image_scores(fields, labels, "", phen)["image_ari"]
    return {"image_ari": image, "nn_accuracy": job.retrieval_scores(model, profiles, fields)["nn_accuracy"]}


def scale_profiles(encoder, store, fields, window: int) -> np.ndarray:
    """(n_fields, G) profiles of ``fields`` (rows in profile order) from windows of edge ``window``,
    a quarter window apart, embedded anew by ``encoder`` from ``store`` and aggregated as ``cluster`` does."""
    least = InferSettings().min_foreground
    out = []
    for sample, field in zip(fields["sample"].astype(str), fields["field"].astype(str), strict=True):
        raw, mask = store.read_image(sample, field), store.read_mask(sample, field)
        corners = window_grid(raw.shape[1:], window, max(encoder.stride, window // 4))
        fg = foreground_fraction(mask, corners, window)
        keep = fg >= least if (fg >= least).any() else np.ones(len(fg), bool)
        vectors = embed_shared(encoder, store.normalise(raw, mask), corners[keep], window, mask=mask)
        table = pd.DataFrame({"sample": sample, "field": field, "split": "", "fg_fraction": fg[keep],
                              "y": corners[keep, 0], "x": corners[keep, 1]})
        out.append(field_profiles(table, vectors, "even", False, window)[1][0])
    return np.stack(out)


def scale_scores(run: Path, reps, scales: list[int], cfg: ClusterSettings, focus) -> dict[str, dict[str, float]]:
    """Each scale's profile alone and beside the run's own, on all samples and on the held-out ones;
    the run's encoder (its checkpoints) and fields (its store) embed the scales."""
    encoder, _ = load_encoder(str(run / "checkpoints"))
    store = open_store(str(run / "store.zarr"))
    phen = job.phenotype_map(reps)
    fields, own = field_profiles(reps.table, reps.features["dim"], "even", True, job.window_of(reps))
    held = (fields["split"] == "test").to_numpy()
    out = {}
    for edge in scales:
        other = scale_profiles(encoder, store, fields, edge)
        for name, profiles in ((f"scale {edge}", np.hstack([other, own[:, -1:]])),
                               (f"even + scale {edge}", np.hstack([own[:, :-1], other, own[:, -1:]]))):
            whole, part = (grouped(fields[rows].copy(), profiles[rows], cfg, focus, phen)
                           for rows in (np.ones(len(fields), bool), held))
            out[name] = dict(zip(SCORES, (whole["image_ari"], part["image_ari"], whole["nn_accuracy"]), strict=True))
    return out


def variants(ridges: list[float], densities: list[float], powers: list[float], radii: list[int] = (),
             open_weights: list[float] = ()) -> list[tuple]:
    """(name, aggregation, ridge, weight of the last feature, power of the windows' foreground in their weight,
    open-space radius or 0)."""
    out = [("weighted", "weighted", EVEN_RIDGE, 0.0, 1.0, 0)]
    out += [(f"even, ridge {r:g}", "even", r, 0.0, 1.0, 0) for r in ridges]
    out += [(f"even, density {d:g}", "even", EVEN_RIDGE, d, 1.0, 0) for d in densities if d > 0]
    out += [(f"even, foreground^{p:g}", "even", EVEN_RIDGE, 0.0, p, 0) for p in powers if p != 1]
    out += [(f"even, cover 1 + open space {r} px {w:g}", "even", EVEN_RIDGE, w, 1.0, r)
            for r in radii for w in open_weights]
    return out


def open_space(store, keys, radii: list[int]) -> dict[int, dict[tuple[str, str], float]]:
    """Radius -> share of each field farther than that many pixels from its foreground: the room between
    cells. Each mask is read, and its distance transform made, once for all radii."""
    out: dict[int, dict[tuple[str, str], float]] = {r: {} for r in radii}
    for key in keys:
        far = distance_transform_edt(~store.read_mask(*key))
        for r in radii:
            out[r][key] = float((far > r).mean())
    return out


def load(folder: Path):
    url = str(folder / "representations.zarr")
    return job.with_cover(job.usable_windows(load_representations(url), url), from_store=True)


def misplaced(reps) -> pd.DataFrame:
    """Every field of a run with its phenotype, its nearest field's, its split, its focus flag and whether
    that nearest field is of its own sample (default profile, all samples, scaled as ``cluster`` scales,
    nearest as field nearest-neighbour accuracy finds it)."""
    cfg = ClusterSettings()
    fields, profiles = field_profiles(reps.table, reps.features["dim"], "even", True, job.window_of(reps))
    k = int(fields["sample"].nunique())
    model, _ = job.fit_field_clusters(fields, profiles, cfg, k, job.fields_focus(reps, cfg))
    nearest = nearest_other(model.scale(profiles))
    samples, phen = fields["sample"].astype(str).to_numpy(), job.phenotype_map(reps)
    return pd.DataFrame({"phenotype": [phen.get(s, s) for s in samples],
                         "nearest": [phen.get(s, s) for s in samples[nearest]], "split": fields["split"].to_numpy(),
                         "blurred": fields["blurred"].to_numpy(), "own": samples[nearest] == samples})


def misplaced_table(found: pd.DataFrame) -> str:
    """Markdown: misplaced fields by split and focus flag, then by phenotype pair."""
    lines = ["| fields | misplaced | of | share |", "|---|---|---|---|"]
    for name, rows in (("held-out samples", found["split"] == "test"), ("training samples", found["split"] != "test"),
                       ("flagged blurred", found["blurred"]), ("in focus", ~found["blurred"])):
        wrong, total = int((~found["own"] & rows).sum()), int(rows.sum())
        lines.append(f"| {name} | {wrong} | {total} | {wrong / max(total, 1):.1%} |")
    pairs = found[~found["own"]].groupby(["phenotype", "nearest"]).size().sort_values(ascending=False)
    lines += ["", "| field's phenotype | nearest field's phenotype | fields |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {n} |" for (a, b), n in pairs.items()]
    return "\n".join(lines) + "\n"


def score_run(folder: Path, reps, plan: list[tuple], scales: list[int]) -> dict[str, dict[str, float]]:
    """Every recipe of ``plan`` (and scale) on one run, ``reps`` its representations (``load``)."""
    cfg = ClusterSettings()
    focus = job.fields_focus(reps, cfg)
    radii = sorted({recipe[-1] for recipe in plan if recipe[-1]})
    keys = set(zip(reps.table["sample"].astype(str), reps.table["field"].astype(str), strict=True))
    opens = open_space(open_store(str(folder / "store.zarr")), keys, radii) if radii else {}
    out = {}
    for recipe in plan:
        whole, held = (group(reps, split, recipe, cfg, focus, opens) for split in ("all", "test"))
        out[recipe[0]] = dict(zip(SCORES, (whole["image_ari"], held["image_ari"], whole["nn_accuracy"]), strict=True))
    return out | (scale_scores(folder, reps, scales, cfg, focus) if scales else {})


def table(results: dict[str, dict[str, dict[str, float]]], names: list[str]) -> str:
    lines = ["| variant | " + " | ".join(f"{s} mean (min)" for s in SCORES) + " |",
             "|---|" + "---|" * len(SCORES)]
    for name in names:
        cells = []
        for score in SCORES:
            values = np.array([run[name][score] for run in results.values()], np.float64)
            cells.append(f"{values.mean():.3f} ({values.min():.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{len(results)} runs: {', '.join(results)}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", nargs="+", required=True, help="quality folders (out/quality-TAG) of finished runs")
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.12, 0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--density", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--fg-powers", type=float, nargs="+", default=[0.0, 0.5],
                        help="powers of each window's foreground fraction in its weight (1: as cluster does)")
    parser.add_argument("--scales", type=int, nargs="*", default=[],
                        help="window edges to embed each run's fields at again (needs its checkpoints and store)")
    parser.add_argument("--open", type=int, nargs="*", default=[],
                        help="radii (px) of open space: the share of a field that far from its foreground, as one "
                        "more profile feature beside the cover (needs the run's store)")
    parser.add_argument("--open-weights", type=float, nargs="+", default=[1.0], help="weights of the open space")
    parser.add_argument("--misplaced", action="store_true",
                        help="also count the fields whose nearest field is of another sample (default profile)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--tag", default="", help="name of the report (out/profiles-TAG)")
    args = parser.parse_args(argv)
    plan = variants(args.ridges, args.density, args.fg_powers, args.open, args.open_weights)
    runs = sorted(run for tag in args.tags for run in (args.out / f"quality-{tag}").glob("*")
                  if (run / "representations.zarr").exists())
    if not runs:
        raise SystemExit(f"no finished runs under {args.out} for tags {args.tags}")
    heldout = [r for r in runs if r.name.startswith("heldout")]
    if heldout:
        raise SystemExit(f"{heldout[0]}: a held-out run; choose profile settings on development runs only")
    results, found = {}, []
    for run in runs:
        reps, name = load(run), f"{run.parent.name}/{run.name}"
        scored = results[name] = score_run(run, reps, plan, args.scales)
        print(run.name, json.dumps({k: round(v["all-sample image ARI"], 3) for k, v in scored.items()}),
              flush=True, file=sys.stderr)
        if args.misplaced:
            found.append(misplaced(reps).assign(run=name))
    name = "profiles" + (f"-{args.tag}" if args.tag else "")
    names = list(next(iter(results.values())))
    markdown, report = table(results, names), {"variants": names, "runs": results}
    if args.misplaced:
        found = pd.concat(found)
        markdown += "\nFields whose nearest field is of another sample (default profile):\n\n"
        markdown += misplaced_table(found)
        report["misplaced"] = found[~found["own"]].drop(columns="own").to_dict(orient="records")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
