"""analyze-routing on the demo MoE (needed experts per token by domain) and on a natively dynamic
LongCat-Flash-style model (zero-computation experts), plus its command line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from routesae.analyze.routing import RoutingAnalysisConfig, RoutingAnalysisError, analyze_routing, default_k_grid

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("code", "math", "chat", "scripture")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one torch thread is ~5x faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory) -> Path:
    """One document of each of four domains from the demo corpus' validation split."""
    picked = {}
    with gzip.open(ROOT / "data/corpus/val-00000.jsonl.gz", "rt") as f:
        for line in f:
            d = json.loads(line)
            if d["domain"] in DOMAINS and d["domain"] not in picked:
                picked[d["domain"]] = {"text": d["text"][:200], "domain": d["domain"]}
    path = tmp_path_factory.mktemp("demo-corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(picked[d]) + "\n" for d in DOMAINS))
    return path


@pytest.fixture(scope="module")
def demo_routing(demo_corpus, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("routing") / "demo"
    return analyze_routing(RoutingAnalysisConfig(
        model=str(ROOT / "data/demo-moe"), corpus=str(demo_corpus), out=str(out), max_tokens=1000, ctx=64,
        batch_size=8, packing="pad", k_grid=[1, 2, 3, 4, 32], p_grid=[0.5, 1.0], per_layer="3",
        ablate_layers="3", ablate_experts=[0, 1], device="cpu", progress=False))


def test_needed_experts_on_the_demo_model(demo_routing):
    out = demo_routing
    s = json.loads((out / "summary.json").read_text())
    assert s["top_k"] == 4 and s["default_eps"] == 0.01
    assert set(s["domains"]) == set(DOMAINS) and sum(s["domains"].values()) == s["tokens"] > 150
    ne = pd.read_parquet(out / "needed_experts.parquet")
    head = ne[(ne.scope == "all") & (ne.eps == 0.01)]
    overall = head[head.domain == "all"].set_index("needed_k")["fraction"]
    assert overall.sum() == pytest.approx(1.0)
    assert len(overall) >= 2 and overall.max() < 0.95, "needed experts must not all sit at one k'"
    assert set(head.domain) == {"all", *DOMAINS}
    for _, g in head[head.domain != "all"].groupby("domain"):
        assert g["fraction"].sum() == pytest.approx(1.0) and g["needed_k"].between(1, 4).all()
    assert set(ne[ne.scope == "layer"]["layer"]) == {3}
    cs = pd.read_parquet(out / "compute_saved.parquet")
    saved = cs[(cs.scope == "all") & (cs.domain == "all")].set_index("eps")["compute_saved"]
    assert 0 <= saved[0.001] <= saved[0.01] <= saved[0.1] < 1  # larger eps, more saved
    assert s["compute_saved"]["0.01"] == pytest.approx(saved[0.01])
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(tokens) == s["tokens"] and tokens["needed_k_eps0.01"].between(1, 4).all()


def test_loss_topp_and_ablation_tables(demo_routing):
    out = demo_routing
    loss = pd.read_parquet(out / "loss_by_k.parquet").query("domain == 'all'").set_index("k")
    assert loss.loc[4, "kl"] == 0 and loss.loc[4, "ce_increase"] == 0  # k' = k is the model itself
    assert loss.loc[1, "ce_increase"] > 0 and loss.loc[1, "kl"] > loss.loc[3, "kl"]
    topp = pd.read_parquet(out / "topp.parquet").query("domain == 'all'").set_index("p")
    assert topp.loc[1.0, "mean_experts"] == 32 and 1 <= topp.loc[0.5, "mean_experts"] < 32
    ept = pd.read_parquet(out / "experts_per_token.parquet")
    own = ept[ept.override == "model"]
    assert (own["n_active"] == 4).all() and set(own.layer) == set(range(8))
    half = ept[(ept.override == "topp:0.5") & (ept.domain == "all")]
    assert half["n_active"].nunique() > 1
    abl = pd.read_parquet(out / "ablation.parquet")
    assert set(abl.expert) == {0, 1} and set(abl.layer) == {3} and set(abl.domain) == {"all", *DOMAINS}


def test_longcat_native_dynamic_routing(tiny_ckpt, corpus_jsonl, tiny_store, tmp_path):
    """Zero-computation experts: n_active varies per token in the store, the expert tables and analyze-routing."""
    from routesae.analyze.experts import expert_tables

    store = tiny_store(tmp_path / "store", arch="longcat_flash", max_tokens=96)
    r = store.load_router(0)
    idx, n_active = r["indices"].long(), r["n_active"].long()
    assert store.manifest["n_experts"] == 8 and idx.shape[1:] == (2, 3)
    assert (idx >= 8).any() and pd.Series(n_active.flatten().tolist()).nunique() > 1
    assert (n_active == ((idx >= 0) & (idx < 8)).sum(-1)).all()
    ept = expert_tables(store)["experts_per_token"]
    assert ept["n_active"].nunique() > 1 and ept.groupby(["layer", "domain"])["fraction"].sum().round(6).eq(1).all()

    out = analyze_routing(RoutingAnalysisConfig(
        model=str(tiny_ckpt("longcat_flash")), corpus=str(corpus_jsonl), out=str(tmp_path / "r"), max_tokens=48,
        ctx=24, batch_size=2, k_grid=[1, 2, 3], p_grid=[0.5, 1.0], per_layer="none", ablate_layers="1",
        ablate_experts=[0], device="cpu", progress=False))
    s = json.loads((out / "summary.json").read_text())
    assert s["n_experts"] == 8 and s["scored_experts"] == 12 and s["moe_layers"] == [0, 1]
    ept = pd.read_parquet(out / "experts_per_token.parquet")
    own = ept[(ept.override == "model") & (ept.domain == "all")]
    assert own["n_active"].nunique() > 1 and own["n_active"].max() <= 3
    full = ept[(ept.override == "topp:1") & (ept.domain == "all")]
    assert (full["n_active"] == 8).all()  # every real expert (the 4 identity experts not counted)


def test_errors_and_cli(tiny_ckpt, corpus_jsonl, tmp_path):
    from typer.testing import CliRunner

    from routesae.cli import app

    assert default_k_grid(4, 32) == [1, 2, 3, 4, 8, 16, 32] and default_k_grid(2, 8) == [1, 2, 4, 8]
    with pytest.raises(RoutingAnalysisError, match="needs an MoE model"):
        analyze_routing(RoutingAnalysisConfig(model=str(tiny_ckpt("llama")), corpus=str(corpus_jsonl),
                                              out=str(tmp_path / "x"), device="cpu", progress=False))
    runner = CliRunner()
    res = runner.invoke(app, ["analyze-routing", str(tiny_ckpt("olmoe")), "--corpus", str(corpus_jsonl), "--out",
                              str(tmp_path / "cli"), "--max-tokens", "24", "--ctx", "24", "--k-grid", "1,2",
                              "--p-grid", "0.5", "--eps", "0.05", "--per-layer", "none", "--ablate-layers", "none",
                              "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert "compute saved eps 0.05" in res.output
    assert (tmp_path / "cli" / "needed_experts.parquet").is_file()
    res = runner.invoke(app, ["capture", str(tiny_ckpt("olmoe")), str(corpus_jsonl), "--out", str(tmp_path / "c"),
                              "--routing-override", "topk=2"])
    assert res.exit_code == 2 and "topk:K, topp:P" in res.output
    res = runner.invoke(app, ["analyze-routing", str(tiny_ckpt("olmoe")), "--corpus", str(corpus_jsonl), "--out",
                              str(tmp_path / "y"), "--ablate-layers", "9"])
    assert res.exit_code == 2 and "out of range" in res.output
