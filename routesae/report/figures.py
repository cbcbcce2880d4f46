"""Plotly figure builders shared by the HTML report and the dashboard: DataFrames in, ``go.Figure`` out.

Each function takes the analysis tables (docs/analysis.md) and returns a figure; none reads files.
Text that comes from the corpus (domain names, tokens) goes through :func:`label`: plotly.js
renders a subset of HTML in labels and hover text, so such strings are entity-escaped (plotly.js
decodes ``&lt;`` ``&gt;`` ``&amp;`` back to the characters when it draws them).

Ratio heatmaps (lift, selectivity: 1 = no preference) are coloured on a log2 scale centred at 1, so
half and twice the baseline get opposite colours of equal strength; the colour bar is labelled in
ratios, each cell's text and hover show the ratio itself, and a ratio of 0 takes the lowest colour.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routesae.report.load import as_list

TEMPLATE = "plotly_white"
HEATMAP_VALUES = {"selectivity": "selectivity: top-k share / the expert's share of all tokens",
                  "share_topk": "share of the domain's tokens with the expert in their top-k",
                  "share_top1": "share of the domain's tokens with the expert first",
                  "lift_topk": "top-k share / uniform k/E",
                  "lift_top1": "top-1 share / uniform 1/E"}
HEATMAP_TITLES = {"selectivity": "selectivity (domain share / the expert's share of all tokens)",
                  "share_topk": "top-k share of each domain", "share_top1": "top-1 share of each domain",
                  "lift_topk": "lift (top-k share / uniform k/E)", "lift_top1": "top-1 lift (share / uniform 1/E)"}
RATIOS = {"selectivity", "lift_topk", "lift_top1", "specialisation"}  # coloured on a log scale centred at 1
POSITION_METRICS = {"router_entropy": "router entropy (nats)", "selectivity": "selectivity (largest, specialists)",
                    "specialisation": "largest lift (x uniform k/E)", "max_share": "largest expert share"}
LOG_RANGE = 6  # colour range of a ratio heatmap at most 2**-6 .. 2**6


def label(s: object) -> str:
    """A corpus string made safe for plotly labels and hover text (and visible: newline -> ↵)."""
    return html.escape(str(s), quote=False).replace("\n", "↵")


def _layout(fig: go.Figure, title: str, height: int = 360, **kw) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=dict(text=title, x=0.01, font=dict(size=14)), height=height,
                      margin=dict(l=60, r=20, t=45, b=45), **kw)
    return fig


def _empty(title: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text="no data", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return _layout(fig, title, height=200, xaxis=dict(visible=False), yaxis=dict(visible=False))


def expert_axis(names: list[str], title: str = "expert", most: int = 17) -> dict:
    """A category axis over every expert name: at most ``most`` tick labels, evenly spaced, always the first
    and the last expert (plotly's automatic ticks may skip the last), the whole range shown."""
    n = len(names)
    step = max(1, -(-n // (most - 1))) if n > most else 1
    idx = sorted(set(range(0, n, step)) | ({n - 1} if n else set()))
    if len(idx) > 2 and idx[-1] - idx[-2] <= step / 2:  # the last two labels would touch
        idx.pop(-2)
    return dict(title=title, type="category", tickmode="array", tickvals=[names[i] for i in idx],
                ticktext=[names[i] for i in idx], range=[-0.5, n - 0.5], automargin=True)


def ratio_colours(z: np.ndarray, title: str = "ratio") -> dict:
    """Heatmap arguments that colour ratios ``z`` on a log2 scale centred at 1 (zeros at the lowest colour)."""
    z = np.asarray(z, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        lz = np.log2(z)
    finite = lz[np.isfinite(lz)]
    m = int(np.clip(np.ceil(np.abs(finite).max()) if finite.size else 1, 1, LOG_RANGE))
    lz = np.clip(np.where(z == 0, -m, lz), -m, m)
    half = range(0, m + 1, 1 if m <= 3 else 2)  # every power of 2 up to 8, beyond that every other one
    ticks = sorted({-t for t in half} | set(half))
    text = [f"1/{2 ** -t:g}" if t < 0 else f"{2 ** t:g}" for t in ticks]
    return dict(z=lz, colorscale="RdBu_r", zmid=0.0, zmin=-m, zmax=m, customdata=z,
                colorbar=dict(title=dict(text=title), tickvals=ticks, ticktext=text))


def domain_expert_heatmap(expert_domain: pd.DataFrame, layer: int, value: str = "selectivity") -> go.Figure:
    """Domain x expert heatmap of one MoE layer: top-k / top-1 share, lift over uniform or selectivity."""
    if value not in HEATMAP_VALUES:
        raise ValueError(f"unknown heatmap value {value!r}; choose one of {', '.join(HEATMAP_VALUES)}")
    d = expert_domain[expert_domain["layer"] == layer].copy()
    title = f"layer {layer}: {HEATMAP_TITLES[value]}"
    if d.empty:
        return _empty(title)
    if value == "lift_top1":
        d["lift_top1"] = d["share_top1"] / d["uniform_top1"]
    if value == "selectivity" and value not in d:  # an analysis made before selectivity was stored
        return _empty(title)
    m = d.pivot_table(index="domain", columns="expert", values=value, aggfunc="first", sort=True, dropna=False)
    z = m.to_numpy(dtype=float)
    colours = ratio_colours(z, value.split("_")[0]) if value in RATIOS else dict(
        z=z, colorscale="Viridis", customdata=z, colorbar=dict(title=dict(text="share")))
    names = [f"E{int(e)}" for e in m.columns]
    fig = go.Figure(go.Heatmap(
        x=names, y=[label(s) for s in m.index],
        text=np.round(z, 2), texttemplate="%{text}" if z.size <= 400 and len(names) <= 16 else None,
        hovertemplate="domain %{y}<br>expert %{x}<br>" + value + " %{customdata:.3f}<extra></extra>", **colours))
    return _layout(fig, title, height=max(240, 80 + 26 * len(m.index)), xaxis=expert_axis(names))


def domain_layer_heatmap(domain_layer: pd.DataFrame, value: str = "selectivity") -> go.Figure:
    """Domain x MoE layer overview of one ``domain_layer`` column (selectivity of the domain's owner,
    specialisation = the largest lift, router_entropy, ...)."""
    title = f"{value} by domain and layer"
    if domain_layer.empty or value not in domain_layer:
        return _empty(title)
    m = domain_layer.pivot_table(index="domain", columns="layer", values=value, aggfunc="first", sort=True,
                                 dropna=False)
    z = m.to_numpy(dtype=float)
    colours = ratio_colours(z, value) if value in RATIOS else dict(z=z, colorscale="Viridis", customdata=z)
    fig = go.Figure(go.Heatmap(x=[f"L{int(c)}" for c in m.columns], y=[label(s) for s in m.index],
                               text=np.round(z, 2), texttemplate="%{text}",
                               hovertemplate="domain %{y}<br>layer %{x}<br>%{customdata:.3f}<extra></extra>",
                               **colours))
    return _layout(fig, title, height=max(220, 60 + 28 * len(m.index)), xaxis=dict(title="MoE layer"))


def expert_load_bars(expert_stats: pd.DataFrame, layer: int) -> go.Figure:
    """Expert load (share of top-k slots) of one layer, with the uniform line; collapse flags and hubs coloured."""
    d = expert_stats[expert_stats["layer"] == layer].sort_values("expert")
    title = f"layer {layer}: expert load"
    if d.empty:
        return _empty(title)
    low, high = d["collapse_low"].astype(bool), d["collapse_high"].astype(bool)
    hub = d["hub"].astype(bool) if "hub" in d else pd.Series(False, index=d.index)
    colour = np.where(low, "#d62728", np.where(hub, "#9467bd", np.where(high, "#ff7f0e", "#1f77b4")))
    flag = np.array([", ".join(f for f, on in (("collapsed (low)", lo), ("overloaded (high)", hi), ("hub", hb)) if on)
                     or "ok" for lo, hi, hb in zip(low, high, hub)], dtype=object)
    top = [label(x) for x in d["top_domain"]] if "top_domain" in d else [""] * len(d)
    names = [f"E{int(e)}" for e in d["expert"]]
    fig = go.Figure(go.Bar(x=names, y=d["load"], marker_color=colour,
                           customdata=np.stack([flag, top], 1),
                           hovertemplate="expert %{x}<br>load %{y:.4f}<br>%{customdata[0]}<br>"
                                         "top domain %{customdata[1]}<extra></extra>"))
    uniform = 1.0 / max(len(d), 1)
    fig.add_hline(y=uniform, line_dash="dash", line_color="grey", annotation_text="uniform 1/E")
    return _layout(fig, title, height=300, xaxis=expert_axis(names), yaxis=dict(title="load"), showlegend=False)


def expert_load_heatmap(expert_stats: pd.DataFrame) -> go.Figure:
    """Load of every expert of every MoE layer over the uniform 1/E (log colour scale centred at 1)."""
    title = "expert load / uniform 1/E, every MoE layer"
    if expert_stats.empty:
        return _empty(title)
    d = expert_stats.assign(ratio=expert_stats["load"] * expert_stats.groupby("layer")["expert"].transform("count"))
    m = d.pivot_table(index="layer", columns="expert", values="ratio", aggfunc="first", sort=True, dropna=False)
    names = [f"E{int(e)}" for e in m.columns]
    fig = go.Figure(go.Heatmap(x=names, y=[f"L{int(j)}" for j in m.index],
                               hovertemplate="layer %{y}<br>expert %{x}<br>load %{customdata:.2f}x uniform"
                                             "<extra></extra>", **ratio_colours(m.to_numpy(dtype=float), "x 1/E")))
    return _layout(fig, title, height=max(220, 90 + 24 * len(m.index)), xaxis=expert_axis(names),
                   yaxis=dict(title="MoE layer", autorange="reversed"))


def coactivation_heatmap(coactivation: pd.DataFrame, layer: int) -> go.Figure:
    """rate(i, j) = N(E_i and E_j) / N(E_i) in one layer; the diagonal (always 1) is left blank."""
    d = coactivation[coactivation["layer"] == layer]
    title = f"layer {layer}: co-activation P(E_j | E_i)"
    if d.empty:
        return _empty(title)
    m = d.pivot_table(index="expert_i", columns="expert_j", values="rate", aggfunc="first", sort=True)
    z = m.to_numpy(dtype=float, copy=True)
    for i, e in enumerate(m.index):
        if e in m.columns:
            z[i, list(m.columns).index(e)] = np.nan
    xs, ys = [f"E{int(e)}" for e in m.columns], [f"E{int(e)}" for e in m.index]
    fig = go.Figure(go.Heatmap(z=z, x=xs, y=ys, colorscale="Blues",
                               hovertemplate="E_i %{y}, E_j %{x}<br>rate %{z:.3f}<extra></extra>"))
    side = max(280, 14 * len(m.index) + 120)
    yaxis = {**expert_axis(ys, "expert i"), "range": [len(ys) - 0.5, -0.5]}
    return _layout(fig, title, height=min(side, 520), xaxis=expert_axis(xs, "expert j", most=9), yaxis=yaxis)


def bucket_order(buckets) -> list[str]:
    """Position buckets in reading order: "BOS" (reported apart), "0" .. "7", "8+"."""
    def key(b: str) -> tuple[int, str]:
        s = str(b).rstrip("+")
        return (-1 if str(b) == "BOS" else int(s) if s.isdigit() else 10**9, str(b))
    return sorted({str(b) for b in buckets}, key=key)


def position_profile(position_profile: pd.DataFrame, metric: str = "router_entropy") -> go.Figure:
    """Cold start: a router metric by position in the document (BOS apart), one line per MoE layer."""
    title = f"cold start: {POSITION_METRICS.get(metric, metric)} by position"
    if position_profile.empty or metric not in position_profile:
        return _empty(title)
    order = bucket_order(position_profile["bucket"])
    fig = go.Figure()
    for layer, g in position_profile.groupby("layer", sort=True):
        g = g.assign(bucket=g["bucket"].astype(str)).set_index("bucket").reindex(order)
        fig.add_trace(go.Scatter(x=order, y=g[metric], mode="lines+markers", name=f"layer {int(layer)}",
                                 customdata=g["tokens"],
                                 hovertemplate="position %{x}<br>%{y:.3f}<br>%{customdata} tokens<extra></extra>"))
    return _layout(fig, title, height=320, xaxis=dict(title="position in the document (BOS apart)", type="category"),
                   yaxis=dict(title=POSITION_METRICS.get(metric, metric)))


def experts_per_token(experts_per_token: pd.DataFrame, layer: int) -> go.Figure:
    """Distribution of the number of active experts per token, by domain, in one layer."""
    d = experts_per_token[experts_per_token["layer"] == layer]
    title = f"layer {layer}: experts per token"
    if d.empty:
        return _empty(title)
    fig = go.Figure()
    for dom, g in d.groupby("domain", sort=True):
        g = g.sort_values("n_active")
        fig.add_trace(go.Bar(x=g["n_active"].astype(int).astype(str), y=g["fraction"], name=label(dom),
                             hovertemplate="%{fullData.name}<br>%{x} experts: %{y:.3f}<extra></extra>"))
    return _layout(fig, title, height=300, barmode="group", xaxis=dict(title="active experts", type="category"),
                   yaxis=dict(title="fraction of tokens"))


def routed_layer_counts(eval_json: dict, latents: pd.DataFrame | None = None) -> pd.DataFrame:
    """``layer, count, what``: tokens per routed layer from eval.json, else latents per top routed layer."""
    rl = (eval_json or {}).get("routed_layers") or {}
    if rl.get("layers") and rl.get("counts"):
        return pd.DataFrame({"layer": rl["layers"], "count": rl["counts"], "what": "tokens"})
    if latents is not None and not latents.empty and "top_routed_layer" in latents:
        live = latents[latents["density"] > 0]
        c = live["top_routed_layer"].dropna().astype(int).value_counts().sort_index()
        return pd.DataFrame({"layer": c.index, "count": c.to_numpy(), "what": "latents"})
    return pd.DataFrame(columns=["layer", "count", "what"])


def routed_layer_histogram(counts: pd.DataFrame) -> go.Figure:
    """How often each layer is the routed one (``routed_layer_counts`` output)."""
    what = str(counts["what"].iloc[0]) if not counts.empty else "tokens"
    title = f"routed layer ({what})"
    if counts.empty:
        return _empty(title)
    fig = go.Figure(go.Bar(x=[f"L{int(x)}" for x in counts["layer"]], y=counts["count"],
                           hovertemplate="layer %{x}<br>%{y} " + what + "<extra></extra>"))
    return _layout(fig, title, height=280, xaxis=dict(title="layer", type="category"), yaxis=dict(title=what))


def latent_histogram(latent: pd.Series) -> go.Figure:
    """Activation histogram of one latent (``hist_edges``/``hist_counts`` of its ``latents`` row)."""
    title = f"latent {int(latent['latent'])}: activations when active"
    edges, counts = as_list(latent.get("hist_edges")), as_list(latent.get("hist_counts"))
    if len(edges) < 2 or not any(counts):
        return _empty(title)
    mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    fig = go.Figure(go.Bar(x=mids, y=counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])],
                           hovertemplate="act %{x:.3f}<br>%{y} tokens<extra></extra>"))
    return _layout(fig, title, height=230, xaxis=dict(title="activation"), yaxis=dict(title="tokens"),
                   bargap=0.02)


def latent_domain_lift(latent_domains: pd.DataFrame, latent: int) -> go.Figure:
    """Lift of each domain among one latent's active tokens (share / base share)."""
    d = latent_domains[latent_domains["latent"] == latent].sort_values("lift", ascending=False)
    title = f"latent {latent}: domain lift"
    if d.empty:
        return _empty(title)
    fig = go.Figure(go.Bar(x=d["lift"], y=[label(s) for s in d["domain"]], orientation="h",
                           customdata=np.stack([d["share"], d["base_share"], d["count"]], 1),
                           hovertemplate="%{y}<br>lift %{x:.2f}<br>share %{customdata[0]:.3f} vs "
                                         "%{customdata[1]:.3f}<br>%{customdata[2]} tokens<extra></extra>"))
    fig.add_vline(x=1.0, line_dash="dash", line_color="grey")
    return _layout(fig, title, height=max(180, 60 + 24 * len(d)), xaxis=dict(title="lift"),
                   yaxis=dict(autorange="reversed"))


def latent_expert_lift(latent_experts: pd.DataFrame, latent: int, top: int = 12) -> go.Figure:
    """The experts one latent's tokens are routed to most, over their base rate (top ``top`` by lift)."""
    d = latent_experts[latent_experts["latent"] == latent].sort_values("lift", ascending=False).head(top)
    title = f"latent {latent}: expert lift"
    if d.empty:
        return _empty(title)
    names = [f"L{int(r.layer)} E{int(r.expert)}" + (" *" if bool(getattr(r, "at_routed_layer", False)) else "")
             for r in d.itertuples()]
    fig = go.Figure(go.Bar(x=d["lift"], y=names, orientation="h",
                           customdata=np.stack([d["share"], d["base_share"], d["count"]], 1),
                           hovertemplate="%{y}<br>lift %{x:.2f}<br>share %{customdata[0]:.3f} vs "
                                         "%{customdata[1]:.3f}<br>%{customdata[2]} tokens<extra></extra>"))
    fig.add_vline(x=1.0, line_dash="dash", line_color="grey")
    return _layout(fig, title + " (* = at the routed layer)", height=max(180, 60 + 22 * len(d)),
                   xaxis=dict(title="lift"), yaxis=dict(autorange="reversed"))
