"""How far each nuisance of the synthetic screen moves a trained encoder's field profiles, against how far
fields lie from the nearest field of another sample.

    python benchmarks/bench_nuisance.py --runs benchmarks/out/quality-base/dev-d2-s0-t0 [more runs] --tag T

Each run is a finished ``cellmi run`` on a synthetic development draw (``bench_quality.py --suite dev`` makes
them; held-out runs are refused, as augmentations are chosen on development draws): its encoder
(checkpoints), its store and its settings (the draw, the variation level). Its held-out fields are made
again by the generator with the very nuisances they were drawn with (checked: the same bits as the
store), then once more with one nuisance set to the strength of the held-out level (``LEVELS``), the
same cells and the same camera: every other draw of the field stays as it was. Masks are made as
``ingest`` makes them, and profiles as ``bench_profiles.py --scales`` makes them (windows of the
training crop, a quarter window apart, evened), every field's clean profile included.

Distances are Euclidean over profile features standardised across the run's clean fields. Per
nuisance: ``moved``, the median distance from a field's clean profile to its profile under the
nuisance; ``gap``, the median distance from a clean profile to the nearest clean field of another
sample; and ``NN kept``, the share of fields whose nearest clean field (its own clean self left out)
is of its own sample, clean and under the nuisance. A nuisance that moves profiles by a fair share of
the gap is one the encoder has not learnt to ignore: a candidate for augmentation. Nuisances that
change the cells themselves (density, cell size, touching colonies) are not here: they make another
field, not the same field under other conditions.

Writes benchmarks/out/nuisance[-tag].json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_profiles' profile of one scale

from bench_profiles import scale_profiles

from cellmi.analyze import job
from cellmi.analyze.profiles import field_profiles
from cellmi.data.masks import foreground_mask
from cellmi.data.nuisance import LEVELS, Nuisances, draw_nuisances
from cellmi.data.synth import PHENOTYPES, sample_id, synth_field
from cellmi.representations import load_representations
from cellmi.store import open_store
from cellmi.train.checkpoint import load_encoder

OUT = Path(__file__).resolve().parent / "out"


def variants(nz: Nuisances, level: str, angle: float) -> dict[str, Nuisances]:
    """The field's own nuisances with one of them at the strongest of ``level``."""
    r = LEVELS[level]
    shift = r.well_stain + r.channel_drift
    stain = tuple(s * f for s, f in zip(nz.stain, (1 + shift, 1 - shift, 1 + shift), strict=True))
    return {
        "none (made again)": nz,
        "stain (channels +-)": replace(nz, stain=stain),
        "vignette": replace(nz, vignette=(r.vignette[1], r.vignette[0], (r.vignette[0] + r.vignette[1]) / 2)),
        "background texture": replace(nz, texture=r.texture),
        "debris": replace(nz, specks=max(1, round(r.specks)), fibres=max(1, round(r.fibres))),
        "slight blur": replace(nz, blur=r.blur),
        "defocus (sigma 2.5)": replace(nz, blur=2.5),
        "focus gradient": replace(nz, tilt=1.0 + r.tilt_blur, tilt_angle=angle),
    }


class _Fields:
    """A store's reads with the pixels and masks of re-made fields put in their place."""

    def __init__(self, store, made: dict[tuple[str, str], np.ndarray], mask_pixels: int) -> None:
        self.store, self.made, self.mask_pixels = store, made, mask_pixels

    def __getattr__(self, name):
        return getattr(self.store, name)

    def read_image(self, sample: str, field: str) -> np.ndarray:
        return self.made[sample, field]

    def read_mask(self, sample: str, field: str) -> np.ndarray:
        return foreground_mask(self.made[sample, field], self.mask_pixels, seed=0)  # as ingest makes it


def sample_index(sample: str) -> int:
    return [sample_id(i) for i in range(len(PHENOTYPES))].index(sample)


def remade(synth: dict, sample: str, field: str, nz: Nuisances | None) -> np.ndarray:
    """The field made again by the generator (its own nuisances when ``nz`` is None)."""
    made = synth_field(sample_index(sample), int(field) - 1, synth["seed"], synth["size"], synth["variation"], nz)
    return made.pixels


