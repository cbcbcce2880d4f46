"""Causal tools on the demo MoE (issue 20): expert boosting from a domain contrast, feature clamping.

    python analyses/causal_study.py [--run runs/demo/full/routesae] [--a math] [--b legal]
        [--contexts 32] [--ctx 128] [--out runs/causal-study] [--write]

1. Contrast (``routesae contrast data/demo-moe --a math --b legal --corpus data/corpus --split train``):
   every (layer, expert) ranked by rate_math - rate_legal on the *train* split.
2. Expert boosting, measured on *held-out* (val split) math and legal text: the top N experts of the
   contrast get a router-logit bias B (``bias:E=B@layerL``); per context, the mean next-token loss and
   the mean probability mass on *math tokens* (tokens at least 5x more frequent in train math than in
   the other train domains, count >= 20), steered minus clean, mean +- standard error over contexts.
   Controls: N random (layer, expert) pairs with the same bias (3 draws), and the top N forbidden.
3. Feature clamping: the live RouteSAE latents whose logit-lens top-5 tokens stand out most (the
   top-5 logits' mean in standard deviations above all logits of that direction); each clamped to
   c x its max activation (``routesae steer --feature L=V``) at every token of held-out text (val
   split, all domains); the mean probability of its 5 logit-lens tokens, clean and clamped, and the
   same for a random live latent clamped to the same value (control).

Writes ``OUT/causal.json`` and prints the Markdown tables; ``--write`` puts them into the
``causal`` section of ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_steps import DEMO_CORPUS, DEMO_MODEL, ROOT, markdown_table, write_section  # noqa: E402

from routesae.causal import Steering, steered_logits  # noqa: E402
from routesae.causal.contrast import contrast_to_folder, read_side  # noqa: E402
from routesae.corpus import CorpusConfig, iter_documents  # noqa: E402
from routesae.models.load import ModelConfig, load_model  # noqa: E402
from routesae.sae import load_sae  # noqa: E402

TOPS, BIASES, CLAMPS = (4, 8, 16), (0.5, 1.0, 2.0, 4.0), (1.0, 3.0, 10.0)


def contexts(tok, texts: list[str], n: int, ctx: int) -> torch.Tensor:
    """Up to ``n`` contexts of exactly ``ctx`` tokens (BOS + the first tokens of each long enough text)."""
    rows = []
    for t in texts:
        ids = [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= ctx:
            rows.append(ids[:ctx])
        if len(rows) == n:
            break
    return torch.tensor(rows)


@torch.no_grad()
def per_context(model, ids: torch.Tensor, steering: Steering | None, targets: torch.Tensor,
                batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per context: mean next-token loss and mean probability mass on ``targets`` (over positions 1..T-1)."""
    loss, mass = [], []
    for s in range(0, ids.shape[0], batch):
        x = ids[s:s + batch]
        logp = torch.log_softmax(steered_logits(model, x, steering).logits[:, :-1], -1)
        loss.append(-logp.gather(-1, x[:, 1:, None])[..., 0].mean(1).double().numpy())
        mass.append(logp[..., targets].exp().sum(-1).mean(1).double().numpy())
    return np.concatenate(loss), np.concatenate(mass)


def pm(d: np.ndarray, spec: str = "+.4f") -> str:
    return f"{d.mean():{spec}} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f}"


def math_tokens(tok, a: str, max_docs: int = 150, min_count: int = 20, ratio: float = 5.0) -> torch.Tensor:
    """Token ids at least ``ratio`` x more frequent in train ``a`` than in the other train domains."""
    per: dict[str, list[str]] = {}
    for d in iter_documents(CorpusConfig(str(DEMO_CORPUS), split="train", shuffle=False)):
        if len(per.setdefault(d.domain, [])) < max_docs:
            per[d.domain].append(d.text)
    v = len(tok)
    counts = {dom: np.bincount(np.concatenate([tok(t, add_special_tokens=False)["input_ids"] for t in texts]),
                               minlength=v) for dom, texts in per.items()}
    mine = counts[a].astype(float)
    rest = sum(c for dom, c in counts.items() if dom != a).astype(float)
    f_mine, f_rest = mine / mine.sum(), (rest + 1) / rest.sum()
    keep = (mine >= min_count) & (f_mine / f_rest >= ratio)
    return torch.from_numpy(np.nonzero(keep)[0])


