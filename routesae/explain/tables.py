"""Read what ``routesae explain`` and ``routesae explain-routing`` wrote (pandas only; for reports and the dashboard).

:func:`latest_explanations`: one row per latent, the most recent explanation with its explainer and
its mean scores (the judge named); :func:`label` says in words which explainer and judge made a score.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

EXPLAIN_DIR = "explanations"
PROBE_DIR = "routing_probe"


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def label(explainer: str | None, judge: str | None = None) -> str:
    """``tokens explainer`` / ``LLM smollm2``; with the judge: ``..., judged by the proxy (token overlap)``."""
    def who(x: str) -> str:
        if x.startswith("llm:"):
            return f"LLM {x[4:]}"
        return {"tokens": "token explainer (no LLM)", "proxy:token-match": "proxy judge (token overlap, no LLM)"}.get(
            x, x)

    out = who(str(explainer)) if explainer else ""
    return out + (f", judged by {who(str(judge))}" if judge else "")


def latest_explanations(run: str | Path) -> pd.DataFrame:
    """Per latent: ``explanation, explainer, explanation_label`` and, when scored, ``detection_auc, fuzzing_auc,
    detection_accuracy, fuzzing_accuracy, judge``; empty when nothing was explained."""
    d = Path(run) / EXPLAIN_DIR
    ex = _read(d / "explanations.parquet")
    if ex.empty:
        return ex
    ex = ex.sort_values(["created", "explainer"]).drop_duplicates("latent", keep="last")
    out = ex[["latent", "explanation", "explainer"]].copy()
    sc = _read(d / "scores.parquet")
    if not sc.empty:
        sc = sc.merge(ex[["latent", "explainer"]], on=["latent", "explainer"])
        wide = sc.pivot_table(index=["latent", "judge"], columns="scorer", values=["auc", "accuracy"],
                              aggfunc="mean")
        wide.columns = [f"{s}_{m}" for m, s in wide.columns]
        wide = wide.reset_index().drop_duplicates("latent", keep="last")
        out = out.merge(wide, on="latent", how="left")
    if "judge" not in out:
        out["judge"] = None
    out["explanation_label"] = [label(e, j if isinstance(j, str) else None)
                                for e, j in zip(out["explainer"], out["judge"])]
    return out.reset_index(drop=True)


def explain_summary(run: str | Path) -> dict:
    p = Path(run) / EXPLAIN_DIR / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def probe_tables(run: str | Path) -> dict[str, pd.DataFrame]:
    """``recall, domain_recall, expert_features, expert_explanations, needed_k, needed_latents`` of
    ``RUN/routing_probe`` (empty when absent)."""
    d = Path(run) / PROBE_DIR
    return {n: _read(d / f"{n}.parquet") for n in ("recall", "domain_recall", "expert_features",
                                                   "expert_explanations", "needed_k", "needed_latents")}
