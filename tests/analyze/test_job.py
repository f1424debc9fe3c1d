"""``cellmi cluster`` end to end on a small run folder: outputs, metrics, apply_to, S3, errors."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd

from cellmi.analyze.job import SCORE_KEYS, run_analysis
from cellmi.cli import main as cli_main
from cellmi.representations import read_parquet, write_representations
from cellmi.settings import Settings
from cellmi.store import exists, join, read_bytes

from .conftest import TEST, make_reps, make_store

OUTPUTS = (
    "clusters_windows.parquet",
    "clusters_images.parquet",
    "metrics.json",
    "model.joblib",
    "umap.png",
    "confusion.png",
    "gallery.png",
    "cluster_traits.csv",
    "maps.zarr/zarr.json",
    "report.html",
)


def test_writes_every_output(analysed):
    for name in OUTPUTS:
        assert os.path.getsize(join(analysed, name)) > 0, name
    with open(join(analysed, "umap.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_is_self_contained(analysed):
    page = read_bytes(join(analysed, "report.html")).decode()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 2 + 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:|//)', page)
    for text in ("image ARI", "handcrafted", "group 2", "Provenance", "synthetic-test"):
        assert text in page, text


def test_report_answers_the_users_question_before_the_evidence(analysed):
    page = read_bytes(join(analysed, "report.html")).decode()
    order = [
        "<b>3 morphology groups</b> among 3 samples (12 fields, 180 windows) of the test split",
        "DNA blue",
        "<h2>The groups</h2>",
        'class="strip"',
        "napari --plugin napari-ome-zarr",
        "<h2>Every field</h2>",
        "<h2>Evidence</h2>",
        "Scores: DIM beside the baselines",
        "<h2>Provenance</h2>",
    ]
    places = [page.find(text) for text in order]
    assert -1 not in places and places == sorted(places), dict(zip(order, places, strict=True))
    for sample in sorted(TEST):  # each group names its sample and its known phenotype
        assert f"{sample} (ph{int(sample[1:])}) &times;4" in page


def test_cluster_traits_follow_the_pixels(analysed):
    """Fixture fields get brighter with the sample index; each cluster is one sample."""
    traits = pd.read_csv(join(analysed, "cluster_traits.csv"))
    assert len(traits) == 3 and (traits["main_sample_share"] == 1.0).all()
    ordered = traits.sort_values("main_sample")
    assert ordered["main_sample"].tolist() == sorted(TEST)
    for channel in ("DNA", "pH3", "actin"):
        assert ordered[f"intensity_{channel}"].is_monotonic_increasing, channel
        assert ordered[f"bright_area_{channel}"].is_monotonic_increasing, channel
    np.testing.assert_allclose(traits["fg_fraction"], 0.5)
    words = ordered["distinguishing"].fillna("").tolist()
    assert "dimmer" in words[0] and "brighter" not in words[0]  # S00, the dimmest sample
    assert "more" in words[-1] and "-bright area (+" in words[-1]  # S04, the brightest


def test_cluster_maps_paint_each_window_with_its_cluster(analysed):
    """The fixture's windows tile each field (stride = window), so every kept window's square is its cluster."""
    import zarr

    windows = pd.read_parquet(join(analysed, "clusters_windows.parquet"))
    root = zarr.open_group(join(analysed, "maps.zarr"), mode="r")
    assert sorted(root.attrs["cellmi"]["maps"]) == sorted(f"{s}_{f}" for s in TEST for f in ("1", "2", "3", "4"))
    for (sample, field), rows in windows.groupby(["Metadata_sample", "Metadata_field"]):
        painted = root[f"{sample}_{field}/labels/clusters/0"][...]
        expected = np.zeros_like(painted)
        for y, x, k in zip(rows["Metadata_y"], rows["Metadata_x"], rows["cluster"], strict=True):
            expected[y : y + 32, x : x + 32] = k + 1
        np.testing.assert_array_equal(painted, expected)  # the background window (0, 0) stays 0


def test_a_gfp_and_dna_plate_is_shown_in_its_own_colours(tmp_path):
    """Colours and words come from the store's channels: GFP orange (as set at ingest) and DNA blue."""
    root = str(tmp_path)
    make_store(join(root, "store.zarr"), samples=sorted(TEST), channels=("GFP", "DNA"), colours=["FF8000", "0000FF"])
    write_representations(join(root, "representations.zarr"), make_reps(join(root, "store.zarr")))
    run_analysis(Settings(workdir=root, cluster={"baselines": False}))
    page = read_bytes(join(root, "analysis", "report.html")).decode()
    answer = page[: page.index("<h2>Provenance</h2>")]  # the settings below it list the default channels
    assert "GFP orange" in answer and "DNA blue" in answer
    assert "pH3" not in answer and "actin" not in answer
    traits = pd.read_csv(join(root, "analysis", "cluster_traits.csv"))
    assert {"intensity_GFP", "bright_area_DNA", "object_size_GFP"} <= set(traits.columns)
    assert any("GFP" in str(w) for w in traits["distinguishing"])


