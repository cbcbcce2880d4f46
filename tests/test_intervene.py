"""Routing interventions against hand-built cases, on tiny random models of every family."""

from __future__ import annotations

import math

import pytest
import torch

from routesae.models.intervene import LayerPlan, RoutingOverride, RoutingOverrideError, override_routing, reroute
from routesae.models.routers import adapter_for
from routesae.models.tiny import TINY_ARCHS
from tests.test_routing import one_thread  # noqa: F401  (fixture: one torch thread in this module)

MOE_ARCHS = [a for a in TINY_ARCHS if a != "llama"]


def _ids():
    return torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(3))


def _decisions(model, override):
    """The routing capture would record under ``override`` (adapter hooks registered before it)."""
    adapter = adapter_for(model)
    got = {}
    handles = [h for layer in adapter.moe_layers() for h in adapter.attach(layer, got.__setitem__)]
    try:
        with torch.no_grad(), override_routing(model, override, record=True) as active:
            logits = model(input_ids=_ids()).logits
    finally:
        for h in handles:
            h.remove()
    return got, active, logits


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_topk_at_model_k_reproduces_logits_exactly(models, arch):
    model = models(arch)
    with torch.no_grad():
        ref = model(input_ids=_ids()).logits
    got, active, logits = _decisions(model, f"topk:{adapter_for(model).top_k()}")
    assert torch.equal(logits, ref)
    assert set(active.plans) == set(adapter_for(model).moe_layers())


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3", "gpt_oss", "longcat_flash"])
def test_topp_one_uses_every_expert_and_capture_sees_it(models, arch):
    model = models(arch)
    n_exp = adapter_for(model).num_experts()
    got, active, _ = _decisions(model, "topp:1")
    for layer, d in got.items():
        assert (active.counts[layer] == n_exp).all()
        assert (d.n_active == n_exp).all()  # the capture hook saw the overridden routing
        real = d.indices[(d.indices >= 0) & (d.indices < n_exp)].view(d.indices.shape[0], -1)
        assert all(len(set(row.tolist())) == n_exp for row in real)


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "deepseek_v3", "gpt_oss", "longcat_flash"])
def test_ablated_expert_is_never_selected(models, arch):
    model = models(arch)
    k = adapter_for(model).top_k()
    got, _, _ = _decisions(model, "ablate:3,5")
    for d in got.values():
        assert not ((d.indices == 3) | (d.indices == 5)).any()
        assert ((d.indices >= 0).sum(-1) == k).all()  # top-k picks replacements
        if arch == "mixtral":  # renormalised over the chosen set
            torch.testing.assert_close(d.weights.sum(-1), torch.ones(d.weights.shape[0]))


def test_ablation_renormalises_probabilities_olmoe(models):
    """OLMoE (no top-k renormalisation): weights are the softmax over the remaining experts."""
    model = models("olmoe")
    adapter = adapter_for(model)
    layer = 2
    got, _, _ = _decisions(model, "ablate:1@layer2")
    clean, _, _ = _decisions(model, "topk:2@layer0")  # layer 2 untouched in this pass
    d = got[layer]
    logits = d.logits.clone()
    logits[:, 1] = float("-inf")
    expected = torch.softmax(logits, -1).gather(1, d.indices)
    torch.testing.assert_close(d.weights, expected, rtol=0, atol=1e-6)
    assert (clean[layer].indices == 1).any()  # expert 1 is used without the ablation
    assert adapter.moe_layers() == [0, 1, 2, 3]


def test_topp_and_threshold_on_a_known_distribution(models):
    model = models("olmoe")  # softmax family, norm_topk_prob False: weights = probabilities
    adapter = adapter_for(model)
    block = adapter.moe_block(0)
    probs = torch.tensor([[0.05, 0.4, 0.01, 0.25, 0.15, 0.1, 0.03, 0.01]])
    logits = probs.log()

    def chosen(plan):
        idx, w, valid = reroute(adapter, block, logits, plan)
        return sorted(idx[valid].tolist()), w[valid]

    # sorted: 0.4 (e1), 0.25 (e3), 0.15 (e4), 0.1 (e5), ...; cumulative 0.4, 0.65, 0.8, 0.9
    assert chosen(LayerPlan("topp", 0.3))[0] == [1]
    assert chosen(LayerPlan("topp", 0.5))[0] == [1, 3]
    assert chosen(LayerPlan("topp", 0.7))[0] == [1, 3, 4]
    assert chosen(LayerPlan("topp", 1.0))[0] == list(range(8))
    assert chosen(LayerPlan("threshold", 0.12))[0] == [1, 3, 4]
    assert chosen(LayerPlan("threshold", 0.9))[0] == [1]  # the best expert always stays
    idx, w = chosen(LayerPlan("topp", 0.5, ablate=(1,)))  # 0.25/0.6, 0.15/0.6 -> 0.4167+0.25 >= 0.5
    assert idx == [3, 4]
    torch.testing.assert_close(w, torch.tensor([0.25, 0.15]) / 0.6)
    ids, w, valid = reroute(adapter, block, logits, LayerPlan("topk", 3))
    assert ids[0].tolist() == [1, 3, 4] and valid.all()
    torch.testing.assert_close(w[0], torch.tensor([0.4, 0.25, 0.15]))


