"""The balance, baseline and ownership sections of MODEL_CARD.md (numbers from :mod:`routesae.zoo.card_balance`)."""

from __future__ import annotations

from routesae.zoo.card_balance import OWN_MIN_LOAD, OWN_SELECTIVITY, STARVED

GOAL_AUX = 5.0  # per-layer Switch aux (k = balanced)
GOAL_GAP = 1.6  # nats below the unigram baseline
GOAL_STARVED = 1  # experts per layer allowed below STARVED x uniform


def goals(card: dict) -> dict[str, bool]:
    """The demo MoE's balance and quality goals (issue 15), evaluated on this card's numbers."""
    b = card["balance"]
    mv = b["mean_val"]
    return {
        "starved": all(len(r["starved"]) <= GOAL_STARVED for r in b["layers"]),
        "aux": all(r["switch_aux"] <= GOAL_AUX for r in b["layers"]),
        "gap": mv["unigram_domain"] - mv["model"] >= GOAL_GAP,
    }


def _yes(ok: bool) -> str:
    return "met" if ok else "**not met**"


def balance_markdown(card: dict) -> str:
    b, prev = card["balance"], card.get("previous")
    k, E = b["k"], b["E"]
    mv = b["mean_val"]
    g = goals(card)
    pl = {r["layer"]: r for r in (prev or {}).get("layers", [])}
    pv = f" ({prev['label']})" if prev else ""
    lines = [
        "## Load balance per layer", "",
        f"On the validation slice ({b['tokens']:,} tokens, BOS left out). Load of expert i = fraction of tokens "
        f"whose top-{k} includes it (uniform: k/E = {k / E:.3f}); Switch aux = E x sum_i load_i x mean "
        f"router probability_i ({k} when balanced, larger when a few experts take most tokens); starved = experts "
        f"below {STARVED:.0%} of the uniform load, dead = never selected."
        + (f" Columns marked {prev['label']} are the previous shipped model on the same tokens." if prev else ""),
        "",
        "| layer | min load / uniform | max load / uniform | starved | dead | Switch aux |"
        + (f" min load{pv} | starved{pv} | dead{pv} | Switch aux{pv} |" if prev else ""),
        "|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if prev else ""),
    ]
    for r in b["layers"]:
        row = (f"| {r['layer']} | {r['min_load_ratio']:.2f} | {r['max_load_ratio']:.2f} | {len(r['starved'])} | "
               f"{len(r['dead'])} | {r['switch_aux']:.2f} |")
        if prev and r["layer"] in pl:
            p = pl[r["layer"]]
            row += f" {p['min_load_ratio']:.2f} | {p['starved']} | {p['dead']} | {p['switch_aux']:.2f} |"
        lines.append(row)
    lines += [
        "", "## Validation loss against unigram baselines", "",
        "Token-weighted mean over the validation slice's domains (nats per token). Unigram baselines on the same "
        "targets: global = the train split's token frequencies; per-domain = each domain's own train-split "
        "frequencies (knows every token's domain); in-sample per-domain = each domain's frequencies on the slice "
        "itself (no unigram model can do better on these tokens).", "",
        "| model | mean loss | global unigram | per-domain unigram | in-sample per-domain unigram |",
        "|---|---:|---:|---:|---:|",
        f"| this model | {mv['model']:.3f} | {mv['unigram_global']:.3f} | {mv['unigram_domain']:.3f} | "
        f"{mv['unigram_domain_in_sample']:.3f} |",
    ]
    if prev:
        pm = prev["mean_val"]
        lines.append(f"| {prev['label']} | {pm['model']:.3f} | {pm['unigram_global']:.3f} | "
                     f"{pm['unigram_domain']:.3f} | {pm.get('unigram_domain_in_sample', float('nan')):.3f} |")
        lines += ["", f"Per domain (this model vs {prev['label']}):", "", f"| domain | this model | {prev['label']} |",
                  "|---|---:|---:|"]
        for d, v in card["val"].items():
            lines.append(f"| {d} | {v['loss']:.3f} | {prev['val'].get(d, float('nan')):.3f} |")
    lines += [
        "", "Goals (issue 15):", "",
        f"- no expert below {STARVED:.0%} of the uniform load, or at most {GOAL_STARVED} per layer: "
        f"{_yes(g['starved'])} "
        f"(most starved at any layer: {max(len(r['starved']) for r in b['layers'])})",
        f"- per-layer Switch aux <= {GOAL_AUX:g}: {_yes(g['aux'])} (largest "
        f"{max(r['switch_aux'] for r in b['layers']):.2f})",
        f"- mean validation loss >= {GOAL_GAP:g} nats below the per-domain unigram: {_yes(g['gap'])} "
        f"({mv['unigram_domain'] - mv['model']:.2f} below; {mv['unigram_global'] - mv['model']:.2f} below the global "
        f"unigram, {mv['unigram_domain_in_sample'] - mv['model']:.2f} below the in-sample per-domain unigram)",
        "", "## Experts that own domains (selectivity)", "",
        f"selectivity(i, D) = share of D's tokens routed to expert i / expert i's load over all tokens: 1 for an "
        f"expert that serves every domain alike (a hub, however busy), {OWN_SELECTIVITY:g} when it is twice as "
        f"frequent in D as overall. Owners: selectivity >= {OWN_SELECTIVITY:g} and load >= {OWN_MIN_LOAD:g} x "
        "uniform, strongest first (up to 3 per domain shown).", "",
    ]
    L = len(b["layers"])
    for layer in sorted({L // 2, L - 1}):
        owners = b["layers"][layer]["owners"]
        by_dom: dict[str, list[dict]] = {}
        for o in owners:
            by_dom.setdefault(o["domain"], []).append(o)
        lines += [f"### layer {layer} ({len({o['expert'] for o in owners})} experts own at least one domain)", "",
                  "| domain | owners: expert (selectivity, share of the domain's tokens) |", "|---|---|"]
        for d in sorted(card["val"]):
            os_ = by_dom.get(d, [])[:3]
            lines.append(f"| {d} | " + (", ".join(f"E{o['expert']} ({o['selectivity']:.1f}, {o['share']:.2f})"
                                                     for o in os_) or "none") + " |")
        lines.append("")
    return "\n".join(lines)
