"""Expert tables from a store's router records (docs/analysis.md, "Expert tables").

:class:`ExpertStats` is a streaming accumulator: each :meth:`ExpertStats.update` adds one chunk
of tokens (router arrays + token rows) into fixed-size counters, so memory does not grow with the
number of tokens (it grows only with the number of distinct domains, and the vocabulary counters
are sized by the vocabulary). :func:`expert_tables` streams a store shard by shard.

Definitions (REFERENCE §7; k = the store's ``top_k``, E = ``n_experts``; only ids ``0..E-1``
count as experts, so ``-1`` padding and zero-computation experts are ignored):

- BOS: a token at position 0 whose id is the store's ``bos_token_id`` (every document starts with
  it, so it is routed the same way every time). BOS tokens are left out of every table and
  reported apart, as the position bucket ``"BOS"`` of ``position_profile``; ``layer_stats`` counts
  them in ``bos_tokens``. Without a BOS token (``bos_token_id`` None) position 0 is the first real
  token and counts like any other. N below = the tokens that are not BOS.
- ``share_topk(D, i)`` = tokens of domain D whose top-k includes i / tokens of D; uniform k/E;
  ``lift_topk`` = share_topk / (k/E). ``share_top1`` uses the first choice (the slot with the
  largest weight); uniform 1/E.
- ``base_topk(i)`` = N_k(E_i) / N; ``selectivity(D, i)`` = share_topk(D, i) / base_topk(i) and hubs:
  :mod:`routesae.analyze.specialists`. ``specialisation`` = max over domains (or experts) of the lift.
- ``load_i`` = expert i's top-k hits / all top-k hits (sums to 1); collapse flags compare it with
  the uniform share 1/E (below 0.1/E, above 3/E). ``load_cv``, ``load_entropy_norm`` and
  ``max_vio`` are computed on this load.
- ``switch_aux`` = E * sum_i f_i P_i with f_i = fraction of tokens whose top-k includes i and
  P_i = mean softmax probability over all E logits: k when balanced (NaN without logits).
- ``router_entropy`` = mean per-token entropy (nats) of softmax over all E stored logits, also for
  GPT-OSS / Granite (which softmax over the top-k only) and DeepSeek-V3 (sigmoid scores);
  NaN when the store was captured without logits.
- ``repetition_rate`` = of the pairs of consecutive tokens in the same context that both have a
  first choice (BOS has none), the fraction with equal first choices; per domain, a pair counts for
  the domain of its second token.
- position buckets "0".."7" and "8+" use ``position`` (position in the document); "BOS" holds BOS.

Example::

    from routesae.analyze import expert_tables
    tables = expert_tables("runs/olmoe/store", max_tokens=200_000)
    tables["layer_stats"][["layer", "load_cv", "switch_aux", "router_entropy", "hubs"]]
    ed = tables["expert_domain"]
    ed[ed.layer == 0].pivot(index="expert", columns="domain", values="selectivity")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from routesae.analyze.expert_metrics import (
    first_choice,
    lift,
    load_cv,
    max_vio,
    multi_hot,
    normalised_entropy,
    repetition_pairs,
    switch_aux,
)
from routesae.analyze.specialists import HUB_SHARE, MIN_LOAD_RATIO, eligible, hub_domains, is_hub
from routesae.store import Store, StoreError
from routesae.store_contexts import token_part

N_BUCKETS = 10  # positions 0..7, 8+ and BOS
BUCKETS = [str(i) for i in range(8)] + ["8+", "BOS"]
BOS_BUCKET = 9
TOP_TOKENS = 10
_HIST = 256  # n_active is uint8


def _np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ExpertStats:
    """Streaming counters for the expert tables of ``len(moe_layers)`` MoE layers.

    ``update(router, tokens)`` takes one chunk: ``router`` as :meth:`Store.load_router` returns it
    (``indices`` [n, n_moe, k_max], ``weights``, ``n_active``, optional ``logits`` [n, n_moe, E])
    and the chunk's token rows in corpus order (columns ``token_id, token, position, context,
    domain``). Chunks must arrive in corpus order; a context may continue into the next chunk.

    ``bos_token_id``: the store's BOS id; BOS tokens (that id at position 0) go to the "BOS" position
    bucket only (module docstring). None: no token is treated as BOS.

    State: fixed-size counters only, ``[L, D, E]`` hits, ``[L, E, E]`` co-activation, ``[L, 10, E]``
    position buckets, ``[L, D, 256]`` experts-per-token histograms, and ``[L, V, E]`` int32
    vocabulary counts (V = ``vocab_size``, grown to the largest token id seen; about 200 MB for
    OLMoE's 16 layers x 50k ids x 64 experts). :meth:`state_nbytes` reports the total.
    """

    def __init__(self, moe_layers: list[int], n_experts: int, top_k: int, vocab_size: int = 0,
                 bos_token_id: int | None = None):
        self.moe_layers = [int(x) for x in moe_layers]
        self.E, self.k = int(n_experts), int(top_k)
        self.bos = None if bos_token_id is None else int(bos_token_id)
        self.bos_tokens = np.zeros(1, np.int64)
        L, E = len(self.moe_layers), self.E
        self.domains: list[str] = []
        self.dom_tokens = np.zeros(0, np.int64)                   # [D]
        self.hits_topk = np.zeros((L, 0, E), np.int64)            # [L, D, E]
        self.hits_top1 = np.zeros((L, 0, E), np.int64)
        self.ent_sum = np.zeros((L, 0), np.float64)               # [L, D] entropy sums
        self.ent_tokens = np.zeros((L, 0), np.int64)              # tokens that had logits
        self.active_hist = np.zeros((L, 0, _HIST), np.int64)      # [L, D, n_active]
        self.rep_pairs = np.zeros((L, 0), np.int64)               # [L, D]
        self.rep_same = np.zeros((L, 0), np.int64)
        self.weight_sum = np.zeros((L, E), np.float64)            # routing weight where chosen
        self.prob_sum = np.zeros((L, E), np.float64)              # softmax(logits) summed over tokens
        self.coact = np.zeros((L, E, E), np.int64)
        self.bucket_tokens = np.zeros(N_BUCKETS, np.int64)
        self.bucket_hits = np.zeros((L, N_BUCKETS, E), np.int64)
        self.bucket_ent_sum = np.zeros((L, N_BUCKETS), np.float64)
        self.bucket_ent_tokens = np.zeros((L, N_BUCKETS), np.int64)
        self.vocab_tokens = np.zeros(vocab_size, np.int64)        # [V]
        self.vocab_hits = np.zeros((L, vocab_size, E), np.int32)  # [L, V, E]
        self.vocab_text = np.full(vocab_size, None, dtype=object)
        self.carry_context = np.full(1, -1, np.int64)             # last token of the previous chunk
        self.carry_first = np.full(L, -1, np.int64)
        self.carry_valid = np.zeros(1, bool)

    # ------------------------------------------------------------------ accumulation
    def _domain_codes(self, domain: pd.Series) -> np.ndarray:
        names = pd.Index(domain.astype(str).unique())
        new = [d for d in names if d not in self.domains]
        if new:
            self.domains += new
            n = len(new)
            for name in ("hits_topk", "hits_top1", "ent_sum", "ent_tokens", "active_hist", "rep_pairs",
                         "rep_same"):
                a = getattr(self, name)
                pad = np.zeros(a.shape[:1] + (n,) + a.shape[2:], a.dtype)
                setattr(self, name, np.concatenate([a, pad], 1))
            self.dom_tokens = np.concatenate([self.dom_tokens, np.zeros(n, np.int64)])
        return pd.Index(self.domains).get_indexer(domain.astype(str)).astype(np.int64)

    def _grow_vocab(self, v: int) -> None:
        old = self.vocab_tokens.shape[0]
        if v <= old:
            return
        self.vocab_tokens = np.concatenate([self.vocab_tokens, np.zeros(v - old, np.int64)])
        L, E = self.vocab_hits.shape[0], self.E
        self.vocab_hits = np.concatenate([self.vocab_hits, np.zeros((L, v - old, E), np.int32)], 1)
        self.vocab_text = np.concatenate([self.vocab_text, np.full(v - old, None, dtype=object)])

    def update(self, router: dict, tokens: pd.DataFrame) -> None:
        """Add one chunk of ``n`` tokens (see the class docstring)."""
        idx = _np(router["indices"]).astype(np.int64)
        n, L, E = idx.shape[0], len(self.moe_layers), self.E
        if len(tokens) != n or idx.shape[1] != L:
            raise ValueError(f"chunk mismatch: {n} router rows x {idx.shape[1]} layers vs {len(tokens)} token rows "
                             f"x {L} MoE layers")
        if n == 0:
            return
        w = _np(router["weights"]).astype(np.float32)
        n_active = _np(router["n_active"]).astype(np.int64)
        logits = router.get("logits")
        dom_all = self._domain_codes(tokens["domain"])
        D = len(self.domains)
        tok_all = tokens["token_id"].to_numpy().astype(np.int64)
        pos = tokens["position"].to_numpy().astype(np.int64)
        bos = (pos == 0) & (tok_all == self.bos) if self.bos is not None else np.zeros(n, bool)
        keep = ~bos                                    # the rows every table but the BOS bucket counts
        dom, tok = dom_all[keep], tok_all[keep]
        self.bos_tokens += int(bos.sum())
        self._grow_vocab(int(tok_all.max()) + 1)
        seen = np.unique(tok)
        missing = seen[pd.isna(self.vocab_text[seen])]
        if len(missing):
            first = pd.Series(np.arange(len(tok)), index=tok).groupby(level=0).first()
            self.vocab_text[missing] = tokens["token"].to_numpy()[keep][first.loc[missing].to_numpy()]
        V = self.vocab_tokens.shape[0]
        self.vocab_tokens += np.bincount(tok, minlength=V)
        self.dom_tokens += np.bincount(dom, minlength=D)
        bucket = np.where(bos, BOS_BUCKET, np.minimum(pos, BOS_BUCKET - 1))
        self.bucket_tokens += np.bincount(bucket, minlength=N_BUCKETS)
        context = tokens["context"].to_numpy().astype(np.int64)
        # pairs (t-1, t): with a carried token the chunk's first row pairs with it
        ctx_ext = np.concatenate([self.carry_context, context]) if self.carry_valid[0] else context
        for li in range(L):
            hot_all = multi_hot(idx[:, li], E)
            rows, ex = np.nonzero(hot_all)
            self.bucket_hits[li] += np.bincount(bucket[rows] * E + ex, minlength=N_BUCKETS * E).reshape(N_BUCKETS, E)
            hot = hot_all[keep]
            rows, ex = np.nonzero(hot)
            self.hits_topk[li] += np.bincount(dom[rows] * E + ex, minlength=D * E).reshape(D, E)
            keys, counts = np.unique(tok[rows] * E + ex, return_counts=True)  # O(n k), not O(V E)
            self.vocab_hits[li].reshape(-1)[keys] += counts.astype(np.int32)
            ik = idx[keep, li]
            r, s = np.nonzero((ik >= 0) & (ik < E))
            self.weight_sum[li] += np.bincount(ik[r, s], weights=w[keep, li][r, s], minlength=E)
            fc = np.where(bos, -1, first_choice(idx[:, li], w[:, li], E))  # BOS has no first choice here
            fk = fc[keep]
            has = fk >= 0
            self.hits_top1[li] += np.bincount(dom[has] * E + fk[has], minlength=D * E).reshape(D, E)
            m = hot.astype(np.float32)
            self.coact[li] += np.rint(m.T @ m).astype(np.int64)
            self.active_hist[li] += np.bincount(dom * _HIST + np.minimum(n_active[keep, li], _HIST - 1),
                                                minlength=D * _HIST).reshape(D, _HIST)
            fc_ext = np.concatenate([self.carry_first[li:li + 1], fc]) if self.carry_valid[0] else fc
            counted, repeated = repetition_pairs(fc_ext, ctx_ext)
            second = dom_all[n - len(counted):]  # the domain of each pair's second token
            self.rep_pairs[li] += np.bincount(second[counted], minlength=D)
            self.rep_same[li] += np.bincount(second[repeated], minlength=D)
            self.carry_first[li] = fc[-1]
            if logits is not None:
                x = torch.as_tensor(logits[:, li]).float()
                logp = torch.log_softmax(x, -1)
                p = logp.exp()
                ent = (-(p * logp).sum(-1)).double().numpy()
                self.prob_sum[li] += p[torch.as_tensor(keep), :self.E].double().sum(0).numpy()  # no zero experts
                self.ent_sum[li] += np.bincount(dom, weights=ent[keep], minlength=D)
                self.ent_tokens[li] += np.bincount(dom, minlength=D)
                self.bucket_ent_sum[li] += np.bincount(bucket, weights=ent, minlength=N_BUCKETS)
                self.bucket_ent_tokens[li] += np.bincount(bucket, minlength=N_BUCKETS)
        self.carry_context[0] = context[-1]
        self.carry_valid[0] = True

    def state_nbytes(self) -> int:
        """Bytes held in the accumulator's arrays (constant in the number of tokens)."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    # ------------------------------------------------------------------ tables
    def tables(self, min_vocab_count: int = 20, top_tokens: int = TOP_TOKENS,
               min_load_ratio: float = MIN_LOAD_RATIO, hub_share: float = HUB_SHARE) -> dict[str, pd.DataFrame]:
        """The seven expert tables of docs/analysis.md, keyed by file stem.

        ``min_load_ratio`` and ``hub_share``: which experts may own a domain (``domain_layer.owner``,
        see :mod:`routesae.analyze.specialists`)."""
        L, E, k = len(self.moe_layers), self.E, self.k
        D = len(self.domains)
        layers = np.asarray(self.moe_layers, np.int64)
        doms = np.asarray(self.domains, dtype=object).astype(str) if D else np.array([], str)
        uk, u1 = k / E, 1.0 / E
        n_tok = int(self.dom_tokens.sum())
        dt = self.dom_tokens.astype(np.float64)
        hits = self.hits_topk.sum(1)                                     # [L, E]
        top1 = self.hits_top1.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            share_k = self.hits_topk / np.where(dt > 0, dt, np.nan)[None, :, None]   # [L, D, E]
            share_1 = self.hits_top1 / np.where(dt > 0, dt, np.nan)[None, :, None]
            base = hits / n_tok if n_tok else np.full((L, E), np.nan)              # [L, E] N_k(E_i) / N
            load = hits / hits.sum(1, keepdims=True)
            load1 = top1 / top1.sum(1, keepdims=True)
            mean_w = np.where(hits > 0, self.weight_sum / np.maximum(hits, 1), np.nan)
        spec = lift(share_k, uk)                                         # [L, D, E]
        sel = lift(share_k, base[:, None, :])                            # [L, D, E] selectivity
        n_over, n_dom = hub_domains(share_k, hub_share)                  # [L, E]
        hub = is_hub(n_over, n_dom)
        ok = eligible(load, hub, E, min_load_ratio)                      # [L, E] may own a domain
        grid = np.meshgrid(np.arange(L), np.arange(D), np.arange(E), indexing="ij")
        li, di, ei = (g.ravel() for g in grid)
        expert_domain = pd.DataFrame({
            "layer": layers[li], "domain": doms[di], "expert": ei,
            "tokens": self.dom_tokens[di], "hits_topk": self.hits_topk.ravel(), "share_topk": share_k.ravel(),
            "hits_top1": self.hits_top1.ravel(), "share_top1": share_1.ravel(),
            "uniform_topk": np.full(li.size, uk), "uniform_top1": np.full(li.size, u1),
            "lift_topk": spec.ravel(), "base_topk": base[li, ei], "selectivity": sel.ravel()})

        # per expert: its top domain (the largest share, so the largest lift and selectivity too)
        if D:
            best = np.nan_to_num(share_k, nan=-np.inf).argmax(1)         # [L, E]
            pick = lambda a: np.take_along_axis(a, best[:, None, :], 1)[:, 0]  # noqa: E731
            exp_spec, exp_sel, top_share, top_dom = pick(spec), pick(sel), pick(share_k), doms[best]
        else:
            exp_spec = exp_sel = top_share = np.full((L, E), np.nan)
            top_dom = np.full((L, E), "", dtype=object)
        tt, ts = self._top_tokens(min_vocab_count, top_tokens)
        gl, ge = (g.ravel() for g in np.meshgrid(np.arange(L), np.arange(E), indexing="ij"))
        expert_stats = pd.DataFrame({
            "layer": layers[gl], "expert": ge, "load": load.ravel(), "load_top1": load1.ravel(),
            "mean_weight": mean_w.ravel(), "specialisation": exp_spec.ravel(), "top_domain": top_dom.ravel(),
            "collapse_low": (load < 0.1 * u1).ravel(), "collapse_high": (load > 3 * u1).ravel(),
            "top_tokens": tt, "top_token_shares": ts, "base_topk": base.ravel(), "selectivity": exp_sel.ravel(),
            "top_share": top_share.ravel(), "hub_domains": n_over.ravel(), "hub": hub.ravel()})

        # per (layer, domain): the owner = the most selective eligible expert
        with np.errstate(invalid="ignore", divide="ignore"):
            ent_d = self.ent_sum / np.where(self.ent_tokens > 0, self.ent_tokens, np.nan)
            rep_d = self.rep_same / np.where(self.rep_pairs > 0, self.rep_pairs, np.nan)
            hist_tot = self.active_hist.sum(2)
            nvals = np.arange(_HIST)
            mean_act = (self.active_hist * nvals).sum(2) / np.where(hist_tot > 0, hist_tot, np.nan)
        dom_spec = np.nanmax(spec, 2) if E and D else np.full((L, D), np.nan)
        own_sel = np.where(ok[:, None, :] & (np.nan_to_num(sel) > 0), sel, -np.inf)  # [L, D, E]
        owner = own_sel.argmax(2) if E else np.zeros((L, D), np.int64)
        dom_sel = np.take_along_axis(own_sel, owner[..., None], 2)[..., 0] if E else np.full((L, D), -np.inf)
        owner = np.where(np.isfinite(dom_sel), owner, -1)
        dom_sel = np.where(np.isfinite(dom_sel), dom_sel, np.nan)
        dl, dd = (g.ravel() for g in np.meshgrid(np.arange(L), np.arange(D), indexing="ij"))
        domain_layer = pd.DataFrame({
            "layer": layers[dl], "domain": doms[dd], "tokens": self.dom_tokens[dd], "router_entropy": ent_d.ravel(),
            "specialisation": dom_spec.ravel(), "mean_active": mean_act.ravel(), "repetition_rate": rep_d.ravel(),
            "selectivity": dom_sel.ravel(), "owner": owner.ravel().astype(np.int64)})

        # per layer
        rows = []
        for i in range(L):
            et = self.ent_tokens[i].sum()
            f = hits[i] / n_tok if n_tok else np.full(E, np.nan)
            P = self.prob_sum[i] / et if et else np.full(E, np.nan)
            pairs = self.rep_pairs[i].sum()
            rows.append({
                "layer": int(layers[i]), "n_experts": E, "top_k": k, "tokens": n_tok,
                "load_cv": load_cv(hits[i]), "load_entropy_norm": normalised_entropy(hits[i]),
                "max_vio": max_vio(hits[i]), "switch_aux": switch_aux(f, P) if et else float("nan"),
                "router_entropy": float(self.ent_sum[i].sum() / et) if et else float("nan"),
                "repetition_rate": float(self.rep_same[i].sum() / pairs) if pairs else float("nan"),
                "domain_specialisation": float(np.nanmean(dom_spec[i])) if D else float("nan"),
                "domain_selectivity": float(np.nanmean(dom_sel[i])) if np.isfinite(dom_sel[i]).any() else float("nan"),
                "hubs": int(hub[i].sum()), "bos_tokens": int(self.bos_tokens[0])})
        layer_stats = pd.DataFrame(rows, columns=["layer", "n_experts", "top_k", "tokens", "load_cv",
                                                  "load_entropy_norm", "max_vio", "switch_aux", "router_entropy",
                                                  "repetition_rate", "domain_specialisation", "domain_selectivity",
                                                  "hubs", "bos_tokens"])

        # experts per token
        hl, hd, hn = np.nonzero(self.active_hist)
        cnt = self.active_hist[hl, hd, hn]
        experts_per_token = pd.DataFrame({
            "layer": layers[hl], "domain": doms[hd], "n_active": hn,
            "tokens": cnt, "fraction": cnt / np.maximum(hist_tot[hl, hd], 1)})

        # position profile (non-empty buckets; BOS apart)
        bt = self.bucket_tokens.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            bshare = self.bucket_hits / np.where(bt > 0, bt, np.nan)[None, :, None]   # [L, B, E]
            bent = self.bucket_ent_sum / np.where(self.bucket_ent_tokens > 0, self.bucket_ent_tokens, np.nan)
        bmax = bshare.max(2) if E else np.full((L, N_BUCKETS), np.nan)
        bsel = np.where(ok[:, None, :], lift(bshare, base[:, None, :]), np.nan)
        bsel = np.nanmax(np.where(np.isfinite(bsel), bsel, -np.inf), 2) if E else np.full((L, N_BUCKETS), -np.inf)
        pl, pb = (g.ravel() for g in np.meshgrid(np.arange(L), np.arange(N_BUCKETS), indexing="ij"))
        keep = self.bucket_tokens[pb] > 0
        pl, pb = pl[keep], pb[keep]
        position_profile = pd.DataFrame({
            "layer": layers[pl], "bucket": np.asarray(BUCKETS, dtype=object)[pb].astype(str),
            "tokens": self.bucket_tokens[pb], "router_entropy": bent[pl, pb],
            "specialisation": lift(bmax[pl, pb], uk), "max_share": bmax[pl, pb],
            "selectivity": np.where(np.isfinite(bsel[pl, pb]), bsel[pl, pb], np.nan)})

        # co-activation
        cl, ci, cj = (g.ravel() for g in np.meshgrid(np.arange(L), np.arange(E), np.arange(E), indexing="ij"))
        diag = np.diagonal(self.coact, axis1=1, axis2=2)                  # [L, E] = N(E_i)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(diag[cl, ci] > 0, self.coact[cl, ci, cj] / np.maximum(diag[cl, ci], 1), np.nan)
        coactivation = pd.DataFrame({"layer": layers[cl], "expert_i": ci, "expert_j": cj,
                                     "count": self.coact[cl, ci, cj], "rate": rate})
        return {"expert_domain": expert_domain, "expert_stats": expert_stats, "layer_stats": layer_stats,
                "domain_layer": domain_layer, "experts_per_token": experts_per_token,
                "position_profile": position_profile, "coactivation": coactivation}

    def _top_tokens(self, min_count: int, n_top: int) -> tuple[list[list[str]], list[list[float]]]:
        """Per (layer, expert): tokens x (count >= min_count) with the highest N_k(x, E_i) / N_k(x)."""
        L, E = len(self.moe_layers), self.E
        ok = np.nonzero(self.vocab_tokens >= max(min_count, 1))[0]
        names, shares = [], []
        for li in range(L):
            share = self.vocab_hits[li, ok].astype(np.float64) / self.vocab_tokens[ok, None]  # [V_ok, E]
            for e in range(E):
                s = share[:, e]
                # highest share first, then the more frequent token, then the lower id
                order = np.lexsort((ok, -self.vocab_tokens[ok], -s))
                order = order[s[order] > 0][:n_top]
                names.append([str(t) if t is not None else str(i) for i, t in
                              zip(ok[order], self.vocab_text[ok[order]])])
                shares.append([float(x) for x in s[order]])
        return names, shares


def expert_tables(store: Store | str | Path, max_tokens: int | None = None, min_vocab_count: int = 20,
                  min_load_ratio: float = MIN_LOAD_RATIO) -> dict[str, pd.DataFrame]:
    """Stream ``store`` shard by shard (router + that shard's tokens only) and return the expert tables.

    ``max_tokens`` stops after that many tokens (in corpus order, BOS included). Entropy and
    ``switch_aux`` are NaN when the store has no router logits. BOS = the manifest's ``bos_token_id``.
    """
    store = store if isinstance(store, Store) else Store(store)
    man = store.manifest
    if not store.moe_layers or not man.get("n_experts"):
        raise StoreError(f"store {store.root} has no MoE layers; expert tables need router records")
    vocab = int((man.get("model") or {}).get("vocab_size") or 0)
    bos = man.get("bos_token_id")
    stats = ExpertStats(store.moe_layers, int(man["n_experts"]), int(man["top_k"]), vocab,
                        bos_token_id=None if bos is None else int(bos))
    done = 0
    cols = ["token_id", "token", "position", "context", "domain"]
    for shard in store.shards:
        if max_tokens is not None and done >= max_tokens:
            break
        i = shard["index"]
        router = store.load_router(i)
        tokens = token_part(store, i, cols)
        if max_tokens is not None and done + len(tokens) > max_tokens:
            m = max_tokens - done
            router = {key: v[:m] for key, v in router.items()}
            tokens = tokens.iloc[:m]
        stats.update(router, tokens)
        done += len(tokens)
    return stats.tables(min_vocab_count=min_vocab_count, min_load_ratio=min_load_ratio)
