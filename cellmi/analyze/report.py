"""One self-contained HTML page: every image is embedded as base64, no script, no external link.

The page answers the user's question first (how many morphology groups, which samples and fields
fall in each, what their windows look like, what sets each apart), then shows the evidence
(figures, scores against the baselines), then provenance. Long tables and lists sit in
``<details>`` so the page stays readable for screens of hundreds of samples.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cellmi.analyze.figures import cluster_palette
from cellmi.colours import colour_word

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
    ("window_probe", "window probe accuracy (sample, held-out fields)"),
)
MAX_ROWS = 15  # a table or list longer than this is collapsed
OPEN_GROUPS = 12  # group sections start open up to this many groups
SAMPLES_NAMED = 6  # samples named per group in the overview table
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}h3{font-size:1em;display:inline}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}.wide{overflow-x:auto}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right;vertical-align:top}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left;white-space:nowrap}td.text,th.text{text-align:left}.best{font-weight:bold;background:#e8f4e8}
img{max-width:100%}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.8em;font-size:.75em;overflow-x:auto}
.strip img{image-rendering:pixelated;height:96px;max-width:none}.strip{overflow-x:auto}.muted{color:#777}
.lead{font-size:1.15em}.swatch{display:inline-block;width:.9em;height:.9em;border:1px solid #999;
vertical-align:middle;margin:0 .2em 0 .6em}details{margin:.4em 0}summary{cursor:pointer}
details.group{border-left:3px solid #ccc;padding-left:.8em;margin:.8em 0}
"""
TRAIT_COLUMNS = (
    ("windows", "windows in the group"),
    ("share", "share of all windows"),
    ("main_sample", "the sample with most windows in the group"),
    ("main_sample_share", "that sample's share of the group's windows"),
    ("fg_fraction", "mean foreground fraction of the group's windows"),
    ("intensity_<channel>", "mean log intensity over foreground, in SDs of the training samples' foreground"),
    ("bright_area_<channel>", "share of window pixels brighter than that mean + 2 SD"),
    ("object_size_<channel>", "mean area (pixels) of foreground regions brighter than that mean"),
)


@dataclass
class ClusterView:
    """What the report shows of one window cluster: a strip of windows, its traits and the words for them."""

    cluster: int
    strip_png: bytes | None
    traits: dict[str, Any]
    words: list[str] = field(default_factory=list)


@dataclass
class ReportData:
    """Everything on the page. ``fields`` is the image table (``clusters_images.parquet``);
    ``channels`` the store's (name, ``RRGGBB``) display colours; ``maps`` where the napari maps are."""

    title: str
    metrics: dict[str, Any]
    settings: dict[str, Any]
    provenance: dict[str, Any]
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG)
    clusters: list[ClusterView] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fields: pd.DataFrame | None = None
    channels: list[tuple[str, str]] = field(default_factory=list)
    maps: str | None = None


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return '<span class="muted">-</span>'
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _e(value: Any) -> str:
    return html.escape(str(value))


