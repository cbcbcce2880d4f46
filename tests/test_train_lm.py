"""The demo MoE trainer on a tiny corpus: loss goes down, resume is bit-exact, the folder loads."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from routesae.zoo.train_lm import preset_config, train_lm

DOMAINS = {
    "code": lambda r: f"def f{r.randint(0, 99)}(x):\n    return x * {r.randint(2, 9)} + {r.randint(0, 9)}\n",
    "prose": lambda r: f"The {r.choice(['old', 'young', 'tall'])} man walked to the "
                       f"{r.choice(['river', 'town', 'hill'])} and saw {r.randint(2, 9)} birds in the sky.",
    "math": lambda r: f"Question: Tom has {r.randint(2, 50)} apples and buys {r.randint(2, 50)} more. "
                      f"How many now? Answer: {r.randint(4, 99)}",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny 3-domain corpus folder (train/val shards) and a 300-token BPE trained on it."""
    from routesae.zoo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tlm")
    cdir = root / "corpus"
    cdir.mkdir()
    r = random.Random(0)
    for split, n in (("train", 6), ("val", 4)):
        with gzip.open(cdir / f"{split}-00000.jsonl.gz", "wt") as f:
            for i in range(n):
                for d, make in DOMAINS.items():
                    text = " ".join(make(r) for _ in range(3))
                    row = {"text": text, "domain": d, "source": "test", "doc_id": f"{split}-{d}-{i}"}
                    f.write(json.dumps(row) + "\n")
    train_tokenizer(cdir, root / "tok", vocab_size=300, min_frequency=1)
    return cdir, root / "tok"


def _cfg(corpus, out, **kw):
    cdir, tok = corpus
    return preset_config("tiny", str(cdir), str(out), tokenizer=str(tok), threads=1, **kw)


def test_train_saves_loadable_model_and_card(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, OlmoeForCausalLM

    out = train_lm(_cfg(corpus, tmp_path / "m"))
    logs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    train = [x for x in logs if "loss" in x]
    assert train[-1]["step"] == 16 and train[-1]["tokens"] == 16 * 4 * 32
    assert train[-1]["ce"] < train[0]["ce"] - 0.3  # it learns
    assert train[-1]["epoch"] >= 1  # the tiny corpus wraps around: epochs work

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model) is OlmoeForCausalLM
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()

    card = json.loads((out / "card.json").read_text())
    assert set(card["val"]) == set(DOMAINS)
    for v in card["val"].values():
        assert v["tokens"] > 0 and 0 < v["loss"] < 10 and 0 < v["unigram"] < 10
    assert card["tokens_seen"] == 16 * 4 * 32
    assert card["params"]["total"] == sum(p.numel() for p in model.parameters())
    rt = card["routing"]
    assert rt["layers"] == [0, 1] and rt["uniform"] == pytest.approx(2 / 8)
    for per in rt["per_layer"].values():
        for v in per.values():
            assert sum(v["share"]) == pytest.approx(2.0, abs=1e-3)  # each token counts in k experts
            assert len(v["top3"]) == 3 and v["max_ratio"] >= 1.0
    assert all(len(s) == 2 for s in card["samples"].values())
    md = (out / "MODEL_CARD.md").read_text()
    for heading in ("## Architecture", "## Validation loss per domain", "unigram", "## Greedy samples",
                    "## Domain specialisation of experts", "### layer 1"):
        assert heading in md

    # the card's numbers come from the saved model: recompute one validation loss from the folder
    from routesae.zoo.train_lm import load_tokenizer, val_losses, val_slice

    cfg = _cfg(corpus, out)
    vs = val_slice(cfg, load_tokenizer(cfg.tokenizer))
    again = val_losses(model, vs, torch.device("cpu"))
    for d in DOMAINS:
        assert again[d]["loss"] == pytest.approx(card["val"][d]["loss"], abs=1e-3)


def test_resume_is_bit_exact(corpus, tmp_path):
    full = train_lm(_cfg(corpus, tmp_path / "full", card=False))
    part = tmp_path / "part"
    train_lm(_cfg(corpus, part, card=False, stop_after_steps=6))  # last checkpoint at step 4
    assert not (part / "model.safetensors").exists()
    assert torch.load(part / "checkpoint" / "state.pt", weights_only=True)["step"] == 4
    train_lm(_cfg(corpus, part, card=False, resume=True))
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 2  # eval lines share a step; no duplicates


