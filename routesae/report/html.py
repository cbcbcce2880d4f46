"""One self-contained HTML report: key findings first, then the sections that hold their numbers, a glossary last.

plotly.js inlined once, inline CSS and script, no external script, style or font. Every string that
comes from the run (corpus tokens, domains, document ids, paths, config values) goes through
:func:`esc`; plotly figure JSON is escaped by plotly (``<`` ``>`` ``/`` as ``\\u003c``...) and its labels
by :func:`routesae.report.figures.label`. Long tables show their top rows, every row collapsed below
(and in ``tables/*.csv``). Building blocks: :mod:`routesae.report.htmlkit`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from routesae.report import facts
from routesae.report import figures as F
from routesae.report import findings as FD
from routesae.report import routed_layers as RL
from routesae.report.causal import TITLES as CAUSAL_TITLES
from routesae.report.causal import causal_html
from routesae.report.htmlkit import Page, document, esc, section, tok
from routesae.report.load import Analysis, as_list, pick_layers, scalar, top_features

TOP_ROWS = 10  # rows of a long table shown before the collapsed rest
FEATURE_TERMS = {"density": "density", "active tokens": "count", "mean act": "mean_act", "max act": "max_act",
                 "interpretable": "interpretable"}
TOP_CONTEXTS = 3  # contexts of a latent shown before the collapsed rest
WIDE_EXPERTS = 16  # an expert chart with more experts takes a whole grid row
TITLES = {"findings": "Key findings", "evaluation": "Evaluation", "specialisation": "Expert specialisation",
          "load": "Load balance and collapse", "coldstart": "Cold start", "routing": "Dynamic routing",
          "probe": "Routing explained by features", "features": "Top features", "details": "Run details",
          "glossary": "Glossary", **CAUSAL_TITLES}


def context_html(tokens: list, acts: list, center: int, scale: float) -> str:
    """Tokens highlighted by activation: background alpha = act / scale, exact value in ``title``."""
    out = []
    for i, (t, v) in enumerate(zip(tokens, acts)):
        v = float(v) if v is not None else 0.0
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, v / scale))
        cls = "tok c" if i == center else "tok"
        out.append(f'<span class="{cls}" style="background:rgba(255,120,0,{alpha:.2f})" '
                   f'title="{esc(f"{v:.4g}")}">{tok(t)}</span>')
    return "".join(out)


def _chips(strs: list, values: list | None = None) -> str:
    if not strs:
        return '<span class="note">none</span>'
    vals = values if values and len(values) == len(strs) else [None] * len(strs)
    return " ".join(f'<span class="chip" title="{esc(facts.num(v))}">{tok(s)}</span>' for s, v in zip(strs, vals))


def _wide(a: Analysis) -> bool:
    n = scalar(a.summary.get("n_experts"))
    if n is None and not a.expert_stats.empty:
        n = int(a.expert_stats.groupby("layer")["expert"].count().max())
    return bool(n and int(n) > WIDE_EXPERTS)


# ---------------------------------------------------------------- sections


def data_note(ev: dict) -> str:
    """The held-out / in-sample banner of the evaluation."""
    f = FD.data_finding(ev)
    if f is None:
        return ""
    return f"<p class='data{'' if f.values.get('in_sample') is False else ' warn'}'>{esc(f.text)}</p>"


def _evaluation(a: Analysis, page: Page) -> str:
    ev = a.eval
    if not ev:
        return section("evaluation", TITLES["evaluation"],
                       "<p class='note'>no eval.json: run <code>routesae evaluate RUN</code></p>")
    parts = [data_note(ev)]
    sae, raw = ev.get("sae_space") or {}, ev.get("raw_space") or {}
    rows = [(k, [sae.get(k), raw.get(k)]) for k in facts.RECON_KEYS if k in sae or k in raw]
    if "mean_p_star" in ev:
        rows.append(("mean_p_star", [ev["mean_p_star"], None]))
    parts += ["<h3>Reconstruction</h3>", page.metrics(rows, ["SAE input space", "raw residual"])]
    sp = ev.get("splice") or {}
    if "skipped" in sp:
        parts.append(f"<p class='note'>not spliced into the model: {esc(sp['skipped'])}</p>")
    elif sp:
        src = {**sp, **(sp.get("mean") or {})} if "mean" in sp else sp
        parts += ["<h3>In the model (SAE spliced in)</h3>",
                  page.metrics([(k, [src[k]]) for k in facts.SPLICE_KEYS if k in src], ["value"])]
    per = facts.per_layer_rows(ev)
    if not per.empty:
        parts += ["<h3>Per routed layer</h3>", page.table(per, top=TOP_ROWS)]
    parts.append(_routed_layers(a, page))
    return section("evaluation", TITLES["evaluation"], "".join(parts))


def _routed_layers(a: Analysis, page: Page) -> str:
    """RouteSAE: routed-layer fractions, entropy and margin (eval.json), their curves over training."""
    counts = F.routed_layer_counts(a.eval, a.latents)
    v = FD.routed_layers_values(a.eval)
    parts = []
    if v is not None:
        parts.append("<h3>Routed layers</h3><p>" + page.term("routed_fraction", "Routed-layer fractions") + ": "
                     + esc(", ".join(f"L{j} {f:.1%}" for j, f in zip(v["layers"], v["fractions"]))) + "</p>")
    lines = RL.diagnostic_lines(a.eval)
    if lines:
        page.term("routed_entropy")
        if any("margin" in x for x in lines):
            page.term("router_margin")
    parts += [f"<p>{esc(line)}</p>" for line in lines]
    figs = [page.fig(F.routed_layer_histogram(counts))] if not counts.empty else []
    if not a.routing_log.empty:
        layers = as_list(a.config.get("layers") or a.eval.get("layers") or [])
        figs += [page.fig(RL.fractions_figure(a.routing_log, layers)), page.fig(RL.entropy_figure(a.routing_log))]
    if figs:
        parts.append("<div class='grid'>" + "".join(figs) + "</div>")
    return "".join(parts)


def _specialisation(a: Analysis, page: Page) -> str:
    if a.expert_domain.empty:
        return section("specialisation", TITLES["specialisation"],
                       "<p class='note'>no router records in this analysis</p>")
    r = facts.min_load_ratio(a)
    parts = [f"<p class='note'>Share of domain D on expert i: the fraction of D's tokens whose top-k includes i. "
             f"{page.term('lift')} = share / (k/E); {page.term('selectivity')} = share / the expert's share of all "
             f"tokens (1 = the expert sees D as often as any other text). A {page.term('hub')} has a lift near E/k "
             f"everywhere but a selectivity near 1, so experts are ranked by selectivity; hubs and experts below "
             f"{r:g}× the uniform load 1/E are not ranked. BOS tokens are left out (see Cold start). Ratio heatmaps "
             f"use a log colour scale centred at 1.</p>",
             page.table(a.layer_stats, ["layer", "n_experts", "top_k", "tokens", "bos_tokens", "domain_selectivity",
                                        "domain_specialisation", "hubs", "router_entropy", "repetition_rate"],
                        top=TOP_ROWS, sortable=True, source="tables/layer_stats.csv")]
    wide = _wide(a)
    grid = []
    if not a.domain_layer.empty:
        value = "selectivity" if "selectivity" in a.domain_layer else "specialisation"
        grid.append(page.fig(F.domain_layer_heatmap(a.domain_layer, value)))
    layers = pick_layers(a.moe_layers)
    for j in layers:
        grid += [page.fig(F.domain_expert_heatmap(a.expert_domain, j, "selectivity"), wide),
                 page.fig(F.domain_expert_heatmap(a.expert_domain, j, "lift_topk"), wide)]
    if len(layers) < len(a.moe_layers):
        parts.append(f"<p class='note'>{len(a.moe_layers)} MoE layers: per-expert heatmaps of layers "
                     f"{esc(', '.join(map(str, layers)))}</p>")
    parts.append("<div class='grid'>" + "".join(grid) + "</div>")
    best = FD.best_expert_per_domain(a)
    if not best.empty:
        parts += ["<h3>Most selective expert per domain</h3>", page.table(best, top=TOP_ROWS, sortable=True)]
    ranked = facts.most_specialised(a, len(a.expert_stats))
    parts += ["<h3>Most specialised experts (by selectivity)</h3>",
              page.table(ranked, top=TOP_ROWS, sortable=True, source="tables/expert_stats.csv")]
    hubs = facts.hubs(a)
    parts.append("<h3>Hubs</h3>" + (page.table(hubs, top=TOP_ROWS, sortable=True) if not hubs.empty else
                                    "<p class='note'>no expert is in the top-k of most tokens of most domains</p>"))
    return section("specialisation", TITLES["specialisation"], "".join(parts))


def _load_balance(a: Analysis, page: Page) -> str:
    if a.expert_stats.empty:
        return section("load", TITLES["load"], "<p class='note'>no router records in this analysis</p>")
    parts = [page.table(a.layer_stats, ["layer", "load_cv", "load_entropy_norm", "max_vio", "switch_aux"],
                        top=TOP_ROWS, sortable=True)]
    col = facts.collapsed(a)
    parts.append(f"<h3>{page.term('collapse', 'Collapse flags')}</h3>" + (
        page.table(col, top=TOP_ROWS, sortable=True, source="tables/expert_stats.csv") if not col.empty else
        "<p class='note'>no expert below 0.1× or above 3× the uniform load</p>"))
    wide = _wide(a)
    page.term("load")
    parts.append("<div class='grid'>" + page.fig(F.expert_load_heatmap(a.expert_stats), True)
                 + "".join(page.fig(F.expert_load_bars(a.expert_stats, j), wide) for j in pick_layers(a.moe_layers))
                 + "</div>")
    if not a.coactivation.empty:
        page.term("coactivation")
        parts.append("<div class='grid'>" + "".join(page.fig(F.coactivation_heatmap(a.coactivation, j))
                                                    for j in pick_layers(a.moe_layers)) + "</div>")
    return section("load", TITLES["load"], "".join(parts))


def _cold_start(a: Analysis, page: Page) -> str:
    parts = []
    if not a.position_profile.empty:
        parts.append("<p class='note'>Position in the document; BOS (the same token at the start of every "
                     "document, so routed the same way) is shown apart and left out of every other table.</p>")
        second = "selectivity" if "selectivity" in a.position_profile else "specialisation"
        page.term("router_entropy")
        page.term(second)
        parts.append("<div class='grid'>" + page.fig(F.position_profile(a.position_profile, "router_entropy"))
                     + page.fig(F.position_profile(a.position_profile, second)) + "</div>")
    if not a.domain_layer.empty:
        parts += ["<h3>By domain and layer</h3>", page.table(
            a.domain_layer.sort_values(["layer", "domain"]), ["layer", "domain", "tokens", "owner", "selectivity",
                                                              "specialisation", "router_entropy", "mean_active",
                                                              "repetition_rate"],
            top=TOP_ROWS, sortable=True, source="tables/domain_layer.csv")]
    if not a.experts_per_token.empty:
        page.term("mean_active")
        parts.append("<div class='grid'>" + "".join(page.fig(F.experts_per_token(a.experts_per_token, j))
                                                    for j in pick_layers(a.moe_layers)) + "</div>")
    if not parts:
        parts.append("<p class='note'>no router records in this analysis</p>")
    return section("coldstart", TITLES["coldstart"], "".join(parts))


def _feature(a: Analysis, latent: int, page: Page) -> str:
    r = a.latent_row(latent)
    scale = float(scalar(r.get("max_act")) or 0.0) if r is not None else 0.0
    parts = [f"<div class='feature' id='latent-{latent}'><h3>Latent {latent}</h3>"]
    why = FD.explanation(r)
    if why:
        note = FD.explanation_note(r)
        parts.append(f"<p><b>{esc(why)}</b>" + (f" <span class='note'>({esc(note)})</span>" if note else "") + "</p>")
    parts.append(page.kv(facts.feature_facts(a, latent), FEATURE_TERMS))
    if r is not None:
        parts.append("<p>promotes: " + _chips(as_list(r.get("logit_pos")), as_list(r.get("logit_pos_values")))
                     + "<br>suppresses: " + _chips(as_list(r.get("logit_neg")), as_list(r.get("logit_neg_values")))
                     + "<br>nearest latents (decoder cosine): "
                     + _chips(as_list(r.get("neighbours")), as_list(r.get("neighbour_cos"))) + "</p>")
    grid = [page.fig(F.latent_histogram(r))] if r is not None else []
    if not a.latent_domains.empty:
        grid.append(page.fig(F.latent_domain_lift(a.latent_domains, latent)))
    if not a.latent_experts.empty:
        grid.append(page.fig(F.latent_expert_lift(a.latent_experts, latent)))
    parts.append("<div class='grid'>" + "".join(grid) + "</div>")
    ctx = a.contexts[a.contexts["latent"] == latent] if not a.contexts.empty else a.contexts
    if not ctx.empty:
        ctx = ctx.assign(_top=ctx["kind"] != "top").sort_values(["_top", "kind", "rank"], ascending=[True, False, True])
        shown = [_context(c, scale) for c in ctx.itertuples()]
        parts += shown[:TOP_CONTEXTS]
        if len(shown) > TOP_CONTEXTS:
            parts.append(f"<details><summary>{len(shown) - TOP_CONTEXTS} more contexts (activation quantile bins)"
                         f"</summary>{''.join(shown[TOP_CONTEXTS:])}</details>")
    return "".join(parts) + "</div>"


def _context(c, scale: float) -> str:
    what = f"top {int(c.rank) + 1}" if c.kind == "top" else f"bin {c.kind}"
    meta = f"{what} · act {facts.num(c.act, 3)} · {c.domain} · {c.doc_id} · L{facts.num(c.routed_layer)}"
    return (f"<div class='ctx'><span class='meta'>{esc(meta)}</span>"
            f"{context_html(as_list(c.tokens), as_list(c.acts), int(c.center), scale)}</div>")


def _features(a: Analysis, page: Page, n: int) -> str:
    ids = top_features(a, n)
    if not ids:
        return section("features", TITLES["features"], "<p class='note'>no live latents with contexts</p>")
    parts = []
    fc = a.feature_count
    if fc:
        parts.append(f"<p>{page.term('feature_count')}: <b>{esc(fc.get('count'))}</b> "
                     f"{page.term('interpretable', 'interpretable')} latents "
                     f"({esc(fc.get('settings', {}).get('threshold_rule', ''))}).</p>")
    page.term("density")
    parts.append(f"<p class='note'>{len(ids)} latents: interpretable first, then by density. Context tokens are "
                 f"shaded by activation relative to the latent's max; hover a token for its value; the outlined "
                 f"token is the context's centre.</p>")
    parts.append("<p>" + " ".join(f"<a href='#latent-{i}'>{i}</a>" for i in ids) + "</p>")
    el = facts.expert_latents_summary(a, pick_layers(a.moe_layers))
    if not el.empty:
        parts += ["<details><summary>Latents most tied to each expert (lift of the expert among the latent's "
                  "tokens)</summary>", page.table(el), "</details>"]
    parts += [_feature(a, i, page) for i in ids]
    return section("features", TITLES["features"], "".join(parts))


def _dynamic_routing(a: Analysis, page: Page) -> str:
    """RUN/routing/ from ``routesae analyze-routing``; empty when the run has none."""
    from routesae.report import routing as R

    r = a.routing
    if r is None:
        return ""
    s = r.summary
    saved = ", ".join(f"{float(v):.1%} at eps {esc(e)}" for e, v in (s.get("compute_saved") or {}).items())
    parts = [f"<p>{esc(s.get('tokens'))} tokens of {esc(s.get('corpus'))} ({esc(s.get('split'))}); model top-k "
             f"{esc(s.get('top_k'))} of {esc(s.get('n_experts'))} experts. A token needs k' experts when top-k' at "
             f"every MoE layer keeps its next-token distribution within KL eps of the model's own routing. "
             f"{page.term('compute_saved')}: {saved}.</p>",
             f"<h3>Needed experts by domain (eps {r.eps:g} nats)</h3>", page.table(R.needed_experts_table(r)),
             "<div class='grid'>", page.fig(R.needed_experts_figure(r)), page.fig(R.compute_saved_figure(r)),
             page.fig(R.needed_by_layer_figure(r)), page.fig(R.loss_by_k_figure(r)), page.fig(R.topp_mean_figure(r))]
    for p in (0.5, 0.9):
        if not r.table("topp").empty and np.isclose(r.table("topp")["p"], p).any():
            parts.append(page.fig(R.topp_experts_figure(r, p)))
    parts.append("</div>")
    ab = r.table("ablation")
    if not ab.empty:
        parts += ["<h3>Expert ablation</h3>",
                  page.table(R.top_ablations(r).rename(columns={"ce_increase": "ce_increase_removed"}))]
        parts.append("<div class='grid'>" + "".join(page.fig(R.ablation_figure(r, int(j)))
                                                    for j in pick_layers(sorted(ab.layer.unique()), 4)) + "</div>")
    return section("routing", TITLES["routing"], "".join(parts))


def _probe(a: Analysis, page: Page) -> str:
    """RUN/routing_probe/ from ``routesae explain-routing``; empty when the run has none."""
    from routesae.report import probe as P

    t = P.recall_table(a)
    if t.empty:
        return ""
    nk = P.needed_table(a)
    more = f"<h3>Experts a token needs</h3><p>{esc(P.NEEDED_NOTE)}</p>" + page.table(nk) if not nk.empty else ""
    return section("probe", TITLES["probe"], f"<p>{esc(P.NOTE)}</p>" + page.table(t) +
                   "<h3>Experts explained by their predictive latents</h3>" + page.table(P.expert_table(a)) + more)


def _details(a: Analysis, page: Page) -> str:
    dom = a.summary.get("domains") or {}
    parts = [page.kv(facts.summary_rows(a))]
    line = FD.analysis_data_line(a)
    if line:
        parts.append(f"<p class='note'>{esc(line)}</p>")
    if dom:
        parts += ["<h3>Domains</h3>", page.table(pd.DataFrame({"domain": list(dom), "tokens": list(dom.values())}))]
    if a.config:
        parts += ["<details><summary>SAE config (config.json)</summary>", page.kv(facts.config_rows(a)),
                  "</details>"]
    return section("details", TITLES["details"], "".join(parts))


def render_html(a: Analysis, top_n: int = 30) -> str:
    """The whole report as one HTML string."""
    page = Page()
    items = FD.findings(a)
    experts = a.has_experts  # a dense model: no expert section at all
    sections = [("evaluation", _evaluation(a, page))]
    if experts:
        sections += [("specialisation", _specialisation(a, page)), ("load", _load_balance(a, page)),
                     ("coldstart", _cold_start(a, page))]
    sections += [("routing", _dynamic_routing(a, page)), ("probe", _probe(a, page)), *causal_html(a, page),
                 ("features", _features(a, page, top_n)),
                 ("details", _details(a, page))]
    sections = [(k, s) for k, s in sections if s]
    head = section("findings", TITLES["findings"], page.findings(items, TITLES), first=True)
    body = head + "".join(s for _, s in sections) + page.glossary()
    nav = [(k, TITLES[k]) for k in ["findings", *(k for k, _ in sections), "glossary"]]
    return document(f"routesae report: {a.run.name}", f"{a.model_name} · {a.run}", nav, body, page)
