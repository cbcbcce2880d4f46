"""Server time to render a feature page of the dashboard on a run with 16,384 latents.

    python bench/dashboard.py [--latents 16384] [--top-contexts 20] [--quantile-bins 5] [--quantile-samples 5]
                              [--window 16] [--renders 30] [--json]

Builds a synthetic ``RUN/analysis`` at scale (the expert tables, summary and settings of
``tests/analysis_fixture.py``; the feature tables regenerated with ``--latents`` rows in
``latents.parquet``, per live latent as many stored contexts as ``routesae analyze`` keeps by
default: ``--top-contexts`` "top" ones plus ``--quantile-samples`` in each of ``--quantile-bins``
bins "q0".."q4", each of ``2 * --window + 1`` tokens (defaults read from
:class:`routesae.analyze.AnalyzeConfig`: 20 + 5 x 5 = 45 contexts of 33 tokens); domain and expert
lifts for every latent), then renders ``features?feature=N`` with Streamlit's ``AppTest`` for
random latents in one AppTest session: the first render loads and indexes the analysis (cached),
the next ``--renders`` are timed. Server time = the page script's own run time, which app.py stores
in ``st.session_state["_render_ms"]`` (it includes building and serialising every element and
figure; not the websocket send or the browser); AppTest's wall time is printed beside it. Prints the median and p90
against the 300 ms target, plus the features table page (all latents) and the cold load for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_MS = 300.0


def _lists(values: np.ndarray, n_rows: int, width: int, typ: pa.DataType) -> pa.ListArray:
    offsets = pa.array(np.arange(0, (n_rows + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=typ))


def context_kinds(top: int, bins: int, samples: int) -> list[str]:
    """The ``kind`` of each stored context of one latent, as analyze writes them: "top" ones, then "q0".."q{bins-1}"."""
    return ["top"] * top + [f"q{q}" for q in range(bins) for _ in range(samples)]


def build_run(tmp: Path, n_latents: int, kinds: list[str], window: int, seed: int = 0) -> Path:
    """The fixture's run with feature tables scaled to ``n_latents`` latents, ``kinds`` contexts per live latent."""
    from tests.analysis_fixture import DOMAINS, HOSTILE, MOE_LAYERS, SAE_LAYERS, E, K, make_analysis

    rng = np.random.default_rng(seed)
    run = make_analysis(tmp, seed=seed)
    ana = run / "analysis"
    n, L, D = n_latents, len(SAE_LAYERS), len(DOMAINS)
    domains = list(DOMAINS)
    total = 10_000_000
    count = rng.integers(1, 50_000, n)
    dead = rng.random(n) < 0.02
    count[dead] = 0
    max_act = np.where(dead, 0.0, rng.uniform(1, 20, n))
    vocab = np.array([f"tok{i}" for i in range(2000)] + HOSTILE + [" the", " of", "\n", "(", ")"], dtype=object)
    fr = rng.dirichlet(np.ones(L), n)
    edges = np.linspace(0, 1, 21)[None, :] * max_act[:, None]
    hist = rng.integers(0, 500, (n, 20))
    t = pa.table({
        "latent": pa.array(np.arange(n, dtype=np.int64)), "density": count / total, "count": count,
        "mean_act": np.where(dead, np.nan, max_act / 3), "max_act": max_act,
        "top_domain": pa.array([None if d else domains[i % D] for i, d in enumerate(dead)], type=pa.string()),
        "top_domain_lift": rng.uniform(1, 5, n), "top_routed_layer": np.array(SAE_LAYERS)[fr.argmax(1)],
        "routed_layer_fractions": _lists(fr, n, L, pa.float64()),
        "top_expert_layer": np.array(MOE_LAYERS, dtype=float)[np.arange(n) % len(MOE_LAYERS)],
        "top_expert": (np.arange(n) % E).astype(float), "top_expert_lift": rng.uniform(1, 4, n),
        "interpretable": rng.random(n) < 0.6,
        "top_token": pa.array(vocab[rng.integers(0, len(vocab), n)].tolist(), type=pa.string()),
        "neighbours": _lists(rng.integers(0, n, (n, 10)), n, 10, pa.int64()),
        "neighbour_cos": _lists(-np.sort(-rng.uniform(0, 1, (n, 10)), 1), n, 10, pa.float64()),
        "logit_pos": _lists(vocab[rng.integers(0, len(vocab), (n, 10))], n, 10, pa.string()),
        "logit_neg": _lists(vocab[rng.integers(0, len(vocab), (n, 10))], n, 10, pa.string()),
        "logit_pos_values": _lists(rng.uniform(0, 3, (n, 10)), n, 10, pa.float64()),
        "logit_neg_values": _lists(rng.uniform(-3, 0, (n, 10)), n, 10, pa.float64()),
        "hist_edges": _lists(edges, n, 21, pa.float64()), "hist_counts": _lists(hist, n, 20, pa.int64()),
    })
    pq.write_table(t, ana / "latents.parquet")
    # contexts: every live latent holds the full set of kinds (a latent that fired often enough)
    live = np.flatnonzero(~dead)
    n_contexts = len(kinds)
    rank = np.array([sum(1 for k2 in kinds[:i] if k2 == k) for i, k in enumerate(kinds)])
    m, w = len(live) * n_contexts, 2 * window + 1
    lat = np.repeat(live, n_contexts)
    acts = rng.uniform(0, 1, (m, w)) * max_act[lat][:, None]
    pq.write_table(pa.table({
        "latent": lat, "kind": pa.array(np.tile(np.array(kinds, dtype=object), len(live)).tolist()),
        "rank": np.tile(rank, len(live)), "act": acts[:, window],
        "tokens": _lists(vocab[rng.integers(0, len(vocab), (m, w))], m, w, pa.string()),
        "acts": _lists(acts, m, w, pa.float64()), "center": np.full(m, window),
        "domain": pa.array(np.array(domains, dtype=object)[rng.integers(0, D, m)].tolist()),
        "doc_id": pa.array([f"d{i}" for i in rng.integers(0, 100_000, m)]),
        "routed_layer": np.array(SAE_LAYERS)[rng.integers(0, L, m)],
    }), ana / "contexts.parquet")
    share = rng.dirichlet(np.ones(D), len(live))
    base = np.array([DOMAINS[d] for d in domains]) / sum(DOMAINS.values())
    pd.DataFrame({"latent": np.repeat(live, D), "domain": np.tile(domains, len(live)),
                  "count": (share * count[live, None]).round().astype(int).ravel(), "share": share.ravel(),
                  "base_share": np.tile(base, len(live)), "lift": (share / base).ravel()}
                 ).to_parquet(ana / "latent_domains.parquet", index=False)
    ne = len(MOE_LAYERS) * E
    c = rng.integers(3, 500, (len(live), ne))
    sh = c / np.maximum(count[live, None], 1)
    le = pd.DataFrame({"latent": np.repeat(live, ne), "layer": np.tile(np.repeat(MOE_LAYERS, E), len(live)),
                       "expert": np.tile(np.tile(np.arange(E), len(MOE_LAYERS)), len(live)), "count": c.ravel(),
                       "share": sh.ravel(), "base_share": K / E, "lift": (sh / (K / E)).ravel(),
                       "at_routed_layer": np.tile(np.repeat(np.array(MOE_LAYERS) == MOE_LAYERS[-1], E), len(live))})
    le.to_parquet(ana / "latent_experts.parquet", index=False)
    el = (le.sort_values("lift", ascending=False).groupby(["layer", "expert"]).head(20)
          .sort_values(["layer", "expert", "lift"], ascending=[True, True, False]))
    el = el.assign(rank=el.groupby(["layer", "expert"]).cumcount())[["layer", "expert", "rank", "latent", "lift",
                                                                     "count"]]
    el.to_parquet(ana / "expert_latents.parquet", index=False)
    s = json.loads((ana / "summary.json").read_text())
    s.update(n_latents=n, dead_latents=int(dead.sum()), interpretable=int(t["interpretable"].to_numpy().sum()))
    (ana / "summary.json").write_text(json.dumps(s))
    cfg = json.loads((run / "config.json").read_text())
    cfg["n_latents"] = n
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def render_ms(run: Path, latents: list[int]) -> dict[str, list[float]]:
    """Per render: the page script's own time (``_render_ms``, set by app.py) and AppTest's wall time."""
    from streamlit.testing.v1 import AppTest

    os.environ["ROUTESAE_RUN"] = str(run)
    at = AppTest.from_file(str(ROOT / "dashboards" / "app.py"), default_timeout=600)
    out: dict[str, list[float]] = {"script": [], "wall": [], "table_script": []}
    for i in latents:
        at.query_params["feature"] = str(i)
        t0 = time.perf_counter()
        at.run()
        out["wall"].append((time.perf_counter() - t0) * 1000)
        if at.exception or at.title[0].value != f"Latent {i}":
            raise RuntimeError(f"latent {i}: {at.exception[0].value if at.exception else at.title[0].value}")
        out["script"].append(float(at.session_state["_render_ms"]))
    at.query_params.pop("feature", None)
    at.switch_page("views/features.py")
    for _ in range(3):
        at.run()
        out["table_script"].append(float(at.session_state["_render_ms"]))
    return out


