"""One self-contained HTML page: every image is embedded as base64, no script, no external link."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

FEATURE_SETS = ("dim", "random", "handcrafted")
SHOWN = (
    ("window_ari", "window ARI vs sample"),
    ("window_nmi", "window NMI vs sample"),
    ("window_purity", "window purity"),
    ("image_ari", "image ARI (default labels)"),
    ("image_nmi", "image NMI (default labels)"),
    ("image_ari_vote", "image ARI, window vote"),
    ("image_ari_profile", "image ARI, field profiles"),
    ("image_purity", "image purity"),
    ("window_ari_phenotype", "window ARI vs phenotype"),
    ("image_ari_phenotype", "image ARI vs phenotype"),
    ("map", "own-sample retrieval mAP"),
    ("nn_accuracy", "1-NN accuracy (same sample)"),
)
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.best{font-weight:bold;background:#e8f4e8}
img{max-width:100%}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.8em;font-size:.75em;overflow-x:auto}
.strip img{image-rendering:pixelated;height:96px;max-width:none}.muted{color:#777}
"""


@dataclass
class ClusterView:
    """What the report shows of one window cluster: a strip of windows and its traits."""

    cluster: int
    strip_png: bytes | None
    traits: dict[str, Any]


@dataclass
class ReportData:
    title: str
    metrics: dict[str, Any]
    settings: dict[str, Any]
    provenance: dict[str, Any]
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG)
    clusters: list[ClusterView] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _fmt(value: Any) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def metrics_table(metrics: dict[str, Any], split: str) -> str:
    """Rows: scores; columns: feature sets; the best score in a row is highlighted."""
    sets = [s for s in FEATURE_SETS if isinstance(metrics.get(s), dict) and split in metrics[s]]
    if not sets:
        return ""
    head = "".join(f"<th>{html.escape(s)}</th>" for s in sets)
    body = []
    for key, label in SHOWN:
        values = [metrics[s][split].get(key) for s in sets]
        if all(v is None for v in values):
            continue
        top = max((v for v in values if v is not None), default=None)
        cells = "".join(
            f'<td class="best">{_fmt(v)}</td>'
            if v is not None and v == top and len(sets) > 1
            else f"<td>{_fmt(v)}</td>"
            for v in values
        )
        body.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    sizes = metrics[sets[0]][split]
    caption = (
        f"split <b>{html.escape(split)}</b>: {sizes.get('n_samples')} samples, "
        f"{sizes.get('n_images')} images, {sizes.get('n_windows') or '-'} windows, "
        f"{sizes.get('n_clusters')} clusters"
    )
    return f"<p>{caption}</p><table><tr><th>score</th>{head}</tr>{''.join(body)}</table>"


def traits_table(clusters: list[ClusterView]) -> str:
    if not clusters:
        return ""
    frame = pd.DataFrame([c.traits for c in clusters])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def _galleries(clusters: list[ClusterView]) -> str:
    parts = []
    for view in clusters:
        t = view.traits
        line = f"{t.get('windows')} windows, mostly sample {html.escape(str(t.get('main_sample')))}"
        if isinstance(t.get("main_sample_share"), float):
            line += f" ({t['main_sample_share']:.0%})"
        strip = _img(view.strip_png, f"cluster {view.cluster}") if view.strip_png else ""
        parts.append(
            f'<h3>cluster {view.cluster}</h3><p class="muted">{line}</p><div class="strip">{strip}</div>'
        )
    return "".join(parts)


def render_report(data: ReportData) -> str:
    """The whole page as one HTML string."""
    metrics = data.metrics
    splits = [
        s
        for s in ("test", "train", "all")
        if any(isinstance(metrics.get(f), dict) and s in metrics[f] for f in FEATURE_SETS)
    ]
    tables = "".join(metrics_table(metrics, s) for s in splits)
    figures = "".join(
        f"<figure>{_img(png, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, png in data.figures
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(data.title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(data.title)}</h1>
<ul>{notes}</ul>
<h2>Metrics: DIM beside the baselines</h2>
<p>random = the same encoder with untrained weights; handcrafted = per-window intensity and texture
statistics. Image labels come from <b>{html.escape(str(metrics.get("image_labels")))}</b>; a dash means
not computed for that split.</p>
{tables}
<h2>Figures</h2>
{figures}
<h2>Clusters</h2>
<p>Per window cluster: the windows nearest its centre (DNA blue, pH3 green, actin red; one
display range for all) and simple traits measured on the pixels.</p>
{traits_table(data.clusters)}
{_galleries(data.clusters)}
<h2>Settings</h2>
<pre>{html.escape(json.dumps(data.settings, indent=2, sort_keys=True))}</pre>
<h2>Provenance</h2>
<pre>{html.escape(json.dumps(data.provenance, indent=2, sort_keys=True, default=str))}</pre>
</body></html>
"""
