"""Peak memory of ``routesae analyze`` when the store doubles, measured side by side in one run.

    python bench/analyze.py [--model DIR] [--tokens 65536] [--latents 1536] [--k 32]

Captures two stores from the same model and corpus, N and 2N tokens, trains one small RouteSAE
on the smaller store, then runs the full analysis (features, feature x expert, expert tables; no
logit lens) once on each store, each in a fresh process, and prints each process's peak resident
memory (``ru_maxrss``) and the ratio. The goal: the 2N run stays within 10% of the N run, because
every accumulator has a fixed size and the store is read one shard at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
from routesae.analyze import AnalyzeConfig, analyze
run, store = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
analyze(AnalyzeConfig(run=run, store=store, with_model=False, tokens=10**12, device="cpu"))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0}))
"""


def _analyze_in_child(run: Path, store: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(run), str(store)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "data" / "demo-moe"))
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--tokens", type=int, default=65_536, help="tokens of the smaller store (the other has 2x)")
    ap.add_argument("--latents", type=int, default=1536)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--shard-mb", type=float, default=8.0)
    args = ap.parse_args()

    from routesae.capture import CaptureConfig, capture
    from routesae.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        stores = {}
        for n in (args.tokens, 2 * args.tokens):
            stores[n] = capture(CaptureConfig(model=args.model, corpus=args.corpus, out=str(tmp / f"store-{n}"),
                                              max_tokens=n, shard_mb=args.shard_mb, device="cpu", progress=False))
        run = train(TrainConfig(store=str(stores[args.tokens]), out=str(tmp / "run"), latents=args.latents, k=args.k,
                                tokens=min(args.tokens, 32_768), device="cpu", progress=False))
        results = {}
        for n, store in stores.items():
            t0 = time.perf_counter()
            results[n] = _analyze_in_child(run, store)
            results[n]["wall"] = time.perf_counter() - t0
        small, big = results[args.tokens], results[2 * args.tokens]
        print(f"model {Path(args.model).name}; RouteSAE {args.latents} latents, k={args.k}; "
              f"shards of {args.shard_mb} MiB")
        for n, r in results.items():
            print(f"analyze {n:>9,} tokens: peak RSS {r['peak_rss_mb']:8.1f} MiB, {r['seconds']:6.1f} s")
        print(f"ratio peak RSS (2N / N) = {big['peak_rss_mb'] / small['peak_rss_mb']:.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
