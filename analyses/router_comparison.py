"""Faithful router vs the straight-through (``ste``) router on the same store (issue 4, docs/routesae.md).

    python analyses/router_comparison.py [--store DIR] [--tokens 200000] [--train-tokens 400000]
                                         [--latents 1536] [--k 32] [--seeds 0 1] [--out runs/router-comparison]

Captures the demo MoE over the training split of the demo corpus (unless ``--store`` is given)
and over its validation split (the evaluation store), trains RouteSAE with both routers from the
same seeds on the same batches, evaluates every run on the same held-out validation tokens with
splicing, and prints a Markdown table: NMSE, explained variance, L0, dead fraction, CE recovered,
KL per token, the router's gradient norm at step 0 (zero biases) and the routed-layer fractions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_steps import (  # noqa: E402
    DEMO_CORPUS,
    DEMO_MODEL,
    capture_stores,
    evaluate_once,
    fmt,
    markdown_table,
    metrics_row,
    train_once,
)


def router_grad_at_init(run_cfg, store) -> float:
    """|dL/dW_router| at step 0 with zero biases (b_pre = b_enc = 0), on one batch of the store."""
    from routesae.sae import SAEConfig, build_sae

    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="routesae", d_in=store.d_model, n_latents=run_cfg["n_latents"], k=run_cfg["k"],
                              layers=run_cfg["layers"], router=run_cfg["router"]))
    batch = next(store.batches(2048, seed=123))
    pos = [store.layer_position(i) for i in run_cfg["layers"]]
    sae(batch.resid[:, pos]).loss.backward()
    return float(sae.W_router.grad.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--corpus", default=str(DEMO_CORPUS))
    ap.add_argument("--store")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--train-tokens", type=int, default=400_000)
    ap.add_argument("--latents", type=int, default=1536)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval-tokens", type=int, default=32_768)
    ap.add_argument("--out", default="runs/router-comparison")
    args = ap.parse_args()

    from routesae.store import Store

    out = Path(args.out)
    store_dir, eval_dir = capture_stores(args.model, args.corpus, out, args.tokens, args.eval_tokens, args.store)
    store = Store(store_dir)
    rows = []
    for seed in args.seeds:
        for router in ("faithful", "ste"):
            run = train_once(out / f"{router}-seed{seed}", store=store_dir, router=router, latents=args.latents,
                             k=args.k, tokens=args.train_tokens, seed=seed)
            ev = evaluate_once(run, eval_dir, args.eval_tokens)
            cfg = json.loads((run / "config.json").read_text())
            rows.append({"router": router, "seed": seed, **metrics_row(ev), "grad0": router_grad_at_init(cfg, store)})
    layers = store.manifest["layers"]
    print(f"store {store_dir}: {store.n_tokens:,} tokens, routed layers {layers}; RouteSAE {args.latents} latents, "
          f"k={args.k}, {args.train_tokens:,} training tokens; evaluation on {args.eval_tokens:,} validation "
          f"tokens ({eval_dir})\n")
    print(markdown_table(
        ["router", "seed", "NMSE", "explained var.", "L0", "dead", "CE recovered", "KL/token",
         "grad W_router at init (zero biases)", "routed-layer fractions"],
        [[r["router"], r["seed"], fmt(r["nmse"]), fmt(r["ev"]), fmt(r["l0"], ".1f"), fmt(r["dead"], ".3f"),
          fmt(r["ce_rec"], ".3f"), fmt(r["kl"]), f"{r['grad0']:.2e}", ", ".join(f"{x:.2f}" for x in (r["hist"] or []))]
         for r in rows]))


if __name__ == "__main__":
    main()
