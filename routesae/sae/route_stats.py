"""How a RouteSAE router uses its layers: per-layer fractions, normalised entropy and margin.

For ``N`` tokens routed among ``L'`` layers, with ``n_i`` tokens sent to layer ``i``::

    f_i      = n_i / N                                    routed-layer fractions (sum to 1)
    H_norm   = -sum_i f_i log f_i / log L'                 1 = every layer equally used, 0 = one layer
    margin   = mean_tokens (p_top1 - p_top2)               how decided the router is (0 = a coin toss)

The same numbers are written to ``metrics.jsonl`` during training (per log window), to
``eval.json`` (on the evaluated tokens), and shown in the report and on the dashboard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def layer_fractions(counts: Sequence[int] | Tensor) -> list[float]:
    """Routed-token counts per layer -> fractions (all zero when no token was counted)."""
    c = [float(x) for x in (counts.tolist() if isinstance(counts, Tensor) else counts)]
    total = sum(c)
    return [x / total if total > 0 else 0.0 for x in c]


def normalised_entropy(fractions: Sequence[float]) -> float:
    """``-sum f log f / log L'`` in [0, 1] (0 for a single layer, or when ``L' < 2``)."""
    if len(fractions) < 2:
        return 0.0
    h = -sum(f * math.log(f) for f in fractions if f > 0)
    return max(0.0, min(1.0, h / math.log(len(fractions))))


def margin_sum(probs: Tensor) -> Tensor:
    """Sum over tokens of ``p_top1 - p_top2`` for router weights ``[N, L']`` (a 0-dim tensor)."""
    if probs.shape[-1] < 2:
        return probs.new_zeros(())
    top2 = probs.detach().topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).sum()


def routing_summary(counts: Sequence[int] | Tensor, margin_total: float | None = None) -> dict[str, object]:
    """``{"fractions", "entropy", "margin"}`` from layer counts and the summed margin of the same tokens."""
    fr = layer_fractions(counts)
    n = sum(float(x) for x in (counts.tolist() if isinstance(counts, Tensor) else counts))
    margin = margin_total / n if margin_total is not None and n > 0 else None
    return {"fractions": fr, "entropy": normalised_entropy(fr), "margin": margin}


def count_layers(routed_layer: Tensor, n_layers: int) -> Tensor:
    """``[N]`` routed-layer positions -> ``[L']`` int64 counts."""
    return torch.bincount(routed_layer.reshape(-1), minlength=n_layers)
