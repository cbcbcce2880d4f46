"""Dynamic routing: how many experts each token needs, top-p experts per token, expert ablation (RUN/routing/)."""

from __future__ import annotations

import streamlit as st
from common import get_analysis, md_text, visible

from routesae.report import routing as R

a, ix = get_analysis()
st.title("Dynamic routing")
r = a.routing
if r is None:
    st.info("No dynamic-routing results for this run. Make them with `routesae analyze-routing MODEL --corpus "
            "CORPUS --out RUN/routing` (see docs/guide.md, 'Dynamic routing').")
    st.stop()
s = r.summary
st.caption(f"{s.get('tokens', 0):,} tokens of {md_text(s.get('corpus'))} ({md_text(s.get('split'))}); model "
           f"top-{s.get('top_k')} of {s.get('n_experts')} experts. A token needs k' experts when top-k' at every "
           "MoE layer keeps its next-token distribution within KL eps (nats) of the model's own routing.")
eps_list = list(s.get("eps") or [r.eps])
saved = s.get("compute_saved") or {}
for col, e in zip(st.columns(len(eps_list)), eps_list):
    col.metric(f"compute saved, eps {e:g}", f"{float(saved.get(f'{e:g}', float('nan'))):.1%}")

c1, c2 = st.columns(2)
eps = c1.selectbox("KL epsilon (nats)", eps_list, index=eps_list.index(r.eps) if r.eps in eps_list else 0,
                   key="eps", format_func=lambda e: f"{e:g}")
p_grid = list(s.get("p_grid") or [])
p = c2.selectbox("top-p", p_grid, index=p_grid.index(0.5) if 0.5 in p_grid else 0, key="p") if p_grid else None

tab_need, tab_topp, tab_abl, tab_tok = st.tabs(["Needed experts", "Top-p", "Expert ablation", "Tokens"])
with tab_need:
    st.dataframe(R.needed_experts_table(r, eps), hide_index=True, width="stretch")
    d1, d2 = st.columns(2)
    d1.plotly_chart(R.needed_experts_figure(r, eps), key="needed")
    d2.plotly_chart(R.compute_saved_figure(r), key="saved")
    d1.plotly_chart(R.needed_by_layer_figure(r, eps), key="by_layer")
    d2.plotly_chart(R.loss_by_k_figure(r), key="loss_k")
with tab_topp:
    if p is not None:
        st.plotly_chart(R.topp_experts_figure(r, p), key="topp_dist")
    st.plotly_chart(R.topp_mean_figure(r), key="topp_mean")
    st.dataframe(r.table("topp"), hide_index=True, width="stretch")
with tab_abl:
    ab = r.table("ablation")
    if ab.empty:
        st.info("No expert ablation in these results (--ablate-layers none).")
    else:
        layers = sorted(int(x) for x in ab["layer"].unique())
        layer = st.selectbox("MoE layer", layers, key="abl_layer", format_func=lambda j: f"layer {j}")
        st.plotly_chart(R.ablation_figure(r, layer), key="ablation")
        st.markdown("**Experts each domain depends on** (CE increase when removed)")
        st.dataframe(R.top_ablations(r), hide_index=True, width="stretch")
with tab_tok:
    tok = r.table("tokens")
    if not tok.empty:
        col = f"needed_k_eps{eps:g}"
        view = tok.assign(token=tok["token"].map(visible))
        st.dataframe(view[[c for c in ("token", "domain", "doc_id", "ctx_pos", col) if c in view]].head(2000),
                     hide_index=True, width="stretch")
        st.caption("First 2000 analysed tokens with the experts each needs (text shown as plain cells).")
