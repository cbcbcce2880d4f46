"""The main job, ``routesae demo --quick``, end to end on the shipped demo MoE and corpus: every stage runs and
evaluates on held-out tokens, a second call reuses every finished stage without rewriting its files, an
interrupted SAE run is resumed from its checkpoint, ``--force`` recomputes.

The stages run at test sizes (``DemoConfig.sizes_override``, the only user of that knob): ``--quick`` itself
takes minutes on two cores. At the sizes below the first call takes about 20 s, the file about 70 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from routesae.checkpoint import find_checkpoint, load_state
from routesae.demo import DemoConfig, run_demo, train_config
from routesae.train import TrainingInterrupted, train

torch.set_num_threads(1)
SIZES = {"capture": 4096, "train": 8192, "latents": 256, "analyze": 2048, "eval": 1024}  # 2 steps of 4096 tokens
STAGES = ("capture", "train ", "resume ", "evaluate ", "analyze ", "report")


def _cfg(out: Path, **kw) -> DemoConfig:
    return DemoConfig(out=out, quick=True, device="cpu", sizes_override=SIZES, **kw)


def _run(cfg: DemoConfig) -> tuple[list[str], float]:
    lines: list[str] = []
    t0 = time.perf_counter()
    run_demo(cfg, log=lines.append)
    return lines, time.perf_counter() - t0


def _stages(lines: list[str]) -> list[str]:
    """The stage names the demo logged (``[   12s] train routesae ...`` -> ``train``)."""
    return [s.split("] ", 1)[1].split()[0] for s in lines if s.startswith("[") and "] " in s and
            s.split("] ", 1)[1].startswith(STAGES)]


def _outputs(root: Path) -> dict[str, Path]:
    files = {"store": root / "store" / "manifest.json", "store-val": root / "store-val" / "manifest.json",
             "analysis": root / "routesae" / "analysis" / "summary.json"}
    for arch in ("routesae", "topk"):
        for name in ("sae.safetensors", "train_config.json", "eval.json", "eval_store.json"):
            files[f"{arch}/{name}"] = root / arch / name
    return files


def _mtimes(root: Path) -> dict[str, int]:
    return {k: p.stat().st_mtime_ns for k, p in _outputs(root).items()}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("demo"))
    lines, seconds = _run(cfg)
    return cfg, lines, seconds


def test_first_call_runs_every_stage_on_held_out_tokens(first):
    cfg, lines, _ = first
    assert _stages(lines) == ["capture", "capture", "train", "evaluate", "train", "evaluate", "analyze", "report"]
    root = cfg.root
    assert all(p.is_file() for p in _outputs(root).values())
    assert (root / "routesae" / "report" / "report.html").is_file()
    comparison = root / "comparison" / "report.html"  # RouteSAE vs TopK, trained on the same store
    assert comparison.is_file() and f"comparison: {comparison}" in "\n".join(lines)
    assert "CE increase" in (root / "comparison" / "report.md").read_text()
    assert json.loads((root / "store-val" / "manifest.json").read_text())["capture_args"]["split"] == "val"
    for arch in ("routesae", "topk"):
        ev = json.loads((root / arch / "eval.json").read_text())
        assert ev["in_sample"] is False and ev["store"] == str(root / "store-val") and ev["store_split"] == "val"
        assert ev["token_range"]["stop"] == SIZES["eval"] and "ce_recovered" in ev["splice"]
    summary = json.loads((root / "routesae" / "analysis" / "summary.json").read_text())
    assert summary["in_sample"] is False and summary["token_range"]["stop"] == SIZES["analyze"]
    assert any("in_sample=False" in s for s in lines)


def test_second_call_reuses_every_stage(first):
    cfg, _, first_seconds = first
    before = _mtimes(cfg.root)
    lines, seconds = _run(cfg)
    assert _stages(lines) == ["capture", "capture", "report"]  # the captures find complete stores
    assert _mtimes(cfg.root) == before  # nothing was rewritten
    assert seconds < first_seconds


def test_interrupted_sae_run_is_resumed(first):
    cfg, _, _ = first
    run = cfg.root / "routesae"
    finished = load_file(run / "sae.safetensors")
    shutil.rmtree(run)  # start that run again, stopped after its first step
    with pytest.raises(TrainingInterrupted):
        train(train_config(cfg, "routesae"), callback=lambda *a: os.kill(os.getpid(), signal.SIGINT))
    state = load_state(find_checkpoint(run))
    assert state["step"] == 1 < state["total_steps"] == 2
    assert (run / "sae.safetensors").is_file()  # a stopped run holds an SAE too: not a sign of a finished one
    topk = (cfg.root / "topk" / "eval.json").stat().st_mtime_ns
    lines, _ = _run(cfg)
    assert _stages(lines) == ["capture", "capture", "resume", "evaluate", "analyze", "report"]
    assert load_state(find_checkpoint(run))["step"] == 2
    resumed = load_file(run / "sae.safetensors")
    assert resumed.keys() == finished.keys() and all(torch.equal(resumed[k], finished[k]) for k in finished)
    assert (cfg.root / "topk" / "eval.json").stat().st_mtime_ns == topk
    assert json.loads((run / "eval.json").read_text())["in_sample"] is False


def test_force_recomputes_every_stage(first):
    cfg, _, _ = first
    before = _mtimes(cfg.root)
    lines, _ = _run(_cfg(cfg.out, force=True))
    assert _stages(lines) == ["capture", "capture", "train", "evaluate", "train", "evaluate", "analyze", "report"]
    after = _mtimes(cfg.root)
    assert all(after[k] > before[k] for k in before)
