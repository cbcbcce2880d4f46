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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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
    ap.add_argument("--model", default=str(ROOT / "data" / "demo-moe"))
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--store")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--train-tokens", type=int, default=400_000)
    ap.add_argument("--latents", type=int, default=1536)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval-tokens", type=int, default=32_768)
    ap.add_argument("--out", default="runs/router-comparison")
    args = ap.parse_args()

    from routesae.capture import CaptureConfig, capture
    from routesae.evaluate import EvalConfig, evaluate
    from routesae.store import Store
    from routesae.train import TrainConfig, train

    out = Path(args.out)
    store_dir = args.store or str(out / "store")
    eval_dir = str(out / "store-val")
    if args.store is None:
        capture(CaptureConfig(model=args.model, corpus=args.corpus, out=store_dir, max_tokens=args.tokens,
                              device="cpu", progress=False))
    manifest = Store(store_dir).manifest
    capture(CaptureConfig(model=manifest["model"]["name_or_path"], corpus=args.corpus, out=eval_dir, split="val",
                          layers=",".join(map(str, manifest["layers"])), max_tokens=args.eval_tokens,
                          device="cpu", progress=False))
    store = Store(store_dir)
    rows = []
    for seed in args.seeds:
        for router in ("faithful", "ste"):
            run = out / f"{router}-seed{seed}"
            if not (run / "sae.safetensors").exists():
                train(TrainConfig(store=store_dir, out=str(run), router=router, latents=args.latents, k=args.k,
                                  tokens=args.train_tokens, seed=seed, device="cpu", progress=False))
            ev = evaluate(EvalConfig(run=str(run), store=eval_dir, tokens=args.eval_tokens, device="cpu"))
            cfg = json.loads((run / "config.json").read_text())
            sp = ev.get("splice", {})
            rows.append({"router": router, "seed": seed, "nmse": ev["sae_space"]["nmse"],
                         "ev": ev["sae_space"]["explained_variance"], "l0": ev["sae_space"]["l0"],
                         "dead": ev["sae_space"]["dead_fraction"], "ce_rec": sp.get("ce_recovered"),
                         "kl": sp.get("kl"), "grad0": router_grad_at_init(cfg, store),
                         "hist": ev.get("routed_layers", {}).get("fractions")})
    layers = store.manifest["layers"]
    print(f"store {store_dir}: {store.n_tokens:,} tokens, routed layers {layers}; RouteSAE {args.latents} latents, "
          f"k={args.k}, {args.train_tokens:,} training tokens; evaluation on {args.eval_tokens:,} validation "
          f"tokens ({eval_dir})\n")
    print("| router | seed | NMSE | explained var. | L0 | dead | CE recovered | KL/token | grad W_router at init "
          "(zero biases) | routed-layer fractions |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hist = ", ".join(f"{x:.2f}" for x in (r["hist"] or []))
        ce = f"{r['ce_rec']:.3f}" if r["ce_rec"] is not None else "n/a"
        kl = f"{r['kl']:.4f}" if r["kl"] is not None else "n/a"
        print(f"| {r['router']} | {r['seed']} | {r['nmse']:.4f} | {r['ev']:.4f} | {r['l0']:.1f} | {r['dead']:.3f} | "
              f"{ce} | {kl} | {r['grad0']:.2e} | {hist} |")


if __name__ == "__main__":
    main()
