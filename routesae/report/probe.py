"""The routing probe (``routesae explain-routing``, RUN/routing_probe/) as report tables (HTML and Markdown)."""

from __future__ import annotations

import pandas as pd

from routesae.report.load import Analysis

NOTE = ("Each token's routed experts predicted from its SAE latents by a linear probe (recall@k of the true top-k "
        "experts on held-out contexts), against the token's unigram and bigram expert frequencies and a linear probe "
        "on the raw residual entering the MoE block (an upper reference, not an explanation).")


def recall_table(a: Analysis) -> pd.DataFrame:
    """One row per MoE layer (and a mean row), one column per method; empty without a probe."""
    rec = (a.probe or {}).get("recall")
    if rec is None or rec.empty:
        return pd.DataFrame()
    wide = rec.pivot_table(index="layer", columns="method", values="recall")
    order = [m for m in ("unigram", "bigram", "latents", "raw_residual") if m in wide]
    wide = wide[order]
    wide.loc["mean"] = wide.mean()
    return wide.reset_index().rename(columns={"latents": "SAE latents", "raw_residual": "raw residual"})


def expert_table(a: Analysis, n: int = 12) -> pd.DataFrame:
    """The first ``n`` experts' explanations (built from their most predictive latents)."""
    ee = (a.probe or {}).get("expert_explanations")
    if ee is None or ee.empty:
        return pd.DataFrame()
    return ee.sort_values(["layer", "expert"]).head(n)[["layer", "expert", "explanation", "explainer"]]


NEEDED_NOTE = ("Needed experts k' per token (the smallest k' whose top-k' routing at every MoE layer keeps the "
               "next-token distribution within KL eps of the model's own) regressed on the latents: R² on "
               "held-out contexts "
               "against the token-id mean, by domain.")


def needed_table(a: Analysis) -> pd.DataFrame:
    """``routesae explain-routing --needed-k``: k' and R² by domain; empty without it."""
    nk = (a.probe or {}).get("needed_k")
    return pd.DataFrame() if nk is None or nk.empty else nk
