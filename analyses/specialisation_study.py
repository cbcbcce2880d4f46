"""The domain x expert story of the demo MoE, and three RouteSAE features with the experts they ride on.

    python analyses/specialisation_study.py [--run runs/paper-comparison/routesae-ste-k32]
        [--store runs/paper-comparison/store] [--tokens 131072] [--features 3] [--no-write]

Reads the router records of a store of the demo MoE over the demo corpus (11 domains) and a
trained RouteSAE run on it (both made by ``analyses/paper_comparison.py``; trained here with the
same settings when missing), analyses the run over the first ``--tokens`` store tokens with the
package's analysis (``routesae analyze``: expert tables and feature x expert attribution, into
``RUN/analysis/``; reused when done with the same token count) and writes:

- ``docs/specialisation.md``: which experts own code, math, scripture, multilingual text (and the
  other domains) at every MoE layer (top-k share ``N_k(E_i, D) / N_D`` against the uniform
  ``k / E``, REFERENCE §7), the load balance of every layer (CV, normalised entropy, MaxVio,
  Switch aux), collapse flags, cold-start routing (router entropy and specialisation by position
  in the document) and three features of the RouteSAE with the experts they ride on;
- ``docs/figures/specialisation-*.png``; the ``specialisation`` section of ``docs/RESULTS.md``.

All corpus text in the Markdown goes through ``routesae.report.markdown.md`` (escaped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_steps import (  # noqa: E402
    DEMO_CORPUS,
    DEMO_MODEL,
    ROOT,
    capture_stores,
    pyplot,
    savefig,
    train_once,
    write_section,
)

FOCUS = ("code", "math", "scripture", "multilingual")
FIG = ROOT / "docs" / "figures"


def prepare(args) -> Path:
    """The analysed run (trained and analysed here when missing)."""
    import json

    from routesae.analyze import AnalyzeConfig, analyze

    run = Path(args.run)
    if not (run / "sae.safetensors").exists():
        store, _ = capture_stores(str(DEMO_MODEL), str(DEMO_CORPUS), Path(args.store).parent, 409_600, 65_536,
                                  args.store if Path(args.store, "manifest.json").exists() else None)
        train_once(run, store=store, arch="routesae", router="ste", latents=1536, k=32, tokens=409_600)
    summary = run / "analysis" / "summary.json"
    if not summary.exists() or json.loads(summary.read_text()).get("tokens") != args.tokens:
        print(f"analyze {run} ({args.tokens:,} tokens)")
        analyze(AnalyzeConfig(run=str(run), tokens=args.tokens, device="cpu"))
    return run


# ---------------------------------------------------------------- derived tables


def _with_selectivity(ed: pd.DataFrame) -> pd.DataFrame:
    """``expert_domain`` plus ``base`` (the fraction of all tokens whose top-k includes the expert at its
    layer) and ``selectivity`` = share_topk / base (> 1: the domain uses the expert more than the rest)."""
    g = ed.groupby(["layer", "expert"])
    base = g["hits_topk"].transform("sum") / g["tokens"].transform("sum")
    return ed.assign(base=base, selectivity=ed["share_topk"] / base.where(base > 0))


def owners(a, domains=FOCUS, by: str = "share_topk", min_share: float = 0.25) -> pd.DataFrame:
    """Per focus domain (every domain when none is present) and MoE layer: the expert with the largest
    ``by`` (``share_topk``, or ``selectivity`` among experts with at least ``min_share``), as
    ``E<i>: share (lift, selectivity)``."""
    ed = _with_selectivity(a.expert_domain)
    present = set(ed["domain"])
    domains = [d for d in domains if d in present] or sorted(present)  # a corpus without the focus domains
    ed = ed[ed["domain"].isin(domains)]
    if by == "selectivity":
        ed = ed[ed["share_topk"] >= min_share]
    best = ed.sort_values([by, "expert"], ascending=[False, True]).groupby(["domain", "layer"], sort=True).head(1)
    cell = best.assign(cell=[f"E{int(r.expert)}: {r.share_topk:.2f} ({r.lift_topk:.1f}x, {r.selectivity:.1f}x)"
                             for r in best.itertuples()])
    return cell.pivot(index="domain", columns="layer", values="cell").reindex(domains)


def specialists(a, min_lift: float = 3.0) -> pd.DataFrame:
    """Experts whose largest domain lift is at least ``min_lift``, counted per layer and domain."""
    es = a.expert_stats
    sp = es[es["specialisation"] >= min_lift]
    return sp.groupby(["layer", "top_domain"]).size().unstack(fill_value=0)


def pick_features(a, n: int, min_share: float = 0.25) -> list[int]:
    """``n`` interpretable latents (>= 20 active tokens; domain lift >= 2 when enough have it), one per top
    domain, ranked by the highest lift of an expert at their routed MoE layer that carries at least
    ``min_share`` of their active tokens (a large lift on an expert that sees few of them says little)."""
    lat = a.latents
    cand = lat[lat["interpretable"].astype(bool) & (lat["count"] >= 20)]
    if (cand["top_domain_lift"] >= 2).sum() >= n:  # prefer latents that also track a domain
        cand = cand[cand["top_domain_lift"] >= 2]
    le = a.latent_experts
    le = le[le["at_routed_layer"].astype(bool) & (le["share"] >= min_share) & le["latent"].isin(cand["latent"])]
    best = le.groupby("latent")["lift"].max().rename("score")
    ranked = cand.merge(best, left_on="latent", right_index=True).sort_values(["score", "latent"],
                                                                              ascending=[False, True])
    chosen, seen = [], set()
    for r in ranked.itertuples():
        if r.top_domain in seen:
            continue
        chosen.append(int(r.latent))
        seen.add(r.top_domain)
        if len(chosen) == n:
            break
    return chosen


def feature_experts(a, latent: int, n: int = 3, min_share: float = 0.25) -> pd.DataFrame:
    """The ``n`` experts with the highest lift among those that carry at least ``min_share`` of the latent's
    active tokens at its routed MoE layer (the largest shares when none does)."""
    le = a.latent_experts
    g = le[(le["latent"] == latent) & le["at_routed_layer"].astype(bool)]
    big = g[g["share"] >= min_share]
    if big.empty:
        return g.sort_values(["share", "expert"], ascending=[False, True]).head(n)
    return big.sort_values(["lift", "expert"], ascending=[False, True]).head(n)


# ---------------------------------------------------------------- figures


def fig_domain_expert(a, layers: list[int]) -> Path:
    plt = pyplot()
    ed = a.expert_domain
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers) + 1, 3.3), sharey=True)
    vmax = float(np.nanmax(ed["lift_topk"])) if len(ed) else 1.0
    for i, (ax, layer) in enumerate(zip(np.atleast_1d(axes), layers)):
        m = ed[ed["layer"] == layer].pivot(index="domain", columns="expert", values="lift_topk")
        im = ax.imshow(m.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        if i == 0:
            ax.set_yticks(range(len(m.index)), list(m.index), fontsize=7)
        ax.set_xticks(range(0, m.shape[1], 4), [str(c) for c in m.columns[::4]], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"layer {layer}: top-k share / (k/E)", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="lift")
    return savefig(fig, FIG / "specialisation-domain-expert.png")


def fig_layers(a) -> Path:
    plt = pyplot()
    dl, ls = a.domain_layer, a.layer_stats.sort_values("layer")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.2))
    m = dl.pivot(index="domain", columns="layer", values="specialisation")
    im = ax1.imshow(m.to_numpy(), aspect="auto", cmap="viridis")
    ax1.set_yticks(range(len(m.index)), list(m.index), fontsize=7)
    ax1.set_xticks(range(m.shape[1]), [str(c) for c in m.columns], fontsize=7)
    ax1.set_xlabel("MoE layer", fontsize=8)
    ax1.set_title("domain specialisation (max expert lift)", fontsize=9)
    fig.colorbar(im, ax=ax1, shrink=0.8)
    for col, name in (("load_cv", "load CV"), ("max_vio", "MaxVio"), ("load_entropy_norm", "normalised entropy"),
                      ("repetition_rate", "repetition rate")):
        ax2.plot(ls["layer"], ls[col], marker="o", label=name)
    ax2.set_xlabel("MoE layer", fontsize=8)
    ax2.set_title("load balance per layer", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.tick_params(labelsize=7)
    fig.tight_layout()
    return savefig(fig, FIG / "specialisation-layers.png")


def fig_cold_start(a) -> Path:
    from routesae.report.figures import bucket_order

    plt = pyplot()
    pp = a.position_profile
    order = bucket_order(pp["bucket"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.0))
    for ax, (col, title) in zip(axes, (("router_entropy", "router entropy (nats)"),
                                       ("specialisation", "max expert share / (k/E)"))):
        for layer, g in pp.groupby("layer"):
            g = g.set_index("bucket").reindex(order)
            ax.plot(range(len(order)), g[col], marker=".", label=f"layer {layer}")
        ax.set_xticks(range(len(order)), order, fontsize=7)
        ax.set_xlabel("position in the document (BOS = 0)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return savefig(fig, FIG / "specialisation-cold-start.png")


def fig_features(a, latents: list[int]) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, max(len(latents), 1), figsize=(3.4 * max(len(latents), 1), 2.8), sharey=True)
    le, E = a.latent_experts, int(a.summary.get("n_experts") or 0)
    for ax, lat in zip(np.atleast_1d(axes), latents):
        g = le[(le["latent"] == lat) & le["at_routed_layer"].astype(bool)]
        lift = np.zeros(E)
        lift[g["expert"].to_numpy()] = g["lift"].to_numpy()
        layer = int(g["layer"].iloc[0]) if len(g) else -1
        ax.bar(range(E), lift)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"latent {lat}: experts at layer {layer}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].set_ylabel("lift (share / base share)", fontsize=8)
    fig.tight_layout()
    return savefig(fig, FIG / "specialisation-features.png")


# ---------------------------------------------------------------- Markdown


def _pivot_md(df: pd.DataFrame, md_table) -> str:
    return md_table(df.reset_index().rename(columns={c: f"layer {c}" for c in df.columns}))


def _num(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def render(a, run: Path, features: list[int], command: str) -> tuple[str, str]:
    """(docs/specialisation.md, the short RESULTS.md section)."""
    from routesae.report import facts
    from routesae.report.figures import bucket_order
    from routesae.report.load import as_list
    from routesae.report.markdown import md, md_table, plain_context

    s = a.summary
    E, k = int(s["n_experts"]), int(s["top_k"])
    dom_tokens = s.get("domains") or {}
    ls = a.layer_stats.sort_values("layer")
    own = owners(a)
    out = ["# Expert specialisation in the demo MoE", "",
           f"```\n{command}\n```", "",
           f"Router records of {s['tokens']:,} tokens of the demo corpus (training split) through the demo MoE "
           f"(8 MoE layers, E = {E} experts, top-{k}, so the uniform top-k share is k/E = {k / E:.3f}); the "
           f"features come from the RouteSAE run `{md(run.name)}` ({s['n_latents']:,} latents, "
           f"layers {s['layers']}) analysed on the same tokens. Share of domain D on expert i at a layer: "
           "`N_k(E_i, D) / N_D`, the fraction of D's tokens whose top-k includes i; lift = share / (k/E) "
           "(REFERENCE §7). Tokens per domain (the domains present in these tokens; a domain of the corpus "
           "that is missing here had too few tokens to reach them through the capture's document shuffle): "
           + ", ".join(f"{md(d)} {n:,}" for d, n in sorted(dom_tokens.items())) + ".", "",
           "## Which experts own which domains", "",
           "Two readings, per focus domain and MoE layer, as `E<expert>: share (lift, selectivity)`, where "
           "selectivity = the domain's share / the expert's share of all tokens. The lift against k/E alone "
           "cannot tell an owner from a hub: an expert in the top-k of most tokens has a large share of every "
           "domain.", "",
           "The expert with the largest top-k share of the domain:", "",
           _pivot_md(own, md_table), "",
           "The most selective expert among those in the top-k of at least a quarter of the domain's tokens "
           "(the domain's own expert):", "",
           _pivot_md(owners(a, by="selectivity"), md_table), "",
           "![domain x expert lift](figures/specialisation-domain-expert.png)", ""]
    tops = facts.top_experts_per_domain(a, 3)
    mid = str(sorted(int(x) for x in tops)[len(tops) // 2]) if tops else None
    if mid is not None:
        rows = [{"domain": d, "top-3 experts (share)": ", ".join(f"E{e['expert']} ({e['share_topk']:.2f})"
                                                                 for e in lst),
                 "max lift": max(e["lift_topk"] or 0 for e in lst)} for d, lst in tops[mid].items()]
        out += [f"Every domain at the middle layer ({mid}):", "", md_table(pd.DataFrame(rows)), ""]
    sp = specialists(a)
    if not sp.empty:
        out += ["Experts whose largest domain lift is at least 3x, by layer and the domain they favour:", "",
                md_table(sp.reset_index()), ""]
    out += ["## Load balance and collapse", "",
            "Per layer: coefficient of variation of the expert load, normalised entropy of the load (1 = "
            "uniform), MaxVio `(max load - mean) / mean`, the Switch auxiliary loss `E * sum_i f_i P_i` "
            f"(= k = {k} when balanced), mean router entropy (nats; uniform = ln E = {np.log(E):.2f}), "
            "repetition rate of the first choice between consecutive tokens and the mean domain "
            "specialisation:", "",
            md_table(ls, ["layer", "load_cv", "load_entropy_norm", "max_vio", "switch_aux", "router_entropy",
                          "repetition_rate", "domain_specialisation"]), "",
            "![specialisation and load balance per layer](figures/specialisation-layers.png)", ""]
    col = facts.collapsed(a)
    if col.empty:
        flags = "_no expert flagged at any layer_"
    else:
        by = [{"layer": int(layer), **{f"{f} ({'< 0.1' if f == 'low' else '> 3'}x 1/E)":
                                       ", ".join(f"E{int(e)}" for e in g.loc[g["flag"] == f, "expert"]) or "-"
                                       for f in ("low", "high")}} for layer, g in col.groupby("layer")]
        flags = md_table(pd.DataFrame(by))
    out += ["Collapse flags (an expert's top-k load below 0.1x or above 3x the uniform 1/E):", "", flags, ""]
    pp = a.position_profile
    if not pp.empty:
        ent = pp.pivot_table(index="bucket", columns="layer", values="router_entropy", aggfunc="first")
        spc = pp.pivot_table(index="bucket", columns="layer", values="specialisation", aggfunc="first")
        ent, spc = ent.reindex(bucket_order(ent.index)), spc.reindex(bucket_order(spc.index))
        tab = pd.DataFrame({"position": ent.index})
        for layer in ent.columns:
            tab[f"L{int(layer)} entropy / max lift"] = [f"{_num(e, '.2f')} / {_num(x, '.1f')}"
                                                        for e, x in zip(ent[layer], spc[layer])]
        out += ["## Cold start", "",
                "Routing of the first tokens of a document (position 0 = BOS) against the rest (8+): mean router "
                "entropy and the largest expert share over all tokens at that position divided by k/E:", "",
                md_table(tab), "", "![cold-start routing](figures/specialisation-cold-start.png)", ""]
    out += ["## Three features and the experts they ride on", "",
            "Chosen automatically: interpretable latents (the counting protocol, docs/analysis.md) with at least "
            "20 active tokens (and a top-domain lift of at least 2 when enough latents have one), one per top "
            "domain, ranked by the highest lift of an expert that carries at least a quarter of their active "
            "tokens at their routed MoE layer (RouteSAE's most frequent routed layer for that latent, or the "
            "MoE layer at or below it). Share = the fraction of the latent's active tokens whose top-k "
            "includes the expert; lift = share / the fraction of all tokens whose top-k includes it. Each "
            "feature lists up to three such experts (share >= 0.25) by lift.", ""]
    for lat in features:
        r = a.latent_row(lat)
        ex = feature_experts(a, lat)
        out += [f"### Latent {lat}", "",
                "; ".join(f"{md(name)}: {md(facts.num(v))}" for name, v in facts.feature_facts(a, lat)), "",
                "Rides on: " + ", ".join(f"layer {int(e.layer)} E{int(e.expert)} (share {e.share:.2f}, "
                                         f"lift {e.lift:.1f}x)" for e in ex.itertuples()) + ".", ""]
        if r is not None and as_list(r.get("logit_pos")):
            out += ["Promotes: " + ", ".join(f"«{md(t)}»" for t in as_list(r.get("logit_pos"))[:8]), ""]
        ctx = a.contexts[(a.contexts["latent"] == lat) & (a.contexts["kind"] == "top")]
        for c in ctx.sort_values("rank").head(3).itertuples():
            text = plain_context(as_list(c.tokens), as_list(c.acts), int(c.center))
            out.append(f"- act {c.act:.2f} ({md(c.domain)}): {text}")
        out.append("")
    out += ["![feature x expert lift](figures/specialisation-features.png)", ""]
    doc = "\n".join(out)

    sel = _with_selectivity(a.expert_domain)
    best = sel[sel["share_topk"] >= 0.25].sort_values(["selectivity", "layer"], ascending=[False, True]).iloc[0]
    summ = [f"```\n{command}\n```", "",
            f"On {s['tokens']:,} tokens of the demo corpus the most selective expert is layer {int(best.layer)} "
            f"E{int(best.expert)}: in the top-{k} of {best.share_topk:.0%} of the {md(best.domain)} tokens and of "
            f"{best.base:.1%} of all tokens ({best.selectivity:.1f}x); "
            f"load CV {ls['load_cv'].min():.2f}-{ls['load_cv'].max():.2f} and Switch aux "
            f"{ls['switch_aux'].min():.2f}-{ls['switch_aux'].max():.2f} (k = {k} when balanced) across the "
            f"8 layers; {len(col)} expert(s) flagged as collapsed. Owners of the focus domains, cold-start routing "
            "and three RouteSAE features with their experts: [docs/specialisation.md](specialisation.md). The "
            "most selective expert of each focus domain per layer (`E<expert>: share (lift against k/E, "
            "selectivity)`):", "", _pivot_md(owners(a, by="selectivity"), md_table)]
    return doc, "\n".join(summ)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/paper-comparison/routesae-ste-k32")
    ap.add_argument("--store", default="runs/paper-comparison/store")
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--features", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from routesae.report.load import load_analysis

    run = prepare(args)
    a = load_analysis(run)
    feats = pick_features(a, args.features)
    command = " ".join([".venv/bin/python", "analyses/specialisation_study.py", *sys.argv[1:]])
    doc, section = render(a, run, feats, command)
    print(doc)
    if args.no_write:
        return
    moe = a.moe_layers
    for p in (fig_domain_expert(a, [moe[0], moe[len(moe) // 2], moe[-1]]), fig_layers(a), fig_cold_start(a),
              fig_features(a, feats)):
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KiB)")
    (ROOT / "docs" / "specialisation.md").write_text(doc + "\n")
    write_section(ROOT / "docs" / "RESULTS.md", "specialisation", section)
    print("wrote docs/specialisation.md and the specialisation section of docs/RESULTS.md")


if __name__ == "__main__":
    main()
