"""Shared helpers of the dashboard pages: where the RUN is, cached loaders, escaping, links.

How the run is found: the environment variable ``ROUTESAE_RUN`` (set by ``routesae dashboard RUN``),
else the first argument after ``--`` (``streamlit run dashboards/app.py -- RUN``).

Caching: the :class:`~routesae.report.load.Analysis` is held with ``st.cache_resource`` keyed by the
run folder and the newest modification time of ``RUN/analysis/`` (re-running ``routesae analyze``
invalidates it; the object is shared by all sessions and treated as read-only: ``st.cache_data``
would unpickle a copy of every table on each rerun, too slow for 16k-latent runs). Derived,
per-latent lookups are indexed once (:class:`Index`). Small derived frames use ``st.cache_data``.
The model and the SAE of the token explorer are ``st.cache_resource`` (loaded once per process).

Escaping: no page passes corpus text to ``unsafe_allow_html`` except the highlighted contexts
(:func:`context_block`), built by ``routesae.report.html.context_html`` with ``html.escape`` on
every token; plain text goes through :func:`md_text` (markdown-escaped) or ``st.dataframe``/``st.code``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from routesae.report.html import context_html
from routesae.report.load import Analysis, as_list, load_analysis
from routesae.report.routed_layers import read_jsonl

RUN_ENV = "ROUTESAE_RUN"
MODEL_ENV = "ROUTESAE_MODEL"
HERE = Path(__file__).resolve().parent
PAGES = {"overview": "views/overview.py", "features": "views/features.py", "experts": "views/experts.py",
         "tokens": "views/tokens.py", "routing": "views/routing.py", "steer": "views/steer.py",
         "export": "views/export.py"}

CONTEXT_CSS = """<style>
.rs-ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;line-height:1.9;margin:.15em 0;
  white-space:pre-wrap;word-break:break-all}
