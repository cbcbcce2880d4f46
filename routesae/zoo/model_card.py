"""MODEL_CARD.md and card.json for a model trained by :mod:`routesae.zoo.train_lm`.

Numbers (all on the trainer's fixed validation slice, natural-log cross-entropy):

- per-domain validation loss next to a unigram baseline: the cross-entropy of the train split's
  token frequency distribution (add-one smoothing over the vocabulary) on the same target tokens;
- two greedy continuations per domain, each from a short prompt (the first tokens of one of the
  domain's first two validation documents);
- domain specialisation (REFERENCE §7) at the first, middle and last layer: for domain D and
  expert i the fraction of D's tokens whose top-k (softmax over the router logits, then top-k, as
  OLMoE routes) includes i, ``N_k(E_i, D) / N_D``, against the uniform baseline ``k / E``; plus
  the top-1 variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from routesae.atomic import atomic_write_json, atomic_write_text
from routesae.zoo.card_markdown import balance_markdown

PROMPT_TOKENS = 12


def domain_routing(model, vs, device, layers: list[int]) -> dict:
    """Counts of top-k and top-1 membership per (layer, domain, expert) and tokens per domain (BOS included)."""
    from routesae.zoo.card_balance import routing_counts

    return routing_counts(model, vs, device, layers=layers, bos=True)


@torch.no_grad()
def greedy_samples(model, tokenizer, vs, device, max_new_tokens: int) -> dict[str, list[dict]]:
    was = model.training
    model.eval()
    out: dict[str, list[dict]] = {}
    for d in vs.domains:
        for text in vs.first_docs.get(d, [])[:2]:
            p_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
            ids = torch.tensor([[tokenizer.bos_token_id] + p_ids], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            out.setdefault(d, []).append({"prompt": tokenizer.decode(p_ids),
                                          "continuation": tokenizer.decode(gen[0, ids.shape[1]:].tolist())})
    model.train(was)
    return out


def _curve(log_path: Path) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    if log_path.exists():
        for ln in log_path.read_text().splitlines():
            if ln.strip():
                r = json.loads(ln)
                (val if "val" in r else train).append(r)
    if len(train) > 8:
        n = len(train)
        picks = sorted({0, n // 100, n // 20, n // 10, n // 4, n // 2, 3 * n // 4, n - 1})
        train = [train[i] for i in picks]
    return train, val


def _md(s: str) -> str:
    return s.replace("```", "'''")


def compact_balance(bal: dict, val: dict, label: str) -> dict:
    """The numbers a later card shows next to its own ("previous model"): per layer and per domain."""
    return {"label": label, "mean_val": bal["mean_val"],
            "val": {d: round(v["loss"], 4) for d, v in val.items()},
            "layers": [{k: r[k] for k in ("layer", "min_load_ratio", "switch_aux")} | {
                "starved": len(r["starved"]), "dead": len(r["dead"])} for r in bal["layers"]]}


def write_model_card(model, tokenizer, cfg, vs, out: Path, params: dict, device, previous: dict | None = None) -> dict:
    """Measure and write MODEL_CARD.md + card.json; ``previous``: a :func:`compact_balance` of an earlier model.

    Without ``previous``, the one already in ``out/card.json`` (if any) is kept.
    """
    from routesae.zoo.card_balance import measure
    from routesae.zoo.train_lm import val_losses

    out = Path(out)
    c = model.config
    L = c.num_hidden_layers
    layers = sorted({0, L // 2, L - 1})
    val = val_losses(model, vs, device)
    r = domain_routing(model, vs, device, layers)
    samples = greedy_samples(model, tokenizer, vs, device, cfg.sample_tokens)
    bal = measure(model, tokenizer, cfg, vs, device, val)  # also the unigram baselines (one pass over train)
    uni = {d: v["global"] for d, v in bal["unigram"].items()}
    if previous is None and (out / "card.json").exists():
        try:
            previous = json.loads((out / "card.json").read_text()).get("previous")
        except (OSError, ValueError):
            previous = None
    train_curve, val_curve = _curve(out / "train_log.jsonl")
    E, k = r["E"], r["k"]
    uniform = k / E

    routing: dict = {"layers": layers, "E": E, "k": k, "uniform": uniform, "uniform_top1": 1 / E,
                     "tokens": {d: int(r["n_d"][i]) for i, d in enumerate(vs.domains)}, "per_layer": {}}
    for li, layer in enumerate(layers):
        per = {}
        for di, d in enumerate(vs.domains):
            n = max(int(r["n_d"][di]), 1)
            share = r["topk"][li, di] / n
            share1 = r["top1"][li, di] / n
            top = np.argsort(-share, kind="stable")[:3]
            per[d] = {"share": [round(float(x), 5) for x in share],
                      "share_top1": [round(float(x), 5) for x in share1],
                      "top3": [[int(e), round(float(share[e]), 4)] for e in top],
                      "max_ratio": round(float(share.max() / uniform), 3)}
        routing["per_layer"][str(layer)] = per

    tokens_seen = (train_curve[-1]["tokens"] if train_curve else 0)
    card = {
        "architecture": {"class": "OlmoeForCausalLM", "layers": L, "d_model": c.hidden_size,
                         "heads": c.num_attention_heads, "experts": E, "top_k": k,
                         "expert_intermediate": c.intermediate_size, "vocab": c.vocab_size,
                         "ctx": cfg.ctx, "tied_embeddings": bool(c.tie_word_embeddings)},
        "params": params, "tokens_seen": tokens_seen, "preset": cfg.preset,
        "train": {"steps": cfg.total_steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                  "warmup_steps": cfg.warmup_steps, "aux_loss_coef": cfg.aux_loss_coef, "z_loss_coef": cfg.z_loss_coef,
                  "balance": getattr(cfg, "balance", "pooled"),
                  "tok_s_mean": round(float(np.mean([t["tok_s"] for t in train_curve])), 1) if train_curve else None},
        "train_curve": train_curve, "val_curve": val_curve,
        "val": {d: {"loss": round(val[d]["loss"], 4), "unigram": round(uni[d], 4), "tokens": val[d]["tokens"]}
                for d in vs.domains},
        "samples": samples, "routing": routing, "balance": bal, "previous": previous,
    }
    atomic_write_json(out / "card.json", card)
    atomic_write_text(out / "MODEL_CARD.md", _markdown(card, cfg) + balance_markdown(card))
    return card


def _markdown(card: dict, cfg) -> str:
    a, p, r = card["architecture"], card["params"], card["routing"]
    lines = [
        "# demo-moe: a small OLMoE-architecture Mixture-of-Experts language model",
        "",
        "Trained from scratch by `routesae zoo train-lm` (`python -m routesae.zoo.train_lm`, preset "
        f"`{card['preset']}`) on the routesae demo corpus (`{cfg.corpus}`). A standard Hugging Face "
        "`OlmoeForCausalLM`: load it with `AutoModelForCausalLM.from_pretrained(\"data/demo-moe\")`. "
        "It exists to be interpreted (routing, experts, RouteSAE), not to be used for anything else.",
        "",
        "## Architecture",
        "",
        f"- {a['layers']} decoder layers, d_model {a['d_model']}, {a['heads']} attention heads, context {a['ctx']}",
        f"- every layer an MoE block: {a['experts']} experts, top-{a['top_k']} routing (softmax over all "
        f"experts, then top-k, no renormalisation), expert hidden size {a['expert_intermediate']} (SwiGLU)",
        f"- vocabulary {a['vocab']} (byte-level BPE, `<|bos|>` starts every document), "
        f"{'tied' if a['tied_embeddings'] else 'untied'} input/output embeddings",
        f"- parameters: **{p['total']:,}** total, {p['active_per_token']:,} active per token, "
        f"{p['experts']:,} in experts, {p['embedding']:,} per embedding matrix",
        "",
        "## Training",
        "",
        f"- tokens seen: **{card['tokens_seen']:,}** ({card['train']['steps']} steps x {card['train']['batch_size']} "
        f"contexts x {a['ctx']} tokens)",
        f"- AdamW (betas {tuple(cfg.betas)}, weight decay {cfg.weight_decay}), peak lr {cfg.lr}, "
        f"{cfg.warmup_steps} warm-up steps then cosine decay to {cfg.min_lr_ratio} x peak, "
        f"gradient clipping {cfg.grad_clip}",
        f"- load-balancing auxiliary loss x {cfg.aux_loss_coef}: "
        + ("the Switch loss of each MoE layer, summed over layers (logged per layer: about "
           f"{a['top_k']} when balanced)" if card["train"]["balance"] == "per_layer" else
           "the Switch loss of all layers' router outputs pooled, as transformers' `load_balancing_loss_func` "
           f"computes it (about {a['top_k']} when balanced)")
        + f", router z-loss x {cfg.z_loss_coef}",
        f"- mean training throughput: {card['train']['tok_s_mean']} tokens/s",
        "",
        "Training curve (mean over each logging window):",
        "",
        "| step | tokens | loss | cross-entropy | aux (balance) | router z | lr |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in card["train_curve"]:
        lines.append(f"| {t['step']} | {t['tokens']:,} | {t['loss']:.3f} | {t['ce']:.3f} | {t['aux']:.3f} | "
                     f"{t['z']:.2f} | {t['lr']:.2e} |")
    if card["val_curve"]:
        doms = sorted(card["val"])
        lines += ["", "Validation loss during training (nats per token):", "",
                  "| step | " + " | ".join(doms) + " |", "|---:|" + "---:|" * len(doms)]
        for v in card["val_curve"]:
            lines.append(f"| {v['step']} | " + " | ".join(f"{v['val'].get(d, float('nan')):.3f}" for d in doms) + " |")
    lines += ["", "## Validation loss per domain", "",
              "Cross-entropy in nats per token on a fixed validation slice (each target token counted in its own "
              "document's domain; BOS targets left out). Unigram = the train split's token frequencies (add-one "
              "smoothing) on the same tokens.", "",
              "| domain | tokens | model | unigram | model - unigram |", "|---|---:|---:|---:|---:|"]
    for d, v in card["val"].items():
        gap = v["loss"] - v["unigram"]
        lines.append(f"| {d} | {v['tokens']:,} | {v['loss']:.3f} | {v['unigram']:.3f} | {gap:+.3f} |")
    lines += ["", "## Greedy samples", "",
              f"Two prompts per domain (the first {PROMPT_TOKENS} tokens of a validation document), "
              f"{cfg.sample_tokens} greedy tokens each; the prompt is in brackets.", ""]
    for d, ss in card["samples"].items():
        lines.append(f"**{d}**")
        lines.append("")
        for s in ss:
            lines += ["```text", _md(f"[{s['prompt']}]{s['continuation']}"), "```"]
        lines.append("")
    lines += ["## Domain specialisation of experts", "",
              f"Share of a domain's validation tokens whose top-{r['k']} includes expert i, `N_k(E_i, D) / N_D` "
              f"(REFERENCE §7); uniform baseline k/E = {r['uniform']:.3f}. For each domain the three experts with the "
              "largest share, and the largest share divided by the uniform baseline. Full vectors (and the top-1 "
              "variant) are in `card.json`.", ""]
    for layer in r["layers"]:
        per = r["per_layer"][str(layer)]
        lines += [f"### layer {layer}", "", "| domain | tokens | top-3 experts (share) | max share / (k/E) |",
                  "|---|---:|---|---:|"]
        for d, v in per.items():
            tops = ", ".join(f"E{e} ({s:.2f})" for e, s in v["top3"])
            lines.append(f"| {d} | {r['tokens'][d]:,} | {tops} | {v['max_ratio']:.2f} |")
        lines.append("")
    lines.append("Which experts own a domain, by selectivity rather than share, is in the section below.")
    lines.append("")
    return "\n".join(lines) + "\n"


def regenerate(folder: str | Path, previous: dict | None = None) -> dict:
    """Rewrite MODEL_CARD.md and card.json of a finished training folder from its saved model.

    ``previous``: numbers of an earlier model to show beside this one (:func:`compact_balance`, or a
    card.json whose ``balance`` and ``val`` it is made from); default: the ones already in the card.
    """
    from transformers import AutoModelForCausalLM

    from routesae.zoo.train_lm import TrainLMConfig, count_params, load_tokenizer, val_slice

    folder = Path(folder)
    saved = json.loads((folder / "train_config.json").read_text())
    cfg = TrainLMConfig(**{k: v for k, v in saved.items() if k in TrainLMConfig.__dataclass_fields__})
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.set_experts_implementation("eager")  # exact and available everywhere
    return write_model_card(model, tokenizer, cfg, val_slice(cfg, tokenizer), folder, params=count_params(model),
                            device=torch.device("cpu"), previous=previous)


def measure_folder(folder: str | Path, cfg) -> dict:
    """:func:`compact_balance` of any saved demo-moe folder on ``cfg``'s validation slice (e.g. the previous model)."""
    from transformers import AutoModelForCausalLM

    from routesae.zoo.card_balance import measure
    from routesae.zoo.train_lm import load_tokenizer, val_losses, val_slice

    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.set_experts_implementation("eager")
    vs = val_slice(cfg, tokenizer)
    val = val_losses(model, vs, torch.device("cpu"))
    return measure(model, tokenizer, cfg, vs, torch.device("cpu"), val) | {"val": val}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Rewrite MODEL_CARD.md and card.json of a trained demo-moe folder")
    ap.add_argument("folder")
    ap.add_argument("--previous", help="a measure JSON (measure_folder's output) of the model this one replaces")
    ap.add_argument("--previous-label", default="previous")
    a = ap.parse_args()
    prev = None
    if a.previous:
        m = json.loads(Path(a.previous).read_text())
        prev = compact_balance(m, m["val"], a.previous_label)
    regenerate(a.folder, prev)
