"""Facts shared by the HTML, Markdown and JSON reports: number formatting, metric rows, derived tables.

Nothing here escapes text; each renderer escapes for its own format.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from routesae.analyze.specialists import MIN_LOAD_RATIO, rank_specialists
from routesae.report.load import Analysis, as_list, scalar

RECON_KEYS = ("examples", "l0", "nmse", "explained_variance", "dead_fraction", "dense_fraction_gt_10pct",
              "dense_fraction_gt_1pct")
SPLICE_KEYS = ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_increase", "ce_recovered", "kl", "kl_zero_ablated",
               "tokens_ce", "tokens_real", "contexts")


def num(v: Any, digits: int = 4) -> str:
    """A cell for humans: None/NaN -> '-', floats to ``digits`` significant figures, whole floats as ints."""
    v = scalar(v)
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.{digits}g}"
    if isinstance(v, list):
        return ", ".join(num(x, digits) for x in v)
    return str(v)


def summary_rows(a: Analysis) -> list[tuple[str, Any]]:
    """(name, value) pairs for the model / store / SAE / tokens summary."""
    s, c = a.summary, a.config
    rows: list[tuple[str, Any]] = [
        ("run", str(a.run)), ("model", a.model_name),
        ("store", s.get("store") or a.eval.get("store") or (c.get("meta") or {}).get("store")),
        ("SAE architecture", s.get("arch") or c.get("arch")), ("SAE layers", s.get("layers") or c.get("layers")),
        ("latents", s.get("n_latents") or c.get("n_latents")), ("k (active latents)", c.get("k")),
        ("d_in", c.get("d_in")), ("MoE layers", a.moe_layers), ("experts per MoE layer", s.get("n_experts")),
        ("router top-k", s.get("top_k")), ("tokens analysed", s.get("tokens") or a.settings.get("tokens")),
        ("dead latents", s.get("dead_latents")), ("dense latents", s.get("dense_latents")),
        ("interpretable latents", s.get("interpretable")), ("feature count", a.feature_count.get("count")),
        ("analysis created", s.get("created")),
    ]
    if c.get("arch") == "routesae":
        rows[5:5] = [("routing", c.get("routing")), ("router", c.get("router")), ("pooling", c.get("pooling"))]
    return [(k, v) for k, v in rows if v is not None and v != []]


def config_rows(a: Analysis) -> list[tuple[str, Any]]:
    """The SAE config (RUN/config.json) flattened: meta entries as ``meta.KEY``."""
    rows = [(k, v) for k, v in a.config.items() if k != "meta"]
    rows += [(f"meta.{k}", v) for k, v in (a.config.get("meta") or {}).items()]
    return rows


def metric_rows(ev: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(group, metric, value) rows of eval.json: reconstruction spaces, splice (or why it was skipped)."""
    rows: list[tuple[str, str, Any]] = []
    for space in ("sae_space", "raw_space"):
        for k in RECON_KEYS:
            if k in (ev.get(space) or {}):
                rows.append((space, k, ev[space][k]))
    if "mean_p_star" in ev:
        rows.append(("routing", "mean_p_star", ev["mean_p_star"]))
    sp = ev.get("splice") or {}
    if "skipped" in sp:
        rows.append(("splice", "skipped", sp["skipped"]))
    else:
        src = {**sp, **(sp.get("mean") or {})} if "mean" in sp else sp
        rows += [("splice", k, src[k]) for k in SPLICE_KEYS if k in src]
    return rows


def per_layer_rows(ev: dict[str, Any]) -> pd.DataFrame:
    """One row per SAE layer: reconstruction in both spaces (empty for one-layer SAEs)."""
    out = []
    for r in ev.get("per_layer") or []:
        sae, raw = r.get("sae_space") or {}, r.get("raw_space") or {}
        out.append({"layer": r.get("layer"), "examples": sae.get("examples"), "l0": sae.get("l0"),
                    "sae_nmse": sae.get("nmse"), "sae_explained_variance": sae.get("explained_variance"),
                    "raw_nmse": raw.get("nmse"), "raw_explained_variance": raw.get("explained_variance")})
    return pd.DataFrame(out)


def min_load_ratio(a: Analysis) -> float:
    """The minimum load (x uniform 1/E) of a specialist: the analysis's setting, else the default 0.5."""
    v = scalar(a.settings.get("min_load_ratio"))
    return float(v) if isinstance(v, (int, float)) else MIN_LOAD_RATIO


def most_specialised(a: Analysis, n: int = 10, min_load: float | None = None) -> pd.DataFrame:
    """The ``n`` most selective experts over all MoE layers that are not hubs and carry a load of at least
    ``min_load`` x uniform (default: :func:`min_load_ratio`); ``lift`` = the top domain's share / (k/E)."""
    es = a.expert_stats
    if es.empty:
        return es
    ranked = rank_specialists(es, min_load_ratio(a) if min_load is None else min_load)
    cols = [c for c in ("layer", "expert", "selectivity", "top_domain", "top_share", "specialisation", "load",
                        "top_tokens") if c in es]
    return ranked[cols].head(n).rename(columns={"specialisation": "lift"})


