"""Training recipes (routesae/recipe.py) and RouteSAE's layer-balance loss.

The reference recipe must reproduce the reference code's defining properties (zero biases at
step 0, nn.Linear's encoder init, a constant learning rate, decoder rows renormalised every 10
steps and only then); the balance loss is checked by hand and must spread routing on a store.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from routesae.cli import app
from routesae.recipe import RECIPES, recipe_name, recipe_options
from routesae.sae import SAEConfig, build_sae, load_sae
from routesae.sae.base import Prepared
from routesae.sae.route_stats import normalised_entropy
from routesae.store import Store, StoreWriter
from routesae.train import TrainConfig, train
from routesae.train_setup import initial_sae, resolve
from tests.test_train import make_store

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tiny_ckpt, tmp_path_factory) -> Path:
    return make_store(tiny_ckpt("olmoe"), tmp_path_factory.mktemp("recipe-store"))


def _cfg(store: Path, out: Path, recipe: str = "default", **kw) -> TrainConfig:
    base = dict(store=str(store), out=str(out), arch="routesae", k=8, expansion=4, batch_tokens=256,
                tokens=256 * 24, log_every=1, ckpt_every=100, progress=False, **recipe_options(recipe))
    return TrainConfig(**{**base, **kw})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_recipes_are_named_back():
    assert recipe_name(asdict(TrainConfig(store="s", out="o"))) == "default"
    assert recipe_name(asdict(TrainConfig(store="s", out="o", **recipe_options("reference")))) == "reference"
    assert recipe_name(asdict(TrainConfig(store="s", out="o", b_pre_init="zero"))) == "custom"
    assert RECIPES["reference"]["lr"] == 5e-4 and RECIPES["reference"]["aux_k"] == 0
    with pytest.raises(ValueError, match="unknown --recipe 'paper'; choose one of default, reference"):
        recipe_options("paper")


def test_reference_init_zero_biases_and_linear_encoder(store, tmp_path):
    cfg = _cfg(store, tmp_path / "r", "reference")
    s = Store(store)
    r = resolve(cfg, s, 1)
    sae_cfg = SAEConfig(arch="routesae", d_in=s.d_model, n_latents=r["latents"], k=8, layers=r["layers"])
    sae = initial_sae(cfg, sae_cfg, s, r, "cpu")
    d = s.d_model
    assert torch.count_nonzero(sae.b_pre) == 0 and torch.count_nonzero(sae.b_enc) == 0
    # nn.Linear(d, M).weight ~ U(-1/sqrt(d), 1/sqrt(d)): every entry inside the bound, rows of norm ~ sqrt(1/3)
    w = sae.W_enc.t()
    assert w.abs().max() <= 1 / math.sqrt(d) and w.abs().max() > 0.9 / math.sqrt(d)
    assert w.norm(dim=-1).mean().item() == pytest.approx(math.sqrt(1 / 3), rel=0.1)
    # decoder = the encoder's transpose with unit rows
    torch.testing.assert_close(sae.W_dec, w / w.norm(dim=-1, keepdim=True))
    # the default recipe: b_pre is the (non-zero) geometric median, W_enc = c W_dec^T (one fitted scale c)
    dflt = initial_sae(_cfg(store, tmp_path / "d"), sae_cfg, s, r, "cpu")
    assert dflt.layer_center.norm(dim=-1).min() > 0.1  # every layer's centre is set ...
    assert 0 < dflt.b_pre.norm() < dflt.layer_center.norm(dim=-1).min()  # ... so b_pre (median of the rest) is small
    assert torch.count_nonzero(dflt.b_enc) == 0
    c = dflt.W_enc.norm(dim=0)
    assert 0 < c.min() and (c.max() - c.min()) < 1e-5 * c.max()
    torch.testing.assert_close(dflt.W_enc.t() / c[:, None], dflt.W_dec)


def test_reference_recipe_constant_lr_and_renorm_period(store, tmp_path):
    norms: dict[int, torch.Tensor] = {}
    run = train(_cfg(store, tmp_path / "ref", "reference"),
                callback=lambda step, sae, rec: norms.__setitem__(step, sae.W_dec.detach().norm(dim=-1)))
    lrs = {m["lr"] for m in _metrics(run)}
    assert lrs == {5e-4}  # constant, no warm-up, no decay
    assert all(m["aux"] == 0 for m in _metrics(run))  # no AuxK
    for step, n in norms.items():
        off = (n - 1).abs().max().item()
        if step % 10 == 0:
            assert off < 1e-5, (step, off)  # renormalised after steps 10, 20
        else:
            assert off > 1e-6, (step, off)  # drifts in between: no projection, no renormalisation
    # the default recipe keeps every row at unit norm after every step, and warms up
    norms.clear()
    run = train(_cfg(store, tmp_path / "dflt", lr=3e-3),
                callback=lambda step, sae, rec: norms.__setitem__(step, sae.W_dec.detach().norm(dim=-1)))
    assert max((n - 1).abs().max().item() for n in norms.values()) < 1e-5
    lr = [m["lr"] for m in _metrics(run)]
    assert lr[0] < lr[5] and lr[-1] == 0.0


def test_balance_loss_by_hand():
    sae = build_sae(SAEConfig(arch="routesae", d_in=4, n_latents=8, k=2, layers=[0, 1, 2], route_balance=0.5))
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], requires_grad=True)
    prep = Prepared(x=torch.zeros(3, 4), mean=None, std=None, routed_layer=probs.argmax(-1), probs=probs)
    loss = sae.balance_loss(prep)
    # f = (2/3, 1/3, 0), P = (0.5, 1/3, 1/6): 3 * (2/3 * 1/2 + 1/3 * 1/3) = 4/3
    assert loss.item() == pytest.approx(4 / 3)
    loss.backward()
    # d/dp_t,i = L' f_i / B = f_i for B = L' = 3
    torch.testing.assert_close(probs.grad, torch.tensor([[2 / 3, 1 / 3, 0.0]] * 3))


def collapsing_store(folder: Path, d: int = 16, shards: int = 4, n: int = 512) -> Path:
    """4 synthetic layers of Gaussian noise, layers 2 and 3 sharing one strong direction. On it the
    faithful router without layer centres (seed 0, lr 3e-3) sends more than 99% of the tokens to layer 0
    within 96 steps."""
    header = {"model": {"name_or_path": "synthetic"}, "d_model": d, "n_layers": 4, "layers": [0, 1, 2, 3],
              "moe_layers": []}
    w = StoreWriter(folder, header, {"synthetic": "collapse"})
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    for i in range(shards):
        x = torch.randn(n, 4, d, generator=g)
        x[:, 3] = x[:, 3] * 0.3 + 3 * u
        x[:, 2] = x[:, 2] * 0.6 + 2 * u
        w.write_shard(x, None, pd.DataFrame({"token_id": np.zeros(n, dtype=np.int64)}), contexts_end=i + 1)
    w.finish()
    return folder


def test_balance_spreads_routing_and_is_logged(tmp_path):
    """The faithful router collapses onto one layer of a synthetic store; the balance loss keeps all four."""
    syn = collapsing_store(tmp_path / "store")
    kw = dict(k=4, lr=3e-3, tokens=256 * 96, log_every=8, center_init="zero", enc_init="transpose",
              router="faithful")
    plain = _metrics(train(_cfg(syn, tmp_path / "plain", **kw)))
    bal = _metrics(train(_cfg(syn, tmp_path / "bal", route_balance=1.0, **kw)))
    assert plain[-1]["routed_entropy"] < 0.2 and max(plain[-1]["routed_frac"]) > 0.95  # collapsed
    assert bal[-1]["routed_entropy"] > 0.9 and min(bal[-1]["routed_frac"]) > 0.15
    for m in (plain[-1], bal[-1]):  # the diagnostics of every log line
        assert sum(m["routed_frac"]) == pytest.approx(1.0)
        assert m["routed_entropy"] == pytest.approx(normalised_entropy(m["routed_frac"]))
        assert m["routed_frac"] == pytest.approx([c / sum(m["routed_hist"]) for c in m["routed_hist"]])
        assert 0 <= m["router_margin"] <= 1 and m["route_balance_loss"] >= 1 - 1e-6


def test_cli_recipe_and_explicit_options(store, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["train", str(store), "--out", str(out), "--recipe", "reference", "--k", "8",
                                   "--expansion", "4", "--batch-tokens", "256", "--tokens", "1024",
                                   "--renorm-every", "3", "-q"])
    assert res.exit_code == 0, res.output
    opts = json.loads((out / "train_config.json").read_text())
    got = (opts["b_pre_init"], opts["enc_init"], opts["decoder_norm"], opts["aux_k"])
    assert got == ("zero", "linear", "renorm", 0)
    assert (opts["warmup_frac"], opts["decay_frac"], opts["renorm_every"], opts["lr"]) == (0.0, 0.0, 3, 5e-4)
    res = CliRunner().invoke(app, ["train", str(store), "--out", str(tmp_path / "bad"), "--decoder-norm", "sphere"])
    assert res.exit_code == 2 and "unknown --decoder-norm 'sphere'; choose one of project, renorm" in res.output
    res = CliRunner().invoke(app, ["train", str(store), "--out", str(tmp_path / "bad"), "--arch", "topk",
                                   "--route-balance", "0.1"])
    assert res.exit_code == 2 and "--route-balance balances RouteSAE's layers" in res.output
    assert not (tmp_path / "bad").exists()


def _weiszfeld(x: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Geometric median by plain Weiszfeld iterations (the test's own oracle)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=-1).clamp_min(1e-9)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


@torch.no_grad()
def test_layer_centres_and_encoder_fit(tmp_path):
    syn = collapsing_store(tmp_path / "store")
    cfg = _cfg(syn, tmp_path / "r", center_init="median", enc_init="fit", k=4)
    s = Store(syn)
    r = resolve(cfg, s, 1)
    sae_cfg = SAEConfig(arch="routesae", d_in=s.d_model, n_latents=r["latents"], k=4, layers=r["layers"])
    sae = initial_sae(cfg, sae_cfg, s, r, "cpu")
    sample = torch.cat([s.load_resid(i) for i in range(len(s.shards))]).float()
    xs = (sample - sample.mean(-1, keepdim=True)) / (sample.std(-1, unbiased=False, keepdim=True) + 1e-6)
    for i in range(4):  # each centre is its layer's geometric median (the whole store is the sample here)
        torch.testing.assert_close(sae.layer_center[i], _weiszfeld(xs[:, i]), atol=2e-3, rtol=0)
    assert sae.layer_center[3].norm() > 3 * sae.layer_center[0].norm()  # the shared direction, layer 3 only
    # the fitted encoder scale makes the first reconstruction the least-squares best: c beats 0.9c and 1.1c
    x = sae.sae_input(sample)

    def sse(scale: float) -> float:
        val, idx = sae.encode(x)
        x_hat = (sae.decode(val, idx) - sae.b_pre) * scale + sae.b_pre
        return float((x - x_hat).pow(2).sum())

    assert sse(1.0) < sse(0.9) and sse(1.0) < sse(1.1)
    # and a transposed unit-norm encoder over-shoots on standardised inputs: the fitted scale is below 1
    assert sae.W_enc.norm(dim=0).mean() < 0.9
    # the centres travel with the SAE, and a file written before they existed loads with zero centres
    sae.save_pretrained(tmp_path / "saved")
    back = load_sae(tmp_path / "saved")
    torch.testing.assert_close(back.layer_center, sae.layer_center)
    h = sample[:50]
    torch.testing.assert_close(back.reconstruct(h)[0], sae.reconstruct(h)[0])
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "saved" / "sae.safetensors")
    del tensors["layer_center"]
    save_file(tensors, tmp_path / "saved" / "sae.safetensors")
    assert torch.count_nonzero(load_sae(tmp_path / "saved").layer_center) == 0


def test_evaluate_prints_and_records_the_routing_diagnostics(store, tmp_path):
    run = train(_cfg(store, tmp_path / "run", lr=3e-3, tokens=256 * 8))
    res = CliRunner().invoke(app, ["evaluate", str(run), "--store", str(store), "--no-splice", "--tokens", "1024",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rl = json.loads((run / "eval.json").read_text())["routed_layers"]
    assert rl["entropy"] == pytest.approx(normalised_entropy(rl["fractions"]))
    line = next(x for x in res.output.splitlines() if x.startswith("routed layers"))
    assert f"entropy {rl['entropy']:.2f}" in line and f"margin p1-p2 {rl['margin']:.2f}" in line