.rs-ctx .meta{color:#777;font-family:system-ui,sans-serif;font-size:.85em;margin-right:.6em}
.rs-ctx .tok{border-radius:2px;padding:1px 0}
.rs-ctx .tok.c{outline:1.5px solid #b04000}
</style>"""


# ---------------------------------------------------------------- the run


def run_arg() -> str | None:
    """The RUN folder in ``ROUTESAE_RUN``, else the first argument after ``--`` of ``streamlit run app.py``."""
    if os.environ.get(RUN_ENV):
        return os.environ[RUN_ENV]
    if sys.argv and Path(sys.argv[0]).name == "app.py":
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        return args[0] if args else None
    return None


def analysis_mtime(run: Path) -> float:
    """Newest modification time in ``RUN/analysis`` (and the RUN's json files): the cache key."""
    paths = [*(run / "analysis").glob("*"), *(run / "routing").glob("*"),
             run / "config.json", run / "eval.json", run / "metrics.jsonl",
             run / "train_config.json"]
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


@st.cache_resource(show_spinner="Loading the analysis ...", max_entries=4)
def _load(run: str, mtime: float) -> tuple[Analysis, Index]:
    a = load_analysis(run)
    return a, Index.build(a)


@dataclass
class Index:
    """Row positions per latent in the per-latent tables, and the features table; built once per analysis."""

    latent_pos: dict[int, int]
    contexts: dict[int, np.ndarray]
    latent_domains: dict[int, np.ndarray]
    latent_experts: dict[int, np.ndarray]
    table: pd.DataFrame  # the Features page's table

    @staticmethod
    def build(a: Analysis) -> Index:
        def groups(df: pd.DataFrame) -> dict[int, np.ndarray]:
            if df.empty or "latent" not in df:
                return {}
            return {int(k): v for k, v in df.groupby("latent", sort=False).indices.items()}

        lat = a.latents
        pos = {int(x): i for i, x in enumerate(lat["latent"].to_numpy())} if not lat.empty else {}
        return Index(pos, groups(a.contexts), groups(a.latent_domains), groups(a.latent_experts), feature_table(a))


def get_analysis() -> tuple[Analysis, Index]:
    """The loaded analysis of the run (cached); stops the page with a clear message if there is none."""
    run = run_arg()
    if not run:
        st.error("No run given. Start the dashboard with `routesae dashboard RUN` "
                 f"(or set {RUN_ENV}=RUN).")
        st.stop()
    path = Path(run).expanduser().resolve()
    try:
        return _load(str(path), analysis_mtime(path))
    except (FileNotFoundError, ValueError) as exc:
        st.error(str(exc))
        st.stop()
    raise AssertionError("unreachable")


def rows(df: pd.DataFrame, idx: dict[int, np.ndarray], latent: int) -> pd.DataFrame:
    """The rows of a per-latent table for one latent (empty frame with the columns when none)."""
    pos = idx.get(int(latent))
    return df.iloc[pos] if pos is not None else df.iloc[0:0]


def latent_row(a: Analysis, ix: Index, latent: int) -> pd.Series | None:
    p = ix.latent_pos.get(int(latent))
    return None if p is None else a.latents.iloc[p]


def feature_table(a: Analysis) -> pd.DataFrame:
    """The searchable feature table: one row per latent, scalar columns only."""
    lat = a.latents
    if lat.empty:
        return pd.DataFrame()
    cols = [c for c in ("latent", "density", "count", "max_act", "mean_act", "top_domain", "top_domain_lift",
                        "top_expert_layer", "top_expert", "top_expert_lift", "top_routed_layer", "interpretable",
                        "top_token", "explanation", "detection_auc", "fuzzing_auc", "explanation_label") if c in lat]
    t = lat[cols].copy()
    if "top_expert" in t and "top_expert_layer" in t:  # -1 = none (dense model, or no MoE layer below)
        lay = t["top_expert_layer"].fillna(-1).astype(int)
        ex = t["top_expert"].fillna(-1).astype(int)
        ok = (lay >= 0) & (ex >= 0)
        t["expert"] = np.where(ok, "L" + lay.astype(str) + " E" + ex.astype(str), None)
        if "top_expert_lift" in t:
            t["top_expert_lift"] = t["top_expert_lift"].where(ok)
        t = t.drop(columns=["top_expert", "top_expert_layer"])
        if not ok.any():  # a dense model: no expert columns at all
            t = t.drop(columns=["expert", "top_expert_lift"], errors="ignore")
    if "top_token" in t:
        t["top_token"] = t["top_token"].map(lambda s: None if s is None else visible(s))
    return t.reset_index(drop=True)


@st.cache_data(show_spinner=False, max_entries=8)
def load_metrics(run: str, mtime: float) -> pd.DataFrame:
    return read_jsonl(Path(run) / "metrics.jsonl")


@st.cache_data(show_spinner=False, max_entries=8)
def load_json(path: str, mtime: float) -> dict[str, Any]:
    p = Path(path)
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


# ---------------------------------------------------------------- export


EXPORTS = {"html": ("report.html", "text/html"), "md": ("report.md", "text/markdown"),
           "csv": ("tables.zip", "application/zip"), "json": ("summary.json", "application/json")}


def report_bytes(a: Analysis, kind: str, top_n: int = 30) -> bytes:
    """One downloadable report, built in memory by ``routesae.report`` (nothing written to the run)."""
    import io
    import tempfile
    import zipfile

    from routesae.report.html import render_html
    from routesae.report.markdown import render_markdown
    from routesae.report.tables import summary_json, write_tables

    if kind == "html":
        return render_html(a, top_n).encode("utf-8")
    if kind == "md":
        return render_markdown(a, top_n).encode("utf-8")
    if kind == "json":
        return (json.dumps(summary_json(a, top_n), indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()
    if kind == "csv":
        buf = io.BytesIO()
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_tables(a, Path(tmp) / "tables", formats=("csv",))
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for rel, p in sorted(paths.items()):
                    z.write(p, f"tables/{Path(rel).name}")
        return buf.getvalue()
    raise ValueError(f"unknown export {kind!r}; choose one of {', '.join(EXPORTS)}")


# ---------------------------------------------------------------- text


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>&~$:])")


def visible(s: Any) -> str:
    """A token made visible: newline -> ↵, tab -> →."""
    return str(s).replace("\n", "↵").replace("\t", "→")


def md_text(s: Any) -> str:
    """Any string as literal markdown text: every markdown/HTML special character backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", visible(s))


def context_block(tokens: list, acts: list, center: int, scale: float, meta: str) -> str:
    """One highlighted context as HTML; every token and the meta line are ``html.escape``d."""
    import html

    return (f"<div class='rs-ctx'><span class='meta'>{html.escape(meta, quote=True)}</span>"
            f"{context_html(as_list(tokens), as_list(acts), int(center), scale)}</div>")


# ---------------------------------------------------------------- navigation


def open_feature(latent: int) -> None:
    """Go to the feature page of ``latent`` (a permalink: ``features?feature=N``)."""
    st.switch_page(PAGES["features"], query_params={"feature": str(int(latent))})


def feature_param() -> int | None:
    v = st.query_params.get("feature")
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        return None


def selected_row(event: Any) -> int | None:
    """The row index chosen in an ``st.dataframe(on_select=...)`` event, else None."""
    try:
        sel = event.selection.rows
    except AttributeError:
        return None
    return int(sel[0]) if sel else None


# ---------------------------------------------------------------- model and SAE (token explorer)


def model_path(a: Analysis) -> tuple[str | None, str]:
    """The model the token explorer loads and where the path came from.

    Order: ``ROUTESAE_MODEL``; ``summary.json["model"]`` (the model the analysis used); the store's model
    recorded in ``RUN/train_config.json`` (``store_summary.model.name_or_path``); ``config.json`` meta.model.
    """
    env = os.environ.get(MODEL_ENV)
    if env:
        return env, MODEL_ENV
    if a.summary.get("model"):
        return str(a.summary["model"]), "analysis/summary.json model"
    tc = load_json(str(a.run / "train_config.json"), analysis_mtime(a.run))
    m = (tc.get("store_summary") or {}).get("model")
    name = m.get("name_or_path") if isinstance(m, dict) else m
    if name:
        return str(name), "train_config.json store_summary.model"
    meta = (a.config.get("meta") or {}).get("model")
    if meta:
        return str(meta), "config.json meta.model"
    return None, "none recorded"


@st.cache_resource(show_spinner="Loading the model ...", max_entries=2)
def load_lm(path: str):
    """``(model, tokenizer, lock)`` on CPU (or the GPU when visible); loaded once per process."""
    from routesae.models.load import ModelConfig, load_model

    model, tok = load_model(ModelConfig(path, "float32", "auto"))
    return model, tok, threading.Lock()


@st.cache_resource(show_spinner="Loading the SAE ...", max_entries=2)
def load_run_sae(run: str, mtime: float):
    from routesae.sae import load_sae

    return load_sae(run, device="cpu").eval()


def sae_mtime(run: Path) -> float:
    p = run / "sae.safetensors"
    return p.stat().st_mtime if p.exists() else 0.0
