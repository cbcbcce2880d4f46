"""Load balance, unigram baselines and expert ownership of a demo-moe model, for its card.

All on the trainer's fixed validation slice (:class:`routesae.zoo.train_lm.ValSlice`), BOS tokens
(document position 0) left out: every document starts with the same token, which is routed the same
way every time and would make a trivial "specialist" of whatever expert takes it.

Per MoE layer l, over the slice's N tokens (REFERENCE §7):

- load ``f_i = N_k(E_i) / N``: the fraction of tokens whose top-k includes expert i (uniform: k/E);
  the card reports ``min_i f_i / (k/E)`` and the experts below 10% of the uniform load;
- Switch auxiliary loss ``E * sum_i f_i P_i`` with ``P_i`` the mean router probability of expert i
  (transformers' convention: k when balanced, up to E k ... for a collapsed router);
- ownership by selectivity: ``sel(i, D) = share(i, D) / f_i`` with ``share(i, D) = N_k(E_i, D) / N_D``;
  an expert owns domain D when ``sel(i, D) >= 2`` (twice as frequent in D as overall) and its load is
  at least half the uniform one. Unlike lift over uniform, ``share / (k/E)``, selectivity is 1 for a
  hub that serves every token of every domain.

Unigram baselines (cross-entropy of a context-free model on the same targets): ``global`` = the train
split's token frequencies (add-one smoothing); ``domain`` = each domain's own train-split frequencies,
the stronger baseline, which knows the domain of every token; ``domain_in_sample`` = the entropy of
each domain's own token frequencies on the slice itself, the best any unigram model can do there (a
lower bound for every unigram baseline).
"""

from __future__ import annotations

import numpy as np
import torch

from routesae.corpus import ContextBuilder, CorpusConfig, iter_documents

OWN_SELECTIVITY = 2.0
OWN_MIN_LOAD = 0.5  # x uniform
STARVED = 0.1  # x uniform


def domain_unigram_counts(cfg, tokenizer, domains: list[str]) -> np.ndarray:
    """Train-split token counts per domain, ``[n_domains + 1, vocab]``; the last row holds the tokens of
    domains not in ``domains`` (BOS counted as the trainer sees it). Summed over rows: the global counts."""
    di = {d: i for i, d in enumerate(domains)}
    counts = np.zeros((len(domains) + 1, len(tokenizer)), np.int64)
    builder = ContextBuilder(tokenizer, cfg.ctx, packing="pack")
    docs = iter_documents(CorpusConfig(path=cfg.corpus, split="train", seed=cfg.seed))
    for ids, doc, _ in builder.contexts(docs):
        dom = np.array([di.get(builder.doc_domains[j], len(domains)) for j in doc])
        np.add.at(counts, (dom, np.asarray(ids)), 1)
    return counts


def unigram_baselines(counts: np.ndarray, vs) -> dict[str, dict[str, float]]:
    """Per domain: ``global`` and ``domain`` unigram cross-entropy (nats) on the slice's non-BOS targets."""
    V = counts.shape[1]
    total = counts.sum(0)
    logp_g = np.log((total + 1.0) / (total.sum() + V))
    tgt, dom, pos = vs.ids[:, 1:], vs.dom[:, 1:], vs.pos[:, 1:]
    keep = (dom >= 0) & (pos > 0)
    out = {}
    for i, d in enumerate(vs.domains):
        sel = keep & (dom == i)
        logp_d = np.log((counts[i] + 1.0) / (counts[i].sum() + V))
        own = np.bincount(tgt[sel], minlength=V)  # the slice's own frequencies: a lower bound for unigrams
        p_own = own[own > 0] / own.sum()
        out[d] = {"global": float(-logp_g[tgt[sel]].mean()), "domain": float(-logp_d[tgt[sel]].mean()),
                  "domain_in_sample": float(-(p_own * np.log(p_own)).sum()), "tokens": int(sel.sum())}
    return out