def _count(n: Any, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def collapsed(summary: str, body: str, rows: int, limit: int = MAX_ROWS) -> str:
    """``body`` as is when it has at most ``limit`` rows, else inside a closed ``<details>``."""
    if rows <= limit:
        return body
    return f"<details><summary>{summary}</summary>{body}</details>"


def table(frame: pd.DataFrame, text_columns: tuple[str, ...] = ()) -> str:
    """A DataFrame as an HTML table (columns as headers, values formatted, text columns left-aligned)."""
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    cls = ['class="text"' if c in text_columns else "" for c in frame.columns]
    rows = "".join(
        "<tr>" + "".join(f"<td {k}>{_fmt(v)}</td>" for k, v in zip(cls, row, strict=True)) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f'<div class="wide"><table><tr>{head}</tr>{rows}</table></div>'


# ---------------------------------------------------------------- the answer
def group_swatch(cluster: int, n_groups: int) -> str:
    """A square in the group's colour: the same as in the UMAP figure and the napari maps."""
    r, g, b = (round(255 * v) for v in cluster_palette(n_groups)[cluster % max(n_groups, 1)][:3])
    return f'<span class="swatch" style="background:#{r:02X}{g:02X}{b:02X}"></span>'


def channel_legend(channels: list[tuple[str, str]]) -> str:
    """Channel names with their display colour, as in every composite of the page."""
    return "".join(
        f'<span class="swatch" style="background:#{_e(colour)}"></span>{_e(name)} {_e(colour_word(colour))}'
        for name, colour in channels
    )


def _with_phenotype(sample: str, phenotypes: dict[str, str]) -> str:
    known = phenotypes.get(sample)
    return f"{sample} ({known})" if known else sample


def _phenotypes(fields: pd.DataFrame) -> dict[str, str]:
    if "Metadata_phenotype" not in fields:
        return {}
    pairs = fields[["Metadata_sample", "Metadata_phenotype"]].dropna().astype(str).drop_duplicates()
    return dict(zip(pairs["Metadata_sample"], pairs["Metadata_phenotype"], strict=True))


def group_samples(fields: pd.DataFrame, cluster: int) -> pd.DataFrame:
    """Samples with fields in group ``cluster``: sample, fields in the group, of all its fields, field ids."""
    total = fields.groupby("Metadata_sample", observed=True).size()
    inside = fields[fields["cluster"] == cluster]
    rows = [
        {
            "sample": str(sample),
            "fields here": len(group),
            "of its fields": int(total[sample]),
            "field ids": ", ".join(sorted(group["Metadata_field"].astype(str))),
        }
        for sample, group in inside.groupby("Metadata_sample", observed=True)
    ]
    frame = pd.DataFrame(rows, columns=["sample", "fields here", "of its fields", "field ids"])
    return frame.sort_values(["fields here", "sample"], ascending=[False, True], ignore_index=True)


def _sample_line(samples: pd.DataFrame, phenotypes: dict[str, str]) -> str:
    top = samples.head(SAMPLES_NAMED)
    named = [
        f"{_e(_with_phenotype(sample, phenotypes))} &times;{n}"
        for sample, n in zip(top["sample"], top["fields here"], strict=True)
    ]
    more = len(samples) - SAMPLES_NAMED
    return ", ".join(named) + (f", and {more} more" if more > 0 else "")


def _group(view: ClusterView) -> str:
    return f"group {view.cluster}"


def _words(view: ClusterView) -> str:
    return "; ".join(view.words) if view.words else "no measured trait stands out from the other groups"


def overview(views: list[ClusterView], fields: pd.DataFrame | None) -> str:
    """One row per group: fields, samples, windows and what sets it apart."""
    phenotypes = _phenotypes(fields) if fields is not None else {}
    head = ["<th>group</th>", "<th>windows</th>", '<th class="text">what sets it apart</th>']
    if fields is not None:
        head[1:1] = ["<th>fields</th>", '<th class="text">samples (fields in the group)</th>']
    rows = []
    for view in views:
        share = view.traits.get("share")
        cells = [
            f'<td>{group_swatch(view.cluster, len(views))}<a href="#group-{view.cluster}">{_group(view)}</a></td>',
            f"<td>{_fmt(view.traits.get('windows'))}{f' ({share:.0%})' if isinstance(share, float) else ''}</td>",
            f'<td class="text">{_e(_words(view))}</td>',
        ]
        if fields is not None:
            samples = group_samples(fields, view.cluster)
            cells[1:1] = [
                f"<td>{int(samples['fields here'].sum())}</td>",
                f'<td class="text">{_sample_line(samples, phenotypes)}</td>',
            ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    body = f'<div class="wide"><table><tr>{"".join(head)}</tr>{"".join(rows)}</table></div>'
    return collapsed(f"table of all {len(views)} groups", body, len(views), limit=30)


def group_section(view: ClusterView, fields: pd.DataFrame | None, n_groups: int, open_: bool) -> str:
    """One group: its representative windows, what sets it apart, and its samples and fields."""
    t = view.traits
    samples = group_samples(fields, view.cluster) if fields is not None else None
    n_fields = int(samples["fields here"].sum()) if samples is not None else None
    size = _count(t.get("windows"), "window")
    if samples is not None:
        size += f", {_count(n_fields, 'field')}, {_count(len(samples), 'sample')}"
    strip = f'<div class="strip">{_img(view.strip_png, f"group {view.cluster}")}</div>' if view.strip_png else ""
    listing = ""
    if samples is not None and len(samples):
        phenotypes = _phenotypes(fields)  # type: ignore[arg-type]
        if phenotypes:
            samples.insert(1, "known phenotype", samples["sample"].map(phenotypes))
        listing = collapsed(f"{len(samples)} samples", table(samples, ("sample", "known phenotype", "field ids")),
                            len(samples))
    elif samples is not None:
        listing = '<p class="muted">No field has this group as its label: its windows lie in fields of other groups.'
    return (
        f'<details class="group" id="group-{view.cluster}"{" open" if open_ else ""}><summary>'
        f"{group_swatch(view.cluster, n_groups)}<h3>{_group(view)}</h3> &mdash; {size} &mdash; "
        f"{_e(_words(view))}</summary>"
        f'<p class="muted">Windows nearest the group centre (channel colours as above; one display range for '
        f"all groups):</p>{strip}{listing}</details>"
    )


def fields_table(fields: pd.DataFrame) -> str:
    """Every field: its Metadata_* columns, group, majority share of its window vote, blurred flag."""
    keep = [c for c in fields.columns if c.startswith("Metadata_")]
    keep += [c for c in ("cluster", "share", "n_windows", "blurred") if c in fields.columns]
    frame = fields[keep].rename(columns={"cluster": "group"}).sort_values(["Metadata_sample", "Metadata_field"])
    text = tuple(c for c in frame.columns if c.startswith("Metadata_"))
    return collapsed(f"all {len(frame)} fields", table(frame, text), len(frame), limit=0)


def traits_table(clusters: list[ClusterView]) -> str:
    if not clusters:
        return ""
    frame = pd.DataFrame([c.traits for c in clusters])
    legend = "".join(f"<li><code>{_e(k)}</code>: {_e(v)}</li>" for k, v in TRAIT_COLUMNS)
    body = f"<ul>{legend}</ul>{table(frame, ('main_sample',))}"
    return collapsed(f"traits of all {len(frame)} groups ({frame.shape[1]} columns)", body, len(frame), limit=0)


# ---------------------------------------------------------------- the evidence
def scored_sets(metrics: dict[str, Any], split: str) -> list[str]:
    """Feature sets with scores for ``split``."""
    return [s for s in FEATURE_SETS if isinstance(metrics.get(s), dict) and split in metrics[s]]


def metrics_table(metrics: dict[str, Any], split: str) -> str:
    """Rows: scores; columns: feature sets; the best score in a row is highlighted."""
    sets = scored_sets(metrics, split)
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


def _headline(data: ReportData, n_groups: int) -> str:
    split = data.metrics.get("split", "")
    sets = scored_sets(data.metrics, split)
    sizes = data.metrics[sets[0]][split] if sets else {}
    counts = ", ".join(
        f"{sizes[k]} {word}" for k, word in (("n_images", "fields"), ("n_windows", "windows")) if sizes.get(k)
    )
    among = f" among {sizes['n_samples']} samples" if sizes.get("n_samples") else ""
    return (
        f'<p class="lead"><b>{n_groups} morphology groups</b>{among}'
        f"{f' ({counts})' if counts else ''}{f' of the {_e(split)} split' if split else ''}.</p>"
    )


def render_report(data: ReportData) -> str:
    """The whole page as one HTML string."""
    metrics = data.metrics
    n_groups = int(metrics.get("n_clusters") or len(data.clusters))
    splits = [s for s in ("test", "train", "all") if scored_sets(metrics, s)]
    tables = "".join(metrics_table(metrics, s) for s in splits)
    figures = "".join(
        f"<figure>{_img(png, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, png in data.figures
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
    open_ = len(data.clusters) <= OPEN_GROUPS
    groups = "".join(group_section(v, data.fields, len(data.clusters), open_) for v in data.clusters)
    labels = _e(metrics.get("image_labels", "profile"))
    maps = (
        f"<p>Cluster maps for napari (each field with its windows' groups painted on its pixels): "
        f"<code>napari --plugin napari-ome-zarr {_e(data.maps)}/&lt;sample&gt;_&lt;field&gt;</code></p>"
        if data.maps
        else ""
    )
    legend = f"<p>Channels: {channel_legend(data.channels)}</p>" if data.channels else ""
    every_field = f"<h2>Every field</h2>{fields_table(data.fields)}" if data.fields is not None else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(data.title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(data.title)}</h1>
{_headline(data, n_groups)}
{legend}
<h2>The groups</h2>
<p>A window is a square of the field the encoder saw; windows are grouped by their vectors, and each field
takes a group from its <b>{labels}</b> (group k is <code>cluster</code> k in the tables). Words come from
traits measured on each group's windows against all other groups' windows (in SDs of the trait).</p>
{overview(data.clusters, data.fields)}
{groups}
{maps}
{every_field}
<h2>Traits per group</h2>
{traits_table(data.clusters)}
<h2>Evidence</h2>
{figures}
<h3>Scores: DIM beside the baselines</h3>
<p>random = the same encoder with untrained weights; handcrafted = per-window intensity and texture
statistics. Scores against the sample are always there; scores against a phenotype only where
labels were given. Image labels come from <b>{labels}</b>; a dash means not computed for that split.</p>
{tables}
<h2>Provenance</h2>
<ul>{notes}</ul>
<details><summary>settings</summary>
<pre>{html.escape(json.dumps(data.settings, indent=2, sort_keys=True))}</pre></details>
<details><summary>inputs, versions and timings</summary>
<pre>{html.escape(json.dumps(data.provenance, indent=2, sort_keys=True, default=str))}</pre></details>
</body></html>
"""
