"""A readable Markdown report (renders on a code-hosting site): key findings first, the sections that hold their
numbers, top rows of long tables (every row in ``tables/*.csv``), a glossary last.

Escaping: :mod:`routesae.report.mdkit` (every value from the run goes through :func:`md`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from routesae.report import facts
from routesae.report import findings as FD
from routesae.report import routed_layers as RL
from routesae.report.causal import causal_md
from routesae.report.figures import bucket_order
from routesae.report.html import TITLES, TOP_ROWS
from routesae.report.load import Analysis, as_list, pick_layers, scalar, top_features
from routesae.report.mdkit import MdPage, md, md_table

__all__ = ["md", "md_table", "plain_context", "render_markdown"]


def plain_context(tokens: list, acts: list, center: int) -> str:
    """A context as escaped text with the centre token in ⟦ ⟧ (no Markdown emphasis to break)."""
    return "".join(f"⟦{md(t)}⟧" if i == center else md(t) for i, t in enumerate(tokens))


def _h(key: str) -> str:
    return f"\n## {TITLES[key]}\n\n"


def render_markdown(a: Analysis, top_n: int = 30) -> str:
    page = MdPage()
    body = [_evaluation_md(a, page)]
    if a.has_experts:  # a dense model has no expert section
        body += [_experts_md(a, page), _load_md(a, page), _cold_start_md(a, page)]
    if a.routing is not None:
        body.append(_routing_md(a.routing, page))
    body.append(_probe_md(a))
    body.append(causal_md(a, page))
    body += [_features_md(a, page, top_n), _details_md(a, page)]
    head = [f"# routesae report: {md(a.run.name)}\n\n_{md(a.model_name)} · {md(str(a.run))}_\n", _h("findings"),
            page.findings(FD.findings(a), TITLES)]
    return "".join(head + body) + page.glossary()


def _evaluation_md(a: Analysis, page: MdPage) -> str:
    out = [_h("evaluation")]
    ev = a.eval
    if not ev:
        return out[0] + "_no eval.json: run `routesae evaluate RUN`_\n"
    f = FD.data_finding(ev)
    if f is not None:
        out.append(f"> {md(f.text)}\n\n")
    sae, raw = ev.get("sae_space") or {}, ev.get("raw_space") or {}
    rows = [(k, [sae.get(k), raw.get(k)]) for k in facts.RECON_KEYS if k in sae or k in raw]
    if "mean_p_star" in ev:
        rows.append(("mean_p_star", [ev["mean_p_star"], None]))
    out += ["**Reconstruction**\n\n", page.metrics(rows, ["SAE input space", "raw residual"])]
    sp = ev.get("splice") or {}
    if "skipped" in sp:
        out.append(f"\n_not spliced into the model: {md(sp['skipped'])}_\n")
    elif sp:
        src = {**sp, **(sp.get("mean") or {})} if "mean" in sp else sp
        out += ["\n**In the model (SAE spliced in)**\n\n",
                page.metrics([(k, [src[k]]) for k in facts.SPLICE_KEYS if k in src], ["value"])]
    per = facts.per_layer_rows(ev)
    if not per.empty:
        out += ["\n**Per routed layer**\n\n", page.table(per, top=TOP_ROWS)]
    out.append(_routed_md(a, page))
    return "".join(out)


def _routed_md(a: Analysis, page: MdPage) -> str:
    """RouteSAE: routed-layer fractions, entropy and router margin (eval.json), first and last values over
    training (metrics.jsonl); nothing for other SAEs or older files."""
    lines = RL.diagnostic_lines(a.eval) + [RL.over_training_line(a.routing_log)]
    lines = [x for x in lines if x]
    frac = RL.fraction_line(a.eval)
    if frac:
        page.use("routed_fraction")
    if lines:
        page.use("routed_entropy")
        if any("margin" in x for x in lines):
            page.use("router_margin")
    lines = [frac or ""] + lines
    if not any(lines):
        return ""
    return "\n**Routed layers**\n" + "".join(f"\n{md(line)}\n" for line in lines if line)


def _experts_md(a: Analysis, page: MdPage) -> str:
    out = [_h("specialisation")]
    if a.layer_stats.empty:
        return out[0] + "_no router records in this analysis_\n"
    out.append(page.table(a.layer_stats, ["layer", "n_experts", "top_k", "domain_selectivity", "domain_specialisation",
                                          "hubs", "router_entropy", "repetition_rate"], top=TOP_ROWS))
    out += [f"\n**Most specialised experts**: by {page.use('selectivity').lower()} = top-k share of the domain / the "
            f"expert's share of all tokens (lift = share / (k/E)); hubs and experts below "
            f"{md(facts.min_load_ratio(a))}× the uniform load 1/E are not ranked\n\n",
            page.table(facts.most_specialised(a, len(a.expert_stats)), top=TOP_ROWS,
                       source="tables/expert_stats.csv")]
    best = FD.best_expert_per_domain(a)
    if not best.empty:
        out += ["\n**Most selective expert per domain**\n\n", page.table(best, top=TOP_ROWS)]
    hubs = facts.hubs(a)
    page.use("hub")
    out.append("\n**Hubs** (in the top-k of more than half of the tokens of most domains: lift near E/k "
               "everywhere, selectivity near 1)\n\n")
    out.append(page.table(hubs, top=TOP_ROWS) if not hubs.empty else "_no hub_\n")
    tops = facts.top_experts_per_domain(a, 3)
    if tops:
        out.append("\n**Top experts per domain** (top-k share, selectivity)\n\n")
        rows = []
        for layer in pick_layers(sorted(tops, key=int)):
            for dom_name, lst in tops[layer].items():
                rows.append({"layer": layer, "domain": dom_name, "experts": ", ".join(
                    f"E{e['expert']} ({facts.num(e['share_topk'], 3)}, "
                    + ("hub" if e.get("hub") else f"{facts.num(e.get('selectivity'), 3)}x") + ")" for e in lst)})
        out.append(page.table(pd.DataFrame(rows), top=3 * TOP_ROWS))
    return "".join(out)


def _load_md(a: Analysis, page: MdPage) -> str:
    if a.layer_stats.empty:
        return ""
    out = [_h("load"), page.table(a.layer_stats, ["layer", "load_cv", "load_entropy_norm", "max_vio", "switch_aux"],
                                  top=TOP_ROWS)]
    col = facts.collapsed(a)
    out.append(f"\n**{page.use('collapse')}** (load below 0.1× or above 3× uniform)\n\n")
    out.append(page.table(col, top=TOP_ROWS, source="tables/expert_stats.csv") if not col.empty
               else "_no expert flagged_\n")
    return "".join(out)


def _cold_start_md(a: Analysis, page: MdPage) -> str:
    if a.position_profile.empty:
        return ""
    out = [_h("coldstart"), f"{page.use('router_entropy')} by position in the document; BOS is shown apart and "
           "left out of every other table.\n\n"]
    pp = a.position_profile.pivot_table(index="bucket", columns="layer", values="router_entropy", aggfunc="first")
    pp = pp.reindex(bucket_order(pp.index))
    pp.columns = [f"L{int(c)}" for c in pp.columns]
    out.append(md_table(pp.reset_index().rename(columns={"bucket": "position"}), digits=3))
    return "".join(out)


def _feature_md(a: Analysis, latent: int) -> str:
    r = a.latent_row(latent)
    lines = [f"\n### Latent {latent}\n\n"]
    why = FD.explanation(r)
    if why:
        note = FD.explanation_note(r)
        lines.append(f"**{md(why)}**" + (f" ({md(note)})" if note else "") + "\n\n")
    facts_row = "; ".join(f"{md(k)}: {md(facts.num(v))}" for k, v in facts.feature_facts(a, latent))
    lines.append(facts_row + "\n\n")
    if r is not None and as_list(r.get("logit_pos")):
        lines.append("promotes: " + ", ".join(f"«{md(s)}»" for s in as_list(r.get("logit_pos"))) + "\n\n")
    ctx = a.contexts[(a.contexts["latent"] == latent) & (a.contexts["kind"] == "top")] if not a.contexts.empty \
        else a.contexts
    for c in ctx.sort_values("rank").head(3).itertuples() if not ctx.empty else []:
        lines.append(f"- act {md(facts.num(scalar(c.act), 3))} ({md(c.domain)}): "
                     f"{plain_context(as_list(c.tokens), as_list(c.acts), int(c.center))}\n")
    return "".join(lines)


def _features_md(a: Analysis, page: MdPage, top_n: int) -> str:
    out = [_h("features")]
    ids = top_features(a, top_n)
    if a.feature_count:
        out.append(f"{page.use('feature_count')}: **{md(a.feature_count.get('count'))}** interpretable latents.\n\n")
    if not ids:
        out.append("_no live latents with contexts_\n")
    page.use("density")
    out += [_feature_md(a, i) for i in ids]
    return "".join(out)


def _details_md(a: Analysis, page: MdPage) -> str:
    out = [_h("details"), page.kv(facts.summary_rows(a))]
    line = FD.analysis_data_line(a)
    if line:
        out.append(f"\n{md(line)}\n")
    dom = a.summary.get("domains") or {}
    if dom:
        out += ["\n**Domains**\n\n", page.table(pd.DataFrame({"domain": list(dom), "tokens": list(dom.values())}))]
    return "".join(out)


def _probe_md(a: Analysis) -> str:
    from routesae.report import probe as P

    t = P.recall_table(a)
    if t.empty:
        return ""
    nk = P.needed_table(a)
    more = ["\n**Experts a token needs**: ", md(P.NEEDED_NOTE), "\n\n", md_table(nk, digits=3)] if not nk.empty else []
    return "".join([_h("probe"), md(P.NOTE), "\n\n", md_table(t, digits=3),
                    "\n**Experts explained by their predictive latents**\n\n", md_table(P.expert_table(a)), *more])


def _routing_md(r: Any, page: MdPage) -> str:
    from routesae.report.routing import needed_experts_table, top_ablations

    s = r.summary
    saved = ", ".join(f"{float(v):.1%} at eps {e}" for e, v in (s.get("compute_saved") or {}).items())
    out = [_h("routing"),
           f"{md(s.get('tokens'))} tokens of {md(s.get('corpus'))}; a token needs k' experts when top-k' at every "
           f"MoE layer keeps its next-token distribution within KL eps of the model's own routing (top-"
           f"{md(s.get('top_k'))}). {page.use('compute_saved')}: {md(saved)}.\n\n",
           f"**Needed experts by domain** (fraction of tokens, eps {r.eps:g} nats)\n\n",
           page.table(needed_experts_table(r))]
    topp = r.table("topp")
    if not topp.empty:
        wide = topp.pivot_table(index="domain", columns="p", values="mean_experts")
        wide.columns = [f"p={c:g}" for c in wide.columns]
        page.use("mean_experts")
        out += ["\n**Mean experts per token under top-p**\n\n", md_table(wide.reset_index(), digits=3)]
    ab = top_ablations(r)
    if not ab.empty:
        out += ["\n**Experts each domain depends on** (CE increase when removed)\n\n",
                page.table(ab.rename(columns={"ce_increase": "ce_increase_removed"}))]
    return "".join(out)
