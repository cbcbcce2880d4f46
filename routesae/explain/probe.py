"""Routing explained by features: predict each token's routed experts from its SAE latents.

Per MoE layer, an L1-regularised linear probe maps a token's latent code (the SAE's sparse
activations) to a softmax over the layer's E experts, trained to put its mass on the token's true
top-k experts (cross-entropy against the uniform distribution over them). Tokens are split by
context (``context % 10 < 7``: train, else test), so the test tokens are never seen in training.
Metric: recall@k = mean over test tokens of |predicted top-k ∩ true top-k| / k. Baselines on the
same split:

- ``unigram``: the token id's expert frequencies over the training tokens (unseen ids: all tokens);
- ``bigram``: the (previous token, token) pair's frequencies, backing off to the unigram when unseen;
- ``raw_residual``: a linear probe on the raw residual stream entering the MoE block (layer j-1, the
  nearest stored layer when it is not in the store): an upper reference, not an explanation.

Per expert, the latents with the largest probe weights are its *predictive features*. Example::

    r = probe_routing(sae, store, ProbeConfig(tokens=65536))
    r.recall.pivot(index="layer", columns="method", values="recall")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from routesae.analyze.features import iter_chunks
from routesae.store import Store

METHODS = ("unigram", "bigram", "latents", "raw_residual")


@dataclass
class ProbeConfig:
    """``tokens``: store tokens used (train and test together); ``epochs``/``batch``/``lr``/``l1``: the probe's
    Adam training; ``top_features``: predictive latents kept per expert; ``raw``: also fit the raw-residual probe."""

    tokens: int = 65536
    epochs: int = 8
    batch: int = 512
    lr: float = 1e-2
    l1: float = 1e-5
    top_features: int = 10
    raw: bool = True
    device: str = "cpu"
    seed: int = 0


@dataclass
class ProbeData:
    """Per token: padded latent code ``idx/val [N, K]``, ``token [N]``, ``prev [N]`` (-1 at a context start),
    ``experts [N, n_moe, k]`` (true top-k), ``train [N]`` mask, ``domain [N]``; and where it came from."""

    idx: torch.Tensor
    val: torch.Tensor
    token: np.ndarray
    prev: np.ndarray
    experts: torch.Tensor
    train: np.ndarray
    domain: np.ndarray
    shards: list[tuple[int, int]]


@dataclass
class ProbeResult:
    recall: pd.DataFrame  # layer, method, recall, k, tokens_train, tokens_test, raw_layer
    weights: torch.Tensor  # [M, n_moe, E] latent probe weights
    expert_features: pd.DataFrame  # layer, expert, rank, latent, weight
    domain_recall: pd.DataFrame  # layer, domain, method, recall (test tokens)


def _pad(row: torch.Tensor, lat: torch.Tensor, act: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    cnt = torch.bincount(row, minlength=n)
    width = max(int(cnt.max()) if cnt.numel() else 1, 1)
    start = torch.cumsum(cnt, 0) - cnt
    pos = torch.arange(row.numel()) - start[row]
    idx, val = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width)
    idx[row, pos], val[row, pos] = lat, act.float()
    return idx, val


def probe_data(sae, store: Store, tokens: int, device: str = "cpu") -> ProbeData:
    """Read the first ``tokens`` store tokens: the SAE's codes, the routed experts, token ids and contexts."""
    if not store.moe_layers:
        raise ValueError(f"store {store.root} has no router records (a dense model); the routing probe needs an MoE")
    k = int(store.manifest.get("top_k") or 0)
    idxs, vals, toks, prevs, exps, ctxs, doms, shards = [], [], [], [], [], [], [], []
    domains = sorted({d for s in store.shards for d in _domains(store, s["index"])})
    n_tok = min(tokens, store.n_tokens)
    for ch in iter_chunks(sae, store, n_tok, domains, device=device):
        n = ch.n_tokens
        i, v = _pad(ch.row, ch.latent, ch.act, n)
        idxs.append(i)
        vals.append(v)
        tok, ctx = ch.token_id.numpy(), ch.context.numpy()
        prev = np.full(n, -1, dtype=np.int64)
        same = ctx[1:] == ctx[:-1]
        prev[1:][same] = tok[:-1][same]
        ex = ch.router.long()
        exps.append(ex[:, :, :k] if k else ex)
        toks.append(tok)
        prevs.append(prev)
        ctxs.append(ctx)
        doms.append(np.asarray(domains, dtype=object)[ch.domain.numpy()] if domains else np.full(n, "", object))
        shards.append((ch.shard, n))
    width = max(x.shape[1] for x in idxs)
    idx = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in idxs])
    val = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in vals])
    ctx = np.concatenate(ctxs)
    return ProbeData(idx, val, np.concatenate(toks), np.concatenate(prevs), torch.cat(exps), ctx % 10 < 7,
                     np.concatenate(doms), shards)


