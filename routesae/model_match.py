"""Does this model match this store and SAE? Checked before evaluate splices or analyze's logit lens runs.

Two checks, both before anything is written:

- :func:`check_shape` (reads nothing from the store's data): the model's hidden size must equal the
  store's ``d_model`` (and so the SAE's ``d_in``), its number of decoder blocks the store's
  ``n_layers``, and its vocabulary must hold every token id of the store (``model.vocab_size`` in
  the manifest).
- :func:`check_reproduces`: the model, run on the store's first whole contexts (at most
  ``CHECK_CONTEXTS`` contexts, ``CHECK_TOKENS`` tokens) under the store's *own* routing override
  (``manifest["routing_override"]``, none if none; never the evaluation's), must reproduce the
  stored rows of the layers asked for. The measure is the relative row difference
  ``r = ||h_model - h_stored|| / ||h_stored||``, its median over the rows of each layer, the
  largest over the layers; it is refused above ``TOLERANCE[store dtype]``: **0.01 for a float32
  store, 0.1 for a float16 / bfloat16 one**. The median, not the max: a near-tie of two experts'
  router logits flips under half-precision noise, and that one token's row then differs by up to
  0.3 from the right model.

  Measured (CPU) on the tiny olmoe / qwen2_moe / deepseek_v3 / longcat_flash models and on the
  demo MoE (data/demo-moe: 8 blocks, 32 experts, top-4), on 4 contexts batched otherwise than the
  capture (3 or 8 per batch, packed or padded): the right model gives at most 1e-7 in the
  store's dtype; loaded in float32 (as analyze does) it gives at most 0.0009 on a float16 store
  and 0.0073 on a bfloat16 one; a model of the same shape with other weights (another seed,
  a fresh initialisation) gives 1.0 or more. A TransformerLens-backend store checked with the
  Hugging Face model gives ~2e-7. The tolerances leave a factor of 14 or more on the
  right side and 10 or more on the wrong side (100 for float32).

  The model's :func:`routesae.models.load.config_hash` is compared with the store's
  (``manifest["model"]["config_hash"]``, None for TransformerLens stores): a different hash
  whose rows reproduce (a copied checkpoint with a harmless config edit) is logged on one line
  and recorded; rows that do not reproduce are refused whatever the hash says.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from routesae.models.intervene import override_routing
from routesae.models.load import config_hash, decoder_layers, first_device
from routesae.store import Store
from routesae.store_contexts import context_batch, store_contexts, stored_rows

log = logging.getLogger(__name__)
TOLERANCE = {"float32": 0.01, "float16": 0.1, "bfloat16": 0.1}
CHECK_CONTEXTS = 4
CHECK_TOKENS = 2048
MEASURE = "max over layers of the median over rows of ||h_model - h_stored|| / ||h_stored||"


class ModelMismatchError(ValueError):
    """A model that is not the store's (other shape or other weights); the message says what to pass."""


# ---------------------------------------------------------------- a forward with block hooks


def capture_hook(store_to: dict, layer: int):
    """Forward hook keeping block ``layer``'s output in ``store_to[layer]``."""
    def hook(module, args, output):
        store_to[layer] = (output[0] if isinstance(output, tuple) else output).detach()
    return hook


def forward_logits(model, ids: Tensor, mask: Tensor, hooks: dict[int, Any]) -> Tensor:
    """float32 logits of one forward with ``hooks[j]`` on decoder block j (removed afterwards)."""
    blocks = decoder_layers(model)
    handles = [blocks[j].register_forward_hook(h) for j, h in hooks.items()]
    try:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()


def real_rows(acts: dict[int, Tensor], layers: list[int], mask: Tensor) -> Tensor:
    """The captured outputs of ``layers`` at the real (unpadded) positions, ``[N, L', d]`` float32 on CPU."""
    flat = mask.bool().flatten().nonzero().squeeze(-1)
    return torch.stack([acts[j].flatten(0, 1)[flat.to(acts[j].device)].float().cpu() for j in layers], 1)


# ---------------------------------------------------------------- the checks


def _model_sizes(model) -> tuple[int, int, int]:
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[1]), len(decoder_layers(model)), int(emb.weight.shape[0])


