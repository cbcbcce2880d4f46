"""``analyze-routing``: the fast path against the reference (one full forward per override), side by side.

    python bench/routing.py [--model DIR] [--tokens 512] [--batch-size 2] [--ablate-layers 1,4,7] [--repeats 1]
                            [--threads 1] [--malloc tuned|default]

Loads the model once, then runs ``analyze_routing`` with ``fast=False`` (one full forward per
override, stock kernels) and ``fast=True`` (blocks replayed from each override's first layer, on CPU
with the kernels of ``routesae.models.cpu_inference``) on the same tokens in this process
(alternating, ``--repeats`` times each; the best of each is kept), prints the wall and CPU time
(``time.process_time``: less sensitive than wall time to other jobs on a shared machine) of each and
their ratio, and checks that the tables agree within the tolerances of
``routesae.analyze.routing_tables.compare_tables`` (exit status 1 if not). Defaults: the demo MoE,
512 validation tokens in batches of 2 x 256 (full contexts, so neither side computes unused rows),
the by-layer view at every MoE layer and the ablation view at layers 1, 4, 7 (the command of the issue).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(model: str, corpus: str, tokens: int, batch_size: int, ctx: int, ablate_layers: str, repeats: int,
          workdir: Path, log=print, **options) -> dict:
    """Times of both paths (best of ``repeats``) and the table comparison; see the module docstring."""
    from routesae.analyze.routing import RoutingAnalysisConfig, analyze_routing
    from routesae.analyze.routing_tables import compare_tables
    from routesae.models.load import ModelConfig, load_model

    lm, tok = load_model(ModelConfig(model, "float32", "cpu", None, False))
    best: dict[str, dict] = {}
    for rep in range(repeats):
        for name, fast in (("reference", False), ("fast", True)):
            cfg = RoutingAnalysisConfig(model=model, corpus=corpus, out=str(workdir / name), max_tokens=tokens,
                                        ctx=ctx, batch_size=batch_size, ablate_layers=ablate_layers, device="cpu",
                                        progress=False, **options)
            w, c = time.perf_counter(), time.process_time()
            analyze_routing(cfg, lm, tok, fast=fast)
            t = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}
            log(f"  run {rep + 1} {name:9s} wall {t['wall']:7.1f} s  cpu {t['cpu']:7.1f} s")
            best[name] = {k: min(v, best.get(name, t)[k]) for k, v in t.items()}
    problems = compare_tables(workdir / "reference", workdir / "fast")
    return {**best, "ratio_wall": best["reference"]["wall"] / best["fast"]["wall"],
            "ratio_cpu": best["reference"]["cpu"] / best["fast"]["cpu"], "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "data" / "demo-moe"))
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--ablate-layers", default="1,4,7")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny matmuls, shared machine)")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned: glibc settings of the routesae command (routesae.malloc), for both paths")
    args = ap.parse_args()

    import torch

    from routesae.malloc import tune_malloc

    tuned = args.malloc == "tuned" and tune_malloc()
    torch.set_num_threads(args.threads)
    print(f"model {Path(args.model).name}, {args.tokens} tokens ({args.split}), batches of {args.batch_size} x "
          f"{args.ctx}, ablate layers {args.ablate_layers}, {args.threads} thread(s), malloc "
          f"{'tuned' if tuned else 'default'}; "
          f"load average before {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        r = bench(args.model, args.corpus, args.tokens, args.batch_size, args.ctx, args.ablate_layers, args.repeats,
                  Path(tmp), split=args.split)
    for name in ("reference", "fast"):
        print(f"{name:9s} wall {r[name]['wall']:7.1f} s  cpu {r[name]['cpu']:7.1f} s")
    print(f"speedup   wall {r['ratio_wall']:.2f}x  cpu {r['ratio_cpu']:.2f}x; load average after "
          f"{os.getloadavg()[0]:.2f}")
    print("tables agree within tolerance" if not r["problems"] else "TABLES DIFFER: " + "; ".join(r["problems"]))
    sys.exit(1 if r["problems"] else 0)


if __name__ == "__main__":
    main()
