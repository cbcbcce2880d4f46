"""Tables of ``analyze-routing`` from its per-token arrays (definitions in routesae.analyze.routing).

Every table has a ``domain`` column with one row group per corpus domain plus ``all``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ALL = "all"


DEFINITIONS = {
    "kl": "KL(own routing || overridden routing) of the next-token distribution, nats, mean over real tokens",
    "ce": "next-token cross-entropy over real positions with a real next token; ce_increase = ce - ce of own routing",
    "needed_k": "smallest k' of the grid with KL(topk:k') <= eps (k when none below k fits); scope 'all': the "
                "override at every MoE layer, scope 'layer': at that layer only",
    "compute_saved": "1 - mean needed_k / k (routed-expert FFN compute)",
    "n_active": "real experts a token used at a layer (zero-computation experts excluded)",
    "topp": "smallest set of experts whose router probabilities sum to >= p, at every MoE layer",
    "ablation": "expert e removed at layer L (router logit -inf, the family's rule picks the rest)",
}


def _cat(parts: list[dict]) -> dict:
    """Per-batch ``{key: array}`` dicts -> one ``{key: concatenated array}``."""
    return {key: np.concatenate([p[key] for p in parts]) for key in (parts[0] if parts else {})}


def _groups(domains: np.ndarray) -> list[tuple[str, np.ndarray]]:
    return [(ALL, np.ones(len(domains), bool))] + [(str(d), domains == d) for d in sorted(set(domains))]


def _mean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def _loss_rows(groups, ce_own, kl, ce, **keys) -> list[dict]:
    rows = []
    for dom, sel in groups:
        c, c0 = _mean(ce[sel]), _mean(ce_own[sel])
        rows.append({**keys, "domain": dom, "ce": c, "ce_increase": c - c0, "kl": _mean(kl[sel]) if kl is not None
                     else float("nan"), "tokens": int(sel.sum())})
    return rows


def _hist_rows(groups, values: np.ndarray, column: str, **keys) -> list[dict]:
    rows = []
    for dom, sel in groups:
        v, n = values[sel], int(sel.sum())
        for x, c in zip(*np.unique(v, return_counts=True)):
            rows.append({**keys, "domain": dom, column: int(x), "tokens": int(c), "fraction": c / n})
    return rows


def needed_k(kl_by_k: dict[int, np.ndarray], k: int, eps: float, n: int) -> np.ndarray:
    """Smallest k' < k of the grid with KL <= eps, else k (k' = k is the model's own routing)."""
    need = np.full(n, k, np.int64)
    for kk in sorted(kl_by_k, reverse=True):  # descending: the last fit written is the smallest
        if kk < k:
            need = np.where(kl_by_k[kk] <= eps, kk, need)
    return need


