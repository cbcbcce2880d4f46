"""Causal tools (issue 20) on tiny random models (never mocked): steering, contrast, shared/routed split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

from routesae.causal import GenerateConfig, Steering, SteeringError, generate, steer_compare, steered_logits
from routesae.causal.contrast import (
    contrast_from_expert_domain,
    contrast_table,
    routing_counts,
    steering_setting,
)
from routesae.causal.shared import shared_hooks, split_parts, token_metrics
from routesae.cli import app
from routesae.models.intervene import RoutingOverride, RoutingOverrideError
from routesae.models.load import decoder_layers
from routesae.models.routers import adapter_for
from routesae.models.tiny import build_tiny, tiny_tokenizer
from routesae.sae import SAEConfig, build_sae
from routesae.sae.ops import STD_EPS, standardize
from tests.test_routing import one_thread  # noqa: F401  (fixture: one torch thread in this module)

runner = CliRunner()


def _ids(b=2, t=10):
    return torch.randint(3, 320, (b, t), generator=torch.Generator().manual_seed(3))


def _sae(arch, layers, seed=0, **kw):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch, 32, 64, 4, layers, **kw)).eval()
    with torch.no_grad():
        sae.b_enc.add_(0.5)  # more latents above zero, so edits meet live and dead latents
        if arch == "routesae":
            sae.layer_center.normal_(0, 0.1)
    return sae


def _clean(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------- zero steering is the clean forward


@pytest.mark.parametrize("arch,sae_arch,layers", [("olmoe", "routesae", [1, 2]), ("olmoe", "topk", [2]),
                                                  ("qwen2_moe", "mlsae", [0, 2]), ("deepseek_v3", "routesae", [1, 3])])
def test_zero_steering_reproduces_clean_logits_exactly(models, arch, sae_arch, layers):
    model, ids = models(arch), _ids()
    layer = adapter_for(model).moe_layers()[0]
    s = Steering.build(_sae(sae_arch, layers), ["5*1", "9+0"], f"bias:3=0,6=0@layer{layer}", model=model)
    fw = steered_logits(model, ids, s, record=True)
    assert torch.equal(fw.logits, _clean(model, ids))
    assert (fw.edits.layer >= 0).all()  # the edits were written (a change of 0) at every token


def _after_block(model, layer, store):
    """A pre-hook on block layer+1 keeping block ``layer``'s output as the next block reads it (after edits)."""
    def hook(module, args, kwargs):
        store["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
    return decoder_layers(model)[layer + 1].register_forward_pre_hook(hook, with_kwargs=True)


def _manual_change(sae, x, scale, latent, value):
    """The reconstruction's change for clamping ``latent`` to ``value``, from encode/decode directly."""
    val, idx = sae.encode(x)
    z = (val * (idx == latent)).sum(-1, keepdim=True)
    before = sae.decode(val, idx)
    after = sae.decode(torch.cat([val, value - z], 1), torch.cat([idx, torch.full_like(z, latent).long()], 1))
    return (after - before) * scale


@pytest.mark.parametrize("sae_arch", ["topk", "routesae"])
def test_feature_clamp_writes_the_decoder_change_on_the_residual_scale(models, sae_arch):
    model, ids = models("olmoe"), _ids()
    layers = [2] if sae_arch == "topk" else [1, 2]
    sae = _sae(sae_arch, layers)
    got, ref = {}, {}
    handle = _after_block(model, layers[0], ref)
    with torch.no_grad():
        model(input_ids=ids)
        if sae_arch == "routesae":  # the clean stack decides the routed layer
            acts = {}
            hs = [decoder_layers(model)[j].register_forward_hook(lambda m, a, o, j=j: acts.__setitem__(j, o))
                  for j in layers]
            model(input_ids=ids)
            for h in hs:
                h.remove()
    handle.remove()
    handle = _after_block(model, layers[0], got)
    steered_logits(model, ids, Steering.build(sae, "7=3"))
    handle.remove()
    h = ref["h"].reshape(-1, 32)
    with torch.no_grad():
        if sae_arch == "topk":
            x, _, std = standardize(h)
            want = h + _manual_change(sae, x, std + STD_EPS, 7, 3.0)
            rows = torch.arange(h.shape[0])
        else:
            stack = torch.stack([acts[j].reshape(-1, 32) for j in layers], 1)
            probs, pos = sae.route(stack)
            rows = (pos == 0).nonzero().squeeze(-1)  # tokens routed to the first layer: nothing before them changed
            assert rows.numel() > 0
            x, _, std = standardize(h[rows], shift=sae.layer_center[0])
            p = probs[rows, 0:1]
            want = h[rows] + _manual_change(sae, p * x, (std + STD_EPS) / p, 7, 3.0)
    assert torch.allclose(got["h"].reshape(-1, 32)[rows], want, atol=1e-5)
    assert not torch.allclose(got["h"].reshape(-1, 32)[rows], h[rows], atol=1e-3)


# ---------------------------------------------------------------- expert steering


def _captured(model, override):
    """The routing capture records (adapter hooks) and HF's own router logits under ``override``."""
    adapter = adapter_for(model)
    got = {}
    handles = [h for layer in adapter.moe_layers() for h in adapter.attach(layer, got.__setitem__)]
    try:
        from routesae.models.intervene import override_routing

        with torch.no_grad(), override_routing(model, override):
            out = model(input_ids=_ids(), output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    return got, out.router_logits


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_forbidden_expert_is_never_selected_even_when_boosted(models, arch):
    model = models(arch)
    moe = adapter_for(model).moe_layers()
    got, _ = _captured(model, f"bias:3=20;forbid:3@layer{moe[0]}")
    idx = got[moe[0]].indices
    assert not (idx == 3).any()
    for layer in moe[1:] if arch != "deepseek_v3" else ():  # boosted by 20 elsewhere: in every token's set
        assert (got[layer].indices == 3).any(-1).all()  # (DeepSeek-V3: a saturated sigmoid in a group left out)


def test_bias_matches_a_recomputation_from_hf_router_logits(models):
    model = models("olmoe")
    got, router_logits = _captured(model, "bias:1=1.5,4=-0.7@layer2")
    raw = router_logits[2].float()  # HF records the raw logits; the bias is applied after them
    biased = raw + torch.tensor([0, 1.5, 0, 0, -0.7, 0, 0, 0])
    want = torch.topk(torch.softmax(biased, -1), 2, -1)
    assert torch.equal(got[2].indices.sort(-1).values, want.indices.sort(-1).values)
    assert torch.allclose(got[2].weights.sum(-1), want.values.sum(-1), atol=1e-6)  # OLMoE: no renormalisation


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])
def test_forced_expert_is_in_every_set(models, arch):
    model = models(arch)
    layer = adapter_for(model).moe_layers()[-1]
    got, _ = _captured(model, f"force:5@layer{layer}")
    assert (got[layer].indices == 5).any(-1).all()
    assert got[layer].indices.shape[1] == 2
    got, _ = _captured(model, f"topp:0.3;force:5@layer{layer}")
    assert (got[layer].indices == 5).any(-1).all()


