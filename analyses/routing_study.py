"""How RouteSAE's router uses its layers: faithful, ste and layer-balanced routers (issue 16 §2).

    python analyses/routing_study.py --name demo            # the demo MoE, blocks 1..5
    python analyses/routing_study.py --name smollm2 --model smollm2 --tokens 40960 --val-tokens 8192 \\
        --latents 2304 --train-tokens 81920 --batch-tokens 2048 --ks 32 --eval-tokens 8192 \\
        --splice-contexts 16 --feature-tokens 8192

One training store and one held-out store (validation split) of ``--model`` over the paper's
routed range; for every router (``faithful``, ``ste``, ``balanced`` = faithful with
``--route-balance``), k and seed: one RouteSAE with the same latents, tokens and batches.
Evaluated on held-out tokens: NMSE, KL per token and CE recovered spliced, the routed-layer
fractions and their normalised entropy H, the router margin, the interpretable-feature count on
a fixed token budget at relative thresholds ``--fire-fractions`` (0.3 / 0.5 / 0.7 of each
latent's maximum), features per routed layer, and which kinds of tokens each layer receives
(token classes with their lift over all evaluated tokens, and the most over-represented tokens).
Mean ± sd over seeds. Writes ``OUT/results.json`` and the ``routing-study-NAME`` section of
docs/RESULTS.md. Finished runs, evaluations and counts are reused on a re-run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_steps import (  # noqa: E402
    DEMO_CORPUS,
    DEMO_MODEL,
    ROOT,
    capture_stores,
    evaluate_once,
    feature_count_once,
    markdown_table,
    metrics_row,
    pm,
    train_once,
    write_section,
)

CLASSES = ("first position", "newline", "punctuation", "digits", "word start", "word piece", "other")


def token_class(text: str, position: int) -> str:
    """A coarse class of one token's text (as the tokenizer decodes it alone) at ``position``."""
    if position == 0:
        return "first position"
    if "\n" in text:
        return "newline"
    s = text.strip()
    if not s:
        return "other"
    if all(not c.isalnum() for c in s):
        return "punctuation"
    if s.isdigit():
        return "digits"
    if s.isalpha():
        return "word start" if text[:1].isspace() else "word piece"
    return "other"


def routed_tokens_once(run: Path, store: str, tokens: int) -> pd.DataFrame:
    """Each evaluated token's routed layer and router margin, with its text, domain and position
    (cached in RUN/routed_tokens_TOKENS.parquet)."""
    path = run / f"routed_tokens_{tokens}.parquet"
    if path.exists():
        return pd.read_parquet(path)
    import torch

    from routesae.sae import load_sae
    from routesae.store import Store

    sae, s = load_sae(run).eval(), Store(store)
    layers, got = [], []
    with torch.no_grad():
        for sh in s.shards:
            if sum(len(x) for x in layers) >= tokens:
                break
            resid = torch.stack([s.load_resid(sh["index"], j) for j in sae.cfg.layers], 1).float()
            probs, pos = sae.route(resid)
            top2 = probs.topk(2, dim=-1).values
            layers.append(pos.numpy())
            got.append((top2[:, 0] - top2[:, 1]).numpy())
    import numpy as np

    pos, margin = np.concatenate(layers)[:tokens], np.concatenate(got)[:tokens]
    tok = s.tokens(["token", "domain", "position"]).iloc[:len(pos)].reset_index(drop=True)
    tok["routed_layer"] = [sae.cfg.layers[i] for i in pos]
    tok["margin"] = margin
    tok["cls"] = [token_class(t, p) for t, p in zip(tok["token"], tok["position"])]
    tok.to_parquet(path)
    return tok