def test_card_regenerates_from_saved_folder(corpus, tmp_path):
    from routesae.zoo.model_card import regenerate

    out = train_lm(_cfg(corpus, tmp_path / "m"))
    before = json.loads((out / "card.json").read_text())
    after = regenerate(out)
    for d in DOMAINS:
        assert after["val"][d]["loss"] == pytest.approx(before["val"][d]["loss"], abs=1e-3)
    assert after["routing"]["per_layer"]["0"]["code"]["top3"] == before["routing"]["per_layer"]["0"]["code"]["top3"]

    # balance section: loads of each layer sum to k (every token counts in k experts), ratios follow from them
    b = after["balance"]
    assert b["k"] == 2 and b["E"] == 8 and len(b["layers"]) == 2
    for r in b["layers"]:
        assert sum(r["load"]) == pytest.approx(2.0, abs=1e-3)
        assert r["min_load_ratio"] == pytest.approx(min(r["load"]) / (2 / 8), abs=1e-3)
        assert r["starved"] == [e for e, x in enumerate(r["load"]) if x < 0.1 * 2 / 8]
        assert r["switch_aux"] >= 2 * 0.99  # E sum f P >= k with f = P balanced; larger otherwise
        assert all(o["selectivity"] >= 2 for o in r["owners"])
    mv = b["mean_val"]
    assert mv["unigram_domain_in_sample"] <= mv["unigram_domain"] + 1e-6  # no unigram beats in-sample frequencies
    # an earlier model's numbers are shown beside this one's, and kept by a later regeneration
    from routesae.zoo.model_card import compact_balance

    prev = compact_balance(b, after["val"], "v0")
    regenerate(out, prev)
    again = regenerate(out)
    assert again["previous"]["label"] == "v0" and again["previous"]["layers"][0]["dead"] == len(b["layers"][0]["dead"])
    md = (out / "MODEL_CARD.md").read_text()
    for text in ("## Load balance per layer", "Switch aux (v0)", "## Validation loss against unigram baselines",
                 "## Experts that own domains (selectivity)", "Goals (issue 15)"):
        assert text in md


def test_balance_loss_per_layer_and_pooled_by_hand():
    """Two layers, E=2, k=1: layer 0 sends every token to expert 0, layer 1 to expert 1.

    Per layer, f = (1, 0) and P ~ (1, 0): E * sum f P = 2 per layer, 4 summed (1 = balanced, per layer).
    Pooled, the rows of both layers together give f = P ~ (1/2, 1/2): 2 * (1/4 + 1/4) = 1, "balanced",
    although each layer uses a single expert: the pooled form cannot see per-layer collapse.
    """
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    from routesae.zoo.moe_losses import switch_balance_loss

    a = torch.tensor([[10.0, -10.0]] * 3)
    layers = [a, a.flip(1)]
    p = torch.sigmoid(torch.tensor(20.0)).item()  # softmax([10, -10])[0]
    assert switch_balance_loss(layers, 1, "per_layer").item() == pytest.approx(2 * (2 * 1 * p), rel=1e-6)
    assert switch_balance_loss(layers, 1, "pooled").item() == pytest.approx(2 * (0.5 * 0.5 + 0.5 * 0.5), rel=1e-6)
    # transformers' own function is the pooled form; per layer = its value on each layer, summed
    torch.manual_seed(0)
    rl = [torch.randn(40, 8) for _ in range(3)]
    pooled = load_balancing_loss_func(tuple(rl), 8, 2).item()
    assert switch_balance_loss(rl, 2, "pooled").item() == pytest.approx(pooled)
    assert switch_balance_loss(rl, 2, "per_layer").item() == pytest.approx(
        sum(load_balancing_loss_func((r,), 8, 2).item() for r in rl))
    with pytest.raises(ValueError, match="balance 'layers' unknown"):
        switch_balance_loss(rl, 2, "layers")


def test_pooled_balance_lets_layers_collapse_and_the_analysis_flags_it(corpus, tmp_path):
    """32 experts, top-2, 300 steps of the tiny model: pooled balancing leaves dead experts, per-layer does not.

    Dead experts are found independently from the saved model's own router logits (HF
    ``output_router_logits`` on the validation slice); ``expert_tables`` on a store captured from the
    validation split must flag each of them as collapsed (load < 0.1 / E).
    """
    from transformers import AutoModelForCausalLM

    from routesae.analyze import expert_tables
    from routesae.capture import CaptureConfig, capture
    from routesae.zoo.card_balance import balance_table, routing_counts
    from routesae.zoo.train_lm import load_tokenizer, val_slice

    cdir, tok = corpus
    flagged, dead = {}, {}
    for bal in ("pooled", "per_layer"):
        cfg = _cfg(corpus, tmp_path / bal, balance=bal, n_experts=32, top_k=2, max_tokens=300 * 4 * 32, card=False,
                   eval_every=10**6, ckpt_every=10**6)
        out = train_lm(cfg)
        model = AutoModelForCausalLM.from_pretrained(str(out))
        vs = val_slice(cfg, load_tokenizer(cfg.tokenizer))
        rows = balance_table(routing_counts(model, vs, torch.device("cpu")), vs.domains)
        dead[bal] = {(r["layer"], e) for r in rows for e in r["dead"]}
        store = tmp_path / f"store-{bal}"
        capture(CaptureConfig(model=str(out), corpus=str(cdir), out=str(store), split="val", ctx=32, layers="all",
                              progress=False))
        es = expert_tables(store)["expert_stats"]
        flagged[bal] = {(int(a), int(b)) for a, b in zip(es.layer[es.collapse_low], es.expert[es.collapse_low])}
    assert dead["pooled"] and dead["pooled"] <= flagged["pooled"]
    assert not dead["per_layer"] and len(flagged["per_layer"]) < len(flagged["pooled"])
