"""The dashboard's Steer page and the Experts page's causal tabs (AppTest on the synthetic analysis, tiny model)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("streamlit")

from routesae.causal.contrast import contrast_from_expert_domain, steering_setting  # noqa: E402
from tests.test_dashboard import app, assert_no_raw_html, run, run_with_model, titles  # noqa: E402, F401

HOSTILE = "<script>alert(1)</script> Once upon"


def test_steer_page_without_model(run):  # noqa: F811
    at = app(page="views/steer.py")
    assert titles(at) == ["Steer"]
    assert any("No model found" in i.value for i in at.info)


def test_steer_page_side_by_side_and_errors(run_with_model):  # noqa: F811
    at = app(page="views/steer.py")
    assert not at.get("code")  # nothing heavy before Steer
    at.text_area(key="steer_prompt").input(HOSTILE)
    at.text_input(key="steer_features").input("3=4")
    at.text_input(key="steer_experts").input("bias:1=9@layer1")
    at.slider(key="steer_max_new").set_value(4)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("code")) == 2 and len(at.get("metric")) == 2
    steered = next(d.value for d in at.dataframe if "latent 3 set" in d.value.columns)
    assert {"token", "L1 experts", "latent 3", "latent 3 set"} <= set(steered.columns)
    assert (steered["latent 3 set"] == 4.0).all() and steered["L1 experts"].str.contains("E1").all()
    assert_no_raw_html(at)
    at.text_input(key="steer_experts").input("bias:99=1")
    at.button[0].click().run()
    assert at.error and "expert out of range" in at.error[0].value and "\n" not in at.error[0].value


def test_experts_contrast_tab_fills_the_steer_page(run_with_model):  # noqa: F811
    r, _ = run_with_model
    ana = r / "analysis"
    ed = pd.read_parquet(ana / "expert_domain.parquet")
    a, b = sorted(ed["domain"].unique())[:2]
    table = contrast_from_expert_domain(ed, a, b)
    table.to_parquet(ana / "contrast.parquet", index=False)
    settings = json.loads((ana / "settings.json").read_text())
    settings["contrast"] = {"a": a, "b": b, "steering": steering_setting(table)}
    (ana / "settings.json").write_text(json.dumps(settings))
    at = app(page="views/experts.py")
    assert any(d.value.shape[0] == len(table) and "risk_diff" in d.value.columns for d in at.dataframe)
    assert any("routesae analyze-shared" in i.value for i in at.info)  # no shared/routed split for this run
    at.button(key="contrast_steer").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert titles(at) == ["Steer"]
    assert at.text_input(key="steer_experts").value == steering_setting(table)
