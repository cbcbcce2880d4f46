"""One self-contained HTML report: plotly.js inlined once, inline CSS, no external script, style or font.

Every string that comes from the run (corpus tokens, domains, document ids, paths, config values)
goes through :func:`esc` (``html.escape(s, quote=True)``); plotly figure JSON is escaped by plotly
(``<`` ``>`` ``/`` as ``\\u003c``...) and its labels by :func:`routesae.report.figures.label`.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from routesae.report import facts
from routesae.report import figures as F
from routesae.report import routed_layers as RL
from routesae.report.load import Analysis, as_list, pick_layers, scalar, top_features

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1200px;margin:auto;padding:1em 2em}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:.5em 2em;z-index:10}
nav a{margin-right:1.2em;color:#1f4e9a;text-decoration:none}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:.5em 1.2em 1em;margin:1em 0}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:.5em}
.feature{border-top:2px solid #ccc;margin-top:1.5em;padding-top:.5em}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;line-height:1.9;margin:.2em 0;
  white-space:pre-wrap;word-break:break-all}
.ctx .meta{color:#777;font-family:system-ui,sans-serif;font-size:.9em;margin-right:.6em}
.tok{border-radius:2px;padding:1px 0}
.tok.c{outline:1.5px solid #b04000}
.chip{display:inline-block;font-family:ui-monospace,monospace;background:#eef;border-radius:3px;padding:0 4px;
  margin:1px;white-space:pre}
.note{color:#666;font-size:.9em}
"""


