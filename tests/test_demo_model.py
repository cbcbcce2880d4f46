"""The shipped demo MoE (data/demo-moe): loads through both backends, matches its model card, routes non-uniformly."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from routesae.zoo.train_lm import preset_config, val_losses, val_slice

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo-moe"
CORPUS = ROOT / "data" / "corpus"


@pytest.fixture(scope="module")
def demo():
    model = AutoModelForCausalLM.from_pretrained(DEMO).eval()
    tok = AutoTokenizer.from_pretrained(DEMO)
    card = json.loads((DEMO / "card.json").read_text())
    cfg = preset_config("demo", str(CORPUS), "unused")  # the card's own validation slice
    return model, tok, card, val_slice(cfg, tok)


def test_shipped_files_and_size():
    names = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md", "card.json"} <= names
    assert (DEMO / "model.safetensors").stat().st_size <= 60 * 2**20
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["architectures"] == ["OlmoeForCausalLM"] and cfg["num_experts"] == 32


def test_loads_through_both_backends(demo):
    from routesae.models.tl import load_hooked_transformer

    model, tok, _, vs = demo
    tl = load_hooked_transformer(DEMO)
    ids = torch.from_numpy(vs.ids[:2, :64])
    with torch.no_grad():
        hf_logits = model(input_ids=ids).logits
        tl_logits = tl(ids)
    torch.testing.assert_close(tl_logits, hf_logits, rtol=0, atol=1e-3)


def test_validation_loss_matches_card(demo):
    model, _, card, vs = demo
    again = val_losses(model, vs, torch.device("cpu"))
    assert set(again) == set(card["val"])
    for domain, v in again.items():
        assert v["tokens"] == card["val"][domain]["tokens"]  # the same held-out slice as the card
        want = card["val"][domain]["loss"]
        assert abs(v["loss"] - want) <= 0.05 * want, (domain, v["loss"], want)
        assert v["loss"] < card["val"][domain]["unigram"]  # the model beats the unigram baseline


def test_routing_is_not_uniform(demo):
    """Largest domain-specialisation share N_k(E_i, D) / N_D at the middle layer >= 2x the uniform k/E."""
    model, _, _, vs = demo
    ids, mask = torch.from_numpy(vs.ids[::8]), torch.from_numpy(vs.mask[::8])  # every 8th context: all domains
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    c = model.config
    middle = c.num_hidden_layers // 2
    top = out.router_logits[middle].softmax(-1).topk(c.num_experts_per_tok, dim=-1).indices  # OLMoE's own rule
    dom = torch.from_numpy(vs.dom[::8]).reshape(-1)
    hits = torch.zeros(len(vs.domains), c.num_experts)
    for d in range(len(vs.domains)):
        rows = top[dom == d]
        hits[d] = torch.bincount(rows.reshape(-1), minlength=c.num_experts).float() / max(len(rows), 1)
    uniform = c.num_experts_per_tok / c.num_experts
    assert hits.max() >= 2 * uniform, hits.max()