def test_tables_have_metadata_columns_and_the_test_split_only(analysed):
    windows = pd.read_parquet(join(analysed, "clusters_windows.parquet"))
    images = pd.read_parquet(join(analysed, "clusters_images.parquet"))
    for col in (
        "Metadata_sample",
        "Metadata_field",
        "Metadata_y",
        "Metadata_x",
        "cluster",
        "probability",
        "cluster_random",
        "cluster_handcrafted",
    ):
        assert col in windows.columns, col
    for col in ("Metadata_sample", "Metadata_field", "cluster", "share", "cluster_vote", "cluster_profile"):
        assert col in images.columns, col
    assert set(windows["Metadata_sample"]) == TEST and set(images["Metadata_sample"]) == TEST
    assert len(windows) == 3 * 4 * 15  # background windows (one per field) are left out
    assert len(images) == 12 and (images["n_windows"] == 15).all()
    assert ((windows["probability"] > 0) & (windows["probability"] <= 1)).all()
    assert images["share"].between(0, 1).all()
    np.testing.assert_array_equal(images["cluster"], images["cluster_profile"])  # default: profile
    assert images["focus"].notna().all() and images["blurred"].dtype == bool  # focus read from the store


def test_metrics_structure_and_dim_beats_both_baselines(analysed):
    metrics = json.loads(read_bytes(join(analysed, "metrics.json")))
    for name in ("dim", "random", "handcrafted"):
        assert set(metrics[name]) == {"test", "train", "all"}
        for split in ("test", "train", "all"):
            assert set(metrics[name][split]) == set(SCORE_KEYS)
        assert metrics[name]["train"]["window_ari"] is None  # only the clustered split has windows
        assert metrics[name]["all"]["window_probe"] is None
    dim, rand = metrics["dim"], metrics["random"]
    # the fixture's DIM vectors are well-separated blobs per sample; 'random' is pure noise
    assert dim["test"]["image_ari"] == 1.0 and dim["test"]["window_ari"] == 1.0
    assert dim["all"]["image_ari"] == 1.0 and dim["all"]["n_samples"] == 6
    assert dim["test"]["image_ari_phenotype"] == 1.0 and dim["test"]["map"] == 1.0
    for key in ("window_ari", "image_ari", "map", "nn_accuracy", "window_probe"):
        assert dim["test"][key] > rand["test"][key], key
        assert dim["test"][key] >= metrics["handcrafted"]["test"][key], key
    assert rand["test"]["window_ari"] < 0.2
    assert metrics["n_clusters"] == 3 and "cluster dim" in metrics["timings_s"]


def test_baselines_in_a_second_process_give_the_same_results(tmp_path, workdir, analysed):
    """baselines_apart_above=0 forces the second process even for the fixture's few windows."""
    import shutil

    copy = str(tmp_path / "run")
    shutil.copytree(join(workdir, "representations.zarr"), join(copy, "representations.zarr"))
    assert cli_main(["cluster", "--workdir", copy, "--cluster.baselines_apart_above", "0"]) == 0
    apart, here = (json.loads(read_bytes(join(d, "metrics.json"))) for d in (join(copy, "analysis"), analysed))
    assert "cluster random (apart)" in apart["timings_s"] and "cluster random" not in apart["timings_s"]
    for name in ("dim", "random", "handcrafted"):
        assert apart[name] == here[name], name
    tables = [pd.read_parquet(join(d, "clusters_windows.parquet")) for d in (join(copy, "analysis"), analysed)]
    pd.testing.assert_frame_equal(*tables)


def test_apply_to_assigns_the_same_clusters_to_the_same_data(workdir, analysed):
    url = join(workdir, "representations.zarr")
    assert cli_main(["cluster", "--workdir", workdir, "--cluster.apply_to", url]) == 0
    applied = join(analysed, "applied")
    original = pd.read_parquet(join(analysed, "clusters_windows.parquet"))
    again = pd.read_parquet(join(applied, "clusters_windows.parquet"))
    keys = ["Metadata_sample", "Metadata_field", "Metadata_y", "Metadata_x"]
    merged = original.merge(again, on=keys, suffixes=("", "_applied"), validate="1:1")
    assert len(merged) == len(original)
    np.testing.assert_array_equal(merged["cluster"], merged["cluster_applied"])
    images = pd.read_parquet(join(analysed, "clusters_images.parquet")).merge(
        pd.read_parquet(join(applied, "clusters_images.parquet")),
        on=["Metadata_sample", "Metadata_field"],
        suffixes=("", "_applied"),
    )
    np.testing.assert_array_equal(images["cluster"], images["cluster_applied"])
    np.testing.assert_array_equal(images["cluster_vote"], images["cluster_vote_applied"])
    # the training samples were never fitted: placed by transform into the same three clusters
    train = again[~again["Metadata_sample"].isin(TEST)]
    assert len(train) == 3 * 4 * 15 and train["cluster"].between(0, 2).all()


