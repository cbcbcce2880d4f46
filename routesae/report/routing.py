"""Dynamic routing results (``routesae analyze-routing ... --out RUN/routing``) for reports and the dashboard.

:func:`load_routing` reads the folder (``summary.json`` + Parquet tables); the figure builders take
its tables and return plotly figures (corpus strings through :func:`routesae.report.figures.label`).
The report shows the section when ``RUN/routing/summary.json`` exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routesae.report.figures import _empty, _layout, label

TABLES = ("needed_experts", "compute_saved", "loss_by_k", "topp", "experts_per_token", "ablation", "tokens")
ROUTING_DIR = "routing"


@dataclass
class RoutingResults:
    dir: Path
    summary: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def table(self, name: str) -> pd.DataFrame:
        return self.tables.get(name, pd.DataFrame())

    @property
    def eps(self) -> float:
        return float(self.summary.get("default_eps", 0.01))


def load_routing(folder: str | Path) -> RoutingResults | None:
    """The results in ``folder`` (an ``analyze-routing --out`` folder), or None when it holds none."""
    folder = Path(folder)
    if not (folder / "summary.json").is_file():
        return None
    tables = {n: pd.read_parquet(folder / f"{n}.parquet") for n in TABLES if (folder / f"{n}.parquet").is_file()}
    return RoutingResults(folder, json.loads((folder / "summary.json").read_text()), tables)


def needed_experts_table(r: RoutingResults, eps: float | None = None) -> pd.DataFrame:
    """Domain x needed k' (fraction of tokens), override at every MoE layer, plus mean and compute saved."""
    eps = r.eps if eps is None else eps
    ne = r.table("needed_experts")
    ne = ne[(ne.scope == "all") & np.isclose(ne.eps, eps)]
    if ne.empty:
        return pd.DataFrame()
    wide = ne.pivot_table(index="domain", columns="needed_k", values="fraction", fill_value=0.0)
    wide.columns = [f"k'={int(c)}" for c in wide.columns]
    cs = r.table("compute_saved")
    cs = cs[(cs.scope == "all") & np.isclose(cs.eps, eps)].set_index("domain")
    wide["tokens"] = cs["tokens"]
    wide["mean k'"] = cs["mean_needed_k"]
    wide["compute saved"] = cs["compute_saved"]
    order = ["all"] + sorted(d for d in wide.index if d != "all")
    return wide.reindex(order).reset_index()


def _domains(df: pd.DataFrame) -> list[str]:
    return ["all"] + sorted(d for d in df["domain"].unique() if d != "all")


def _lines(d: pd.DataFrame, x: str, y: str, title: str, xaxis: dict, yaxis: dict, hover: str | None = None,
           extra: str | None = None) -> go.Figure:
    """One line per domain (``all`` first)."""
    if d.empty:
        return _empty(title)
    fig = go.Figure()
    for dom in _domains(d):
        g = d[d.domain == dom].sort_values(x)
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="lines+markers", name=label(dom),
                                 customdata=g[extra] if extra else None, hovertemplate=hover))
    return _layout(fig, title, xaxis=xaxis, yaxis=yaxis)


def _heatmap(d: pd.DataFrame, columns: str, value: str, prefix: str, title: str, colorscale: str, bar: str,
             hover: str) -> go.Figure:
    """Domain x ``columns`` heatmap of ``value`` (``all`` first)."""
    if d.empty:
        return _empty(title)
    m = d.pivot_table(index="domain", columns=columns, values=value).reindex(_domains(d))
    fig = go.Figure(go.Heatmap(z=m.to_numpy(), x=[f"{prefix}{int(c)}" for c in m.columns],
                               y=[label(i) for i in m.index], colorscale=colorscale, colorbar=dict(title=bar),
                               hovertemplate=hover))
    return _layout(fig, title, height=max(260, 28 * len(m) + 120))


