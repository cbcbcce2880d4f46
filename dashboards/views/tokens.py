"""Token explorer: type text; per token see the experts of every MoE layer, the routed layer, the top latents.

The model is the one the analysis used (see ``common.model_path``: ``ROUTESAE_MODEL``, then
``analysis/summary.json`` ``model``, then ``train_config.json`` ``store_summary.model.name_or_path``,
then ``config.json`` ``meta.model``) and the SAE is ``RUN/sae.safetensors``; both load once per process
(``st.cache_resource``) and only when the user presses *Run*. Results are cached per text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
import torch
from common import (
    get_analysis,
    load_lm,
    load_run_sae,
    md_text,
    model_path,
    open_feature,
    sae_mtime,
    selected_row,
    visible,
)
from figures_extra import routed_layer_strip, token_expert_heatmap

from routesae.report import facts

DEFAULT_TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog."
MAX_TOKENS = 256


@st.cache_data(show_spinner="Running the model and the SAE ...", max_entries=64)
def explore(run: str, mtime: float, model: str, text: str, max_tokens: int) -> dict:
    """Everything the page shows for one text (plain lists / arrays, cached)."""
    from routesae.capture import HFRunner

    lm, tok, lock = load_lm(model)
    sae = load_run_sae(run, mtime)
    c = sae.cfg
    bos = getattr(tok, "bos_token_id", None)
    ids = ([bos] if bos is not None else []) + list(tok(text, add_special_tokens=False)["input_ids"])
    ids = ids[:max_tokens]
    device = next(lm.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with lock:  # the hooks of a runner are per call; one forward at a time per process
        runner = HFRunner(lm, list(c.layers), want_logits=False)
        try:
            resid, route = runner(input_ids, torch.ones_like(input_ids))
        finally:
            runner.close()
        moe_layers = list(runner.moe_layers)
    resid = resid.float().cpu()  # [T, L', d]
    T = resid.shape[0]
    first = np.full((T, len(moe_layers)), -1, dtype=np.int64)
    hover = []  # [layer][token] "E3 (0.41), E5 (0.22)"
    for j, layer in enumerate(moe_layers):
        d = route[layer]
        idx, w = d.indices.cpu().numpy(), d.weights.float().cpu().numpy()
        first[:, j] = idx[:, 0]
        texts = []
        for t in range(T):
            parts = [f"E{int(e)} ({w[t, s]:.2f})" for s, e in enumerate(idx[t]) if e >= 0]
            texts.append(", ".join(parts) or "-")
        hover.append(texts)
    probs = None
    with torch.inference_mode():
        if c.arch == "routesae":
            p, pos = sae.route(resid)
            probs = p.numpy()
            val, lat = sae.encode(sae.sae_input(resid))
            routed = [c.layers[int(i)] for i in pos]
        elif c.arch == "topk":
            val, lat = sae.encode(sae.sae_input(resid[:, 0]))
            routed = [c.layers[0]] * T
        else:  # mlsae: every layer encoded; per token keep the strongest latents over all layers
            v, i = sae.encode(sae.sae_input(resid))
            L = len(c.layers)
            v, i = v.reshape(T, L * c.k), i.reshape(T, L * c.k)
            order = v.argsort(dim=1, descending=True)[:, :c.k]
            lay = (order // c.k).numpy()
            val, lat = v.gather(1, order), i.gather(1, order)
            routed = [c.layers[int(row[0])] for row in lay]
    val, lat = val.float().numpy(), lat.numpy()
    order = np.argsort(-val, axis=1)
    val, lat = np.take_along_axis(val, order, 1), np.take_along_axis(lat, order, 1)
    tokens = [tok.decode([i]) for i in ids]
    return {"tokens": tokens, "moe_layers": moe_layers, "first": first, "hover": hover,
            "sae_layers": list(c.layers), "probs": probs, "routed": routed, "val": val, "lat": lat,
            "n_experts": int(first.max()) + 1 if first.size else None}


a, ix = get_analysis()
st.title("Token explorer")
st.caption("Run the model and the SAE on your own text: per token, the experts every MoE layer picks, the layer "
           "RouteSAE routes it to, and its strongest latents.")
model, source = model_path(a)
sae_file = a.run / "sae.safetensors"
if model is None or not (Path(model).expanduser().exists() or model.count("/") == 1):
    st.info(f"No model found for this run ({md_text(source)}: {md_text(model or '-')}). Start the dashboard with "
            "ROUTESAE_MODEL=PATH to point at the checkpoint.")
    st.stop()
if not sae_file.is_file():
    st.info(f"No SAE weights in this run ({md_text(sae_file)}); the token explorer needs them.")
    st.stop()
st.caption(f"model: {md_text(model)} (from {md_text(source)}) · SAE: {md_text(a.run)}")

with st.form("explore"):
    text = st.text_area("Text", value=DEFAULT_TEXT, height=120, max_chars=4000, key="text")
    n = st.slider("Max tokens", 8, MAX_TOKENS, 96, step=8, key="max_tokens",
                  help="longer texts are cut; a BOS token is prepended as in capture")
    go = st.form_submit_button("Run", type="primary", icon=":material/play_arrow:")
if go:
    st.session_state["explore_args"] = (text, int(n))
args = st.session_state.get("explore_args")
if not args:
    st.caption("Press Run: the model loads on first use (once per dashboard process).")
    st.stop()
try:
    r = explore(str(a.run), sae_mtime(a.run), model, args[0], args[1])
except Exception as exc:  # noqa: BLE001 - a broken checkpoint or a mismatched SAE: say so on the page
    st.error(f"Could not run the model/SAE: {exc}")
    st.stop()

tokens = r["tokens"]
moe = f"MoE layers {md_text(', '.join(map(str, r['moe_layers'])))} · " if r["moe_layers"] else "dense model · "
st.markdown(f"**{len(tokens)} tokens** · {moe}SAE layers {md_text(', '.join(map(str, r['sae_layers'])))}")
if r["moe_layers"]:
    st.plotly_chart(token_expert_heatmap(tokens, r["moe_layers"], r["first"], r["hover"], r["n_experts"]),
                    key="tok_experts")
if r["probs"] is not None:
    st.plotly_chart(routed_layer_strip(tokens, r["sae_layers"], r["probs"]), key="tok_routed")

known = set(ix.latent_pos)
top_k = min(5, r["lat"].shape[1])
table = pd.DataFrame({
    "pos": range(len(tokens)), "token": [visible(t) for t in tokens], "routed layer": r["routed"],
    "top latents": [[f"{int(i)} ({v:.2f})" for i, v in zip(li[:top_k], vi[:top_k]) if v > 0]
                    for li, vi in zip(r["lat"], r["val"])],
    **{f"L{layer} experts": r["hover"][j] for j, layer in enumerate(r["moe_layers"])}})
st.subheader("Per token")
st.dataframe(table, hide_index=True, width="stretch", key="tok_table",
             column_config={"top latents": st.column_config.ListColumn("top latents (activation)")})

st.subheader("Latents in this text")
lat, val = r["lat"].ravel(), r["val"].ravel()
mask = val > 0
if not mask.any():
    st.caption("No latent fired.")
else:
    df = pd.DataFrame({"latent": lat[mask], "act": val[mask], "pos": np.repeat(np.arange(len(tokens)),
                                                                                r["lat"].shape[1])[mask]})
    g = df.groupby("latent").agg(max_act=("act", "max"), tokens=("pos", "nunique"),
                                 at=("pos", lambda p: ", ".join(visible(tokens[i]) for i in sorted(set(p))[:6])))
    g = g.sort_values("max_act", ascending=False).reset_index()
    g["in analysis"] = g["latent"].isin(known)
    if not ix.table.empty:
        g = g.merge(ix.table[[c for c in ("latent", "top_domain", "top_token") if c in ix.table]], on="latent",
                    how="left")
    st.caption("Click a row to open the latent's page.")
    ev = st.dataframe(g, hide_index=True, width="stretch", key="tok_latents", on_select="rerun",
                      selection_mode="single-row",
                      column_config={"max_act": st.column_config.NumberColumn("max act", format="%.3f"),
                                     "at": st.column_config.TextColumn("active at")})
    sel = selected_row(ev)
    if sel is not None and sel < len(g) and bool(g.iloc[sel]["in analysis"]):
        open_feature(int(g.iloc[sel]["latent"]))
    st.caption(f"{facts.num(len(g))} latents fired on {len(tokens)} tokens.")
