"""The helpers of analyses/ (RESULTS.md sections, tables) and the specialisation study's rendering."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from tests.analysis_fixture import make_analysis

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


@pytest.fixture(scope="module")
def steps():
    sys.path.insert(0, str(ANALYSES))
    try:
        yield importlib.import_module("experiment_steps")
    finally:
        sys.path.remove(str(ANALYSES))
        sys.modules.pop("experiment_steps", None)


def test_write_section_replaces_only_its_block(steps, tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nhand-written text\n")
    steps.write_section(doc, "x", "first")
    steps.write_section(doc, "y", "other")
    steps.write_section(doc, "x", "second\nversion")
    text = doc.read_text()
    assert "hand-written text" in text and "first" not in text
    assert text.count("<!-- x:begin -->") == 1 and "second\nversion\n<!-- x:end -->" in text
    assert text.index("<!-- x:begin -->") < text.index("<!-- y:begin -->")


def test_markdown_table_and_fmt(steps):
    t = steps.markdown_table(["a", "b"], [[1, steps.fmt(None)], [2, steps.fmt(0.123456, ".3f")]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | n/a |", "| 2 | 0.123 |"]


def test_specialisation_render_escapes_corpus_text(steps, tmp_path):
    pytest.importorskip("matplotlib")
    from routesae.report.load import load_analysis

    study = importlib.import_module("specialisation_study")
    run = make_analysis(tmp_path)
    a = load_analysis(run)
    feats = study.pick_features(a, 3)
    doc, section = study.render(a, run, feats, "python analyses/specialisation_study.py")
    for text in (doc, section):
        assert "<script>" not in text and "</div>" not in text
    assert "## Load balance and collapse" in doc and "## Cold start" in doc
    study.FIG = tmp_path / "figures"
    paths = [study.fig_layers(a), study.fig_cold_start(a), study.fig_features(a, feats),
             study.fig_domain_expert(a, a.moe_layers)]
    assert all(p.exists() and p.stat().st_size < 300_000 for p in paths)
