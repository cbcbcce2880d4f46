"""Experts: domain specialisation (selectivity, hubs), load balance, co-activation, cold start, top latents."""

from __future__ import annotations

import streamlit as st
from common import PAGES, get_analysis, md_text, open_feature, selected_row, visible
from experts_causal import contrast_tab, shared_tab

from routesae.report import facts
from routesae.report import figures as F

a, ix = get_analysis()
st.title("Experts")
st.caption("How the MoE routers use their experts on the analysed corpus (router records of the store).")
layers = a.moe_layers
if a.expert_domain.empty and a.expert_stats.empty:
    st.info("Dense model: no MoE layers, so no expert tables." if not a.has_experts else
            "This analysis has no expert tables (the store holds no router records).")
    st.stop()

c1, c2 = st.columns([2, 3], vertical_alignment="bottom")
layer = c1.selectbox("MoE layer", layers, index=len(layers) // 2 if layers else None, key="layer",
                     format_func=lambda j: f"layer {j}")
HEAT = {"selectivity": "selectivity", "top-k share": "share_topk", "top-1 share": "share_top1",
        "top-k lift": "lift_topk", "top-1 lift": "lift_top1"}
value = c2.segmented_control("Heatmap", list(HEAT), default="selectivity", key="heat",
                             help="top-k: the expert is among the token's k choices; top-1: its first choice. "
                                  "Lift = share / uniform (k/E or 1/E); selectivity = share / the expert's share "
                                  "of all tokens. Ratios: log colour scale centred at 1.") or "selectivity"
MIN_LOAD = facts.min_load_ratio(a)

tab_spec, tab_load, tab_co, tab_lat, tab_con, tab_sh, tab_why = st.tabs(
    ["Specialisation", "Load balance", "Co-activation & cold start", "Top latents per expert", "Behaviour contrast",
     "Shared vs routed", "Routing explained by features"])

with tab_spec:
    if not a.expert_domain.empty:
        st.plotly_chart(F.domain_expert_heatmap(a.expert_domain, layer, HEAT[value]), key="dom_exp")
    st.caption("Selectivity = the domain's top-k share / the expert's share of all tokens (1 = no preference). A "
               "hub, in the top-k of more than half of the tokens of most domains, has a lift near E/k in every "
               f"domain but a selectivity near 1; hubs and experts below {MIN_LOAD:g} x the uniform load 1/E are "
               "not ranked as specialists. BOS tokens are left out.")
    if not a.domain_layer.empty:
        d1, d2 = st.columns(2)
        first = "selectivity" if "selectivity" in a.domain_layer else "specialisation"
        d1.plotly_chart(F.domain_layer_heatmap(a.domain_layer, first), key="dl_spec")
        d2.plotly_chart(F.domain_layer_heatmap(a.domain_layer, "router_entropy"), key="dl_ent")
    if not a.expert_stats.empty:
        st.markdown("**Experts of this layer** (most selective first; lift = top domain's share / (k/E))")
        es = a.expert_stats[a.expert_stats["layer"] == layer].copy()
        if "top_tokens" in es:
            es["top_tokens"] = es["top_tokens"].map(lambda v: [visible(x) for x in (v if v is not None else [])])
        by = "selectivity" if "selectivity" in es else "specialisation"
        cols = [c for c in ("expert", "selectivity", "top_domain", "top_share", "specialisation", "hub", "load",
                            "load_top1", "mean_weight", "top_tokens") if c in es]
        st.dataframe(es[cols].sort_values(by, ascending=False), hide_index=True, width="stretch",
                     column_config={by: st.column_config.ProgressColumn(
                         by, format="%.2f", min_value=0.0,
                         max_value=float(max(a.expert_stats[by].max(), 1.0))),
                         "specialisation": st.column_config.NumberColumn("lift", format="%.2f"),
                         "top_share": st.column_config.NumberColumn("top share", format="%.3f"),
                         "load": st.column_config.NumberColumn("load", format="%.4f"),
                         "load_top1": st.column_config.NumberColumn("load top-1", format="%.4f"),
                         "mean_weight": st.column_config.NumberColumn("mean weight", format="%.3f"),
                         "top_tokens": st.column_config.ListColumn("vocabulary specialisation")})
        st.markdown("**Most specialised experts, all layers** (by selectivity)")
        st.dataframe(facts.most_specialised(a, 10).drop(columns=["top_tokens"], errors="ignore"),
                     hide_index=True, width="stretch", key="most_specialised")
        hubs = facts.hubs(a)
        if hubs.empty:
            st.caption("No hub: no expert is in the top-k of most tokens of most domains.")
        else:
            st.markdown(f"**{len(hubs)} hubs** (all layers; share_all = fraction of all tokens with the expert "
                        "in their top-k)")
            st.dataframe(hubs, hide_index=True, width="stretch", key="hubs")

