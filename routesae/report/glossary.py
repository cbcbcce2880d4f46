"""Human names, definitions, formulas and units of every metric a report shows (REFERENCE §4 and §7 wording).

One :class:`Term` per metric key; :func:`term_for` maps a table column (``sae_nmse``, ``lift``,
``k'=2``, ...) to its term, :data:`PLAIN` names the identifier columns (layer, expert, domain, ...)
that need no definition. :func:`fmt` writes a value with the term's unit and a sensible precision.
Renderers escape the returned text themselves.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from routesae.report.load import scalar


@dataclass(frozen=True)
class Term:
    name: str  # what a reader calls it
    definition: str  # one sentence: what it measures and which way is good
    formula: str = ""  # the exact definition, when there is one
    unit: str = ""  # "%" (a fraction shown as percent), "nats", "x" (a ratio), "count", "" (a plain number)


T = Term
TERMS: dict[str, Term] = {
    # ---- reconstruction (REFERENCE §4)
    "l0": T("L0", "mean number of non-zero latents per token (the SAE's sparsity)", "mean_t ||z_t||_0"),
    "nmse": T("Normalised MSE", "reconstruction error relative to the activation's size; lower is better "
              "(RouteSAE's definition)", "mean_t ||x − x̂||² / ||x||²"),
    "explained_variance": T("Explained variance", "share of the activations' variance the reconstruction "
                            "explains; higher is better", "1 − Σ_t ||x − x̂||² / Σ_t ||x − mean_t x||² "
                            "(numerator and denominator summed separately over all tokens)", "%"),
    "dead_fraction": T("Dead latents", "fraction of latents never active over the evaluated tokens", "", "%"),
    "dense_fraction_gt_10pct": T("Dense latents (>10%)", "fraction of latents active on more than 10% of "
                                 "the tokens", "", "%"),
    "dense_fraction_gt_1pct": T("Dense latents (>1%)", "fraction of latents active on more than 1% of the "
                                "tokens", "", "%"),
    "examples": T("Examples", "SAE inputs evaluated: tokens (per layer: the tokens routed to that layer)", "",
                  "count"),
    "mean_p_star": T("Mean router weight p*", "mean over tokens of the router's weight on the chosen layer "
                     "(RouteSAE feeds p* · x of that layer to the SAE)", "mean_t p_t,i*"),
    # ---- downstream: the SAE spliced into the model (REFERENCE §4)
    "ce_clean": T("CE, clean model", "mean next-token cross-entropy of the unmodified model over real "
                  "positions", "", "nats"),
    "ce_spliced": T("CE, SAE spliced in", "cross-entropy with x̂ (de-standardised) in place of the activation at "
                    "the routed layer (RouteSAE: each token at its own routed layer, routing from the clean pass)",
                    "", "nats"),
    "ce_zero_ablated": T("CE, zero-ablated", "cross-entropy with zeros in place of the same activations", "",
                         "nats"),
    "ce_increase": T("CE increase", "how much worse next-token prediction gets with the SAE spliced in; lower "
                     "is better", "CE_spliced − CE_clean", "nats"),
    "ce_recovered": T("CE loss recovered", "how much of the layer's contribution to next-token prediction the "
                      "SAE keeps: 100% = as good as the clean model, 0% = no better than zeroing the layer",
                      "(CE_zero_abl − CE_spliced) / (CE_zero_abl − CE_clean)", "%"),
    "kl": T("KL per token", "how far the spliced model's next-token distribution moves from the clean one, "
            "averaged per real (non-padding) token; lower is better", "mean_t KL(clean || spliced)", "nats"),
    "kl_zero_ablated": T("KL per token, zero-ablated", "the same KL with zeros spliced in (the scale KL is "
                         "judged against)", "mean_t KL(clean || zero-ablated)", "nats"),
    "tokens_ce": T("Tokens (CE)", "real positions with a real next token", "", "count"),
    "tokens_real": T("Tokens (KL)", "real (non-padding) tokens", "", "count"),
    "contexts": T("Contexts", "model contexts run for the splice", "", "count"),
    # ---- how RouteSAE's router uses its layers (routesae/sae/route_stats.py)
    "routed_fraction": T("Routed-layer fraction", "fraction of tokens the router sends to the layer", "f_j = n_j / N",
                         "%"),
    "routed_entropy": T("Routed-layer entropy", "normalised entropy of the routed-layer fractions: 1 = all layers "
                        "used equally, 0 = one layer", "H = −Σ_j f_j log f_j / log L"),
    "router_margin": T("Router margin", "mean over tokens of the router's top weight minus its second: 0 = a coin "
                       "toss, 1 = always certain", "mean_t (p_top1 − p_top2)"),
    # ---- expert specialisation (REFERENCE §7, docs/analysis.md)
    "share_topk": T("Top-k share", "fraction of domain D's tokens whose top-k includes expert i; uniform baseline "
                    "k/E", "N_k(E_i, D) / N_D", "%"),
    "share_top1": T("Top-1 share", "fraction of domain D's tokens whose first choice is expert i; uniform 1/E",
                    "N_1(E_i, D) / N_D", "%"),
    "lift": T("Lift", "top-k share over the uniform k/E; a hub has a lift near E/k in every domain",
              "share_topk(D, i) / (k/E)", "x"),
    "selectivity": T("Selectivity", "how much more often domain D's tokens pick the expert than text in general: "
                     "1 = no preference; hubs are about 1, so specialists are ranked by it",
                     "share_topk(D, i) / base_topk(i) = P(D | i) / P(D)", "x"),
    "base_topk": T("Share of all tokens", "fraction of all tokens whose top-k includes the expert",
                   "N_k(E_i) / N", "%"),
    "top_share": T("Top-domain share", "top-k share of the expert's most selective domain", "", "%"),
    "load": T("Load", "the expert's fraction of all top-k slots; uniform 1/E", "load_i = N_k(E_i) / (k · N)", "%"),
    "uniform": T("Uniform load", "the load of every expert under perfect balance", "1/E", "%"),
    "hub": T("Hub", "an expert in the top-k of more than half of the tokens of more than half of the domains; "
             "not a specialist"),
    "hub_domains": T("Hub domains", "domains where the expert is in the top-k of more than half of the tokens",
                     "", "count"),
    "hubs": T("Hubs", "number of hub experts in the layer", "", "count"),
    "collapse": T("Collapsed / overloaded expert", "load below 0.1× (collapsed; dead at 0) or above 3× "
                  "(overloaded) the uniform load 1/E", "load_i < 0.1/E or load_i > 3/E"),
    "load_cv": T("Load CV", "coefficient of variation of expert load; 0 = perfectly balanced", "std_i load_i / "
                 "mean_i load_i"),
    "load_entropy_norm": T("Load entropy", "normalised entropy of the expert load; 1 = perfectly balanced",
                           "−Σ_i load_i log load_i / log E"),
    "max_vio": T("MaxVio", "how far the busiest expert is above the mean load; 0 = balanced",
                 "(max_i load_i − mean load) / mean load"),
    "switch_aux": T("Switch aux loss", "the Switch Transformer load-balancing loss, about k when balanced",
                    "E · Σ_i f_i P_i (f over top-k slots)"),
    "router_entropy": T("Router entropy", "mean per-token entropy of the router's softmax; high = undecided",
                        "mean_t −Σ_i p_i log p_i", "nats"),
    "repetition_rate": T("Repetition rate", "how often consecutive tokens share their first-choice expert "
                         "(Mixtral's analysis)", "", "%"),
    "domain_specialisation": T("Domain lift", "mean over domains of the largest lift in the layer",
                               "mean_D max_i share_topk(D, i) / (k/E)", "x"),
    "domain_selectivity": T("Domain selectivity", "mean over domains of the selectivity of the domain's owner",
                            "mean_D selectivity(D, owner(D))", "x"),
    "specialisation": T("Largest lift", "the largest lift of any expert for the domain",
                        "max_i share_topk(D, i) / (k/E)", "x"),
    "owner": T("Owner", "the domain's most selective eligible expert (not a hub, load at least 0.5/E); -1 when "
               "none"),
    "owns": T("Owned expert", "an eligible expert whose top domain picks it at least twice as often as text in "
              "general", "selectivity >= 2 in its top domain"),
    "mean_active": T("Experts per token", "mean number of active experts per token"),
    "coactivation": T("Co-activation", "how often expert j is also chosen when expert i is", "N(E_i and E_j) / "
                      "N(E_i)"),
    "tokens": T("Tokens", "tokens counted (BOS left out)", "", "count"),
    "bos_tokens": T("BOS tokens", "begin-of-sequence tokens, reported apart (routed the same way every time)", "",
                    "count"),
    "n_experts": T("Experts (E)", "experts per MoE layer", "", "count"),
    "top_k": T("Router top-k (k)", "experts each token is sent to", "", "count"),
    "max_share": T("Largest expert share", "the largest top-k share of any expert at that position", "", "%"),
    # ---- features (REFERENCE §8)
    "density": T("Density", "fraction of tokens on which the latent is active", "", "%"),
    "count": T("Active tokens", "tokens on which the latent (or the pair) is active", "", "count"),
    "mean_act": T("Mean activation", "mean activation when active"),
    "max_act": T("Max activation", "largest activation seen"),
    "interpretable": T("Interpretable", "passes the feature-count rule of the analysis (enough contexts above the "
                       "threshold)"),
    "feature_count": T("Feature count", "number of interpretable latents"),
    "n_latents": T("Latents", "dictionary size of the SAE", "", "count"),
    "k": T("k (active latents)", "latents the SAE keeps per token (its TopK)", "", "count"),
    "top_domain_lift": T("Domain lift (latent)", "the top domain's share among the latent's active tokens over "
                         "its share of all tokens", "", "x"),
    "top_expert_lift": T("Expert lift (latent)", "how much more often the latent's tokens go to the expert than "
                         "tokens in general", "", "x"),
    # ---- dynamic routing (routesae analyze-routing)
    "needed_k": T("Needed experts k'", "the smallest k' such that top-k' at every MoE layer keeps the token's "
                  "next-token distribution within KL ε of the model's own routing", "", "%"),
    "mean_needed_k": T("Mean needed k'", "mean over tokens of the needed k'"),
    "compute_saved": T("Expert compute saved", "share of expert computation a per-token k' would save",
                       "1 − mean needed k' / k", "%"),
    "ce_increase_ablation": T("CE increase when removed", "cross-entropy increase when one expert is removed",
                              "", "nats"),
    "mean_experts": T("Experts per token (top-p)", "mean experts per token under top-p routing"),
}

# table columns -> term keys, where the column is not the key itself
ALIASES = {"lift_topk": "lift", "share_all": "base_topk", "sae_nmse": "nmse", "raw_nmse": "nmse",
           "sae_explained_variance": "explained_variance", "raw_explained_variance": "explained_variance",
           "mean k'": "mean_needed_k", "compute saved": "compute_saved", "ce_increase_removed": "ce_increase_ablation",
           "fraction": "routed_fraction", "entropy": "routed_entropy", "margin": "router_margin",
           "domain_router_entropy": "router_entropy"}
# identifier columns: shown with these labels, no definition needed
PLAIN = {"layer": "Layer", "expert": "Expert", "domain": "Domain", "top_domain": "Top domain",
         "top_tokens": "Top tokens", "flag": "Flag", "latents": "Latents", "experts": "Experts",
         "position": "Position", "run": "Run", "metric": "Metric", "value": "Value", "name": "Name",
         "latent": "Latent", "arch": "SAE", "rank": "Rank", "what": "What", "layers": "Layers", "path": "Path",
         "trained on": "Trained on (store, identity)", "evaluated on": "Evaluated on"}
COLUMN_LABELS = {"sae_nmse": "NMSE (SAE space)", "raw_nmse": "NMSE (raw)", "sae_explained_variance":
                 "Expl. var. (SAE space)", "raw_explained_variance": "Expl. var. (raw)"}
_NEEDED = re.compile(r"k'=(\d+)$")


def term_for(column: str) -> tuple[str, Term] | None:
    """``(key, Term)`` of a metric column, or None for an identifier column or an unknown one."""
    if column in PLAIN:
        return None
    if _NEEDED.match(column):
        return "needed_k", TERMS["needed_k"]
    key = ALIASES.get(column, column)
    return (key, TERMS[key]) if key in TERMS else None


def label(column: str) -> str:
    """The human label of a column (its term's name, an identifier's label, else the column itself)."""
    if column in COLUMN_LABELS:
        return COLUMN_LABELS[column]
    if column in PLAIN:
        return PLAIN[column]
    t = term_for(column)
    if t is None:
        return column
    return column if _NEEDED.match(column) else t[1].name


def hover(term: Term) -> str:
    """The hover text of a term: definition, then the formula."""
    return term.definition + (f". {term.formula}" if term.formula else "")


def fmt(key: str | None, v: Any, with_unit: bool = False) -> str:
    """A value for humans in its term's unit: fractions as percent, ratios as ``2.31×``, counts with thousands
    separators, nats to 3 decimals; '-' for a missing value. ``with_unit`` adds ``nats`` to nats."""
    v = scalar(v)
    unit = TERMS[key].unit if key in TERMS else ""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not isinstance(v, (int, float)):
        return str(v)
    if unit == "%":
        return pct(v)
    if unit == "x":
        return f"{v:.2f}×"
    if unit == "count" or (isinstance(v, int)) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    if unit == "nats":
        return f"{v:.3f}" + (" nats" if with_unit else "")
    return sig(v)


def count(v: Any) -> str:
    """A whole number with thousands separators ('?' when missing)."""
    v = scalar(v)
    return f"{int(v):,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def pct(v: float) -> str:
    """A fraction as a percentage: one decimal, two significant figures below 1%."""
    p = float(v) * 100
    if p != 0 and abs(p) < 1:
        return f"{p:.2g}%"
    return f"{p:.1f}%"


def sig(v: float, digits: int = 3) -> str:
    """A float to ``digits`` significant figures (whole numbers as they are)."""
    v = float(v)
    if not math.isfinite(v):
        return "-"
    if v.is_integer() and abs(v) < 1e15:
        return f"{int(v):,}" if abs(v) >= 1000 else str(int(v))
    return f"{v:.{digits}g}"


def used_terms(columns: list[str]) -> list[str]:
    """The term keys of ``columns`` (for a glossary of what a page shows)."""
    out = []
    for c in columns:
        t = term_for(c)
        if t and t[0] not in out:
            out.append(t[0])
    return out
