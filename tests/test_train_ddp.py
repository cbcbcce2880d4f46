"""DDP on CPU: two gloo processes, each with half of every global batch, equal a single-process run."""

from __future__ import annotations

import json

import pytest
import torch

from routesae.sae import load_sae
from routesae.train import TrainConfig, train
from tests.ranks import spawn_ranks
from tests.test_train import make_store

torch.set_num_threads(1)


def _worker(rank: int, cfg: TrainConfig) -> None:
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
    spawn_ranks(_worker, (two,), logs=tmp_path / "logs")

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


def _online_worker(rank: int, cfgs: list, ocfg) -> None:
    from routesae.online import train_online

    train_online(cfgs, ocfg)


def test_online_two_gloo_processes_equal_one(tiny_ckpt, tmp_path):
    """Online under DDP: each process runs the model on its own forward batches (j % 2 == rank) and trains
    on them; with mixing off and a step = two full forward batches, that is the single process's batch."""
    from routesae.online import OnlineConfig, train_online
    from routesae.store import Store
    from routesae.train_many import expand_sweep

    store = make_store(tiny_ckpt("olmoe"), tmp_path / "s")
    ocfg = OnlineConfig(model=str(tiny_ckpt("olmoe")), corpus=str(store.parent / "corpus.jsonl"), layers="all",
                        ctx=32, batch_size=8, mix_tokens=0, sample_store=300)
    # init_samples 256 = forward batch 0 in both: rank 0's own first rows, broadcast to rank 1
    base = dict(store="", k=8, expansion=4, batch_tokens=512, tokens=512 * 4, lr=3e-3, dead_tokens=256,
                log_every=2, ckpt_every=2, progress=False, device="cpu", init_samples=256)
    one = expand_sweep(TrainConfig(out=str(tmp_path / "one"), **base), ["routesae", "topk"], [8], [None],
                       ["faithful"])
    two = expand_sweep(TrainConfig(out=str(tmp_path / "two"), **base), ["routesae", "topk"], [8], [None],
                       ["faithful"])
    train_online(one, ocfg)
    spawn_ranks(_online_worker, (two, ocfg), logs=tmp_path / "logs")

    for a_cfg, b_cfg in zip(one, two):
        a, b = load_sae(a_cfg.out).state_dict(), load_sae(b_cfg.out).state_dict()
        for name in a:  # measured: max |DDP - single| 7e-7 (routesae), 6e-8 (topk)
            assert (b[name].double() - a[name].double()).abs().max().item() <= 1e-5, name
        assert torch.equal(a["tokens_since_fired"], b["tokens_since_fired"])
    from routesae.checkpoint import load_state

    cursor = load_state(tmp_path / "two" / "topk" / "checkpoint")["corpus_cursor"]
    assert cursor["world"] == 2 and cursor["ranks"] == [[0, 7], [0, 8]]  # 4 forward batches each
    sample = Store(tmp_path / "two" / "sample_store")  # captured by rank 0 after training
    assert sample.manifest["complete"] and sample.n_tokens == 300
    assert torch.equal(sample.load_resid(0), Store(tmp_path / "one" / "sample_store").load_resid(0))
