"""TransformerLens capture backend: offline ``HookedTransformer`` loading and cached capture.

``HookedTransformer.from_pretrained`` insists on an official model name and reaches the hub, so
:func:`load_hooked_transformer` builds the model from a local Hugging Face folder itself
(REFERENCE §6):

1. the HF model is loaded with ``AutoModelForCausalLM.from_pretrained(path)``;
2. its config is mapped to a TransformerLens config dict by the library's own
   ``convert_hf_model_config`` (run on a copy of ``config.json`` in a neutral temporary folder,
   because that function picks branches by substrings of the *path*, e.g. ``llama`` or ``gemma``);
3. the state dict is converted by the library's converter for the architecture (the OLMoE one
   in TransformerLens 3.x already reads the transformers-5 fused experts
   ``mlp.experts.gate_up_proj [E, 2I, d]`` / ``down_proj [E, d, I]`` and ``mlp.gate.weight``);
4. the weights are loaded with every processing step disabled (no LN folding, no centring, no
   value-bias folding, no attention refactoring), so logits match HF to float32 round-off.

:func:`tl_capture_batch` reads residuals and routing through ``run_with_cache`` with a names
filter. Layer ``i`` is ``blocks.{i}.hook_resid_post`` (see :mod:`routesae.layers`).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.components.mlps.moe import MoE
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig
from transformer_lens.loading_from_pretrained import convert_hf_model_config
from transformer_lens.pretrained.weight_conversions import (
    convert_llama_weights,
    convert_mistral_weights,
    convert_olmoe_weights,
    convert_qwen2_weights,
)

from routesae.layers import tl_resid_hook
from routesae.models.routers import RoutingDecision

# HF model_type -> (HF architecture name TransformerLens maps, state-dict converter)
_SUPPORTED: dict[str, tuple[str, Callable[[Any, HookedTransformerConfig], dict[str, torch.Tensor]]]] = {
    "olmoe": ("OlmoeForCausalLM", convert_olmoe_weights),
    "llama": ("LlamaForCausalLM", convert_llama_weights),
    "mistral": ("MistralForCausalLM", convert_mistral_weights),
    "qwen2": ("Qwen2ForCausalLM", convert_qwen2_weights),
}


def supported_tl_model_types() -> list[str]:
    """HF ``model_type`` values :func:`load_hooked_transformer` accepts."""
    return sorted(_SUPPORTED)


def _tl_config(hf_config: Any, architecture: str, device: str | torch.device,
               dtype: torch.dtype, model_name: str) -> HookedTransformerConfig:
    """Map a local HF config to a ``HookedTransformerConfig`` with the library's own mapping."""
    with tempfile.TemporaryDirectory(prefix="routesae_tlcfg_") as tmp:
        config_dict = hf_config.to_dict()
        config_dict["architectures"] = [architecture]
        (Path(tmp) / "config.json").write_text(json.dumps(config_dict))
        cfg_dict = convert_hf_model_config(tmp)
    cfg_dict.update(
        model_name=model_name,
        tokenizer_name=None,  # the tokenizer is passed in explicitly, never fetched
        init_weights=False,
        device=str(device),
        n_devices=1,
        dtype=dtype,
        from_checkpoint=False,
        default_prepend_bos=cfg_dict.get("default_prepend_bos", True),
    )
    return HookedTransformerConfig.from_dict(cfg_dict)


