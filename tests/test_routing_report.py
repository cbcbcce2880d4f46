"""Dynamic-routing results in the report and on the dashboard's "Dynamic routing" page (hostile corpus text)."""

from __future__ import annotations

import json

import pytest

from routesae.analyze.routing import RoutingAnalysisConfig, analyze_routing
from tests.analysis_fixture import make_analysis
from tests.test_routing import one_thread  # noqa: F401  (fixture: one torch thread in this module)

HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def routing_run(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing-run")
    corpus = tmp / "hostile.jsonl"
    docs = [{"text": "def f(x):\n    return x <b>bold</b> " * 3, "domain": "code"},
            {"text": "The fox & the <i>dog</i> sleep. " * 3, "domain": HOSTILE}]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    run = make_analysis(tmp)
    analyze_routing(RoutingAnalysisConfig(
        model=str(tiny_ckpt("olmoe")), corpus=str(corpus), out=str(run / "routing"), max_tokens=96, ctx=24,
        batch_size=4, packing="pad", k_grid=[1, 2, 8], p_grid=[0.5, 0.9], per_layer="1", ablate_layers="2",
        ablate_experts=[0, 1, 2], device="cpu", progress=False))
    return run


def test_report_has_an_escaped_dynamic_routing_section(routing_run, tmp_path):
    from routesae.report import ReportConfig, build_report

    paths = build_report(ReportConfig(run=str(routing_run), formats="html,md", out=str(tmp_path / "rep")))
    html = paths["report.html"].read_text()
    assert "id='routing'" in html and "Needed experts by domain" in html and "Expert ablation" in html
    assert HOSTILE not in html and "alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    md = paths["report.md"].read_text()
    assert "## Dynamic routing" in md and "Mean experts per token under top-p" in md
    from routesae.report import load_analysis
    from routesae.report.findings import routing_finding
    from routesae.report.routing import needed_experts_table

    f = routing_finding(load_analysis(routing_run))  # a key finding, equal to the "all" row of its table
    row = needed_experts_table(load_analysis(routing_run).routing).set_index("domain").loc["all"]
    assert f.values["compute_saved"] == row["compute saved"] and f.values["mean_needed_k"] == row["mean k'"]
    assert f.text.startswith("Dynamic routing: tokens need on average k' = ")
    for text in (html, md):
        assert "Dynamic routing: tokens need on average" in text and "(#dynamic-routing)" in md
    assert HOSTILE not in md


def test_dashboard_page(routing_run, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from routesae import dashboard
    from tests.test_dashboard import APP, TIMEOUT, assert_no_raw_html

    monkeypatch.setenv(dashboard.RUN_ENV, str(routing_run))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("views/routing.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Dynamic routing"]
    assert len(at.get("plotly_chart")) >= 6 and len(at.metric) == 3
    at.selectbox(key="eps").set_value(0.1).run()
    at.selectbox(key="abl_layer").set_value(2).run()
    assert not at.exception
    tokens = [d.value for d in at.dataframe if "needed_k_eps0.1" in d.value.columns]
    assert tokens and HOSTILE in set(tokens[0]["domain"])  # plain cells, never HTML
    assert_no_raw_html(at)
    (routing_run / "routing" / "summary.json").unlink()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("views/routing.py").run()
    assert not at.exception and "analyze-routing" in at.info[0].value
