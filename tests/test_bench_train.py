"""bench/train.py runs end to end on a tiny store (2 timed steps); no assertion on speed."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _bench_and_store(tiny_ckpt, corpus_jsonl, tmp_path):
    torch.set_num_threads(1)
    bench = _load_bench()
    store = bench.build_store(tmp_path, model=str(tiny_ckpt("olmoe")), corpus=str(corpus_jsonl), tokens=512,
                              ctx=32, layers="all", device="cpu")
    return bench, store


def test_bench_train_smoke(tiny_ckpt, corpus_jsonl, tmp_path):
    bench, store = _bench_and_store(tiny_ckpt, corpus_jsonl, tmp_path)
    bc = bench.BenchConfig(store=str(store), workdir=str(tmp_path / "runs"), latents=64, k=4, batch_tokens=64,
                           steps=2, warmup=1, repeats=1, dead_frac=0.25, saelens_sparse=True)
    lines: list[str] = []
    res = bench.bench(bc, log=lines.append)
    assert set(res["median"]) == {"routesae-topk", "saelens-topk", "saelens-topk-sparse", "routesae"}
    assert all(v > 0 and math.isfinite(v) for v in res["median"].values())
    assert res["ratio"] > 0 and len(lines) == 4
    # both sides read the same rows: the first SAELens batch is our first TopK batch, standardised
    batches = bench.saelens_batches(bc)
    assert len(batches) == bc.warmup + bc.steps + 1 and batches[0].shape == (64, 32)
    assert torch.allclose(batches[0].pow(2).sum(-1), torch.full((64,), 32.0), rtol=1e-3)


def test_bench_reference_and_profile_smoke(tiny_ckpt, corpus_jsonl, tmp_path):
    """The RouteSAE-vs-reference comparison and the phase profile run; the profile's phases add up."""
    bench, store = _bench_and_store(tiny_ckpt, corpus_jsonl, tmp_path)
    bc = bench.BenchConfig(store=str(store), workdir=str(tmp_path / "runs"), k=4, batch_tokens=64, steps=2,
                           warmup=1, repeats=1)
    lines: list[str] = []
    res = bench.bench_reference(bc, latents=64, log=lines.append)
    assert set(res["median"]) == {"routesae-faithful", "routesae-ste", "reference"} and len(lines) == 3
    assert all(v > 0 and math.isfinite(v) for v in res["median"].values())
    batches = bench.reference_batches(bc)
    assert batches[0].ndim == 3 and batches[0].shape[0] == 64  # raw [B, L', d] rows of every layer

    from train_profile import PHASES, format_profile, profile_step

    from routesae.train import TrainConfig

    cfg = TrainConfig(store=str(store), out="-", arch="routesae", k=4, latents=64, batch_tokens=64, device="cpu",
                      init_samples=256)
    prof = profile_step(cfg, steps=2, warmup=1)
    assert list(prof["ms"]) == PHASES and all(v >= 0 for v in prof["ms"].values())
    assert math.isclose(prof["total_ms"], sum(prof["ms"].values()))
    text = format_profile(prof, "routesae")
    assert "bwd: sparse SAE" in text and "tok/s" in text