def load_hooked_transformer(path: str | Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """Build a ``HookedTransformer`` offline from a local HF checkpoint folder.

    Supports ``model_type`` olmoe (MoE) and the dense llama, mistral and qwen2 families. The
    tokenizer is attached when the folder has one, otherwise ``model.tokenizer`` is None.
    Peak host memory is about twice the model (HF copy plus TL copy) while converting.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: pass a local Hugging Face checkpoint folder")
    hf_config = AutoConfig.from_pretrained(path)
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _SUPPORTED:
        raise ValueError(
            f"TransformerLens backend does not support model_type '{model_type}'; "
            f"supported: {', '.join(supported_tl_model_types())} (use the Hugging Face backend)"
        )
    architecture, converter = _SUPPORTED[model_type]
    cfg = _tl_config(hf_config, architecture, device, dtype, path.name)

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf_model.eval()
    with torch.no_grad():
        state_dict = converter(hf_model, cfg)
        state_dict = {k: v.detach().to(dtype) for k, v in state_dict.items()}

    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path)

    with warnings.catch_warnings():  # 3.x deprecates HookedTransformer in favour of the bridge
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    del hf_model, state_dict
    model.to(device, print_details=False)
    model.eval()
    return model


def tl_moe_layers(model: HookedTransformer) -> list[int]:
    """Block indices whose MLP is a routed TransformerLens ``MoE`` (empty for a dense model)."""
    return [i for i, block in enumerate(model.blocks) if isinstance(block.mlp, MoE)]


def tl_num_experts(model: HookedTransformer) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    return int(model.cfg.num_experts or 0) if tl_moe_layers(model) else 0


def tl_top_k(model: HookedTransformer) -> int:
    """Experts per token (0 for a dense model)."""
    return int(model.cfg.experts_per_token or 0) if tl_moe_layers(model) else 0


def _router_hooks(layer: int) -> tuple[str, str, str]:
    return (f"blocks.{layer}.mlp.hook_expert_indices", f"blocks.{layer}.mlp.hook_expert_weights",
            f"blocks.{layer}.ln2.hook_normalized")


@torch.no_grad()
def tl_capture_batch(model: HookedTransformer, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None, layers: list[int],
                     moe_layers: list[int], want_logits: bool,
                     ) -> tuple[torch.Tensor, dict[int, RoutingDecision]]:
    """One forward pass with ``run_with_cache``, reading only the hooks needed.

    Returns ``resid`` ``[batch, seq, len(layers), d_model]`` float32 (``hook_resid_post``) and one
    :class:`RoutingDecision` per layer of ``moe_layers``, flattened ``[batch * seq]``:

    - ``indices`` [n, k] int64 from ``hook_expert_indices`` (top-k of the softmax);
    - ``weights`` [n, k] float32: ``hook_expert_weights`` holds the *full* softmax [n, E], so it is
      gathered at the indices and renormalised when ``cfg.norm_topk_prob``, then cast through the
      model dtype, exactly as ``MoE.forward`` does before scaling the expert outputs;
    - ``logits`` [n, E] (when ``want_logits``): the exact pre-softmax router scores, recomputed as
      ``W_gate(ln2(x))`` from ``blocks.{l}.ln2.hook_normalized`` (TransformerLens has no router
      logits hook), else None.

    ``attention_mask`` is passed to TransformerLens, which masks padded keys and offsets rotary
    positions by it; right padding matches HF with default positions on every real token.
    Padded positions are still returned (capture drops them).
    """
    moe_set = set(tl_moe_layers(model))
    bad = [m for m in moe_layers if m not in moe_set]
    if bad:
        raise ValueError(f"layers {bad} are not MoE layers of this model (MoE layers: {sorted(moe_set)})")
    names = {tl_resid_hook(layer) for layer in layers}
    for m in moe_layers:
        idx_name, w_name, ln_name = _router_hooks(m)
        names.update((idx_name, w_name))
        if want_logits:
            names.add(ln_name)

    device = model.cfg.device or "cpu"
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    _, cache = model.run_with_cache(input_ids, attention_mask=mask, return_type=None,
                                    names_filter=lambda name: name in names)

    batch, seq = input_ids.shape
    if layers:
        resid = torch.stack([cache[tl_resid_hook(layer)] for layer in layers], dim=2).float()
    else:
        resid = torch.empty(batch, seq, 0, model.cfg.d_model)

    routing: dict[int, RoutingDecision] = {}
    for m in moe_layers:
        idx_name, w_name, ln_name = _router_hooks(m)
        indices = cache[idx_name].reshape(batch * seq, -1).long()
        probs = cache[w_name].reshape(batch * seq, -1).float()
        weights = probs.gather(1, indices)
        if model.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(model.cfg.dtype).float()
        logits = None
        if want_logits:
            block = model.blocks[m]
            normed = cache[ln_name].to(model.cfg.dtype) * block.ln2.w
            logits = block.mlp.W_gate(normed).reshape(batch * seq, -1).float()
        n_active = torch.full((batch * seq,), indices.shape[1], dtype=torch.int64, device=indices.device)
        applied = getattr(model.blocks[m].mlp, "routesae_routing", None)  # set under a routing override
        if applied is not None:
            idx, w, valid = applied
            indices = idx.long().masked_fill(~valid, -1)
            weights = w.to(model.cfg.dtype).float().masked_fill(~valid, 0.0)
            n_active = valid.sum(-1)
        routing[m] = RoutingDecision(indices=indices, weights=weights, n_active=n_active, logits=logits)
    return resid, routing
