"""Several runs trained on the same store, side by side: ``routesae report RUN RUN [...]``.

Reads each run's ``config.json`` (the SAE), ``train_config.json`` (which store trained it:
``store_summary.identity``), ``eval.json`` and, when present, ``analysis/`` (feature counts). Runs
trained on different stores are refused: their numbers are not comparable. Nothing is recomputed.
Rendering: :mod:`routesae.report.compare_render`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from routesae.report.findings import Finding, Ref, data_finding
from routesae.report.glossary import TERMS, count, fmt, pct
from routesae.report.load import Analysis, _read_json, load_analysis, scalar

# metrics compared, in order: (eval.json group, key, which way is better)
METRICS = (("splice", "ce_recovered", "high"), ("splice", "ce_increase", "low"), ("splice", "kl", "low"),
           ("sae_space", "nmse", "low"), ("sae_space", "explained_variance", "high"), ("sae_space", "l0", None),
           ("raw_space", "nmse", "low"), ("raw_space", "explained_variance", "high"),
           ("sae_space", "dead_fraction", "low"), ("sae_space", "dense_fraction_gt_10pct", "low"),
           ("splice", "ce_clean", None), ("splice", "ce_spliced", "low"), ("splice", "ce_zero_ablated", None),
           ("splice", "kl_zero_ablated", None))
HEADLINE = ("ce_increase", "kl", "ce_recovered", "nmse", "explained_variance")
ARCH_NAMES = {"routesae": "RouteSAE", "topk": "TopK", "mlsae": "MLSAE"}


@dataclass
class RunInfo:
    path: Path
    config: dict[str, Any]  # config.json
    train: dict[str, Any]  # train_config.json
    eval: dict[str, Any]  # eval.json ({} when not evaluated)
    analysis: Analysis | None = None
    name: str = ""

    @property
    def arch(self) -> str:
        return str(self.config.get("arch") or self.eval.get("arch") or "?")

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.config.get("layers") or self.eval.get("layers") or []]

    @property
    def label(self) -> str:
        """``RouteSAE (layers 1-5)``, ``TopK (layer 5)``."""
        ls = self.layers
        where = "" if not ls else f" (layer {ls[0]})" if len(ls) == 1 else f" (layers {ls[0]}-{ls[-1]})"
        return ARCH_NAMES.get(self.arch, self.arch) + where

    @property
    def store(self) -> tuple[str | None, str | None]:
        """(content identity, path) of the store the run was trained on."""
        s = self.train.get("store_summary") or {}
        return s.get("identity"), s.get("path") or self.train.get("store") or (self.config.get("meta") or {}).get(
            "store")

    def metric(self, group: str, key: str) -> float | None:
        src = self.eval.get(group) or {}
        if group == "splice" and "mean" in src:
            src = {**src, **src["mean"]}
        v = scalar(src.get(key))
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def load_run(path: str | Path) -> RunInfo:
    """One run's files; a one-line error when it holds no trained SAE."""
    run = Path(path).expanduser()
    config = _read_json(run / "config.json")
    if not config:
        raise FileNotFoundError(f"{run} holds no trained SAE (config.json); train one first: "
                                f"routesae train STORE --out {run}")
    ana = None
    if (run / "analysis").is_dir() and any((run / "analysis").glob("*.parquet")):
        ana = load_analysis(run)
    return RunInfo(run, config, _read_json(run / "train_config.json"), _read_json(run / "eval.json"), ana)


def check_same_store(runs: list[RunInfo]) -> None:
    """Refuse runs trained on different stores (by content identity, else by store path)."""
    if len(runs) < 2:
        raise ValueError("a comparison needs at least two runs; for one run: routesae report RUN")
    seen = [r.path.resolve() for r in runs]
    if len(set(seen)) < len(seen):
        raise ValueError("the same run is listed twice; list each run once")
    first = runs[0]
    for r in runs[1:]:
        (ia, pa), (ib, pb) = first.store, r.store
        if ia and ib:
            if ia != ib:
                raise ValueError(f"{first.path} and {r.path} were trained on different stores (identity {ia[:12]} "
                                 f"vs {ib[:12]}); compare runs trained on the same store, or report each alone: "
                                 f"routesae report RUN")
        elif pa and pb and Path(pa).resolve() != Path(pb).resolve():
            raise ValueError(f"{first.path} and {r.path} were trained on different stores ({pa} vs {pb}); compare "
                             f"runs trained on the same store, or report each alone: routesae report RUN")
        elif not (ia and ib) and not (pa and pb):
            raise ValueError(f"cannot tell which store {r.path if not (ib or pb) else first.path} was trained on (no "
                             f"train_config.json store_summary); compare runs trained by routesae train")


