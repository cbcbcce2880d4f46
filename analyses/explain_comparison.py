"""Explanations and the routing probe, RouteSAE against TopK (docs/RESULTS.md, "Explanations (issue 19)").

For each run (an analysed RouteSAE and an analysed TopK trained on the same store): explain the same number of
latents picked by the paper's protocol (the top ``--latents`` by activation count on the analysis's held-out
tokens), with the token explainer + proxy judge (no LLM) and, when ``--llm-url`` is given, with that LLM as
explainer and judge; then the routing probe (recall@k of the routed experts on held-out contexts). Prints
Markdown tables with wall times. Writes only ``RUN/explanations`` and ``RUN/routing_probe`` of the two runs.

    routesae llm serve --port 8000 &
    python analyses/explain_comparison.py --routesae runs/demo/full/routesae --topk runs/demo/full/topk \\
        --store runs/demo/full/store-val --latents 20 --llm-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from routesae.explain.client import LLMConfig
from routesae.explain.probe import ProbeConfig
from routesae.explain.probe_run import ProbeRunConfig, probe_run
from routesae.explain.run import ExplainConfig, explain
from routesae.report.mdkit import md_table


def scores_row(run: str, explainer: str, judge: str, n: int) -> dict:
    sc = pd.read_parquet(f"{run}/explanations/scores.parquet")
    sc = sc[(sc["explainer"] == explainer) & (sc["judge"] == judge)]
    out = {}
    for s in ("detection", "fuzzing"):
        g = sc[sc["scorer"] == s]
        out[f"{s} acc"] = float(g["accuracy"].mean())
        out[f"{s} AUC"] = float(np.nanmean(g["auc"]))
    out["latents"] = int(sc["latent"].nunique())
    assert out["latents"] == n, (run, explainer, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--routesae", required=True)
    ap.add_argument("--topk", required=True)
    ap.add_argument("--store", default=None, help="held-out store (default: each run's eval store)")
    ap.add_argument("--latents", type=int, default=20)
    ap.add_argument("--n-score", type=int, default=5, help="held-out activating contexts per scorer")
    ap.add_argument("--llm-url", default=None)
    ap.add_argument("--llm-model", default="smollm2")
    ap.add_argument("--probe-tokens", type=int, default=65536)
    args = ap.parse_args()
    runs = {"RouteSAE": args.routesae, "TopK": args.topk}
    rows, recall = [], {}
    for run in runs.values():  # fresh timings: no cache, no earlier explanations (they would be kept otherwise)
        for sub in ("explanations", "routing_probe"):
            if Path(run, sub).exists():
                raise SystemExit(f"{run}/{sub} exists; move it away for fresh wall times")
    setups = [("tokens", "proxy")] + ([("llm", "llm")] if args.llm_url else [])
    for name, run in runs.items():
        for explainer, judge in setups:
            cfg = ExplainConfig(run=run, top=args.latents, by="count", explainer=explainer, judge=judge,
                                llm=LLMConfig(url=args.llm_url or "http://127.0.0.1:8000/v1", model=args.llm_model,
                                              concurrency=2), store=args.store, n_score=args.n_score)
            t0 = time.time()
            out = explain(cfg)
            s = json.loads((out / "summary.json").read_text())
            rows.append({"SAE": name, "explainer": s["explainer"], "judge": s["judge"],
                         **scores_row(run, s["explainer"], s["judge"], args.latents),
                         "requests": s["usage"]["requests"], "cached": s["usage"]["cached"],
                         "tokens": s["usage"]["prompt_tokens"] + s["usage"]["completion_tokens"],
                         "wall s": round(time.time() - t0, 1)})
        t0 = time.time()
        out = probe_run(ProbeRunConfig(run=run, store=args.store, probe=ProbeConfig(tokens=args.probe_tokens)))
        r = pd.read_parquet(out / "recall.parquet").pivot(index="layer", columns="method", values="recall")
        recall[name] = (r, round(time.time() - t0, 1), json.loads((out / "summary.json").read_text()))
    print("## explanation scores (mean over latents)\n")
    print(md_table(pd.DataFrame(rows), digits=3))
    (rs, t_rs, s_rs), (tk, t_tk, _) = recall["RouteSAE"], recall["TopK"]
    table = pd.DataFrame({"unigram": rs["unigram"], "bigram": rs["bigram"], "RouteSAE latents": rs["latents"],
                          "TopK latents": tk["latents"], "raw residual (upper ref.)": rs["raw_residual"]})
    table.loc["mean"] = table.mean()
    print(f"\n## routing probe: recall@{s_rs['k']} on {s_rs['tokens_test']:,} held-out tokens "
          f"({s_rs['tokens_train']:,} train; probe wall time RouteSAE {t_rs} s, TopK {t_tk} s)\n")
    print(md_table(table.reset_index(), digits=3))


if __name__ == "__main__":
    main()