def _domains(store: Store, shard: int) -> list[str]:
    from routesae.store_contexts import token_part

    return token_part(store, shard, ["domain"])["domain"].fillna("").astype(str).unique().tolist()


def recall_at_k(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Per token and layer: |top-k of ``scores [N, L, E]`` ∩ ``experts [N, L, k]``| / k (-1 slots ignored)."""
    k = experts.shape[-1]
    pred = scores.topk(k, dim=-1).indices
    hit = (experts.unsqueeze(-1) == pred.unsqueeze(-2)).any(-1) & (experts >= 0)
    return hit.float().sum(-1) / (experts >= 0).sum(-1).clamp_min(1)


def count_scores(d: ProbeData, n_experts: int, bigram: bool) -> torch.Tensor:
    """``[N, L, E]`` expert counts of each token's unigram (or bigram, backing off) over the training tokens."""
    tr = d.train
    n_layers = d.experts.shape[1]
    ex = d.experts[torch.from_numpy(tr)]
    onehot = torch.zeros(ex.shape[0], n_layers, n_experts)
    onehot.scatter_add_(2, ex.clamp_min(0), (ex >= 0).float())
    glob = onehot.sum(0)
    glob = glob / glob.sum(-1, keepdim=True).clamp_min(1)

    def table(keys: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        uk, inv = np.unique(keys[tr], return_inverse=True)
        t = torch.zeros(uk.size, n_layers, n_experts).index_add_(0, torch.from_numpy(inv.reshape(-1)), onehot)
        return uk, t

    def lookup(uk: np.ndarray, t: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        pos = np.clip(np.searchsorted(uk, keys), 0, max(uk.size - 1, 0))
        found = torch.from_numpy(uk[pos] == keys) if uk.size else torch.zeros(keys.size, dtype=torch.bool)
        out = t[torch.from_numpy(pos)] if uk.size else torch.zeros(keys.size, n_layers, n_experts)
        return out * found.view(-1, 1, 1)

    uni = lookup(*table(d.token), d.token)
    uni = uni / uni.sum(-1, keepdim=True).clamp_min(1) + 1e-3 * glob  # unseen ids fall back on all tokens
    if not bigram:
        return uni
    vocab = int(max(d.token.max(), d.prev.max())) + 2
    keys = (d.prev + 1) * vocab + d.token
    bi = lookup(*table(keys), keys)
    return bi / bi.sum(-1, keepdim=True).clamp_min(1) + 1e-2 * uni  # unseen pairs fall back on the unigram


def _fit(forward, params: list[torch.Tensor], n: int, experts: torch.Tensor, cfg: ProbeConfig,
         l1_param: torch.Tensor | None) -> None:
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        for b in torch.randperm(n, generator=gen).split(cfg.batch):
            logp = torch.log_softmax(forward(b), -1)
            ex = experts[b]
            valid = (ex >= 0).float()
            nll = -(logp.gather(-1, ex.clamp_min(0)) * valid).sum(-1) / valid.sum(-1).clamp_min(1)
            loss = nll.mean() + (cfg.l1 * l1_param.abs().sum() if l1_param is not None else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()


def latent_probe(d: ProbeData, n_latents: int, n_experts: int, cfg: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on the training tokens; ``(scores [N, L, E] for every token, weights [M, L, E])``."""
    torch.manual_seed(cfg.seed)
    n_layers = d.experts.shape[1]
    emb = torch.nn.EmbeddingBag(n_latents, n_layers * n_experts, mode="sum")
    torch.nn.init.zeros_(emb.weight)
    bias = torch.zeros(n_layers * n_experts, requires_grad=True)
    tr = torch.from_numpy(np.flatnonzero(d.train))

    def fwd(rows: torch.Tensor) -> torch.Tensor:
        return (emb(d.idx[rows], per_sample_weights=d.val[rows]) + bias).view(-1, n_layers, n_experts)

    _fit(lambda b: fwd(tr[b]), [emb.weight, bias], tr.numel(), d.experts[tr], cfg, emb.weight)
    with torch.no_grad():
        scores = torch.cat([fwd(r) for r in torch.arange(d.idx.shape[0]).split(8192)])
    return scores, emb.weight.detach().view(n_latents, n_layers, n_experts)


def residual_probe(x: torch.Tensor, experts: torch.Tensor, train: np.ndarray, n_experts: int,
                   cfg: ProbeConfig) -> torch.Tensor:
    """A linear probe from raw residuals ``x [N, d]`` (standardised with the training mean/std) to one layer's
    experts ``[N, k]``; scores ``[N, E]`` for every token."""
    torch.manual_seed(cfg.seed)
    tr = torch.from_numpy(np.flatnonzero(train))
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    lin = torch.nn.Linear(x.shape[1], n_experts)
    _fit(lambda b: lin(z[tr[b]]), list(lin.parameters()), tr.numel(), experts[tr], cfg, lin.weight)
    with torch.no_grad():
        return lin(z)


def _raw(store: Store, layer: int, shards: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([store.load_resid(s, layer)[:n].float() for s, n in shards])


def probe_routing(sae, store: Store, cfg: ProbeConfig) -> ProbeResult:
    """Recall@k of every method on every MoE layer, the latent probe's weights and each expert's top latents."""
    d = probe_data(sae, store, cfg.tokens, cfg.device)
    if d.train.all() or not d.train.any():
        raise ValueError(f"{len(d.token)} tokens in {len(np.unique(d.domain))} domains give no train/test split "
                         f"(it is by context); use more --tokens")
    n_exp = int(store.manifest["n_experts"])
    moe = list(store.moe_layers)
    test = torch.from_numpy(~d.train)
    scores = {"unigram": count_scores(d, n_exp, False), "bigram": count_scores(d, n_exp, True)}
    scores["latents"], w = latent_probe(d, sae.cfg.n_latents, n_exp, cfg)
    k = d.experts.shape[-1]
    rows, dom_rows = [], []
    per_token = {m: recall_at_k(s, d.experts) for m, s in scores.items()}  # [N, L]
    raw_layer = {}
    if cfg.raw:
        per_token["raw_residual"] = torch.full((len(d.token), len(moe)), float("nan"))
        for li, j in enumerate(moe):
            near = min(store.layers, key=lambda s: (abs(s - (j - 1)), s))
            raw_layer[j] = near
            x = _raw(store, near, d.shards)
            s = residual_probe(x, d.experts[:, li], d.train, n_exp, cfg)
            per_token["raw_residual"][:, li] = recall_at_k(s.unsqueeze(1), d.experts[:, li:li + 1])[:, 0]
    for m, r in per_token.items():
        for li, j in enumerate(moe):
            rows.append({"layer": j, "method": m, "recall": float(r[test, li].mean()), "k": k,
                         "tokens_train": int(d.train.sum()), "tokens_test": int((~d.train).sum()),
                         "raw_layer": raw_layer.get(j) if m == "raw_residual" else None})
            for dom in np.unique(d.domain[~d.train]):
                sel = test & torch.from_numpy(d.domain == dom)
                dom_rows.append({"layer": j, "domain": str(dom), "method": m, "recall": float(r[sel, li].mean()),
                                 "tokens": int(sel.sum())})
    top = w.topk(min(cfg.top_features, w.shape[0]), dim=0)  # [T, L, E]
    ef = [{"layer": j, "expert": e, "rank": t, "latent": int(top.indices[t, li, e]),
           "weight": float(top.values[t, li, e])}
          for li, j in enumerate(moe) for e in range(n_exp) for t in range(top.indices.shape[0])]
    return ProbeResult(pd.DataFrame(rows), w, pd.DataFrame(ef), pd.DataFrame(dom_rows))
