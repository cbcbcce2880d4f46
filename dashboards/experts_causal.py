"""The Experts page's causal tabs: behaviour-linked experts (contrast) and shared versus routed computation.

Contrast: ``analysis/contrast.parquet`` (``routesae analyze RUN --contrast A:B``); the button turns the top
experts into an expert-steering setting and opens the Steer page with it. Shared: ``RUN/shared/``
(``routesae analyze-shared MODEL --out RUN/shared``). Tables only (``st.dataframe`` escapes their text).
"""

from __future__ import annotations

import streamlit as st
from common import PAGES, md_text

from routesae.report.load import Analysis


def contrast_tab(a: Analysis) -> None:
    from routesae.causal.contrast import steering_setting

    if a.contrast.empty:
        st.info("No contrast in this analysis. Rank experts by how much more often one domain uses them than "
                "another with `routesae analyze RUN --contrast math:legal` (or `routesae contrast MODEL --a ... "
                "--b ...` for two text files).")
        return
    info = a.settings.get("contrast") or {}
    da, db = info.get("a", "A"), info.get("b", "B")
    st.caption(f"Activation rate of each (layer, expert): the share of tokens with the expert among their top-k "
               f"choices, in A = {md_text(da)} and B = {md_text(db)}, and the difference (SteerMoE's risk "
               f"difference). z treats tokens as independent (they are not): an order of magnitude, not a test.")
    st.dataframe(a.contrast, hide_index=True, width="stretch", key="contrast_table",
                 column_config={c: st.column_config.NumberColumn(c, format="%.4f")
                                for c in ("rate_a", "rate_b", "risk_diff", "z")})
    c1, c2, c3, c4 = st.columns(4, vertical_alignment="bottom")
    top = c1.number_input("Top experts", 1, 64, 4, key="contrast_top")
    bias = c2.number_input("Router-logit bias", -20.0, 20.0, 2.0, step=0.5, key="contrast_bias")
    toward = c3.segmented_control("Toward", ["a", "b"], default="a", key="contrast_toward",
                                  format_func=lambda s: da if s == "a" else db) or "a"
    setting = steering_setting(a.contrast, int(top), float(bias), toward=toward)
    st.code(setting, language=None)
    if c4.button("Steer with these experts", icon=":material/tune:", key="contrast_steer"):
        st.session_state["steer_experts"] = setting
        st.switch_page(PAGES["steer"])


def shared_tab(a: Analysis) -> None:
    if not a.shared:
        st.info("No shared/routed split for this run. For a model with shared experts (Qwen2-MoE, Qwen3-Next, "
                "DeepSeek-V3) run `routesae analyze-shared MODEL --corpus CORPUS --out RUN/shared`.")
        return
    s = a.shared.get("summary") or {}
    st.caption(f"{md_text(s.get('tokens'))} tokens of {md_text(s.get('corpus'))}: share_norm = ‖s‖ / (‖s‖ + ‖r‖) "
               "of the always-on path s and the routed experts' sum r; share_proj = ⟨s, y⟩ / ‖y‖² of the block "
               "output y = s + r; gate = the shared expert's sigmoid gate where there is one.")
    for name, title in (("shared_layer", "By layer"), ("shared_domain", "By layer and domain"),
                        ("shared_position", "By position in the document (cold start)")):
        df = a.shared.get(name)
        if df is not None and not df.empty:
            st.markdown(f"**{title}**")
            st.dataframe(df, hide_index=True, width="stretch", key=f"shared_{name}")
