"""The HTML report: self-contained, and rendered by a real headless Chromium without errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

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


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(analysed, tmp_path):
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
        "file://" + join(analysed, "report.html"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # page-level failures (console errors, blocked or failed loads) would be logged like this
    bad = [line for line in done.stderr.splitlines() if re.search(r"CONSOLE|Uncaught|net::ERR_", line)]
    assert not bad, bad
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (3000, 1200)
    assert image.std() > 10  # text, tables and figures, not a blank page
    # colour in the page: the embedded figures and galleries were decoded and drawn
    assert (np.ptp(image.astype(int), axis=2) > 60).mean() > 0.01
