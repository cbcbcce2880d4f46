"""Key findings: the few lines a colleague reads first, each a number with its meaning and a link to its section.

Every finding is computed from the same tables and eval.json values its section shows (nothing is
re-measured) and carries those numbers in ``values`` (tests compare them with the tables). Text is a
list of parts: plain strings (possibly corpus text: renderers escape them) and :class:`Ref` (a metric
name, shown with its definition on hover and listed in the glossary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from routesae.analyze.specialists import rank_specialists
from routesae.report import facts
from routesae.report import routed_layers as RL
from routesae.report.figures import bucket_order
from routesae.report.glossary import TERMS, count, fmt, pct
from routesae.report.load import Analysis, scalar, top_features

OWN_SELECTIVITY = 2.0  # an eligible expert whose top domain has at least this selectivity is "owned" by it
SKEWED_LAYER = 0.9  # one routed layer with at least this fraction: the router has settled on it


@dataclass(frozen=True)
class Ref:
    """A metric name in a finding's text: ``TERMS[key].name`` unless ``text`` is given."""

    key: str
    text: str | None = None

    @property
    def shown(self) -> str:
        """The text shown: ``text``, else the term's name in running text ("router entropy", "KL per token")."""
        if self.text:
            return self.text
        name = TERMS[self.key].name
        return name[0].lower() + name[1:] if len(name) > 1 and name[1].islower() else name


Part = str | Ref


@dataclass
class Finding:
    key: str  # what it is about: data, splice, reconstruction, routed_layers, ...
    section: str  # the anchor of the section that shows the numbers
    parts: list[Part]
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(p.shown if isinstance(p, Ref) else p for p in self.parts)

    @property
    def terms(self) -> list[str]:
        return [p.key for p in self.parts if isinstance(p, Ref)]


def _n(v: Any) -> float | None:
    v = scalar(v)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ---------------------------------------------------------------- evaluation


def data_finding(ev: dict[str, Any], section: str = "evaluation") -> Finding | None:
    """Held-out or in-sample: which tokens every number was measured on."""
    if not ev:
        return None
    r = ev.get("token_range") or {}
    where = f"{count(ev.get('tokens'))} tokens"
    if r.get("start") is not None and r.get("stop") is not None:
        where += f" (rows {count(r['start'])}..{count(r['stop'])})"
    store = str(ev.get("store") or "?") + (f", split {ev['store_split']}" if ev.get("store_split") else "")
    inside = ev.get("in_sample")
    values = {"in_sample": inside, "tokens": ev.get("tokens"), "store": ev.get("store"),
              "store_source": ev.get("store_source"), "token_range": r}
    if inside is False:
        parts: list[Part] = [f"Held out: measured on {where} of {store}, data the SAE was not trained on."]
    elif inside is True:
        parts = [f"In-sample: measured on {where} of the training store {store}; held-out numbers are usually "
                 f"worse (routesae evaluate RUN --store HELD_OUT_STORE)."]
    else:
        parts = [f"Measured on {where} of {store}; this eval.json does not say whether they were held out."]
    return Finding("data", section, parts, values)


def splice_finding(ev: dict[str, Any], section: str = "evaluation") -> Finding | None:
    """The SAE in the model: CE recovered, CE increase and KL per token."""
    sp = (ev or {}).get("splice") or {}
    if "skipped" in sp:
        return Finding("splice", section, [f"Not spliced into the model: {sp['skipped']}."], {"skipped": sp["skipped"]})
    src = {**sp, **(sp.get("mean") or {})} if "mean" in sp else sp
    v = {k: _n(src.get(k)) for k in ("ce_recovered", "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_increase", "kl",
                                     "kl_zero_ablated")}
    if v["ce_recovered"] is None:
        return None
    parts: list[Part] = [f"In the model, the SAE keeps {pct(v['ce_recovered'])} of the layer's contribution (",
                         Ref("ce_recovered"), ": 100% = clean model, 0% = layer zeroed)"]
    if v["ce_clean"] is not None and v["ce_spliced"] is not None:
        parts += [f"; cross-entropy goes from {fmt('ce_clean', v['ce_clean'])} to "
                  f"{fmt('ce_spliced', v['ce_spliced'])} nats per token"]
        if v["ce_zero_ablated"] is not None:
            parts.append(f" ({fmt('ce_zero_ablated', v['ce_zero_ablated'])} with the layer zeroed)")
    if v["kl"] is not None:
        parts += ["; ", Ref("kl"), f" {fmt('kl', v['kl'], True)}"]
        if v["kl_zero_ablated"] is not None:
            parts.append(f" ({fmt('kl', v['kl_zero_ablated'], True)} zeroed)")
    parts.append(".")
    return Finding("splice", section, parts, {k: x for k, x in v.items() if x is not None})