def routing_tables(acc: dict[str, list], k: int, k_grid: list[int], eps: list[float], moe: list[int],
                   view_layers: list[int], default_eps: float) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    tokens = pd.concat(acc["tokens"], ignore_index=True)
    domains = tokens["domain"].astype(str).to_numpy()
    groups = _groups(domains)
    n = len(tokens)
    ce_own = np.concatenate(acc["ce_own"])
    topk_kl, topk_ce = _cat(acc["topk_kl"]), _cat(acc["topk_ce"])

    needed_rows, saved_rows = [], []
    layer_kl = _cat(acc["layer_kl"])
    views = [("all", -1, topk_kl)] + [("layer", layer, {kk: v for (li, kk), v in layer_kl.items() if li == layer})
                                      for layer in view_layers]
    for e in eps:
        for scope, layer, kl_by_k in views:
            need = needed_k(kl_by_k, k, e, n)
            if scope == "all":
                tokens[f"needed_k_eps{e:g}"] = need
            needed_rows += _hist_rows(groups, need, "needed_k", scope=scope, layer=layer, eps=e)
            for dom, sel in groups:
                m = float(need[sel].mean())
                saved_rows.append({"scope": scope, "layer": layer, "eps": e, "domain": dom, "mean_needed_k": m,
                                   "compute_saved": 1 - m / k, "tokens": int(sel.sum())})
    loss_rows = [r for kk in k_grid for r in _loss_rows(groups, ce_own, topk_kl[kk], topk_ce[kk], k=kk)]

    topp_kl, topp_ce = _cat(acc["topp_kl"]), _cat(acc["topp_ce"])
    p_grid = list(topp_kl)
    own = _cat(acc["own"])
    counts = {p: _cat([b[p] for b in acc["topp_n"]]) for p in p_grid}
    dist_rows = [r for layer in moe for r in _hist_rows(groups, own[layer], "n_active", override="model",
                                                         p=float("nan"), layer=layer)]
    topp_rows = []
    for p in p_grid:
        mean_n = np.mean(np.stack([counts[p][layer] for layer in moe]), 0)
        for r in _loss_rows(groups, ce_own, topp_kl[p], topp_ce[p], p=p):
            sel = dict(groups)[r["domain"]]
            topp_rows.append({**r, "mean_experts": float(mean_n[sel].mean())})
        dist_rows += [r for layer in moe for r in _hist_rows(groups, counts[p][layer], "n_active",
                                                             override=f"topp:{p:g}", p=p, layer=layer)]
    abl = _cat(acc["abl_ce"])
    abl_rows = [r for (layer, ex), ce in abl.items() for r in _loss_rows(groups, ce_own, None, ce, layer=layer,
                                                                             expert=ex)]
    tables = {
        "needed_experts": pd.DataFrame(needed_rows, columns=["scope", "layer", "eps", "domain", "needed_k", "tokens",
                                                             "fraction"]),
        "compute_saved": pd.DataFrame(saved_rows),
        "loss_by_k": pd.DataFrame(loss_rows),
        "topp": pd.DataFrame(topp_rows),
        "experts_per_token": pd.DataFrame(dist_rows, columns=["override", "p", "layer", "domain", "n_active", "tokens",
                                                              "fraction"]),
        "ablation": pd.DataFrame(abl_rows, columns=["layer", "expert", "domain", "ce", "ce_increase", "kl", "tokens"]
                                 ).drop(columns="kl"),
        "tokens": tokens.drop(columns=["position"], errors="ignore"),
    }
    cs = tables["compute_saved"]
    head = cs[(cs.scope == "all") & (cs.eps == default_eps)]
    headline = {
        "default_eps": default_eps,
        "compute_saved": {f"{e:g}": float(cs[(cs.scope == "all") & (cs.eps == e) & (cs.domain == ALL)]
                                          ["compute_saved"].iloc[0]) for e in eps},
        "mean_needed_k_by_domain": dict(zip(head["domain"], head["mean_needed_k"].round(4))),
        "ce_own_by_domain": {dom: _mean(ce_own[sel]) for dom, sel in groups},
        "domains": {dom: int(sel.sum()) for dom, sel in groups if dom != ALL},
    }
    return tables, headline



# ---------------------------------------------------------------- two runs' tables, compared

_LOSSES = {"loss_by_k": ["k"], "topp": ["p"], "ablation": ["layer", "expert"]}  # table: keys besides domain
_COUNTS = {"needed_experts": (["scope", "layer", "eps"], "needed_k"),
           "experts_per_token": (["override", "p", "layer"], "n_active")}


