"""Read ``RUN/analysis/`` (docs/analysis.md) into an :class:`Analysis`; readers never recompute.

A table the analysis did not write (no router records, no SAE, ...) loads as an empty DataFrame so
every renderer can skip its section with ``if a.expert_stats.empty``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

EXPERT_TABLES = ("expert_domain", "expert_stats", "layer_stats", "domain_layer", "experts_per_token",
                 "position_profile", "coactivation")
FEATURE_TABLES = ("latents", "contexts", "latent_domains", "latent_experts", "expert_latents")
TABLES = EXPERT_TABLES + FEATURE_TABLES
CONTRAST_TABLE = "contrast"  # analysis/contrast.parquet (routesae analyze --contrast A:B)
SHARED_DIR = "shared"  # RUN/shared/ (routesae analyze-shared MODEL --out RUN/shared)
SHARED_TABLES = ("shared_layer", "shared_domain", "shared_position")
# columns that hold lists (Parquet list columns; JSON strings in the CSV copies)
LIST_COLUMNS = {
    "expert_stats": ("top_tokens", "top_token_shares"),
    "latents": ("routed_layer_fractions", "neighbours", "neighbour_cos", "logit_pos", "logit_neg",
                "logit_pos_values", "logit_neg_values", "hist_edges", "hist_counts"),
    "contexts": ("tokens", "acts"),
}


@dataclass
class Analysis:
    """Everything a report or the dashboard shows, as loaded from ``RUN/analysis/``."""

    run: Path
    dir: Path
    summary: dict[str, Any]
    settings: dict[str, Any]
    feature_count: dict[str, Any]
    config: dict[str, Any]  # RUN/config.json (the SAE), {} when absent
    eval: dict[str, Any]  # RUN/eval.json, else the copy in summary.json, else {}
    # the tables (docs/analysis.md); empty when the analysis did not write one
    expert_domain: pd.DataFrame = field(default_factory=pd.DataFrame)
    expert_stats: pd.DataFrame = field(default_factory=pd.DataFrame)
    layer_stats: pd.DataFrame = field(default_factory=pd.DataFrame)
    domain_layer: pd.DataFrame = field(default_factory=pd.DataFrame)
    experts_per_token: pd.DataFrame = field(default_factory=pd.DataFrame)
    position_profile: pd.DataFrame = field(default_factory=pd.DataFrame)
    coactivation: pd.DataFrame = field(default_factory=pd.DataFrame)
    latents: pd.DataFrame = field(default_factory=pd.DataFrame)
    contexts: pd.DataFrame = field(default_factory=pd.DataFrame)
    latent_domains: pd.DataFrame = field(default_factory=pd.DataFrame)
    latent_experts: pd.DataFrame = field(default_factory=pd.DataFrame)
    expert_latents: pd.DataFrame = field(default_factory=pd.DataFrame)
    routing: Any = None  # RUN/routing/ (analyze-routing), a routesae.report.routing.RoutingResults or None
    # RUN/metrics.jsonl lines with routed-layer fractions (routesae.report.routed_layers.routing_log); may be empty
    routing_log: pd.DataFrame = field(default_factory=pd.DataFrame)
    # analysis/contrast.parquet: experts ranked by the activation-rate difference of two domains; may be empty
    contrast: pd.DataFrame = field(default_factory=pd.DataFrame)
    # RUN/shared/: shared versus routed computation (tables by name, and "summary"); {} when absent
    shared: dict[str, Any] = field(default_factory=dict)
    # RUN/routing_probe/ (routesae explain-routing): recall, domain_recall, expert_features, expert_explanations
    probe: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables the analysis wrote, by file name."""
        return {name: getattr(self, name) for name in TABLES if len(getattr(self, name).columns)}

    # ---- small derived facts shared by the renderers
    @property
    def moe_layers(self) -> list[int]:
        if self.summary.get("moe_layers"):
            return [int(x) for x in self.summary["moe_layers"]]
        if not self.layer_stats.empty:
            return sorted(int(x) for x in self.layer_stats["layer"].unique())
        return []

    @property
    def has_experts(self) -> bool:
        """False for a dense model (no MoE layers, no router records): the renderers then omit every expert
        field and section instead of showing placeholders."""
        return bool(self.moe_layers) or any(not getattr(self, t).empty for t in EXPERT_TABLES + ("latent_experts",))

    @property
    def domains(self) -> list[str]:
        if self.summary.get("domains"):
            return [str(d) for d in self.summary["domains"]]
        if not self.expert_domain.empty:
            return sorted(str(d) for d in self.expert_domain["domain"].unique())
        return []

    @property
    def model_name(self) -> str:
        """The model as recorded (a hub name or a path; a path under the working directory shown relative)."""
        return display_path(str(self.summary.get("model") or (self.config.get("meta") or {}).get("model") or "?"))

    def latent_row(self, latent: int) -> pd.Series | None:
        lat = self.latents
        if lat.empty:
            return None
        rows = lat[lat["latent"] == latent]
        return None if rows.empty else rows.iloc[0]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); rerun the stage that "
                         f"wrote it") from exc


