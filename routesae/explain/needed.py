"""Which latents predict that a token needs more experts: needed k' regressed on the SAE's latents, by domain.

Needed k' is ``analyze-routing``'s definition (:mod:`routesae.analyze.routing`), computed here per store
token: the smallest k' < k for which ``topk:k'`` at every MoE layer keeps the token's next-token
distribution within KL ``eps`` (nats) of the model's own routing, else k. The model runs over whole
store contexts (the tokens the probe reads), so every token has both its latents and its k'.

A linear regression (the latent code -> k', L1-regularised, trained on the probe's training contexts)
gives each latent a weight: positive = its activation predicts more experts. Reported: R² on the held-out
contexts against the token-id mean (unigram) baseline, and per domain the latents with the largest
contribution (weight x mean activation over that domain's tokens).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from routesae.explain.probe import ProbeConfig, ProbeData
from routesae.store import Store
from routesae.store_contexts import context_batch, store_contexts


@torch.inference_mode()
def needed_k(model, store: Store, n_tokens: int, eps: float = 0.01, batch: int = 8) -> pd.DataFrame:
    """``shard, row, needed_k`` of the store's first whole contexts within ``n_tokens`` tokens."""
    from routesae.models.intervene import override_routing

    k = int(store.manifest.get("top_k") or 0)
    if k < 2:
        raise ValueError(f"store {store.root} routes top-{k}: needed k' needs a model with top-k >= 2")
    groups, _ = store_contexts(store, n_tokens, None)
    device = next(model.parameters()).device
    out = []
    for b in range(0, len(groups), batch):
        grp = groups[b:b + batch]
        ids, mask = context_batch(grp, device)

        def logp(ids=ids, mask=mask) -> torch.Tensor:
            return torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)

        own = logp()
        need = torch.full(ids.shape, k, dtype=torch.long)
        for kk in range(k - 1, 0, -1):  # from k-1 down: the smallest k' within eps wins
            with override_routing(model, f"topk:{kk}"):
                kl = (own.exp() * (own - logp())).sum(-1).cpu()
            need[kl <= eps] = kk
        for i, g in enumerate(grp):
            out.append(pd.DataFrame({"shard": g["shard"].to_numpy(), "row": g["row"].to_numpy(),
                                     "needed_k": need[i, :len(g)].numpy()}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["shard", "row", "needed_k"])


def align(d: ProbeData, nk: pd.DataFrame) -> np.ndarray:
    """``needed_k`` per probe token (NaN where it was not computed)."""
    offset, start = {}, 0
    for s, n in d.shards:
        offset[s] = (start, n)
        start += n
    y = np.full(start, np.nan)
    for s, g in nk.groupby("shard"):
        if int(s) in offset:
            o, n = offset[int(s)]
            r = g["row"].to_numpy()
            ok = r < n
            y[o + r[ok]] = g["needed_k"].to_numpy()[ok]
    return y


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return float(1 - ((y - p) ** 2).sum() / ss) if ss > 0 else float("nan")


def regress(d: ProbeData, y: np.ndarray, n_latents: int, cfg: ProbeConfig,
            top: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(summary by domain, top latents by domain)`` of the regression of ``y`` (needed k') on the latents."""
    have = ~np.isnan(y)
    tr = torch.from_numpy(np.flatnonzero(have & d.train))
    te = np.flatnonzero(have & ~d.train)
    if tr.numel() < 10 or te.size < 10:
        raise ValueError("too few tokens with a needed k' for a train/test split; use more --needed-tokens")
    yt = torch.from_numpy(y).float()
    torch.manual_seed(cfg.seed)
    emb = torch.nn.EmbeddingBag(n_latents, 1, mode="sum")
    torch.nn.init.zeros_(emb.weight)
    bias = torch.full((1,), float(yt[tr].mean()), requires_grad=True)
    opt = torch.optim.Adam([emb.weight, bias], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        for b in torch.randperm(tr.numel(), generator=gen).split(cfg.batch):
            rows = tr[b]
            pred = emb(d.idx[rows], per_sample_weights=d.val[rows])[:, 0] + bias
            loss = ((pred - yt[rows]) ** 2).mean() + cfg.l1 * emb.weight.abs().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = (emb(d.idx, per_sample_weights=d.val)[:, 0] + bias).numpy()
    w = emb.weight.detach()[:, 0]
    tok_tr = pd.Series(y[tr.numpy()]).groupby(d.token[tr.numpy()]).mean()
    uni = pd.Series(d.token).map(tok_tr).fillna(float(y[tr.numpy()].mean())).to_numpy()
    rows, lat_rows = [], []
    for dom in ["all", *sorted(np.unique(d.domain[te]))]:
        sel = te if dom == "all" else te[d.domain[te] == dom]
        if sel.size == 0:
            continue
        rows.append({"domain": dom, "tokens": int(sel.size), "mean_needed_k": float(y[sel].mean()),
                     "mean_predicted": float(pred[sel].mean()), "r2_latents": _r2(y[sel], pred[sel]),
                     "r2_unigram": _r2(y[sel], uni[sel])})
        on = torch.from_numpy(np.flatnonzero(have) if dom == "all" else np.flatnonzero(have & (d.domain == dom)))
        mean_act = torch.zeros(n_latents).index_add_(0, d.idx[on].flatten(), d.val[on].flatten()) / max(on.numel(), 1)
        contrib = w * mean_act
        best = contrib.topk(min(top, n_latents))
        lat_rows += [{"domain": dom, "rank": r, "latent": int(i), "weight": float(w[i]), "contribution": float(c)}
                     for r, (c, i) in enumerate(zip(best.values.tolist(), best.indices.tolist())) if c > 0]
    return pd.DataFrame(rows), pd.DataFrame(lat_rows)
