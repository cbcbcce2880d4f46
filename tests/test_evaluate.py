"""evaluate(): metrics against hand computations; splicing oracles (identity SAE, zero SAE, KL by hand)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from routesae.evaluate import EvalConfig, evaluate
from routesae.sae import SAEConfig, build_sae, standardize
from routesae.store import StoreError

torch.set_num_threads(1)
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("eval") / "store", batch_size=4, layers="0:2", shard_mb=0.02,
                      max_tokens=400)


def _sae(arch, layers, seed=0, **kw):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch=arch, d_in=32, n_latents=kw.pop("n_latents", 96), k=kw.pop("k", 8),
                              layers=layers, aux_k=0, bf16=False, **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.1)
    return sae


def _identity(arch, layers):
    """A dictionary that reconstructs every input exactly: +-e_i latents, k = d."""
    sae = _sae(arch, layers, n_latents=64, k=32)
    eye = torch.eye(32)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae


def _run(sae, store, tmp_path, name, **kw):
    run = tmp_path / name
    sae.save_pretrained(run)
    return evaluate(EvalConfig(run=str(run), store=str(store.root), device="cpu", batch_tokens=128, **kw))


def _all_rows(store, layers):
    return torch.cat([torch.stack([store.load_resid(s["index"], j) for j in layers], 1)
                      for s in store.shards]).float()


def _ev(x, x_hat):
    return 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _routing_by_hand(got, sae, h):
    """eval.json's routed-layer entropy from its counts, and its margin from ``sae.route`` on the same rows."""
    rl = got["routed_layers"]
    f = [c / sum(rl["counts"]) for c in rl["counts"]]
    assert rl["fractions"] == pytest.approx(f)
    assert rl["entropy"] == pytest.approx(-sum(x * math.log(x) for x in f if x > 0) / math.log(len(f)), abs=1e-12)
    probs, _ = sae.route(h)
    p = probs.double().sort(-1, descending=True).values
    assert rl["margin"] == pytest.approx(float((p[:, 0] - p[:, 1]).mean()), rel=1e-5)
    assert 0 < rl["entropy"] <= 1 and 0 < rl["margin"] < 1


