"""DDP on CPU: two gloo processes, each with half of every global batch, equal a single-process run."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from routesae.sae import load_sae
from routesae.train import TrainConfig, train
from tests.test_train import make_store

torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    train(cfg)


@pytest.mark.parametrize("arch", ["routesae"])
def test_two_gloo_processes_equal_one(arch, tiny_ckpt, tmp_path):
    store = make_store(tiny_ckpt("olmoe"), tmp_path / "s")
    # dead_tokens=256: latents die after one batch, so the all-reduced dead-latent counters and AuxK matter
    base = dict(store=str(store), arch=arch, k=8, expansion=8, batch_tokens=256, tokens=256 * 24, lr=3e-3,
                dead_tokens=256, log_every=4, ckpt_every=8, progress=False, device="cpu")
    one = TrainConfig(out=str(tmp_path / "one"), **base)
    two = TrainConfig(out=str(tmp_path / "two"), **base)
    train(one)
    mp.spawn(_worker, args=(2, _free_port(), two), nprocs=2, join=True)

    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["resolved"]["world_size"] == 2
    a, b = load_sae(one.out).state_dict(), load_sae(two.out).state_dict()
    # measured: max |DDP - single| 1.2e-6 (W_dec), <= 9e-8 elsewhere; counters exactly equal
    for name in a:
        assert (b[name].double() - a[name].double()).abs().max().item() <= 1e-5, name
    assert torch.equal(a["tokens_since_fired"], b["tokens_since_fired"])  # the counters see the global batch
    ra = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["routed_hist"] == y["routed_hist"] and x["dead_frac"] == y["dead_frac"]
        assert y["nmse"] == pytest.approx(x["nmse"], abs=1e-5) and y["aux"] == pytest.approx(x["aux"], abs=1e-5)
    assert any(r["aux"] > 0 for r in ra)
