"""Multi-process capture: two gloo processes on CPU write one store whose rows equal a single-process capture."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from routesae.capture import CaptureConfig, capture
from routesae.store import Store, StoreError
from tests.ranks import spawn_ranks

torch.set_num_threads(1)


class Stop(Exception):
    pass


def _worker(rank: int, cfg: CaptureConfig, record: str, stop_rank: int | None) -> None:
    def on_shard(shard: dict) -> None:
        with open(f"{record}-{rank}", "a") as f:
            f.write(f"{shard['index']}\n")
        if rank == stop_rank:  # killed after its first shard of this run
            raise Stop

    capture(cfg, on_shard=on_shard)


def _spawn(cfg: CaptureConfig, record: Path, stop_rank: int | None = None) -> None:
    spawn_ranks(_worker, (cfg, str(record), stop_rank), logs=record.with_name(record.name + "-logs"))


def _cfg(ckpt, corpus, out, **kw) -> CaptureConfig:
    base = dict(model=str(ckpt), corpus=str(corpus), out=str(out), ctx=24, batch_size=3, layers="all",
                shard_mb=0.01, device="cpu", progress=False, seed=1)
    return CaptureConfig(**{**base, **kw})


def _rows(store: Store):
    """Token table, residual rows and router arrays of the whole store, sorted by (context, ctx_pos)."""
    tokens = store.tokens()
    order = torch.tensor(tokens.sort_values(["context", "ctx_pos"], kind="stable").index.to_numpy())
    resid = torch.cat([store.load_resid(s["index"]) for s in store.shards])[order]
    router = {k: torch.cat([store.load_router(s["index"])[k] for s in store.shards])[order]
              for k in store.load_router(0)}
    return tokens.iloc[order.numpy()].drop(columns=["shard", "row"]).reset_index(drop=True), resid, router


def _assert_same_rows(one: Store, two: Store) -> None:
    t1, r1, x1 = _rows(one)
    t2, r2, x2 = _rows(two)
    pd.testing.assert_frame_equal(t1, t2)
    assert torch.equal(r1, r2)  # the same batches in both: bit-identical rows
    assert x1.keys() == x2.keys() and all(torch.equal(x1[k], x2[k]) for k in x1)


def test_two_processes_equal_one_and_readers_accept_the_store(tiny_ckpt, corpus_jsonl, tmp_path, one_thread):
    ckpt = tiny_ckpt("olmoe")
    one = Store(capture(_cfg(ckpt, corpus_jsonl, tmp_path / "one")))
    _spawn(_cfg(ckpt, corpus_jsonl, tmp_path / "two"), tmp_path / "shards")
    two = Store(tmp_path / "two")
    m = two.manifest
    assert m["complete"] and m["world_size"] == 2 and m["capture_args"]["world_size"] == 2
    assert two.n_tokens == one.n_tokens and [s["index"] for s in two.shards] == list(range(len(two.shards)))
    assert [r["shards"] for r in m["ranks"]] == [list(range(0, len(two.shards), 2)),
                                                list(range(1, len(two.shards), 2))]
    assert len(two.shards) >= 4
    _assert_same_rows(one, two)
    # no two processes wrote the same file: each shard once, named by its global index
    written = [int(x) for r in (0, 1) for x in (tmp_path / f"shards-{r}").read_text().split()]
    assert sorted(written) == list(range(len(two.shards)))

    # ordinary readers, unchanged
    two.verify()
    seen = torch.cat([b.rows for b in two.batches(16, seed=0)])
    assert (seen[:, 0] * 10_000 + seen[:, 1]).unique().numel() == seen.shape[0]
    from routesae.analyze import AnalyzeConfig, analyze
    from routesae.evaluate import EvalConfig, evaluate
    from routesae.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(store=str(two.root), out=str(run), arch="routesae", k=4, expansion=2, batch_tokens=64,
                      tokens=64 * 4, progress=False, device="cpu"))
    res = evaluate(EvalConfig(run=str(run), device="cpu", splice_contexts=2))
    assert res["splice"]["model_check"]["value"] < 1e-5 and res["sae_space"]["nmse"] > 0
    out = analyze(AnalyzeConfig(run=str(run), with_model=False, device="cpu", top_contexts=2))
    assert (out / "summary.json").exists()


def test_killed_rank_resumes_from_its_own_shards(tiny_ckpt, corpus_jsonl, tmp_path, one_thread):
    ckpt = tiny_ckpt("qwen2_moe")  # router extras (shared_gate) too; pad packing and a global --max-tokens
    kw = dict(packing="pad", max_tokens=333)
    one = Store(capture(_cfg(ckpt, corpus_jsonl, tmp_path / "one", **kw)))
    cfg = _cfg(ckpt, corpus_jsonl, tmp_path / "two", **kw)
    with pytest.raises(Exception, match="Stop"):
        _spawn(cfg, tmp_path / "first", stop_rank=1)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["shards"] == []
    rank1 = json.loads((tmp_path / "two" / "ranks" / "rank-00001.json").read_text())
    assert [s["index"] for s in rank1["shards"]] == [1] and not rank1["complete"]
    from typer.testing import CliRunner

    from routesae.cli import app

    info = CliRunner().invoke(app, ["store", "info", str(tmp_path / "two")])
    assert info.exit_code == 0 and "tokens     0 in 0 shard(s); complete: False" in info.output, info.output
    # rank 0 may have been stopped before its first shard: count the progress files there are
    done = sum(s["tokens"] for f in (tmp_path / "two" / "ranks").glob("rank-*.json")
               for s in json.loads(f.read_text())["shards"])
    assert f"the ranks have written {done:,} tokens so far" in info.output

    # a single process may not continue a two-process store; nothing is touched
    before = {p: p.read_bytes() for p in (tmp_path / "two").rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match=r"captured by 2 process\(es\).*torchrun --nproc_per_node 2") as err:
        capture(cfg)
    assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in (tmp_path / "two").rglob("*") if p.is_file()} == before

    _spawn(cfg, tmp_path / "again")
    again = (tmp_path / "again-1").read_text().split()
    assert again and "1" not in again  # rank 1 went on after its own last shard
    two = Store(tmp_path / "two")
    assert two.n_tokens == one.n_tokens == 333 and two.manifest["complete"]
    _assert_same_rows(one, two)
    two.verify()


def test_bad_torchrun_settings_are_one_line_errors(tiny_ckpt, corpus_jsonl, tmp_path, monkeypatch):
    from routesae.capture_checks import CaptureError

    out = tmp_path / "s"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CaptureError, match="--device-map auto places one model over all GPUs.*drop it"):
        capture(_cfg(tiny_ckpt("olmoe"), corpus_jsonl, out, device_map="auto"))
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(CaptureError, match="RANK / LOCAL_RANK are missing or not numbers; start the processes with "
                                           "torchrun"):
        capture(_cfg(tiny_ckpt("olmoe"), corpus_jsonl, out))
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(CaptureError, match="RANK 5 is outside WORLD_SIZE 2"):
        capture(_cfg(tiny_ckpt("olmoe"), corpus_jsonl, out))
    assert not out.exists()