def test_variable_sets_are_padded_and_capture_reads_padding_as_unused(models):
    model = models("qwen3_moe")  # renormalised: the weights of each token's set sum to 1
    got, active, _ = _decisions(model, "topp:0.6")
    for layer, d in got.items():
        assert d.indices.shape[1] >= 2
        assert torch.equal(d.n_active, active.counts[layer])
        assert ((d.indices < 0) == (d.weights == 0)).all()
        torch.testing.assert_close(d.weights.sum(-1), torch.ones(d.weights.shape[0]))
        assert d.n_active.unique().numel() > 1


def test_parse_and_errors(models):
    ov = RoutingOverride.parse("topp:0.5; ablate:7,3@layer2")
    assert str(ov) == "topp:0.5;ablate:3,7@layers2"
    plans = ov.plans([0, 1, 2, 3])
    assert plans[2] == LayerPlan("topp", 0.5, (3, 7)) and plans[0] == LayerPlan("topp", 0.5, ())
    assert RoutingOverride.parse("topk:2@layers1:3").clauses[0].layers == (1, 2, 3)
    assert RoutingOverride.parse("threshold:0.1@all").clauses[0].layers is None
    assert not RoutingOverride.parse("")
    for bad in ("top:2", "topk:0", "topp:1.5", "ablate:", "topk:two", "topk:2@layerx"):
        with pytest.raises(RoutingOverrideError, match="topk:K, topp:P"):
            RoutingOverride.parse(bad)
    with pytest.raises(RoutingOverrideError, match="two selection rules"):
        RoutingOverride.parse("topk:2;topp:0.5@layer1")
    model = models("deepseek_v3")  # block 0 is dense
    with pytest.raises(RoutingOverrideError, match="not MoE layers"):
        with override_routing(model, "topk:1@layer0"):
            pass
    with pytest.raises(RoutingOverrideError, match="experts are 0..7"):
        with override_routing(model, "ablate:8"):
            pass
    with pytest.raises(RoutingOverrideError, match="need an MoE model"):
        with override_routing(models("llama"), "topk:1"):
            pass
    assert RoutingOverride.parse("topp:0.5").max_width(adapter_for(model)) == 8
    assert RoutingOverride.parse("topk:5@layer1").max_width(adapter_for(model)) == 5
    assert math.isclose(RoutingOverride.of("topp", 0.5).clauses[0].value, 0.5)


def test_capture_records_the_override(tiny_store, tmp_path):
    store = tiny_store(tmp_path / "s", routing_override="topp:0.7", max_tokens=64)
    assert store.manifest["routing_override"] == "topp:0.7" and store.manifest["k_max"] == 8
    assert store.manifest["top_k"] == 2
    r = store.load_router(0)
    idx, n_active = r["indices"].long(), r["n_active"].long()
    assert idx.shape[-1] == 8
    assert torch.equal(n_active, ((idx >= 0) & (idx < 8)).sum(-1))
    assert n_active.max() > 2 and n_active.unique().numel() > 2
    ablated = tiny_store(tmp_path / "a", routing_override="ablate:3", max_tokens=64)
    assert not (ablated.load_router(0)["indices"] == 3).any()


def test_evaluate_splices_under_the_override(tiny_store, tmp_path):
    from tests.test_evaluate import _identity, _run

    store = tiny_store(tmp_path / "s", layers="0:2", max_tokens=96, batch_size=4)
    sae = _identity("topk", [1])
    own = _run(sae, store, tmp_path, "own")["splice"]
    same = _run(sae, store, tmp_path, "k2", routing_override="topk:2")["splice"]
    top1 = _run(sae, store, tmp_path, "k1", routing_override="topk:1")["splice"]
    assert same["ce_clean"] == own["ce_clean"] and same["routing_override"] == "topk:2"
    assert top1["ce_clean"] != own["ce_clean"]
    # the identity SAE reproduces the clean pass also under the override (every pass is overridden)
    assert top1["ce_spliced"] == pytest.approx(top1["ce_clean"], abs=1e-5) and abs(top1["kl"]) < 1e-5


def test_transformerlens_backend_matches_hf_under_override(tiny_ckpt, corpus_jsonl, tmp_path):
    pytest.importorskip("transformer_lens")
    from tests.test_tl_backend import _save_olmoe, _save_tokenizer

    ckpt = _save_olmoe(tmp_path, norm_topk_prob=True)
    _save_tokenizer(ckpt)
    from routesae.capture import CaptureConfig, capture
    from routesae.store import Store

    stores = {}
    for backend in ("hf", "tl"):
        stores[backend] = Store(capture(CaptureConfig(
            model=str(ckpt), corpus=str(corpus_jsonl), out=str(tmp_path / backend), backend=backend, ctx=24,
            max_tokens=72, layers="1", device="cpu", progress=False, routing_override="topp:0.6;ablate:3@layer1")))
    hf, tl = (stores[b].load_router(0) for b in ("hf", "tl"))
    assert stores["tl"].manifest["k_max"] == 8 and stores["tl"].manifest["top_k"] == 2
    assert torch.equal(hf["n_active"], tl["n_active"]) and hf["n_active"].unique().numel() > 1
    hi, order = hf["indices"].long().sort(-1)
    ti, order_t = tl["indices"].long().sort(-1)
    assert torch.equal(hi, ti) and not (ti[:, 1] == 3).any()
    torch.testing.assert_close(hf["weights"].float().gather(-1, order), tl["weights"].float().gather(-1, order_t),
                               rtol=0, atol=2e-3)
