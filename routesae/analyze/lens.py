"""Decoder-side tables of a dictionary: each latent's nearest latents and its logit lens.

Both read only the decoder rows ``W_dec [M, d]`` (and, for the logit lens, the model's final norm
gain and unembedding); ``routesae analyze`` writes them into the latents table (features.py).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor


def nearest_latents(w_dec: Tensor, k: int = 10, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """``(index [M, k], cosine [M, k])`` of each latent's nearest decoder rows (itself excluded)."""
    w = torch.nn.functional.normalize(w_dec.detach().float().cpu(), dim=-1)
    k = min(k, w.shape[0] - 1)
    idx, cos = [], []
    for s in range(0, w.shape[0], chunk):
        sim = w[s:s + chunk] @ w.t()
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -math.inf
        top = sim.topk(k, dim=1)
        idx.append(top.indices)
        cos.append(top.values)
    return torch.cat(idx), torch.cat(cos)


def _final_norm_gain(model) -> Tensor | None:
    for path in ("model.norm", "model.final_layernorm", "transformer.ln_f", "gpt_neox.final_layer_norm", "ln_final"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        w = getattr(obj, "weight", None) if obj is not None else None
        if isinstance(w, Tensor):
            return w.detach().float().cpu() + (1.0 if "Gemma" in type(obj).__name__ else 0.0)
    return None


def logit_lens(w_dec: Tensor, model, tokenizer=None, k: int = 10, strings: np.ndarray | None = None) -> pd.DataFrame:
    """Top/bottom ``k`` tokens of each decoder row through the final norm and the unembedding.

    The direction goes through the norm's gain only: ``(W_dec[i] * g) @ W_U.T`` (no mean removal
    or RMS division, which would not change a direction's ranking; Gemma-style norms use ``1 + g``)."""
    w_u = model.get_output_embeddings().weight.detach().float().cpu()
    g = _final_norm_gain(model)
    dirs = w_dec.detach().float().cpu() * (g if g is not None else 1.0)
    step = max(1, 2**24 // w_u.shape[0])
    pos, neg = [], []
    for s in range(0, dirs.shape[0], step):
        logits = dirs[s:s + step] @ w_u.t()
        pos.append(logits.topk(k, dim=1))
        neg.append((-logits).topk(k, dim=1))

    def name(i: int) -> str:
        if tokenizer is not None:
            return tokenizer.decode([i])
        return str(strings[i]) if strings is not None and i < len(strings) else str(i)

    pi, pv = torch.cat([p.indices for p in pos]), torch.cat([p.values for p in pos])
    ni, nv = torch.cat([p.indices for p in neg]), -torch.cat([p.values for p in neg])
    return pd.DataFrame({"latent": np.arange(dirs.shape[0]), "logit_pos": [[name(i) for i in r] for r in pi.tolist()],
                         "logit_pos_values": list(pv.double().numpy()),
                         "logit_neg": [[name(i) for i in r] for r in ni.tolist()],
                         "logit_neg_values": list(nv.double().numpy())})