def reconstruction_finding(ev: dict[str, Any], section: str = "evaluation") -> Finding | None:
    s = (ev or {}).get("sae_space") or {}
    nmse, evar, l0 = _n(s.get("nmse")), _n(s.get("explained_variance")), _n(s.get("l0"))
    if nmse is None:
        return None
    parts: list[Part] = ["Reconstruction: ", Ref("nmse"), f" {fmt('nmse', nmse)}"]
    if evar is not None:
        parts += [", ", Ref("explained_variance"), f" {pct(evar)}"]
    if l0 is not None:
        parts += [" at ", Ref("l0"), f" {fmt('l0', l0)} active latents per token"]
    parts.append(" (0 NMSE = perfect; 1 = no better than predicting zero).")
    return Finding("reconstruction", section, parts, {"nmse": nmse, "explained_variance": evar, "l0": l0})


def routed_layers_values(ev: dict[str, Any]) -> dict[str, Any] | None:
    """eval.json's routed layers: layers, fractions, entropy and margin (None where an older eval.json lacks them);
    None for a one-layer SAE."""
    rl = (ev or {}).get("routed_layers") or {}
    layers, fr = [int(x) for x in rl.get("layers") or []], [float(x) for x in rl.get("fractions") or []]
    if len(layers) < 2 or len(layers) != len(fr):
        return None
    d = RL.eval_diagnostics(ev)
    return {"layers": layers, "fractions": fr, "entropy": d.get("entropy"), "margin": d.get("margin")}


def routed_layers_finding(ev: dict[str, Any], section: str = "evaluation") -> Finding | None:
    """How RouteSAE's router uses its layers."""
    v = routed_layers_values(ev)
    if v is None:
        return None
    top = max(range(len(v["layers"])), key=lambda i: v["fractions"][i])
    others = ", ".join(f"L{j} {pct(f)}" for i, (j, f) in enumerate(zip(v["layers"], v["fractions"])) if i != top)
    parts: list[Part] = [f"The router sends {pct(v['fractions'][top])} of tokens to layer {v['layers'][top]} "
                         f"({others})"]
    if v["entropy"] is not None:
        parts += ["; ", Ref("routed_entropy"), f" {v['entropy']:.2f} (1 = all layers used equally, 0 = one layer)"]
    if v["margin"] is not None:
        parts += [", ", Ref("router_margin"), f" {v['margin']:.2f} (0 = a coin toss)"]
    if v["fractions"][top] >= SKEWED_LAYER:
        parts.append(f": in effect a one-layer SAE on layer {v['layers'][top]}")
    parts.append(".")
    return Finding("routed_layers", section, parts, v)


# ---------------------------------------------------------------- experts


def specialists_finding(a: Analysis, n: int = 3) -> Finding | None:
    """The most selective experts overall (hubs and lightly loaded experts left out)."""
    top = facts.most_specialised(a, n)
    if top.empty or "selectivity" not in top:
        return None
    names = ", ".join(f"L{int(r.layer)} E{int(r.expert)} for {r.top_domain} ({fmt('selectivity', r.selectivity)})"
                      for r in top.itertuples())
    parts: list[Part] = [f"Most selective experts: {names}; ", Ref("selectivity"),
                         " = how much more often the domain's tokens pick the expert than text in general "
                         f"(hubs and experts below {facts.min_load_ratio(a):g}× the uniform load left out)."]
    return Finding("specialists", "specialisation", parts,
                   {"experts": [(int(r.layer), int(r.expert), str(r.top_domain), float(r.selectivity))
                                for r in top.itertuples()]})


def best_expert_per_domain(a: Analysis) -> pd.DataFrame:
    """Per domain, its most selective owner over all layers (``domain_layer``): domain, layer, owner, selectivity."""
    dl = a.domain_layer
    if dl.empty or "owner" not in dl or "selectivity" not in dl:
        return pd.DataFrame(columns=["domain", "layer", "owner", "selectivity"])
    d = dl[(dl["owner"] >= 0) & dl["selectivity"].notna()]
    d = d.sort_values(["selectivity", "layer"], ascending=[False, True]).groupby("domain", sort=False).head(1)
    return d[["domain", "layer", "owner", "selectivity"]].reset_index(drop=True)