def check_shape(model, model_name: str, store: Store, sae_layers: list[int]) -> None:
    """Refuse (one line) a model whose hidden size, block count or vocabulary cannot be the store's."""
    hidden, blocks, vocab = _model_sizes(model)
    fix = _fix(store)
    if hidden != store.d_model:
        raise ModelMismatchError(f"model {model_name} has hidden size {hidden} but store {store.root} has d_model="
                                 f"{store.d_model} (the SAE reads d_in={store.d_model}); {fix}")
    n_layers = int(store.manifest.get("n_layers", blocks))
    if blocks != n_layers or max(sae_layers) >= blocks:
        raise ModelMismatchError(f"model {model_name} has {blocks} decoder blocks but store {store.root} was captured "
                                 f"from a model with {n_layers} (the SAE reads layers {sae_layers}); {fix}")
    store_vocab = (store.manifest.get("model") or {}).get("vocab_size")
    if store_vocab is not None and int(store_vocab) > vocab:
        raise ModelMismatchError(f"model {model_name} has a vocabulary of {vocab} but store {store.root} holds token "
                                 f"ids of a vocabulary of {int(store_vocab)}; {fix}")


@torch.no_grad()
def check_reproduces(model, model_name: str, store: Store, layers: list[int],
                     contexts: int = CHECK_CONTEXTS) -> dict[str, Any]:
    """Run the store's first whole contexts through ``model`` (under the store's own routing override) and
    refuse (:class:`ModelMismatchError`) when the rows of ``layers`` are not reproduced; return what was measured."""
    dtype = str(store.manifest.get("dtype", "float32"))
    tol = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    store_hash = (store.manifest.get("model") or {}).get("config_hash")
    model_hash = config_hash(model) if hasattr(model, "config") else None
    ctx = int(store.manifest.get("ctx") or CHECK_TOKENS)
    group, _ = store_contexts(store, max(1, min(CHECK_TOKENS, contexts * ctx)), contexts)
    info: dict[str, Any] = {"measure": MEASURE, "tolerance": tol, "store_dtype": dtype,
                            "routing_override": store.manifest.get("routing_override"),
                            "config_hash_model": model_hash, "config_hash_store": store_hash}
    if not group:
        return {**info, "value": None, "tokens": 0, "skipped": "no complete context in the store"}
    ids, mask = context_batch(group, first_device(model))
    acts: dict[int, Tensor] = {}
    override = store.manifest.get("routing_override")
    with override_routing(model, override) if override else contextlib.nullcontext():
        forward_logits(model, ids, mask, {j: capture_hook(acts, j) for j in layers})
    h = real_rows(acts, layers, mask).double()
    ref = stored_rows(store, pd.concat(group), layers).double()
    norms = ref.norm(dim=-1)  # [N, L']
    rel = (h - ref).norm(dim=-1) / norms.clamp_min(1e-6 * float(norms.mean()) + 1e-30)
    per_layer = rel.median(0).values  # [L']
    value = float(per_layer.max())
    info.update(value=value, per_layer_median=dict(zip(map(str, layers), per_layer.tolist())),
                max=float(rel.max()), max_abs_diff=float((h - ref).abs().max()),
                tokens=int(h.shape[0]))
    hash_differs = store_hash is not None and model_hash is not None and store_hash != model_hash
    if value > tol:
        why = " (its config hash differs from the store's too)" if hash_differs else ""
        raise ModelMismatchError(f"model {model_name} does not reproduce store {store.root} (captured from "
                                 f"{_store_model(store)}){why}: median relative row difference {value:.3g} > tolerance "
                                 f"{tol:g} ({dtype} store); {_fix(store)}")
    if hash_differs:
        log.warning("model %s has config hash %s, store %s records %s; its rows reproduce the store (relative "
                    "difference %.3g <= %g), so it is used", model_name, model_hash, store.root, store_hash, value, tol)
    return info


def _store_model(store: Store) -> str:
    return str((store.manifest.get("model") or {}).get("name_or_path"))


def _fix(store: Store) -> str:
    return f"pass the store's model ({_store_model(store)}) with --model, or capture a store with this model"


def check_model(model, model_name: str, store: Store, layers: list[int],
                contexts: int = CHECK_CONTEXTS) -> dict[str, Any]:
    """:func:`check_shape` then :func:`check_reproduces`; returns what the latter measured."""
    check_shape(model, model_name, store, layers)
    return check_reproduces(model, model_name, store, layers, contexts)
