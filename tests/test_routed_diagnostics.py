"""Routing diagnostics: route_stats by hand; routed-layer entropy and router margin in the report and on the
dashboard overview, from eval.json and metrics.jsonl; older files without the keys still render."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from routesae.report import ReportConfig, build_report, load_analysis
from routesae.report import routed_layers as RL
from routesae.sae.route_stats import count_layers, layer_fractions, margin_sum, normalised_entropy, routing_summary
from tests.analysis_fixture import make_analysis

ENTROPY, MARGIN = 0.8312, 0.4271
FRACS = [[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.34, 0.33, 0.33]]


def test_route_stats_by_hand():
    assert layer_fractions([2, 1, 1, 0]) == [0.5, 0.25, 0.25, 0.0]
    assert normalised_entropy([0.5, 0.25, 0.25, 0.0]) == pytest.approx(1.5 * math.log(2) / math.log(4))
    assert normalised_entropy([0.5, 0.25, 0.25, 0.0]) == pytest.approx(0.75)
    assert normalised_entropy([0.25] * 4) == pytest.approx(1.0) and normalised_entropy([1.0, 0.0]) == 0.0
    assert normalised_entropy([1.0]) == 0.0
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [0.1, 0.3, 0.6]])
    assert float(margin_sum(probs)) == pytest.approx(0.5 + 0.0 + 0.3)
    assert float(margin_sum(torch.ones(5, 1))) == 0.0
    s = routing_summary(count_layers(torch.tensor([0, 2, 2]), 3), float(margin_sum(probs)))
    assert s["fractions"] == pytest.approx([1 / 3, 0, 2 / 3]) and s["margin"] == pytest.approx(0.8 / 3)
    assert s["entropy"] == pytest.approx(-(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)) / math.log(3))
    assert routing_summary([0, 0], None) == {"fractions": [0.0, 0.0], "entropy": 0.0, "margin": None}


def _with_diagnostics(run: Path, log: bool = True) -> Path:
    """The synthetic run with entropy/margin in eval.json and routed_frac lines in metrics.jsonl."""
    ev = json.loads((run / "eval.json").read_text())
    ev["routed_layers"].update(entropy=ENTROPY, margin=MARGIN)
    (run / "eval.json").write_text(json.dumps(ev))
    if log:
        lines = [{"step": 0, "tokens": 0, "loss": 1.0, "routed_hist": None}]  # an older line: no routing keys
        lines += [{"step": s, "tokens": s * 1000, "loss": 0.5, "routed_frac": f,
                   "routed_entropy": -sum(x * math.log(x) for x in f) / math.log(3), "router_margin": 0.1 * s}
                  for s, f in zip((10, 20, 30), FRACS)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n[1]\n")
    return run


def test_routing_log_reads_only_lines_with_the_keys(tmp_path):
    run = _with_diagnostics(make_analysis(tmp_path))
    log = load_analysis(run).routing_log
    assert log["x"].tolist() == [10_000, 20_000, 30_000] and log.attrs["x"] == "tokens"
    assert [list(v) for v in log["routed_frac"]] == FRACS
    assert log["router_margin"].tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert RL.over_training_line(log).startswith("over training (metrics.jsonl): routed-layer entropy ")
    assert load_analysis(make_analysis(tmp_path / "old")).routing_log.empty  # no metrics.jsonl
    assert RL.routing_log(RL.read_jsonl(tmp_path / "missing.jsonl")).empty


def test_report_states_entropy_and_margin(tmp_path):
    run = _with_diagnostics(make_analysis(tmp_path))
    paths = build_report(ReportConfig(run=str(run), formats="html,md,json"))
    html, md = paths["report.html"].read_text(), paths["report.md"].read_text()
    for text in (html, md):
        assert f"routed-layer entropy H = {ENTROPY:.2f} (1 = all layers used equally, 0 = one layer)" in text
        assert f"router margin p1 - p2 = {MARGIN:.2f}" in text
    assert "routed-layer fractions over training" in html and "routed-layer entropy and router margin" in html
    first = -sum(x * math.log(x) for x in FRACS[0]) / math.log(3)
    assert f"routed-layer entropy {first:.2f} at 10000 tokens → 1.00 at 30000 tokens" in md
    assert "routed-layer fractions: L1 0.47, L2 0.20, L3 0.33" in md
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["metrics"]["routed_layers"]["entropy"] == ENTROPY


def test_report_without_the_keys_says_nothing(tmp_path):
    run = make_analysis(tmp_path)  # an eval.json from before the keys, no metrics.jsonl
    paths = build_report(ReportConfig(run=str(run), formats="html,md"))
    for name in ("report.html", "report.md"):
        text = paths[name].read_text()
        assert "routed-layer entropy" not in text and "router margin" not in text
        assert "over training" not in text


def test_dashboard_overview_shows_entropy_and_margin(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from routesae import dashboard
    from tests.test_dashboard import APP, TIMEOUT

    monkeypatch.delenv(dashboard.MODEL_ENV, raising=False)
    for name, make in (("old", make_analysis), ("new", lambda p: _with_diagnostics(make_analysis(p)))):
        monkeypatch.setenv(dashboard.RUN_ENV, str(make(tmp_path / name)))
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        labels = {m.label: m.value for m in at.metric}
        charts = " ".join(c.proto.spec for c in at.get("plotly_chart"))
        if name == "old":
            assert "routed-layer entropy H" not in labels and "router margin p1 - p2" not in labels
            assert "over training" not in charts
            continue
        assert labels["routed-layer entropy H"] == f"{ENTROPY:.2f}" and labels["router margin p1 - p2"] == "0.43"
        assert "routed-layer fractions over training" in charts and "routed-layer entropy and router margin" in charts
