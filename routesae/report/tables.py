"""Table copies (CSV + Parquet) and the machine-readable ``summary.json`` of a report.

CSV: one file per analysis table, list cells as JSON strings (``read_csv_table`` reverses it);
Parquet: byte copies of the analysis files. ``summary.json`` holds metrics, counts, per-layer
statistics, the top experts per domain, the most specialised experts (selectivity), hubs, flagged
experts and the report's top features. For a dense model (no router records) every expert key is
left out rather than filled with nulls or ``-1``.

Formula injection: corpus text reaches the CSV copies, and a spreadsheet runs a cell that starts
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return as a formula (OWASP "CSV injection").
Every CSV the package writes (the report's ``tables/*.csv``, the dashboard's ``tables.zip``) goes
through :func:`write_csv`, which puts a single quote ``'`` in front of such *string* cells (and
header names). A string made of quotes followed by one of those characters (``'=x``) gets one quote
more, so the rule is reversible: :func:`read_csv_table` removes one leading quote from every string
cell that is one or more quotes followed by one of those characters, and round trips stay exact.
Numbers (negative ones included) are never touched; list cells start with ``[`` and need nothing.
Parquet, ``summary.json`` and the Neuronpedia batches keep the raw text. Lines end in CRLF (RFC 4180),
so a cell holding a carriage return is quoted and stays one cell.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from routesae.atomic import atomic_path, atomic_write_bytes
from routesae.report import facts
from routesae.report.findings import findings
from routesae.report.load import Analysis, as_list, records, scalar, top_features

SUMMARY_FORMAT = "routesae-report-summary/1"
# a cell a spreadsheet would evaluate, after any quotes a previous escape added (OWASP CSV injection)
_FORMULA = re.compile(r"'*[=+\-@\t\r]")
_ESCAPED = re.compile(r"'+[=+\-@\t\r]")


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))


def list_columns(df: pd.DataFrame) -> list[str]:
    """Columns whose cells are lists (Parquet list columns)."""
    out = []
    for c in df.columns:
        if df[c].dtype == object:
            vals = df[c].dropna()
            if len(vals) and all(_is_list(v) for v in vals):
                out.append(c)
    return out


def csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with list cells as JSON strings (NaN inside lists -> null)."""
    cols = list_columns(df)
    if not cols:
        return df
    df = df.copy()
    for c in cols:
        df[c] = [None if not _is_list(v) else json.dumps([scalar(x) for x in as_list(v)], ensure_ascii=False)
                 for v in df[c]]
    return df


def _texty(col: pd.Series) -> bool:
    """A column that may hold strings (object, or pandas' string dtypes)."""
    return col.dtype == object or pd.api.types.is_string_dtype(col.dtype)


def csv_safe(v: Any) -> Any:
    """A string a spreadsheet would run as a formula, prefixed with ``'``; anything else unchanged."""
    return "'" + v if isinstance(v, str) and _FORMULA.match(v) else v


