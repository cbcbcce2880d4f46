"""Dynamic routing on the demo MoE: the tables of docs/RESULTS.md and docs/figures/dynamic-routing-demo.png.

    routesae analyze-routing data/demo-moe --corpus data/corpus --split val --max-tokens 4096 \\
        --ablate-layers 1,4,7 --device cpu --out runs/routing-demo
    python analyses/dynamic_routing.py runs/routing-demo [--png docs/figures/dynamic-routing-demo.png]

Prints Markdown tables (needed experts by domain at the headline epsilon, compute saved at each
epsilon, mean experts per token under top-p, the experts each domain depends on) and draws the
needed-experts and top-p distributions by domain (matplotlib, small PNG).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from routesae.report.markdown import md_table  # noqa: E402
from routesae.report.routing import load_routing, needed_experts_table, top_ablations  # noqa: E402


def tables(folder: str) -> str:
    r = load_routing(folder)
    if r is None:
        raise SystemExit(f"{folder} holds no analyze-routing results (summary.json)")
    s = r.summary
    out = [f"{s['tokens']:,} tokens, top-{s['top_k']} of {s['n_experts']} experts, {s['seconds']:.0f} s "
           f"({s['tokens_per_second']:.1f} tokens/s)\n\n",
           f"**Needed experts by domain** (fraction of tokens; eps {r.eps:g} nats)\n\n",
           md_table(needed_experts_table(r), digits=3)]
    cs = r.table("compute_saved")
    cs = cs[(cs.scope == "all") & (cs.domain == "all")]
    out += ["\n**Compute saved** (1 - mean needed k' / k, all domains)\n\n",
            md_table(cs[["eps", "mean_needed_k", "compute_saved"]], digits=3)]
    cs = r.table("compute_saved")
    by_layer = cs[(cs.scope == "layer") & np.isclose(cs.eps, r.eps) & (cs.domain == "all")]
    if not by_layer.empty:
        out += [f"\n**Needed k' with the override at one layer only** (eps {r.eps:g}, all domains)\n\n",
                md_table(by_layer[["layer", "mean_needed_k", "compute_saved"]], digits=3)]
    topp = r.table("topp")
    wide = topp.pivot_table(index="domain", columns="p", values="mean_experts")
    wide.columns = [f"p={c:g}" for c in wide.columns]
    out += ["\n**Mean experts per token under top-p** (all MoE layers)\n\n", md_table(wide.reset_index(), digits=2)]
    loss = r.table("loss_by_k").pivot_table(index="domain", columns="k", values="ce_increase")
    loss.columns = [f"k'={c}" for c in loss.columns]
    out += ["\n**CE increase (nats) under top-k' at every MoE layer**\n\n", md_table(loss.reset_index(), digits=4)]
    out += ["\n**Experts each domain depends on** (largest CE increase when removed)\n\n",
            md_table(top_ablations(r, 2), digits=4)]
    return "".join(out)


def figure(folder: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = load_routing(folder)
    ne = r.table("needed_experts")
    ne = ne[(ne.scope == "all") & np.isclose(ne.eps, r.eps) & (ne.domain != "all")]
    ept = r.table("experts_per_token")
    ept = ept[np.isclose(ept.p.astype(float), 0.5) & (ept.domain != "all")]
    doms = sorted(ne.domain.unique())
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=90)
    for ax, d, col, title in ((a1, ne, "needed_k", f"needed k' (KL <= {r.eps:g} nats)"),
                              (a2, ept, "n_active", "experts per token under top-p 0.5")):
        values = sorted(d[col].unique())
        width = 0.8 / max(len(doms), 1)
        for i, dom in enumerate(doms):
            g = d[d.domain == dom].groupby(col)["tokens"].sum().reindex(values, fill_value=0)
            ax.bar(np.arange(len(values)) + i * width, g / g.sum(), width, label=dom)
        ax.set_xticks(np.arange(len(values)) + 0.4 - width / 2, [str(v) for v in values])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("fraction of tokens" if ax is a1 else "fraction of token-layers")
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png)
    print(f"wrote {png}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="an analyze-routing --out folder")
    ap.add_argument("--png", help="also draw the figure here")
    args = ap.parse_args()
    pd.set_option("display.width", 200)
    print(tables(args.folder))
    if args.png:
        figure(args.folder, args.png)


if __name__ == "__main__":
    main()