@torch.no_grad()
def routing_counts(model, vs, device, layers: list[int] | None = None, bos: bool = False, batch: int = 8) -> dict:
    """Top-k and top-1 membership counts per (layer, domain, expert), summed router probabilities per (layer, expert).

    ``layers``: which MoE layers (default all; index i of the arrays is ``layers[i]``); ``bos``: count the
    documents' first tokens too (left out by default).
    """
    c = model.config
    E, k = c.num_experts, c.num_experts_per_tok
    layers = list(range(c.num_hidden_layers)) if layers is None else list(layers)
    nd = len(vs.domains)
    topk = np.zeros((len(layers), nd, E), np.int64)
    top1 = np.zeros((len(layers), nd, E), np.int64)
    psum = np.zeros((len(layers), E))
    n_d = np.zeros(nd, np.int64)
    was = model.training
    model.eval()
    for s in range(0, len(vs.ids), batch):
        ids = torch.from_numpy(vs.ids[s:s + batch]).to(device)
        mask = torch.from_numpy(vs.mask[s:s + batch]).to(device)
        rl = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        dom, pos = vs.dom[s:s + batch].reshape(-1), vs.pos[s:s + batch].reshape(-1)
        keep = (dom >= 0) & (bos | (pos > 0))
        d = dom[keep]
        n_d += np.bincount(d, minlength=nd)
        for li, layer in enumerate(layers):
            probs = torch.softmax(rl[layer].float(), dim=-1).cpu()
            psum[li] += probs.numpy()[keep].sum(0)
            idx = torch.topk(probs, k, dim=-1).indices.numpy()[keep]
            np.add.at(topk[li], (np.repeat(d, k), idx.reshape(-1)), 1)
            np.add.at(top1[li], (d, idx[:, 0]), 1)
    model.train(was)
    return {"topk": topk, "top1": top1, "psum": psum, "n_d": n_d, "E": E, "k": k}


def balance_table(r: dict, domains: list[str]) -> list[dict]:
    """One row per layer: load extremes, starved/dead experts, Switch aux, owners by selectivity."""
    E, k = r["E"], r["k"]
    uniform = k / E
    N = int(r["n_d"].sum())
    rows = []
    for layer in range(r["topk"].shape[0]):
        cnt = r["topk"][layer]  # [domain, expert]
        load = cnt.sum(0) / N
        P = r["psum"][layer] / N
        share = cnt / np.maximum(r["n_d"][:, None], 1)
        sel = share / np.maximum(load[None, :], 1e-12)
        owners = []
        for di, d in enumerate(domains):
            for e in np.argsort(-sel[di], kind="stable"):
                if sel[di, e] < OWN_SELECTIVITY:
                    break
                if load[e] >= OWN_MIN_LOAD * uniform:
                    owners.append({"expert": int(e), "domain": d, "selectivity": round(float(sel[di, e]), 3),
                                   "share": round(float(share[di, e]), 4), "load": round(float(load[e]), 4)})
        rows.append({
            "layer": layer, "min_load_ratio": round(float(load.min() / uniform), 4),
            "max_load_ratio": round(float(load.max() / uniform), 4),
            "starved": [int(e) for e in np.flatnonzero(load < STARVED * uniform)],
            "dead": [int(e) for e in np.flatnonzero(load == 0)],
            "switch_aux": round(float(E * (load * P).sum()), 4),
            "load": [round(float(x), 5) for x in load],
            "owners": sorted(owners, key=lambda o: -o["selectivity"]),
        })
    return rows


def measure(model, tokenizer, cfg, vs, device, val: dict[str, dict]) -> dict:
    """Everything the card's balance section needs (``val``: per-domain losses from ``val_losses``)."""
    counts = domain_unigram_counts(cfg, tokenizer, vs.domains)
    uni = unigram_baselines(counts, vs)
    r = routing_counts(model, vs, device)
    tok = np.array([val[d]["tokens"] for d in vs.domains], float)

    def wmean(xs):
        return float(np.dot(xs, tok) / tok.sum())

    mean = {"model": wmean([val[d]["loss"] for d in vs.domains]),
            "unigram_global": wmean([uni[d]["global"] for d in vs.domains]),
            "unigram_domain": wmean([uni[d]["domain"] for d in vs.domains]),
            "unigram_domain_in_sample": wmean([uni[d]["domain_in_sample"] for d in vs.domains])}
    return {"unigram": uni, "mean_val": {k: round(v, 4) for k, v in mean.items()},
            "layers": balance_table(r, vs.domains), "tokens": int(r["n_d"].sum()),
            "E": r["E"], "k": r["k"]}