def test_apply_to_profiles_with_the_density_feature_the_model_was_fitted_with(tmp_path, workdir):
    """A model fitted with cluster.profile_density profiles applied data with the foreground share too."""
    import shutil

    copy = str(tmp_path / "run")
    shutil.copytree(join(workdir, "representations.zarr"), join(copy, "representations.zarr"))
    fit = ["cluster", "--workdir", copy, "--no-cluster.baselines", "--no-cluster.maps"]
    assert cli_main([*fit, "--cluster.profile_density", "2"]) == 0
    url = join(copy, "representations.zarr")
    assert cli_main([*fit, "--cluster.apply_to", url]) == 0  # the density setting is the model's, not this run's
    images = [pd.read_parquet(join(copy, "analysis", *sub, "clusters_images.parquet")) for sub in ((), ("applied",))]
    merged = images[0].merge(images[1], on=["Metadata_sample", "Metadata_field"], suffixes=("", "_applied"))
    assert len(merged) == len(images[0]) > 0
    np.testing.assert_array_equal(merged["cluster_profile"], merged["cluster_profile_applied"])
    np.testing.assert_allclose(merged["fg_share"], merged["fg_share_applied"])


def test_apply_to_new_data_from_parquet(tmp_path, workdir, analysed):
    """A perturbed copy (new vectors) as a Parquet table lands in the clusters of the originals."""
    from cellmi.representations import to_frame, write_parquet

    reps = make_reps(join(workdir, "store.zarr"), seed=5)
    url = str(tmp_path / "new.parquet")
    write_parquet(url, to_frame(reps))
    assert cli_main(["cluster", "--workdir", workdir, "--cluster.apply_to", url]) == 0
    new = pd.read_parquet(join(analysed, "applied", "clusters_images.parquet"))
    old = pd.read_parquet(join(analysed, "clusters_images.parquet"))
    both = old.merge(new, on=["Metadata_sample", "Metadata_field"], suffixes=("", "_new"))
    np.testing.assert_array_equal(both["cluster_vote"], both["cluster_vote_new"])
    np.testing.assert_array_equal(both["cluster_profile"], both["cluster_profile_new"])


def test_bic_selection_and_all_split(tmp_path, workdir):
    """split all + BIC on the fixture: six blobs, six clusters; galleries skipped without a store."""
    root = str(tmp_path)
    reps = make_reps(str(tmp_path / "missing-store.zarr"))
    write_representations(join(root, "representations.zarr"), reps)
    settings = Settings(
        workdir=root,
        cluster={"split": "all", "select": "bic", "bic_min": 2, "bic_max": 9, "baselines": False},
    )
    metrics = run_analysis(settings)
    # UMAP clumps are not Gaussian, so BIC may split one: at least one cluster per sample, none mixed
    assert 6 <= metrics["n_clusters"] <= 8 and set(metrics["bic"]) == {str(k) for k in range(2, 10)}
    assert metrics["dim"]["all"]["window_purity"] == 1.0 and metrics["dim"]["all"]["window_ari"] > 0.8
    assert "random" not in metrics
    assert exists(join(root, "analysis", "bic.png")) and not exists(join(root, "analysis", "gallery.png"))
    assert not exists(join(root, "analysis", "maps.zarr"))  # the maps need the image store too
    assert "galleries and traits unavailable" in read_bytes(join(root, "analysis", "report.html")).decode()


def test_run_folder_on_s3(s3_env, monkeypatch):
    root = f"{s3_env}/run"
    make_store(join(root, "store.zarr"), samples=sorted(TEST))  # the galleries need the test split only
    write_representations(join(root, "representations.zarr"), make_reps(join(root, "store.zarr")))
    monkeypatch.setenv("CELLMI_CLUSTER__BASELINES", "false")
    assert cli_main(["cluster", "--workdir", root]) == 0
    for name in OUTPUTS:
        assert exists(join(root, "analysis", name)), name
    images = read_parquet(join(root, "analysis", "clusters_images.parquet"))
    assert len(images) == 12


def test_bad_input_is_one_line_user_error(tmp_path, capsys):
    root = str(tmp_path)
    assert cli_main(["cluster", "--workdir", root]) == 2
    assert "run `cellmi infer` first" in capsys.readouterr().err
    reps = make_reps(str(tmp_path / "store.zarr"))
    reps.features["dim"][3, 2] = np.nan
    write_representations(join(root, "representations.zarr"), reps)
    assert cli_main(["cluster", "--workdir", root]) == 2
    err = capsys.readouterr().err.strip()
    assert "'dim' holds NaN" in err and len(err.splitlines()) == 1
    reps.features["dim"][3, 2] = 0.0
    reps.table["split"] = "train"
    write_representations(join(root, "representations.zarr"), reps)
    assert cli_main(["cluster", "--workdir", root]) == 2
    assert "no windows in split 'test'" in capsys.readouterr().err
    assert (
        cli_main(["cluster", "--workdir", root, "--cluster.apply_to", join(root, "representations.zarr")])
        == 2
    )
    assert "no saved clustering model" in capsys.readouterr().err