with tab_load:
    if not a.expert_stats.empty:
        st.plotly_chart(F.expert_load_bars(a.expert_stats, layer), key="load")
        st.caption("Red: collapsed (load < 0.1 x uniform); purple: hub; orange: overloaded (load > 3 x uniform).")
        col = facts.collapsed(a)
        if col.empty:
            st.success("No collapsed or overloaded experts.")
        else:
            st.markdown(f"**{len(col)} flagged experts** (all layers)")
            st.dataframe(col, hide_index=True, width="stretch")
    if not a.layer_stats.empty:
        st.markdown("**Load balance per layer**")
        st.dataframe(a.layer_stats, hide_index=True, width="stretch",
                     column_config={"load_cv": st.column_config.NumberColumn("load CV", format="%.3f",
                                                                             help="coefficient of variation"),
                                    "load_entropy_norm": st.column_config.NumberColumn("load entropy (norm)",
                                                                                       format="%.3f"),
                                    "max_vio": st.column_config.NumberColumn("MaxVio", format="%.3f"),
                                    "switch_aux": st.column_config.NumberColumn("switch aux", format="%.3f"),
                                    "router_entropy": st.column_config.NumberColumn("router entropy",
                                                                                    format="%.3f")})

with tab_co:
    e1, e2 = st.columns(2)
    if not a.coactivation.empty:
        e1.plotly_chart(F.coactivation_heatmap(a.coactivation, layer), key="coact")
    if not a.experts_per_token.empty:
        e2.plotly_chart(F.experts_per_token(a.experts_per_token, layer), key="ept")
    if not a.position_profile.empty:
        metric = st.radio("Cold-start metric", list(F.POSITION_METRICS), horizontal=True, key="pos_metric",
                          format_func=lambda k: F.POSITION_METRICS[k])
        st.plotly_chart(F.position_profile(a.position_profile, metric), key="pos")
        st.caption("Router behaviour by position in the document: the first tokens are often routed differently. "
                   "BOS, the same token at the start of every document, is shown apart.")

with tab_lat:
    el = a.expert_latents
    if el.empty:
        st.info("No expert_latents table (the analysis ran without an SAE or with too few tokens).")
    else:
        experts = sorted(int(e) for e in el[el["layer"] == layer]["expert"].unique())
        if not experts:
            st.info(f"No latents with enough tokens at layer {layer}.")
        else:
            ex = st.selectbox("Expert", experts, key="expert", format_func=lambda e: f"E{e}")
            d = el[(el["layer"] == layer) & (el["expert"] == ex)].sort_values("rank")
            t = d[["rank", "latent", "lift", "count"]].merge(
                ix.table[[c for c in ("latent", "density", "top_domain", "top_token") if c in ix.table]],
                on="latent", how="left")
            st.caption("The latents whose tokens this expert receives most often, over its base rate. "
                       "Click a row to open the latent.")
            event = st.dataframe(t, hide_index=True, width="stretch", key="expert_latents", on_select="rerun",
                                 selection_mode="single-row",
                                 column_config={"lift": st.column_config.NumberColumn("lift", format="%.2f"),
                                                "density": st.column_config.NumberColumn("density",
                                                                                         format="%.5f")})
            links = st.columns(5)
            for i, lat in enumerate(t["latent"].head(5)):
                links[i].page_link(PAGES["features"], label=f"latent {int(lat)}", icon=":material/link:",
                                   query_params={"feature": str(int(lat))})
            r = selected_row(event)
            if r is not None and r < len(t):
                open_feature(int(t.iloc[r]["latent"]))

with tab_con:
    contrast_tab(a)
with tab_sh:
    shared_tab(a)
with tab_why:
    pr = a.probe or {}
    rec, ef, ee = (pr.get(k) for k in ("recall", "expert_features", "expert_explanations"))
    if rec is None or rec.empty:
        st.info("No routing probe for this run: `routesae explain-routing RUN` predicts each token's experts from "
                "its latents and names each expert's predictive features.")
    else:
        st.caption("Recall@k of the token's routed experts on held-out tokens (split by context): the SAE latents "
                   "against the token's unigram and bigram expert frequencies and a linear probe on the raw "
                   "residual (an upper reference).")
        r = rec[rec["layer"] == layer].pivot_table(index="layer", columns="method", values="recall")
        st.dataframe(r, width="stretch", key="probe_recall")
        experts = sorted(int(e) for e in ef[ef["layer"] == layer]["expert"].unique()) if not ef.empty else []
        if experts:
            ex = st.selectbox("Expert", experts, key="probe_expert", format_func=lambda e: f"E{e}")
            row = ee[(ee["layer"] == layer) & (ee["expert"] == ex)] if not ee.empty else ee
            if not row.empty:
                st.markdown(f"**E{ex}:** {md_text(row['explanation'].iloc[0])}")
                st.caption(f"explained by {md_text(row['explainer'].iloc[0])} from its most predictive latents")
            d = ef[(ef["layer"] == layer) & (ef["expert"] == ex)].sort_values("rank")
            cols = [c for c in ("rank", "latent", "weight", "explanation") if c in d]
            st.dataframe(d[cols], hide_index=True, width="stretch", key="probe_features",
                         column_config={"weight": st.column_config.NumberColumn("probe weight", format="%.3f")})
            links = st.columns(5)
            for i, lat in enumerate(d["latent"].head(5)):
                links[i].page_link(PAGES["features"], label=f"latent {int(lat)}", icon=":material/link:",
                                   query_params={"feature": str(int(lat))})
