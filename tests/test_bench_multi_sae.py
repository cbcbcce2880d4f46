"""bench/multi_sae.py runs end to end on a tiny store (two SAEs, three processes); no assertion on speed."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

from tests.test_train import make_store

ROOT = Path(__file__).resolve().parents[1]


def test_bench_multi_sae_smoke(tiny_ckpt, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_multi_sae", ROOT / "bench" / "multi_sae.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    store = make_store(tiny_ckpt("olmoe"), tmp_path / "s", n_docs=10)
    args = argparse.Namespace(store=str(store), tokens=0, arch="routesae,topk", k="4", latents=32, batch_tokens=256,
                              threads=1, device="cpu")
    lines: list[str] = []
    res = bench.bench(args, log=lines.append)
    assert len(lines) == 5 and lines[-1].startswith("ratio together/separate: tokens/s")
    assert all(v > 0 and math.isfinite(v) for k, v in res.items() if k.startswith("ratio"))
