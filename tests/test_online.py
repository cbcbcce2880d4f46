"""Online training (routesae/online.py): equals store training on a capture of the same tokens, the sample
store equals a capture, resume from the corpus cursor, one-line errors; a sweep through the CLI."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from routesae.checkpoint import load_state
from routesae.cli import app
from routesae.online import OnlineConfig, train_online
from routesae.sae import load_sae
from routesae.store import Store
from routesae.train import TrainConfig, TrainingInterrupted
from routesae.train_many import expand_sweep, train_many
from tests.test_train import make_store

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tiny_ckpt, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model, corpus, store): the store captures the whole corpus, ctx 32, 8 contexts per forward, all 4 layers."""
    ckpt = tiny_ckpt("olmoe")
    store = make_store(ckpt, tmp_path_factory.mktemp("online"))
    return ckpt, store.parent / "corpus.jsonl", store


def _ocfg(data, **kw) -> OnlineConfig:
    ckpt, corpus, _ = data
    return OnlineConfig(**{**dict(model=str(ckpt), corpus=str(corpus), layers="all", ctx=32, batch_size=8,
                                  mix_tokens=0), **kw})


def _cfg(out: Path, **kw) -> TrainConfig:
    # batch 256 = one forward batch of 8 full contexts of 32 tokens; 8 steps stay inside the first pass
    base = dict(store="", out=str(out), k=8, expansion=4, batch_tokens=256, tokens=256 * 8, lr=3e-3,
                dead_tokens=256, log_every=3, ckpt_every=4, progress=False, device="cpu", init_samples=256)
    return TrainConfig(**{**base, **kw})


def _same(a: Path, b: Path) -> bool:
    x, y = load_sae(a).state_dict(), load_sae(b).state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_online_without_mixing_equals_store_training_in_capture_order(data, tmp_path):
    """Three SAEs from one forward pass equal the same three trained from the store of a capture of the
    same corpus, read in capture order (``order="sequential"``), bit for bit; the sample store is the
    store ``capture --max-tokens 300`` writes."""
    ckpt, corpus, store = data
    base = _cfg(tmp_path / "store-runs", store=str(store))
    from_store = expand_sweep(base, ["routesae", "topk", "mlsae"], [8], [None], ["faithful"])
    train_many(from_store, order="sequential")
    online = [replace(c, store="", out=str(tmp_path / "online" / Path(c.out).name)) for c in from_store]
    train_online(online, _ocfg(data, sample_store=300))
    for a, b in zip(from_store, online):
        assert _same(Path(a.out), Path(b.out)), a.arch
        for name in ("config.json", "sae.safetensors", "train_config.json", "metrics.jsonl", "checkpoint"):
            assert (Path(b.out) / name).exists()
    index = json.loads((tmp_path / "online" / "runs.json").read_text())
    assert [r["name"] for r in index["runs"]] == ["routesae", "topk", "mlsae"]
    assert {r["status"] for r in index["runs"]} == {"done"} and index["sample_store"] == "sample_store"
    tc = json.loads((tmp_path / "online" / "topk" / "train_config.json").read_text())
    assert tc["store"] == str(tmp_path / "online" / "sample_store") and tc["store_summary"]["online"] is True
    cursor = load_state(tmp_path / "online" / "topk" / "checkpoint")["corpus_cursor"]
    assert cursor == {"world": 1, "ranks": [[0, 8]], "buffered_rows": 0}  # 8 forward batches, all trained on

    from routesae.capture import CaptureConfig, capture
    ref = Store(capture(CaptureConfig(model=str(ckpt), corpus=str(corpus), out=str(tmp_path / "ref"), ctx=32,
                                      batch_size=8, layers="0,1,2,3", max_tokens=300, device="cpu",
                                      progress=False)))
    sample = Store(tmp_path / "online" / "sample_store")
    assert sample.manifest["complete"] and sample.n_tokens == 300
    assert sample.manifest["capture_args"] == ref.manifest["capture_args"]
    assert [s["tokens"] for s in sample.shards] == [s["tokens"] for s in ref.shards]
    for i in range(len(ref.shards)):
        assert torch.equal(sample.load_resid(i), ref.load_resid(i))
        got, want = sample.load_router(i), ref.load_router(i)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sample.tokens().equals(ref.tokens())


