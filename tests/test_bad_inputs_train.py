"""Hardening of training and export (issue 13): bad inputs are refused with one line, nothing is written.

Also the good cases of the same pass: a ``kill -9`` of ``routesae train`` resumes to the same SAE
bit for bit, and a store that was moved (or re-captured into the same shards) resumes a run.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from routesae.checkpoint import load_state
from routesae.cli import app
from routesae.sae import SAEConfig, SparseAutoencoder, build_sae
from routesae.store import Store, StoreWriter
from routesae.train import TrainConfig, TrainingInterrupted, train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
MARKER_NAME = "PWNED"


class _Payload:
    """Unpickling this creates a marker file: what a crafted checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def synthetic_store(folder: Path, seed: int = 0, d: int = 16, shards: int = 4, n: int = 300) -> Path:
    """A store of random residuals (4 layers, ``shards`` shards of ``n`` tokens); same seed, same shards."""
    header = {"model": {"name_or_path": "synthetic"}, "d_model": d, "n_layers": 4, "layers": [0, 1, 2, 3],
              "moe_layers": []}
    w = StoreWriter(folder, header, {"synthetic": seed})
    gen = torch.Generator().manual_seed(seed)
    for i in range(shards):
        tokens = pd.DataFrame({"token_id": np.zeros(n, dtype=np.int64)})
        w.write_shard(torch.randn(n, 4, d, generator=gen), None, tokens, contexts_end=i + 1)
    w.finish()
    return folder


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its size, mtime and content digest (folders: None)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = None if p.is_dir() else (st.st_size, st.st_mtime_ns, hash(p.read_bytes()))
    return out


def refused(args: list[str], *words: str) -> str:
    """Run the CLI; it must exit 2 with one line containing every word."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    for w in words:
        assert w in res.output, (w, res.output)
    return res.output


def train_args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(store), "--out", str(out), "--k", "4", "--latents", "32", "--batch-tokens", "64",
            "--device", "cpu", "-q", *extra]


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(store=str(store), out=str(out), k=4, latents=32, batch_tokens=64, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return synthetic_store(tmp_path_factory.mktemp("bad-train") / "store")


@pytest.fixture(scope="module")
def finished_run(store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bad-train-run") / "run"
    train(_cfg(store, run, tokens=64 * 4))
    return run


# ---------------------------------------------------------------- 1. no code runs from a checkpoint


def test_pickle_payload_in_train_lm_checkpoint_is_refused_without_running(tmp_path):
    out, marker = tmp_path / "lm", tmp_path / MARKER_NAME
    (out / "checkpoint").mkdir(parents=True)
    torch.save({"step": 1, "x": _Payload(marker)}, out / "checkpoint" / "state.pt")
    before = snapshot(tmp_path)
    refused(["zoo", "train-lm", str(tmp_path / "corpus"), "--out", str(out), "--preset", "tiny", "--resume",
             "--device", "cpu"], "refused to load", str(out / "checkpoint" / "state.pt"), "start a new --out")
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_pickle_payload_in_sae_checkpoint_is_refused_without_running(store, finished_run, tmp_path):
    run, marker = tmp_path / "run", tmp_path / MARKER_NAME
    shutil.copytree(finished_run, run)
    torch.save({"step": 1, "x": _Payload(marker)}, run / "checkpoint" / "state.pt")
    before = snapshot(tmp_path)
    refused(train_args(store, run, "--tokens", "256", "--resume"), "refused to load",
            str(run / "checkpoint" / "state.pt"), "start a new --out")
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_train_lm_refuses_mistyped_checkpoint_and_unsafe_out(tmp_path):
    out = tmp_path / "lm"
    (out / "checkpoint").mkdir(parents=True)
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "step": 1, "epoch": 0, "consumed": 4,
             "elapsed": 1.0, "total_steps": 16, "tokens_per_step": 128, "config": {"n_layers": "../x"}}
    torch.save(state, out / "checkpoint" / "state.pt")
    before = snapshot(tmp_path)
    lm = ["zoo", "train-lm", str(tmp_path / "corpus"), "--preset", "tiny", "--device", "cpu", "--out"]
    refused([*lm, str(out), "--resume"], "state.pt config", "'n_layers'", "start a new --out")
    torch.save({**state, "step": "1"}, out / "checkpoint" / "state.pt")
    before = snapshot(tmp_path)
    refused([*lm, str(out), "--resume"], "state.pt", "'step'", "start a new --out")
    refused([*lm, str(out)], "holds a checkpoint", "--resume")  # without --resume: never overwritten
    (tmp_path / "file").write_text("x")
    refused([*lm, str(tmp_path / "file")], "is a file")
    before["file"] = snapshot(tmp_path)["file"]
    assert snapshot(tmp_path) == before


def _call_source(text: str, start: int) -> str:
    """The text of the call whose opening parenthesis is at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    return text[start:]


