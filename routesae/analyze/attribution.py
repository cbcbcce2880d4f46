"""Feature x expert association: which experts the router picked at the tokens where a latent fires.

For every (latent, MoE layer, expert) the accumulator counts the latent's active tokens whose
top-k at that layer includes the expert (the store's router records, ``indices`` with -1 for
unused slots). With ``n_i`` the latent's active tokens and ``base_share`` the fraction of all
evaluated tokens routed to the expert at that layer::

    share = count / n_i        lift = share / base_share

``at_routed_layer`` marks the latent's routed layer (RouteSAE: its most frequent routed layer;
TopK: the SAE's layer), or the nearest MoE layer at or below it. The counts live in one int32
tensor ``[M, n_moe, E]`` (4 bytes each: 16k latents x 16 layers x 64 experts = 64 MiB), so memory
does not depend on the number of tokens. Example::

    acc = ExpertAttribution(n_latents=64, moe_layers=[0, 1], n_experts=8)
    acc.add(latent, row, router["indices"])          # per chunk: active (latent, token row) pairs
    t = acc.tables(latent_count, routed_layer)       # {"latent_experts", "expert_latents", "top"}
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

MIN_COUNT = 3  # latent_experts rows
MIN_COUNT_TOP = 5  # expert_latents rows
TOP_LATENTS = 20
PAIR_BUDGET = 2**22  # (entry, layer, slot) triples materialised at once


class ExpertAttribution:
    """Streaming counts of the experts selected at the active tokens of every latent."""

    def __init__(self, n_latents: int, moe_layers: list[int], n_experts: int):
        self.n_latents, self.moe_layers, self.n_experts = n_latents, list(moe_layers), int(n_experts)
        n_moe = len(self.moe_layers)
        self.counts = torch.zeros(n_latents, n_moe, self.n_experts, dtype=torch.int32)
        self.base = torch.zeros(n_moe, self.n_experts, dtype=torch.int64)
        self.tokens = 0

    def add(self, latent: Tensor, row: Tensor, indices: Tensor, n_tokens: int | None = None) -> None:
        """Count one chunk: ``latent``/``row`` [P] active (latent, token row) pairs (each pair once),
        ``indices`` [N, n_moe, k_max] the experts picked at each token (-1 = unused slot)."""
        n_moe, e = len(self.moe_layers), self.n_experts
        idx = indices[:n_tokens].long() if n_tokens is not None else indices.long()
        valid = (idx >= 0) & (idx < e)  # -1 padding and zero-computation experts are not counted
        layer = torch.arange(n_moe).view(1, n_moe, 1).expand_as(idx)
        self.base.view(-1).index_add_(0, (layer * e + idx)[valid], torch.ones(int(valid.sum()), dtype=torch.int64))
        self.tokens += idx.shape[0]
        flat = self.counts.view(-1)
        step = max(1, PAIR_BUDGET // max(1, idx.shape[1] * idx.shape[2]))
        for s in range(0, latent.numel(), step):
            lat, sel = latent[s:s + step].long(), idx[row[s:s + step].long()]  # [p, n_moe, k]
            ok = (sel >= 0) & (sel < e)
            key = (lat.view(-1, 1, 1) * n_moe + torch.arange(n_moe).view(1, n_moe, 1)) * e + sel
            key = key[ok]
            flat.index_put_((key,), torch.ones(key.numel(), dtype=torch.int32), accumulate=True)

    def base_share(self) -> Tensor:
        """``[n_moe, E]``: fraction of all tokens whose top-k at the layer includes the expert."""
        return self.base.double() / max(self.tokens, 1)

    def routed_moe_layer(self, routed_layer: np.ndarray) -> np.ndarray:
        """Per latent the nearest MoE layer at or below its routed layer (-1 where there is none)."""
        moe = np.asarray(sorted(self.moe_layers))
        if moe.size == 0:
            return np.full(len(routed_layer), -1)
        pos = np.searchsorted(moe, np.asarray(routed_layer), side="right") - 1
        return np.where((pos >= 0) & (np.asarray(routed_layer) >= 0), moe[pos.clip(0)], -1)

    def tables(self, latent_count: np.ndarray, routed_layer: np.ndarray, min_count: int = MIN_COUNT,
               top_latents: int = TOP_LATENTS, min_count_top: int = MIN_COUNT_TOP) -> dict[str, pd.DataFrame]:
        """``latent_experts`` (count >= min_count), ``expert_latents`` (per expert its top latents by
        lift with count >= min_count_top) and ``top`` (per latent its highest-lift expert at the
        routed MoE layer: ``latent, top_expert_layer, top_expert, top_expert_lift``; -1/NaN if none)."""
        lat, m, ex = (self.counts >= max(min_count, 1)).nonzero(as_tuple=True)
        count = self.counts[lat, m, ex].long().numpy()
        lat_np, m_np, ex_np = lat.numpy(), m.numpy(), ex.numpy()
        moe = np.asarray(self.moe_layers, dtype=np.int64)
        n_i = np.asarray(latent_count, dtype=np.float64)[lat_np]
        share = count / np.maximum(n_i, 1)
        base = self.base_share().numpy()[m_np, ex_np]
        at_layer = self.routed_moe_layer(routed_layer)
        layer = moe[m_np] if moe.size else np.zeros(0, np.int64)
        le = pd.DataFrame({"latent": lat_np.astype(np.int64), "layer": layer, "expert": ex_np.astype(np.int64),
                           "count": count.astype(np.int64), "share": share, "base_share": base,
                           "lift": share / np.where(base > 0, base, np.nan),
                           "at_routed_layer": layer == at_layer[lat_np]})
        el = le[le["count"] >= min_count_top].sort_values(["layer", "expert", "lift", "latent"],
                                                          ascending=[True, True, False, True])
        el = el.groupby(["layer", "expert"], sort=False).head(top_latents).copy()
        el["rank"] = el.groupby(["layer", "expert"], sort=False).cumcount().astype(np.int64)
        el = el[["layer", "expert", "rank", "latent", "lift", "count"]].reset_index(drop=True)
        top = pd.DataFrame({"latent": np.arange(self.n_latents), "top_expert_layer": at_layer.astype(np.int64),
                            "top_expert": np.full(self.n_latents, -1, np.int64),
                            "top_expert_lift": np.full(self.n_latents, np.nan)})
        best = le[le["at_routed_layer"]].sort_values(["latent", "lift", "expert"], ascending=[True, False, True])
        best = best.drop_duplicates("latent")
        top.loc[best["latent"].to_numpy(), "top_expert"] = best["expert"].to_numpy()
        top.loc[best["latent"].to_numpy(), "top_expert_lift"] = best["lift"].to_numpy()
        return {"latent_experts": le.reset_index(drop=True), "expert_latents": el, "top": top}
