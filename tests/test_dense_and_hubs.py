"""Reports and dashboard: specialists ranked by selectivity with hubs shown as hubs (synthetic analysis), and a
dense model (no router records) read cleanly: no expert fields, no ``L-1 E-1 (lift -)`` placeholders."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from routesae.report import ReportConfig, build_report, facts, load_analysis
from tests.analysis_fixture import make_analysis

PLACEHOLDERS = re.compile(r"L-1|E-1|lift -(?!\d)|\(lift -\)|top expert: -")


class Text(HTMLParser):
    """The visible text of an HTML page (scripts and styles left out)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self._skip = [], False

    def handle_starttag(self, tag, attrs):
        self._skip = tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip = False

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def visible(html: str) -> str:
    t = Text()
    t.feed(html)
    return " ".join(t.parts)


# ---------------------------------------------------------------- hubs and specialists (synthetic analysis)


def test_report_ranks_by_selectivity_and_shows_hubs(tmp_path):
    run = make_analysis(tmp_path)
    a = load_analysis(run)
    es = a.expert_stats
    # the fixture's hubs: expert 0 of layer 1 (90% of every domain) and expert 2 of layer 3
    hubs = facts.hubs(a)
    assert [(int(r.layer), int(r.expert)) for r in hubs.itertuples()] == [(1, 0), (3, 2)]
    ms = facts.most_specialised(a, 10)
    ranked = list(zip(ms["layer"], ms["expert"]))
    assert (1, 0) not in ranked and (3, 2) not in ranked  # hubs are never ranked
    assert (3, 3) not in ranked                             # load 0.0017 < 0.5 x 1/E
    keep = es[~es["hub"] & (es["load"] >= 0.5 / 4)]
    want = keep.sort_values(["selectivity", "layer", "expert"], ascending=[False, True, True])
    assert ranked == list(zip(want["layer"], want["expert"]))
    assert ms["selectivity"].is_monotonic_decreasing and "lift" in ms
    # the lift alone would have put the hub of layer 1 among the first (its lift is 0.9 / (k/E) = 1.8)
    assert es.set_index(["layer", "expert"]).loc[(1, 0), "specialisation"] == pytest.approx(1.8)

    paths = build_report(ReportConfig(run=str(run), formats="html,md,json"))
    html, md = paths["report.html"].read_text(), paths["report.md"].read_text()
    text = visible(html)
    assert "Most specialised experts (by selectivity)" in text and "Hubs" in text
    assert "**Hubs**" in md and "selectivity" in md
    assert "E0 (0.9, hub)" in md  # top experts per domain: the hub of layer 1 is marked as one
    s = json.loads(paths["summary.json"].read_text())
    assert [(h["layer"], h["expert"]) for h in s["hub_experts"]] == [(1, 0), (3, 2)]
    assert [(m["layer"], m["expert"]) for m in s["most_specialised_experts"]] == ranked
    assert s["top_experts_per_domain"]["1"]["code"][0] == {**s["top_experts_per_domain"]["1"]["code"][0],
                                                           "expert": 0, "hub": True}
    # cold start: BOS reported apart, first
    cold = md[md.index("## Cold start"):]
    cold = cold[:cold.index("\n## ", 3)] if "\n## " in cold[3:] else cold  # this section only
    assert cold.index("| BOS |") < cold.index("| 1 |") < cold.index("| 8+ |") and "| 0 |" not in cold
    # a stricter minimum load, from the analysis settings
    settings = json.loads((run / "analysis" / "settings.json").read_text())
    (run / "analysis" / "settings.json").write_text(json.dumps({**settings, "min_load_ratio": 1.0}))
    strict = facts.most_specialised(load_analysis(run), 10)
    assert (strict["load"] >= 0.25).all() and len(strict) < len(ms)


def test_latent_without_an_expert_shows_no_placeholder(tmp_path):
    """On a MoE model a latent routed below the first MoE layer has top_expert -1: no 'L-1 E-1'."""
    run = make_analysis(tmp_path)
    lat = pd.read_parquet(run / "analysis" / "latents.parquet")
    lat.loc[lat["latent"] == 2, ["top_expert_layer", "top_expert"]] = -1.0
    lat.to_parquet(run / "analysis" / "latents.parquet", index=False)
    a = load_analysis(run)
    assert "top expert" not in dict(facts.feature_facts(a, 2))
    assert dict(facts.feature_facts(a, 3))["top expert"] == "L3 E3 (lift 2)"
    paths = build_report(ReportConfig(run=str(run), formats="html,md,json"))
    html, md = visible(paths["report.html"].read_text()), paths["report.md"].read_text()
    assert "L3 E3 (lift 2)" in html and "L3 E3 (lift 2)" in md
    assert not PLACEHOLDERS.search(html) and not PLACEHOLDERS.search(md)
    f2 = [f for f in json.loads(paths["summary.json"].read_text())["top_features"] if f["latent"] == 2][0]
    assert f2["top_expert"] is None and f2["top_expert_layer"] is None


