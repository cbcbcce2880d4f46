"""Overview: the model, corpus and SAE, training curves, evaluation, routed layers (entropy, margin), latent counts."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from common import PAGES, analysis_mtime, get_analysis, load_json, load_metrics, md_text
from figures_extra import TRAIN_METRICS, training_curve

from routesae.report import facts
from routesae.report import figures as F
from routesae.report import routed_layers as RL

a, ix = get_analysis()
s = a.summary

st.title("Overview")
st.caption(f"Run {md_text(a.run)} · analysis created {md_text(s.get('created') or '?')}")

# ---- cards
c1, c2, c3 = st.columns(3)
with c1.container(border=True):
    st.subheader("Model")
    st.markdown(f"**{md_text(a.model_name)}**")
    if a.has_experts:
        st.markdown(f"MoE layers: {md_text(', '.join(map(str, a.moe_layers)) or '-')}  \n"
                    f"experts per layer: {md_text(s.get('n_experts') or '-')} · router top-k: "
                    f"{md_text(s.get('top_k') or '-')}")
    else:
        st.markdown("Dense model (no MoE layers)")
with c2.container(border=True):
    st.subheader("Corpus")
    dom = s.get("domains") or {}
    st.markdown(f"**{facts.num(s.get('tokens') or a.settings.get('tokens'))} tokens analysed** · "
                f"{len(dom)} domains")
    if dom:
        st.dataframe(pd.DataFrame({"domain": list(dom), "tokens": list(dom.values())}), hide_index=True,
                     height=min(35 * (len(dom) + 1) + 3, 200))
    st.caption(f"store: {md_text(s.get('store') or a.eval.get('store') or '-')}")
with c3.container(border=True):
    st.subheader("SAE")
    c = a.config
    st.markdown(f"**{md_text(s.get('arch') or c.get('arch') or '?')}** · {facts.num(c.get('n_latents'))} latents · "
                f"k = {facts.num(c.get('k'))}  \nlayers: {md_text(facts.num(s.get('layers') or c.get('layers')))}")
    if c.get("arch") == "routesae":
        st.markdown(f"routing {md_text(c.get('routing'))} · router {md_text(c.get('router'))} · "
                    f"pooling {md_text(c.get('pooling'))}")

# ---- counts
st.subheader("Latents")
n = s.get("n_latents") or a.config.get("n_latents") or len(a.latents)
m = st.columns(5)
m[0].metric("latents", facts.num(n))
m[1].metric("interpretable", facts.num(s.get("interpretable")), help="the feature-counting protocol "
            "(analysis/feature_count.json)")
m[2].metric("dead", facts.num(s.get("dead_latents")), help="never active on the analysed tokens")
m[3].metric("dense", facts.num(s.get("dense_latents")), help="active on more than 10% of the tokens")
m[4].metric("feature count", facts.num(a.feature_count.get("count")))
st.page_link(PAGES["features"], label="Browse the features", icon=":material/arrow_forward:")

# ---- training
st.subheader("Training")
mt = analysis_mtime(a.run)
metrics = load_metrics(str(a.run), mt)
if metrics.empty:
    st.info("No RUN/metrics.jsonl: training curves unavailable.")
else:
    log_y = st.toggle("log scale", value=False, key="log_y")
    cols = st.columns(3)
    shown = [k for k in ("loss", "nmse", "l0", "dead_frac", "aux", "tokens_per_s") if k in metrics]
    for i, k in enumerate(shown):
        cols[i % 3].plotly_chart(training_curve(metrics, k, log_y and k != "dead_frac"), key=f"train_{k}")
    st.caption(", ".join(f"{k}: {v}" for k, v in TRAIN_METRICS.items() if k in shown))
tc = load_json(str(a.run / "train_config.json"), mt)
if tc:
    with st.expander("train_config.json"):
        st.json(tc, expanded=False)

# ---- evaluation
st.subheader("Evaluation")
rows = facts.metric_rows(a.eval)
if not rows:
    st.info("No RUN/eval.json: run `routesae evaluate RUN`.")
else:
    ev = pd.DataFrame(rows, columns=["group", "metric", "value"])
    ev["value"] = ev["value"].map(lambda v: facts.num(v))
    e1, e2 = st.columns([2, 3])
    e1.dataframe(ev, hide_index=True, width="stretch")
    per = facts.per_layer_rows(a.eval)
    if not per.empty:
        e2.caption("Reconstruction per SAE layer")
        e2.dataframe(per, hide_index=True, width="stretch")

# ---- routed layers (RouteSAE): histogram, entropy and margin (eval.json), curves over training (metrics.jsonl)
diag = RL.eval_diagnostics(a.eval)
h1, h2 = st.columns([3, 1]) if diag else (st.container(), None)
h1.plotly_chart(F.routed_layer_histogram(F.routed_layer_counts(a.eval, a.latents)), key="routed_hist")
h1.caption("How often each SAE layer is the routed one: tokens from eval.json, else latents by their top "
           "routed layer.")
if "entropy" in diag:
    h2.metric("routed-layer entropy H", f"{diag['entropy']:.2f}", help=RL.ENTROPY_HELP)
if "margin" in diag:
    h2.metric("router margin p1 - p2", f"{diag['margin']:.2f}", help=RL.MARGIN_HELP)
if not a.routing_log.empty:
    layers = a.config.get("layers") or a.eval.get("layers") or []
    t1, t2 = st.columns(2)
    t1.plotly_chart(RL.fractions_figure(a.routing_log, layers), key="routed_frac_train")
    t2.plotly_chart(RL.entropy_figure(a.routing_log), key="routed_entropy_train")

with st.expander("SAE config (config.json)"):
    st.dataframe(pd.DataFrame([(k, facts.num(v)) for k, v in facts.config_rows(a)], columns=["name", "value"]),
                 hide_index=True, width="stretch")
