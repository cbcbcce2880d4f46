"""Features: a searchable table of all latents; ``?feature=N`` opens the page of latent N."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from common import (
    CONTEXT_CSS,
    PAGES,
    context_block,
    feature_param,
    get_analysis,
    latent_row,
    md_text,
    rows,
    selected_row,
)
from figures_extra import logit_lens, routed_layer_fractions

from routesae.report import facts
from routesae.report import figures as F
from routesae.report import findings as FD
from routesae.report.load import as_list, scalar

a, ix = get_analysis()
latent = feature_param()

TABLE_COLUMNS = {
    "latent": st.column_config.NumberColumn("latent", help="latent (SAE feature) index", format="%d"),
    "density": st.column_config.NumberColumn("density", help="fraction of tokens where it is active",
                                             format="%.5f"),
    "count": st.column_config.NumberColumn("active tokens", format="%d"),
    "max_act": st.column_config.NumberColumn("max act", format="%.3f"),
    "mean_act": st.column_config.NumberColumn("mean act", format="%.3f", help="over active tokens"),
    "top_domain": st.column_config.TextColumn("top domain"),
    "top_domain_lift": st.column_config.NumberColumn("domain lift", format="%.2f",
                                                     help="share of the top domain among its active tokens / "
                                                          "base share"),
    "expert": st.column_config.TextColumn("top expert", help="MoE layer and expert with the highest lift"),
    "top_expert_lift": st.column_config.NumberColumn("expert lift", format="%.2f"),
    "top_routed_layer": st.column_config.NumberColumn("routed layer", format="%d",
                                                      help="the layer RouteSAE routes its tokens to most"),
    "interpretable": st.column_config.CheckboxColumn("interpretable"),
    "top_token": st.column_config.TextColumn("top token", help="most frequent activating token (↵ = newline)"),
    "explanation": st.column_config.TextColumn("explanation", help="`routesae explain`: see the explainer column"),
    "detection_auc": st.column_config.NumberColumn("detection AUC", format="%.2f",
                                                   help="held-out activating vs non-activating contexts (0.5 = "
                                                        "chance); the judge is in the explainer column"),
    "fuzzing_auc": st.column_config.NumberColumn("fuzzing AUC", format="%.2f",
                                                 help="right vs wrong marked tokens (0.5 = chance)"),
    "explanation_label": st.column_config.TextColumn("explainer", help="which explainer wrote the explanation and "
                                                                       "which judge scored it (LLM or no-LLM proxy)"),
}
SORTS = {"density": "density", "max activation": "max_act", "domain lift": "top_domain_lift",
         "expert lift": "top_expert_lift", "latent": "latent"}


def goto_box(where) -> None:
    with where.form("goto", border=False):
        g1, g2 = st.columns([3, 1], vertical_alignment="bottom")
        n = g1.number_input("Open latent", min_value=0, step=1, value=int(latent or 0), key="goto_latent")
        if g2.form_submit_button("Open"):
            st.query_params["feature"] = str(int(n))
            st.rerun()


def table_view() -> None:
    st.title("Features")
    st.caption("Every latent of the SAE with its statistics. Filter, sort, then click a row to open its page "
               "(or use `?feature=N`).")
    t = ix.table
    if t.empty:
        st.info("This analysis has no feature tables (latents.parquet).")
        return
    f1, f2, f3, f4 = st.columns([3, 2, 2, 2])
    q = f1.text_input("Token or explanation contains", key="q", placeholder="e.g. def, the, (",
                      help="substring of the most frequent activating token or of the explanation "
                           "(case-insensitive)")
    doms = sorted({str(d) for d in t["top_domain"].dropna()}) if "top_domain" in t else []
    dom = f2.multiselect("Top domain", doms, key="dom")
    layers = sorted({int(x) for x in t["top_routed_layer"].dropna()}) if "top_routed_layer" in t else []
    lay = f3.multiselect("Routed layer", layers, key="lay")
    experts = sorted({str(x) for x in t["expert"].dropna()}) if "expert" in t else []
    exp = f4.multiselect("Top expert", experts, key="exp") if "expert" in t else []  # none for a dense model
    o1, o2, o3, o4 = st.columns([2, 2, 2, 2], vertical_alignment="bottom")
    sort = o1.selectbox("Sort by", [k for k, c in SORTS.items() if c in t], key="sort")
    desc = o2.toggle("descending", value=True, key="desc")
    live = o3.toggle("hide dead latents", value=True, key="live")
    interp = o4.toggle("interpretable only", value=False, key="interp")
    keep = pd.Series(True, index=t.index)
    if q:
        hit = t["top_token"].fillna("").str.contains(q, case=False, regex=False)
        if "explanation" in t:
            hit |= t["explanation"].fillna("").astype(str).str.contains(q, case=False, regex=False)
        keep &= hit
    if dom:
        keep &= t["top_domain"].isin(dom)
    if lay:
        keep &= t["top_routed_layer"].isin(lay)
    if exp:
        keep &= t["expert"].isin(exp)
    if live:
        keep &= t["density"] > 0
    if interp and "interpretable" in t:
        keep &= t["interpretable"].astype(bool)
    view = t[keep].sort_values([SORTS[sort], "latent"], ascending=[not desc, True], na_position="last")
    view = view.reset_index(drop=True)
    st.caption(f"{len(view):,} of {len(t):,} latents")
    event = st.dataframe(view, hide_index=True, width="stretch", height=520, key="feature_table",
                         column_config={k: v for k, v in TABLE_COLUMNS.items() if k in view},
                         on_select="rerun", selection_mode="single-row")
    r = selected_row(event)
    if r is not None and r < len(view):
        st.query_params["feature"] = str(int(view.iloc[r]["latent"]))
        st.rerun()
    goto_box(st)


def contexts_html(ctx: pd.DataFrame, scale: float) -> str:
    out = []
    for c in ctx.itertuples():
        what = f"top {int(c.rank) + 1}" if c.kind == "top" else f"rank {int(c.rank) + 1}"
        meta = f"{what} · act {facts.num(c.act, 3)} · {c.domain} · {c.doc_id} · L{facts.num(c.routed_layer)}"
        out.append(context_block(c.tokens, c.acts, c.center, scale, meta))
    return CONTEXT_CSS + "".join(out)


def feature_view(latent: int) -> None:
    r = latent_row(a, ix, latent)
    top = st.columns([6, 1, 1, 2], vertical_alignment="bottom")
    top[0].title(f"Latent {latent}")
    n_lat = len(a.latents)
    if top[1].button("◀ prev", disabled=latent <= 0, key="prev"):
        st.query_params["feature"] = str(latent - 1)
        st.rerun()
    if top[2].button("next ▶", disabled=latent >= n_lat - 1, key="next"):
        st.query_params["feature"] = str(latent + 1)
        st.rerun()
    if top[3].button("All features", icon=":material/table:", key="back"):
        del st.query_params["feature"]
        st.rerun()
    st.caption(f"Permalink: `?feature={latent}` · {md_text(a.model_name)}")
    if r is None:
        st.warning(f"Latent {latent} is not in this analysis "
                   f"({f'latents 0 .. {n_lat - 1}' if n_lat else 'it has no feature tables'}).")
        goto_box(st)
        return
    if not scalar(r.get("count")):
        st.info("This latent never fired on the analysed tokens (dead).")
    why = scalar(r.get("explanation"))
    if why:
        st.markdown(f"### {md_text(why)}")
        note = FD.explanation_note(r)
        if note:
            st.caption(md_text(note) + " (AUC 0.5 = chance; `routesae explain`)")

    # ---- facts
    expert = facts.top_expert(r)  # None: a dense model, or no MoE layer at or below the routed layer
    m = st.columns(6 if a.has_experts else 5)
    m[0].metric("density", facts.num(r.get("density"), 3))
    m[1].metric("max act", facts.num(r.get("max_act"), 3))
    m[2].metric("mean act", facts.num(r.get("mean_act"), 3))
    m[3].metric("top domain", facts.num(r.get("top_domain")), f"lift {facts.num(r.get('top_domain_lift'), 3)}",
                delta_color="off", delta_arrow="off")
    m[4].metric("routed layer", facts.num(r.get("top_routed_layer")))
    if a.has_experts:
        m[5].metric("top expert", f"L{expert[0]} E{expert[1]}" if expert else "none",
                    f"lift {facts.num(r.get('top_expert_lift'), 3)}" if expert else None, delta_color="off",
                    delta_arrow="off", help=None if expert else "no MoE layer at or below the routed layer")
    tok = scalar(r.get("top_token"))
    st.markdown(f"**Top token:** {md_text(tok) if tok is not None else '-'} · interpretable: "
                f"{facts.num(r.get('interpretable'))}")

    # ---- contexts
    ctx = rows(a.contexts, ix.contexts, latent)
    scale = float(scalar(r.get("max_act")) or 0.0)
    st.subheader("Contexts")
    st.caption("Colour = activation relative to the latent's max; hover a token for its value; the outlined "
               "token is the centre (↵ = newline).")
    if ctx.empty:
        st.info("No stored contexts for this latent.")
    else:
        kinds = sorted(k for k in ctx["kind"].unique() if k != "top")
        tabs = st.tabs(["Top activations"] + [f"Quantile {k[1:]}" for k in reversed(kinds)])
        with tabs[0]:
            st.markdown(contexts_html(ctx[ctx["kind"] == "top"].sort_values("rank"), scale),
                        unsafe_allow_html=True)
        for tab, k in zip(tabs[1:], reversed(kinds)):
            with tab:
                st.caption(f"bin {k}: samples from the {k[1:]}th of the quantile bins of its non-zero "
                           "activations (q0 = lowest)")
                st.markdown(contexts_html(ctx[ctx["kind"] == k].sort_values("rank"), scale),
                            unsafe_allow_html=True)

    # ---- figures
    layers = as_list(a.config.get("layers") or a.summary.get("layers") or [])
    g1, g2 = st.columns(2)
    g1.plotly_chart(F.latent_histogram(r), key="hist")
    g2.plotly_chart(routed_layer_fractions(r, layers), key="routed")
    g3, g4 = st.columns(2)
    ld = rows(a.latent_domains, ix.latent_domains, latent)
    g3.plotly_chart(F.latent_domain_lift(ld, latent), key="dlift")
    if a.has_experts:
        le = rows(a.latent_experts, ix.latent_experts, latent)
        g4.plotly_chart(F.latent_expert_lift(le, latent), key="elift")
    g5, g6 = st.columns(2)
    g5.plotly_chart(logit_lens(r), key="logit")

    # ---- neighbours
    with g6:
        st.markdown("**Nearest latents** (decoder cosine)")
        nb, cs = as_list(r.get("neighbours")), as_list(r.get("neighbour_cos"))
        if not nb:
            st.caption("none stored")
        cols = st.columns(2)
        for i, (n, c) in enumerate(zip(nb, cs + [None] * (len(nb) - len(cs)))):
            cols[i % 2].page_link(PAGES["features"], label=f"latent {int(n)} · cos {facts.num(c, 3)}",
                                  query_params={"feature": str(int(n))}, icon=":material/link:")


if latent is None:
    table_view()
else:
    feature_view(latent)