# ---------------------------------------------------------------- a dense model, end to end


@pytest.fixture(scope="module")
def dense_run(tiny_ckpt, corpus_jsonl, tmp_path_factory) -> Path:
    import torch

    from routesae.analyze import AnalyzeConfig, analyze
    from routesae.capture import CaptureConfig, capture
    from routesae.train import TrainConfig, train

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dense")
    store = capture(CaptureConfig(model=str(tiny_ckpt("llama")), corpus=str(corpus_jsonl), out=str(tmp / "store"),
                                  ctx=32, layers="all", device="cpu", progress=False))
    run = train(TrainConfig(store=str(store), out=str(tmp / "run"), latents=64, k=4, batch_tokens=128,
                            device="cpu", progress=False))
    analyze(AnalyzeConfig(run=str(run), tokens=2048, device="cpu", with_model=False))
    return Path(run)


def test_dense_report_has_no_expert_fields(dense_run):
    a = load_analysis(dense_run)
    assert not a.has_experts and a.expert_stats.empty and a.moe_layers == []
    assert (a.latents["top_expert"] == -1).all()  # what the analysis stores for "no expert"
    paths = build_report(ReportConfig(run=str(dense_run), formats="html,md,json"))
    html, md = paths["report.html"].read_text(), paths["report.md"].read_text()
    text = visible(html)
    for page in (text, md):
        assert not PLACEHOLDERS.search(page)
        assert "expert" not in page.lower(), re.findall(r".{40}expert.{40}", page.lower())[:3]
        assert "router records" not in page and "MoE layers" not in page
    assert "id='specialisation'" not in html and "#coldstart" not in html and "id='features'" in html
    assert "## Top features" in md and "### Latent" in md
    s = json.loads(paths["summary.json"].read_text())
    for key in ("n_experts", "top_k", "top_experts_per_domain", "most_specialised_experts", "hub_experts",
                "collapsed_experts", "cold_start", "layer_stats"):
        assert key not in s, key
    assert s["moe_layers"] == [] and "collapsed_experts" not in s["counts"]
    assert s["top_features"] and not any(k.startswith("top_expert") for f in s["top_features"] for k in f)


def _page_text(at) -> str:
    """Every string an AppTest page shows: text elements, metrics, tables (columns and cells), widget labels."""
    out = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success"):
        out += [str(e.value) for e in at.get(kind)]
    out += [f"{m.label} {m.value} {m.proto.delta}" for m in at.metric]
    for d in at.dataframe:
        df = d.value
        out += [" ".join(map(str, df.columns)), df.astype(str).to_string()]
    for kind in ("selectbox", "multiselect", "radio"):
        for w in at.get(kind):
            out += [str(w.label), " ".join(map(str, w.options))]
    return "\n".join(out)


def test_dense_dashboard_has_no_expert_fields(dense_run, monkeypatch):
    pytest.importorskip("streamlit")
    from routesae import dashboard
    from tests.test_dashboard import app, titles

    monkeypatch.setenv(dashboard.RUN_ENV, str(dense_run))
    monkeypatch.delenv(dashboard.MODEL_ENV, raising=False)
    at = app()
    assert titles(at) == ["Overview"]
    text = _page_text(at)
    assert "Dense model (no MoE layers)" in text
    assert not PLACEHOLDERS.search(text) and "experts per layer" not in text and "router top-k" not in text
    at = app(page="views/features.py")
    t = at.dataframe[0].value
    assert "expert" not in t.columns and "top_expert_lift" not in t.columns and len(t) > 0
    assert "expert lift" not in at.selectbox(key="sort").options
    assert not [w for w in at.multiselect if w.label == "Top expert"]
    text = _page_text(at)
    assert not PLACEHOLDERS.search(text) and "expert" not in text.lower()
    latent = int(t["latent"].iloc[0])
    at = app({"feature": str(latent)})
    assert titles(at) == [f"Latent {latent}"]
    labels = {m.label for m in at.metric}
    assert {"density", "top domain", "routed layer"} <= labels and "top expert" not in labels
    text = _page_text(at)
    assert not PLACEHOLDERS.search(text) and "expert" not in text.lower()
    at = app(page="views/experts.py")
    assert [i.value for i in at.info] == ["Dense model: no MoE layers, so no expert tables."]
    assert not at.dataframe and not at.get("plotly_chart")
    for page in ("views/tokens.py", "views/export.py"):
        assert not PLACEHOLDERS.search(_page_text(app(page=page)))