def owned_experts(a: Analysis) -> pd.DataFrame:
    """Eligible experts (not hubs, enough load) whose top domain has selectivity >= OWN_SELECTIVITY."""
    es = a.expert_stats
    if es.empty or "selectivity" not in es:
        return pd.DataFrame(columns=["layer", "expert", "top_domain", "selectivity"])
    r = rank_specialists(es, facts.min_load_ratio(a))
    return r[r["selectivity"] >= OWN_SELECTIVITY][["layer", "expert", "top_domain", "selectivity"]]


def domains_finding(a: Analysis) -> Finding | None:
    """Each domain's most selective expert, and the domains that own experts."""
    best = best_expert_per_domain(a)
    if best.empty:
        return None
    per = "; ".join(f"{r.domain}: L{int(r.layer)} E{int(r.owner)} ({fmt('selectivity', r.selectivity)})"
                    for r in best.itertuples())
    owned = owned_experts(a)
    counts = owned["top_domain"].value_counts()
    counts = {str(d): int(c) for d, c in sorted(counts.items(), key=lambda x: (-x[1], str(x[0])))}
    parts: list[Part] = [f"Most selective expert per domain: {per}. "]
    if counts:
        none = [d for d in a.domains if d not in counts]
        parts += ["Domains that own experts (", Ref("owns", "selectivity ≥ 2×"), "): "
                  + ", ".join(f"{d} {c}" for d, c in counts.items())
                  + (f"; none for {', '.join(none)}" if none else "") + "."]
    else:
        parts.append(f"No domain owns an expert (no eligible expert reaches {OWN_SELECTIVITY:g}× selectivity).")
    return Finding("domains", "specialisation", parts, {"best": best.to_dict("records"), "owned": counts})


def health_finding(a: Analysis) -> Finding | None:
    """Dead, collapsed, overloaded experts and hubs; the worst load imbalance."""
    es = a.expert_stats
    if es.empty:
        return None
    n_layers = es["layer"].nunique()
    dead = int((es["load"].fillna(0) <= 0).sum())
    low, high = int(es["collapse_low"].astype(bool).sum()), int(es["collapse_high"].astype(bool).sum())
    hubs = int(es["hub"].astype(bool).sum()) if "hub" in es else 0
    parts: list[Part] = [f"Of {len(es):,} experts ({n_layers} layers): {dead} dead (load 0), {low} collapsed and "
                         f"{high} overloaded (", Ref("collapse", "load below 0.1× or above 3× uniform"),
                         f"), {hubs} hub{'s' if hubs != 1 else ''}"]
    values: dict[str, Any] = {"experts": len(es), "dead": dead, "collapsed": low, "overloaded": high, "hubs": hubs}
    ls = a.layer_stats
    if not ls.empty and "load_cv" in ls and ls["load_cv"].notna().any():
        worst = ls.loc[ls["load_cv"].idxmax()]
        values.update(worst_cv=float(worst["load_cv"]), worst_cv_layer=int(worst["layer"]))
        parts += ["; ", Ref("load_cv"), f" at most {fmt('load_cv', worst['load_cv'])} (layer {int(worst['layer'])}; "
                  "0 = perfectly balanced)"]
    parts.append(".")
    return Finding("health", "load", parts, values)


def cold_start_values(a: Analysis) -> dict[str, Any] | None:
    """Mean over layers of router entropy and selectivity at the first position after BOS and at the last bucket."""
    pp = a.position_profile
    if pp.empty or "router_entropy" not in pp:
        return None
    order = [b for b in bucket_order(pp["bucket"]) if b != "BOS"]
    if len(order) < 2:
        return None
    first, last = order[0], order[-1]
    out: dict[str, Any] = {"first": first, "last": last}
    for m in ("router_entropy", "selectivity"):
        if m in pp:
            by = pp.assign(bucket=pp["bucket"].astype(str)).groupby("bucket")[m].mean()
            out[m] = (float(by[first]), float(by[last]))
    return out


def cold_start_finding(a: Analysis) -> Finding | None:
    v = cold_start_values(a)
    if v is None:
        return None
    e0, e1 = v["router_entropy"]
    parts: list[Part] = [f"Cold start: at position {v['first']} (the first token after BOS) the ",
                         Ref("router_entropy"), f" is {e0:.2f} nats vs {e1:.2f} at {v['last']} (mean over layers)"]
    change = (e1 - e0) / e1 if e1 else 0.0
    meaning = ("about as decided" if abs(change) < 0.05 else "more decided" if change > 0 else "less decided")
    meaning = f"the router is {meaning} on a document's first tokens"
    if "selectivity" in v:
        s0, s1 = v["selectivity"]
        parts += ["; the most selective expert's ", Ref("selectivity"), f" is {s0:.2f}× vs {s1:.2f}×"]
        if s0 >= 1.25 * s1:
            meaning += " and sends them to far more domain-specific experts"
        elif s1 >= 1.25 * s0:
            meaning += " and sends them to less domain-specific experts"
    parts.append(f": {meaning}.")
    return Finding("cold_start", "coldstart", parts, v)