def csv_unescape(v: Any) -> Any:
    """Undo :func:`csv_safe`."""
    return v[1:] if isinstance(v, str) and _ESCAPED.match(v) else v


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` as CSV atomically: list cells as JSON, formula-like strings quoted (module docstring).

    The one CSV writer of the package; ``read_csv_table`` reads it back exactly."""
    df = csv_frame(df).copy()
    for c in df.columns:
        if _texty(df[c]):
            df[c] = df[c].map(csv_safe)
    df.columns = [csv_safe(c) for c in df.columns]
    with atomic_path(path) as tmp:  # CRLF (RFC 4180): the csv module then quotes cells holding a bare \r too
        df.to_csv(tmp, index=False, lineterminator="\r\n")


def read_csv_table(path: str | Path, list_cols: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV copy back: the formula quoting undone, the JSON list columns in ``list_cols`` parsed."""
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    df.columns = [csv_unescape(c) for c in df.columns]
    for c in df.columns:
        if _texty(df[c]):
            df[c] = df[c].map(csv_unescape)
    for c in list_cols:
        if c in df:
            df[c] = [json.loads(v) if isinstance(v, str) else [] for v in df[c]]
    return df


def write_tables(a: Analysis, out: Path, formats: tuple[str, ...] = ("csv", "parquet")) -> dict[str, Path]:
    """Write ``out/NAME.csv`` and/or ``out/NAME.parquet`` for every analysis table; return the paths."""
    paths: dict[str, Path] = {}
    for name, df in a.tables.items():
        if "csv" in formats:
            p = out / f"{name}.csv"
            write_csv(df, p)
            paths[f"tables/{name}.csv"] = p
        if "parquet" in formats:
            p = out / f"{name}.parquet"
            src = a.dir / f"{name}.parquet"
            if src.is_file():
                atomic_write_bytes(p, src.read_bytes())
            else:
                with atomic_path(p) as tmp:
                    df.to_parquet(tmp, index=False)
            paths[f"tables/{name}.parquet"] = p
    return paths


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy unwrapped, NaN/inf -> null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_clean(v) for v in as_list(obj)]
    return scalar(obj)


def summary_json(a: Analysis, top_n: int = 30) -> dict[str, Any]:
    """The report's machine-readable summary."""
    s, ev, lat = a.summary, a.eval, a.latents
    live = int((lat["density"] > 0).sum()) if not lat.empty else None
    counts = {"n_latents": s.get("n_latents") or a.config.get("n_latents"), "dead_latents": s.get("dead_latents"),
              "dense_latents": s.get("dense_latents"), "live_latents": live,
              "interpretable": s.get("interpretable"), "feature_count": a.feature_count.get("count"),
              "contexts": len(a.contexts) if not a.contexts.empty else 0,
              "collapsed_experts": len(facts.collapsed(a)) if not a.expert_stats.empty else 0}
    metrics: dict[str, Any] = {k: {m: v for m, v in (ev.get(k) or {}).items() if m != "space"}
                               for k in ("sae_space", "raw_space") if k in ev}
    if "splice" in ev:
        metrics["splice"] = ev["splice"]
    for k in ("tokens", "mean_p_star", "routed_layers"):
        if k in ev:
            metrics[k] = ev[k]
    feats = []
    experts = a.has_experts
    keys = ("latent", "density", "max_act", "top_domain", "top_domain_lift", "top_routed_layer", "interpretable",
            "top_token")
    for i in top_features(a, top_n):
        r = a.latent_row(i)
        f = {k: scalar(r.get(k)) for k in keys}
        if experts:  # -1 (no MoE layer at or below the routed layer) -> null
            te = facts.top_expert(r)
            f.update({"top_expert_layer": te[0] if te else None, "top_expert": te[1] if te else None,
                      "top_expert_lift": scalar(r.get("top_expert_lift")) if te else None})
        feats.append(f)
    out = {
        "format": SUMMARY_FORMAT, "run": str(a.run),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "analysis_created": s.get("created"), "model": a.model_name, "store": s.get("store") or ev.get("store"),
        "arch": s.get("arch") or a.config.get("arch"), "layers": s.get("layers") or a.config.get("layers"),
        "moe_layers": a.moe_layers, "n_experts": s.get("n_experts"), "top_k": s.get("top_k"),
        "tokens": s.get("tokens") or a.settings.get("tokens"), "domains": s.get("domains") or {},
        "sae": a.config, "counts": counts, "metrics": metrics,
        "layer_stats": records(a.layer_stats) if not a.layer_stats.empty else [],
        "top_experts_per_domain": facts.top_experts_per_domain(a, 3),
        "most_specialised_experts": records(facts.most_specialised(a, 10)) if not a.expert_stats.empty else [],
        "min_load_ratio": facts.min_load_ratio(a),
        "hub_experts": records(facts.hubs(a)) if not a.expert_stats.empty else [],
        "collapsed_experts": records(facts.collapsed(a)) if not a.expert_stats.empty else [],
        "cold_start": records(a.position_profile) if not a.position_profile.empty else [],
        "top_features": feats,
        "findings": [{"key": f.key, "section": f.section, "text": f.text, "values": f.values}
                     for f in findings(a)],
    }
    if not experts:
        for k in ("n_experts", "top_k", "layer_stats", "top_experts_per_domain", "most_specialised_experts",
                  "min_load_ratio", "hub_experts", "collapsed_experts", "cold_start"):
            out.pop(k)
        counts.pop("collapsed_experts")
    return _clean(out)


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN), UTF-8, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
