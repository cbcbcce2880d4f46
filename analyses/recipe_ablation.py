"""From routesae's default recipe to the RouteSAE reference code's, one change at a time (issue 16 §1).

    python analyses/recipe_ablation.py [--store runs/demo/full/store] [--seeds 0 1 2] [--ks 32]
        [--goal-ks 16 32 64] [--train-tokens 524288] [--latents 1536] [--eval-tokens 32768]
        [--splice-contexts 64] [--arch routesae] [--out runs/recipe-ablation] [--no-write]

One training store (default: a capture of 262,144 tokens of the demo MoE's training split, blocks
1..5, as ``routesae demo`` makes; ``--store`` reuses one) and a held-out store of the validation
split (``OUT/store-val``). Every run: faithful RouteSAE (or ``--arch``), 1,536 latents, batches
of 4,096, 524,288 training tokens (two passes), the same seed -> the same batches. Rows at
``--ks``: routesae's default before this study ("default"), each single reference option switched
on alone, the reference recipe, the reference recipe with the geometric-median ``b_pre`` put
back, and our candidate fixes; rows at ``--goal-ks``: the old default, the reference recipe and
the new default (``NEW_DEFAULT``, the candidate the study chose). Per run: held-out NMSE, KL per token and CE recovered
spliced on held-out tokens, in-sample NMSE (the first ``--eval-tokens`` of the training store),
the last training-loss window, dead fraction, routed-layer fractions and their normalised entropy
(routesae/sae/route_stats.py). Mean ± sd over seeds.

Writes ``OUT/results.json`` and the ``recipe-ablation`` section of ``docs/RESULTS.md``.
Finished runs and evaluations are reused on a re-run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_steps import (  # noqa: E402
    DEMO_CORPUS,
    DEMO_MODEL,
    ROOT,
    capture_stores,
    evaluate_once,
    markdown_table,
    metrics_row,
    pm,
    train_once,
    write_section,
)

from routesae.recipe import recipe_options  # noqa: E402
from routesae.sae.route_stats import normalised_entropy  # noqa: E402

REFERENCE = recipe_options("reference")
# routesae's default before this study (issue 16): every row below is relative to it, so its runs stay comparable
OLD_DEFAULT = {"b_pre_init": "median", "enc_init": "transpose", "center_init": "zero", "decoder_norm": "project",
               "renorm_every": 10, "warmup_frac": 0.05, "decay_frac": 0.2, "aux_k": 256, "lr": None}
NEW_DEFAULT = "default + layer centres + encoder fit"  # the default's initialisation (routesae/recipe.py); its
# router is ste since the routing study, but every row here uses the faithful router (the reference code's)
GOAL_ROWS = ("default", "reference", NEW_DEFAULT)
SINGLE = {  # name -> the reference options switched on alone, on top of the default recipe
    "b_pre = 0": {"b_pre_init": "zero"},
    "nn.Linear encoder init": {"enc_init": "linear"},
    "constant lr": {"warmup_frac": 0.0, "decay_frac": 0.0},
    "no AuxK": {"aux_k": 0},
    "renormalise every 10 steps": {"decoder_norm": "renorm", "renorm_every": 10},
    "lr 5e-4": {"lr": 5e-4},
}


CANDIDATES = {  # fixes of ours (routesae/recipe.py), on top of the default recipe
    "default + layer centres": {"center_init": "median"},
    "default + layer centres + encoder fit": {"center_init": "median", "enc_init": "fit"},
    "default + b_pre = 0 + encoder fit": {"b_pre_init": "zero", "enc_init": "fit"},
    "default + encoder fit": {"enc_init": "fit"},
}


def variants(k: int, ablate: bool, only: list[str] | None = None) -> dict[str, dict]:
    """Row name -> TrainConfig options (on top of the default recipe); ``only``: a subset of the names."""
    rows = {"default": {}}
    if ablate:
        rows.update({f"default + {name}": opts for name, opts in SINGLE.items()})
    rows["reference"] = dict(REFERENCE)
    if ablate:
        rows["reference + median b_pre"] = {**REFERENCE, "b_pre_init": "median"}
        rows.update(CANDIDATES)
    return {n: o for n, o in rows.items() if only is None or n in only}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def insample_once(run: Path, store: str, tokens: int) -> dict:
    """NMSE etc. on the first ``tokens`` of the training store (no splice), cached in RUN/eval_insample.json."""
    from routesae.evaluate import EvalConfig, evaluate

    path = run / "eval_insample.json"
    if path.exists():
        got = json.loads(path.read_text())
        if got.get("config", {}).get("tokens") == tokens:
            return got
    ev = evaluate(EvalConfig(run=str(run), store=store, tokens=tokens, splice=False, device="cpu"))
    path.write_text(json.dumps(ev, indent=1) + "\n")
    (run / "eval.json").unlink(missing_ok=True)  # the held-out evaluation is written next
    return ev


def per_domain_nmse(run: Path, store: str, tokens: int) -> dict[str, dict[str, float]]:
    """Per-token NMSE of the SAE on the first ``tokens`` of ``store``, by domain (mean NMSE, token share);
    cached in RUN/nmse_by_domain_<store name>.json. Separates a change of domain mix from overfitting."""
    path = run / f"nmse_by_domain_{Path(store).name}.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    from routesae.sae import load_sae
    from routesae.store import Store

    sae, s = load_sae(run).eval(), Store(store)
    ratios = []
    with torch.no_grad():
        for sh in s.shards:
            if sum(len(x) for x in ratios) >= tokens:
                break
            resid = torch.stack([s.load_resid(sh["index"], j) for j in sae.cfg.layers], 1).float()
            o = sae(resid if sae.cfg.arch != "topk" else resid[:, 0])
            ratios.append(((o.x_hat - o.x).pow(2).sum(-1) / o.x.pow(2).sum(-1).clamp_min(1e-12)).numpy())
    import numpy as np

    r = np.concatenate(ratios)[:tokens]
    dom = s.tokens(["domain"])["domain"].iloc[:len(r)].to_numpy()
    out = {d: {"nmse": float(r[dom == d].mean()), "share": float((dom == d).mean())} for d in sorted(set(dom))}
    out["all"] = {"nmse": float(r.mean()), "share": 1.0}
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def one_run(args, store: str, val: str, name: str, opts: dict, k: int, seed: int) -> dict:
    run = Path(args.out) / f"{slug(name)}-k{k}-s{seed}"
    base = {"arch": args.arch, "router": "faithful", **OLD_DEFAULT}
    train_once(run, store=store, latents=args.latents, k=k, tokens=args.train_tokens, seed=seed,
               batch_tokens=args.batch_tokens, **{**base, **opts})
    ins = insample_once(run, store, args.eval_tokens)
    ev = evaluate_once(run, val, args.eval_tokens, args.splice_contexts)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    row = metrics_row(ev)
    hist = row["hist"]
    by_domain = None
    if seed == args.seeds[0] and name in ("default", "reference"):
        by_domain = {"train": per_domain_nmse(run, store, args.eval_tokens),
                     "heldout": per_domain_nmse(run, val, args.eval_tokens)}
    return {"name": name, "k": k, "seed": seed, "run": str(run), **row, "nmse_by_domain": by_domain,
            "entropy": normalised_entropy(hist) if hist else None,
            "nmse_insample": ins["sae_space"]["nmse"], "train_nmse_last": lines[-1]["nmse"],
            "nmse_raw_insample": ins["raw_space"]["nmse"]}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sd over seeds per (name, k)."""
    keys = ("nmse", "kl", "ce_rec", "nmse_insample", "train_nmse_last", "dead", "entropy", "nmse_raw",
            "nmse_raw_insample")
    out = []
    for name, k in dict.fromkeys((r["name"], r["k"]) for r in rows):
        group = [r for r in rows if (r["name"], r["k"]) == (name, k)]
        s = {"name": name, "k": k, "seeds": len(group)}
        for key in keys:
            vals = [r[key] for r in group if r.get(key) is not None]
            s[key] = statistics.fmean(vals) if vals else None
            s[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        hists = [r["hist"] for r in group if r["hist"]]
        s["hist"] = [statistics.fmean(h[i] for h in hists) for i in range(len(hists[0]))] if hists else None
        out.append(s)
    return out


def beyond_spread(a: dict, b: dict, key: str) -> bool:
    """``a`` lower than ``b`` by more than the larger of the two seed sds (the rule of docs/RESULTS.md)."""
    if a.get(key) is None or b.get(key) is None:
        return False
    spread = max(a.get(key + "_sd") or 0.0, b.get(key + "_sd") or 0.0)
    return b[key] - a[key] > spread


def verdict(default: dict, reference: dict, key: str) -> str:
    if beyond_spread(default, reference, key):
        return "default better"
    if beyond_spread(reference, default, key):
        return "reference better"
    return "no difference (within the seed spread)"


def markdown(res: dict) -> str:
    a, summary = res["args"], res["summary"]
    out = [f"```\n{res['command']}\n```", "",
           f"Model `{res['model']}`. Training store: {res['store_tokens']:,} tokens of the training split, blocks "
           f"{res['layers']}; held-out: the first {a['eval_tokens']:,} tokens of the validation split "
           f"(splice: {a['splice_contexts']} contexts of 256). {a['arch']} with the faithful router, "
           f"{a['latents']:,} latents, batches of {a['batch_tokens']:,}, {a['train_tokens']:,} training tokens, seeds "
           f"{a['seeds']} (mean ± sd). `default + X` switches one option of the reference recipe on; "
           "routed-layer fractions are on the held-out tokens; H = their normalised entropy. **NMSE** is "
           "measured on the raw residual of each token's routed layer against its reconstruction (what is "
           "spliced), the same target for every recipe; the SAE-space NMSE (the training loss) has another "
           "target once layer centres are subtracted (`p_i* (x_i* - c_i*)`, a smaller norm), so it is shown "
           "apart and compares only between recipes without centres.", ""]
    table = [[s["name"], s["k"], pm(s, "nmse_raw"), pm(s, "kl"), pm(s, "ce_rec"), pm(s, "nmse_raw_insample"),
              pm(s, "nmse"), pm(s, "train_nmse_last"), pm(s, "dead"),
              ", ".join(f"{x:.2f}" for x in s["hist"]) if s["hist"] else "-", pm(s, "entropy", ".2f")]
             for s in summary]
    out += [markdown_table(["recipe", "k", "held-out NMSE", "KL/token", "CE recovered", "in-sample NMSE",
                            "held-out NMSE, SAE space", "last training loss", "dead", "routed-layer fractions",
                            "H"], table), ""]
    split = [r for r in res["rows"] if r.get("nmse_by_domain")]
    if split:
        out += ["In-sample against held-out NMSE by domain (seed "
                f"{a['seeds'][0]}; share = the domain's share of each store's evaluated tokens). The two "
                "stores mix domains differently, so their overall NMSEs differ even where no domain does:", ""]
        for r in split:
            tr, ho = r["nmse_by_domain"]["train"], r["nmse_by_domain"]["heldout"]
            doms = [d for d in sorted(set(tr) | set(ho), key=lambda d: -ho.get(d, {}).get("share", 0)) if d != "all"]
            cell = lambda t, d: f"{t[d]['nmse']:.3f} ({t[d]['share']:.2f})" if d in t else "-"  # noqa: E731
            out += [f"{r['name']}, k = {r['k']}:", "",
                    markdown_table(["", *doms, "all"], [["in-sample", *[cell(tr, d) for d in doms], cell(tr, "all")],
                                                        ["held-out", *[cell(ho, d) for d in doms], cell(ho, "all")]]),
                    ""]
    goal = []
    for k in a["goal_ks"]:
        r = next((s for s in summary if s["name"] == "reference" and s["k"] == k), None)
        for name, label in (("default", "old default"), (NEW_DEFAULT, "new default")):
            d = next((s for s in summary if s["name"] == name and s["k"] == k), None)
            if d and r:
                goal.append([k, label, f"{pm(d, 'nmse_raw')} vs {pm(r, 'nmse_raw')}", verdict(d, r, "nmse_raw"),
                             f"{pm(d, 'kl')} vs {pm(r, 'kl')}", verdict(d, r, "kl")])
    if goal:
        out += [f"Goal: the default at least as good as the reference recipe on held-out NMSE and KL, beyond the "
                f"seed spread (old default = before this study; new default = `{NEW_DEFAULT}`, the default of "
                "routesae/recipe.py now):", "",
                markdown_table(["k", "recipe", "NMSE vs reference", "", "KL/token vs reference", ""], goal), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--corpus", default=str(DEMO_CORPUS))
    ap.add_argument("--store", help="an existing training store (default: capture --tokens into OUT/store)")
    ap.add_argument("--tokens", type=int, default=262_144, help="tokens captured into the training store")
    ap.add_argument("--train-tokens", type=int, default=524_288)
    ap.add_argument("--latents", type=int, default=1536)
    ap.add_argument("--arch", default="routesae")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[32], help="k of the full ablation")
    ap.add_argument("--goal-ks", type=int, nargs="+", default=[16, 32, 64], help="k of default vs reference")
    ap.add_argument("--eval-tokens", type=int, default=32_768)
    ap.add_argument("--splice-contexts", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--rows", nargs="+", help="only these rows (names as in the table)")
    ap.add_argument("--name", default="demo", help="names the RESULTS section (recipe-ablation-NAME)")
    ap.add_argument("--out", help="default runs/recipe-ablation (demo) or runs/recipe-ablation-NAME")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if {**OLD_DEFAULT, **CANDIDATES[NEW_DEFAULT], "router": "ste"} != recipe_options("default"):
        raise SystemExit(f"NEW_DEFAULT ({NEW_DEFAULT}) no longer matches the default of routesae/recipe.py")
    args.out = args.out or ("runs/recipe-ablation" if args.name == "demo" else f"runs/recipe-ablation-{args.name}")
    out = Path(args.out)
    t0 = time.perf_counter()
    store, val = capture_stores(args.model, args.corpus, out, args.tokens, args.eval_tokens, args.store)
    rows = []
    plan = [(k, n, o) for k in dict.fromkeys(args.ks + args.goal_ks)
            for n, o in variants(k, True, args.rows).items() if k in args.ks or n in GOAL_ROWS]
    for seed in args.seeds:  # seed-major: a partial run already has every row once
        for k, name, opts in plan:
            rows.append(one_run(args, store, val, name, opts, k, seed))
            r = rows[-1]
            print(f"[{time.perf_counter() - t0:6.0f}s] {name:36s} k={k:3d} s={seed} nmse={r['nmse']:.4f} "
                  f"raw={r['nmse_raw']:.4f} kl={r['kl']:.4f} H={r['entropy']:.2f}", flush=True)
    from routesae.store import Store

    s = Store(store)
    cmd = "python analyses/recipe_ablation.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    model = "data/demo-moe" if args.model == str(DEMO_MODEL) else args.model
    res = {"command": cmd, "args": vars(args), "model": model,
           "store_tokens": s.n_tokens, "layers": s.layers, "rows": rows,
           "summary": summarise(rows)}
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    print(text)
    if not args.no_write:
        section = "recipe-ablation" + ("" if args.name == "demo" else f"-{args.name}")
        write_section(ROOT / "docs" / "RESULTS.md", section, text)


if __name__ == "__main__":
    main()
