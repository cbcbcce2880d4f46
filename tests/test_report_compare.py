"""``routesae report RUN RUN``: runs trained on the same store side by side; runs from different stores refused."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routesae.cli import app
from routesae.report import build_comparison
from routesae.report import compare as C
from routesae.report.tables import read_csv_table
from tests.analysis_fixture import make_analysis

IDENTITY = "7b2256e1c4b78a3b5a61d219cfb7f195fc89b835b9ddddc07a9887dfb03d287c"


def _train_config(run: Path, identity: str = IDENTITY) -> None:
    (run / "train_config.json").write_text(json.dumps(
        {"store": "/stores/tiny", "store_summary": {"path": "/stores/tiny", "identity": identity}}))


def make_runs(root: Path, identity_b: str = IDENTITY) -> tuple[Path, Path]:
    """``root/routesae`` (the synthetic analysed RouteSAE run) and ``root/topk`` (a one-layer TopK run on the same
    store: config, eval, no analysis)."""
    rs = root / "routesae"
    shutil.move(str(make_analysis(root / "tmp")), rs)
    _train_config(rs)
    tk = root / "topk"
    tk.mkdir()
    cfg = json.loads((rs / "config.json").read_text())
    (tk / "config.json").write_text(json.dumps({**cfg, "arch": "topk", "layers": [3]}))
    ev = json.loads((rs / "eval.json").read_text())
    ev.update(arch="topk", layers=[3], run=str(tk), per_layer=[], routed_layers={})
    ev.pop("mean_p_star")
    ev["sae_space"] = {**ev["sae_space"], "nmse": 0.19, "explained_variance": 0.81}
    ev["splice"] = {**ev["splice"], "ce_spliced": 3.35, "ce_increase": 0.25, "ce_zero_ablated": 5.0,
                    "ce_recovered": (5.0 - 3.35) / (5.0 - 3.1), "kl": 0.3}
    (tk / "eval.json").write_text(json.dumps(ev))
    _train_config(tk, identity_b)
    return rs, tk


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    return make_runs(tmp_path)


def test_comparison_files_and_numbers(runs):
    rs, tk = runs
    paths = build_comparison([rs, tk])
    out = rs.parent / "comparison"
    assert set(paths) == {"report.html", "report.md", "comparison.json", "tables/metrics.csv",
                          "tables/routed_layers.csv"}
    assert all(p.parent in (out, out / "tables") and p.stat().st_size > 0 for p in paths.values())
    infos = C.load_runs([rs, tk])
    t = C.metrics_table(infos)
    row = t[(t["group"] == "splice") & (t["metric"] == "ce_increase")].iloc[0]
    assert (row["routesae"], row["topk"], row["better"]) == (0.3, 0.25, "low")
    back = read_csv_table(paths["tables/metrics.csv"])
    assert back[back["metric"] == "kl"]["topk"].tolist() == [0.3]
    f = {x.key: x for x in C.comparison_findings(infos)}
    assert f["data"].values["same_tokens"] is True
    assert f["splice.ce_increase"].values == {"best": "topk", "topk": 0.25, "routesae": 0.3}
    assert f["splice.ce_increase"].text == "CE increase: topk 0.250 nats vs routesae 0.300 nats (better by 0.050 nats)."
    assert f["splice.ce_recovered"].values["best"] == "routesae"
    assert set(f["ablation_caveat"].values) == {"routesae", "topk"}  # their zero-ablations differ: said so
    assert f["routed_layers"].values == {"routesae": {"layer": 1, "fraction": 0.47}}
    assert "the layer" not in f["routed_layers"].text  # TopK sits at layer 3, not the top routed layer 1
    assert f["features"].values == {"routesae": 8, "topk": None}
    assert "topk not analysed (routesae analyze" in f["features"].text
    rl = C.routed_layers_table(infos)
    assert rl["layer"].tolist() == [1, 2, 3] and rl["topk"].tolist() == [0.0, 0.0, 1.0]
    assert rl["routesae"].tolist() == [0.47, 0.2, 0.33]
    summary = json.loads(paths["comparison.json"].read_text())
    assert [x["key"] for x in summary["findings"]] == list(f) and len(summary["runs"]) == 2

    html = paths["report.html"].read_text()
    md = paths["report.md"].read_text()
    for text in (html, md):
        assert text.index("Key findings") < text.index("Metrics side by side") < text.index("Glossary")
        assert "CE increase" in text and "93.6%" not in text
    links = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            assert tag != "script" or "src" not in a
            if "href" in a:
                links.append(a["href"])

    Links().feed(html)
    assert links and all(x.startswith("#") for x in links)
    assert html.count("<div class='fig") == 6


def test_different_stores_are_refused(tmp_path):
    rs, tk = make_runs(tmp_path, identity_b="f" * 64)
    with pytest.raises(ValueError, match="were trained on different stores") as exc:
        build_comparison([rs, tk])
    assert "\n" not in str(exc.value) and "routesae report RUN" in str(exc.value)
    res = CliRunner().invoke(app, ["report", str(rs), str(tk)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "different stores" in lines[0], res.output
    assert not (tmp_path / "comparison").exists()
    with pytest.raises(ValueError, match="listed twice"):
        build_comparison([rs, rs])
    with pytest.raises(FileNotFoundError, match="holds no trained SAE"):
        build_comparison([rs, tmp_path / "nothing"])


def test_cli_writes_the_comparison(runs, tmp_path):
    rs, tk = runs
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["report", str(rs), str(tk), "--out", str(out), "--format", "html,md"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out / 'report.html'}" in res.output and f"2 files in {out}" in res.output


def test_pdf_skipped_without_chromium(runs, monkeypatch):
    import routesae.report.pdf as P

    monkeypatch.setattr(P, "find_chromium", lambda: None)
    rs, _ = runs
    res = CliRunner().invoke(app, ["report", str(rs), "--format", "md,pdf"])
    assert res.exit_code == 0, res.output
    assert P.NO_CHROMIUM in res.output.splitlines()
    assert not (rs / "report" / "report.pdf").exists() and (rs / "report" / "report.md").exists()
