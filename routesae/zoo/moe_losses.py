"""Auxiliary losses of MoE language-model training: Switch load balancing (per layer or pooled) and router z-loss."""

from __future__ import annotations

import torch

BALANCE_FORMS = ("per_layer", "pooled")


def switch_balance_loss(router_logits, top_k: int, form: str = "per_layer") -> torch.Tensor:
    """Switch load-balancing loss over MoE layers (each ``[tokens, E]`` router logits; ``top_k`` when balanced).

    For one set of tokens T: ``E * sum_i f_i * P_i`` with ``f_i`` = (top-k slots given to expert i) /
    (|T| k) x k and ``P_i`` = mean over T of softmax(logits)_i (transformers' convention: ``f`` summed
    over the k slots, so a balanced router gives ``E * k * (1/E) * (1/E) * E = k``).
    ``per_layer``: ``sum_l loss(T_l)`` over the layers l (each layer balanced on its own; the value is
    ``L * k`` when every layer is balanced). ``pooled``: ``loss(T_1 + ... + T_L)``, the rows of all
    layers stacked first (transformers' ``load_balancing_loss_func``; a layer may starve expert i as
    long as another layer overloads it).
    """
    if form not in BALANCE_FORMS:
        raise ValueError(f"balance '{form}' unknown; use one of {', '.join(BALANCE_FORMS)}")

    def one(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        f = torch.zeros_like(probs).scatter_add_(1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
        return logits.shape[-1] * (f.mean(0) * probs.mean(0)).sum()

    if form == "pooled":
        return one(torch.cat(list(router_logits)))
    return torch.stack([one(r) for r in router_logits]).sum()


def router_z_loss(router_logits) -> torch.Tensor:
    return torch.stack([torch.logsumexp(r.float(), dim=-1).pow(2).mean() for r in router_logits]).mean()