# ---------------------------------------------------------------- features and routing


def explanation(row: pd.Series | dict | None) -> str | None:
    """A latent's explanation (``latents.explanation``, joined from RUN/explanations by ``routesae explain``);
    None when absent."""
    if row is None:
        return None
    v = scalar(row.get("explanation"))
    return str(v) if v else None


def explanation_note(row: pd.Series | dict | None) -> str | None:
    """Who explained the latent and its scores, e.g. ``LLM smollm2, judged by LLM smollm2: detection AUC 0.71,
    fuzzing AUC 0.55``; None without an explanation label."""
    if row is None or not scalar(row.get("explanation_label")):
        return None
    scores = [f"{s} AUC {scalar(row.get(f'{s}_auc')):.2f}" for s in ("detection", "fuzzing")
              if isinstance(scalar(row.get(f"{s}_auc")), float)]
    return str(scalar(row.get("explanation_label"))) + (": " + ", ".join(scores) if scores else "")


def features_finding(a: Analysis, n: int = 3) -> Finding | None:
    lat = a.latents
    if lat.empty:
        return None
    total, fc = len(lat), a.feature_count.get("count")
    interp = int(lat["interpretable"].astype(bool).sum()) if "interpretable" in lat else None
    ids = [i for i in top_features(a, n) if bool(scalar(a.latent_row(i).get("interpretable")))]
    parts: list[Part] = [Ref("feature_count", "Feature count"), f": {count(fc if fc is not None else interp)} "
                         f"interpretable latents of {total:,}"]
    shown = []
    for i in ids:
        r = a.latent_row(i)
        what = explanation(r) or (f"{r['top_domain']}, lift {fmt('lift', r.get('top_domain_lift'))}"
                                  if scalar(r.get("top_domain")) is not None else "")
        shown.append(f"latent {i}" + (f" ({what})" if what else ""))
    if shown:
        parts.append("; first shown: " + ", ".join(shown))
    dead = int((lat["density"] <= 0).sum())
    parts.append(f"; {dead} dead." if dead else ".")
    return Finding("features", "features", parts, {"count": fc, "interpretable": interp, "latents": total,
                                                   "shown": ids, "dead": dead})


def routing_finding(a: Analysis) -> Finding | None:
    r = a.routing
    if r is None:
        return None
    from routesae.report.routing import needed_experts_table

    t = needed_experts_table(r)
    row = t[t["domain"] == "all"] if not t.empty else t
    if row.empty:
        return None
    saved, mean_k = float(row["compute saved"].iloc[0]), float(row["mean k'"].iloc[0])
    k = r.summary.get("top_k")
    parts: list[Part] = ["Dynamic routing: tokens need on average ", Ref("mean_needed_k", f"k' = {mean_k:.2f}"),
                         f" of the model's k = {k} experts (KL ≤ {r.eps:g} nats); a per-token k' would save "
                         f"{pct(saved)} of expert compute."]
    return Finding("routing", "routing", parts, {"compute_saved": saved, "mean_needed_k": mean_k, "eps": r.eps})


def findings(a: Analysis) -> list[Finding]:
    """The report's key findings in reading order (absent ones skipped)."""
    ev = a.eval
    out = [data_finding(ev), splice_finding(ev), reconstruction_finding(ev), routed_layers_finding(ev)]
    if a.has_experts:
        out += [specialists_finding(a), domains_finding(a), health_finding(a), cold_start_finding(a)]
    out += [routing_finding(a), features_finding(a)]
    return [f for f in out if f is not None]


def analysis_data_line(a: Analysis) -> str | None:
    """Which tokens the analysis (expert and feature tables) used, when its summary says."""
    s = a.summary
    if "in_sample" not in s:
        return None
    r = s.get("token_range") or {}
    kind = {False: "held-out", True: "in-sample (training)"}.get(s["in_sample"], "")
    what = "expert and feature analysis" if a.has_experts else "feature analysis"
    return (f"The {what} used {count(s.get('tokens'))} {kind} tokens of "
            f"{s.get('store')}" + (f" (rows {r.get('start')}..{r.get('stop')})" if r else "") + ".")