def test_no_unsafe_deserialisation_in_the_code():
    """``weights_only=False``, ``pickle.load(s)`` and a ``torch.load(`` without ``weights_only=True`` are banned."""
    files = [*(ROOT / "routesae").rglob("*.py"), *(ROOT / "dashboards").rglob("*.py"),
             *(ROOT / "analyses").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    assert len(files) > 30
    bad = []
    for path in files:
        text = path.read_text()
        for pattern in (r"weights_only\s*=\s*False", r"pickle\.loads?\s*\(", r"read_pickle\s*\(",
                        r"allow_pickle\s*=\s*True"):
            bad += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
        for m in re.finditer(r"torch\.load\s*\(", text):
            call = _call_source(text, m.end() - 1)
            if not re.search(r"weights_only\s*=\s*True", call):
                bad.append(f"{path.relative_to(ROOT)}: {call}")
    assert not bad, bad


# ---------------------------------------------------------------- 4. resume on another store


def test_resume_on_another_store_is_refused_and_a_moved_copy_is_accepted(store, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(_cfg(store, run, tokens=64 * 8, ckpt_every=100),
              callback=lambda s, sae, r: os.kill(os.getpid(), signal.SIGINT) if s == 3 else None)
    ident = Store(store).identity()
    assert load_state(run / "checkpoint")["store_identity"] == ident
    assert json.loads((run / "train_config.json").read_text())["store_summary"]["identity"] == ident

    other = synthetic_store(tmp_path / "other", seed=1)
    before = snapshot(tmp_path)
    msg = refused(train_args(other, run, "--tokens", "512", "--resume"), f"trained on store {store}",
                  f"{other} holds other data", "resume with the store it was trained on")
    assert ident[:12] in msg and Store(other).identity()[:12] in msg
    assert snapshot(tmp_path) == before

    # the same content elsewhere: a moved/renamed copy and a store re-captured into the same shards
    moved = tmp_path / "moved"
    shutil.copytree(store, moved)
    again = synthetic_store(tmp_path / "recaptured", seed=0)
    assert Store(moved).identity() == Store(again).identity() == ident
    res = runner.invoke(app, train_args(moved, run, "--tokens", "512", "--resume"))
    assert res.exit_code == 0, res.output
    assert load_state(run / "checkpoint")["step"] == 8


def test_restart_before_first_checkpoint_checks_train_config(store, finished_run, tmp_path):
    """A run that stopped before its first checkpoint has only train_config.json: its store and types count."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished_run / "train_config.json", run / "train_config.json")
    other = synthetic_store(tmp_path / "other", seed=2)
    before = snapshot(tmp_path)
    refused(train_args(other, run, "--tokens", "256", "--resume"), "holds other data")
    cfg = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**cfg, "k": True}))
    before = snapshot(tmp_path)
    refused(train_args(store, run, "--tokens", "256", "--resume"), "train_config.json", "'k'", "start a new --out")
    (run / "train_config.json").write_text("[1, 2]")
    before = snapshot(tmp_path)
    refused(train_args(store, run, "--tokens", "256", "--resume"), "train_config.json", "not a train_config")
    assert snapshot(tmp_path) == before


def test_mistyped_checkpoint_fields_are_refused(store, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = load_state(run / "checkpoint")
    for change, words in (({"train_config": {**state["train_config"], "k": True}}, ("train_config", "'k'")),
                          ({"step": 2.5}, ("'step'",)),
                          ({"window": {**state["window"], "sums": "x"}}, ("window",))):
        torch.save({**state, **change}, run / "checkpoint" / "state.pt")
        before = snapshot(tmp_path)
        refused(train_args(store, run, "--tokens", "256", "--resume"), "state.pt", *words, "start a new --out")
        assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 5. configs read from disk are validated


def _run_with_config(folder: Path, **change) -> Path:
    sae = build_sae(SAEConfig(arch="topk", d_in=8, n_latents=16, k=2, layers=[1], aux_k=0))
    sae.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    return folder


@pytest.mark.parametrize("layers", [["../../escape"], [1.5], [True], [-1], "1", []])
def test_export_refuses_crafted_layers_and_writes_nothing(layers, tmp_path):
    run = _run_with_config(tmp_path / "work" / "run", layers=layers)
    out = tmp_path / "work" / "exports" / "out"
    before = snapshot(tmp_path)
    refused(["export", str(run), "--out", str(out)], str(run / "config.json"), "layers")
    assert snapshot(tmp_path) == before  # nothing under the parent of --out, nor anywhere else
    assert not (tmp_path / "escape").exists() and not (tmp_path / "work" / "escape").exists()


@pytest.mark.parametrize("change,field", [
    ({"d_in": "8"}, "d_in"), ({"k": True}, "k"), ({"n_latents": 16.0}, "n_latents"), ({"aux_coef": float("nan")},
     "aux_coef"), ({"meta": []}, "meta"), ({"routing": 5}, "routing"), ({"standardize": "yes"}, "standardize"),
    ({"arch": "crosscoder"}, "arch"), ({"dead_tokens": None}, "dead_tokens"),
])
def test_run_config_types_are_checked(change, field, tmp_path):
    run = _run_with_config(tmp_path / "run", **change)
    with pytest.raises(ValueError) as e:
        SparseAutoencoder.read_config(run)
    msg = str(e.value)
    assert "\n" not in msg and str(run / "config.json") in msg and field in msg


def test_export_out_is_a_file(tmp_path):
    run = _run_with_config(tmp_path / "run")
    (tmp_path / "f").write_text("x")
    before = snapshot(tmp_path)
    refused(["export", str(run), "--out", str(tmp_path / "f")], "is a file")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 7. what --out may be


def test_out_that_is_not_a_run_folder_is_refused(store, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    shutil.copytree(store, tmp_path / "store")
    before = snapshot(tmp_path)
    refused(train_args(tmp_path / "store", tmp_path / "store"), "is a store", "choose a new or empty folder")
    refused(train_args(tmp_path / "store", tmp_path / "file"), "is a file")
    refused(train_args(tmp_path / "store", tmp_path / "notes"), "not empty and holds no routesae run")
    refused(train_args(tmp_path / "store", tmp_path / "notes", "--resume"), "not empty and holds no routesae run")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- good cases


def test_kill_9_then_resume_equals_uninterrupted(store, tmp_path, one_thread):
    steps, args = 120, ["--tokens", str(64 * 120), "--ckpt-every", "5"]
    full = tmp_path / "full"
    res = runner.invoke(app, train_args(store, full, *args))
    assert res.exit_code == 0, res.output
    part = tmp_path / "part"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "routesae.cli", *train_args(store, part, *args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (part / "checkpoint" / "state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert load_state(part / "checkpoint")["step"] < steps
    res = runner.invoke(app, train_args(store, part, *args, "--resume"))
    assert res.exit_code == 0, res.output
    assert_same_sae_file(part / "sae.safetensors", full / "sae.safetensors")
    assert load_state(part / "checkpoint")["step"] == steps


def assert_same_sae_file(a: Path, b: Path) -> None:
    """Every tensor bit for bit and the same metadata (safetensors orders metadata keys per process)."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), key


def test_bad_options_are_one_line_and_write_nothing(store, finished_run, tmp_path):
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    refused(train_args(store, out, "--k", "0"), "--k 0 must be at least 1")
    refused(train_args(store, out, "--k", "33"), "--k 33 is larger than the latent count 32")
    refused(train_args(store, out, "--tokens", "10"), "--tokens 10 must be at least --batch-tokens 64")
    refused(train_args(store, out, "--arch", "crosscoder"), "unknown --arch 'crosscoder'")
    refused(train_args(store, out, "--arch", "topk", "--layer", "9"), "layer 9 was not captured", "[0, 1, 2, 3]")
    assert snapshot(tmp_path) == before and not out.exists()

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(tmp_path)
    refused(train_args(store, run, "--tokens", "256"), "exists; pass --resume")
    assert snapshot(tmp_path) == before


def test_flipped_byte_in_a_shard_is_refused(store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    shard = bad / "acts-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    refused(train_args(bad, tmp_path / "out"), "acts-00001.safetensors does not match its sha256",
            "capture the store again")
    assert snapshot(tmp_path) == before