def test_override_parse_round_trip():
    ov = RoutingOverride.parse("bias:3=2,7=-1.5@layer2; force:1 ; forbid:4,5@layers1:2")
    assert str(ov) == "bias:3=2,7=-1.5@layers2;force:1;ablate:4,5@layers1,2"
    plans = ov.plans([0, 1, 2])
    assert plans[2].bias == ((3, 2.0), (7, -1.5)) and plans[2].ablate == (4, 5) and plans[0].force == (1,)
    assert RoutingOverride.parse(str(ov)) == ov


# ---------------------------------------------------------------- generation


def test_same_seed_gives_the_same_generation_and_zero_steering_changes_nothing(models):
    model, tok = models("olmoe"), tiny_tokenizer()
    cfg = GenerateConfig(max_new_tokens=6, temperature=1.0, seed=4)
    prompt = [1, 40, 41, 42]
    a = generate(model, prompt, None, cfg)
    assert a == generate(model, prompt, Steering.build(experts="bias:2=0", model=model), cfg)
    assert a != generate(model, prompt, None, GenerateConfig(max_new_tokens=6, temperature=1.0, seed=5))
    sae = _sae("routesae", [1, 2])
    res = steer_compare(model, tok, "The quick brown fox", Steering.build(sae, "7=6", "bias:3=8", model=model),
                        GenerateConfig(max_new_tokens=5, temperature=1.0, seed=1))
    n = res["prompt_tokens"]
    assert len(res["clean"]["ids"]) == len(res["steered"]["ids"]) == n + 5
    assert res["clean"]["ids"][:n] == res["steered"]["ids"][:n]
    assert res["next_token"]["kl_last"] > 0 and len(res["next_token"]["top_up"]) == 10
    lat = res["steered"]["latents"]["7"]
    assert all(v == 6.0 for v in lat["after"])
    assert res["clean"]["latents"]["7"]["before"] == res["clean"]["latents"]["7"]["after"]
    route = res["steered"]["routing"]["1"]["experts"]
    assert len(route) == n + 5 and all(3 in r for r in route)  # bias 8 on a router with logits std ~1
    json.dumps(res)  # JSON-ready


