"""A readable Markdown summary of an analysis: key metrics, specialisation, collapse, top features.

Every value from the run goes through :func:`md`: Markdown punctuation backslash-escaped (backslash,
backtick, ``|``, ``*``, ``_``, ``[``, ``]``, ``#``, ``~``), then HTML-escaped (``&`` ``<`` ``>``; in that
order so no escape breaks an entity), newlines shown as ``↵``: corpus text renders literally and cannot
break a table or inject HTML.
"""

from __future__ import annotations

import html
import re
from typing import Any

import pandas as pd

from routesae.report import facts
from routesae.report import routed_layers as RL
from routesae.report.figures import bucket_order
from routesae.report.load import Analysis, as_list, pick_layers, scalar, top_features

_MD_SPECIAL = re.compile(r"([\\`|*_\[\]#~])")


def md(v: Any) -> str:
    """Escape any value for Markdown text or a table cell."""
    s = facts.num(v) if not isinstance(v, str) else v
    s = s.replace("\r", "").replace("\n", "↵").replace("\t", "→")
    return html.escape(_MD_SPECIAL.sub(r"\\\1", s), quote=False)


def md_table(df: pd.DataFrame, columns: list[str] | None = None, digits: int = 4) -> str:
    if df is None or df.empty:
        return "_no rows_\n"
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    lines = ["| " + " | ".join(md(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in df[cols].itertuples(index=False):
        lines.append("| " + " | ".join(md(facts.num(v, digits)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _kv(rows: list[tuple[str, Any]]) -> str:
    return md_table(pd.DataFrame({"name": [k for k, _ in rows], "value": [facts.num(v) for _, v in rows]}))


def plain_context(tokens: list, acts: list, center: int) -> str:
    """A context as escaped text with the centre token in ⟦ ⟧ (no Markdown emphasis to break)."""
    parts = []
    for i, t in enumerate(tokens):
        parts.append(f"⟦{md(t)}⟧" if i == center else md(t))
    return "".join(parts)


def render_markdown(a: Analysis, top_n: int = 30) -> str:
    out = [f"# routesae report: {md(a.run.name)}\n\n", "## Summary\n\n", _kv(facts.summary_rows(a))]
    dom = a.summary.get("domains") or {}
    if dom:
        out += ["\n**Domains**\n\n", md_table(pd.DataFrame({"domain": list(dom), "tokens": list(dom.values())}))]

    out.append("\n## Evaluation\n\n")
    if a.eval:
        out.append(md_table(pd.DataFrame(facts.metric_rows(a.eval), columns=["group", "metric", "value"])))
        per = facts.per_layer_rows(a.eval)
        if not per.empty:
            out += ["\n**Per layer**\n\n", md_table(per)]
    else:
        out.append("_no eval.json: run `routesae evaluate RUN`_\n")
    out.append(_routed_md(a))

    if a.has_experts:  # a dense model has no expert section
        out.append(_experts_md(a))

    if not a.position_profile.empty:
        out.append("\n## Cold start\n\n")
        out.append("Router entropy by position in the document; BOS is shown apart and left out of every other "
                   "table.\n\n")
        pp = a.position_profile.pivot_table(index="bucket", columns="layer", values="router_entropy",
                                            aggfunc="first")
        pp = pp.reindex(bucket_order(pp.index))
        pp.columns = [f"L{int(c)} entropy" for c in pp.columns]
        out.append(md_table(pp.reset_index().rename(columns={"bucket": "position"})))

    if a.routing is not None:
        out.append(_routing_md(a.routing))

    out.append("\n## Top features\n\n")
    ids = top_features(a, top_n)
    if a.feature_count:
        out.append(f"Feature count: **{md(a.feature_count.get('count'))}** interpretable latents.\n\n")
    if not ids:
        out.append("_no live latents with contexts_\n")
    for i in ids:
        out.append(_feature_md(a, i))
    return "".join(out)


def _routed_md(a: Analysis) -> str:
    """RouteSAE: routed-layer fractions, entropy and router margin (eval.json), first and last values over
    training (metrics.jsonl); nothing for other SAEs or older files."""
    lines = RL.diagnostic_lines(a.eval) + [RL.over_training_line(a.routing_log)]
    lines = [x for x in lines if x]
    if not lines:
        return ""
    lines = [RL.fraction_line(a.eval) or ""] + lines
    return "\n**Routed layers**\n" + "".join(f"\n{md(line)}\n" for line in lines if line)


def _experts_md(a: Analysis) -> str:
    out = ["\n## Expert specialisation\n\n"]
    if a.layer_stats.empty:
        return out[0] + "_no router records in this analysis_\n"
    out.append(md_table(a.layer_stats, ["layer", "n_experts", "top_k", "domain_selectivity", "domain_specialisation",
                                        "hubs", "router_entropy", "repetition_rate", "load_cv", "load_entropy_norm",
                                        "max_vio", "switch_aux"]))
    out += [f"\n**Most specialised experts**: by selectivity = top-k share of the domain / the expert's share of "
            f"all tokens (lift = share / (k/E)); hubs and experts below {md(facts.min_load_ratio(a))} x the uniform "
            f"load 1/E are not ranked\n\n", md_table(facts.most_specialised(a, 10))]
    hubs = facts.hubs(a)
    out.append("\n**Hubs** (in the top-k of more than half of the tokens of most domains: lift near E/k "
               "everywhere, selectivity near 1)\n\n")
    out.append(md_table(hubs) if not hubs.empty else "_no hub_\n")
    tops = facts.top_experts_per_domain(a, 3)
    if tops:
        out.append("\n**Top experts per domain** (top-k share, selectivity)\n\n")
        rows = []
        for layer in pick_layers(sorted(tops, key=int)):
            for dom_name, lst in tops[layer].items():
                rows.append({"layer": layer, "domain": dom_name, "experts": ", ".join(
                    f"E{e['expert']} ({facts.num(e['share_topk'], 3)}, "
                    + ("hub" if e.get("hub") else f"{facts.num(e.get('selectivity'), 3)}x") + ")" for e in lst)})
        out.append(md_table(pd.DataFrame(rows)))
    col = facts.collapsed(a)
    out.append("\n**Collapse flags** (load below 0.1x or above 3x uniform)\n\n")
    out.append(md_table(col) if not col.empty else "_no expert flagged_\n")
    return "".join(out)


def _feature_md(a: Analysis, latent: int) -> str:
    r = a.latent_row(latent)
    lines = [f"\n### Latent {latent}\n\n"]
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



def _routing_md(r) -> str:
    from routesae.report.routing import needed_experts_table, top_ablations

    s = r.summary
    saved = ", ".join(f"{float(v):.1%} at eps {e}" for e, v in (s.get("compute_saved") or {}).items())
    out = ["\n## Dynamic routing\n\n",
           f"{md(s.get('tokens'))} tokens of {md(s.get('corpus'))}; a token needs k' experts when top-k' at every "
           f"MoE layer keeps its next-token distribution within KL eps of the model's own routing (top-"
           f"{md(s.get('top_k'))}). Expert compute saved: {md(saved)}.\n\n",
           f"**Needed experts by domain** (fraction of tokens, eps {r.eps:g} nats)\n\n",
           md_table(needed_experts_table(r))]
    topp = r.table("topp")
    if not topp.empty:
        wide = topp.pivot_table(index="domain", columns="p", values="mean_experts")
        wide.columns = [f"p={c:g}" for c in wide.columns]
        out += ["\n**Mean experts per token under top-p**\n\n", md_table(wide.reset_index())]
    ab = top_ablations(r)
    if not ab.empty:
        out += ["\n**Experts each domain depends on** (CE increase when removed)\n\n", md_table(ab)]
    return "".join(out)