def made_under(store, synth: dict, keys: list[tuple[str, str]], level: str) -> dict[str, dict]:
    """Nuisance -> {(sample, field): pixels} for ``keys``, each field first checked against the store."""
    rng = np.random.default_rng(0)
    plan: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    for sample, field in keys:
        own = remade(synth, sample, field, None)
        if not np.array_equal(own, store.read_image(sample, field)):
            raise SystemExit(f"{store.url}: field {sample}/{field} is not the generator's (settings {synth})")
        nz = draw_nuisances(synth["seed"], sample_index(sample), int(field) - 1, synth["variation"])
        for name, changed in variants(nz, level, rng.uniform(0, 2 * np.pi)).items():
            plan.setdefault(name, {})[sample, field] = own if changed == nz else remade(synth, sample, field, changed)
    return plan


def score_run(folder: Path, level: str) -> dict[str, dict[str, float]]:
    """Per nuisance: median moved, median gap, NN kept clean and under the nuisance (held-out fields)."""
    settings = json.loads((folder / "settings.json").read_text())
    encoder, _ = load_encoder(str(folder / "checkpoints"))
    store = open_store(str(folder / "store.zarr"))
    reps = load_representations(str(folder / "representations.zarr"))
    window = job.window_of(reps)
    fields, _ = field_profiles(reps.table, reps.features["dim"], "even", False, window)
    clean = scale_profiles(encoder, store, fields, window)
    scale = clean.std(axis=0) + 1e-6
    clean /= scale
    samples = fields["sample"].astype(str).to_numpy()
    held = np.flatnonzero((fields["split"] == "test").to_numpy())
    rows = fields.iloc[held]
    keys = list(zip(rows["sample"].astype(str), rows["field"].astype(str), strict=True))
    gap = float(np.median(gaps(clean, held, samples)))
    kept = float(nearest_is_own(clean, clean[held], held, samples).mean())
    out = {}
    for name, made in made_under(store, settings["synth"], keys, level).items():
        under = scale_profiles(encoder, _Fields(store, made, settings["ingest"]["mask_pixels"]), rows, window)
        under /= scale
        out[name] = {"moved": float(np.median(np.linalg.norm(under - clean[held], axis=1))), "gap": gap,
                     "NN kept clean": kept, "NN kept": float(nearest_is_own(clean, under, held, samples).mean())}
    return out


def gaps(profiles: np.ndarray, rows: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Distance from each of ``rows`` to the nearest field of another sample."""
    far = np.linalg.norm(profiles[None] - profiles[rows, None], axis=2)
    far[samples[None] == samples[rows, None]] = np.inf
    return far.min(axis=1)


def nearest_is_own(profiles: np.ndarray, query: np.ndarray, rows: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Whether the nearest of ``profiles`` to each query (row ``rows[i]`` itself left out) is of its sample."""
    far = np.linalg.norm(profiles[None] - query[:, None], axis=2)
    far[np.arange(len(rows)), rows] = np.inf
    return samples[far.argmin(axis=1)] == samples[rows]


def refuse_heldout(folder: Path) -> None:
    """Augmentations are chosen on development draws only (quality-protocol.md)."""
    settings = folder / "settings.json"
    if not settings.exists():
        raise SystemExit(f"{folder}: not a finished `cellmi run` folder (no settings.json)")
    if json.loads(settings.read_text())["synth"]["variation"] == "heldout":
        raise SystemExit(f"{folder}: a held-out run; measure nuisances on development runs only")


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    names = list(next(iter(results.values())))
    lines = ["| nuisance (held-out strength) | moved | gap | moved / gap | NN kept, clean | NN kept, under it |",
             "|---|---|---|---|---|---|"]
    for name in names:
        got = {k: np.mean([run[name][k] for run in results.values()]) for k in ("moved", "gap", "NN kept clean",
                                                                                "NN kept")}
        lines.append(f"| {name} | {got['moved']:.2f} | {got['gap']:.2f} | {got['moved'] / got['gap']:.2f} | "
                     f"{got['NN kept clean']:.3f} | {got['NN kept']:.3f} |")
    return "\n".join(lines) + f"\n\nMeans over {len(results)} runs: {', '.join(results)}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished synthetic `cellmi run` folders")
    parser.add_argument("--level", default="heldout", choices=sorted(LEVELS), help="strength of each nuisance")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for folder in args.runs:
        refuse_heldout(folder)
    results = {}
    for folder in args.runs:
        results[folder.name] = got = score_run(folder, args.level)
        print(f"{folder.name}: " + ", ".join(f"{k} {v['moved']:.2f}/{v['gap']:.2f}" for k, v in got.items()),
              flush=True)
    name = "nuisance" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"level": args.level, "runs": results}, indent=1))
    (args.out / f"{name}.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
