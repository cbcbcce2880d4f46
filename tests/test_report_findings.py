"""The report's key findings equal the tables they summarise; the glossary covers every metric shown; long tables
show their top rows with every row collapsed below; held-out vs in-sample is stated."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from routesae.report import ReportConfig, build_report, load_analysis
from routesae.report import findings as FD
from routesae.report import glossary as G
from routesae.report.html import TOP_ROWS
from tests.analysis_fixture import make_analysis

N_EXPERTS = 32  # like the demo MoE: long expert tables


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_analysis(tmp_path_factory.mktemp("findings"), n_experts=N_EXPERTS)
    paths = build_report(ReportConfig(run=str(run), formats="html,md,json", top_features=4))
    return run, load_analysis(run), paths


def _by_key(a) -> dict[str, FD.Finding]:
    return {f.key: f for f in FD.findings(a)}


def test_findings_equal_their_tables(built):
    run, a, _ = built
    f = _by_key(a)
    assert list(f) == ["data", "splice", "reconstruction", "routed_layers", "specialists", "domains", "health",
                       "cold_start", "features"]
    ev = json.loads((run / "eval.json").read_text())
    sp = ev["splice"]
    for k in ("ce_recovered", "ce_clean", "ce_spliced", "ce_zero_ablated", "kl", "kl_zero_ablated"):
        assert f["splice"].values[k] == sp[k]
    assert "90.3%" in f["splice"].text and "0.210 nats" in f["splice"].text
    assert f["reconstruction"].values["nmse"] == ev["sae_space"]["nmse"]
    rl = f["routed_layers"].values
    assert rl["layers"] == ev["routed_layers"]["layers"] and rl["fractions"] == ev["routed_layers"]["fractions"]
    assert rl["entropy"] is None and "entropy" not in f["routed_layers"].text  # eval.json has none: not invented

    es = pd.read_parquet(run / "analysis" / "expert_stats.parquet")
    n_exp = es.groupby("layer")["expert"].transform("count")
    eligible = es[~es["hub"] & (es["load"] >= 0.5 / n_exp) & es["selectivity"].notna()]
    top3 = eligible.sort_values(["selectivity", "layer", "expert"], ascending=[False, True, True]).head(3)
    assert f["specialists"].values["experts"] == [(int(r.layer), int(r.expert), r.top_domain, float(r.selectivity))
                                                 for r in top3.itertuples()]
    for r in top3.itertuples():
        assert f"L{r.layer} E{r.expert} for {r.top_domain} ({r.selectivity:.2f}×)" in f["specialists"].text
    owned = eligible[eligible["selectivity"] >= 2].groupby("top_domain").size()
    assert f["domains"].values["owned"] == {str(d): int(c) for d, c in owned.items()}
    dl = pd.read_parquet(run / "analysis" / "domain_layer.parquet")
    for row in f["domains"].values["best"]:
        d = dl[(dl["domain"] == row["domain"]) & (dl["owner"] >= 0)]
        assert row["selectivity"] == d["selectivity"].max()
        assert (row["layer"], row["owner"]) == tuple(d.loc[d["selectivity"].idxmax(), ["layer", "owner"]])

    h = f["health"].values
    assert h["experts"] == len(es) and h["dead"] == int((es["load"] <= 0).sum())
    assert (h["collapsed"], h["overloaded"], h["hubs"]) == (int(es["collapse_low"].sum()),
                                                            int(es["collapse_high"].sum()), int(es["hub"].sum()))
    ls = pd.read_parquet(run / "analysis" / "layer_stats.parquet")
    assert h["worst_cv"] == ls["load_cv"].max() and h["worst_cv_layer"] == int(ls.loc[ls["load_cv"].idxmax(), "layer"])

    pp = pd.read_parquet(run / "analysis" / "position_profile.parquet")
    cs = f["cold_start"].values
    assert (cs["first"], cs["last"]) == ("1", "8+")
    for m in ("router_entropy", "selectivity"):
        assert cs[m] == pytest.approx((pp[pp.bucket == "1"][m].mean(), pp[pp.bucket == "8+"][m].mean()))
    fc = json.loads((run / "analysis" / "feature_count.json").read_text())
    lat = pd.read_parquet(run / "analysis" / "latents.parquet")
    assert f["features"].values["count"] == fc["count"] and f["features"].values["latents"] == len(lat)
    assert f["features"].values["dead"] == int((lat["density"] <= 0).sum())


def test_findings_come_first_in_every_format_and_link_their_sections(built):
    _, a, paths = built
    html, md = paths["report.html"].read_text(), paths["report.md"].read_text()
    items = FD.findings(a)
    block = html[html.index("<ul class='findings'>"):html.index("</ul>")]
    assert block.count("<li>") == len(items)
    for f in items:  # each line ends with a link to its section, which exists
        assert f"href='#{f.section}'" in block and f"id='{f.section}'" in html
    md_block = md[md.index("## Key findings"):md.index("## Evaluation")]
    assert md_block.count("\n- ") == len(items)
    summary = json.loads(paths["summary.json"].read_text())
    assert [x["key"] for x in summary["findings"]] == [f.key for f in items]
    assert summary["findings"][1]["values"]["ce_recovered"] == 0.903


class Cells(HTMLParser):
    """Table headers (with whether they hold an <abbr>), every <abbr> title, the glossary's entries."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.th, self.abbr, self.dt = [], [], []
        self._th = self._dt = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "th":
            self._th = ["", False]
        elif tag == "abbr":
            self.abbr.append(a.get("title", ""))
            if self._th is not None:
                self._th[1] = True
        elif tag == "dt":
            self._dt = a.get("id", "")

    def handle_endtag(self, tag):
        if tag == "th" and self._th is not None:
            self.th.append(tuple(self._th))
            self._th = None
        if tag == "dt":
            self._dt = None

    def handle_data(self, data):
        if self._th is not None:
            self._th[0] += data
        if self._dt:
            self.dt.append(self._dt[2:])


