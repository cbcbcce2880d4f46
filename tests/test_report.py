"""routesae report: every format from a synthetic analysis folder; escaping of hostile corpus text;
tables round-trip; summary.json; Neuronpedia batch export consistent with the tables."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from routesae.report import ReportConfig, build_report, load_analysis
from routesae.report import figures as F
from routesae.report.htmlkit import SCRIPT
from routesae.report.neuronpedia import ACTIVATION_KEYS, FEATURE_KEYS
from routesae.report.tables import list_columns, read_csv_table
from tests.analysis_fixture import DEAD, DOMAINS, MOE_LAYERS, N_LATENTS, TABLES, load_tables, make_analysis

ALERT = "<script>alert(1)</script>"
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "script", "body", "nav", "main", "a", "h1", "h2", "h3",
                "p", "section", "div", "span", "table", "thead", "tbody", "tr", "th", "td", "details", "summary",
                "code", "b", "br", "abbr", "ul", "li", "dl", "dt", "dd"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_analysis(tmp_path_factory.mktemp("report"))
    paths = build_report(ReportConfig(run=str(run)))
    return run, paths


class Walker(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.text, self.spans, self.links = [], [], [], [], []
        self.figures = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "script":
            self.scripts.append({"attrs": a, "data": ""})
            self._in_script = True
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self.spans.append(a)
        if tag == "div" and "plotly-graph-div" in (a.get("class") or ""):
            self.figures += 1
        for k in ("src", "href"):
            if k in a:
                self.links.append(a[k])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1]["data"] += data
        else:
            self.text.append(data)


def test_every_file_written(built):
    run, paths = built
    expected = {"report.html", "report.md", "summary.json", "neuronpedia/batch-0.json"}
    expected |= {f"tables/{t}.{ext}" for t in TABLES for ext in ("csv", "parquet")}
    assert set(paths) == expected
    for name, p in paths.items():
        assert p == run / "report" / name and p.stat().st_size > 0, name
    assert not list((run / "report").rglob(".*tmp*"))  # atomic writes left no temporaries


def test_html_self_contained_and_escaped(built):
    _, paths = built
    text = paths["report.html"].read_text(encoding="utf-8")
    w = Walker()
    w.feed(text)
    w.close()
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert all("src" not in s["attrs"] for s in w.scripts)
    assert all(link.startswith("#") for link in w.links), w.links  # no external resource, only anchors
    assert "<link" not in text and "@import" not in text and "url(" not in text.split("</style>")[0]
    # plotly.js exactly once, one small inline script per figure, then the page's own (sorter, print resize)
    assert w.figures > 10
    assert len(w.scripts) == 2 + w.figures
    assert w.scripts[0]["data"] == get_plotlyjs()
    assert all("Plotly.newPlot" in s["data"] and len(s["data"]) < 200_000 for s in w.scripts[1:-1])
    assert w.scripts[-1]["data"] == SCRIPT and "addEventListener" in SCRIPT
    assert text.count("Plotly.newPlot") >= w.figures
    # hostile corpus strings only escaped: no raw tag, text decodes back to the original
    assert "<script>alert" not in text.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<i>x</i>" not in text and "&lt;i&gt;x&lt;/i&gt;" in text
    assert set(w.tags) <= ALLOWED_TAGS, set(w.tags) - ALLOWED_TAGS
    visible = "".join(w.text)
    for s in (ALERT, '"quotes"', "'single'", "a & b", "</div>", "`tick`", "a|b", "q&a|<i>x</i>"):
        assert s in visible, s
    # highlighted tokens: class, style and a numeric title only
    assert w.spans
    for a in w.spans:
        assert set(a) == {"class", "style", "title"}
        float(a["title"])
        assert re.fullmatch(r"background:rgba\(255,120,0,[01]\.\d\d\)", a["style"])
    for section in ("findings", "evaluation", "specialisation", "load", "coldstart", "features", "details",
                    "glossary"):
        assert f"id='{section}'" in text
    assert text.index("id='findings'") < text.index("id='evaluation'")  # key findings first
    assert "Latent 11" not in visible  # the dead latent is not a top feature
    assert "CE loss recovered" in visible and "90.3%" in visible
    assert "sae_space" not in visible and "ce_zero_ablated" not in visible  # human names only


def test_markdown_escaped(built):
    _, paths = built
    md = paths["report.md"].read_text(encoding="utf-8")
    assert "<script" not in md and "</div>" not in md and "<i>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "a &amp; b" in md and "a\\|b" in md and "\\`tick\\`" in md and "\\*star\\*" in md
    assert "&\\#" not in md  # no escape splits an entity
    for line in md.splitlines():  # every table row has as many cells as its header
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line)
            assert cells[0] == "" and cells[-1] == "", line
    tables = [b for b in md.split("\n\n") if b.startswith("|")]
    for block in tables:
        widths = {len(re.split(r"(?<!\\)\|", row)) for row in block.strip().splitlines()}
        assert len(widths) == 1, block
    headings = ["## Key findings", "## Evaluation", "## Expert specialisation", "## Load balance and collapse",
                "## Cold start", "## Top features", "## Run details", "## Glossary"]
    assert [h for h in re.findall(r"^## .*$", md, re.M)] == headings  # findings first, glossary last
    for link in re.findall(r"\]\((#[^)]*)\)", md):  # every finding links to a heading of this file
        assert link[1:] in {h[3:].lower().replace(" ", "-") for h in headings}, link


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        a, b = list(np.asarray(a).tolist()), list(np.asarray(b).tolist())
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    if isinstance(a, (float, np.floating)) or isinstance(b, (float, np.floating)):
        return float(a) == float(b)
    if isinstance(a, (bool, np.bool_)):
        return bool(a) == (b in (True, "True", 1))
    return a == b or str(a) == str(b)


def test_tables_round_trip(built):
    run, paths = built
    src = load_tables(run)
    for name, df in src.items():
        pq = pd.read_parquet(paths[f"tables/{name}.parquet"])
        pd.testing.assert_frame_equal(pq, df)
        back = read_csv_table(paths[f"tables/{name}.csv"], list_columns(df))
        assert list(back.columns) == list(df.columns) and len(back) == len(df), name
        for c in df.columns:
            for x, y in zip(df[c].tolist(), back[c].tolist()):
                assert _same(x, y), (name, c, x, y)


def test_summary_json(built):
    _, paths = built
    s = json.loads(paths["summary.json"].read_text())
    for k in ("format", "run", "model", "arch", "moe_layers", "n_experts", "top_k", "tokens", "domains", "sae",
              "counts", "metrics", "layer_stats", "top_experts_per_domain", "most_specialised_experts",
              "collapsed_experts", "cold_start", "top_features"):
        assert k in s, k
    assert s["counts"]["n_latents"] == N_LATENTS and s["counts"]["live_latents"] == N_LATENTS - len(DEAD)
    assert s["metrics"]["splice"]["ce_recovered"] == 0.903 and s["metrics"]["sae_space"]["nmse"] == 0.21
    assert set(s["top_experts_per_domain"]) == {str(j) for j in MOE_LAYERS}
    assert all(set(v) == set(DOMAINS) for v in s["top_experts_per_domain"].values())
    assert [(c["layer"], c["expert"], c["flag"]) for c in s["collapsed_experts"]] == [(3, 3, "low")]
    assert len(s["top_features"]) == N_LATENTS - len(DEAD)


def test_neuronpedia_batch(built):
    run, paths = built
    batch = json.loads(paths["neuronpedia/batch-0.json"].read_text())
    assert set(batch) == {"model_id", "layer", "sae_set", "features"} and batch["layer"] == 1
    t = load_tables(run)
    lat, ctx = t["latents"].set_index("latent"), t["contexts"]
    assert [f["feature_index"] for f in batch["features"]] == list(range(N_LATENTS))
    for f in batch["features"]:
        assert set(f) == set(FEATURE_KEYS)
        r, i = lat.loc[f["feature_index"]], f["feature_index"]
        assert f["frac_nonzero"] == r["density"]
        assert f["pos_str"] == list(r["logit_pos"]) and f["neg_str"] == list(r["logit_neg"])
        assert f["pos_values"] == list(r["logit_pos_values"]) and f["neg_values"] == list(r["logit_neg_values"])
        assert f["freq_hist_data_bar_heights"] == list(r["hist_counts"])
        edges = list(r["hist_edges"])
        assert np.allclose(f["freq_hist_data_bar_values"], [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])])
        c = ctx[ctx["latent"] == i]
        assert len(f["activations"]) == len(c)
        if i in DEAD:
            continue
        n_top = int((c["kind"] == "top").sum())
        for k, act in enumerate(f["activations"]):
            assert set(act) == set(ACTIVATION_KEYS)
            if k < n_top:
                assert (act["bin_min"], act["bin_max"], act["bin_contains"]) == (-1, r["max_act"], -1)
            else:
                assert 0 <= act["bin_min"] <= act["bin_max"] <= r["max_act"] + 1e-9 and act["bin_contains"] == 0.2
                centre = c[[list(t) == act["tokens"] for t in c["tokens"]]]["act"]
                assert any(act["bin_min"] <= v <= act["bin_max"] for v in centre)
        top = c[c["kind"] == "top"].sort_values("rank")
        assert [a["tokens"] for a in f["activations"][:n_top]] == [list(x) for x in top["tokens"]]
        assert [a["values"] for a in f["activations"][:n_top]] == [list(x) for x in top["acts"]]
    # token strings are exported raw (JSON, not HTML)
    assert ALERT in {tok for f in batch["features"] for a in f["activations"] for tok in a["tokens"]}


def test_formats_out_and_errors(tmp_path):
    run = make_analysis(tmp_path)
    out = tmp_path / "elsewhere"
    paths = build_report(ReportConfig(run=str(run), formats="md,json", out=str(out), neuronpedia_batch=5))
    assert set(paths) == {"report.md", "summary.json", "neuronpedia/batch-0.json", "neuronpedia/batch-1.json",
                          "neuronpedia/batch-2.json"}
    assert all(p.parent in (out, out / "neuronpedia") for p in paths.values())
    assert sum(len(json.loads(paths[f"neuronpedia/batch-{b}.json"].read_text())["features"]) for b in range(3)) \
        == N_LATENTS
    with pytest.raises(ValueError, match="unknown report format docx; choose from html, md, csv, json, pdf"):
        build_report(ReportConfig(run=str(run), formats=("html", "docx")))
    with pytest.raises(FileNotFoundError, match="routesae analyze"):
        build_report(ReportConfig(run=str(tmp_path / "nothing")))


def test_partial_analysis(tmp_path):
    """Expert tables only (no SAE feature tables, no eval.json): every format still renders."""
    run = make_analysis(tmp_path)
    for name in ("latents", "contexts", "latent_domains", "latent_experts", "expert_latents"):
        (run / "analysis" / f"{name}.parquet").unlink()
    (run / "eval.json").unlink()
    s = json.loads((run / "analysis" / "summary.json").read_text())
    s.pop("eval")
    (run / "analysis" / "summary.json").write_text(json.dumps(s))
    paths = build_report(ReportConfig(run=str(run)))
    assert "neuronpedia/batch-0.json" not in paths and "tables/latents.csv" not in paths
    html = paths["report.html"].read_text()
    assert "no live latents with contexts" in html and "routesae evaluate" in html
    assert load_analysis(run).latents.empty


def test_figures(built):
    run, _ = built
    a = load_analysis(run)
    heats = {v: F.domain_expert_heatmap(a.expert_domain, 1, v) for v in F.HEATMAP_VALUES}
    figs = [heats["share_topk"], heats["share_top1"], heats["lift_topk"], heats["lift_top1"]]
    figs += [F.domain_layer_heatmap(a.domain_layer), F.expert_load_bars(a.expert_stats, 3),
             F.coactivation_heatmap(a.coactivation, 1), F.position_profile(a.position_profile),
             F.experts_per_token(a.experts_per_token, 1),
             F.routed_layer_histogram(F.routed_layer_counts(a.eval, a.latents)),
             F.latent_histogram(a.latent_row(0)), F.latent_domain_lift(a.latent_domains, 0),
             F.latent_expert_lift(a.latent_experts, 0)]
    for fig in figs:
        assert isinstance(fig, go.Figure) and len(fig.data) >= 1
    heat = heats["lift_topk"]  # a ratio: coloured by log2, the ratio itself in the hover data
    lift = a.expert_domain[a.expert_domain["layer"] == 1]["lift_topk"].to_numpy()
    assert np.allclose(np.sort(np.asarray(heat.data[0].customdata, float).ravel()), np.sort(lift))
    assert np.allclose(np.sort(np.asarray(heat.data[0].z, float).ravel()), np.sort(np.log2(lift)))
    assert heat.data[0].zmid == 0 and heat.data[0].zmin == -heat.data[0].zmax
    assert "q&amp;a|&lt;i&gt;x&lt;/i&gt;" in list(heat.data[0].y)  # corpus labels entity-escaped for plotly.js
    load = figs[5]
    assert list(load.data[0].marker.color)[3] == "#d62728"  # collapsed expert flagged
    assert len(figs[7].data) == len(MOE_LAYERS)
    with pytest.raises(ValueError, match="unknown heatmap value"):
        F.domain_expert_heatmap(a.expert_domain, 1, "nope")
    assert len(F.domain_expert_heatmap(a.expert_domain, 99).data) == 0  # an absent layer: an empty figure


def test_hostile_corpus_through_the_whole_pipeline_is_escaped(tiny_ckpt, tmp_path):
    """A real corpus with <script>, quotes and & goes through capture, train, analyze and report."""
    import json as _json
    from html.parser import HTMLParser

    from routesae.analyze import AnalyzeConfig, analyze
    from routesae.capture import CaptureConfig, capture
    from routesae.report import ReportConfig, build_report
    from routesae.train import TrainConfig, train

    corpus = tmp_path / "hostile.jsonl"
    text = 'Hello <script>alert("x")</script> & "quoted" \'single\' <b>bold</b> a & b. '
    corpus.write_text("".join(_json.dumps({"text": text * 6, "domain": d}) + "\n" for d in ("a<i>", "b&c") * 6))
    store = capture(CaptureConfig(model=str(tiny_ckpt("olmoe")), corpus=str(corpus), out=str(tmp_path / "s"),
                                  ctx=32, layers="all", device="cpu", progress=False))
    run = train(TrainConfig(store=str(store), out=str(tmp_path / "run"), latents=64, k=4, batch_tokens=128,
                            device="cpu", progress=False))
    analyze(AnalyzeConfig(run=str(run), tokens=2048, device="cpu", with_model=False))
    html = (build_report(ReportConfig(run=str(run), formats="html,md"))["report.html"]).read_text()

    class Scripts(HTMLParser):
        def __init__(self):
            super().__init__()
            self.scripts, self.italic = [], 0
            self._in = False

        def handle_starttag(self, tag, attrs):
            self._in = tag == "script"
            if tag == "script":
                assert not any(k == "src" for k, _ in attrs)
                self.scripts.append("")
            self.italic += tag == "i"

        def handle_data(self, data):
            if self._in:
                self.scripts[-1] += data

    p = Scripts()
    p.feed(html)
    assert p.scripts and not any("alert(" in s for s in p.scripts)  # corpus text never becomes a script
    assert p.italic == 0 and "a<i>" not in html  # the domain label "a<i>" never becomes markup ...
    assert "a&lt;i&gt;" in html and "b&amp;c" in html  # ... it is shown escaped, like every corpus string
