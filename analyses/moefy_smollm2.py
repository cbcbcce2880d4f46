"""Dense SmolLM2-135M vs its MoEfied Mixtral (issue 8, docs/RESULTS.md): validation loss per domain, specialisation.

    python analyses/moefy_smollm2.py [--dense smollm2] [--moe DIR] [--contexts-per-domain 4]
                                     [--spec-tokens 8192] [--out runs/moefy-results]

``--moe``: the folder ``routesae zoo moefy --from smollm2 --experts 16 --top-k 4`` wrote (default
its cache folder). Validation loss: the same fixed slice of the demo corpus's validation split
(``--contexts-per-domain`` contexts of 256 tokens per domain, the demo trainer's slicing; BOS
targets left out) through the dense model and the MoEfied one at top-k 2, 4, 8 and all experts
(:func:`routesae.zoo.moefy.set_top_k`), plus the exact plain sum at the saved k (the construction's
error). Also the largest |logit| difference between dense and all-experts on that slice.
Specialisation: a capture of the MoEfied model (its saved k) over ``--spec-tokens`` validation
tokens and the expert tables of ``routesae.analyze.experts``. Writes ``OUT/results.json`` and
``OUT/results.md`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _max_logit_diff(a, b, vs, batch: int = 4) -> float:
    worst = 0.0
    with torch.no_grad():
        for s in range(0, len(vs.ids), batch):
            ids, mask = torch.from_numpy(vs.ids[s:s + batch]), torch.from_numpy(vs.mask[s:s + batch])
            la, lb = a(input_ids=ids, attention_mask=mask).logits, b(input_ids=ids, attention_mask=mask).logits
            m = mask.bool()
            worst = max(worst, float((la[m] - lb[m]).abs().max()))
    return worst


def _md_losses(losses: dict[str, dict]) -> list[str]:
    cols = list(losses)
    domains = list(next(iter(losses.values())))
    out = ["| domain | tokens | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for d in domains:
        first = losses[cols[0]][d]
        out.append(f"| {d} | {first['tokens']} | " + " | ".join(f"{losses[c][d]['loss']:.3f}" for c in cols) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="smollm2")
    ap.add_argument("--moe")
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--contexts-per-domain", type=int, default=4)
    ap.add_argument("--spec-tokens", type=int, default=8192)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--out", default="runs/moefy-results")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from routesae.analyze.experts import expert_tables
    from routesae.capture import CaptureConfig, capture
    from routesae.models.load import ModelConfig, load_model
    from routesae.store import Store
    from routesae.zoo.moefy import MoefyConfig, mixtral_forward, plain_sum_forward, set_top_k
    from routesae.zoo.train_lm import set_experts_impl, val_losses, val_slice

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    moe_dir = Path(args.moe) if args.moe else MoefyConfig().out_dir()
    t0 = time.time()
    dense, tok = load_model(ModelConfig(args.dense, "float32", "cpu"))
    vs = val_slice(SimpleNamespace(corpus=args.corpus, ctx=256, seed=0,
                                   val_contexts_per_domain=args.contexts_per_domain), tok)
    cpu = torch.device("cpu")
    losses = {"dense": val_losses(dense, vs, cpu, batch=4)}
    t_dense = time.time() - t0
    moe = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    set_experts_impl(moe, "sorted")  # the same arithmetic as eager, faster on CPU
    k_saved, n_exp = int(moe.config.num_experts_per_tok), int(moe.config.num_local_experts)
    seconds = {"dense": t_dense}
    for k in [*args.ks, n_exp]:
        t = time.time()
        set_top_k(moe, k)
        losses[f"top-{k}" if k < n_exp else f"all {n_exp}"] = val_losses(moe, vs, cpu, batch=4)
        seconds[f"top-{k}"] = time.time() - t
        if k == n_exp:
            all_diff = _max_logit_diff(dense, moe, vs)
    set_top_k(moe, k_saved)
    t = time.time()
    plain_sum_forward(moe)
    losses[f"top-{k_saved} plain sum"] = val_losses(moe, vs, cpu, batch=4)
    mixtral_forward(moe)
    set_experts_impl(moe, "sorted")
    seconds["plain"] = time.time() - t
    for name in losses:  # an overall row: token-weighted mean over domains
        tot = sum(v["tokens"] for v in losses[name].values())
        losses[name]["all domains"] = {"loss": sum(v["loss"] * v["tokens"] for v in losses[name].values()) / tot,
                                       "tokens": tot}

    # specialisation of the saved model (its own k)
    t = time.time()
    n_layers = int(moe.config.num_hidden_layers)
    store = Store(capture(CaptureConfig(model=str(moe_dir), corpus=args.corpus, out=str(out / "store-val"),
                                        layers=str(n_layers - 1), split="val", max_tokens=args.spec_tokens, ctx=256,
                                        batch_size=4, device="cpu", progress=False), model=moe, tokenizer=tok))
    tables = expert_tables(store, min_vocab_count=10)
    seconds["specialisation"] = time.time() - t
    ls = tables["layer_stats"]
    ed = tables["expert_domain"]
    st = tables["expert_stats"]
    report = json.loads((moe_dir / "moefy.json").read_text())

    md = [f"Validation loss (nats/token) per domain, {args.contexts_per_domain} contexts x 256 tokens per domain "
          f"of the demo corpus's validation split:", "", *_md_losses(losses), "",
          f"All {n_exp} experts vs dense: largest |logit difference| on this slice {all_diff:.2e}.", "",
          f"Router recall of the true top-k experts (validation tokens, mean over {n_layers} layers): "
          + ", ".join(f"{k} {v:.3f} (random {report['random_recall'][k]:.3f})" for k, v in report["recall"].items()),
          "", f"Specialisation of the MoEfied model (top-{k_saved} of {n_exp}), {store.n_tokens} validation tokens: "
          f"per layer, load CV, normalised load entropy, and the mean over domains of the largest lift "
          f"share_topk / (k/E) of any expert:", "",
          "| layer | load CV | load entropy | domain specialisation |", "|---:|---:|---:|---:|"]
    for _, r in ls.iterrows():
        md.append(f"| {int(r.layer)} | {r.load_cv:.2f} | {r.load_entropy_norm:.3f} | {r.domain_specialisation:.2f} |")
    mid = n_layers // 2
    for layer in (n_layers // 5, mid, n_layers - 1):
        piv = ed[ed.layer == layer].pivot(index="domain", columns="expert", values="share_topk")
        md += ["", f"Layer {layer}: share of each domain's tokens whose top-{k_saved} includes expert e "
                   f"(uniform {k_saved / n_exp:.2f}):", "",
               "| domain | " + " | ".join(str(e) for e in piv.columns) + " |", "|---|" + "---:|" * len(piv.columns)]
        for d, row in piv.iterrows():
            md.append(f"| {d} | " + " | ".join(f"{v:.2f}" for v in row.to_numpy()) + " |")
    from routesae.analyze.specialists import rank_specialists

    best = rank_specialists(st[st.layer == mid]).head(5)  # by selectivity; hubs and low-load experts left out
    md += ["", f"Most specialised experts of layer {mid} by selectivity (top domain's share / the expert's share of "
               f"all tokens; hubs and experts below half the uniform load not ranked), with the lift share / (k/E), "
               f"top domain and the tokens with the highest share:", "",
           "| expert | selectivity | lift | top domain | top tokens |", "|---:|---:|---:|---|---|"]
    for _, r in best.iterrows():
        toks = ", ".join(repr(t) for t in list(r.top_tokens)[:6]).replace("|", "\\|")
        md.append(f"| {int(r.expert)} | {r.selectivity:.2f} | {r.specialisation:.2f} | {r.top_domain} | {toks} |")
    text = "\n".join(md)
    json.dump({"losses": losses, "all_experts_max_abs_logit_diff": all_diff, "seconds": seconds,
               "layer_stats": ls.replace({np.nan: None}).to_dict("records"), "moefy": report},
              open(out / "results.json", "w"), indent=1, default=str)
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\nseconds: {json.dumps({k: round(v) for k, v in seconds.items()})}")


if __name__ == "__main__":
    main()
