"""Per-latent feature tables from a store and an SAE (docs/analysis.md, "Feature tables").

Two streaming passes over the first ``max_tokens`` store tokens, one shard (a chunk of whole
contexts) at a time; the state (:class:`FeatureStats`) has a fixed size set at construction:

- pass 1: per latent count, sum, max, a log2 histogram (1/8 octave, for the quantile bins),
  domain and routed-layer counts, the expert counts (:mod:`routesae.analyze.attribution`), the
  top contexts (``[M, top_contexts]`` slots merged with ``torch.topk``) and the most frequent
  activating tokens (``[M, 16]`` slots, kept by count: approximate past 16 distinct tokens).
- pass 2 (needs the max): the ``hist_bins`` histogram from 0 to max, ``quantile_samples``
  uniform samples per quantile bin of the nonzero activations (random keys in the same slots),
  and the interpretable-feature count (REFERENCE §1).

The ±``window``-token windows (token ids and that latent's activation at each) are cut at the
end of each chunk, for the candidates that enter a slot only. MLSAE: a token's activation is the
max over its layers (``routed_layer`` = the argmax layer). ``top_domain``: the domain with the
highest lift among those with >= 3 of the latent's active tokens (else the largest share).

Interpretable-feature count: a latent "fires" at a token when its activation is at least
``fire_fraction`` (0.5) of its own max over the evaluated tokens, a scale-free threshold. Each
firing is one context, bucketed by the lower-cased activating token; at most ``max_per_bucket``
(2) contexts count per bucket; latents with more than ``max_buckets`` (32) buckets are dropped,
those with at least ``min_contexts`` (5) contexts are kept. Example::

    from routesae.sae import load_sae
    from routesae.store import Store
    t = feature_tables(load_sae("runs/x"), Store("stores/s"), max_tokens=50_000)
    t["latents"].sort_values("density").tail()
    count_interpretable([0, 0, 1], ["a", "A", "b"], [1.0, 2.0, 3.0])  # per-latent DataFrame
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from routesae.analyze.attribution import ExpertAttribution
from routesae.analyze.lens import logit_lens, nearest_latents
from routesae.store import Store
from routesae.store_contexts import token_part

LOG_LO, LOG_STEPS, N_LOG = -16, 8, 256  # log2 histogram: bins of 1/8 octave from 2^-16 to 2^16
TOP_TOKENS = 16
FEATURE_COUNT = {"threshold_rule": "fraction_of_latent_max", "threshold_value": 0.5, "context": 64,
                 "max_per_bucket": 2, "max_buckets": 32, "min_contexts": 5}


@dataclass
class Chunk:
    """One shard's evaluated rows. Entries: one per active (token row, latent), sorted by
    ``row * M + latent``; ``layer`` is the position in ``cfg.layers`` (RouteSAE: routed layer)."""

    shard: int
    row: Tensor
    latent: Tensor
    act: Tensor
    layer: Tensor
    token_id: Tensor  # [N]
    token: np.ndarray  # [N] token strings
    context: Tensor  # [N]
    domain: Tensor  # [N] index into the domain list
    router: Tensor | None  # [N, n_moe, k_max] expert indices or None
    n_latents: int

    @property
    def n_tokens(self) -> int:
        return self.token_id.numel()

    @property
    def keys(self) -> Tensor:
        return self.row * self.n_latents + self.latent


def sparse_entries(top_val: Tensor, top_idx: Tensor, n_tokens: int, n_latents: int,
                   example_layer: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Codes of ``n_tokens`` tokens (``[N * per, k]``, ``per`` examples per token) -> ``(row, latent, act,
    layer)`` of the active entries, one per (row, latent) with the max over layers, sorted by row*M+latent."""
    n_ex, k = top_val.shape
    per = max(1, n_ex // max(n_tokens, 1))
    val, lat = top_val.reshape(-1).float().cpu(), top_idx.reshape(-1).long().cpu()
    ex = torch.arange(n_ex).repeat_interleave(k)
    on = val > 0
    ex, val, lat = ex[on], val[on], lat[on]
    row = ex // per
    layer = example_layer.long().cpu()[ex] if example_layer is not None else torch.zeros_like(ex)
    key = row * n_latents + lat
    order = torch.argsort(val, stable=True)
    order = order[torch.argsort(key[order], stable=True)]  # by key, then by activation
    key, row, lat, val, layer = key[order], row[order], lat[order], val[order], layer[order]
    if per > 1:  # keep the largest activation of each (row, latent)
        last = torch.ones_like(key, dtype=torch.bool)
        last[:-1] = key[1:] != key[:-1]
        row, lat, val, layer = row[last], lat[last], val[last], layer[last]
    return row, lat, val, layer


def _group_top(group: Tensor, score: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``n`` highest scores of each group and their rank in it."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    g = group[order]
    new = torch.ones_like(g, dtype=torch.bool)
    new[1:] = g[1:] != g[:-1]
    ar = torch.arange(g.numel())
    rank = ar - torch.cummax(torch.where(new, ar, 0), 0).values
    keep = rank < n
    return order[keep], rank[keep]


def _merge_counts(ids: Tensor, cnt: Tensor, row: Tensor, item: Tensor, n_items: int,
                  cap: int | None = None) -> Tensor:
    """Add one count per (row[i], item[i]) to the dense tables ``ids/cnt [M, C]`` (id -1 = empty),
    keeping each row's C largest counts (each capped at ``cap``). Returns distinct items per row."""
    have = ids >= 0
    rows = torch.arange(ids.shape[0]).view(-1, 1).expand_as(ids)[have]
    keys = torch.cat([rows * n_items + ids[have], row * n_items + item])
    uk, inv = torch.unique(keys, return_inverse=True)
    tot = torch.zeros(uk.numel(), dtype=torch.int64).index_add_(0, inv, torch.cat([cnt[have], torch.ones_like(row)]))
    if cap is not None:
        tot.clamp_(max=cap)
    r, it = uk // n_items, uk % n_items
    sel, rank = _group_top(r, tot, ids.shape[1])
    touched = torch.unique(r)
    ids[touched], cnt[touched] = -1, 0
    ids[r[sel], rank], cnt[r[sel], rank] = it[sel], tot[sel]
    return torch.bincount(r, minlength=ids.shape[0])


class _Slots:
    """``slots`` best-scored entries per group with their windows; fixed size ``[G, slots, width]``."""

    def __init__(self, groups: int, slots: int, window: int):
        self.window, width = window, 2 * window + 1
        self.score = torch.full((groups, slots), -math.inf)
        self.act = torch.zeros(groups, slots)
        self.pos = torch.full((groups, slots, 3), -1, dtype=torch.int64)  # shard, row, layer position
        self.win_tok = torch.full((groups, slots, width), -1, dtype=torch.int32)
        self.win_act = torch.zeros(groups, slots, width)

    def tensors(self) -> list[Tensor]:
        return [self.score, self.act, self.pos, self.win_tok, self.win_act]

    def offer(self, chunk: Chunk, group: Tensor, score: Tensor, entries: Tensor) -> None:
        """Candidates: ``entries`` (indices into the chunk's entries) in ``group`` with ``score``."""
        if entries.numel() == 0:
            return
        s = self.score.shape[1]
        sel, rank = _group_top(group, score, s)
        ug, inv = torch.unique(group[sel], return_inverse=True)
        cand = torch.full((ug.numel(), s), -math.inf)
        cidx = torch.full((ug.numel(), s), -1, dtype=torch.int64)
        cand[inv, rank], cidx[inv, rank] = score[sel], entries[sel]
        top, ti = torch.cat([self.score[ug], cand], 1).topk(s, dim=1)
        old = ti.clamp(max=s - 1)
        self.score[ug] = top
        self.act[ug] = self.act[ug].gather(1, old)
        self.pos[ug] = self.pos[ug].gather(1, old.unsqueeze(-1).expand(-1, -1, 3))
        width = self.win_tok.shape[2]
        self.win_tok[ug] = self.win_tok[ug].gather(1, old.unsqueeze(-1).expand(-1, -1, width))
        self.win_act[ug] = self.win_act[ug].gather(1, old.unsqueeze(-1).expand(-1, -1, width))
        r, c = ((ti >= s) & (top > -math.inf)).nonzero(as_tuple=True)
        e = cidx[r, (ti[r, c] - s)]
        g = ug[r]
        self.act[g, c] = chunk.act[e]
        self.pos[g, c] = torch.stack([torch.full_like(e, chunk.shard), chunk.row[e], chunk.layer[e]], 1)
        self.win_tok[g, c], self.win_act[g, c] = windows(chunk, chunk.row[e], chunk.latent[e], self.window)


def windows(chunk: Chunk, row: Tensor, latent: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """``[C, 2w+1]`` token ids (-1 outside the centre's context) and ``latent``'s activation there."""
    w = row.view(-1, 1) + torch.arange(-window, window + 1)
    wc = w.clamp(0, max(chunk.n_tokens - 1, 0))
    valid = (w >= 0) & (w < chunk.n_tokens) & (chunk.context[wc] == chunk.context[row].view(-1, 1))
    keys = chunk.keys
    want = wc * chunk.n_latents + latent.view(-1, 1)
    at = torch.searchsorted(keys, want).clamp(max=max(keys.numel() - 1, 0))
    hit = valid & (keys[at] == want) if keys.numel() else torch.zeros_like(valid)
    acts = torch.where(hit, chunk.act[at] if keys.numel() else 0.0, 0.0)
    return torch.where(valid, chunk.token_id[wc], -1).int(), acts


class Buckets:
    """The counting protocol's token buckets: ``[M, max_buckets]`` slots + a dropped flag per latent."""

    def __init__(self, n_latents: int, max_buckets: int = 32, max_per_bucket: int = 2):
        self.ids = torch.full((n_latents, max_buckets), -1, dtype=torch.int64)
        self.cnt = torch.zeros(n_latents, max_buckets, dtype=torch.int64)
        self.dropped = torch.zeros(n_latents, dtype=torch.bool)
        self.cap, self.max_buckets, self.n_items = max_per_bucket, max_buckets, 1 << 31

    def add(self, latent: Tensor, bucket: Tensor) -> None:
        keep = ~self.dropped[latent]
        if keep.any():
            distinct = _merge_counts(self.ids, self.cnt, latent[keep], bucket[keep], self.n_items, self.cap)
            self.dropped |= distinct > self.max_buckets
            self.ids[self.dropped], self.cnt[self.dropped] = -1, 0

    def result(self, min_contexts: int = 5) -> pd.DataFrame:
        contexts = self.cnt.sum(1)
        return pd.DataFrame({"latent": np.arange(self.ids.shape[0]), "contexts": contexts.numpy(),
                             "buckets": (self.ids >= 0).sum(1).numpy(), "dropped": self.dropped.numpy(),
                             "interpretable": ((contexts >= min_contexts) & ~self.dropped).numpy()})


def count_interpretable(latents, tokens, acts, n_latents: int | None = None, max_acts=None,
                        fire_fraction: float = 0.5, max_per_bucket: int = 2, max_buckets: int = 32,
                        min_contexts: int = 5) -> pd.DataFrame:
    """The counting protocol on a list of (latent, activating token string, activation) occurrences.

    ``max_acts`` [M]: each latent's max (default: the max over these occurrences); an occurrence
    counts when ``act >= fire_fraction * max``. Returns one row per latent with ``contexts, buckets,
    dropped, interpretable``; ``df.interpretable.sum()`` is the count."""
    lat = torch.as_tensor(np.asarray(latents, dtype=np.int64))
    act = torch.as_tensor(np.asarray(acts, dtype=np.float32))
    m = n_latents if n_latents is not None else int(lat.max()) + 1 if lat.numel() else 0
    mx = (torch.as_tensor(np.asarray(max_acts, dtype=np.float32)) if max_acts is not None else
          torch.zeros(m).scatter_reduce(0, lat, act, "amax"))
    _, bucket = np.unique(np.array([str(t).lower() for t in tokens], dtype=object), return_inverse=True)
    fires = (act > 0) & (act >= fire_fraction * mx[lat])
    b = Buckets(m, max_buckets, max_per_bucket)
    b.add(lat[fires], torch.as_tensor(bucket.reshape(-1).astype(np.int64))[fires])
    return b.result(min_contexts)


class FeatureStats:
    """The streaming state of both passes; its size is fixed at construction (see :meth:`nbytes`)."""

    def __init__(self, n_latents: int, layers: list[int], domains: list[str], vocab_size: int,
                 attribution: ExpertAttribution | None = None, top_contexts: int = 20, window: int = 16,
                 quantile_bins: int = 5, quantile_samples: int = 5, hist_bins: int = 20,
                 fire_fraction: float = 0.5, seed: int = 0):
        m, self.m, self.layers, self.domains = n_latents, n_latents, list(layers), list(domains)
        self.q, self.hist_bins, self.fire_fraction = quantile_bins, hist_bins, fire_fraction
        self.attribution = attribution
        self.tokens = 0
        self.count = torch.zeros(m, dtype=torch.int64)
        self.sum = torch.zeros(m, dtype=torch.float64)
        self.max = torch.zeros(m)
        self.loghist = torch.zeros(m, N_LOG, dtype=torch.int32)
        self.domain_counts = torch.zeros(m, len(domains), dtype=torch.int64)
        self.domain_tokens = torch.zeros(len(domains), dtype=torch.int64)
        self.layer_counts = torch.zeros(m, len(layers), dtype=torch.int64)
        self.top = _Slots(m, top_contexts, window)
        self.tok_ids = torch.full((m, TOP_TOKENS), -1, dtype=torch.int64)
        self.tok_cnt = torch.zeros(m, TOP_TOKENS, dtype=torch.int64)
        self.hist = torch.zeros(m, hist_bins, dtype=torch.int64)
        self.qedges = torch.zeros(m, quantile_bins - 1)
        self.samples = _Slots(m * quantile_bins, quantile_samples, window)
        self.buckets = Buckets(m, FEATURE_COUNT["max_buckets"], FEATURE_COUNT["max_per_bucket"])
        self.strings = np.full(vocab_size, "", dtype=object)  # token id -> string
        self.bucket_of = torch.full((vocab_size,), -1, dtype=torch.int64)  # token id -> lower-case bucket
        self._bucket_ids: dict[str, int] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def nbytes(self) -> int:
        """Bytes held by the state tensors (constant over chunks)."""
        ts = [self.count, self.sum, self.max, self.loghist, self.domain_counts, self.layer_counts, self.tok_ids,
              self.tok_cnt, self.hist, self.qedges, self.buckets.ids, self.buckets.cnt, self.bucket_of,
              *self.top.tensors(), *self.samples.tensors()]
        if self.attribution is not None:
            ts += [self.attribution.counts, self.attribution.base]
        return sum(t.numel() * t.element_size() for t in ts) + self.strings.nbytes

    def _learn_tokens(self, chunk: Chunk) -> None:
        ids, first = np.unique(chunk.token_id.numpy(), return_index=True)
        if ids.size and ids[-1] >= self.strings.size:  # a tokenizer larger than the config's vocabulary
            grow = int(ids[-1]) + 1 - self.strings.size
            self.strings = np.concatenate([self.strings, np.full(grow, "", dtype=object)])
            self.bucket_of = torch.cat([self.bucket_of, torch.full((grow,), -1, dtype=torch.int64)])
        for i, f in zip(ids[self.bucket_of[ids] < 0].tolist(), first[(self.bucket_of[ids] < 0).numpy()].tolist()):
            s = str(chunk.token[f])
            self.strings[i] = s
            self.bucket_of[i] = self._bucket_ids.setdefault(s.lower(), len(self._bucket_ids))

    def add_pass1(self, chunk: Chunk) -> None:
        self._learn_tokens(chunk)
        lat, act = chunk.latent, chunk.act
        m = self.m
        self.tokens += chunk.n_tokens
        self.count += torch.bincount(lat, minlength=m)
        self.sum.index_add_(0, lat, act.double())
        self.max.scatter_reduce_(0, lat, act, "amax")
        b = ((act.log2() - LOG_LO) * LOG_STEPS).floor().long().clamp(0, N_LOG - 1)
        self.loghist.view(-1).index_add_(0, lat * N_LOG + b, torch.ones_like(lat, dtype=torch.int32))
        nd = len(self.domains)
        if nd:
            self.domain_tokens += torch.bincount(chunk.domain, minlength=nd)
            self.domain_counts.view(-1).index_add_(0, lat * nd + chunk.domain[chunk.row], torch.ones_like(lat))
        self.layer_counts.view(-1).index_add_(0, lat * len(self.layers) + chunk.layer, torch.ones_like(lat))
        _merge_counts(self.tok_ids, self.tok_cnt, lat, chunk.token_id[chunk.row], self.strings.size)
        self.top.offer(chunk, lat, act, torch.arange(lat.numel()))
        if self.attribution is not None and chunk.router is not None:
            self.attribution.add(lat, chunk.row, chunk.router)

    def finish_pass1(self) -> None:
        """Quantile edges of each latent's nonzero activations from the log2 histogram."""
        cum = self.loghist.long().cumsum(1)
        for j in range(1, self.q):
            b = (cum < (self.count * j / self.q).view(-1, 1)).sum(1)
            self.qedges[:, j - 1] = torch.minimum(2.0 ** (LOG_LO + (b + 1).float() / LOG_STEPS), self.max)

    def add_pass2(self, chunk: Chunk) -> None:
        lat, act, mx = chunk.latent, chunk.act, self.max[chunk.latent]
        b = (act / mx.clamp_min(1e-30) * self.hist_bins).floor().long().clamp(0, self.hist_bins - 1)
        self.hist.view(-1).index_add_(0, lat * self.hist_bins + b, torch.ones_like(lat))
        qbin = (act.view(-1, 1) > self.qedges[lat]).sum(1)
        self.samples.offer(chunk, lat * self.q + qbin, torch.rand(lat.numel(), generator=self.gen),
                           torch.arange(lat.numel()))
        fires = act >= self.fire_fraction * mx
        self.buckets.add(lat[fires], self.bucket_of[chunk.token_id[chunk.row[fires]]])

    # ------------------------------------------------------------ tables

    def latents_frame(self) -> pd.DataFrame:
        c = self.count.numpy()
        nz = np.maximum(c, 1)
        edges = torch.linspace(0, 1, self.hist_bins + 1).view(1, -1) * self.max.view(-1, 1)
        fr = (self.layer_counts.double() / self.count.clamp_min(1).view(-1, 1).double()).numpy()
        routed = np.where(c > 0, np.asarray(self.layers)[self.layer_counts.argmax(1).numpy()], -1)
        dom = self.domain_frame()
        top = dom[dom["count"] >= 3].sort_values(["latent", "lift"], ascending=[True, False]).drop_duplicates("latent")
        rest = dom.sort_values(["latent", "share"], ascending=[True, False]).drop_duplicates("latent")
        top = pd.concat([top, rest[~rest["latent"].isin(top["latent"])]]).set_index("latent")
        tok = self.tok_ids[:, 0].numpy()
        df = pd.DataFrame({
            "latent": np.arange(self.m), "density": c / max(self.tokens, 1), "count": c,
            "mean_act": np.where(c > 0, self.sum.numpy() / nz, 0.0), "max_act": self.max.double().numpy(),
            "top_domain": top["domain"].reindex(range(self.m)).astype(object).where(c > 0, None).to_numpy(),
            "top_domain_lift": top["lift"].reindex(range(self.m)).to_numpy(dtype=np.float64),
            "top_routed_layer": routed, "routed_layer_fractions": list(fr),
            "top_token": np.where(tok >= 0, self.strings[tok.clip(0)], None),
            "hist_edges": list(edges.double().numpy()), "hist_counts": list(self.hist.numpy()),
        })
        fc = self.buckets.result(FEATURE_COUNT["min_contexts"])
        df["interpretable"] = fc["interpretable"].to_numpy() & (c > 0)
        return df

    def domain_frame(self) -> pd.DataFrame:
        lat, d = self.domain_counts.nonzero(as_tuple=True)
        cnt = self.domain_counts[lat, d].numpy()
        share = cnt / self.count[lat].clamp_min(1).numpy()
        base = (self.domain_tokens.double() / max(self.tokens, 1)).numpy()[d.numpy()]
        return pd.DataFrame({"latent": lat.numpy(), "domain": np.asarray(self.domains, dtype=object)[d.numpy()],
                             "count": cnt, "share": share, "base_share": base, "lift": share / base})

    def contexts_frame(self, store: Store) -> pd.DataFrame:
        parts = []
        for slots, per in ((self.top, 1), (self.samples, self.q)):
            g, r = (slots.score > -math.inf).nonzero(as_tuple=True)
            parts.append(pd.DataFrame({
                "latent": (g // per).numpy(), "kind": "top" if per == 1 else [f"q{b}" for b in (g % per).tolist()],
                "rank": r.numpy(), "act": slots.act[g, r].double().numpy(), "shard": slots.pos[g, r, 0].numpy(),
                "row": slots.pos[g, r, 1].numpy(), "routed_layer": np.asarray(self.layers)[slots.pos[g, r, 2].numpy()],
                "_tok": list(slots.win_tok[g, r].numpy()), "_act": list(slots.win_act[g, r].numpy())}))
        df = pd.concat(parts, ignore_index=True)
        if self.q > 0 and len(df):  # quantile samples: rank by activation within the bin
            df = df.sort_values(["latent", "kind", "act"], ascending=[True, True, False], kind="stable")
            df["rank"] = df.groupby(["latent", "kind"]).cumcount()
        meta = [token_part(store, s, ["doc_id", "domain"])
                .iloc[df.loc[df["shard"] == s, "row"].to_numpy()].set_index(df.index[df["shard"] == s])
                for s in sorted(df["shard"].unique())]
        df = df.join(pd.concat(meta)) if meta else df.assign(doc_id=None, domain=None)
        w = self.top.window
        df["tokens"] = [list(self.strings[t[t >= 0]]) for t in df["_tok"]]
        df["acts"] = [a[t >= 0].astype(np.float64) for t, a in zip(df["_tok"], df["_act"])]
        df["center"] = [int((t[:w] >= 0).sum()) for t in df["_tok"]]
        cols = ["latent", "kind", "rank", "act", "tokens", "acts", "center", "domain", "doc_id", "routed_layer"]
        return df[cols].sort_values(["latent", "kind", "rank"]).reset_index(drop=True)


# ---------------------------------------------------------------- streaming over the store


def store_domains(store: Store, n_tokens: int) -> list[str]:
    """The sorted domain labels of the first ``n_tokens`` store tokens."""
    seen: set[str] = set()
    for s, n in _shard_rows(store, n_tokens):
        col = token_part(store, s, ["domain"])["domain"]
        seen.update(col.iloc[:n].fillna("").astype(str).unique().tolist())
    return sorted(seen)


def _shard_rows(store: Store, n_tokens: int) -> Iterator[tuple[int, int]]:
    done = 0
    for s in store.shards:
        if done >= n_tokens:
            return
        n = min(int(s["tokens"]), n_tokens - done)
        yield int(s["index"]), n
        done += n


@torch.no_grad()
def iter_chunks(sae, store: Store, n_tokens: int, domains: list[str], batch_tokens: int = 4096,
                device: str | torch.device = "cpu") -> Iterator[Chunk]:
    """One :class:`Chunk` per shard over the first ``n_tokens`` tokens (codes computed on ``device``)."""
    c = sae.cfg
    index = {d: i for i, d in enumerate(domains)}
    for s, n in _shard_rows(store, n_tokens):
        if c.arch == "topk":
            resid = store.load_resid(s, c.layers[0])[:n]
        else:
            resid = store.load_resid(s)[:n][:, [store.layer_position(j) for j in c.layers]]
        vals, idxs, lays = [], [], []
        for b in range(0, n, batch_tokens):
            out = sae(resid[b:b + batch_tokens].to(device).float())
            vals.append(out.top_val.cpu())
            idxs.append(out.top_idx.cpu())
            if out.routed_layer is not None:
                lays.append(out.routed_layer.cpu())
        row, lat, act, lay = sparse_entries(torch.cat(vals), torch.cat(idxs), n, c.n_latents,
                                            torch.cat(lays) if lays else None)
        tok = token_part(store, s, ["token_id", "token", "context", "domain"]).iloc[:n]
        dom = tok["domain"].fillna("").astype(str).map(index).fillna(-1).to_numpy(np.int64)
        router = store.load_router(s)["indices"][:n] if store.moe_layers else None
        yield Chunk(s, row, lat, act, lay, torch.tensor(tok["token_id"].to_numpy(np.int64)),
                    tok["token"].to_numpy(object), torch.tensor(tok["context"].to_numpy(np.int64)),
                    torch.tensor(dom), router, c.n_latents)


LATENT_COLUMNS = ["latent", "density", "count", "mean_act", "max_act", "top_domain", "top_domain_lift",
                  "top_routed_layer", "routed_layer_fractions", "top_expert_layer", "top_expert", "top_expert_lift",
                  "interpretable", "top_token", "neighbours", "neighbour_cos", "logit_pos", "logit_neg",
                  "logit_pos_values", "logit_neg_values", "hist_edges", "hist_counts"]


def feature_tables(sae, store: Store, model=None, tokenizer=None, max_tokens: int | None = None,
                   batch_tokens: int = 4096, top_contexts: int = 20, window: int = 16, quantile_bins: int = 5,
                   quantile_samples: int = 5, hist_bins: int = 20, fire_fraction: float = 0.5, neighbours: int = 10,
                   device: str | torch.device = "cpu", seed: int = 0) -> dict[str, pd.DataFrame]:
    """Every feature table of docs/analysis.md as DataFrames: ``latents, contexts, latent_domains,
    latent_experts, expert_latents`` and ``feature_count`` (one row: count, tokens and the settings)."""
    sae.eval()
    n = min(max_tokens or store.n_tokens, store.n_tokens)
    domains = store_domains(store, n)
    vocab = max(int((store.manifest.get("model") or {}).get("vocab_size") or 1), len(tokenizer) if tokenizer else 1)
    m = sae.cfg.n_latents
    att = ExpertAttribution(m, store.moe_layers, int(store.manifest["n_experts"])) if store.moe_layers else None
    stats = FeatureStats(m, sae.cfg.layers, domains, vocab, att, top_contexts, window, quantile_bins,
                         quantile_samples, hist_bins, fire_fraction, seed)
    for ch in iter_chunks(sae, store, n, domains, batch_tokens, device):
        stats.add_pass1(ch)
    stats.finish_pass1()
    for ch in iter_chunks(sae, store, n, domains, batch_tokens, device):
        stats.add_pass2(ch)
    lat = stats.latents_frame()
    nb_i, nb_c = nearest_latents(sae.W_dec, neighbours)
    lat["neighbours"], lat["neighbour_cos"] = list(nb_i.numpy()), list(nb_c.double().numpy())
    if model is not None:
        ll = logit_lens(sae.W_dec, model, tokenizer, strings=stats.strings)
        for col in ("logit_pos", "logit_neg", "logit_pos_values", "logit_neg_values"):
            lat[col] = ll[col].to_numpy()
    else:
        lat["logit_pos"] = lat["logit_neg"] = [[] for _ in range(m)]
        lat["logit_pos_values"] = lat["logit_neg_values"] = [np.zeros(0) for _ in range(m)]
    if att is not None:
        at = att.tables(lat["count"].to_numpy(), lat["top_routed_layer"].to_numpy())
    else:
        empty = ExpertAttribution(m, [], 0).tables(lat["count"].to_numpy(), lat["top_routed_layer"].to_numpy())
        at = {k: v.astype({"lift": float}) if "lift" in v else v for k, v in empty.items()}
    for col in ("top_expert_layer", "top_expert", "top_expert_lift"):
        lat[col] = at["top"][col].to_numpy()
    fc = pd.DataFrame([{"count": int(lat["interpretable"].sum()), "tokens": stats.tokens,
                        **FEATURE_COUNT, "threshold_value": fire_fraction,
                        "domains": dict(zip(domains, stats.domain_tokens.tolist()))}])
    return {"latents": lat[LATENT_COLUMNS], "contexts": stats.contexts_frame(store),
            "latent_domains": stats.domain_frame(), "latent_experts": at["latent_experts"],
            "expert_latents": at["expert_latents"], "feature_count": fc}