def test_glossary_covers_every_metric_shown(built):
    _, _, paths = built
    p = Cells()
    p.feed(paths["report.html"].read_text())
    glossary = set(p.dt)
    assert glossary and glossary <= set(G.TERMS)
    defined = {G.hover(G.TERMS[k]) for k in glossary}
    assert p.abbr and set(p.abbr) <= defined  # every metric name on the page (hover) has its glossary entry
    plain = set(G.PLAIN.values()) | {"Metric", "SAE input space", "raw residual", "value"}
    for text, has_abbr in p.th:  # a header is a defined metric or an identifier (layer, expert, domain, ...)
        assert has_abbr or text in plain, text
    for k in ("nmse", "explained_variance", "ce_recovered", "kl", "selectivity", "load_cv", "max_vio", "switch_aux"):
        assert k in glossary and G.TERMS[k].formula  # REFERENCE §4 / §7 formulas
    md = paths["report.md"].read_text()
    names = set(re.findall(r"^- \*\*(.+?)\*\*: ", md[md.index("## Glossary"):], re.M))
    for block in re.findall(r"((?:^\|.*\|\n)+)", md, re.M):  # every Markdown table header: defined or plain
        for cell in [c.strip() for c in block.splitlines()[0].strip("|").split(" | ")]:
            cell = cell.replace("\\", "").replace("&gt;", ">")
            key = next((k for k, t in G.TERMS.items() if t.name == cell), None)
            assert cell in plain | {"name", "position"} or re.fullmatch(r"L\d+", cell) or \
                (key and G.TERMS[key].name.replace("*", "") in {n.replace("\\", "") for n in names}) or \
                cell in {G.label(c) for c in G.COLUMN_LABELS}, cell


def test_long_tables_show_top_rows_and_keep_every_row(built):
    run, a, paths = built
    html = paths["report.html"].read_text()
    from routesae.report import facts

    ranked = facts.most_specialised(a, 10_000)
    assert len(ranked) > TOP_ROWS
    assert f"<summary>All {len(ranked):,} rows (click a column to sort)</summary>" in html
    assert "every row also in <code>tables/expert_stats.csv</code>" in html
    assert "class='sortable'" in html
    md = paths["report.md"].read_text()
    assert f"_{len(ranked) - TOP_ROWS:,} more rows in `tables/expert\\_stats.csv`_" in md


def test_number_formats():
    assert G.fmt("ce_recovered", 0.93593) == "93.6%" and G.fmt("dense_fraction_gt_10pct", 0.0078125) == "0.78%"
    assert G.fmt("kl", 0.38380, True) == "0.384 nats" and G.fmt("selectivity", 4.2236) == "4.22×"
    assert G.fmt("tokens", 65536.0) == "65,536" and G.fmt("nmse", 0.33101) == "0.331" and G.fmt("l0", None) == "-"
    assert G.label("sae_nmse") == "NMSE (SAE space)" and G.term_for("k'=2")[0] == "needed_k"
    assert G.term_for("layer") is None and G.label("layer") == "Layer"


@pytest.mark.parametrize("in_sample, expect", [(False, "Held out: measured on 1,500 tokens (rows 0..1,500)"),
                                               (True, "In-sample: measured on 1,500 tokens"),
                                               (None, "does not say whether they were held out")])
def test_held_out_or_in_sample_is_stated(tmp_path, in_sample, expect):
    run = make_analysis(tmp_path)
    ev = json.loads((run / "eval.json").read_text())
    if in_sample is not None:
        ev.update(in_sample=in_sample, token_range={"start": 0, "stop": 1500}, store_split="val")
    (run / "eval.json").write_text(json.dumps(ev))
    paths = build_report(ReportConfig(run=str(run), formats="html,md"))
    for name, section in (("report.html", "id='evaluation'"), ("report.md", "## Evaluation")):
        text = paths[name].read_text()
        assert expect in text
        assert text.index(expect) < text.index(section)  # in the key findings, before the sections


def test_explanations_hook_and_routing_entropy(tmp_path):
    """A latents.explanation column (auto-interpretation, later) becomes the feature's headline and its finding;
    eval.json's entropy and margin enter the routed-layers finding."""
    run = make_analysis(tmp_path)
    lat = pd.read_parquet(run / "analysis" / "latents.parquet")
    lat["explanation"] = [f"fires on <b>thing {i}</b>" for i in range(len(lat))]
    lat.to_parquet(run / "analysis" / "latents.parquet", index=False)
    ev = json.loads((run / "eval.json").read_text())
    ev["routed_layers"].update(entropy=0.91, margin=0.42)
    (run / "eval.json").write_text(json.dumps(ev))
    a = load_analysis(run)
    f = _by_key(a)
    shown = f["features"].values["shown"]
    assert shown and f"latent {shown[0]} (fires on <b>thing {shown[0]}</b>)" in f["features"].text
    assert f["routed_layers"].values["entropy"] == 0.91 and "entropy 0.91" in f["routed_layers"].text
    assert "margin 0.42" in f["routed_layers"].text
    html = build_report(ReportConfig(run=str(run), formats="html"))["report.html"].read_text()
    assert "fires on &lt;b&gt;thing" in html and "<b>thing" not in html
    assert np.isclose(a.eval["routed_layers"]["entropy"], 0.91)
