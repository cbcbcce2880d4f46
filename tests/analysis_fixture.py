"""A small synthetic ``RUN/`` with ``config.json``, ``eval.json`` and an ``analysis/`` folder.

Every table and column documented in docs/analysis.md, built by hand (no dependency on the code
that computes them): 2 MoE layers (1 and 3) of E=4 experts with top-k=2, 3 domains, a RouteSAE of
12 latents over layers [1, 2, 3]. Expert 0 of layer 1 is a hub (in the top-k of 90% of every domain's
tokens), so is expert 2 of layer 3; expert 3 of layer 3 collapses; BOS tokens are reported apart
(position bucket "BOS"). Corpus strings are hostile on purpose (``<script>``, quotes, ``&``,
``</div>``, backticks, ``|``, newlines) so that renderers can be checked for escaping.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

MOE_LAYERS = [1, 3]
SAE_LAYERS = [1, 2, 3]
E, K = 4, 2
DOMAINS = {"code": 600, "prose": 500, "q&a|<i>x</i>": 400}
N_LATENTS = 12
DEAD = [11]  # never active
HOSTILE = ["<script>alert(1)</script>", '"quotes"', "'single'", "a & b", "</div>", "`tick`", "a|b", "\n",
           "*star*", "[link](x)"]
BUCKETS = [str(i) for i in range(1, 8)] + ["8+", "BOS"]  # BOS at position 0: no "0" bucket
N_DOCS = 30
TABLES = ["expert_domain", "expert_stats", "layer_stats", "domain_layer", "experts_per_token", "position_profile",
          "coactivation", "latents", "contexts", "latent_domains", "latent_experts", "expert_latents"]


def _expert_tables(rng: np.random.Generator, E: int = E) -> dict[str, pd.DataFrame]:  # noqa: N803
    total = sum(DOMAINS.values())
    ed, es, ls, dl, ept, pp, co = [], [], [], [], [], [], []
    for layer in MOE_LAYERS:
        hits = {}
        for d, n in DOMAINS.items():
            p = rng.dirichlet(np.ones(E) * 0.7)
            if layer == 3:  # expert 3 of layer 3 collapses
                p[3] = 0.001
                p /= p.sum()
            else:  # expert 0 of layer 1 is in the top-k of 90% of every domain's tokens: a hub
                p = np.concatenate([[0.45], p[1:] / p[1:].sum() * 0.55])
            h_topk = np.minimum(np.round(p * K * n), n).astype(int)
            h_top1 = np.round(p * n).astype(int)
            hits[d] = h_topk
        base = sum(hits.values()) / total  # fraction of all tokens whose top-k includes the expert
        for d, n in DOMAINS.items():
            h_topk, h_top1 = hits[d], np.round(hits[d] / K).astype(int)
            for e in range(E):
                ed.append({"layer": layer, "domain": d, "expert": e, "tokens": n, "hits_topk": int(h_topk[e]),
                           "share_topk": h_topk[e] / n, "hits_top1": int(h_top1[e]), "share_top1": h_top1[e] / n,
                           "uniform_topk": K / E, "uniform_top1": 1 / E, "lift_topk": h_topk[e] / n / (K / E),
                           "base_topk": float(base[e]), "selectivity": h_topk[e] / n / base[e]})
        load = sum(hits.values()) / (K * total)
        for e in range(E):
            shares = {d: hits[d][e] / DOMAINS[d] for d in DOMAINS}
            top_d = max(shares, key=shares.get)
            over = sum(v > 0.5 for v in shares.values())
            es.append({"layer": layer, "expert": e, "load": float(load[e]), "load_top1": float(load[e]),
                       "mean_weight": float(rng.uniform(0.2, 0.6)), "specialisation": shares[top_d] / (K / E),
                       "top_domain": top_d, "collapse_low": bool(load[e] < 0.1 / E),
                       "collapse_high": bool(load[e] > 3 / E),
                       "top_tokens": [HOSTILE[(e + i) % len(HOSTILE)] for i in range(3)],
                       "top_token_shares": [0.9, 0.7, 0.5], "base_topk": float(base[e]),
                       "selectivity": shares[top_d] / base[e], "top_share": shares[top_d], "hub_domains": over,
                       "hub": bool(over > len(DOMAINS) / 2)})
        cv = float(load.std() / load.mean())
        ent = float(-(load * np.log(np.maximum(load, 1e-12))).sum() / np.log(E))
        owners = {}
        for d, n in DOMAINS.items():  # the most selective expert with load >= 0.5/E that is not a hub
            ok = [e for e in range(E) if load[e] >= 0.5 / E and not es[-E + e]["hub"] and hits[d][e] > 0]
            owners[d] = max(ok, key=lambda e: hits[d][e] / n / base[e]) if ok else -1
        ls.append({"layer": layer, "n_experts": E, "top_k": K, "tokens": total, "load_cv": cv,
                   "load_entropy_norm": ent, "max_vio": float((load.max() - load.mean()) / load.mean()),
                   "switch_aux": float(E * (load * load).sum() * K), "router_entropy": float(rng.uniform(0.8, 1.3)),
                   "repetition_rate": float(rng.uniform(0.2, 0.5)),
                   "domain_specialisation": float(np.mean([hits[d].max() / DOMAINS[d] / (K / E) for d in DOMAINS])),
                   "domain_selectivity": float(np.mean([hits[d][o] / DOMAINS[d] / base[o] for d, o in owners.items()
                                                        if o >= 0])),
                   "hubs": sum(r["hub"] for r in es[-E:]), "bos_tokens": N_DOCS})
        for d, n in DOMAINS.items():
            o = owners[d]
            dl.append({"layer": layer, "domain": d, "tokens": n, "router_entropy": float(rng.uniform(0.7, 1.3)),
                       "specialisation": float(hits[d].max() / n / (K / E)), "mean_active": 2.0,
                       "repetition_rate": float(rng.uniform(0.1, 0.5)),
                       "selectivity": float(hits[d][o] / n / base[o]) if o >= 0 else float("nan"), "owner": o})
            fr = rng.dirichlet(np.ones(3))
            for i, n_active in enumerate([1, 2, 3]):
                ept.append({"layer": layer, "domain": d, "n_active": n_active, "tokens": int(round(fr[i] * n)),
                            "fraction": float(fr[i])})
        for b, bucket in enumerate(BUCKETS):
            pp.append({"layer": layer, "bucket": bucket, "tokens": 30 if b < 7 else N_DOCS if bucket == "BOS"
                       else total - 210, "router_entropy": float(0.6 + 0.08 * b),
                       "specialisation": float(1.9 - 0.05 * b), "max_share": float(0.7 - 0.03 * b),
                       "selectivity": float(1.5 - 0.04 * b)})
        for i in range(E):
            for j in range(E):
                c = int(rng.integers(0, 200)) if i != j else int(load[i] * K * total)
                co.append({"layer": layer, "expert_i": i, "expert_j": j, "count": c,
                           "rate": 1.0 if i == j else float(rng.uniform(0, 0.6))})
    return {"expert_domain": pd.DataFrame(ed), "expert_stats": pd.DataFrame(es), "layer_stats": pd.DataFrame(ls),
            "domain_layer": pd.DataFrame(dl), "experts_per_token": pd.DataFrame(ept),
            "position_profile": pd.DataFrame(pp), "coactivation": pd.DataFrame(co)}


def _feature_tables(rng: np.random.Generator, E: int = E) -> dict[str, pd.DataFrame]:  # noqa: N803
    total = sum(DOMAINS.values())
    domains = list(DOMAINS)
    lat, ctx, ldom, lexp, elat = [], [], [], [], []
    for i in range(N_LATENTS):
        dead = i in DEAD
        count = 0 if dead else int(rng.integers(20, 300))
        max_act = 0.0 if dead else float(rng.uniform(2, 10))
        edges = np.linspace(0, max_act, 21).tolist()
        counts = [0] * 20 if dead else rng.multinomial(count, np.ones(20) / 20).tolist()
        fr = [0.0] * 3 if dead else rng.dirichlet(np.ones(3)).tolist()
        top_d = None if dead else domains[i % 3]
        lat.append({"latent": i, "density": count / total, "count": count,
                    "mean_act": float("nan") if dead else max_act / 2, "max_act": max_act, "top_domain": top_d,
                    "top_domain_lift": float("nan") if dead else float(1 + i / 4),
                    "top_routed_layer": SAE_LAYERS[int(np.argmax(fr))], "routed_layer_fractions": fr,
                    "top_expert_layer": float("nan") if dead else float(MOE_LAYERS[i % 2]),
                    "top_expert": float("nan") if dead else float(i % E),
                    "top_expert_lift": float("nan") if dead else float(1 + i / 3),
                    "interpretable": bool(not dead and i % 3 != 2),
                    "top_token": None if dead else HOSTILE[i % len(HOSTILE)],
                    "neighbours": [(i + j) % N_LATENTS for j in range(1, 11)],
                    "neighbour_cos": sorted(rng.uniform(0, 1, 10).tolist(), reverse=True),
                    "logit_pos": [HOSTILE[(i + j) % len(HOSTILE)] for j in range(10)],
                    "logit_neg": [f"neg{j}" for j in range(10)],
                    "logit_pos_values": sorted(rng.uniform(0, 2, 10).tolist(), reverse=True),
                    "logit_neg_values": sorted(rng.uniform(-2, 0, 10).tolist()),
                    "hist_edges": edges, "hist_counts": counts})
        if dead:
            continue
        kinds = [("top", 3)] + [(f"q{q}", 2) for q in range(5)]
        for kind, n in kinds:
            for rank in range(n):
                toks = [HOSTILE[(i + rank + t) % len(HOSTILE)] for t in range(6)] + ["tok", " word"]
                acts = rng.uniform(0, max_act, len(toks))
                center = 2
                if kind == "top":
                    acts[center] = max_act * (1 - 0.1 * rank)
                else:
                    q = int(kind[1])
                    acts[center] = max_act * (q + 0.5) / 5
                ctx.append({"latent": i, "kind": kind, "rank": rank, "act": float(acts[center]), "tokens": toks,
                            "acts": acts.tolist(), "center": center, "domain": domains[(i + rank) % 3],
                            "doc_id": f"doc<{rank}>&\"x\"", "routed_layer": SAE_LAYERS[rank % 3]})
        shares = rng.dirichlet(np.ones(3))
        for d, s in zip(domains, shares):
            base = DOMAINS[d] / total
            ldom.append({"latent": i, "domain": d, "count": int(round(s * count)), "share": float(s),
                         "base_share": base, "lift": float(s / base)})
        below = [m for m in MOE_LAYERS if m <= lat[-1]["top_routed_layer"]]
        for layer in MOE_LAYERS:
            for e in range(E):
                c = int(rng.integers(3, 60))
                share = c / count
                lexp.append({"latent": i, "layer": layer, "expert": e, "count": c, "share": share,
                             "base_share": K / E, "lift": share / (K / E),
                             "at_routed_layer": bool(below) and layer == max(below)})
    lexp_df = pd.DataFrame(lexp)
    for (layer, e), g in lexp_df[lexp_df["count"] >= 5].groupby(["layer", "expert"]):
        g = g.sort_values("lift", ascending=False).head(20)
        for rank, row in enumerate(g.itertuples()):
            elat.append({"layer": layer, "expert": e, "rank": rank, "latent": row.latent, "lift": row.lift,
                         "count": row.count})
    return {"latents": pd.DataFrame(lat), "contexts": pd.DataFrame(ctx), "latent_domains": pd.DataFrame(ldom),
            "latent_experts": lexp_df, "expert_latents": pd.DataFrame(elat)}


def eval_json(run: Path) -> dict:
    sae = {"examples": 1500, "l0": 2.0, "nmse": 0.21, "explained_variance": 0.79}
    raw = {"examples": 1500, "nmse": 0.25, "explained_variance": 0.75}
    return {
        "run": str(run), "store": "/stores/tiny", "arch": "routesae", "layers": SAE_LAYERS, "k": K,
        "n_latents": N_LATENTS, "routing": "hard", "config": {"tokens": 1500}, "tokens": 1500,
        "sae_space": {**sae, "dead_fraction": 1 / 12, "dense_fraction_gt_10pct": 0.25,
                      "dense_fraction_gt_1pct": 0.9, "space": "routed SAE input"},
        "raw_space": {**raw, "space": "raw residual"},
        "per_layer": [{"layer": j, "sae_space": sae, "raw_space": raw} for j in SAE_LAYERS],
        "routed_layers": {"layers": SAE_LAYERS, "counts": [700, 300, 500], "fractions": [0.47, 0.2, 0.33]},
        "mean_p_star": 0.61,
        "splice": {"model": "/models/tiny", "ce_clean": 3.1, "tokens_ce": 1400, "tokens_real": 1500, "contexts": 20,
                   "contexts_skipped_incomplete": 0, "clean_vs_store_max_abs_diff": 0.0, "ce_spliced": 3.4,
                   "ce_zero_ablated": 6.2, "ce_increase": 0.3, "ce_recovered": 0.903, "kl": 0.21,
                   "kl_zero_ablated": 2.9},
        "definitions": {"nmse": "mean over examples of ||x - x_hat||^2 / ||x||^2"},
    }


def make_analysis(tmp_path: Path, seed: int = 0, n_experts: int = E) -> Path:
    """Write ``tmp_path/run`` (config.json, eval.json, analysis/) and return the run folder; ``n_experts`` per MoE
    layer (default E = 4; the report's browser test uses 32, like the demo MoE)."""
    rng = np.random.default_rng(seed)
    run = Path(tmp_path) / "run"
    ana = run / "analysis"
    ana.mkdir(parents=True)
    cfg = {"format": "routesae-sae/1", "arch": "routesae", "d_in": 16, "n_latents": N_LATENTS, "k": K,
           "layers": SAE_LAYERS, "routing": "hard", "pooling": "sum", "router": "faithful", "aux_k": 6,
           "aux_coef": 1 / 32, "dead_tokens": 10_000_000, "standardize": True, "bf16": True,
           "meta": {"model": "/models/tiny <olmoe>", "store": "/stores/tiny"}}
    (run / "config.json").write_text(json.dumps(cfg, indent=2))
    ev = eval_json(run)
    (run / "eval.json").write_text(json.dumps(ev, indent=2))
    tables = {**_expert_tables(rng, n_experts), **_feature_tables(rng, n_experts)}
    for name, df in tables.items():
        df.to_parquet(ana / f"{name}.parquet", index=False)
    lat = tables["latents"]
    settings = {"threshold_rule": "max_frac", "threshold_value": 0.5, "context": 16, "max_per_bucket": 5,
                "max_buckets": 10, "min_contexts": 3}
    (ana / "feature_count.json").write_text(json.dumps(
        {"count": int(lat["interpretable"].sum()), "settings": settings, "tokens": 1500}))
    (ana / "settings.json").write_text(json.dumps(
        {"tokens": 1500, "context_window": 16, "top_contexts": 3, "quantile_bins": 5, "hist_bins": 20,
         "min_vocab_count": 20, "feature_count": settings}))
    (ana / "summary.json").write_text(json.dumps(
        {"run": str(run), "store": "/stores/tiny", "model": "/models/tiny <olmoe>", "arch": "routesae",
         "layers": SAE_LAYERS, "moe_layers": MOE_LAYERS, "n_experts": n_experts, "top_k": K, "tokens": 1500,
         "n_latents": N_LATENTS, "dead_latents": len(DEAD), "dense_latents": 0,
         "interpretable": int(lat["interpretable"].sum()), "domains": DOMAINS, "eval": ev,
         "created": "2026-11-22T06:00:00Z"}))
    return run


def load_tables(run: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run / "analysis" / f"{name}.parquet") for name in TABLES}