def test_bad_steering_requests_are_one_line(models):
    model, sae = models("qwen2_moe"), _sae("topk", [2])
    cases = [
        (lambda: Steering.build(sae, "999=1"), "unknown latent"),
        (lambda: Steering.build(sae, "7~1"), "cannot read feature edit"),
        (lambda: Steering.build(sae, "7=1,7*2"), "edited twice"),
        (lambda: Steering.build(None, "7=1"), "need an SAE run"),
        (lambda: Steering.build(_sae("routesae", [1, 2], routing="soft"), "7=1"), "soft routing"),
        (lambda: Steering.build(experts="bias:9=1", model=model), "expert out of range"),
        (lambda: Steering.build(experts="bias:2=1@layer1", model=model), "not MoE layers"),
        (lambda: Steering.build(experts="force:1;forbid:1", model=model), "both forced and ablated"),
        (lambda: Steering.build(experts="force:1,2,3", model=model), "force at most 2"),
        (lambda: Steering.build(experts="bias:2", model=model), "cannot read routing override"),
        (lambda: Steering.build(experts="bias:1=1", model=build_tiny("llama")), "needs an MoE model"),
        (lambda: GenerateConfig(max_new_tokens=0).check(), "--max-new-tokens"),
    ]
    for call, words in cases:
        with pytest.raises((SteeringError, RoutingOverrideError)) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


# ---------------------------------------------------------------- contrast


def test_contrast_table_by_hand():
    hits_a = np.array([[50, 10], [0, 30]])
    hits_b = np.array([[25, 40], [0, 30]])
    t = contrast_table(hits_a, 100, hits_b, 50, [3, 5])
    assert (t.iloc[0]["layer"], t.iloc[0]["expert"]) == (3, 0)  # ties (0.0) by layer, then expert
    row = t[(t.layer == 3) & (t.expert == 1)].iloc[0]
    assert row["risk_diff"] == pytest.approx(0.1 - 0.8)
    assert row["z"] == pytest.approx(-0.7 / np.sqrt(0.1 * 0.9 / 100 + 0.8 * 0.2 / 50))
    assert list(t["risk_diff"]) == sorted(t["risk_diff"], reverse=True) and list(t["rank"]) == [1, 2, 3, 4]
    s = steering_setting(t, top=2, bias=1.5)
    assert RoutingOverride.parse(s).plans([3, 5])  # a valid override
    assert steering_setting(t, top=1, mode="force", toward="b") == "force:1@layer3"


