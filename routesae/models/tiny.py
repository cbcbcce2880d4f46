"""Tiny random models of each supported architecture, for tests and quick demos (offline).

Every model is built from its transformers config class (no hub access): 4 blocks, hidden size 32,
8 routed experts, vocabulary of 320 ids. Router weights are re-initialised with a non-trivial
standard deviation so that routing is not degenerate (several families initialise routers to
zero), and family-specific routing features are switched on so the adapters are exercised:

- ``olmoe``: ``norm_topk_prob=False``; ``qwen3_moe``: ``norm_topk_prob=True``
- ``qwen2_moe``: a shared expert with its sigmoid gate, layer 1 listed in ``mlp_only_layers``
- ``deepseek_v3``: 4 groups with 2 kept, first block dense, random ``e_score_correction_bias``,
  ``routed_scaling_factor=2.5``, ``norm_topk_prob=True``
- ``gpt_oss``: router bias; ``granitemoe``: ``block_sparse_moe.router``
- ``longcat_flash``: 8 real + 4 zero-computation (identity) experts, top-3, so the number of real
  experts per token varies from 0 to 3; 2 decoder blocks (``num_hidden_layers`` counts 4 sublayers)
- ``llama``: a dense model (no router)
- ``qwen3_next`` (built on demand, not in ``TINY_ARCHS``): the Qwen2-MoE block with a gated shared expert
  beside linear-attention layers

Special ids: pad 0, bos 1, eos 2 (the tokenizer from :func:`save_tiny` uses the same ids).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

TINY_ARCHS = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "granitemoe", "longcat_flash",
              "llama")

VOCAB = 320
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
ROUTER_STD = 0.2  # hidden 32, RMS-normed inputs: router logits with std ~1

_COMMON = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    "tie_word_embeddings": False,
}
_TOP2_OF_8 = {"num_experts_per_tok": 2}

# arch -> (config class name, architectures entry, overrides on top of _COMMON)
_SPECS: dict[str, tuple[str, str, dict]] = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {
        **_TOP2_OF_8, "num_experts": 8, "norm_topk_prob": False}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        **_TOP2_OF_8, "num_local_experts": 8}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        **_TOP2_OF_8, "num_experts": 8, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "norm_topk_prob": False,
        "mlp_only_layers": [1], "decoder_sparse_step": 1}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        **_TOP2_OF_8, "num_experts": 8, "moe_intermediate_size": 32, "norm_topk_prob": True,
        "head_dim": 8}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        **_TOP2_OF_8, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "n_shared_experts": 1, "moe_intermediate_size": 32, "kv_lora_rank": 16, "q_lora_rank": 24,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {
        **_TOP2_OF_8, "num_local_experts": 8, "head_dim": 8, "sliding_window": 8,
        "intermediate_size": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {
        **_TOP2_OF_8, "num_local_experts": 8}),
    "longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM", {
        "num_experts_per_tok": 3, "n_routed_experts": 8, "zero_expert_num": 4, "expert_ffn_hidden_size": 32,
        "num_hidden_layers": 4, "routed_scaling_factor": 1.5, "kv_lora_rank": 16, "q_lora_rank": 24,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # not in TINY_ARCHS (its linear-attention layers run a slow reference kernel on CPU): built on demand
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", {
        **_TOP2_OF_8, "num_experts": 8, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "norm_topk_prob": True, "head_dim": 8, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
        "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4, "decoder_sparse_step": 1}),
}


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """The config of the tiny ``arch`` model; ``overrides`` replace any field."""
    import transformers

    if arch not in _SPECS:
        raise ValueError(f"unknown tiny architecture '{arch}'; choose from {', '.join(TINY_ARCHS)}")
    cls_name, archname, spec = _SPECS[arch]
    kwargs = {**_COMMON, **spec, **overrides}
    config = getattr(transformers, cls_name)(**kwargs)
    config.architectures = [archname]
    return config


@torch.no_grad()
def _randomise_routers(model: PreTrainedModel, gen: torch.Generator) -> None:
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gate", "router") and hasattr(module, "weight") and module.weight.dim() == 2:
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * ROUTER_STD)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):  # GPT-OSS
                bias.copy_(torch.randn(bias.shape, generator=gen) * ROUTER_STD)
            corr = getattr(module, "e_score_correction_bias", None)
            if isinstance(corr, torch.Tensor):  # DeepSeek-V3: make the bias change choices
                corr.copy_(torch.randn(corr.shape, generator=gen) * 0.2)
        elif leaf == "router" and hasattr(module, "classifier"):  # LongCat-Flash
            module.classifier.weight.copy_(torch.randn(module.classifier.weight.shape, generator=gen) * ROUTER_STD)
            bias = module.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=gen) * 0.05)
        elif leaf == "shared_expert_gate":  # Qwen2-MoE
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * ROUTER_STD)


def build_tiny(arch: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random ``arch`` causal LM (float32, eval mode), deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_routers(model, torch.Generator().manual_seed(seed + 1))
    return model.float().eval()


_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "Sparse autoencoders find interpretable features in the residual stream.",
    "Routing decisions differ between layers, tokens and contexts.",
    "def add(a, b):\n    return a + b  # numbers 0123456789",
]


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE tokenizer (pad 0, bos 1, eos 2) with at most ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    assert tok.token_to_id("<pad>") == PAD_ID and tok.token_to_id("</s>") == EOS_ID
    assert tok.get_vocab_size() <= vocab_size
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token=None)


def save_tiny(arch: str, out_dir, seed: int = 0) -> Path:
    """Save the tiny ``arch`` model (safetensors) and its tokenizer to ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny(arch, seed=seed).save_pretrained(out, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out)
    return out
