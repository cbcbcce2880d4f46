"""Many SAEs from one read of a store against one run per SAE: tokens/s and peak memory, side by side.

    python bench/multi_sae.py [--store DIR] [--tokens 32768] [--arch routesae,topk,mlsae] [--k 32]
                              [--latents M] [--batch-tokens 4096] [--threads 1] [--device cpu]

One store: ``--store`` if given, else a capture of ``--tokens`` tokens of ``data/corpus`` into a
temporary store by ``data/demo-moe`` (or a random OLMoE of its shape; ``build_store`` of
bench/train.py), the RouteSAE layer range. Then, each in a fresh Python process (so that its peak
resident memory is its own):

* ``together``: ``routesae.train_many.train_many`` over every combination of ``--arch`` x ``--k``
  (one pass over the store, one read of each shard for all SAEs);
* ``separate``: ``routesae.train.train`` once per combination, one after the other (each reads the
  store itself; TopK reads its one layer only).

Every run trains one pass over the store with the default recipe (geometric-median init from a
store sample, final checkpoint; ``ckpt_every`` beyond the last step). Timed: the ``train_many`` /
``train`` call (store open, initialisation, the loop, the final checkpoint), not the imports.
Memory: the peak resident set (``VmHWM``) of each process, and that peak above the process's
resident set after its imports (torch etc.).

Prints one line per process, then the ratios side by side: tokens/s (all SAEs' tokens over wall
time) together / separate, and peak RSS together / the largest separate run (runs one after the
other) and together / the sum of the separate runs (runs side by side).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB. Not ``ru_maxrss``: Linux carries that over
    ``execve`` from the parent, so a child started by a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _configs(args: argparse.Namespace, out: Path):
    from routesae.train import TrainConfig
    from routesae.train_many import expand_sweep, parse_list

    base = TrainConfig(store=args.store, out=str(out), batch_tokens=args.batch_tokens, latents=args.latents,
                       ckpt_every=10**9, progress=False, device=args.device)
    return expand_sweep(base, parse_list("--arch", args.arch, str), parse_list("--k", args.k, int),
                        [args.latents], [base.router])


def child(args: argparse.Namespace) -> None:
    """One measured process: ``together`` or ``separate:I``; prints one JSON line."""
    import torch

    from routesae.store import Store
    from routesae.train import train
    from routesae.train_many import train_many

    torch.set_num_threads(args.threads)
    base_rss = _status_mb("VmRSS")
    work = Path(args.workdir) / args.child.replace(":", "-")
    cfgs = _configs(args, work)
    t0 = time.perf_counter()
    if args.child == "together":
        train_many(cfgs, root=work)
        n = len(cfgs)
    else:
        cfg = cfgs[int(args.child.split(":")[1])]
        cfg.out = str(work)
        train(cfg)
        n = 1
    seconds = time.perf_counter() - t0
    tokens = Store(args.store).n_tokens // args.batch_tokens * args.batch_tokens
    peak = _status_mb("VmHWM")
    print(json.dumps({"run": args.child, "saes": n, "seconds": seconds, "tokens": tokens * n,
                      "peak_rss_mb": peak, "base_rss_mb": base_rss}))


def _run(args: argparse.Namespace, which: str, workdir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--store", args.store, "--workdir", workdir,
           "--arch", args.arch, "--k", args.k, "--batch-tokens", str(args.batch_tokens), "--threads",
           str(args.threads), "--device", args.device] + (["--latents", str(args.latents)] if args.latents else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{which} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench(args: argparse.Namespace, log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-multi-") as tmp:
        if args.store is None:
            spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            args.store = str(mod.build_store(Path(tmp), tokens=args.tokens, device=args.device))
        from routesae.store import Store

        s = Store(args.store)
        n = len(_configs(args, Path(tmp) / "x"))
        log(f"store {args.store}: {s.n_tokens:,} tokens, layers {s.layers}, d_model {s.d_model}; {n} SAEs "
            f"({args.arch} x k {args.k}), batch {args.batch_tokens}, {args.threads} thread(s), {args.device}")
        together = _run(args, "together", tmp)
        separate = [_run(args, f"separate:{i}", tmp) for i in range(n)]
        for r in [together, *separate]:
            rate = r["tokens"] / r["seconds"]
            log(f"  {r['run']:<12} {r['saes']} SAE(s) {r['seconds']:7.2f} s  {rate:>10,.0f} tok/s  "
                f"peak RSS {r['peak_rss_mb']:7.1f} MiB ({r['peak_rss_mb'] - r['base_rss_mb']:6.1f} above imports)")
        tok_t = together["tokens"] / together["seconds"]
        tok_s = sum(r["tokens"] for r in separate) / sum(r["seconds"] for r in separate)
        peak_max = max(r["peak_rss_mb"] for r in separate)
        peak_sum = sum(r["peak_rss_mb"] for r in separate)
        above_t = together["peak_rss_mb"] - together["base_rss_mb"]
        above_max = max(r["peak_rss_mb"] - r["base_rss_mb"] for r in separate)
        res = {"tokens_per_s": {"together": tok_t, "separate": tok_s}, "ratio_tokens_per_s": tok_t / tok_s,
               "ratio_peak_rss_vs_largest": together["peak_rss_mb"] / peak_max,
               "ratio_peak_rss_vs_sum": together["peak_rss_mb"] / peak_sum,
               "ratio_peak_above_imports_vs_largest": above_t / above_max if above_max > 0 else float("nan")}
        log(f"ratio together/separate: tokens/s {res['ratio_tokens_per_s']:.2f}x | peak RSS "
            f"{res['ratio_peak_rss_vs_largest']:.2f}x the largest separate run (one after the other), "
            f"{res['ratio_peak_rss_vs_sum']:.2f}x their sum (side by side) | peak above imports "
            f"{res['ratio_peak_above_imports_vs_largest']:.2f}x the largest")
        return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", help="an existing store (default: capture --tokens of data/corpus)")
    p.add_argument("--tokens", type=int, default=32_768, help="tokens to capture when no --store is given")
    p.add_argument("--arch", default="routesae,topk,mlsae", help="architectures (comma-separated)")
    p.add_argument("--k", default="32", help="k values (comma-separated)")
    p.add_argument("--latents", type=int, default=None, help="dictionary size (default 8 x d_model)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
