"""The HTML report: self-contained, and rendered by a real headless Chromium without errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellmi.analyze.figures import confusion_figure
from cellmi.analyze.gallery import strip_png
from cellmi.analyze.metrics import confusion
from cellmi.analyze.report import ClusterView, ReportData, render_report
from cellmi.store import join

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


def test_render_is_self_contained_and_escaped():
    png = b"\x89PNG\r\n\x1a\nfake"
    metrics = {
        "image_labels": "profile",
        "dim": {"test": {"n_samples": 4, "image_ari": 1.0, "window_ari": 0.5}},
        "random": {"test": {"n_samples": 4, "image_ari": 0.1, "window_ari": None}},
    }
    page = render_report(
        ReportData(
            title="<run & co>",
            metrics=metrics,
            settings={"workdir": "s3://b/<x>"},
            provenance={"store": "s3://b/store.zarr"},
            figures=[("umap", png)],
            clusters=[ClusterView(0, png, {"cluster": 0, "windows": 3})],
        )
    )
    assert "&lt;run &amp; co&gt;" in page and "<run & co>" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:|//)', page) and "<script" not in page
    assert '<td class="best">1.000</td>' in page  # DIM's better score is highlighted


def big_screen(samples: int = 120, fields: int = 4, groups: int = 24) -> ReportData:
    """A generated screen of many samples: each sample's fields in one group, its last field in the next."""
    rng = np.random.default_rng(0)
    rows = [
        {
            "Metadata_sample": f"P{i:03d}",
            "Metadata_field": str(f),
            "Metadata_phenotype": f"compound {i % 30}",
            "cluster": (i + (f == fields)) % groups,
            "share": 0.8,
            "n_windows": 20,
            "blurred": False,
        }
        for i in range(samples)
        for f in range(1, fields + 1)
    ]
    strip = strip_png([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(8)])
    views = [
        ClusterView(k, strip, {"cluster": k, "windows": 400, "share": 1 / groups}, [f"brighter GFP (+{k / 9:.1f} SD)"])
        for k in range(groups)
    ]
    scores = {"n_samples": samples, "n_images": samples * fields, "n_windows": samples * fields * 20}
    scores.update(n_clusters=groups, window_ari=0.5)
    metrics = {"split": "all", "image_labels": "profile", "n_clusters": groups, "dim": {"all": scores}}
    fields = pd.DataFrame(rows)
    counts = confusion(fields["Metadata_sample"].to_numpy(), fields["cluster"].to_numpy())
    return ReportData(
        "screen of 120 samples",
        metrics,
        {},
        {},
        figures=[("confusion", confusion_figure([("images", counts)]))],
        clusters=views,
        fields=fields,
        channels=[("GFP", "00FF00"), ("DNA", "0000FF")],
        maps="s3://bucket/run/analysis/maps.zarr",
    )


class VisibleRows(HTMLParser):
    """Rows of each table that shows without opening a closed <details>."""

    def __init__(self) -> None:
        super().__init__()
        self.details: list[bool] = []  # open or not, innermost last
        self.tables: list[int | None] = []  # rows so far of each open table (None: hidden)
        self.shown: list[int] = []

    def handle_starttag(self, tag, attrs):
        if tag == "details":
            self.details.append("open" in dict(attrs))
        elif tag == "table":
            self.tables.append(None if not all(self.details) else 0)
        elif tag == "tr" and self.tables and self.tables[-1] is not None:
            self.tables[-1] += 1

    def handle_endtag(self, tag):
        if tag == "details":
            self.details.pop()
        elif tag == "table":
            rows = self.tables.pop()
            if rows is not None:
                self.shown.append(rows)


def visible_rows(page: str) -> list[int]:
    parser = VisibleRows()
    parser.feed(page)
    return parser.shown


def test_a_screen_of_120_samples_stays_readable():
    page = render_report(big_screen())
    assert "<b>24 morphology groups</b> among 120 samples (480 fields, 9600 windows) of the all split" in page
    assert all(f">P{i:03d}<" in page for i in range(120))  # every sample is in the field table
    assert page.count('<details class="group" id="group-') == 24  # one section per group, all closed
    assert '<details class="group" id="group-0" open' not in page
    # group 0: three fields each of P000, P024, ... P096, and the last field of P023, P047, ... P119
    assert (
        "P000 (compound 0) &times;3, P024 (compound 24) &times;3, P048 (compound 18) &times;3, "
        "P072 (compound 12) &times;3, P096 (compound 6) &times;3, P023 (compound 23) &times;1, and 4 more"
    ) in page
    shown = visible_rows(page)
    assert shown and max(shown) <= 25  # the 24-group overview and its header; every long table is collapsed
    assert "napari --plugin napari-ome-zarr s3://bucket/run/analysis/maps.zarr/&lt;sample&gt;_&lt;field&gt;" in page
    assert "<script" not in page and not re.search(r'(href|src)="(https?:|//)', page)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("which", ["job", "120 samples"])
def test_report_renders_in_headless_chromium(analysed, tmp_path, which):
    page = join(analysed, "report.html")
    if which != "job":
        page = str(tmp_path / "big.html")
        with open(page, "w") as handle:
            handle.write(render_report(big_screen()))
    shot = tmp_path / "report.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,3000",
        "--enable-logging=stderr",
        f"--screenshot={shot}",
        "file://" + page,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # page-level failures (console errors, blocked or failed loads) would be logged like this
    bad = [line for line in done.stderr.splitlines() if re.search(r"CONSOLE|Uncaught|net::ERR_", line)]
    assert not bad, bad
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (3000, 1200)
    assert image.std() > 10  # text, tables and figures, not a blank page
    # colour in the page: the embedded figures, galleries and swatches were decoded and drawn (the big page
    # shows its groups collapsed, so less of it is in colour)
    assert (np.ptp(image.astype(int), axis=2) > 60).mean() > (0.01 if which == "job" else 0.004)
