"""TransformerLens backend agrees with Hugging Face on tiny random OLMoE and Llama checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OlmoeConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from routesae.models.tl import (
    load_hooked_transformer,
    tl_capture_batch,
    tl_moe_layers,
    tl_num_experts,
    tl_top_k,
)

N_LAYERS, VOCAB, TOP_K, N_EXPERTS = 4, 256, 2, 8
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 32,
          "num_hidden_layers": N_LAYERS, "num_attention_heads": 4, "max_position_embeddings": 128,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


def _save_olmoe(root: Path, norm_topk_prob: bool) -> Path:
    torch.manual_seed(0)
    config = OlmoeConfig(**COMMON, num_key_value_heads=4, num_experts=N_EXPERTS,
                         num_experts_per_tok=TOP_K, norm_topk_prob=norm_topk_prob,
                         architectures=["OlmoeForCausalLM"])
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:  # spread the router so top-k choices are well separated
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    path = root / f"olmoe_norm{int(norm_topk_prob)}"
    model.save_pretrained(path)
    return path


DENSE = {"llama": (LlamaConfig, "LlamaForCausalLM"), "mistral": (MistralConfig, "MistralForCausalLM"),
         "qwen2": (Qwen2Config, "Qwen2ForCausalLM")}


def _save_dense(root: Path, name: str) -> Path:
    torch.manual_seed(1)
    config_cls, arch = DENSE[name]
    config = config_cls(**COMMON, num_key_value_heads=2, architectures=[arch])
    path = root / name
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _hf_run(hf, ids, mask, moe: bool):
    """HF logits, per-layer residuals (block outputs, before the final norm) and router outputs."""
    block_out: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: block_out.__setitem__(
        i, o[0] if isinstance(o, tuple) else o)) for i, layer in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            out = hf(ids, attention_mask=mask, output_hidden_states=True, output_router_logits=moe)
    finally:
        for h in handles:
            h.remove()
    return out, block_out


@pytest.fixture(scope="module", params=[False, True], ids=["no_renorm", "renorm"])
def olmoe(request, tmp_path_factory):
    path = _save_olmoe(tmp_path_factory.mktemp("tl"), request.param)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    return hf, load_hooked_transformer(path), request.param


@pytest.fixture(scope="module", params=sorted(DENSE))
def dense(request, tmp_path_factory):
    path = _save_dense(tmp_path_factory.mktemp("tl"), request.param)
    return AutoModelForCausalLM.from_pretrained(path).eval(), load_hooked_transformer(path)


def _check_resid(hf_out, block_out, resid, mask):
    real = mask.bool()
    assert resid.shape == (*mask.shape, N_LAYERS, 64) and resid.dtype == torch.float32
    for i in range(N_LAYERS):
        torch.testing.assert_close(resid[:, :, i][real], block_out[i][real], atol=1e-4, rtol=0)
        if i < N_LAYERS - 1:  # transformers 5: hidden_states[-1] is after the final norm
            torch.testing.assert_close(resid[:, :, i][real], hf_out.hidden_states[i + 1][real],
                                       atol=1e-4, rtol=0)


def test_olmoe_matches_hf(olmoe):
    hf, tl, norm_topk_prob = olmoe
    ids, mask = _batch()
    hf_out, block_out = _hf_run(hf, ids, mask, moe=True)
    real = mask.bool()
    with torch.no_grad():
        tl_logits = tl(ids, attention_mask=mask)
    assert (tl_logits[real] - hf_out.logits[real]).abs().max() < 1e-4

    assert tl_moe_layers(tl) == list(range(N_LAYERS))
    assert tl_num_experts(tl) == N_EXPERTS and tl_top_k(tl) == TOP_K
    layers = list(range(N_LAYERS))
    resid, routing = tl_capture_batch(tl, ids, mask, layers, layers, want_logits=True)
    _check_resid(hf_out, block_out, resid, mask)

    flat_real = real.reshape(-1)
    assert len(hf_out.router_logits) == N_LAYERS
    for i in layers:
        dec = routing[i]
        n = ids.numel()
        assert dec.indices.shape == (n, TOP_K) and dec.indices.dtype == torch.int64
        assert dec.weights.shape == (n, TOP_K) and dec.weights.dtype == torch.float32
        assert (dec.n_active == TOP_K).all()
        hf_logits = hf_out.router_logits[i].float()
        torch.testing.assert_close(dec.logits[flat_real], hf_logits[flat_real], atol=1e-4, rtol=0)
        hf_w, hf_idx = hf_logits.softmax(-1).topk(TOP_K, dim=-1)
        if norm_topk_prob:
            hf_w = hf_w / hf_w.sum(-1, keepdim=True)
        # as sets per token: order both by expert id
        tl_sorted, tl_order = dec.indices.sort(-1)
        hf_sorted, hf_order = hf_idx.sort(-1)
        assert torch.equal(tl_sorted[flat_real], hf_sorted[flat_real])
        torch.testing.assert_close(dec.weights.gather(1, tl_order)[flat_real],
                                   hf_w.gather(1, hf_order)[flat_real], atol=1e-5, rtol=0)
        if norm_topk_prob:
            torch.testing.assert_close(dec.weights.sum(-1), torch.ones(n), atol=1e-5, rtol=0)
        else:
            assert (dec.weights.sum(-1) < 1).all()


def test_capture_selects_layers_and_skips_logits(olmoe):
    _, tl, _ = olmoe
    ids, mask = _batch()
    resid_all, _ = tl_capture_batch(tl, ids, mask, list(range(N_LAYERS)), [], want_logits=False)
    resid, routing = tl_capture_batch(tl, ids, mask, [1, 3], [2], want_logits=False)
    assert resid.shape == (3, 12, 2, 64) and list(routing) == [2]
    assert routing[2].logits is None
    torch.testing.assert_close(resid, resid_all[:, :, [1, 3]])
    with pytest.raises(ValueError):
        tl_capture_batch(tl, ids, mask, [0], [N_LAYERS], want_logits=False)


def test_dense_matches_hf(dense):
    hf, tl = dense
    ids, mask = _batch()
    hf_out, block_out = _hf_run(hf, ids, mask, moe=False)
    real = mask.bool()
    with torch.no_grad():
        tl_logits = tl(ids, attention_mask=mask)
    assert (tl_logits[real] - hf_out.logits[real]).abs().max() < 1e-4
    assert tl_moe_layers(tl) == [] and tl_num_experts(tl) == 0 and tl_top_k(tl) == 0
    assert tl.tokenizer is None  # the folder has no tokenizer
    resid, routing = tl_capture_batch(tl, ids, mask, list(range(N_LAYERS)), [], want_logits=True)
    assert routing == {}
    _check_resid(hf_out, block_out, resid, mask)


def test_tokenizer_attached_when_present(tmp_path):
    path = _save_dense(tmp_path, "mistral")
    _save_tokenizer(path)
    tl = load_hooked_transformer(path)
    assert tl.tokenizer is not None
    assert tl.to_tokens("w5 w7", prepend_bos=False).tolist() == [[5, 7]]


def test_unsupported_model_type(tmp_path):
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supported: llama, mistral, olmoe, qwen2"):
        load_hooked_transformer(tmp_path)
    with pytest.raises(ValueError, match="config.json"):
        load_hooked_transformer(tmp_path / "missing")