def needed_experts_figure(r: RoutingResults, eps: float | None = None) -> go.Figure:
    eps = r.eps if eps is None else eps
    ne = r.table("needed_experts")
    d = ne[(ne.scope == "all") & np.isclose(ne.eps, eps)] if not ne.empty else ne
    title = f"experts each token needs (KL <= {eps:g} nats, all MoE layers)"
    if d.empty:
        return _empty(title)
    fig = go.Figure()
    for dom in _domains(d):
        g = d[d.domain == dom].sort_values("needed_k")
        fig.add_trace(go.Bar(x=g["needed_k"].astype(str), y=g["fraction"], name=label(dom),
                             hovertemplate="%{fullData.name}<br>k'=%{x}: %{y:.3f}<extra></extra>"))
    return _layout(fig, title, barmode="group", xaxis=dict(title="needed k'", type="category"),
                   yaxis=dict(title="fraction of tokens"))


def compute_saved_figure(r: RoutingResults) -> go.Figure:
    cs = r.table("compute_saved")
    d = cs[cs.scope == "all"] if not cs.empty else cs
    return _lines(d, "eps", "compute_saved", "expert compute saved = 1 - mean needed k' / k",
                  dict(title="KL epsilon (nats)", type="log"), dict(title="compute saved", tickformat=".0%"))


def needed_by_layer_figure(r: RoutingResults, eps: float | None = None) -> go.Figure:
    eps = r.eps if eps is None else eps
    cs = r.table("compute_saved")
    d = cs[(cs.scope == "layer") & np.isclose(cs.eps, eps)] if not cs.empty else cs
    return _heatmap(d, "layer", "mean_needed_k", "L", f"mean needed k' with the override at one layer (KL <= {eps:g})",
                    "Viridis", "k'", "%{y} %{x}: %{z:.2f}<extra></extra>")


def loss_by_k_figure(r: RoutingResults) -> go.Figure:
    return _lines(r.table("loss_by_k"), "k", "ce_increase", "loss increase under top-k' at every MoE layer",
                  dict(title="k'", type="log"), dict(title="CE increase (nats)"))


def topp_experts_figure(r: RoutingResults, p: float) -> go.Figure:
    """Distribution of real experts per token (all MoE layers pooled) under top-p, by domain."""
    ept = r.table("experts_per_token")
    d = ept[np.isclose(ept.p.astype(float), p)] if not ept.empty else ept
    title = f"experts per token under top-p, p = {p:g} (all MoE layers)"
    if d.empty:
        return _empty(title)
    fig = go.Figure()
    for dom in _domains(d):
        g = d[d.domain == dom].groupby("n_active")["tokens"].sum()
        fig.add_trace(go.Bar(x=g.index.astype(str), y=g / g.sum(), name=label(dom),
                             hovertemplate="%{fullData.name}<br>%{x} experts: %{y:.3f}<extra></extra>"))
    return _layout(fig, title, barmode="group", xaxis=dict(title="experts per token", type="category"),
                   yaxis=dict(title="fraction of token-layers"))


def topp_mean_figure(r: RoutingResults) -> go.Figure:
    return _lines(r.table("topp"), "p", "mean_experts", "mean experts per token under top-p", dict(title="p"),
                  dict(title="experts per token"), extra="ce_increase",
                  hover="%{fullData.name}<br>p=%{x}: %{y:.2f} experts, CE +%{customdata:.4f}<extra></extra>")


def ablation_figure(r: RoutingResults, layer: int) -> go.Figure:
    ab = r.table("ablation")
    d = ab[ab.layer == layer] if not ab.empty else ab
    return _heatmap(d, "expert", "ce_increase", "E", f"layer {layer}: CE increase when one expert is removed",
                    "Reds", "ΔCE", "%{y} %{x}: +%{z:.4f} nats<extra></extra>")


def top_ablations(r: RoutingResults, n: int = 3) -> pd.DataFrame:
    """Per domain, the experts whose removal costs most (which experts a domain depends on)."""
    ab = r.table("ablation")
    if ab.empty:
        return ab
    ab = ab[ab.domain != "all"].sort_values("ce_increase", ascending=False)
    return ab.groupby("domain", sort=True).head(n).sort_values(["domain", "ce_increase"], ascending=[True, False])[
        ["domain", "layer", "expert", "ce_increase"]].reset_index(drop=True)
