"""Many SAEs from one read of a store (routesae/train_many.py): each sub-run equals its single run, resume,
a diverged sub-run stops alone."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from routesae.checkpoint import load_state
from routesae.sae import load_sae
from routesae.train import TrainConfig, TrainingDiverged, TrainingInterrupted, train
from routesae.train_many import expand_sweep, train_many
from tests.test_train import make_store

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tiny_ckpt, tmp_path_factory) -> Path:
    return make_store(tiny_ckpt("olmoe"), tmp_path_factory.mktemp("many-store"))


def _sweep(store: Path, out: Path, **kw) -> list[TrainConfig]:
    base = TrainConfig(**{**dict(store=str(store), out=str(out), k=8, expansion=4, batch_tokens=256, tokens=256 * 12,
                                 lr=3e-3, dead_tokens=256, log_every=3, ckpt_every=4, progress=False), **kw})
    return expand_sweep(base, ["routesae", "topk", "mlsae"], [8, 4], [None], ["faithful", "ste"])


def _same(a: Path, b: Path) -> bool:
    x, y = load_sae(a).state_dict(), load_sae(b).state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_each_sub_run_equals_its_single_run(store, tmp_path):
    cfgs = _sweep(store, tmp_path / "many")
    names = [Path(c.out).name for c in cfgs]
    assert names == ["routesae-k8-faithful", "routesae-k8-ste", "routesae-k4-faithful", "routesae-k4-ste",
                     "topk-k8", "topk-k4", "mlsae-k8", "mlsae-k4"]  # the router is swept for RouteSAE only
    train_many(cfgs)
    index = json.loads((tmp_path / "many" / "runs.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["done"] * 8 and index["source"]["order"] == "shuffle"
    for c in cfgs[1::2]:  # every other sub-run, trained alone with the same options: the same SAE, bit for bit
        alone = replace(c, out=str(tmp_path / "alone" / Path(c.out).name))
        train(alone)
        assert _same(Path(c.out), Path(alone.out)), c.out
        assert json.loads((Path(c.out) / "train_config.json").read_text())["store_summary"]["identity"]


def test_sweep_sigterm_then_resume_equals_uninterrupted(store, tmp_path):
    full = _sweep(store, tmp_path / "full")[:3]
    train_many(full)

    def stop(step, sae, record):
        if step == 6 and sae.cfg.router == "ste":
            os.kill(os.getpid(), signal.SIGTERM)

    part = _sweep(store, tmp_path / "part")[:3]
    with pytest.raises(TrainingInterrupted, match=r"stopped at step 6 of 12.*part/\*/checkpoint"):
        train_many(part, callback=stop)
    assert {json.loads((tmp_path / "part" / "runs.json").read_text())["runs"][i]["status"] for i in range(3)} == {
        "interrupted"}
    assert all(load_state(Path(c.out) / "checkpoint")["step"] == 6 for c in part)
    with pytest.raises(ValueError, match="exists; pass --resume"):
        train_many(part)
    train_many([replace(c, resume=True) for c in part])
    for a, b in zip(full, part):
        assert _same(Path(a.out), Path(b.out)), a.out


def test_a_diverged_sub_run_stops_alone(store, tmp_path):
    cfgs = _sweep(store, tmp_path / "nan")[:3]

    def damage(step, sae, record):
        if step == 5 and sae.cfg.router == "ste":
            with torch.no_grad():
                sae.W_enc.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"1 of 3 SAEs diverged \(routesae-k8-ste"):
        train_many(cfgs, callback=damage)
    runs = json.loads((tmp_path / "nan" / "runs.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["done", "diverged", "done"]
    assert "last good checkpoint" in runs[1]["error"]
    assert load_state(Path(cfgs[1].out) / "checkpoint")["step"] == 4  # the last good one is kept
    assert load_state(Path(cfgs[2].out) / "checkpoint")["step"] == 12


def test_sweep_out_must_be_new_or_a_sweep(store, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no sweep"):
        train_many(_sweep(store, tmp_path / "other"))
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_cli_store_sweep(store, tmp_path):
    from typer.testing import CliRunner

    from routesae.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["train", str(store), "--out", str(out), "--arch", "routesae,topk", "--k", "4",
                                   "--latents", "32,64", "--layers", "1:3", "--layer", "2", "--batch-tokens", "256",
                                   "--tokens", "1024", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert "4 runs in" in res.output and "runs.json" in res.output
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert [(r["name"], r["layers"], r["latents"]) for r in runs] == [
        ("routesae-m32", [1, 2, 3], 32), ("routesae-m64", [1, 2, 3], 64), ("topk-m32", [2], 32), ("topk-m64", [2], 64)]
    assert load_sae(out / "routesae-m64").cfg.router == "ste"  # the recipe's router
