"""The helpers of analyses/ (RESULTS.md sections, tables) and the specialisation study's rendering."""

from __future__ import annotations

import importlib

import pytest

from tests.analyses_scripts import import_script, script_fixture
from tests.analysis_fixture import make_analysis

steps = script_fixture("experiment_steps")


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


def test_routing_study_token_classes_and_layer_profile():
    rs = import_script("routing_study")
    assert [rs.token_class(t, p) for t, p in [("<|bos|>", 0), ("\n", 3), (" ,", 1), ("42", 2), (" the", 5),
                                               ("ing", 6), (" x2", 7), ("  ", 8)]] == [
        "first position", "newline", "punctuation", "digits", "word start", "word piece", "other", "other"]
    import pandas as pd

    # layer 1 gets every digit, layer 2 every word: lifts by hand (digits are 1/4 of all tokens -> lift 4)
    tok = pd.DataFrame({"token": ["1", "2", " a", " b"] * 30, "position": [1] * 120,
                        "domain": ["math", "math", "prose", "prose"] * 30,
                        "routed_layer": [1, 1, 2, 2] * 30})
    tok["cls"] = [rs.token_class(t, 1) for t in tok["token"]]
    prof = {p["layer"]: p for p in rs.layer_profile(tok)}
    assert prof[1]["share"] == 0.5 and prof[1]["classes"]["digits"] == {"share": 1.0, "lift": 2.0}
    assert set(prof[2]["tokens"]) == {" a", " b"} and prof[2]["domains"] == {"prose": 2.0}


def test_recipe_ablation_summary_and_verdict():
    ra = import_script("recipe_ablation")
    rows = [{"name": n, "k": 32, "seed": s, "nmse": v, "kl": v, "ce_rec": None, "nmse_insample": v,
             "train_nmse_last": v, "dead": 0.0, "entropy": 0.5, "hist": [0.5, 0.5]}
            for n, vals in (("default", [0.30, 0.31, 0.32]), ("reference", [0.35, 0.36, 0.37]))
            for s, v in enumerate(vals)]
    d, r = ra.summarise(rows)
    assert d["nmse"] == pytest.approx(0.31) and d["nmse_sd"] == pytest.approx(0.01) and d["ce_rec"] is None
    assert ra.verdict(d, r, "nmse") == "default better"  # 0.05 apart, sd 0.01
    r2 = {**r, "nmse": 0.315}
    assert ra.verdict(d, r2, "nmse").startswith("no difference")  # 0.005 apart < sd
    assert ra.pm(d, "nmse") == "0.310 ± 0.010"
