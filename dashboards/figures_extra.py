"""Figures only the dashboard needs (the shared ones are in ``routesae.report.figures``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routesae.report.figures import _empty, _layout, label
from routesae.report.load import as_list

TRAIN_METRICS = {"loss": "loss", "nmse": "reconstruction NMSE", "l0": "L0 (active latents)",
                 "dead_frac": "dead latent fraction", "aux": "aux loss", "lr": "learning rate",
                 "tokens_per_s": "tokens / s"}


def training_curve(metrics: pd.DataFrame, metric: str, log_y: bool = False) -> go.Figure:
    """One metrics.jsonl column against the step."""
    title = TRAIN_METRICS.get(metric, metric)
    if metrics.empty or metric not in metrics or "step" not in metrics:
        return _empty(title)
    d = metrics[["step", metric]].dropna()
    if d.empty:
        return _empty(title)
    fig = go.Figure(go.Scatter(x=d["step"], y=d[metric], mode="lines",
                               hovertemplate="step %{x}<br>%{y:.4g}<extra></extra>"))
    return _layout(fig, title, height=240, xaxis=dict(title="step"),
                   yaxis=dict(type="log" if log_y else "linear"))


def routed_layer_fractions(latent: pd.Series, layers: list[int]) -> go.Figure:
    """Fraction of one latent's active tokens routed to each SAE layer."""
    title = f"latent {int(latent['latent'])}: routed layer when active"
    fr = as_list(latent.get("routed_layer_fractions"))
    if not fr or len(fr) != len(layers) or not any(fr):
        return _empty(title)
    fig = go.Figure(go.Bar(x=[f"L{int(j)}" for j in layers], y=fr,
                           hovertemplate="layer %{x}<br>%{y:.3f} of active tokens<extra></extra>"))
    return _layout(fig, title, height=230, xaxis=dict(title="routed layer", type="category"),
                   yaxis=dict(title="fraction", range=[0, 1]))


def logit_lens(latent: pd.Series, top: int = 10) -> go.Figure:
    """Tokens the latent's decoder direction promotes (positive) and suppresses (negative)."""
    title = f"latent {int(latent['latent'])}: logit lens"
    pos, pv = as_list(latent.get("logit_pos"))[:top], as_list(latent.get("logit_pos_values"))[:top]
    neg, nv = as_list(latent.get("logit_neg"))[:top], as_list(latent.get("logit_neg_values"))[:top]
    if not pos and not neg:
        return _empty(title)
    names = [f"+ {label(s)}" for s in pos[::-1]] + [f"− {label(s)}" for s in neg]
    vals = list(pv[::-1]) + list(nv)
    if len(vals) != len(names):
        return _empty(title)
    fig = go.Figure(go.Bar(x=vals, y=names, orientation="h",
                           marker_color=["#2ca02c"] * len(pos) + ["#d62728"] * len(neg),
                           hovertemplate="%{y}<br>%{x:.3f}<extra></extra>"))
    return _layout(fig, title, height=max(220, 40 + 18 * len(names)), xaxis=dict(title="logit"),
                   yaxis=dict(type="category"))


def token_expert_heatmap(tokens: list[str], layers: list[int], first: np.ndarray, hover: list[list[str]],
                         n_experts: int | None = None) -> go.Figure:
    """Token x MoE layer: colour = the first-choice expert, hover = all chosen experts with weights.

    ``first`` [T, L] int (-1 where none), ``hover`` [L][T] strings.
    """
    title = "experts chosen per token (colour: first choice; hover: all)"
    if not len(tokens) or not layers:
        return _empty(title)
    z = np.where(first < 0, np.nan, first).T.astype(float)  # [L, T]
    x = [f"{i}:{label(t)}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=[f"L{j}" for j in layers], colorscale="Turbo", zmin=0,
                               zmax=(n_experts - 1) if n_experts else None, text=hover,
                               texttemplate="%{z}" if z.size <= 600 else None,
                               hovertemplate="token %{x}<br>layer %{y}<br>%{text}<extra></extra>",
                               colorbar=dict(title=dict(text="expert"))))
    return _layout(fig, title, height=max(220, 80 + 26 * len(layers)),
                   xaxis=dict(title="token", type="category", tickangle=-60),
                   yaxis=dict(title="MoE layer", autorange="reversed", type="category"))


def routed_layer_strip(tokens: list[str], layers: list[int], probs: np.ndarray) -> go.Figure:
    """Token x SAE layer router probabilities (RouteSAE): the routed layer is the brightest cell."""
    title = "RouteSAE router: p(layer | token)"
    if probs.size == 0:
        return _empty(title)
    x = [f"{i}:{label(t)}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=probs.T, x=x, y=[f"L{j}" for j in layers], colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="token %{x}<br>layer %{y}<br>p %{z:.3f}<extra></extra>"))
    return _layout(fig, title, height=max(200, 80 + 26 * len(layers)),
                   xaxis=dict(title="token", type="category", tickangle=-60),
                   yaxis=dict(title="SAE layer", autorange="reversed", type="category"))
