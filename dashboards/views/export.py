"""Export: download the HTML, Markdown, CSV and JSON reports (rendered on demand, nothing written)."""

from __future__ import annotations

from functools import partial

import streamlit as st
from common import EXPORTS, get_analysis, report_bytes

a, ix = get_analysis()
st.title("Export")
st.caption("The reports of `routesae report RUN`, built from the stored analysis when you click a button. "
           "Nothing is written to the run folder.")
top = st.number_input("Features in the HTML / Markdown / JSON reports", min_value=0, max_value=500, value=30,
                      step=10, key="top_n")
name = a.run.name or "run"
HELP = {"html": "One self-contained page (plotly inlined, opens offline).",
        "md": "Tables and feature contexts as plain Markdown.",
        "csv": "Every analysis table as CSV, list cells as JSON strings (zip).",
        "json": "Machine-readable summary: metrics, counts, experts, top features."}
TITLE = {"html": "HTML", "md": "Markdown", "csv": "CSV", "json": "JSON"}

for col, (kind, (fname, mime)) in zip(st.columns(len(EXPORTS)), EXPORTS.items()):
    with col.container(border=True):
        st.markdown(f"**{TITLE[kind]}**")
        st.caption(HELP[kind])
        st.download_button(fname, partial(report_bytes, a, kind, int(top)), file_name=f"{name}-{fname}", mime=mime,
                           icon=":material/download:", key=f"dl_{kind}", on_click="ignore")

st.divider()
st.markdown("**Analysis tables**")
st.dataframe([{"table": k, "rows": len(v), "columns": len(v.columns)} for k, v in a.tables.items()],
             hide_index=True)
st.caption("`routesae report RUN` writes the same files (plus Neuronpedia batches) into RUN/report/.")