def esc(s: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape(str(s), quote=True)


def tok(s: Any) -> str:
    """A token made visible: newline -> ↵, tab -> →; then escaped."""
    return esc(str(s).replace("\n", "↵").replace("\t", "→"))


class Figures:
    """Renders figures as ``<div>`` + inline script, without plotly.js (the page carries it once)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, fig: go.Figure) -> str:
        self.count += 1
        return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                           config={"displaylogo": False, "responsive": True})


def table(df: pd.DataFrame, columns: list[str] | None = None, digits: int = 4) -> str:
    if df is None or df.empty:
        return '<p class="note">no rows</p>'
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for row in df[cols].itertuples(index=False):
        cells = []
        for v in row:
            v = scalar(v)
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="n">{esc(facts.num(v, digits))}</td>' if numeric
                         else f"<td>{esc(facts.num(v, digits))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(rows: list[tuple[str, Any]]) -> str:
    return table(pd.DataFrame({"name": [k for k, _ in rows], "value": [facts.num(v) for _, v in rows]}))


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


# ---------------------------------------------------------------- sections


def _summary(a: Analysis) -> str:
    dom = a.summary.get("domains") or {}
    parts = ["<h2 id='summary'>Summary</h2>", kv_table(facts.summary_rows(a))]
    if dom:
        parts += ["<h3>Domains</h3>", table(pd.DataFrame({"domain": list(dom), "tokens": list(dom.values())}))]
    if a.config:
        parts += ["<details><summary>SAE config (config.json)</summary>", kv_table(facts.config_rows(a)),
                  "</details>"]
    return "<section>" + "".join(parts) + "</section>"


def _evaluation(a: Analysis, fig: Figures) -> str:
    parts = ["<h2 id='evaluation'>Evaluation</h2>"]
    if not a.eval:
        parts.append("<p class='note'>no eval.json: run <code>routesae evaluate RUN</code></p>")
    else:
        rows = facts.metric_rows(a.eval)
        parts.append(table(pd.DataFrame(rows, columns=["group", "metric", "value"])))
        per = facts.per_layer_rows(a.eval)
        if not per.empty:
            parts += ["<h3>Per layer</h3>", table(per)]
    counts = F.routed_layer_counts(a.eval, a.latents)
    if not counts.empty:
        parts.append(fig(F.routed_layer_histogram(counts)))
    parts.append(_routed_diagnostics(a, fig))
    return "<section>" + "".join(parts) + "</section>"


def _routed_diagnostics(a: Analysis, fig: Figures) -> str:
    """RouteSAE: routed-layer entropy and router margin (eval.json), their curves over training (metrics.jsonl)."""
    parts = [f"<p>{esc(line)}</p>" for line in RL.diagnostic_lines(a.eval)]
    if not a.routing_log.empty:
        layers = as_list(a.config.get("layers") or a.eval.get("layers") or [])
        parts.append("<div class='grid'>" + fig(RL.fractions_figure(a.routing_log, layers))
                     + fig(RL.entropy_figure(a.routing_log)) + "</div>")
    return "".join(parts)


SELECTIVITY_NOTE = (
    "Share of domain D on expert i: the fraction of D's tokens whose top-k includes i. Lift = share / (k/E); "
    "selectivity = share / the expert's share of all tokens (1 = the expert sees D as often as any other text). "
    "A hub (in the top-k of more than half of the tokens of most domains) has a lift near E/k everywhere but a "
    "selectivity near 1, so experts are ranked by selectivity; hubs and experts below {r:g} x the uniform load "
    "1/E are not ranked. BOS tokens are left out (see Cold start). Ratio heatmaps use a log colour scale "
    "centred at 1.")


def _specialisation(a: Analysis, fig: Figures) -> str:
    parts = ["<h2 id='specialisation'>Expert specialisation</h2>"]
    if a.expert_domain.empty:
        return "<section>" + parts[0] + "<p class='note'>no router records in this analysis</p></section>"
    parts.append(f"<p class='note'>{esc(SELECTIVITY_NOTE.format(r=facts.min_load_ratio(a)))}</p>")
    parts.append(table(a.layer_stats, ["layer", "n_experts", "top_k", "tokens", "bos_tokens", "domain_selectivity",
                                       "domain_specialisation", "hubs", "router_entropy", "repetition_rate"]))
    if not a.domain_layer.empty:
        parts.append(fig(F.domain_layer_heatmap(a.domain_layer, "selectivity" if "selectivity" in a.domain_layer
                                                else "specialisation")))
    layers = pick_layers(a.moe_layers)
    if len(layers) < len(a.moe_layers):
        parts.append(f"<p class='note'>{len(a.moe_layers)} MoE layers: showing layers {esc(layers)}</p>")
    parts.append("<div class='grid'>" + "".join(
        fig(F.domain_expert_heatmap(a.expert_domain, j, "selectivity")) + fig(F.domain_expert_heatmap(
            a.expert_domain, j, "lift_topk")) for j in layers) + "</div>")
    parts += ["<h3>Most specialised experts (by selectivity)</h3>", table(facts.most_specialised(a, 10))]
    hubs = facts.hubs(a)
    parts.append("<h3>Hubs</h3>" + (table(hubs) if not hubs.empty else
                                    "<p class='note'>no expert is in the top-k of most tokens of most domains</p>"))
    return "<section>" + "".join(parts) + "</section>"


def _load_balance(a: Analysis, fig: Figures) -> str:
    parts = ["<h2 id='load'>Load balance and collapse</h2>"]
    if a.expert_stats.empty:
        return "<section>" + parts[0] + "<p class='note'>no router records in this analysis</p></section>"
    parts.append(table(a.layer_stats, ["layer", "load_cv", "load_entropy_norm", "max_vio", "switch_aux"]))
    col = facts.collapsed(a)
    parts.append("<h3>Collapse flags</h3>" + (table(col) if not col.empty else
                 "<p class='note'>no expert below 0.1x or above 3x the uniform load</p>"))
    grid = []
    for j in pick_layers(a.moe_layers):
        grid.append(fig(F.expert_load_bars(a.expert_stats, j)))
        if not a.coactivation.empty:
            grid.append(fig(F.coactivation_heatmap(a.coactivation, j)))
    return "<section>" + "".join(parts) + "<div class='grid'>" + "".join(grid) + "</div></section>"


def _cold_start(a: Analysis, fig: Figures) -> str:
    parts = ["<h2 id='coldstart'>Cold start and dynamic routing</h2>"]
    if not a.position_profile.empty:
        parts.append("<p class='note'>Position in the document; BOS (the same token at the start of every "
                     "document, so routed the same way) is shown apart and left out of every other table.</p>")
        second = "selectivity" if "selectivity" in a.position_profile else "specialisation"
        parts.append("<div class='grid'>" + fig(F.position_profile(a.position_profile, "router_entropy"))
                     + fig(F.position_profile(a.position_profile, second)) + "</div>")
    if not a.domain_layer.empty:
        parts.append(table(a.domain_layer, ["layer", "domain", "tokens", "owner", "selectivity", "specialisation",
                                            "router_entropy", "mean_active", "repetition_rate"]))
    if not a.experts_per_token.empty:
        parts.append("<div class='grid'>" + "".join(fig(F.experts_per_token(a.experts_per_token, j))
                                                    for j in pick_layers(a.moe_layers)) + "</div>")
    if len(parts) == 1:
        parts.append("<p class='note'>no router records in this analysis</p>")
    return "<section>" + "".join(parts) + "</section>"


def _feature(a: Analysis, latent: int, fig: Figures) -> str:
    r = a.latent_row(latent)
    scale = float(scalar(r.get("max_act")) or 0.0) if r is not None else 0.0
    parts = [f"<div class='feature' id='latent-{latent}'><h3>Latent {latent}</h3>",
             kv_table(facts.feature_facts(a, latent))]
    if r is not None:
        parts.append("<p>promotes: " + _chips(as_list(r.get("logit_pos")), as_list(r.get("logit_pos_values")))
                     + "<br>suppresses: " + _chips(as_list(r.get("logit_neg")), as_list(r.get("logit_neg_values")))
                     + "<br>nearest latents (decoder cosine): "
                     + _chips(as_list(r.get("neighbours")), as_list(r.get("neighbour_cos"))) + "</p>")
    grid = [fig(F.latent_histogram(r))] if r is not None else []
    if not a.latent_domains.empty:
        grid.append(fig(F.latent_domain_lift(a.latent_domains, latent)))
    if not a.latent_experts.empty:
        grid.append(fig(F.latent_expert_lift(a.latent_experts, latent)))
    parts.append("<div class='grid'>" + "".join(grid) + "</div>")
    ctx = a.contexts[a.contexts["latent"] == latent] if not a.contexts.empty else a.contexts
    if not ctx.empty:
        ctx = ctx.assign(_top=ctx["kind"] != "top").sort_values(["_top", "kind", "rank"], ascending=[True, False, True])
        for c in ctx.itertuples():
            what = f"top {int(c.rank) + 1}" if c.kind == "top" else f"bin {c.kind}"
            meta = f"{what} · act {facts.num(c.act, 3)} · {c.domain} · {c.doc_id} · L{facts.num(c.routed_layer)}"
            parts.append(f"<div class='ctx'><span class='meta'>{esc(meta)}</span>"
                         f"{context_html(as_list(c.tokens), as_list(c.acts), int(c.center), scale)}</div>")
    return "".join(parts) + "</div>"


def _features(a: Analysis, fig: Figures, n: int) -> str:
    parts = ["<h2 id='features'>Top features</h2>"]
    ids = top_features(a, n)
    if not ids:
        return "<section>" + parts[0] + "<p class='note'>no live latents with contexts</p></section>"
    fc = a.feature_count
    if fc:
        parts.append(f"<p>Feature count: <b>{esc(fc.get('count'))}</b> interpretable latents "
                     f"({esc(fc.get('settings', {}).get('threshold_rule', ''))}).</p>")
    parts.append(f"<p class='note'>{len(ids)} latents: interpretable first, then by density. Context tokens are "
                 f"shaded by activation relative to the latent's max; hover a token for its value; the outlined "
                 f"token is the context's centre.</p>")
    parts.append("<p>" + " ".join(f"<a href='#latent-{i}'>{i}</a>" for i in ids) + "</p>")
    el = facts.expert_latents_summary(a, pick_layers(a.moe_layers))
    if not el.empty:
        parts += ["<details><summary>Latents most tied to each expert (lift of the expert among the latent's "
                  "tokens)</summary>", table(el), "</details>"]
    parts += [_feature(a, i, fig) for i in ids]
    return "<section>" + "".join(parts) + "</section>"


def _dynamic_routing(a: Analysis, fig: Figures) -> str:
    """RUN/routing/ from ``routesae analyze-routing``; empty when the run has none."""
    from routesae.report import routing as R

    r = a.routing
    if r is None:
        return ""
    s = r.summary
    saved = ", ".join(f"{float(v):.1%} at eps {esc(e)}" for e, v in (s.get("compute_saved") or {}).items())
    parts = ["<h2 id='routing'>Dynamic routing</h2>",
             f"<p>{esc(s.get('tokens'))} tokens of {esc(s.get('corpus'))} ({esc(s.get('split'))}); model top-k "
             f"{esc(s.get('top_k'))} of {esc(s.get('n_experts'))} experts. A token needs k' experts when top-k' at "
             f"every MoE layer keeps its next-token distribution within KL eps of the model's own routing. "
             f"Expert compute saved: {saved}.</p>",
             f"<h3>Needed experts by domain (eps {r.eps:g} nats)</h3>", table(R.needed_experts_table(r)),
             "<div class='grid'>", fig(R.needed_experts_figure(r)), fig(R.compute_saved_figure(r)),
             fig(R.needed_by_layer_figure(r)), fig(R.loss_by_k_figure(r)), fig(R.topp_mean_figure(r))]
    for p in (0.5, 0.9):
        if not r.table("topp").empty and np.isclose(r.table("topp")["p"], p).any():
            parts.append(fig(R.topp_experts_figure(r, p)))
    parts.append("</div>")
    ab = r.table("ablation")
    if not ab.empty:
        parts += ["<h3>Expert ablation</h3>", table(R.top_ablations(r))]
        parts.append("<div class='grid'>" + "".join(fig(R.ablation_figure(r, int(j)))
                                                    for j in pick_layers(sorted(ab.layer.unique()), 4)) + "</div>")
    return "<section>" + "".join(parts) + "</section>"


def render_html(a: Analysis, top_n: int = 30) -> str:
    """The whole report as one HTML string."""
    fig = Figures()
    routing = _dynamic_routing(a, fig)
    experts = a.has_experts  # a dense model: no expert section at all
    body = (_summary(a) + _evaluation(a, fig)
            + (_specialisation(a, fig) + _load_balance(a, fig) + _cold_start(a, fig) if experts else "")
            + routing + _features(a, fig, top_n))
    nav = "".join(f"<a href='#{k}'>{v}</a>" for k, v in [
        ("summary", "Summary"), ("evaluation", "Evaluation"),
        *([("specialisation", "Specialisation"), ("load", "Load balance"), ("coldstart", "Cold start")]
          if experts else []),
        *([("routing", "Dynamic routing")] if routing else []), ("features", "Features")])
    title = f"routesae report: {a.run.name}"
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<nav>{nav}</nav><main><h1>{esc(title)}</h1><p class='note'>{esc(a.model_name)} · {esc(a.run)}</p>"
            f"{body}<p class='note'>{fig.count} figures · plotly.js inlined, opens offline</p></main></body></html>\n")
