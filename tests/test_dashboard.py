"""The Streamlit dashboard (``dashboards/``): every page through ``AppTest`` on the synthetic analysis."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from routesae import dashboard  # noqa: E402
from routesae.browser import Browser, find_chromium  # noqa: E402
from tests.analysis_fixture import N_LATENTS, make_analysis  # noqa: E402
from tests.ranks import free_port  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"
TIMEOUT = 60


@pytest.fixture
def run(tmp_path, monkeypatch) -> Path:
    r = make_analysis(tmp_path)
    monkeypatch.setenv(dashboard.RUN_ENV, str(r))
    monkeypatch.delenv(dashboard.MODEL_ENV, raising=False)
    return r


def app(query: dict[str, str] | None = None, page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


def html_markdown(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.allow_html]


def assert_no_raw_html(at: AppTest) -> None:
    """Corpus strings never reach the page as HTML: no raw ``<script`` in any markdown/caption body."""
    for m in [*at.markdown, *at.caption]:
        body = m.value.lower()
        if m.allow_html:
            assert "<script" not in body and "</div><" not in body.replace("</div><div", ""), m.value[:300]
        else:  # plain markdown: special characters backslash-escaped
            assert not re.search(r"(?<!\\)<script", body), m.value[:300]


# ---------------------------------------------------------------- launcher


def test_launcher_command_and_errors(tmp_path, monkeypatch):
    assert (dashboard.dashboards_dir() / "app.py").is_file()
    cmd = dashboard.command(tmp_path, port=8600)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("dashboards/app.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    assert cmd[cmd.index("--client.disableDataExport") + 1] == "true"  # no raw-text CSV from st.dataframe
    with pytest.raises(dashboard.DashboardError, match="routesae analyze"):
        dashboard.launch(tmp_path / "nope")
    run = make_analysis(tmp_path)
    seen = {}

    def fake_supervise(cmd, env):
        seen.update(cmd=cmd, env=env)
        return 0

    monkeypatch.setattr(dashboard, "supervise", fake_supervise)
    assert dashboard.launch(run, port=8777, host="0.0.0.0", model="/m") == 0
    assert seen["env"][dashboard.RUN_ENV] == str(run.resolve()) and seen["env"][dashboard.MODEL_ENV] == "/m"
    assert seen["cmd"][seen["cmd"].index("--server.address") + 1] == "0.0.0.0"
    with pytest.raises(dashboard.DashboardError, match="port"):
        dashboard.launch(run, port=0)


def test_missing_dashboards_dir_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "site-packages" / "routesae" / "__init__.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    monkeypatch.setattr(dashboard.routesae, "__file__", str(fake))
    with pytest.raises(dashboard.DashboardError, match="editable"):
        dashboard.dashboards_dir()


def test_no_run_says_how_to_start(monkeypatch):
    monkeypatch.delenv(dashboard.RUN_ENV, raising=False)
    at = app()
    assert any("routesae dashboard RUN" in e.value for e in at.error)


def test_run_without_analysis(tmp_path, monkeypatch):
    monkeypatch.setenv(dashboard.RUN_ENV, str(tmp_path))
    at = app()
    assert any("routesae analyze" in e.value for e in at.error)


# ---------------------------------------------------------------- pages


def test_overview(run):
    at = app()
    assert titles(at) == ["Overview"]
    labels = {m.label: m.value for m in at.metric}
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert labels["interpretable"] == str(summary["interpretable"]) and labels["dead"] == "1"
    assert labels["latents"] == str(N_LATENTS)
    assert len(at.get("plotly_chart")) >= 1  # routed-layer histogram (no metrics.jsonl in the fixture)
    assert any("metrics.jsonl" in i.value for i in at.info)
    assert any("nmse" in str(d.value.to_dict()) for d in at.dataframe)
    assert_no_raw_html(at)


def test_overview_training_curves(run):
    lines = [{"step": s, "tokens": s * 100, "lr": 1e-3, "loss": 1 / (s + 1), "nmse": 0.5 / (s + 1), "aux": 0.0,
              "l0": 8.0, "dead_frac": 0.1, "routed_hist": None, "tokens_per_s": 1e4} for s in range(0, 50, 10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    at = app()
    assert len(at.get("plotly_chart")) >= 6  # loss, nmse, l0, dead_frac, aux, tokens/s + routed layers
    at.toggle(key="log_y").set_value(True).run()
    assert not at.exception


def test_features_table_search_and_sort(run):
    at = app(page="views/features.py")
    assert titles(at) == ["Features"]
    table = at.dataframe[0].value
    assert len(table) == N_LATENTS - 1  # dead latent hidden by default
    at.text_input(key="q").input("script").run()
    assert sorted(at.dataframe[0].value["latent"]) == [0, 10]
    at.text_input(key="q").input("").run()
    at.toggle(key="live").set_value(False).run()
    at.selectbox(key="sort").set_value("latent").run()
    at.toggle(key="desc").set_value(False).run()
    assert list(at.dataframe[0].value["latent"]) == list(range(N_LATENTS))
    at.toggle(key="interp").set_value(True).run()
    assert at.dataframe[0].value["interpretable"].all()
    assert_no_raw_html(at)


def test_feature_page_by_query_param(run):
    at = app({"feature": "3"})
    assert titles(at) == ["Latent 3"]
    labels = {m.label for m in at.metric}
    assert {"density", "max act", "top domain", "routed layer", "top expert"} <= labels
    assert len(at.get("plotly_chart")) >= 5  # histogram, routed layers, domain lift, expert lift, logit lens
    links = at.get("page_link")
    assert len(links) == 10 and all("features" in str(x.proto.page) for x in links)
    ctx = html_markdown(at)
    assert ctx and all("rs-ctx" in h for h in ctx)
    assert len(at.tabs) >= 6  # top + 5 quantile bins
    # prev / next / back
    at.button(key="next").click().run()
    assert titles(at) == ["Latent 4"] and at.query_params["feature"] in ("4", ["4"])
    at.button(key="back").click().run()
    assert titles(at) == ["Features"] and "feature" not in at.query_params


def test_feature_query_param_on_features_page_and_goto(run):
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("views/features.py").run()
    at.number_input(key="goto_latent").set_value(5)
    at.button[-1].click().run()  # the form's submit button
    assert titles(at) == ["Latent 5"]


def test_feature_unknown_and_dead(run):
    at = app({"feature": "999"})
    assert any("not in this analysis" in w.value for w in at.warning)
    at = app({"feature": "11"})
    assert titles(at) == ["Latent 11"] and any("dead" in i.value for i in at.info)
    at = app({"feature": "abc"})
    assert titles(at) == ["Overview"]


def test_hostile_corpus_strings_are_escaped(run):
    found_escaped = False
    for latent in range(N_LATENTS):
        at = app({"feature": str(latent)})
        assert_no_raw_html(at)
        found_escaped |= any("&lt;script&gt;alert(1)&lt;/script&gt;" in h for h in html_markdown(at))
    assert found_escaped, "the <script> token of the fixture was expected in some context, escaped"
    for page in ("views/overview.py", "views/features.py", "views/experts.py", "views/export.py"):
        assert_no_raw_html(app(page=page))


def test_experts(run):
    at = app(page="views/experts.py")
    assert titles(at) == ["Experts"]
    assert len(at.get("plotly_chart")) >= 7
    assert at.selectbox(key="layer").options == ["layer 1", "layer 3"]
    at.selectbox(key="layer").set_value(3).run()
    at.get("button_group")[0].set_value("top-1 share").run()
    assert not at.exception
    at.radio(key="pos_metric").set_value("max_share").run()
    assert not at.exception
    # expert 3 of layer 3 collapses in the fixture: flagged
    assert any(len(d.value) and "flag" in d.value.columns for d in at.dataframe)
    lat = [d.value for d in at.dataframe if "lift" in d.value.columns and "rank" in d.value.columns]
    assert lat and len(lat[0]) > 0
    assert 0 < len(at.get("page_link")) <= 5  # the expert's top latents, linked to their pages
    assert_no_raw_html(at)


def test_export(run):
    at = app(page="views/export.py")
    assert titles(at) == ["Export"]
    assert len(at.get("download_button")) == 4
    assert any("expert_domain" in str(d.value) for d in at.dataframe)


def test_export_payloads(run):
    """The deferred download payloads of the Export page: HTML, Markdown, JSON and the CSV zip."""
    import io
    import sys
    import zipfile

    sys.path.insert(0, str(APP.parent))
    try:
        from common import EXPORTS, report_bytes
    finally:
        sys.path.remove(str(APP.parent))
    from routesae.report.load import load_analysis

    a = load_analysis(run)
    assert set(EXPORTS) == {"html", "md", "csv", "json"}
    html = report_bytes(a, "html", 3).decode()
    assert html.startswith("<!DOCTYPE html>") and "<script>alert(1)</script>" not in html
    assert "# " in report_bytes(a, "md", 3).decode()
    assert json.loads(report_bytes(a, "json", 3))["counts"]["n_latents"] == N_LATENTS
    names = zipfile.ZipFile(io.BytesIO(report_bytes(a, "csv"))).namelist()
    assert "tables/latents.csv" in names and "tables/contexts.csv" in names
    with pytest.raises(ValueError):
        report_bytes(a, "pdf")


@pytest.mark.parametrize("drop", ["features", "experts"])
def test_partial_analysis(run, drop):
    """An analysis without feature tables (no SAE) or without expert tables (no router records) still renders."""
    from tests.analysis_fixture import TABLES

    gone = [t for t in TABLES if (t in ("latents", "contexts", "latent_domains", "latent_experts", "expert_latents"))
            == (drop == "features")]
    for t in gone:
        (run / "analysis" / f"{t}.parquet").unlink()
    for page in (None, "views/features.py", "views/experts.py", "views/tokens.py", "views/export.py"):
        app(page=page)
    at = app({"feature": "2"})
    if drop == "features":
        assert any("not in this analysis" in w.value for w in at.warning)
    else:
        assert titles(at) == ["Latent 2"]


# ---------------------------------------------------------------- token explorer


@pytest.fixture
def run_with_model(run, tiny_ckpt) -> tuple[Path, Path]:
    from routesae.sae import SAEConfig, build_sae

    ckpt = tiny_ckpt("olmoe")
    sae = build_sae(SAEConfig(arch="routesae", d_in=32, n_latents=64, k=4, layers=[0, 1, 2],
                              meta={"model": str(ckpt)}))
    sae.save_pretrained(run)
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    summary["model"] = str(ckpt)
    (run / "analysis" / "summary.json").write_text(json.dumps(summary))
    return run, ckpt


def test_token_explorer_without_model(run):
    at = app(page="views/tokens.py")
    assert titles(at) == ["Token explorer"]
    assert any("No model found" in i.value for i in at.info)


def test_token_explorer(run_with_model):
    run, ckpt = run_with_model
    at = app(page="views/tokens.py")
    assert titles(at) == ["Token explorer"]
    assert not at.get("plotly_chart")  # nothing heavy before Run
    at.text_area(key="text").input("<script>alert(1)</script> def f(x): return x")
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 2  # experts heatmap, RouteSAE router
    per_token = at.dataframe[0].value
    assert {"token", "routed layer", "top latents", "L0 experts", "L3 experts"} <= set(per_token.columns)
    assert set(per_token["routed layer"]) <= {0, 1, 2}
    assert len(at.dataframe) == 2 and len(at.dataframe[1].value) > 0
    assert_no_raw_html(at)
    # a second run of the same text is served from the cache (the model is not reloaded)
    at.button[0].click().run()
    assert not at.exception


# ---------------------------------------------------------------- end to end (headless Chromium, if installed)


ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # git-ignored screenshots of the browser test


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH (apt-get install -y chromium)")
def test_end_to_end_headless_chromium(run_with_model, tmp_path):
    """A real server (``routesae.dashboard.command``) and a real browser: pages, permalink, escaping, and text
    typed into the Token explorer run through a real (tiny, random) OLMoE and the run's RouteSAE."""
    import os
    import subprocess
    import time
    import urllib.request

    from transformers import AutoTokenizer

    pytest.importorskip("websockets")
    run, ckpt = run_with_model
    port = free_port()
    env = {**os.environ, dashboard.RUN_ENV: str(run)}
    server = subprocess.Popen(dashboard.command(run, port=port), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the dashboard did not start")
        browser = Browser(tmp_path / "chrome")
        text, html = browser.page_when(f"{url}/features?feature=0", "Latent 0")
        assert "Contexts" in text and "Nearest latents" in text
        assert "<script>alert(1)</script>" in text  # the hostile token is shown as text ...
        assert "<script>alert(1)</script>" not in html  # ... and never as markup
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        browser.screenshot(ARTIFACTS / "feature.png")
        text, _ = browser.page_when(f"{url}/?feature=3", "Latent 3")  # the root permalink redirects
        text, _ = browser.page_when(f"{url}/", "interpretable")  # the default page lives at the root
        assert "Training" in text and "Evaluation" in text, text
        text, _ = browser.page_when(f"{url}/experts", "Specialisation")
        browser.screenshot(ARTIFACTS / "experts.png")
        text, _ = browser.page_when(f"{url}/tokens", "Press Run")
        typed = "Zebras quietly <b>jump</b> over 42 lazy foxes."
        browser.type_into("[data-testid=stForm] textarea", typed)
        browser.click_button("Run")
        text, _ = browser.wait_for("latents fired on", timeout=120)
        tok = AutoTokenizer.from_pretrained(ckpt)
        n_tokens = 1 + len(tok(typed, add_special_tokens=False)["input_ids"])  # BOS + the typed text, not the default
        assert f"{n_tokens} tokens · MoE layers 0, 1, 2, 3 · SAE layers 0, 1, 2" in text, text[:2000]
        assert f"latents fired on {n_tokens} tokens" in text and "Per token" in text
        plots = browser.js_when("(() => { const p = [...document.querySelectorAll('.js-plotly-plot')]; "
                                "return p.length >= 2 ? p.map(x => x.textContent) : null; })()")  # drawn lazily
        assert plots and len(plots) == 2, plots  # the experts chosen per token (routing) and the RouteSAE router
        assert "experts chosen per token" in plots[0] and "MoE layer" in plots[0]
        assert "RouteSAE router" in plots[1]
        # two tables (lazily loaded): per token (routed layer, top latents, experts), and the latents that fired
        assert browser.js_when("document.querySelectorAll('[data-testid=stDataFrame]').length === 2")
        browser.screenshot(ARTIFACTS / "tokens.png")
        text, _ = browser.page_when(f"{url}/export", "report.html")
        assert all((ARTIFACTS / f"{name}.png").stat().st_size > 10_000 for name in ("feature", "experts", "tokens"))
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        try:
            server.wait(timeout=60)  # Streamlit can take tens of seconds to stop on a busy machine
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


def test_explanations_and_routing_probe(run):
    """RUN/explanations and RUN/routing_probe (routesae explain / explain-routing): the feature page's header with
    its label, the features table's explanation columns and search, the experts page's probe tab; all escaped."""
    import pandas as pd

    ex = run / "explanations"
    ex.mkdir()
    pd.DataFrame({"latent": [3, 4], "explanation": ["<script>alert(2)</script> *plural* nouns", "dates"],
                  "explainer": ["llm:m", "tokens"], "created": ["1", "1"]}).to_parquet(ex / "explanations.parquet")
    pd.DataFrame({"latent": [3, 3], "explainer": ["llm:m"] * 2, "scorer": ["detection", "fuzzing"],
                  "judge": ["llm:m"] * 2, "accuracy": [0.8, 0.6], "auc": [0.9, 0.7]}).to_parquet(ex / "scores.parquet")
    pr = run / "routing_probe"
    pr.mkdir()
    pd.DataFrame({"layer": [1, 1, 3, 3], "method": ["unigram", "latents"] * 2, "recall": [0.5, 0.6, 0.4, 0.7],
                  "k": 2}).to_parquet(pr / "recall.parquet")
    pd.DataFrame({"layer": [3, 3], "expert": [0, 0], "rank": [0, 1], "latent": [3, 4], "weight": [0.5, 0.2],
                  "explanation": ["<b>x</b>", "dates"]}).to_parquet(pr / "expert_features.parquet")
    pd.DataFrame({"layer": [3], "expert": [0], "explanation": ["<i>numbers</i>"], "explainer": ["tokens"],
                  "latents": [[3, 4]]}).to_parquet(pr / "expert_explanations.parquet")
    at = app({"feature": "3"})
    assert any("plural" in m.value and "\\<script" in m.value for m in at.markdown)  # the header, escaped
    assert any("LLM m, judged by LLM m: detection AUC 0.90, fuzzing AUC 0.70" in c.value.replace("\\", "")
               for c in at.caption)
    assert_no_raw_html(at)
    at = app(page="views/features.py")
    table = at.dataframe[0].value
    assert {"explanation", "detection_auc", "explanation_label"} <= set(table.columns)
    at.text_input(key="q").set_value("dates").run()
    assert at.dataframe[0].value["latent"].tolist() == [4]
    at = app(page="views/experts.py")
    at.selectbox(key="layer").set_value(3).run()
    assert any("latents" in d.value.columns and "unigram" in d.value.columns for d in at.dataframe)
    assert any("\\<i\\>numbers" in m.value for m in at.markdown)
    assert any("weight" in d.value.columns for d in at.dataframe)
    assert_no_raw_html(at)