def test_routing_counts_match_hf_router_logits(models):
    model, tok = models("olmoe"), tiny_tokenizer()
    texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b"]
    hits, n, layers = routing_counts(model, tok, texts, ctx=64, batch=1)
    want = np.zeros_like(hits)
    total = 0
    for t in texts:
        ids = torch.tensor([[1] + tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            rl = model(input_ids=ids, output_router_logits=True).router_logits
        total += ids.shape[1] - 1
        for li in range(len(layers)):
            top = torch.topk(torch.softmax(rl[li][1:].float(), -1), 2, -1).indices  # BOS left out
            want[li] += np.bincount(top.flatten().numpy(), minlength=8)
    assert n == total and np.array_equal(hits, want)


# ---------------------------------------------------------------- shared versus routed


def _manual_block(block, x, arch):
    """The MoE block recomputed from its weights: (shared, routed, gate or None) for inputs ``x`` [n, d]."""
    def mlp(m, v):
        return m.down_proj(F.silu(m.gate_proj(v)) * m.up_proj(v))

    _, w, idx = block.gate(x)
    routed = torch.zeros_like(x)
    ex = block.experts
    for slot in range(idx.shape[1]):
        for e in idx[:, slot].unique().tolist():
            rows = idx[:, slot] == e
            g, u = F.linear(x[rows], ex.gate_up_proj[e]).chunk(2, -1)
            routed[rows] += F.linear(F.silu(g) * u, ex.down_proj[e]) * w[rows, slot, None]
    if arch != "deepseek_v3":  # Qwen2-MoE, Qwen3-Next: a sigmoid-gated shared expert
        gate = torch.sigmoid(block.shared_expert_gate(x))
        return gate * mlp(block.shared_expert, x), routed, gate[:, 0]
    return mlp(block.shared_experts, x), routed, None


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "qwen3_next"])
def test_shared_and_routed_parts_sum_to_the_mlp_output(models, arch):
    model = models(arch)
    adapter = adapter_for(model)
    inputs = {}
    pre = [adapter.moe_block(j).register_forward_pre_hook(lambda m, a, j=j: inputs.__setitem__(j, a[0]))
           for j in adapter.moe_layers()]
    with torch.no_grad(), shared_hooks(model) as parts:
        model(input_ids=_ids())
    for h in pre:
        h.remove()
    assert sorted(parts) == adapter.moe_layers()
    for layer, state in parts.items():
        p = split_parts(state)
        x = inputs[layer].reshape(-1, 32)
        with torch.no_grad():
            shared, routed, gate = _manual_block(adapter.moe_block(layer), x, arch)
        assert torch.allclose(p["shared"], shared, atol=1e-6) and torch.allclose(p["routed"], routed, atol=1e-6)
        assert torch.allclose(shared + routed, p["output"], atol=1e-6)
        m = token_metrics(p)
        want = shared.norm(dim=-1) / (shared.norm(dim=-1) + routed.norm(dim=-1))
        assert np.allclose(m["share_norm"], want.numpy(), atol=1e-5)
        y = p["output"].double()
        routed_proj = ((p["routed"].double() * y).sum(-1) / (y * y).sum(-1)).numpy()
        assert np.allclose(m["share_proj"] + routed_proj, 1.0, atol=1e-9)
        if gate is None:
            assert np.isnan(m["gate"]).all()
        else:
            assert np.allclose(m["gate"], gate.numpy(), atol=1e-6)


def test_shared_split_refuses_a_model_without_shared_experts(models):
    with pytest.raises(SteeringError, match="no shared experts.*qwen2_moe"):
        with shared_hooks(models("olmoe")):
            pass


# ---------------------------------------------------------------- command line, end to end


