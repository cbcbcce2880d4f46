"""Steer: clamp / scale latents and bias / force / forbid experts; the clean and the steered generation side by side.

Wraps :func:`routesae.causal.steer_compare` (the same call as ``routesae steer``). The model and the
SAE load once per process (``common.load_lm`` / ``common.load_run_sae``) and only when the user
presses *Steer*; results are cached per request. The Experts page's *Steer with these experts* button
fills the expert field (``st.session_state["steer_experts"]``). All text (prompt, generations,
tokens) is shown through ``st.code`` / ``st.dataframe`` or markdown-escaped, never as HTML.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
from common import get_analysis, load_lm, load_run_sae, md_text, model_path, sae_mtime, visible

DEFAULT_PROMPT = "Natalia sold 48 clips in April, and then she sold"


@st.cache_data(show_spinner="Generating (clean and steered) ...", max_entries=32)
def run_steer(run: str, mtime: float, model: str, prompt: str, features: str, experts: str, max_new: int,
              temperature: float, seed: int) -> dict:
    from routesae.causal import GenerateConfig, Steering, steer_compare

    lm, tok, lock = load_lm(model)
    sae = load_run_sae(run, mtime) if features.strip() else None
    with lock:  # hooks are per call; one steered forward at a time per process
        steering = Steering.build(sae, features or None, experts or None, model=lm)
        return steer_compare(lm, tok, prompt, steering, GenerateConfig(max_new, temperature, None, seed))


def per_token(side: dict, n_prompt: int) -> pd.DataFrame:
    """One row per token of a generation: the token, each MoE layer's experts, the steered latents' values."""
    toks = side["tokens"]
    df = pd.DataFrame({"pos": range(len(toks)), "part": ["prompt" if i < n_prompt else "generated"
                                                         for i in range(len(toks))],
                       "token": [visible(t) for t in toks]})
    for layer, r in side["routing"].items():
        df[f"L{layer} experts"] = [", ".join(f"E{e}" for e in row if e >= 0) for row in r["experts"]]
    for latent, v in (side.get("latents") or {}).items():
        df[f"latent {latent}"] = v["before"]
        if v["after"] != v["before"]:
            df[f"latent {latent} set"] = v["after"]
    return df


a, _ = get_analysis()
st.title("Steer")
st.caption("Change SAE latents (written into the residual, error term kept) or experts (router-logit bias, force, "
           "forbid) while the model generates; the clean generation uses the same prompt and sampling seed.")
model, source = model_path(a)
if model is None or not (Path(model).expanduser().exists() or model.count("/") == 1):
    st.info(f"No model found for this run ({md_text(source)}: {md_text(model or '-')}). Start the dashboard with "
            "ROUTESAE_MODEL=PATH to point at the checkpoint.")
    st.stop()
has_sae = (a.run / "sae.safetensors").is_file()
st.caption(f"model: {md_text(model)} (from {md_text(source)})" + (f" · SAE: {md_text(a.run)}" if has_sae else ""))

with st.form("steer"):
    prompt = st.text_area("Prompt", value=DEFAULT_PROMPT, height=90, max_chars=2000, key="steer_prompt")
    c1, c2 = st.columns(2)
    features = c1.text_input("Latents", key="steer_features", disabled=not has_sae,
                             placeholder="12=5, 40*0, 7+-2",
                             help="LATENT=V clamps, LATENT*V scales, LATENT+V shifts the latent (comma-separated)")
    experts = c2.text_input("Experts", key="steer_experts", placeholder="bias:3=2@layer2; forbid:5@layer4",
                            help="bias:E=B adds B to expert E's router logit, force:E puts it in every token's set, "
                                 "forbid:E removes it; @layerN / @layersA:B picks layers (default all)")
    d1, d2, d3 = st.columns(3)
    max_new = d1.slider("New tokens", 1, 64, 24, key="steer_max_new")
    temperature = d2.number_input("Temperature (0: greedy)", 0.0, 2.0, 0.0, step=0.1, key="steer_temperature")
    seed = d3.number_input("Seed", 0, 2**31 - 1, 0, key="steer_seed")
    go = st.form_submit_button("Steer", type="primary", icon=":material/tune:")
if go:
    st.session_state["steer_args"] = (prompt, features if has_sae else "", experts, int(max_new), float(temperature),
                                      int(seed))
args = st.session_state.get("steer_args")
if not args:
    st.caption("Press Steer: the model loads on first use (once per dashboard process).")
    st.stop()
try:
    r = run_steer(str(a.run), sae_mtime(a.run), model, *args)
except ValueError as exc:  # a request that cannot be applied: one line naming the fix
    st.error(str(exc).splitlines()[0])
    st.stop()

left, right = st.columns(2)
left.markdown("**Clean**")
left.code(r["clean"]["text"], language=None, wrap_lines=True)
right.markdown("**Steered** · " + md_text(", ".join(r["steering"]["features"] + [r["steering"]["experts"] or ""])
                                          .strip(", ")))
right.code(r["steered"]["text"], language=None, wrap_lines=True)
nt = r["next_token"]
m1, m2 = st.columns(2)
m1.metric("KL(clean ‖ steered), next token after the prompt", f"{nt['kl_last']:.4f}")
m2.metric("KL, mean over the prompt's positions", f"{nt['kl_mean']:.4f}")
u, d = st.columns(2)
for col, key, title in ((u, "top_up", "Most raised"), (d, "top_down", "Most lowered")):
    t = pd.DataFrame(nt[key])
    t["token"] = t["token"].map(visible)
    col.markdown(f"**{title}** (next token after the prompt)")
    col.dataframe(t[["token", "p_clean", "p_steered", "change"]], hide_index=True, width="stretch", key=f"nt_{key}")
st.subheader("Per token")
n = r["prompt_tokens"]
tab_c, tab_s = st.tabs(["Clean", "Steered"])
tab_c.dataframe(per_token(r["clean"], n), hide_index=True, width="stretch", key="steer_clean_tokens")
tab_s.dataframe(per_token(r["steered"], n), hide_index=True, width="stretch", key="steer_steered_tokens")
st.caption("Experts: the set each MoE layer applied (under expert steering, the steered set). Latent columns: the "
           "SAE's value of the latent at the token (its routed layer for RouteSAE); 'set': the value written.")
