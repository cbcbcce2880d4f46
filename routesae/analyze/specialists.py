"""Which experts are specialists and which are hubs (docs/analysis.md, "Specialists and hubs").

Lift against the uniform ``k/E`` cannot tell a specialist from a hub: an expert in the top-k of
almost every token has a share near 1, so a lift near ``E/k``, in *every* domain. Selectivity
compares a domain's share with the expert's own share of all tokens instead:

- ``base_topk(i)`` = ``N_k(E_i) / N``: the fraction of all tokens whose top-k includes i;
- ``selectivity(D, i)`` = ``share_topk(D, i) / base_topk(i)`` = ``P(D | i) / P(D)``: 1 when the
  expert sees domain D as often as any other, ``N / N_D`` when it is used by D's tokens only;
- hub: ``share_topk(D, i) > HUB_SHARE`` (0.5) in more than half of the domains (the expert is in
  the top-k of most tokens of most domains). A hub's selectivity is about 1 everywhere;
- eligible (may be ranked as a specialist): not a hub and ``load_i >= min_load_ratio / E``, where
  ``load_i`` is the expert's fraction of all top-k slots (uniform ``1/E``); default
  ``MIN_LOAD_RATIO`` = 0.5, so an expert that is almost never chosen cannot top the ranking on a
  handful of tokens.

The most specialised experts are the eligible ones by decreasing selectivity (in their top domain).

Example::

    from routesae.report import load_analysis
    a = load_analysis("runs/x")
    rank_specialists(a.expert_stats).head(10)[["layer", "expert", "selectivity", "top_domain", "load"]]
    a.expert_stats[a.expert_stats.hub]          # the hubs
"""

from __future__ import annotations

import numpy as np
import pandas as pd

HUB_SHARE = 0.5        # a hub is in the top-k of more than this fraction of a domain's tokens ...
HUB_DOMAINS = 0.5      # ... in more than this fraction of the domains
MIN_LOAD_RATIO = 0.5   # a specialist carries at least this multiple of the uniform load 1/E


def hub_domains(share: np.ndarray, hub_share: float = HUB_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """``share`` ``[..., D, E]`` top-k shares -> (``n_over`` ``[..., E]`` domains where the share is above
    ``hub_share``, ``n_domains`` ``[..., E]`` domains with tokens, i.e. a finite share)."""
    share = np.asarray(share, dtype=np.float64)
    finite = np.isfinite(share)
    over = finite & (np.where(finite, share, 0.0) > hub_share)
    return over.sum(-2), finite.sum(-2)


def is_hub(n_over: np.ndarray, n_domains: np.ndarray, hub_domains_frac: float = HUB_DOMAINS) -> np.ndarray:
    """Hub when the share is above ``HUB_SHARE`` in more than ``hub_domains_frac`` of the domains."""
    n_over, n_domains = np.asarray(n_over), np.asarray(n_domains)
    return (n_domains > 0) & (n_over > hub_domains_frac * n_domains)


def eligible(load: np.ndarray, hub: np.ndarray, n_experts: int | np.ndarray,
             min_load_ratio: float = MIN_LOAD_RATIO) -> np.ndarray:
    """Experts that may be ranked as specialists: not a hub and ``load >= min_load_ratio / E``."""
    load = np.asarray(load, dtype=np.float64)
    return ~np.asarray(hub, dtype=bool) & (np.nan_to_num(load, nan=-1.0) >= min_load_ratio / np.asarray(n_experts))


def rank_specialists(expert_stats: pd.DataFrame, min_load_ratio: float = MIN_LOAD_RATIO) -> pd.DataFrame:
    """The eligible experts of ``expert_stats`` (all layers), most selective first (ties: layer, expert).

    E per layer is the number of the layer's rows. Hubs and experts below ``min_load_ratio / E`` are
    left out; so are experts without a selectivity (no tokens). An older analysis without the
    ``selectivity`` / ``hub`` columns is ranked by ``specialisation`` (lift) with no hub filter.
    """
    es = expert_stats
    if es.empty:
        return es
    n_exp = es.groupby("layer")["expert"].transform("count").to_numpy()
    hub = es["hub"].to_numpy(dtype=bool) if "hub" in es else np.zeros(len(es), bool)
    by = "selectivity" if "selectivity" in es else "specialisation"
    keep = eligible(es["load"].to_numpy(), hub, n_exp, min_load_ratio) & es[by].notna().to_numpy()
    return es[keep].sort_values([by, "layer", "expert"], ascending=[False, True, True])