@pytest.fixture(scope="module")
def tiny_run(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    store = tiny_store(root / "store", max_tokens=300)
    res = runner.invoke(app, ["train", str(store.root), "--out", str(root / "run"), "--k", "4", "--latents", "64",
                              "--batch-tokens", "64", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    return store, root / "run"


def test_cli_steer_contrast_and_analyze_contrast(tiny_run, tiny_ckpt, corpus_jsonl, tmp_path):
    store, run = tiny_run
    res = runner.invoke(app, ["steer", "--run", str(run), "--prompt", "Once upon a <b>time</b>", "--feature", "3=4",
                              "--experts", "bias:1=2@layer2", "--max-new-tokens", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "clean  :" in res.output and "steered:" in res.output
    out = json.loads((run / "steer.json").read_text())
    assert out["steering"] == {"features": ["3=4"], "experts": "bias:1=2@layers2", "sae_arch": "routesae"}
    res = runner.invoke(app, ["steer", "--run", str(run), "--prompt", "x", "--feature", "9999=1", "--device", "cpu"])
    assert res.exit_code == 2 and "unknown latent" in res.output
    res = runner.invoke(app, ["contrast", str(tiny_ckpt("olmoe")), "--a", "math", "--b", "prose", "--corpus",
                              str(corpus_jsonl), "--out", str(tmp_path / "c"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "c" / "contrast.json").read_text())
    assert "routesae steer" in res.output and info["steering"] in res.output
    res = runner.invoke(app, ["analyze", str(run), "--contrast", "code:legal", "--no-model", "--device", "cpu"])
    assert res.exit_code == 2 and "['legal'] not in the analysed tokens" in res.output
    res = runner.invoke(app, ["analyze", str(run), "--contrast", "code:prose", "--no-model", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(run / "analysis" / "contrast.parquet")
    ed = pd.read_parquet(run / "analysis" / "expert_domain.parquet")
    assert table.equals(contrast_from_expert_domain(ed, "code", "prose"))
    settings = json.loads((run / "analysis" / "settings.json").read_text())
    assert settings["contrast"]["a"] == "code" and settings["contrast"]["steering"].startswith("bias:")
    # the counts behind the rates are the store's router records, counted again here
    assert len(store.shards) == 1
    router, tokens = store.load_router(0), pd.read_parquet(store.root / "tokens.parquet")
    n = min(len(tokens), router["indices"].shape[0])
    dom = tokens["domain"].to_numpy()[:n]
    body = ~((tokens["position"].to_numpy()[:n] == 0) & (tokens["token_id"].to_numpy()[:n] == 1))
    layer_pos = store.moe_layers.index(2)
    hits = router["indices"][:n, layer_pos].long()
    for d, col in (("code", "rate_a"), ("prose", "rate_b")):
        sel = torch.from_numpy(body & (dom == d))
        rate = np.bincount(hits[sel].flatten().numpy(), minlength=8) / int(sel.sum())
        got = table[table.layer == 2].sort_values("expert")[col].to_numpy()
        assert np.allclose(got, rate)


def test_cli_analyze_shared(tiny_ckpt, corpus_jsonl, tmp_path):
    res = runner.invoke(app, ["analyze-shared", str(tiny_ckpt("qwen2_moe")), "--corpus", str(corpus_jsonl), "--out",
                              str(tmp_path / "sh"), "--max-tokens", "200", "--ctx", "32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    dom = pd.read_parquet(tmp_path / "sh" / "shared_domain.parquet")
    pos = pd.read_parquet(tmp_path / "sh" / "shared_position.parquet")
    assert set(dom["layer"]) == {0, 2, 3} and {"code", "prose"} <= set(dom["domain"])
    assert dom["share_norm"].between(0, 1).all() and dom["gate"].between(0, 1).all()
    assert "BOS" in set(pos["bucket"]) and pos.groupby("layer")["tokens"].sum().eq(200).all()
    res = runner.invoke(app, ["analyze-shared", str(tiny_ckpt("olmoe")), "--corpus", str(corpus_jsonl), "--out",
                              str(tmp_path / "x"), "--device", "cpu"])
    assert res.exit_code == 2 and "no shared experts" in res.output


def test_report_shows_contrast_and_shared_tables_escaped(tiny_run, tiny_ckpt, corpus_jsonl):
    _, run = tiny_run
    if not (run / "analysis" / "contrast.parquet").is_file():
        assert runner.invoke(app, ["analyze", str(run), "--contrast", "code:prose", "--no-model"]).exit_code == 0
    sh = run / "shared"
    res = runner.invoke(app, ["analyze-shared", str(tiny_ckpt("qwen2_moe")), "--corpus", str(corpus_jsonl), "--out",
                              str(sh), "--max-tokens", "100", "--ctx", "32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads((sh / "summary.json").read_text())
    summary["corpus"] = "<script>alert(1)</script>"  # text from the user's side is escaped
    (sh / "summary.json").write_text(json.dumps(summary))
    res = runner.invoke(app, ["report", str(run), "--format", "html,md"])
    assert res.exit_code == 0, res.output
    html = (run / "report" / "report.html").read_text()
    md = (run / "report" / "report.md").read_text()
    for text in (html, md):
        assert "Behaviour-linked experts" in text and "Shared versus routed computation" in text
        assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;" in html and "routesae steer --run" in html
