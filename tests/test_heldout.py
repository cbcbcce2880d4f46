"""Held-out evaluation: a run records a validation store (train --eval-store) that evaluate and analyze read by
default; eval.json / summary.json say honestly whether the tokens trained the SAE (in_sample)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from routesae.analyze import AnalyzeConfig, analyze
from routesae.capture import CaptureConfig, capture
from routesae.evaluate import EvalConfig, evaluate
from routesae.heldout import EVAL_STORE
from routesae.store import Store, StoreError
from routesae.train import TrainConfig, train
from tests.conftest import DOCS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stores(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """A corpus folder with train-/val- shards of different documents; stores of both splits (and a second
    train-split store that reads the same documents as the first)."""
    root = tmp_path_factory.mktemp("heldout")
    corpus = root / "corpus"
    corpus.mkdir()
    for split, n in (("train", 24), ("val", 8)):
        with open(corpus / f"{split}-00000.jsonl", "w") as f:
            for i in range(n):
                domain, text = DOCS[i % len(DOCS)]
                f.write(json.dumps({"text": f"{split} document {i}: {text}", "domain": domain,
                                    "doc_id": f"{split}{i}"}) + "\n")
    ckpt = str(tiny_ckpt("olmoe"))

    def cap(name: str, split: str, max_tokens: int | None = None) -> Path:
        return capture(CaptureConfig(model=ckpt, corpus=str(corpus), out=str(root / name), ctx=32, batch_size=8,
                                     layers="1:2", shard_mb=0.05, split=split, max_tokens=max_tokens, device="cpu",
                                     progress=False))

    return {"train": cap("store", "train"), "val": cap("store-val", "val"),
            "train_again": cap("store-train-prefix", "train", max_tokens=300), "root": root}


def _train(stores, out: Path, **kw) -> Path:
    return train(TrainConfig(store=str(stores["train"]), out=str(out), arch="routesae", latents=64, k=4,
                             batch_tokens=128, tokens=128 * 6, device="cpu", progress=False, **kw))


@pytest.fixture(scope="module")
def runs(stores, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heldout-runs")
    return {"held": _train(stores, root / "held", eval_store=str(stores["val"])),
            "plain": _train(stores, root / "plain")}


def test_run_records_its_held_out_store(stores, runs):
    rec = json.loads((runs["held"] / EVAL_STORE).read_text())
    val = Store(stores["val"])
    assert rec["path"] == str(stores["val"]) and rec["identity"] == val.identity() and rec["split"] == "val"
    tc = json.loads((runs["held"] / "train_config.json").read_text())
    assert tc["eval_store"] == str(stores["val"]) and tc["store_summary"]["split"] == "train"
    assert not (runs["plain"] / EVAL_STORE).exists()


def test_evaluate_defaults_to_the_held_out_store(stores, runs, caplog):
    with caplog.at_level(logging.WARNING):
        ev = evaluate(EvalConfig(run=str(runs["held"]), device="cpu", tokens=200, splice=False))
    assert not [r for r in caplog.records if "training store" in r.getMessage()]
    assert ev["store"] == str(stores["val"]) and ev["store_source"] == EVAL_STORE
    assert ev["in_sample"] is False and ev["store_split"] == "val"
    assert ev["token_range"] == {"start": 0, "stop": 200, "store_tokens": Store(stores["val"]).n_tokens,
                                 "order": "the store's first rows in shard order"}
    assert json.loads((runs["held"] / "eval.json").read_text())["in_sample"] is False


def test_evaluate_without_held_out_store_warns_and_is_in_sample(stores, runs, caplog):
    with caplog.at_level(logging.WARNING):
        ev = evaluate(EvalConfig(run=str(runs["plain"]), device="cpu", tokens=200, splice=False))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("evaluating on the training store") and "in-sample" in lines[0]
    assert "pass --store for held-out tokens" in lines[0]
    assert ev["in_sample"] is True and ev["store_source"] == "training store"
    assert ev["store"] == str(stores["train"]) and "training store" in ev["in_sample_why"]


def test_explicit_store_is_labelled_honestly(stores, runs, caplog):
    # the training store passed by hand, and a moved copy of it, are in-sample (content identity)
    ev = evaluate(EvalConfig(run=str(runs["held"]), store=str(stores["train"]), device="cpu", tokens=100,
                             splice=False))
    assert ev["in_sample"] is True and ev["store_source"] == "--store"
    moved = stores["root"] / "moved-copy"
    os.symlink(stores["train"], moved)
    try:
        ev = evaluate(EvalConfig(run=str(runs["held"]), store=str(moved), device="cpu", tokens=100, splice=False))
    finally:
        moved.unlink()
    assert ev["in_sample"] is True and "same content identity" in ev["in_sample_why"]
    # another store of the training split holds other rows but the same documents: its tokens overlap
    ev = evaluate(EvalConfig(run=str(runs["held"]), store=str(stores["train_again"]), device="cpu", tokens=100,
                             splice=False))
    assert ev["in_sample"] is True and "same corpus documents" in ev["in_sample_why"]
    ev = evaluate(EvalConfig(run=str(runs["plain"]), store=str(stores["val"]), device="cpu", tokens=100,
                             splice=False))
    assert ev["in_sample"] is False and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_analyze_records_the_same_fields(stores, runs):
    out = analyze(AnalyzeConfig(run=str(runs["held"]), tokens=256, device="cpu", with_model=False))
    s = json.loads((out / "summary.json").read_text())
    assert s["store"] == str(stores["val"]) and s["in_sample"] is False and s["token_range"]["stop"] == 256
    out = analyze(AnalyzeConfig(run=str(runs["plain"]), tokens=256, device="cpu", with_model=False))
    assert json.loads((out / "summary.json").read_text())["in_sample"] is True


@pytest.mark.parametrize("which, match", [("train", "not held out"), ("train_again", "not held out"),
                                          ("missing", "not a store")])
def test_eval_store_refused_before_anything_is_written(stores, tmp_path, which, match):
    path = stores.get(which, tmp_path / "nowhere")
    out = tmp_path / "run"
    with pytest.raises(StoreError, match=match) as e:
        _train(stores, out, eval_store=str(path))
    assert "\n" not in str(e.value) and not out.exists()


def test_recorded_store_missing_is_one_line(stores, runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "sae.safetensors", "train_config.json"):
        (run / name).write_bytes((runs["held"] / name).read_bytes())
    (run / EVAL_STORE).write_text(json.dumps({"path": str(tmp_path / "gone")}))
    with pytest.raises(StoreError, match=r"held-out store .*gone.* missing.*--store") as e:
        evaluate(EvalConfig(run=str(run), device="cpu", tokens=100, splice=False))
    assert "\n" not in str(e.value) and not (run / "eval.json").exists()


def test_cli_train_eval_store_and_evaluate(stores, tmp_path):
    from typer.testing import CliRunner

    from routesae.cli import app

    runner, run = CliRunner(), tmp_path / "run"
    res = runner.invoke(app, ["train", str(stores["train"]), "--out", str(run), "--latents", "64", "--k", "4",
                              "--batch-tokens", "128", "--tokens", "256", "--device", "cpu", "--quiet",
                              "--eval-store", str(stores["val"])])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", str(run), "--tokens", "100", "--no-splice", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"store {stores['val']} ({EVAL_STORE}): tokens 0..100, held out" in res.output
    res = runner.invoke(app, ["train", str(stores["train"]), "--out", str(tmp_path / "bad"), "--batch-tokens", "128",
                              "--device", "cpu",
                              "--eval-store", str(stores["train"])])
    assert res.exit_code == 2 and "not held out" in res.output and not (tmp_path / "bad").exists()