def layer_profile(tok: pd.DataFrame, min_count: int = 20) -> list[dict]:
    """Per routed layer: token share, the classes over-represented there (lift), top tokens by lift."""
    overall = tok["cls"].value_counts(normalize=True)
    tok_all = tok["token"].value_counts()
    out = []
    for layer, g in tok.groupby("routed_layer"):
        share = g["cls"].value_counts(normalize=True)
        lift = (share / overall).dropna().sort_values(ascending=False)
        counts = g["token"].value_counts()
        tl = (counts / len(g)) / (tok_all[counts.index] / len(tok))
        tl = tl[counts >= min(min_count, max(len(g) // 50, 3))].sort_values(ascending=False)
        doms = (g["domain"].value_counts(normalize=True) / tok["domain"].value_counts(normalize=True)).dropna()
        out.append({"layer": int(layer), "share": len(g) / len(tok),
                    "classes": {c: {"share": float(share[c]), "lift": float(lift[c])} for c in lift.index[:3]},
                    "tokens": [repr(t)[1:-1] for t in tl.index[:6]],
                    "domains": {d: float(v) for d, v in doms.sort_values(ascending=False).iloc[:2].items()}})
    return out


def routers(args) -> dict[str, dict]:
    table = {"faithful": {"router": "faithful"}, "ste": {"router": "ste"},
             "balanced": {"router": "faithful", "route_balance": args.balance},
             "ste+balanced": {"router": "ste", "route_balance": args.balance}}
    return {name: table[name] for name in args.routers}


def one_run(args, store: str, val: str, name: str, opts: dict, k: int, seed: int) -> dict:
    run = Path(args.out) / f"{name.replace('+', '-')}-k{k}-s{seed}"
    train_once(run, store=store, arch="routesae", latents=args.latents, k=k, tokens=args.train_tokens,
               batch_tokens=args.batch_tokens, seed=seed, **opts)
    ev = evaluate_once(run, val, args.eval_tokens, args.splice_contexts)
    counts = {f: feature_count_once(run, val, args.feature_tokens, f) for f in args.fire_fractions}
    tok = routed_tokens_once(run, val, args.eval_tokens)
    rl = ev.get("routed_layers") or {}
    mid = counts[sorted(counts, key=lambda f: abs(f - 0.5))[0]]
    return {"router": name, "k": k, "seed": seed, "run": str(run), **metrics_row(ev),
            "entropy": rl.get("entropy"), "margin": float(tok["margin"].mean()),
            "features": {str(f): c["count"] for f, c in counts.items()},
            "features_per_layer": {str(j): n for j, n in mid["per_routed_layer"].items()},
            "profile": layer_profile(tok)}


def summarise(rows: list[dict], fire: list[float]) -> list[dict]:
    keys = ["nmse", "nmse_raw", "kl", "ce_rec", "entropy", "margin", "dead", *[f"features@{f:g}" for f in fire]]
    out = []
    for name, k in dict.fromkeys((r["router"], r["k"]) for r in rows):
        group = [r for r in rows if (r["router"], r["k"]) == (name, k)]
        for r in group:
            r.update({f"features@{f:g}": r["features"][str(f)] for f in fire})
        s = {"router": name, "k": k, "seeds": len(group)}
        for key in keys:
            vals = [r[key] for r in group if r.get(key) is not None]
            s[key] = statistics.fmean(vals) if vals else None
            s[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        s["hist"] = [statistics.fmean(r["hist"][i] for r in group) for i in range(len(group[0]["hist"]))]
        per = [r["features_per_layer"] for r in group]
        s["features_per_layer"] = {j: statistics.fmean(p.get(j, 0) for p in per) for j in per[0]}
        out.append(s)
    return out


def markdown(res: dict) -> str:
    a, summary, layers = res["args"], res["summary"], res["layers"]
    fire = a["fire_fractions"]
    out = [f"```\n{res['command']}\n```", "",
           f"Model `{res['model']}`; training store {res['store_tokens']:,} tokens (training split), routed "
           f"layers {layers}; held-out: the first {a['eval_tokens']:,} tokens of the validation split (splice: "
           f"{a['splice_contexts']} contexts; features counted on {a['feature_tokens']:,} tokens). RouteSAE with "
           f"{a['latents']:,} latents, {a['train_tokens']:,} training tokens in batches of {a['batch_tokens']:,}, "
           f"seeds {a['seeds']} (mean ± sd); `balanced` = faithful with the layer-balance loss, weight "
           f"{a['balance']}. H = normalised entropy of the routed-layer fractions (1 = all layers equally used); "
           "margin = mean p_top1 - p_top2.", ""]
    out += [markdown_table(["router", "k", "NMSE (raw residual)", "KL/token", "CE recovered",
                            *[f"features @{f:g}" for f in fire], "H", "margin", "routed-layer fractions"],
                           [[s["router"], s["k"], pm(s, "nmse_raw"), pm(s, "kl"), pm(s, "ce_rec"),
                             *[pm(s, f"features@{f:g}", ".0f") for f in fire], pm(s, "entropy", ".2f"),
                             pm(s, "margin", ".2f"), ", ".join(f"{x:.2f}" for x in s["hist"])] for s in summary]), ""]
    mid = min(fire, key=lambda f: abs(f - 0.5))
    out += [f"Interpretable features (threshold {mid:g}) by their most frequent routed layer, mean over seeds:", "",
            markdown_table(["router", "k", *[f"layer {j}" for j in layers]],
                           [[s["router"], s["k"], *[f"{s['features_per_layer'].get(str(j), 0):.0f}" for j in layers]]
                            for s in summary]), ""]
    first = [r for r in res["rows"] if r["seed"] == a["seeds"][0] and r["k"] == (32 if 32 in a["ks"] else a["ks"][0])]
    for r in first:
        out += [f"Which tokens each layer receives ({r['router']}, k = {r['k']}, seed {r['seed']}; layers with "
                "at least 1% of the tokens; classes and tokens by lift over all evaluated tokens):", ""]
        out += [markdown_table(["layer", "share", "over-represented classes (share, lift)", "top tokens by lift",
                                "top domains (lift)"],
                               [[p["layer"], f"{p['share']:.2f}",
                                 "; ".join(f"{c} ({v['share']:.2f}, {v['lift']:.1f}x)"
                                           for c, v in p["classes"].items()),
                                 " ".join(f"`{t}`" for t in p["tokens"]),
                                 ", ".join(f"{d} ({v:.1f}x)" for d, v in p["domains"].items())]
                                for p in r["profile"] if p["share"] >= 0.01]), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="demo", help="names OUT and the RESULTS section")
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--corpus", default=str(DEMO_CORPUS))
    ap.add_argument("--store", help="an existing training store (default: capture --tokens into OUT/store)")
    ap.add_argument("--layers", default="auto", help="layers captured (auto: the paper's routed range)")
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--val-tokens", type=int, default=32_768)
    ap.add_argument("--train-tokens", type=int, default=524_288)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--latents", type=int, default=1536)
    ap.add_argument("--routers", nargs="+", default=["faithful", "ste", "balanced"],
                    choices=["faithful", "ste", "balanced", "ste+balanced"])
    ap.add_argument("--balance", type=float, default=0.03, help="--route-balance of the balanced routers")
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-tokens", type=int, default=32_768)
    ap.add_argument("--splice-contexts", type=int, default=64)
    ap.add_argument("--feature-tokens", type=int, default=32_768)
    ap.add_argument("--fire-fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--out", help="default runs/routing-study-NAME")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    args.out = args.out or f"runs/routing-study-{args.name}"
    out, t0 = Path(args.out), time.perf_counter()
    from routesae.capture import CaptureConfig, capture

    if args.store is None and args.layers != "auto":
        capture(CaptureConfig(model=args.model, corpus=args.corpus, out=str(out / "store"), layers=args.layers,
                              max_tokens=args.tokens, device="cpu", progress=False))
        args.store = str(out / "store")
    store, val = capture_stores(args.model, args.corpus, out, args.tokens, args.val_tokens, args.store)
    print(f"[{time.perf_counter() - t0:6.0f}s] stores {store} {val}", flush=True)
    rows = []
    for seed in args.seeds:
        for k in args.ks:
            for name, opts in routers(args).items():
                rows.append(one_run(args, store, val, name, opts, k, seed))
                r = rows[-1]
                print(f"[{time.perf_counter() - t0:6.0f}s] {name:12s} k={k:3d} s={seed} nmse={r['nmse']:.4f} "
                      f"kl={r['kl']:.4f} H={r['entropy']:.2f} features={r['features']} "
                      f"hist={[round(x, 2) for x in r['hist']]}", flush=True)
    from routesae.store import Store

    s = Store(store)
    cmd = "python analyses/routing_study.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    res = {"command": cmd, "args": vars(args), "model": args.model if args.model != str(DEMO_MODEL)
           else "data/demo-moe", "store_tokens": s.n_tokens, "layers": s.layers, "rows": rows,
           "summary": summarise(rows, args.fire_fractions)}
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "RESULTS.md", f"routing-study-{args.name}", text)


if __name__ == "__main__":
    main()