def main() -> None:
    from routesae.analyze import AnalyzeConfig

    d = AnalyzeConfig(run="")  # analyze's defaults: the contexts a real analysis stores
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=16_384)
    ap.add_argument("--top-contexts", type=int, default=d.top_contexts, help="top contexts per latent")
    ap.add_argument("--quantile-bins", type=int, default=d.quantile_bins)
    ap.add_argument("--quantile-samples", type=int, default=d.quantile_samples, help="contexts per quantile bin")
    ap.add_argument("--window", type=int, default=d.window, help="tokens either side of a context's centre")
    ap.add_argument("--renders", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args()
    import logging

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        kinds = context_kinds(args.top_contexts, args.quantile_bins, args.quantile_samples)
        run = build_run(Path(tmp), args.latents, kinds, args.window, args.seed)
        build_s = time.perf_counter() - t0
        rng = np.random.default_rng(args.seed + 1)
        latents = [int(x) for x in rng.integers(0, args.latents, args.renders + 1)]
        r = render_ms(run, latents)
    cold, warm, wall = r["script"][0], r["script"][1:], r["wall"][1:]
    table = statistics.median(r["table_script"])
    med, p90 = statistics.median(warm), float(np.percentile(warm, 90))
    out = {"latents": args.latents, "contexts_per_latent": len(kinds), "context_tokens": 2 * args.window + 1,
           "renders": len(warm),
           "feature_page_median_ms": round(med, 1), "feature_page_p90_ms": round(p90, 1),
           "feature_page_max_ms": round(max(warm), 1), "apptest_wall_median_ms": round(statistics.median(wall), 1),
           "first_render_with_load_ms": round(cold, 1), "features_table_median_ms": round(table, 1),
           "build_s": round(build_s, 1), "target_ms": TARGET_MS, "ok": med <= TARGET_MS, "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(out))
        return
    print(f"synthetic run: {args.latents:,} latents, {len(kinds)} contexts of {2 * args.window + 1} tokens each "
          f"({args.top_contexts} top + {args.quantile_bins} x {args.quantile_samples} quantile samples, analyze's "
          f"defaults; built in {build_s:.1f} s)")
    print(f"first render (loads + indexes the analysis): {cold:8.1f} ms")
    print(f"feature page, {len(warm)} renders (server time of the page script): median {med:.1f} ms, "
          f"p90 {p90:.1f} ms, max {max(warm):.1f} ms -> target {TARGET_MS:.0f} ms: "
          f"{'ok' if med <= TARGET_MS else 'MISSED'}")
    print(f"  (AppTest wall time incl. its element-tree parsing: median {statistics.median(wall):.1f} ms)")
    print(f"features table page ({args.latents:,} rows): median {table:.1f} ms")


if __name__ == "__main__":
    main()
