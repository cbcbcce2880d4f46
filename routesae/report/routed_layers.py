"""RouteSAE routing diagnostics for the report and the dashboard: entropy and margin lines, curves over training.

From ``eval.json`` (``routed_layers.entropy`` / ``routed_layers.margin``) and ``metrics.jsonl`` lines that
carry ``routed_frac`` (a list, one fraction per routed layer), ``routed_entropy`` and ``router_margin``.
The numbers are defined once in :mod:`routesae.sae.route_stats`; nothing is recomputed here. Older files
without the keys give no line and no figure. Lines are plain text: each renderer escapes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from routesae.report.figures import _empty, _layout
from routesae.report.load import scalar

ENTROPY_HELP = "1 = all layers used equally, 0 = one layer"
MARGIN_HELP = "mean over tokens of the router's top weight minus its second; 0 = a coin toss"
LOG_COLUMNS = ("step", "tokens", "routed_frac", "routed_entropy", "router_margin")


def _number(v: Any) -> float | None:
    v = scalar(v)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def eval_diagnostics(ev: dict[str, Any] | None) -> dict[str, float]:
    """``{"entropy", "margin"}`` from eval.json's ``routed_layers``; a key is absent when eval.json lacks it."""
    rl = (ev or {}).get("routed_layers") or {}
    out = {k: _number(rl.get(k)) for k in ("entropy", "margin")}
    return {k: v for k, v in out.items() if v is not None}


def diagnostic_lines(ev: dict[str, Any] | None) -> list[str]:
    """Plain-text lines for the report: routed-layer entropy and router margin (none for an older eval.json)."""
    d = eval_diagnostics(ev)
    lines = []
    if "entropy" in d:
        lines.append(f"routed-layer entropy H = {d['entropy']:.2f} ({ENTROPY_HELP})")
    if "margin" in d:
        lines.append(f"router margin p1 - p2 = {d['margin']:.2f} ({MARGIN_HELP})")
    return lines


def read_jsonl(path: Path) -> pd.DataFrame:
    """A JSON-lines file (``metrics.jsonl``) as a frame; lines that are not JSON objects are skipped."""
    if not path.is_file():
        return pd.DataFrame()
    recs = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    return pd.DataFrame(recs)


def routing_log(metrics: pd.DataFrame) -> pd.DataFrame:
    """The metrics.jsonl rows that carry ``routed_frac`` (a non-empty list), with ``x`` = tokens (else step)."""
    if metrics is None or metrics.empty or "routed_frac" not in metrics:
        return pd.DataFrame(columns=["x", "routed_frac", "routed_entropy", "router_margin"])
    keep = metrics["routed_frac"].map(lambda v: isinstance(v, list) and len(v) > 0 and all(
        _number(x) is not None for x in v))
    d = metrics[keep]
    by_tokens = "tokens" in d and d["tokens"].notna().all()
    x = d["tokens"] if by_tokens else d["step"] if "step" in d else pd.Series(range(len(d)))
    out = pd.DataFrame({"x": x.to_numpy(), "routed_frac": d["routed_frac"].to_numpy(),
                        "routed_entropy": [_number(v) for v in d.get("routed_entropy", [None] * len(d))],
                        "router_margin": [_number(v) for v in d.get("router_margin", [None] * len(d))]})
    out.attrs["x"] = "tokens" if by_tokens else "step"
    return out


def read_routing_log(run: Path) -> pd.DataFrame:
    """:func:`routing_log` of ``RUN/metrics.jsonl`` (empty when absent or without the keys)."""
    return routing_log(read_jsonl(Path(run) / "metrics.jsonl"))


def fractions_figure(log: pd.DataFrame, layers: list[int] | None = None) -> go.Figure:
    """Routed-layer fractions over training, stacked (one band per layer)."""
    title = "routed-layer fractions over training"
    if log.empty:
        return _empty(title)
    width = max(len(v) for v in log["routed_frac"])
    names = [f"L{int(j)}" for j in layers] if layers and len(layers) == width else [f"#{i}" for i in range(width)]
    fig = go.Figure()
    for i, name in enumerate(names):
        y = [float(v[i]) if i < len(v) else 0.0 for v in log["routed_frac"]]
        fig.add_trace(go.Scatter(x=log["x"], y=y, name=name, mode="lines", stackgroup="fr",
                                 hovertemplate=name + "<br>%{x}<br>%{y:.3f}<extra></extra>"))
    return _layout(fig, title, height=280, xaxis=dict(title=log.attrs.get("x", "tokens")),
                   yaxis=dict(title="fraction", range=[0, 1]))


def entropy_figure(log: pd.DataFrame) -> go.Figure:
    """Normalised routed-layer entropy (and the router margin when logged) over training."""
    title = "routed-layer entropy and router margin over training"
    series = {k: log[["x", k]].dropna() for k in ("routed_entropy", "router_margin") if k in log}
    series = {k: d for k, d in series.items() if not d.empty}
    if not series:
        return _empty(title)
    names = {"routed_entropy": "entropy H", "router_margin": "margin p1 - p2"}
    fig = go.Figure([go.Scatter(x=d["x"], y=d[k], name=names[k], mode="lines",
                                hovertemplate=names[k] + "<br>%{x}<br>%{y:.3f}<extra></extra>")
                     for k, d in series.items()])
    return _layout(fig, title, height=280, xaxis=dict(title=log.attrs.get("x", "tokens")),
                   yaxis=dict(range=[0, 1.02]))


def fraction_line(ev: dict[str, Any] | None) -> str | None:
    """``routed-layer fractions: L1 0.47, L2 0.20, ...`` from eval.json; None without them."""
    rl = (ev or {}).get("routed_layers") or {}
    layers, fr = rl.get("layers") or [], rl.get("fractions") or []
    if not layers or len(layers) != len(fr):
        return None
    return "routed-layer fractions: " + ", ".join(f"L{j} {float(f):.2f}" for j, f in zip(layers, fr))


def over_training_line(log: pd.DataFrame) -> str | None:
    """One plain-text line: entropy (and margin) at the first and last logged window; None without a log."""
    unit = log.attrs.get("x", "tokens")
    parts = []
    for k, name in (("routed_entropy", "routed-layer entropy"), ("router_margin", "router margin")):
        d = log[["x", k]].dropna() if not log.empty and k in log else pd.DataFrame()
        if not d.empty:
            a, b = d.iloc[0], d.iloc[-1]
            parts.append(f"{name} {a[k]:.2f} at {int(a['x'])} {unit} → {b[k]:.2f} at {int(b['x'])} {unit}")
    return "over training (metrics.jsonl): " + "; ".join(parts) if parts else None