@torch.no_grad()
def test_metrics_by_hand_topk_and_routesae(store, tmp_path):
    h = _all_rows(store, LAYERS)
    sae = _sae("topk", [1])
    got = _run(sae, store, tmp_path, "topk", splice=False)
    x = standardize(h[:, 1])[0]
    val, idx = sae.encode(x)
    x_hat = sae.decode(val, idx)
    s = got["sae_space"]
    assert got["tokens"] == store.n_tokens == s["examples"]
    assert s["nmse"] == pytest.approx(float(((x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()), rel=1e-5)
    assert s["explained_variance"] == pytest.approx(_ev(x.double(), x_hat.double()), rel=1e-5)
    assert s["l0"] == pytest.approx(float((val > 0).sum(-1).float().mean()), rel=1e-6)
    fired = torch.zeros(96, dtype=torch.bool)
    fired[idx[val > 0]] = True
    assert s["dead_fraction"] == pytest.approx(1 - fired.float().mean().item())
    h_hat, _ = sae.reconstruct(h[:, 1])
    assert got["raw_space"]["explained_variance"] == pytest.approx(_ev(h[:, 1].double(), h_hat.double()), rel=1e-5)
    assert json.loads((tmp_path / "topk" / "eval.json").read_text())["sae_space"] == s

    rsae = _sae("routesae", LAYERS, seed=1)
    got = _run(rsae, store, tmp_path, "route", splice=False)
    probs, pos = rsae.route(h)
    hist = got["routed_layers"]["counts"]
    assert sum(hist) == store.n_tokens and hist == torch.bincount(pos, minlength=3).tolist()
    xr = rsae.sae_input(h)
    xr_hat = rsae.decode(*rsae.encode(xr))
    assert got["sae_space"]["explained_variance"] == pytest.approx(_ev(xr.double(), xr_hat.double()), rel=1e-5)
    assert sum(p["sae_space"].get("examples", 0) for p in got["per_layer"]) == store.n_tokens
    assert got["mean_p_star"] == pytest.approx(float(probs.max(-1).values.mean()), rel=1e-5)
    _routing_by_hand(got, rsae, h)


def test_perfect_and_zero_sae_and_mlsae_per_layer(store, tmp_path):
    got = _run(_identity("mlsae", LAYERS), store, tmp_path, "ml", splice=False)
    assert got["sae_space"]["nmse"] == 0 and got["sae_space"]["explained_variance"] == 1
    assert got["sae_space"]["examples"] == 3 * store.n_tokens and got["raw_space"]["nmse"] < 1e-10
    assert [p["sae_space"]["examples"] for p in got["per_layer"]] == [store.n_tokens] * 3
    zero = _sae("topk", [2], standardize=False)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_pre.zero_()
    got = _run(zero, store, tmp_path, "zero", splice=False)
    x = _all_rows(store, [2])[:, 0].double()
    assert got["sae_space"]["nmse"] == pytest.approx(1.0)
    assert got["sae_space"]["explained_variance"] == pytest.approx(
        1 - float(x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-6)


@pytest.mark.parametrize("arch", ["topk", "routesae"])
def test_splice_identity_is_clean(arch, store, tmp_path):
    got = _run(_identity(arch, [1] if arch == "topk" else LAYERS), store, tmp_path, arch)
    sp = got["splice"]
    assert sp["clean_vs_store_max_abs_diff"] < 1e-4
    assert sp["ce_spliced"] == pytest.approx(sp["ce_clean"], abs=1e-5) and abs(sp["kl"]) < 1e-5
    assert sp["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    # max_tokens=400 cut the last context: it is skipped, every other one is used
    assert sp["contexts_skipped_incomplete"] == 1
    assert sp["tokens_real"] == 400 - 400 % 24 and sp["tokens_ce"] == sp["tokens_real"] - sp["contexts"]


def test_splice_zero_sae_recovers_nothing(store, tmp_path):
    zero = _sae("routesae", LAYERS, standardize=False)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_pre.zero_()
    sp = _run(zero, store, tmp_path, "zr")["splice"]
    assert sp["ce_recovered"] == 0 and sp["ce_spliced"] == sp["ce_zero_ablated"] and sp["kl"] == sp["kl_zero_ablated"]
    assert sp["kl"] > 0


def test_kl_and_ce_by_hand_one_context(store, tiny_ckpt, tmp_path):
    sae = _sae("topk", [1], seed=3)
    sp = _run(sae, store, tmp_path, "hand", splice_contexts=1)["splice"]
    t = store.tokens()
    ids = torch.tensor(t[t["context"] == t["context"].min()].sort_values("ctx_pos")["token_id"].to_numpy())[None]
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt("olmoe")).eval()
    with torch.no_grad():
        clean = model(ids, output_hidden_states=True)
        h_hat, _ = sae.reconstruct(clean.hidden_states[2][0])
        handle = model.model.layers[1].register_forward_hook(
            lambda m, a, o: (h_hat[None], *o[1:]) if isinstance(o, tuple) else h_hat[None])
        spliced = model(ids).logits
        handle.remove()
    lc, ls = clean.logits[0].log_softmax(-1), spliced[0].log_softmax(-1)
    kl = (lc.exp() * (lc - ls)).sum(-1).mean()
    ce = lambda lp: -lp[:-1].gather(-1, ids[0, 1:, None]).mean()  # noqa: E731
    assert sp["contexts"] == 1 and sp["tokens_real"] == ids.shape[1]
    assert sp["kl"] == pytest.approx(float(kl), abs=1e-6)
    assert sp["ce_clean"] == pytest.approx(float(ce(lc)), abs=1e-5)
    assert sp["ce_spliced"] == pytest.approx(float(ce(ls)), abs=1e-5)


def test_store_from_train_config_or_error(store, tmp_path):
    run = tmp_path / "r"
    _sae("topk", [0]).save_pretrained(run)
    with pytest.raises(StoreError, match="--store"):
        evaluate(EvalConfig(run=str(run), device="cpu"))
    (run / "train_config.json").write_text(json.dumps({"store": str(store.root)}))
    got = evaluate(EvalConfig(run=str(run), device="cpu", tokens=50, splice=False))
    assert got["tokens"] == 50 and got["splice"] == {"skipped": "splice=False"}


@torch.no_grad()
def test_soft_routing_is_not_spliced_and_says_why(store, tmp_path):
    from typer.testing import CliRunner

    from routesae.cli import app
    from routesae.evaluate import SOFT_ROUTING

    soft = _sae("routesae", LAYERS, seed=2, routing="soft")
    soft.save_pretrained(tmp_path / "soft")
    # a model is passed and would fail on first use: a soft run never touches it
    got = evaluate(EvalConfig(run=str(tmp_path / "soft"), store=str(store.root), device="cpu", batch_tokens=128),
                   model=object())
    assert got["splice"] == {"skipped": SOFT_ROUTING} and got["raw_space"] == {"skipped": SOFT_ROUTING}
    assert all(p["raw_space"] == {"skipped": SOFT_ROUTING} for p in got["per_layer"])
    assert "\n" not in SOFT_ROUTING and "--routing hard" in SOFT_ROUTING
    h = _all_rows(store, LAYERS)  # SAE space still measured: the soft mixture sum_i p_i x_i and its reconstruction
    x = soft.sae_input(h)
    x_hat = soft.decode(*soft.encode(x))
    assert got["sae_space"]["explained_variance"] == pytest.approx(_ev(x.double(), x_hat.double()), rel=1e-5)
    assert json.loads((tmp_path / "soft" / "eval.json").read_text())["splice"]["skipped"] == SOFT_ROUTING
    _routing_by_hand(got, soft, h)  # soft routing has router weights too
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "soft"), "--store", str(store.root), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"no splice: {SOFT_ROUTING}" in res.output and "CE clean" not in res.output
