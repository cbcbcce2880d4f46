"""Router adapters against the models' own routing.

For each architecture the oracle recomputes indices and weights from the ``router_logits`` that
the model returns with ``output_router_logits=True``, using that architecture's rule written out
here independently of the adapters. In transformers 5.23 ``router_logits`` is, for all seven
families, the router's raw pre-activation output (GPT-OSS: including the router bias; DeepSeek-V3:
before the sigmoid), one ``[batch*seq, E]`` entry per MoE layer (dense layers skipped), padding
positions included.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routesae.models.load import decoder_layers
from routesae.models.routers import UnsupportedArchitecture, adapter_for, supported_model_types
from routesae.models.tiny import TINY_ARCHS, build_tiny, save_tiny

MOE_ARCHS = [a for a in TINY_ARCHS if a != "llama"]


# ---- the oracle: each family's routing rule, from the logits ---------------------------------
def _softmax_topk(logits, k, renorm):
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return idx, w


def _topk_then_softmax(logits, k):
    top, idx = torch.topk(logits.float(), k, dim=-1)
    return idx, torch.softmax(top, dim=-1)


def _deepseek_v3(logits, k, bias, n_group, topk_group, norm, scale):
    scores = torch.sigmoid(logits.float())
    choice = scores + bias
    n, n_exp = choice.shape
    grouped = choice.view(n, n_group, n_exp // n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)          # [n, n_group]
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
    allowed = keep.unsqueeze(-1).expand_as(grouped).reshape(n, n_exp)
    idx = choice.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
    w = scores.gather(1, idx)                                     # weights from unbiased scores
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * scale


def oracle(arch, model, layer, logits):
    c = model.config
    k = c.num_experts_per_tok
    if arch == "olmoe":
        return _softmax_topk(logits, k, c.norm_topk_prob)
    if arch == "mixtral":
        return _softmax_topk(logits, k, True)
    if arch in ("qwen2_moe", "qwen3_moe"):
        return _softmax_topk(logits, k, c.norm_topk_prob)
    if arch == "deepseek_v3":
        bias = decoder_layers(model)[layer].mlp.gate.e_score_correction_bias.float()
        return _deepseek_v3(logits, k, bias, c.n_group, c.topk_group, c.norm_topk_prob,
                            c.routed_scaling_factor)
    if arch in ("gpt_oss", "granitemoe"):
        return _topk_then_softmax(logits, k)
    if arch == "longcat_flash":  # softmax over real + zero experts, choice with bias, scaled, not normalised
        probs = torch.softmax(logits.float(), dim=-1)
        bias = decoder_layers(model)[layer].mlp.router.e_score_correction_bias.float()
        idx = (probs + bias).topk(k, dim=-1).indices
        return idx, probs.gather(1, idx) * c.routed_scaling_factor
    raise AssertionError(arch)


EXPECTED_MOE_LAYERS = {
    "olmoe": [0, 1, 2, 3], "mixtral": [0, 1, 2, 3], "qwen2_moe": [0, 2, 3],
    "qwen3_moe": [0, 1, 2, 3], "deepseek_v3": [1, 2, 3], "gpt_oss": [0, 1, 2, 3],
    "granitemoe": [0, 1, 2, 3], "longcat_flash": [0, 1],
}
TOP_K = {"longcat_flash": 3}


def _batch():
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 320, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left-pad the second sequence
    ids[1, :4] = 0
    return ids, mask


def _sort(idx, w):
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


@pytest.fixture(scope="module", params=MOE_ARCHS)
def routed(request):
    """One tiny model per architecture, run once with hooks attached to every MoE layer."""
    arch = request.param
    model = build_tiny(arch)
    adapter = adapter_for(model)
    emitted: dict[int, list] = {}
    handles = []
    for layer in adapter.moe_layers():
        handles += adapter.attach(layer, lambda i, d: emitted.setdefault(i, []).append(d))
    ids, mask = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    for h in handles:
        h.remove()
    return arch, model, adapter, emitted, out


def test_moe_layers(routed):
    arch, model, adapter, _, out = routed
    assert adapter.name == model.config.model_type
    assert adapter.moe_layers() == EXPECTED_MOE_LAYERS[arch]
    # the config rule agrees with the modules actually built
    structural = [i for i, blk in enumerate(decoder_layers(model))
                  if hasattr(getattr(blk, adapter.block_attr), adapter.router_attr)]
    assert adapter.moe_layers() == structural
    assert len(out.router_logits) == len(adapter.moe_layers())
    assert adapter.num_experts() == 8 and adapter.top_k() == TOP_K.get(arch, 2)


def test_decisions_match_model_routing(routed):
    arch, model, adapter, emitted, out = routed
    n, k = 2 * 12, TOP_K.get(arch, 2)
    assert sorted(emitted) == adapter.moe_layers()
    for pos, layer in enumerate(adapter.moe_layers()):  # router_logits: one entry per MoE layer
        assert len(emitted[layer]) == 1, "emit must be called once per forward per layer"
        d = emitted[layer][0]
        ref_logits = out.router_logits[pos]
        assert d.indices.shape == (n, k) and d.indices.dtype == torch.int64
        assert d.weights.shape == (n, k) and d.weights.dtype == torch.float32
        # real experts = indices below E (LongCat-Flash: the others are zero-computation experts)
        assert d.n_active.dtype == torch.int64 and torch.equal(d.n_active, (d.indices < 8).sum(-1))
        if arch == "longcat_flash":
            assert d.n_active.unique().numel() > 1 and (d.indices >= 8).any()
        else:
            assert (d.n_active == 2).all()
        assert not d.weights.requires_grad
        torch.testing.assert_close(d.logits, ref_logits.float(), rtol=0, atol=0)

        ref_idx, ref_w = _sort(*oracle(arch, model, layer, ref_logits))
        got_idx, got_w = _sort(d.indices, d.weights)
        assert torch.equal(got_idx, ref_idx), f"{arch} layer {layer}: indices differ"
        torch.testing.assert_close(got_w, ref_w.float(), rtol=0, atol=1e-5)


def test_routing_is_not_degenerate(routed):
    """The tiny models exercise what the oracle checks (several experts used, rules matter)."""
    arch, model, adapter, emitted, out = routed
    c = model.config
    for layer in adapter.moe_layers():
        d = emitted[layer][0]
        assert d.indices.unique().numel() >= 4
        if arch == "olmoe":  # no renormalisation: weights sum to < 1
            assert (d.weights.sum(-1) < 0.999).all()
        if arch == "deepseek_v3":  # scaled: weights sum to routed_scaling_factor
            torch.testing.assert_close(d.weights.sum(-1), torch.full((24,), c.routed_scaling_factor))
    if arch == "deepseek_v3":
        # the correction bias and the group limit both change some choices
        logits = torch.cat(list(out.router_logits))
        bias = decoder_layers(model)[1].mlp.gate.e_score_correction_bias
        plain = torch.sigmoid(logits).topk(2, -1).indices.sort(-1).values
        no_group = (torch.sigmoid(logits) + bias).topk(2, -1).indices.sort(-1).values
        ours = _deepseek_v3(logits, 2, bias, c.n_group, c.topk_group, True, 1.0)[0].sort(-1).values
        assert (plain != no_group).any(-1).any()
        assert (no_group != ours).any(-1).any()


def test_logits_optional(routed):
    _, model, adapter, _, _ = routed
    layer = adapter.moe_layers()[-1]
    got = []
    handles = adapter.attach(layer, lambda i, d: got.append(d), want_logits=False)
    ids, mask = _batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    assert len(got) == 1 and got[0].logits is None and got[0].indices.shape[0] == 24


def test_qwen2_shared_gate():
    model = build_tiny("qwen2_moe")
    adapter = adapter_for(model)
    assert adapter.extra_fields() == ("shared_gate",)
    emitted, mlp_in, handles = {}, {}, []
    for layer in adapter.moe_layers():
        handles += adapter.attach(layer, lambda i, d: emitted.__setitem__(i, d))
        norm = decoder_layers(model)[layer].post_attention_layernorm
        handles.append(norm.register_forward_hook(
            lambda m, a, o, layer=layer: mlp_in.__setitem__(layer, o.detach())))
    ids, mask = _batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    for layer in adapter.moe_layers():
        w = decoder_layers(model)[layer].mlp.shared_expert_gate.weight
        x = mlp_in[layer].reshape(-1, w.shape[1])
        expected = torch.sigmoid(x @ w.T).squeeze(-1)
        got = emitted[layer].extra["shared_gate"]
        assert got.shape == (24,)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert got.std() > 0.01


def test_dense_model_has_no_adapter():
    assert adapter_for(build_tiny("llama")) is None


def test_unknown_moe_architecture_is_rejected():
    from transformers import JambaConfig

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = JambaConfig(num_experts=8)

    with pytest.raises(UnsupportedArchitecture) as err:
        adapter_for(Wrapper())
    msg = str(err.value)
    assert "jamba" in msg
    for name in supported_model_types():
        assert name in msg
    assert set(EXPECTED_MOE_LAYERS) <= set(supported_model_types())


def test_save_tiny_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = save_tiny("olmoe", tmp_path / "olmoe")
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= model.config.vocab_size
    enc = tok(["experts route tokens", "a b"], return_tensors="pt", padding=True)
    assert enc["input_ids"][0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        a = model(**enc).logits
        b = build_tiny("olmoe")(**enc).logits
    torch.testing.assert_close(a, b)
    assert adapter_for(model).moe_layers() == [0, 1, 2, 3]