def compare_tables(a, b, loss_tol: float = 1e-5, token_tol: float = 0.001) -> list[str]:
    """What differs between two ``analyze-routing`` outputs (folders or ``{name: DataFrame}``) beyond
    tolerance; an empty list when they agree.

    Losses (``ce``, ``ce_increase``, ``kl``) within ``loss_tol`` nats. Per-token integers (needed k',
    real experts per token) may differ for at most ``floor(token_tol * n)`` of a view's n tokens (n: its
    domain "all" row; none in views under 1 / token_tol tokens): two float32 implementations may put a
    token whose KL sits within rounding of an eps, or whose router has a near tie, on either side. The
    statistics made from them (``fraction``, ``mean_needed_k``, ``compute_saved``, ``mean_experts``) may
    move by what that many tokens can move in each group. Row keys, token counts and every other column
    must be identical."""
    a, b = _tables(a), _tables(b)
    out: list[str] = []
    for name, keys in _LOSSES.items():
        x, y = _aligned(a[name], b[name], keys + ["domain"], name, out)
        if x is None:
            continue
        allowed = _allowed(x.set_index(keys + ["domain"])["tokens"], keys, token_tol).to_numpy() / x["tokens"]
        for col in ("ce", "ce_increase", "kl", "mean_experts"):
            if col in x:
                tol = allowed * x[col].abs().max() if col == "mean_experts" else loss_tol
                _close(x[col], y[col], tol + 1e-9, f"{name}.{col}", out)
    for name, (keys, value) in _COUNTS.items():
        ta, tb = (t.pivot_table(index=keys + ["domain"], columns=value, values="tokens", fill_value=0, dropna=False)
                  for t in (a[name], b[name]))
        ta, tb = ta.align(tb, fill_value=0)
        n = ta.sum(axis=1)
        moved = (ta - tb).abs().sum(axis=1) / 2
        if not n.equals(tb.sum(axis=1)):
            out.append(f"{name}: token counts differ")
        elif (moved > _allowed(n, keys, token_tol)).any():
            out.append(f"{name}: {int(moved.max())} tokens of a view changed {value}")
    x, y = _aligned(a["compute_saved"], b["compute_saved"], ["scope", "layer", "eps", "domain"], "compute_saved", out)
    if x is not None:
        view = ["scope", "layer", "eps"]
        step = _allowed(x.set_index(view + ["domain"])["tokens"], view, token_tol).to_numpy() / x["tokens"]
        _close(x["compute_saved"], y["compute_saved"], step + 1e-9, "compute_saved.compute_saved", out)
        k = x["mean_needed_k"] / (1 - x["compute_saved"])
        _close(x["mean_needed_k"], y["mean_needed_k"], step * k + 1e-9, "compute_saved.mean_needed_k", out)
    ta, tb = a["tokens"], b["tokens"]
    need = [c for c in ta if c.startswith("needed_k_eps")]
    if len(ta) != len(tb) or list(ta) != list(tb) or not ta.drop(columns=need).equals(tb.drop(columns=need)):
        out.append("tokens: the token rows differ")
    else:
        for col in need:
            if (ta[col] != tb[col]).sum() > np.floor(token_tol * len(ta)):
                out.append(f"tokens.{col}: {(ta[col] != tb[col]).sum()} of {len(ta)} tokens differ")
    return out


def _allowed(tokens: pd.Series, keys: list[str], token_tol: float) -> pd.Series:
    """Per row of ``tokens`` (indexed by ``keys`` + domain): how many tokens may differ,
    ``floor(token_tol * n)`` with n the tokens of the row's view (its domain "all" row, the largest)."""
    return np.floor(token_tol * tokens.groupby(level=keys, dropna=False).transform("max"))


def _tables(x) -> dict[str, pd.DataFrame]:
    if isinstance(x, dict):
        return x
    return {p.stem: pd.read_parquet(p) for p in Path(x).glob("*.parquet")}


def _aligned(x: pd.DataFrame, y: pd.DataFrame, keys: list[str], name: str, out: list[str]):
    x, y = x.sort_values(keys).reset_index(drop=True), y.sort_values(keys).reset_index(drop=True)
    if len(x) != len(y) or not x[keys].equals(y[keys]) or not x["tokens"].equals(y["tokens"]):
        out.append(f"{name}: rows or token counts differ")
        return None, None
    return x, y


def _close(x: pd.Series, y: pd.Series, tol, label: str, out: list[str]) -> None:
    diff = (x - y).abs()
    bad = ~((diff <= tol) | (x.isna() & y.isna()))
    if bad.any():
        out.append(f"{label}: max |difference| {float(diff[bad].max()):.3g} over tolerance")
