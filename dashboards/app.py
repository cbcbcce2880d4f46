"""routesae dashboard: ``routesae dashboard RUN`` (or ``streamlit run dashboards/app.py -- RUN``).

A multipage app (``st.navigation``) over the stored analysis of one run; pages live in ``views/``.
``/?feature=N`` (on any page but the feature page) opens the feature page of latent N.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the pages import ``common`` from this folder
    sys.path.insert(0, str(HERE))

from common import PAGES, feature_param, md_text, run_arg  # noqa: E402

from routesae.report.load import display_path  # noqa: E402

st.set_page_config(page_title="routesae dashboard", page_icon=":material/hub:", layout="wide")

pages = {
    "overview": st.Page(PAGES["overview"], title="Overview", icon=":material/dashboard:", url_path="overview",
                        default=True),
    "features": st.Page(PAGES["features"], title="Features", icon=":material/lightbulb:", url_path="features"),
    "experts": st.Page(PAGES["experts"], title="Experts", icon=":material/account_tree:", url_path="experts"),
    "tokens": st.Page(PAGES["tokens"], title="Token explorer", icon=":material/text_fields:", url_path="tokens"),
    "routing": st.Page(PAGES["routing"], title="Dynamic routing", icon=":material/alt_route:", url_path="routing"),
    "steer": st.Page(PAGES["steer"], title="Steer", icon=":material/tune:", url_path="steer"),
    "export": st.Page(PAGES["export"], title="Export", icon=":material/download:", url_path="export"),
}
page = st.navigation(list(pages.values()))
if run_arg():
    st.sidebar.caption(f"run: {md_text(Path(run_arg()).expanduser().name)}  \n{md_text(display_path(run_arg()))}")
if page.url_path in ("", "overview") and feature_param() is not None:  # /?feature=N is a permalink too
    st.switch_page(pages["features"], query_params={"feature": str(feature_param())})
t0 = time.perf_counter()
page.run()
# server time of the page script (read by bench/dashboard.py); st.stop() inside a page skips it
st.session_state["_render_ms"] = (time.perf_counter() - t0) * 1000
