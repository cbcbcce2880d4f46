"""Feature tables: the counting protocol by hand, lift by hand, brute-force oracles on a tiny store,
logit lens against the model's own norm and lm_head, bounded state, and analyze() end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from routesae.analyze.attribution import ExpertAttribution
from routesae.analyze.features import (
    FeatureStats,
    count_interpretable,
    feature_tables,
    iter_chunks,
    store_domains,
)
from routesae.analyze.lens import logit_lens
from routesae.analyze.run import AnalyzeConfig, analyze
from routesae.sae import SAEConfig, build_sae
from routesae.store import TOKENS_DIR

torch.set_num_threads(1)
LAYERS = [1, 2, 3]
M = 48


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("analyze") / "store", batch_size=2, layers="0:3", shard_mb=0.01,
                      max_tokens=480)


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    s = build_sae(SAEConfig(arch="routesae", d_in=32, n_latents=M, k=4, layers=LAYERS, aux_k=0, bf16=False))
    with torch.no_grad():
        s.b_enc.normal_(0, 0.2)
    return s.eval()


@pytest.fixture(scope="module")
def tables(sae, store):
    return feature_tables(sae, store, top_contexts=3, window=4, quantile_bins=2, quantile_samples=2, hist_bins=5)


@torch.no_grad()
def _dense(sae, store):
    """Dense codes [N, M], routed layer position [N] and the token table, in shard/row order."""
    h = torch.cat([torch.stack([store.load_resid(s["index"], j) for j in LAYERS], 1) for s in store.shards]).float()
    out = sae(h)
    z = torch.zeros(h.shape[0], M).scatter_(1, out.top_idx, out.top_val)
    return z, out.routed_layer, store.tokens()


def test_counting_protocol_by_hand():
    lat, tok, act = [], [], []

    def fire(latent, token, times, a=1.0):
        lat.extend([latent] * times)
        tok.extend([token] * times)
        act.extend([a] * times)

    for i in range(6):  # latent 0: 6 tokens x 3 firings -> 2 count per bucket -> 12 contexts: kept
        fire(0, f"Tok{i}", 2)
        fire(0, f"tok{i}", 1)  # same bucket, lower-cased
    for i in range(40):  # latent 1: 40 buckets > 32: dropped
        fire(1, f"w{i}", 1)
    fire(2, "a", 3)  # latent 2: 2 + 2 = 4 contexts < 5: dropped
    fire(2, "b", 2)
    fire(3, "x", 1, a=10.0)  # latent 3: 6 firings below half its max do not count -> 1 context
    for i in range(6):
        fire(3, f"y{i}", 1, a=4.0)
    df = count_interpretable(lat, tok, act, n_latents=5)
    assert df["contexts"].tolist() == [12, 0, 4, 1, 0]
    assert df["buckets"].tolist()[0] == 6 and df["dropped"].tolist() == [False, True, False, False, False]
    assert df["interpretable"].tolist() == [True, False, False, False, False]
    assert count_interpretable(lat, tok, act, n_latents=5, fire_fraction=0.3)["interpretable"].tolist()[3]


def test_expert_lift_by_hand():
    acc = ExpertAttribution(n_latents=2, moe_layers=[4], n_experts=2)
    idx = torch.tensor([[[0]], [[0]], [[1]], [[0]]], dtype=torch.int16)  # k=1, 4 tokens
    acc.add(torch.tensor([0, 0, 1]), torch.tensor([2, 3, 3]), idx)
    t = acc.tables(np.array([2, 1]), np.array([5, 3]), min_count=1, min_count_top=1)
    le = t["latent_experts"].set_index(["latent", "expert"])
    assert le.loc[(0, 0), "lift"] == pytest.approx(0.5 / 0.75) and le.loc[(0, 1), "lift"] == pytest.approx(2.0)
    assert le.loc[(1, 0), "share"] == 1.0 and le.loc[(0, 1), "base_share"] == 0.25
    assert le.loc[(0, 1), "at_routed_layer"] and not le.loc[(1, 0), "at_routed_layer"]  # no MoE layer <= 3
    top = t["top"].set_index("latent")
    assert top.loc[0, "top_expert"] == 1 and top.loc[0, "top_expert_lift"] == pytest.approx(2.0)
    assert top.loc[1, "top_expert"] == -1 and top.loc[1, "top_expert_layer"] == -1
    el = t["expert_latents"]
    assert el[(el.expert == 0)].sort_values("rank")["latent"].tolist() == [1, 0]


def test_against_brute_force(sae, store, tables):
    z, routed, tok = _dense(sae, store)
    lat = tables["latents"]
    active = z > 0
    assert lat["count"].tolist() == active.sum(0).tolist()
    assert np.allclose(lat["max_act"], z.max(0).values.numpy(), rtol=1e-5)
    assert np.allclose(lat["density"], active.double().mean(0).numpy())
    assert [int(sum(h)) for h in lat["hist_counts"]] == lat["count"].tolist()
    ctx, ctx_pos = tok["context"].to_numpy(), tok["ctx_pos"].to_numpy()
    top = tables["contexts"][tables["contexts"]["kind"] == "top"]
    for i in range(M):
        order = torch.argsort(z[:, i], descending=True)[:3]
        order = order[z[order, i] > 0]
        got = top[top.latent == i].sort_values("rank")
        assert np.allclose(got["act"], z[order, i].numpy(), rtol=1e-5)
        for (_, row), r in zip(got.iterrows(), order.tolist()):
            rows = [j for j in range(r - 4, r + 5) if 0 <= j < len(tok) and ctx[j] == ctx[r]]
            assert row["tokens"] == tok["token"].iloc[rows].tolist() and rows[row["center"]] == r
            assert np.allclose(row["acts"], z[rows, i].numpy(), rtol=1e-5)
            assert row["domain"] == tok["domain"].iloc[r] and row["doc_id"] == tok["doc_id"].iloc[r]
            assert row["routed_layer"] == LAYERS[int(routed[r])] and ctx_pos[rows[0]] == ctx_pos[r] - row["center"]
    # domains: counts, shares and lift over the base rates
    ld = tables["latent_domains"]
    base = tok["domain"].value_counts(normalize=True)
    for i in (0, 7):
        want = tok["domain"][active[:, i].numpy()].value_counts()
        got = ld[ld.latent == i].set_index("domain")
        assert got["count"].to_dict() == want.to_dict()
        for d, n in want.items():
            assert got.loc[d, "lift"] == pytest.approx(n / want.sum() / base[d])
    # routed-layer fractions and quantile samples
    fr = np.stack(lat["routed_layer_fractions"])
    i = int(lat["count"].idxmax())
    want = torch.bincount(routed[active[:, i]], minlength=3).double() / active[:, i].sum()
    assert np.allclose(fr[i], want.numpy())
    q = tables["contexts"][tables["contexts"]["kind"].isin(["q0", "q1"])]
    assert len(q) and (q.groupby(["latent", "kind"]).size() <= 2).all()
    assert (q["act"] > 0).all() and (q["act"] <= lat.set_index("latent").loc[q["latent"], "max_act"].to_numpy()).all()


def test_neighbours_and_expert_table(sae, store, tables):
    lat = tables["latents"]
    w = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)
    cos = w @ w.t()
    cos.fill_diagonal_(-2)
    want = torch.argsort(cos, dim=1, descending=True)[:, :10]
    assert np.array_equal(np.stack(lat["neighbours"]), want.numpy())
    assert np.allclose(np.stack(lat["neighbour_cos"]), cos.gather(1, want).numpy(), atol=1e-6)
    z, _, tok = _dense(sae, store)
    idx = torch.cat([store.load_router(s["index"])["indices"] for s in store.shards]).long()
    le = tables["latent_experts"]
    r = le.iloc[0]
    m = store.moe_layers.index(int(r["layer"]))
    hit = (idx[:, m] == int(r["expert"])).any(-1)
    act = z[:, int(r["latent"])] > 0
    assert r["count"] == int((hit & act).sum()) and r["base_share"] == pytest.approx(float(hit.double().mean()))
    assert r["lift"] == pytest.approx(float((hit & act).sum() / act.sum() / hit.double().mean()))


def test_logit_lens_matches_model(tiny_ckpt, sae):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_ckpt("olmoe"))).eval()
    df = logit_lens(sae.W_dec, model, strings=np.array([f"t{i}" for i in range(320)], dtype=object))
    logits = (sae.W_dec.detach() * model.model.norm.weight.detach()) @ model.lm_head.weight.detach().t()
    top, bot = logits.topk(10, dim=1), logits.topk(10, dim=1, largest=False)
    assert df["logit_pos"][5] == [f"t{i}" for i in top.indices[5].tolist()]
    assert np.allclose(np.stack(df["logit_pos_values"]), top.values.numpy(), atol=1e-5)
    assert df["logit_neg"][5] == [f"t{i}" for i in bot.indices[5].tolist()]
    assert np.allclose(np.stack(df["logit_neg_values"]), bot.values.numpy(), atol=1e-5)


def test_state_is_bounded(sae, store):
    assert len(store.shards) >= 5
    domains = store_domains(store, store.n_tokens)
    stats = FeatureStats(M, LAYERS, domains, 320, ExpertAttribution(M, store.moe_layers, 8), top_contexts=3)
    sizes = []
    for ch in iter_chunks(sae, store, store.n_tokens, domains):
        stats.add_pass1(ch)
        sizes.append(stats.nbytes())
    stats.finish_pass1()
    for ch in iter_chunks(sae, store, store.n_tokens, domains):
        stats.add_pass2(ch)
        sizes.append(stats.nbytes())
    assert len(set(sizes)) == 1 and len(sizes) >= 10
    assert int((stats.top.score > -np.inf).sum(1).max()) <= 3


DOC_COLUMNS = {
    "latents": "latent density count mean_act max_act top_domain top_domain_lift top_routed_layer "
               "routed_layer_fractions top_expert_layer top_expert top_expert_lift interpretable top_token "
               "neighbours neighbour_cos logit_pos logit_neg logit_pos_values logit_neg_values hist_edges hist_counts",
    "contexts": "latent kind rank act tokens acts center domain doc_id routed_layer",
    "latent_domains": "latent domain count share base_share lift",
    "latent_experts": "latent layer expert count share base_share lift at_routed_layer",
    "expert_latents": "layer expert rank latent lift count",
    "expert_domain": "layer domain expert tokens hits_topk share_topk hits_top1 share_top1 uniform_topk uniform_top1 "
                     "lift_topk base_topk selectivity",
    "expert_stats": "layer expert load load_top1 mean_weight specialisation top_domain collapse_low collapse_high "
                    "top_tokens top_token_shares base_topk selectivity top_share hub_domains hub",
    "layer_stats": "layer n_experts top_k tokens load_cv load_entropy_norm max_vio switch_aux router_entropy "
                   "repetition_rate domain_specialisation domain_selectivity hubs bos_tokens",
    "domain_layer": "layer domain tokens router_entropy specialisation mean_active repetition_rate selectivity owner",
    "experts_per_token": "layer domain n_active tokens fraction",
    "position_profile": "layer bucket tokens router_entropy specialisation max_share selectivity",
    "coactivation": "layer expert_i expert_j count rate",
}


def test_analyze_end_to_end(sae, store, tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    sae.save_pretrained(run)
    (run / "eval.json").write_text(json.dumps({"sae_space": {"nmse": 0.5}}))
    cfg = AnalyzeConfig(run=str(run), store=str(store.root), model=str(tiny_ckpt("olmoe")), tokens=300,
                        device="cpu", batch_tokens=128, top_contexts=4)
    out = analyze(cfg)
    files = {p.name for p in out.iterdir()}
    assert files == {f"{n}.parquet" for n in DOC_COLUMNS} | {"feature_count.json", "settings.json", "summary.json"}
    for name, cols in DOC_COLUMNS.items():
        assert set(cols.split()) <= set(pd.read_parquet(out / f"{name}.parquet").columns), name
    lat = pd.read_parquet(out / "latents.parquet")
    assert len(lat) == M and len(lat["logit_pos"][0]) == 10 and len(lat["hist_edges"][0]) == 21
    fc = json.loads((out / "feature_count.json").read_text())
    assert fc["tokens"] == 300 and fc["count"] == int(lat["interpretable"].sum())
    assert set(fc["settings"]) == {"threshold_rule", "threshold_value", "context", "max_per_bucket", "max_buckets",
                                   "min_contexts"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"] == {"sae_space": {"nmse": 0.5}} and summary["tokens"] == 300
    assert sum(summary["domains"].values()) == 300 and summary["moe_layers"] == store.moe_layers
    settings = json.loads((out / "settings.json").read_text())
    assert {"tokens", "context_window", "top_contexts", "quantile_bins", "hist_bins", "min_vocab_count",
            "feature_count", "min_load_ratio"} <= set(settings) and settings["min_load_ratio"] == 0.5
    first = (out / "latents.parquet").stat().st_ino
    analyze(cfg)  # again: swapped in whole, no leftovers
    assert sorted(p.name for p in run.iterdir()) == ["analysis", "config.json", "eval.json", "sae.safetensors"]
    assert (out / "latents.parquet").stat().st_ino != first
    assert pd.read_parquet(store.root / TOKENS_DIR / "part-00000.parquet").shape[0] > 0