def hubs(a: Analysis) -> pd.DataFrame:
    """Experts in the top-k of more than half of the tokens of most domains (``hub``): a lift near E/k in every
    domain, a selectivity near 1. ``share_all`` = fraction of all tokens whose top-k includes the expert."""
    es = a.expert_stats
    if es.empty or "hub" not in es:
        return pd.DataFrame()
    d = es[es["hub"].astype(bool)].sort_values(["layer", "expert"])
    cols = ["layer", "expert", "base_topk", "hub_domains", "specialisation", "selectivity", "load"]
    return d[[c for c in cols if c in d]].rename(columns={"base_topk": "share_all", "specialisation": "lift"})


def collapsed(a: Analysis) -> pd.DataFrame:
    """Experts flagged collapse_low or collapse_high, with ``flag`` = 'low' / 'high'."""
    es = a.expert_stats
    if es.empty:
        return es
    low, high = es["collapse_low"].astype(bool), es["collapse_high"].astype(bool)
    d = es[low | high].copy()
    d["flag"] = np.where(low[low | high], "low", "high")
    d["uniform"] = 1.0 / es.groupby("layer")["expert"].transform("count")[low | high]
    return d[["layer", "expert", "flag", "load", "uniform", "top_domain"]].sort_values(["layer", "expert"])


def top_experts_per_domain(a: Analysis, n: int = 3) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{layer: {domain: [{expert, share_topk, lift_topk, selectivity, hub}, ...]}}, the ``n`` most used experts per
    domain (a hub is among them in every domain: ``hub`` says so)."""
    ed = a.expert_domain
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    if ed.empty:
        return out
    es = a.expert_stats
    hub = set() if es.empty or "hub" not in es else {
        (int(r.layer), int(r.expert)) for r in es[es["hub"].astype(bool)].itertuples()}
    for (layer, dom), g in ed.groupby(["layer", "domain"], sort=True):
        g = g.sort_values(["share_topk", "expert"], ascending=[False, True]).head(n)
        out.setdefault(str(int(layer)), {})[str(dom)] = [
            {"expert": int(r.expert), "share_topk": scalar(r.share_topk), "lift_topk": scalar(r.lift_topk),
             "selectivity": scalar(getattr(r, "selectivity", None)), "hub": (int(layer), int(r.expert)) in hub}
            for r in g.itertuples()]
    return out


def feature_facts(a: Analysis, latent: int) -> list[tuple[str, Any]]:
    """(name, value) pairs that describe one latent."""
    r = a.latent_row(latent)
    if r is None:
        return []
    fr = as_list(r.get("routed_layer_fractions"))
    layers = as_list(a.config.get("layers") or a.summary.get("layers") or [])
    routed = ", ".join(f"L{j}: {num(f, 2)}" for j, f in zip(layers, fr)) if len(fr) == len(layers) > 1 else None
    expert = None
    if top_expert(r) is not None:
        layer, e = top_expert(r)
        lift = scalar(r.get("top_expert_lift"))
        expert = f"L{layer} E{e}" + (f" (lift {num(lift, 3)})" if lift is not None else "")
    rows = [("density", r.get("density")), ("active tokens", r.get("count")), ("mean act", r.get("mean_act")),
            ("max act", r.get("max_act")),
            ("top domain", None if scalar(r.get("top_domain")) is None
             else f"{r['top_domain']} (lift {num(r.get('top_domain_lift'), 3)})"),
            ("top routed layer", r.get("top_routed_layer")), ("routed layers", routed), ("top expert", expert),
            ("interpretable", r.get("interpretable")), ("top token", r.get("top_token"))]
    return [(k, v) for k, v in rows if scalar(v) is not None]


def top_expert(r: pd.Series | dict) -> tuple[int, int] | None:
    """A latent's (MoE layer, expert) of highest lift, or None: missing, or ``-1`` (a dense model, or a routed
    layer below the first MoE layer)."""
    layer, e = scalar(r.get("top_expert_layer")), scalar(r.get("top_expert"))
    if layer is None or e is None or int(layer) < 0 or int(e) < 0:
        return None
    return int(layer), int(e)


def expert_latents_summary(a: Analysis, layers: list[int], n: int = 5) -> pd.DataFrame:
    """Per expert of ``layers``: its top ``n`` latents by lift, as text ``latent (lift x)``."""
    el = a.expert_latents
    if el.empty:
        return el
    el = el[el["layer"].isin(layers)].sort_values(["layer", "expert", "rank"])
    rows = [{"layer": int(layer), "expert": int(e),
             "latents": ", ".join(f"{int(r.latent)} ({num(r.lift, 3)}x)" for r in g.head(n).itertuples())}
            for (layer, e), g in el.groupby(["layer", "expert"], sort=True)]
    return pd.DataFrame(rows)