def load_runs(paths: list[str | Path]) -> list[RunInfo]:
    """The runs, checked to share a training store, each named by its folder (its path when names repeat)."""
    runs = [load_run(p) for p in paths]
    check_same_store(runs)
    names = [r.path.name for r in runs]
    for r in runs:
        r.name = r.path.name if names.count(r.path.name) == 1 else str(r.path)
    return runs


# ---------------------------------------------------------------- tables


def metrics_table(runs: list[RunInfo]) -> pd.DataFrame:
    """One row per (group, metric) that some run has; one column per run, plus ``better`` (high / low / '')."""
    rows = []
    for group, key, better in METRICS:
        vals = [r.metric(group, key) for r in runs]
        if any(v is not None for v in vals):
            rows.append({"group": group, "metric": key, "better": better or "", **{r.name: v for r, v in
                                                                                   zip(runs, vals)}})
    return pd.DataFrame(rows)


def routed_layers_table(runs: list[RunInfo]) -> pd.DataFrame:
    """Fraction of evaluated tokens per layer and run (a one-layer SAE: 1 at its layer)."""
    layers = sorted({j for r in runs for j in r.layers})
    out = {"layer": layers}
    for r in runs:
        rl = r.eval.get("routed_layers") or {}
        fr = dict(zip([int(x) for x in rl.get("layers") or []], [float(x) for x in rl.get("fractions") or []]))
        if not fr and len(r.layers) == 1:
            fr = {r.layers[0]: 1.0}
        out[r.name] = [fr.get(j, 0.0 if fr else None) for j in layers]
    return pd.DataFrame(out)


def runs_table(runs: list[RunInfo]) -> pd.DataFrame:
    rows = []
    for r in runs:
        ident, store = r.store
        ev = r.eval
        kind = {False: "held out", True: "in-sample"}.get(ev.get("in_sample"), "held out?")
        rows.append({"run": r.name, "arch": r.label, "path": str(r.path), "n_latents": r.config.get("n_latents"),
                     "k": r.config.get("k"), "trained on": f"{store} ({(ident or '?')[:12]})",
                     "evaluated on": (f"{ev.get('store')}, {kind}" if ev
                                      else f"not evaluated: routesae evaluate {r.path}")})
    return pd.DataFrame(rows)