def test_online_resume_from_the_corpus_cursor(data, tmp_path):
    """SIGTERM at step 5, --resume: bit-equal to the uninterrupted run when the buffer is empty at the
    checkpoint (mixing off, a batch = one full forward batch); with mixing on it finishes from the cursor."""
    full, part = tmp_path / "full", tmp_path / "part"
    train_online([_cfg(full)], _ocfg(data))

    def stop(step, sae, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="stopped at step 5 of 8"):
        train_online([_cfg(part)], _ocfg(data), callback=stop)
    state = load_state(part / "checkpoint")
    assert state["step"] == 5 and state["corpus_cursor"]["ranks"] == [[0, 5]]
    with pytest.raises(ValueError, match="exists; pass --resume"):
        train_online([_cfg(part)], _ocfg(data))
    with pytest.raises(ValueError, match="trained online with ctx=32; repeat the original options"):
        train_online([_cfg(part, resume=True)], _ocfg(data, ctx=16))
    train_online([_cfg(part, resume=True)], _ocfg(data))
    assert _same(full, part)
    drop = lambda run: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}  # noqa: E731
                        for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert drop(full) == drop(part)

    # mixing on (a buffer of 4 batches): the rows in the buffer at the checkpoint are dropped, so the resumed
    # run reads on from the cursor and differs from the uninterrupted one, but finishes every step
    mixed = tmp_path / "mixed"
    with pytest.raises(TrainingInterrupted):
        train_online([_cfg(mixed)], _ocfg(data, mix_tokens=1024), callback=stop)
    cur = load_state(mixed / "checkpoint")["corpus_cursor"]
    assert cur["ranks"][0][1] > 5 and cur["buffered_rows"] > 0
    train_online([_cfg(mixed, resume=True)], _ocfg(data, mix_tokens=1024))
    steps = [json.loads(x)["step"] for x in (mixed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 8] and load_state(mixed / "checkpoint")["step"] == 8


def test_online_bad_inputs_are_one_line_and_write_nothing(data, tmp_path):
    ckpt, corpus, store = data
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="needs --tokens"):
        train_online([_cfg(out, tokens=None)], _ocfg(data))
    with pytest.raises(ValueError, match="--mix-tokens 300 must be at least twice"):
        train_online([_cfg(out)], _ocfg(data, mix_tokens=300))
    with pytest.raises(ValueError, match="layers .9. out of range"):
        train_online([_cfg(out)], _ocfg(data, layers="9"))
    with pytest.raises(ValueError, match="corpus .* does not exist"):
        train_online([_cfg(out)], _ocfg(data, corpus=str(tmp_path / "nope.jsonl")))
    assert not out.exists()
    common = ["--k", "4", "--latents", "32", "--batch-tokens", "256", "--device", "cpu", "-q"]
    for args, words in [
        (["train", str(store), "--model", str(ckpt), "--corpus", str(corpus)], "not both"),
        (["train", "--model", str(ckpt)], "needs both --model and --corpus"),
        (["train"], "give a STORE"),
        (["train", str(store), "--mix-tokens", "0"], "--mix-tokens is for online training"),
        (["train", str(store), "--k", "4,x"], "--k '4,x' is not an integer"),
        (["train", str(store), "--arch", "topk,topk"], "lists a value twice"),
        (["train", str(store), "--arch", "topk,crosscoder"], "unknown --arch 'crosscoder'"),
    ]:
        res = runner.invoke(app, ["train", "--out", str(out), *common, *args[1:]])
        assert res.exit_code == 2 and res.output.count("\n") == 1 and words in res.output, res.output
    assert not out.exists()


def test_cli_online_sweep_then_resume(data, tmp_path):
    """`routesae train --model --corpus --arch routesae,topk --k 4,8`: four runs and runs.json; a second call
    needs --resume and then finds every run finished."""
    ckpt, corpus, _ = data
    out = tmp_path / "sweep"
    def args(k: str) -> list[str]:
        return ["train", "--model", str(ckpt), "--corpus", str(corpus), "--out", str(out), "--arch", "routesae,topk",
                "--k", k, "--latents", "32", "--tokens", "1024", "--batch-tokens", "256", "--ctx", "32",
                "--layers", "1:3", "--mix-tokens", "512", "--device", "cpu", "-q"]

    res = runner.invoke(app, args("4,8"))
    assert res.exit_code == 0, res.output
    assert "4 runs in" in res.output
    index = json.loads((out / "runs.json").read_text())
    assert [r["name"] for r in index["runs"]] == ["routesae-k4", "routesae-k8", "topk-k4", "topk-k8"]
    assert index["runs"][0]["layers"] == [1, 2, 3] and index["runs"][2]["layers"] == [2]
    assert load_sae(out / "topk-k8").cfg.k == 8
    res = runner.invoke(app, args("4,8"))
    assert res.exit_code == 2 and "pass --resume" in res.output, res.output
    res = runner.invoke(app, [*args("4,8"), "--resume"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args("4,16"), "--resume"])
    assert res.exit_code == 2 and "holds the sweep" in res.output, res.output


def test_transformerlens_backend_equals_its_capture(data, tmp_path):
    """--backend tl: online training equals store training on a TransformerLens capture of the same tokens."""
    pytest.importorskip("transformer_lens")
    from routesae.capture import CaptureConfig, capture

    ckpt, corpus, _ = data
    store = capture(CaptureConfig(model=str(ckpt), corpus=str(corpus), out=str(tmp_path / "store"), backend="tl",
                                  ctx=32, batch_size=8, layers="all", max_tokens=1200, device="cpu", progress=False))
    base = _cfg(tmp_path / "store-runs", store=str(store), tokens=256 * 4)
    from_store = expand_sweep(base, ["routesae", "topk"], [8], [None], ["faithful"])
    train_many(from_store, order="sequential")
    online = [replace(c, store="", out=str(tmp_path / "online" / Path(c.out).name)) for c in from_store]
    train_online(online, _ocfg(data, backend="tl"))
    for a, b in zip(from_store, online):
        assert _same(Path(a.out), Path(b.out)), a.arch
    # an online run is not resumed from a store (nor a store run online)
    from routesae.train import train

    with pytest.raises(ValueError, match="was trained online; resume it with routesae train --model"):
        train(replace(online[1], store=str(store), resume=True))
    with pytest.raises(ValueError, match="was trained on a store; resume it with routesae train STORE"):
        train_online([replace(from_store[1], store="", resume=True)], _ocfg(data, backend="tl"))
