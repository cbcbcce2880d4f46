"""Capture against the model's own outputs: HF output_hidden_states and output_router_logits."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from routesae.capture import CaptureConfig, capture
from routesae.corpus import ContextBuilder, CorpusConfig, iter_documents
from routesae.models.load import decoder_layers
from routesae.models.tiny import TINY_ARCHS
from routesae.store import Store, StoreError
from tests.test_routers import oracle


def _cfg(ckpt, corpus, out, **kw):
    base = dict(model=str(ckpt), corpus=str(corpus), out=str(out), ctx=24, batch_size=3, layers="all",
                shard_mb=0.02, device="cpu", progress=False, seed=1)
    base.update(kw)
    return CaptureConfig(**base)


def _reference_batches(ckpt, corpus, cfg):
    """Rebuild the exact batches capture saw and run the plain HF model on them."""
    tok = AutoTokenizer.from_pretrained(ckpt)
    docs = iter_documents(CorpusConfig(str(corpus), seed=cfg.seed))
    return list(ContextBuilder(tok, cfg.ctx).batches(docs, cfg.batch_size))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_store_equals_model_outputs(arch, tiny_ckpt, corpus_jsonl, tmp_path):
    ckpt = tiny_ckpt(arch)
    cfg = _cfg(ckpt, corpus_jsonl, tmp_path / "store")
    store = Store(capture(cfg))
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    L = len(decoder_layers(model))  # LongCat-Flash: num_hidden_layers counts two sublayers per block
    resid = torch.cat([store.load_resid(s["index"]) for s in store.shards])
    want_resid, want_idx, want_w = [], [], []
    for b in _reference_batches(ckpt, corpus_jsonl, cfg):
        ids, mask = torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                        output_router_logits=store.moe_layers != [])
        keep = mask.reshape(-1).bool()
        hs = [out.hidden_states[i + 1].flatten(0, 1)[keep] for i in range(L)]
        want_resid.append(torch.stack(hs, 1))
        if store.moe_layers:
            per_layer = [oracle(arch, model, layer, logits) for layer, logits in zip(store.moe_layers,
                                                                                     out.router_logits)]
            want_idx.append(torch.stack([i[keep] for i, _ in per_layer], 1))
            want_w.append(torch.stack([w[keep] for _, w in per_layer], 1))
    want = torch.cat(want_resid)
    assert resid.shape == want.shape == (store.n_tokens, L, model.config.hidden_size)
    # layers 0..L-2 equal hidden_states[i+1]; HF applies the final norm to its last entry
    torch.testing.assert_close(resid[:, : L - 1], want[:, : L - 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.model.norm(resid[:, L - 1]), want[:, L - 1], rtol=0, atol=1e-5)
    tokens = store.tokens()
    assert len(tokens) == store.n_tokens and (tokens["token_id"] != -1).all()
    if not store.moe_layers:
        assert arch == "llama" and not (store.root / "router-00000.safetensors").exists()
        return
    router = {k: torch.cat([store.load_router(s["index"])[k] for s in store.shards]) for k in ("indices", "weights")}
    got_idx, order = router["indices"].long().sort(-1)
    got_w = router["weights"].float().gather(-1, order)
    exp_idx, order = torch.cat(want_idx).sort(-1)
    exp_w = torch.cat(want_w).gather(-1, order)
    assert torch.equal(got_idx, exp_idx)
    torch.testing.assert_close(got_w, exp_w, rtol=0, atol=2e-3)  # stored as float16


def test_token_table_and_no_padding(tiny_ckpt, corpus_jsonl, tmp_path):
    ckpt = tiny_ckpt("olmoe")
    cfg = _cfg(ckpt, corpus_jsonl, tmp_path / "s", packing="pad", ctx=64)
    store = Store(capture(cfg))
    t = store.tokens()
    tok = AutoTokenizer.from_pretrained(ckpt)
    # every document appears once, complete, in order: BOS + its tokens, positions 0..n-1
    docs = {d.doc_id: d for d in iter_documents(CorpusConfig(str(corpus_jsonl)))}
    for doc_id, rows in t.groupby("doc_id", sort=False):
        ids = [tok.bos_token_id] + tok(docs[doc_id].text, add_special_tokens=False)["input_ids"]
        assert rows["token_id"].tolist() == ids[: len(rows)]
        assert rows["position"].tolist() == list(range(len(rows)))
        assert set(rows["domain"]) == {docs[doc_id].domain}
    assert (t["token_id"] != tok.pad_token_id).all()  # padding never reaches the store
    assert t["token"].iloc[1] == tok.decode([int(t["token_id"].iloc[1])])
    assert t.groupby("shard")["row"].apply(lambda r: r.tolist() == list(range(len(r)))).all()


def test_interrupted_capture_resumes_to_identical_store(tiny_ckpt, corpus_jsonl, tmp_path):
    ckpt = tiny_ckpt("qwen2_moe")
    full = Store(capture(_cfg(ckpt, corpus_jsonl, tmp_path / "full")))
    assert len(full.shards) >= 4

    class Stop(Exception):
        pass

    def stop_after_two(shard):
        if shard["index"] == 1:
            raise Stop

    cfg = _cfg(ckpt, corpus_jsonl, tmp_path / "part")
    with pytest.raises(Stop):
        capture(cfg, on_shard=stop_after_two)
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert len(partial["shards"]) == 2 and not partial["complete"]
    resumed = Store(capture(cfg))
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in full.shards]
    assert resumed.n_tokens == full.n_tokens
    pd.testing.assert_frame_equal(resumed.tokens(), full.tokens())
    resumed.verify()


def test_max_tokens_is_exact_and_rerun_is_noop(tiny_ckpt, corpus_jsonl, tmp_path):
    cfg = _cfg(tiny_ckpt("olmoe"), corpus_jsonl, tmp_path / "s", max_tokens=100)
    s = Store(capture(cfg))
    assert s.n_tokens == 100 and s.manifest["complete"]
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    capture(cfg)
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before


def test_rerun_with_other_arguments_is_refused_and_nothing_lost(tiny_ckpt, corpus_jsonl, tmp_path):
    cfg = _cfg(tiny_ckpt("olmoe"), corpus_jsonl, tmp_path / "s", max_tokens=50)
    capture(cfg)
    files = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir() if p.is_file()}
    cfg.layers = "1,2"
    with pytest.raises(StoreError, match=r"different arguments \(layers\).*new --out") as err:
        capture(cfg)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir() if p.is_file()} == files


def test_bad_inputs_are_one_line_errors(tiny_ckpt, corpus_jsonl, tmp_path):
    from routesae.layers import LayerSpecError
    from routesae.models.load import ModelLoadError

    with pytest.raises(ModelLoadError, match="not found"):
        capture(_cfg(tmp_path / "no-such-model", corpus_jsonl, tmp_path / "a"))
    with pytest.raises(LayerSpecError, match=r"out of range: this model has 4 blocks, so use 0\.\.3"):
        capture(_cfg(tiny_ckpt("olmoe"), corpus_jsonl, tmp_path / "b", layers="2,9"))
    assert not (tmp_path / "b").exists()


def test_layer_subset_and_no_logits(tiny_ckpt, corpus_jsonl, tmp_path):
    s = Store(capture(_cfg(tiny_ckpt("deepseek_v3"), corpus_jsonl, tmp_path / "s", layers="1:2",
                           router_logits=False, max_tokens=60)))
    assert s.layers == [1, 2] and s.moe_layers == [1, 2, 3]
    r = s.load_router(0)
    assert "logits" not in r and r["indices"].shape[1:] == (3, 2)
    assert (r["n_active"] == 2).all()
    b = next(s.batches(16, layer=2, with_router=True))
    assert b.resid.shape == (16, s.d_model) and b.router["indices"].shape == (16, 3, 2)
    np.testing.assert_array_equal(b.resid.numpy(), s.load_resid(int(b.rows[0, 0]))[b.rows[:, 1], 1].float().numpy())
