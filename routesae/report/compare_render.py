"""The comparison report of :mod:`routesae.report.compare`: HTML (plotly inlined once), Markdown and JSON.

Same structure as a run's report: key findings first, then runs, metrics side by side, routed layers,
features, glossary. Run names and paths come from the file system: escaped like corpus text.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from routesae.report import compare as C
from routesae.report.figures import _empty, _layout, label
from routesae.report.glossary import TERMS
from routesae.report.htmlkit import Page, document, esc, section
from routesae.report.load import records
from routesae.report.mdkit import MdPage, md

TITLES = {"findings": "Key findings", "runs": "Runs", "metrics": "Metrics side by side", "layers": "Routed layers",
          "features": "Features", "glossary": "Glossary"}
GROUPS = {"splice": "In the model (SAE spliced in)", "sae_space": "Reconstruction, SAE input space",
          "raw_space": "Reconstruction, raw residual"}
HOVER = "%{fullData.name}<br>%{x}: %{y:.3f}<extra></extra>"
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
FIGURE_METRICS = (("splice", "ce_increase"), ("splice", "kl"), ("splice", "ce_recovered"), ("sae_space", "nmse"))


def _title(runs: list[C.RunInfo]) -> str:
    return "routesae comparison: " + " vs ".join(r.name for r in runs)


# ---------------------------------------------------------------- figures


def metric_bars(runs: list[C.RunInfo], group: str, key: str) -> go.Figure:
    """One bar per run of one metric."""
    vals = [(i, r, r.metric(group, key)) for i, r in enumerate(runs)]
    vals = [(i, r, v) for i, r, v in vals if v is not None]
    term = TERMS[key]
    title = term.name + (" (nats)" if term.unit == "nats" else "")
    if not vals:
        return _empty(title)
    pctg = term.unit == "%"
    fig = go.Figure(go.Bar(x=[label(r.name) for _, r, _ in vals], y=[v * 100 if pctg else v for *_, v in vals],
                           text=[f"{v:.1%}" if pctg else f"{v:.3g}" for *_, v in vals], textposition="auto",
                           marker_color=[COLOURS[i % len(COLOURS)] for i, *_ in vals],
                           hovertemplate="%{x}: %{y:.4g}<extra></extra>"))
    return _layout(fig, title, height=280, xaxis=dict(type="category"),
                   yaxis=dict(title="%" if pctg else term.unit or "", rangemode="tozero"))


def routed_layers_figure(table: pd.DataFrame, runs: list[C.RunInfo]) -> go.Figure:
    """Fraction of tokens per layer, one bar group per layer, one colour per run."""
    title = "share of tokens per layer (routed layer; a one-layer SAE: its layer)"
    if table.empty:
        return _empty(title)
    fig = go.Figure([go.Bar(x=[f"L{int(j)}" for j in table["layer"]], y=table[r.name], name=label(r.name),
                            marker_color=COLOURS[i % len(COLOURS)], hovertemplate=HOVER) for i, r in enumerate(runs)])
    return _layout(fig, title, height=300, barmode="group", xaxis=dict(title="layer", type="category"),
                   yaxis=dict(title="fraction of tokens", range=[0, 1.02]))


def per_layer_figure(runs: list[C.RunInfo]) -> go.Figure:
    """NMSE per routed layer (eval.json per_layer; a one-layer SAE: one point)."""
    title = "normalised MSE by layer"
    fig = go.Figure()
    for i, r in enumerate(runs):
        per = r.eval.get("per_layer") or []
        pts = [(int(p["layer"]), (p.get("sae_space") or {}).get("nmse")) for p in per]
        if not pts and len(r.layers) == 1 and r.metric("sae_space", "nmse") is not None:
            pts = [(r.layers[0], r.metric("sae_space", "nmse"))]
        pts = [(j, v) for j, v in pts if v is not None]
        if pts:
            fig.add_trace(go.Scatter(x=[f"L{j}" for j, _ in pts], y=[v for _, v in pts], mode="lines+markers",
                                     name=label(r.name), marker_color=COLOURS[i % len(COLOURS)], hovertemplate=HOVER))
    if not fig.data:
        return _empty(title)
    return _layout(fig, title, height=300, xaxis=dict(title="layer", type="category"), yaxis=dict(title="NMSE"))


# ---------------------------------------------------------------- HTML


def _metric_rows(runs: list[C.RunInfo], group: str) -> list[tuple[str, list[Any]]]:
    t = C.metrics_table(runs)
    t = t[t["group"] == group]
    return [(row["metric"], [row[r.name] for r in runs]) for _, row in t.iterrows()]


def render_comparison_html(runs: list[C.RunInfo]) -> str:
    page = Page()
    items = C.comparison_findings(runs)
    names = [r.name for r in runs]
    body = [section("findings", TITLES["findings"], page.findings(items, TITLES), first=True),
            section("runs", TITLES["runs"], page.table(C.runs_table(runs)) + "<p class='note'>Each run's own report: "
                    "<code>routesae report RUN</code> (RUN/report/report.html).</p>", short=True)]
    metrics = []
    for group, title in GROUPS.items():
        rows = _metric_rows(runs, group)
        if rows:
            metrics += [f"<h3>{esc(title)}</h3>", page.metrics(rows, names)]
    metrics.append("<div class='grid'>" + "".join(page.fig(metric_bars(runs, g, k)) for g, k in FIGURE_METRICS)
                   + page.fig(per_layer_figure(runs)) + "</div>")
    body.append(section("metrics", TITLES["metrics"], "".join(metrics)))
    rl = C.routed_layers_table(runs)
    body.append(section("layers", TITLES["layers"], page.table(rl, value_term="routed_fraction")
                        + "<div class='grid'>" + page.fig(routed_layers_figure(rl, runs), True) + "</div>"))
    body.append(section("features", TITLES["features"], page.table(C.features_table(runs)), short=True))
    nav = [(k, v) for k, v in TITLES.items()]
    return document(_title(runs), " · ".join(f"{r.name}: {r.label}" for r in runs), nav,
                    "".join(body) + page.glossary(), page)


# ---------------------------------------------------------------- Markdown and JSON


def render_comparison_markdown(runs: list[C.RunInfo]) -> str:
    page = MdPage()
    names = [r.name for r in runs]
    out = [f"# {md(_title(runs))}\n\n_" + md(" · ".join(f"{r.name}: {r.label}" for r in runs)) + "_\n",
           f"\n## {TITLES['findings']}\n\n", page.findings(C.comparison_findings(runs), TITLES),
           f"\n## {TITLES['runs']}\n\n", page.table(C.runs_table(runs)), f"\n## {TITLES['metrics']}\n"]
    for group, title in GROUPS.items():
        rows = _metric_rows(runs, group)
        if rows:
            out += [f"\n**{md(title)}**\n\n", page.metrics(rows, names)]
    out += [f"\n## {TITLES['layers']}\n\n", page.table(C.routed_layers_table(runs), value_term="routed_fraction"),
            f"\n## {TITLES['features']}\n\n", page.table(C.features_table(runs))]
    return "".join(out) + page.glossary()


def comparison_json(runs: list[C.RunInfo]) -> dict[str, Any]:
    from routesae.report.tables import _clean

    return _clean({
        "format": "routesae-comparison/1",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": [{"name": r.name, "path": str(r.path), "arch": r.arch, "layers": r.layers,
                  "store_identity": r.store[0], "store": r.store[1], "eval": r.eval} for r in runs],
        "findings": [{"key": f.key, "section": f.section, "text": f.text, "values": f.values}
                     for f in C.comparison_findings(runs)],
        "metrics": records(C.metrics_table(runs)), "routed_layers": records(C.routed_layers_table(runs)),
        "features": records(C.features_table(runs)),
    })