def expert_part(args, model, tok) -> dict:
    t0 = time.time()
    table, info = contrast_to_folder(str(DEMO_MODEL), args.a, args.b, Path(args.out) / "contrast",
                                     corpus=str(DEMO_CORPUS), split="train", max_docs=400, max_tokens=65536,
                                     lm=model, tokenizer=tok)
    targets = math_tokens(tok, args.a)
    held = {d: contexts(tok, read_side(d, str(DEMO_CORPUS), "val", 200).texts, args.contexts, args.ctx)
            for d in (args.a, args.b)}
    clean = {d: per_context(model, x, None, targets) for d, x in held.items()}
    rows, rng = [], np.random.default_rng(0)
    layers = sorted(table["layer"].unique())
    E = int(table["expert"].max()) + 1

    def setting(pairs, bias, mode="bias") -> str:
        by: dict[int, list[int]] = {}
        for layer, e in pairs:
            by.setdefault(int(layer), []).append(int(e))
        if mode == "forbid":
            return ";".join(f"forbid:{','.join(map(str, sorted(es)))}@layer{layer}" for layer, es in sorted(by.items()))
        return ";".join(f"bias:{','.join(f'{e}={bias:g}' for e in sorted(es))}@layer{layer}"
                        for layer, es in sorted(by.items()))

    def run(label: str, n: int, bias: float | None, override: str) -> None:
        s = Steering.build(experts=override, model=model)
        row = {"setting": label, "top": n, "bias": bias, "override": override}
        for d, x in held.items():
            loss, mass = per_context(model, x, s, targets)
            row[f"dloss_{d}"] = loss - clean[d][0]
            row[f"dmass_{d}"] = mass - clean[d][1]
        rows.append(row)

    for n in TOPS:
        top = list(zip(table["layer"].head(n), table["expert"].head(n)))
        for bias in BIASES:
            run(f"top {n} ({args.a}-linked), bias {bias:g}", n, bias, setting(top, bias))
        run(f"top {n} ({args.a}-linked) forbidden", n, None, setting(top, 0, "forbid"))
        for draw in range(3):
            pick = rng.choice(len(layers) * E, n, replace=False)
            rnd = [(layers[i // E], i % E) for i in pick]
            run(f"random {n} (draw {draw}), bias 2", n, 2.0, setting(rnd, 2.0))
    return {"contrast": table.head(16).to_dict("records"), "contrast_info": info, "math_tokens": len(targets),
            "math_token_examples": [tok.decode([int(i)]) for i in targets[:30]],
            "held_contexts": {d: int(x.shape[0]) for d, x in held.items()}, "ctx": args.ctx,
            "clean": {d: {"loss": float(v[0].mean()), "mass": float(v[1].mean())} for d, v in clean.items()},
            "rows": rows, "seconds": round(time.time() - t0, 1)}


def feature_part(args, model, tok) -> dict:
    t0 = time.time()
    run = ROOT / args.run if not Path(args.run).is_absolute() else Path(args.run)
    sae = load_sae(run).eval()
    lat = pd.read_parquet(run / "analysis" / "latents.parquet")
    w_u = model.get_output_embeddings().weight.detach().float()
    logits = (sae.W_dec.detach().float() * model.model.norm.weight.detach().float()) @ w_u.t()  # [M, V]
    top = logits.topk(5, dim=1)
    z = (top.values.mean(1) - logits.mean(1)) / logits.std(1)
    live = torch.from_numpy((lat.sort_values("latent")["density"] >= 0.001).to_numpy().copy())
    order = torch.argsort(torch.where(live, z, torch.tensor(-1e9)), descending=True)
    chosen = [int(i) for i in order[: args.features]]
    texts = [d.text for d in iter_documents(CorpusConfig(str(DEMO_CORPUS), split="val", seed=1))]
    held = contexts(tok, texts, args.contexts, args.ctx)
    rng = np.random.default_rng(1)
    live_ids = torch.nonzero(live).squeeze(-1).numpy()
    rows = []
    for latent in chosen:
        targets = top.indices[latent]
        _, base = per_context(model, held, None, targets)
        max_act = float(lat.loc[lat["latent"] == latent, "max_act"].iloc[0])
        control = int(rng.choice(np.setdiff1d(live_ids, chosen)))
        for c in CLAMPS:
            value = c * max_act
            _, clamped = per_context(model, held, Steering.build(sae, f"{latent}={value:.4f}"), targets)
            _, ctrl = per_context(model, held, Steering.build(sae, f"{control}={value:.4f}"), targets)
            rows.append({"latent": latent, "tokens": [tok.decode([int(i)]) for i in targets], "z": float(z[latent]),
                         "max_act": max_act, "clamp": c, "value": value, "p_clean": base,
                         "d_clamped": clamped - base, "control": control, "d_control": ctrl - base})
    return {"features": chosen, "contexts": int(held.shape[0]), "ctx": args.ctx, "rows": rows,
            "seconds": round(time.time() - t0, 1)}


def markdown(res: dict, args) -> str:
    ex, ft = res["experts"], res["features"]
    a, b = args.a, args.b
    info = ex["contrast_info"]
    out = [f"Contrast {a}:{b} on the train split ({info['tokens_a']:,} {a} tokens, {info['tokens_b']:,} {b} "
           f"tokens; BOS left out), top 8 experts:", ""]
    out.append(markdown_table(["rank", "layer", "expert", f"rate {a}", f"rate {b}", "risk diff"],
                              [[r["rank"], r["layer"], r["expert"], f"{r['rate_a']:.3f}", f"{r['rate_b']:.3f}",
                                f"{r['risk_diff']:+.3f}"] for r in ex["contrast"][:8]]))
    out += ["", f"Boosting on held-out (val) text: {ex['held_contexts'][a]} {a} and {ex['held_contexts'][b]} {b} "
                f"contexts of {ex['ctx']} tokens. Clean: loss {ex['clean'][a]['loss']:.4f} ({a}), "
                f"{ex['clean'][b]['loss']:.4f} ({b}); {a}-token mass {ex['clean'][a]['mass']:.4f} ({a}), "
                f"{ex['clean'][b]['mass']:.4f} ({b}); {ex['math_tokens']} {a} tokens. Changes steered - clean, "
                f"mean ± s.e. over contexts:", ""]
    out.append(markdown_table(["setting", f"Δ loss {a}", f"Δ loss {b}", f"Δ {a}-token mass on {a}",
                               f"Δ {a}-token mass on {b}"],
                              [[r["setting"], pm(np.asarray(r[f"dloss_{a}"])), pm(np.asarray(r[f"dloss_{b}"])),
                                pm(np.asarray(r[f"dmass_{a}"])), pm(np.asarray(r[f"dmass_{b}"]))]
                               for r in ex["rows"]]))
    out += ["", f"Feature clamping on {ft['contexts']} held-out contexts of {ft['ctx']} tokens (val split, all "
                f"domains): mean probability of the latent's 5 logit-lens tokens, clean and the change when clamped "
                f"to c x its max activation; control: a random live latent clamped to the same value.", ""]
    out.append(markdown_table(["latent", "logit-lens tokens", "c", "p clean", "Δ clamped", "Δ control (latent)"],
                              [[r["latent"], ", ".join(repr(t) for t in r["tokens"]), f"{r['clamp']:g}",
                                f"{np.mean(r['p_clean']):.4f}", pm(np.asarray(r["d_clamped"])),
                                f"{pm(np.asarray(r['d_control']))} ({r['control']})"] for r in ft["rows"]]))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/demo/full/routesae")
    p.add_argument("--a", default="math")
    p.add_argument("--b", default="legal")
    p.add_argument("--contexts", type=int, default=32)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--features", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "runs" / "causal-study"))
    p.add_argument("--write", action="store_true", help="write the causal section of docs/RESULTS.md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(str(DEMO_MODEL), "float32", "cpu"))
    res = {"experts": expert_part(args, model, tok), "features": feature_part(args, model, tok),
           "command": "python analyses/causal_study.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "causal.json").write_text(json.dumps(res, default=lambda x: np.asarray(x).tolist(), indent=1))
    text = markdown(res, args)
    print(text)
    if args.write:
        write_section(ROOT / "docs" / "RESULTS.md", "causal", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