def features_table(runs: list[RunInfo]) -> pd.DataFrame:
    """Latents, k, dead and dense fractions (eval.json) and the feature count (analysis, when there is one)."""
    rows = []
    for r in runs:
        a = r.analysis
        rows.append({"run": r.name, "n_latents": r.config.get("n_latents"), "l0": r.metric("sae_space", "l0"),
                     "dead_fraction": r.metric("sae_space", "dead_fraction"),
                     "dense_fraction_gt_10pct": r.metric("sae_space", "dense_fraction_gt_10pct"),
                     "feature_count": (a.feature_count.get("count") if a is not None and a.feature_count else None)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- findings


def _best(runs: list[RunInfo], group: str, key: str, better: str) -> list[tuple[RunInfo, float]]:
    vals = [(r, r.metric(group, key)) for r in runs]
    vals = [(r, v) for r, v in vals if v is not None]
    return sorted(vals, key=lambda x: -x[1] if better == "high" else x[1])


def metric_finding(runs: list[RunInfo], group: str, key: str, better: str) -> Finding | None:
    ranked = _best(runs, group, key, better)
    if len(ranked) < 2:
        return None
    (r0, v0), rest = ranked[0], ranked[1:]
    others = ", ".join(f"{r.name} {fmt(key, v, True)}" for r, v in rest)
    d = abs(v0 - rest[0][1])
    gap = (" (a tie)" if d == 0 else f" ({pct(d)[:-1]} points better)" if fmt(key, v0).endswith("%")
           else f" (better by {fmt(key, d, True)})")
    text = f": {r0.name} {fmt(key, v0, True)} vs {others}{gap}."
    return Finding(f"{group}.{key}", "metrics", [Ref(key, TERMS[key].name), text],
                   {"best": r0.name, **{r.name: v for r, v in ranked}})


def ablation_caveat(runs: list[RunInfo]) -> Finding | None:
    """CE recovered divides by each run's own zero-ablation: say so when those differ."""
    z = [(r, r.metric("splice", "ce_zero_ablated")) for r in runs]
    z = [(r, v) for r, v in z if v is not None]
    if len(z) < 2 or max(v for _, v in z) - min(v for _, v in z) < 0.01 * max(v for _, v in z):
        return None
    each = ", ".join(f"{r.name} {v:.3f} nats" for r, v in z)
    return Finding("ablation_caveat", "metrics", [
        Ref("ce_recovered"), " is measured against each SAE's own zero-ablation (", Ref("ce_zero_ablated"),
        f": {each}), so ", Ref("ce_increase"), " and ", Ref("kl"), " are the like-for-like numbers."],
        {r.name: v for r, v in z})


def routed_finding(runs: list[RunInfo]) -> Finding | None:
    t = routed_layers_table(runs)
    multi = [r for r in runs if len(r.layers) > 1 and t[r.name].notna().any()]
    if not multi:
        return None
    parts: list[Any] = []
    values: dict[str, Any] = {}
    for r in multi:
        i = int(t[r.name].fillna(-1).idxmax())
        j, f = int(t["layer"][i]), float(t[r.name][i])
        single = [o.name for o in runs if o.layers == [j]]
        parts.append(f"{r.name} routes {pct(f)} of tokens to layer {j}"
                     + (f", the layer {', '.join(single)} is trained on" if single else "") + ". ")
        values[r.name] = {"layer": j, "fraction": f}
    parts = [Ref("routed_fraction", "Routed layers"), ": ", "".join(parts).strip()]
    return Finding("routed_layers", "layers", parts, values)


def features_finding(runs: list[RunInfo]) -> Finding | None:
    t = features_table(runs)
    bits, values = [], {}
    for r, row in zip(runs, t.itertuples()):
        fc = scalar(row.feature_count)
        values[r.name] = fc
        bits.append(f"{r.name} {count(fc)} interpretable" if fc is not None
                    else f"{r.name} not analysed (routesae analyze {r.path})")
    dead = ", ".join(f"{r.name} {pct(v)}" for r, v in zip(runs, t["dead_fraction"]) if v is not None)
    parts = [Ref("feature_count", "Feature count"), ": " + "; ".join(bits) + "."]
    if dead:
        parts += [" ", Ref("dead_fraction"), f": {dead}."]
    return Finding("features", "features", parts, values)


def comparison_findings(runs: list[RunInfo]) -> list[Finding]:
    """Data (held out?), headline metrics best first, the zero-ablation caveat, routed layers, feature counts."""
    out: list[Finding | None] = [same_tokens_finding(runs)]
    by_key = {k: (g, b) for g, k, b in METRICS if g != "raw_space"}
    if all((r.eval or {}).get("raw_space", {}).get("nmse") is not None for r in runs):
        # like for like across architectures: every run's error on the raw residual it splices (the SAE-input
        # space differs: standardised, routed and centred for RouteSAE, one standardised layer for TopK)
        by_key.update({k: (g, b) for g, k, b in METRICS if g == "raw_space"})
    out += [metric_finding(runs, by_key[k][0], k, by_key[k][1]) for k in HEADLINE]
    out += [ablation_caveat(runs), routed_finding(runs), features_finding(runs)]
    return [f for f in out if f is not None]


def same_tokens_finding(runs: list[RunInfo]) -> Finding | None:
    """Whether every run was evaluated on the same tokens, and whether they were held out."""
    evs = [r.eval for r in runs if r.eval]
    if not evs:
        return None
    key = [(e.get("store_identity") or e.get("store"), json.dumps(e.get("token_range") or {}, sort_keys=True),
            e.get("tokens")) for e in evs]
    f = data_finding(evs[0], "runs")
    if len(set(key)) == 1 and len(evs) == len(runs) and f is not None:
        text = str(f.parts[0]).split(": ", 1)[-1]
        f.parts = [f"Every run was evaluated on the same tokens: {text}"]
        f.values["same_tokens"] = True
        return f
    missing = [r.name for r in runs if not r.eval]
    text = "The runs were not evaluated on the same tokens; compare with care" + (
        f" ({', '.join(missing)} not evaluated: routesae evaluate RUN)" if missing else "") + "."
    return Finding("data", "runs", [text], {"same_tokens": False})

