"""The domain x expert story of the demo MoE, and three RouteSAE features with the experts they ride on.

    python analyses/specialisation_study.py [--run runs/paper-comparison/routesae-ste-k32]
        [--store runs/paper-comparison/store] [--tokens 131072] [--features 3] [--no-write]

Reads the router records of a store of the demo MoE over the demo corpus (11 domains) and a
trained RouteSAE run on it (both made by ``analyses/paper_comparison.py``; trained here with the
same settings when missing), analyses the run over the first ``--tokens`` store tokens with the
package's analysis (``routesae analyze``: expert tables and feature x expert attribution, into
``RUN/analysis/``; reused when done with the same token count) and writes:

- ``docs/specialisation.md``: which experts own which domains at the middle and last MoE layers
  (the most selective expert: selectivity = top-k share ``N_k(E_i, D) / N_D`` / the expert's share
  of all tokens, among experts that are not hubs and carry at least half the uniform load; the lift
  against ``k / E`` of REFERENCE §7 alongside), the hubs (in the top-k of most tokens of most
  domains), the load balance of every layer (CV, normalised entropy, MaxVio, Switch aux), collapse
  flags, cold-start routing (router entropy and selectivity by position in the document, BOS apart)
  and three features of the RouteSAE with the experts they ride on;
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
    summary, settings = run / "analysis" / "summary.json", run / "analysis" / "settings.json"
    stale = not settings.exists() or "min_load_ratio" not in json.loads(settings.read_text())  # before hubs
    if stale or not summary.exists() or json.loads(summary.read_text()).get("tokens") != args.tokens:
        print(f"analyze {run} ({args.tokens:,} tokens)")
        analyze(AnalyzeConfig(run=str(run), tokens=args.tokens, device="cpu"))
    return run


# ---------------------------------------------------------------- derived tables


def owner_layers(a) -> list[int]:
    """The middle and the last MoE layer."""
    moe = a.moe_layers
    return sorted({moe[len(moe) // 2], moe[-1]})


def owners(a, layers: list[int], domains=None) -> pd.DataFrame:
    """Per domain (all of them, focus domains first) and layer: the domain's owner, the most selective expert
    that is not a hub and carries at least ``min_load_ratio`` x the uniform load (``domain_layer.owner``), as
    ``E<i>: share (lift, selectivity)``; ``-`` when no eligible expert sees the domain."""
    ed, dl = a.expert_domain, a.domain_layer
    present = sorted(set(dl["domain"]))
    domains = [d for d in FOCUS if d in present] + [d for d in present if d not in FOCUS] if domains is None \
        else domains
    own = dl[dl["layer"].isin(layers) & (dl["owner"] >= 0)]
    cells = own.merge(ed, left_on=["layer", "domain", "owner"], right_on=["layer", "domain", "expert"],
                      suffixes=("", "_ed"))
    cells = cells.assign(cell=[f"E{int(r.expert)}: {r.share_topk:.2f} ({r.lift_topk:.1f}x, {r.selectivity:.1f}x)"
                               for r in cells.itertuples()])
    out = cells.pivot(index="domain", columns="layer", values="cell").reindex(index=domains, columns=layers)
    return out.fillna("-")


def hub_table(a) -> pd.DataFrame:
    """Per layer, its hubs as ``E<i> (share of all tokens)``."""
    es = a.expert_stats
    hubs = es[es["hub"].astype(bool)]
    rows = [{"layer": int(layer), "hubs": ", ".join(f"E{int(r.expert)} ({r.base_topk:.2f})" for r in g.itertuples())}
            for layer, g in hubs.groupby("layer")]
    return pd.DataFrame(rows, columns=["layer", "hubs"])


def specialists(a, min_selectivity: float = 2.0) -> pd.DataFrame:
    """Ranked experts (not hubs, load >= min_load_ratio / E) whose selectivity is at least ``min_selectivity``,
    counted per layer and the domain they favour."""
    from routesae.analyze.specialists import rank_specialists
    from routesae.report.facts import min_load_ratio

    sp = rank_specialists(a.expert_stats, min_load_ratio(a))
    sp = sp[sp["selectivity"] >= min_selectivity]
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


def _ratio_norm(values):
    """A log colour scale centred at 1 (symmetric: 1/m .. m, m = the largest ratio) for ratios such as
    selectivity; ratios below 1/m take the lowest colour."""
    from matplotlib.colors import LogNorm

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    m = float(np.clip(v.max() if v.size else 2.0, 2.0, 64.0))
    return LogNorm(vmin=1 / m, vmax=m), m


def _ratio_image(ax, m: pd.DataFrame, norm, bound: float):
    """imshow of a ratio table on ``norm``; zeros (never chosen) at the lowest colour, NaN blank."""
    z = m.to_numpy(dtype=float)
    z = np.where(np.isnan(z), np.nan, np.clip(z, 1 / bound, bound))
    return ax.imshow(z, aspect="auto", cmap="RdBu_r", norm=norm)


def fig_domain_expert(a, layers: list[int]) -> Path:
    plt = pyplot()
    ed = a.expert_domain
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers) + 1, 3.3), sharey=True)
    norm, bound = _ratio_norm(ed["selectivity"])
    hub = a.expert_stats.set_index(["layer", "expert"])["hub"].astype(bool)
    for i, (ax, layer) in enumerate(zip(np.atleast_1d(axes), layers)):
        m = ed[ed["layer"] == layer].pivot(index="domain", columns="expert", values="selectivity")
        im = _ratio_image(ax, m, norm, bound)
        if i == 0:
            ax.set_yticks(range(len(m.index)), list(m.index), fontsize=7)
        ax.set_xticks(range(0, m.shape[1], 4), [str(c) for c in m.columns[::4]], fontsize=7)
        for j, e in enumerate(m.columns):  # hubs marked under the axis
            if hub.get((layer, e), False):
                ax.annotate("H", (j, -0.5), xytext=(0, 1), textcoords="offset points", ha="center", va="bottom",
                            fontsize=6, color="purple", annotation_clip=False)
        ax.set_xlabel("expert (H above = hub)", fontsize=8)
        ax.set_title(f"layer {layer}: selectivity (share / expert's share)", fontsize=9, pad=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="selectivity (log scale)")
    return savefig(fig, FIG / "specialisation-domain-expert.png")


def fig_layers(a) -> Path:
    plt = pyplot()
    dl, ls = a.domain_layer, a.layer_stats.sort_values("layer")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.2))
    m = dl.pivot(index="domain", columns="layer", values="selectivity")
    norm, bound = _ratio_norm(m.to_numpy())
    im = _ratio_image(ax1, m, norm, bound)
    ax1.set_yticks(range(len(m.index)), list(m.index), fontsize=7)
    ax1.set_xticks(range(m.shape[1]), [str(c) for c in m.columns], fontsize=7)
    ax1.set_xlabel("MoE layer", fontsize=8)
    ax1.set_title("selectivity of the domain's owner", fontsize=9)
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
                                       ("selectivity", "largest selectivity (specialists)"))):
        for layer, g in pp.groupby("layer"):
            g = g.set_index("bucket").reindex(order)
            ax.plot(range(len(order)), g[col], marker=".", label=f"layer {layer}")
        ax.set_xticks(range(len(order)), order, fontsize=7)
        ax.set_xlabel("position in the document (BOS apart)", fontsize=8)
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
    ratio = facts.min_load_ratio(a)
    layers = owner_layers(a)
    bos = int(ls["bos_tokens"].iloc[0]) if "bos_tokens" in ls and len(ls) else 0
    out = ["# Expert specialisation in the demo MoE", "",
           f"```\n{command}\n```", "",
           f"Router records of {s['tokens']:,} tokens of the demo corpus (training split) through the demo MoE "
           f"({len(a.moe_layers)} MoE layers, E = {E} experts, top-{k}, so the uniform top-k share is k/E = "
           f"{k / E:.3f}); the features come from the RouteSAE run `{md(run.name)}` ({s['n_latents']:,} latents, "
           f"layers {s['layers']}) analysed on the same tokens. The {bos:,} BOS tokens (the same token at the start "
           "of every document, so routed the same way) are left out of every table but the cold-start one. Tokens "
           "per domain (the domains present in these tokens; a domain of the corpus that is missing here had too "
           "few tokens to reach them through the capture's document shuffle): "
           + ", ".join(f"{md(d)} {n:,}" for d, n in sorted(dom_tokens.items())) + ".", "",
           "## Which experts own which domains", "",
           "Share of domain D on expert i at a layer: `N_k(E_i, D) / N_D`, the fraction of D's tokens whose top-k "
           "includes i; lift = share / (k/E) (REFERENCE §7); selectivity = share / the expert's share of all "
           "tokens `N_k(E_i) / N` (= P(D | i) / P(D); 1 = the expert sees D as often as any other text). The lift "
           "cannot tell an owner from a hub: an expert in the top-k of most tokens has a share near 1, so a lift "
           f"near E/k = {E / k:g}, in every domain, but a selectivity near 1.", "",
           f"The owner of each domain at the middle and last MoE layers ({', '.join(map(str, layers))}): the most "
           f"selective expert that is not a hub and carries at least {ratio:g} x the uniform load 1/E, as "
           "`E<expert>: share (lift, selectivity)`:", "",
           _pivot_md(owners(a, layers), md_table), ""]
    hubs = hub_table(a)
    out += ["Hubs (in the top-k of more than half of the tokens of most domains; in brackets the fraction of all "
            "tokens whose top-k includes them), never ranked as specialists:", "",
            md_table(hubs) if not hubs.empty else "_no hub at any layer_", "",
            "![domain x expert selectivity](figures/specialisation-domain-expert.png)", ""]
    tops = facts.top_experts_per_domain(a, 3)
    mid = str(layers[0]) if str(layers[0]) in tops else None
    if mid is not None:
        def cell(e: dict) -> str:
            return f"E{e['expert']} ({e['share_topk']:.2f}, " + (
                "hub" if e.get("hub") else f"{_num(e.get('selectivity'), '.1f')}x") + ")"

        rows = [{"domain": d, "top-3 experts by share (share, selectivity)": ", ".join(cell(e) for e in lst)}
                for d, lst in tops[mid].items()]
        out += [f"Every domain's most used experts at the middle layer ({mid}):", "", md_table(pd.DataFrame(rows)),
                ""]
    sp = specialists(a)
    if not sp.empty:
        out += ["Ranked experts (not hubs, load at least the minimum) with a selectivity of at least 2, by layer and "
                "the domain they favour:", "", md_table(sp.reset_index()), ""]
    out += ["## Load balance and collapse", "",
            "Per layer: coefficient of variation of the expert load, normalised entropy of the load (1 = "
            "uniform), MaxVio `(max load - mean) / mean`, the Switch auxiliary loss `E * sum_i f_i P_i` "
            f"(= k = {k} when balanced), mean router entropy (nats; uniform = ln E = {np.log(E):.2f}), "
            "repetition rate of the first choice between consecutive tokens, the mean over domains of the "
            "owner's selectivity and the number of hubs:", "",
            md_table(ls, ["layer", "load_cv", "load_entropy_norm", "max_vio", "switch_aux", "router_entropy",
                          "repetition_rate", "domain_selectivity", "hubs"]), "",
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
        spc = pp.pivot_table(index="bucket", columns="layer", values="selectivity", aggfunc="first")
        ent, spc = ent.reindex(bucket_order(ent.index)), spc.reindex(bucket_order(spc.index))
        tab = pd.DataFrame({"position": ent.index})
        for layer in ent.columns:
            tab[f"L{int(layer)} entropy / selectivity"] = [f"{_num(e, '.2f')} / {_num(x, '.1f')}"
                                                        for e, x in zip(ent[layer], spc[layer])]
        out += ["## Cold start", "",
                "Routing of the first tokens of a document (BOS apart, then positions 1, 2, ...) against the rest "
                "(8+): mean router entropy and the largest selectivity of a ranked expert at that position (its "
                "share of the tokens at that position / its share of all tokens):", "",
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

    from routesae.analyze.specialists import rank_specialists

    best = rank_specialists(a.expert_stats, ratio).iloc[0]
    n_hubs = int(a.expert_stats["hub"].sum())
    summ = [f"```\n{command}\n```", "",
            f"On {s['tokens']:,} tokens of the demo corpus (BOS left out) the most selective expert that is not a hub "
            f"and carries at least {ratio:g} x the uniform load is layer {int(best.layer)} E{int(best.expert)}: in "
            f"the top-{k} of {best.top_share:.0%} of the {md(best.top_domain)} tokens and of {best.base_topk:.1%} of "
            f"all tokens (selectivity {best.selectivity:.1f}x); {n_hubs} hub(s) (in the top-k of most tokens of most "
            f"domains); load CV {ls['load_cv'].min():.2f}-{ls['load_cv'].max():.2f} and Switch aux "
            f"{ls['switch_aux'].min():.2f}-{ls['switch_aux'].max():.2f} (k = {k} when balanced) across the "
            f"{len(ls)} layers; {len(col)} expert(s) flagged as collapsed. Hubs, cold-start routing and three "
            "RouteSAE features with their experts: [docs/specialisation.md](specialisation.md). The owner of each "
            "domain (the most selective ranked expert) at the middle and last layers (`E<expert>: share (lift "
            "against k/E, selectivity)`):", "", _pivot_md(owners(a, layers), md_table)]
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