def load_analysis(run: str | Path) -> Analysis:
    """Load ``RUN/analysis``; a one-line ``FileNotFoundError`` naming ``routesae analyze RUN`` when absent."""
    run = Path(run).expanduser()
    ana = run / "analysis"
    if not ana.is_dir() or not (any(ana.glob("*.parquet")) or (ana / "summary.json").is_file()):
        raise FileNotFoundError(f"{ana} holds no analysis; run `routesae analyze {run}` first")
    tables = {}
    for name in TABLES:
        path = ana / f"{name}.parquet"
        if path.is_file():
            tables[name] = pd.read_parquet(path)
    summary = _read_json(ana / "summary.json")
    ev = _read_json(run / "eval.json") or dict(summary.get("eval") or {})
    from routesae.explain.tables import latest_explanations, probe_tables
    from routesae.report.routed_layers import read_routing_log
    from routesae.report.routing import ROUTING_DIR, load_routing

    if "latents" in tables:  # RUN/explanations (routesae explain): explanation, its label and mean scores per latent
        tables["latents"] = with_explanations(tables["latents"], latest_explanations(run))
    contrast = ana / f"{CONTRAST_TABLE}.parquet"
    return Analysis(run=run, dir=ana, summary=summary, settings=_read_json(ana / "settings.json"),
                    feature_count=_read_json(ana / "feature_count.json"), config=_read_json(run / "config.json"),
                    eval=ev, routing=load_routing(run / ROUTING_DIR), routing_log=read_routing_log(run),
                    contrast=pd.read_parquet(contrast) if contrast.is_file() else pd.DataFrame(),
                    shared=load_shared(run / SHARED_DIR), probe=probe_tables(run), **tables)


def load_shared(folder: Path) -> dict[str, Any]:
    """``RUN/shared/`` written by ``routesae analyze-shared``: its tables and ``summary``; {} when absent."""
    if not (folder / "summary.json").is_file():
        return {}
    out: dict[str, Any] = {"summary": _read_json(folder / "summary.json")}
    for name in SHARED_TABLES:
        path = folder / f"{name}.parquet"
        out[name] = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    return out


def with_explanations(latents: pd.DataFrame, ex: pd.DataFrame) -> pd.DataFrame:
    """``latents`` with the explanation columns of ``RUN/explanations`` joined (an ``explanation`` column already
    in the table is kept where no newer one exists)."""
    if ex.empty:
        return latents
    cols = [c for c in ex.columns if c != "latent"]
    base = latents.drop(columns=[c for c in cols if c in latents and c != "explanation"])
    out = base.merge(ex, on="latent", how="left", suffixes=("_old", ""))
    if "explanation_old" in out:
        out["explanation"] = out["explanation"].where(out["explanation"].notna(), out.pop("explanation_old"))
    return out


# ---------------------------------------------------------------- helpers for the renderers


def as_list(v: Any) -> list:
    """A list cell (numpy array, list, None, NaN) as a plain Python list of Python scalars."""
    if v is None:
        return []
    if isinstance(v, float) and math.isnan(v):
        return []
    if isinstance(v, np.ndarray):
        return v.tolist()
    return [x.item() if isinstance(x, np.generic) else x for x in v]


def scalar(v: Any) -> Any:
    """A cell as a JSON-able Python value: numpy scalars unwrapped, NaN/inf -> None."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (list, tuple, np.ndarray)):
        return [scalar(x) for x in as_list(v)]
    return v


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-able dicts."""
    return [{k: scalar(v) for k, v in row.items()} for row in df.to_dict("records")]


def pick_layers(layers: list[int], most: int = 6) -> list[int]:
    """All layers when few, else the first, middle and last."""
    if len(layers) <= most:
        return list(layers)
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def top_features(a: Analysis, n: int) -> list[int]:
    """The ``n`` latents the reports show: live latents with contexts, interpretable first, then by density."""
    lat = a.latents
    if lat.empty or n <= 0:
        return []
    live = lat[lat["density"] > 0]
    if not a.contexts.empty:
        live = live[live["latent"].isin(a.contexts["latent"].unique())]
    interp = live["interpretable"].astype(bool) if "interpretable" in live else pd.Series(False, index=live.index)
    order = live.assign(_i=interp).sort_values(["_i", "density", "latent"], ascending=[False, False, True])
    return [int(x) for x in order["latent"].head(n)]


def display_path(text: str) -> str:
    """``text`` relative to the working directory when it is an absolute path below it, else unchanged
    (reports and the dashboard then show ``data/demo-moe``, not the machine's folder layout)."""
    p = Path(text)
    if not p.is_absolute():
        return text
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return text
