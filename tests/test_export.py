"""SAELens export: SAELens itself loads the folders and, fed RAW activations, reproduces routesae's splice."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE
from typer.testing import CliRunner

from routesae.cli import app
from routesae.export import export_saelens, fold_ratio
from routesae.sae import SAEConfig, build_sae, standardize

torch.set_num_threads(1)
D, M, K = 16, 64, 6


def _trained_like(arch, layers, seed=0, biases=True, d=D, **kw):
    """A random SAE with non-zero biases and a few latents that would go negative (ReLU matters)."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch=arch, d_in=d, n_latents=M, k=K, layers=layers, aux_k=0, bf16=False,
                              meta=kw.pop("meta", {"model": "tiny-olmoe", "store": "stores/x"}), **kw))
    with torch.no_grad():
        if biases:
            sae.b_enc.normal_(0, 0.5)
            sae.b_enc -= 1.5  # many pre-activations negative: top-k then ReLU zeroes some of the k
            sae.b_pre.normal_(0, 0.3)
            if arch == "routesae":
                sae.layer_center.normal_(0, 0.3)  # RouteSAE's per-layer centres fold into each folder's b_dec
        sae.W_enc.mul_(torch.rand(M) + 0.5)
    return sae.eval()


def _dense(val, idx):
    return torch.zeros(val.shape[0], M).scatter(-1, idx, val)


def _rel(a, b):
    """Largest per-token relative difference ||a - b|| / ||b||."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def _raw(n, n_layers, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, n_layers, D) * 3 + 1


@torch.no_grad()
@pytest.mark.parametrize("arch,layers", [("topk", [2]), ("mlsae", [0, 1])])
def test_saelens_on_raw_activations_reproduces_the_splice(arch, layers, tmp_path):
    sae = _trained_like(arch, layers)
    sae.save_pretrained(tmp_path / "run")
    ex = export_saelens(tmp_path / "run", tmp_path / "out")
    assert [f.name for f in ex.folders] == [f"blocks.{j}.hook_resid_post" for j in layers]
    assert "1.03279556" in ex.readme.read_text()  # sqrt(16/15), the fold, stated
    h = _raw(300, len(layers))
    spliced, _ = sae.reconstruct(h[:, 0] if arch == "topk" else h)  # what evaluate splices
    for i, (folder, j) in enumerate(zip(ex.folders, layers)):
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["normalize_activations"] == "layer_norm" and cfg["metadata"]["hook_name"] == folder.name
        assert cfg["metadata"]["routesae"]["layer"] == j and cfg["metadata"]["routesae"]["arch"] == arch
        sl = SAE.load_from_disk(str(folder), device="cpu")
        assert type(sl).__name__ == "TopKSAE" and sl.cfg.k == K and sl.cfg.d_sae == M
        ref = spliced if arch == "topk" else spliced[:, i]
        assert _rel(sl(h[:, i]), ref) < 1e-4
        z = _dense(*sae.encode(standardize(h[:, i])[0]))
        z_sl = sl.encode(h[:, i])
        assert (z == 0).sum(-1).max() > M - K and (z > 0).any()  # some of the k kept values ReLU'd to 0
        assert torch.equal(z_sl > 0, z > 0)  # the same latents fire
        torch.testing.assert_close(z_sl, z, rtol=1e-4, atol=1e-4)
        assert _rel(sl.decode(z_sl), ref) < 1e-4
        # the standardisation matters: the same weights without it do not reproduce anything
        assert _rel(sae.decode(*sae.encode(h[:, i])), ref) > 0.1


@torch.no_grad()
def test_routesae_folder_reproduces_the_splice_of_tokens_at_its_router_weight(tmp_path):
    layers = [1, 2, 3]
    sae = _trained_like("routesae", layers)
    sae.save_pretrained(tmp_path / "run")
    h = _raw(300, 3)
    spliced, pos = sae.reconstruct(h)  # evaluate's splice: SAE(p x) / p, de-standardised, at the routed layer
    probs, _ = sae.route(h)
    codes = _dense(*sae.encode(sae.sae_input(h)))  # routesae's codes, of p_i* x_i*
    assert torch.bincount(pos, minlength=3).min() >= 2
    for i, j in enumerate(layers):
        for t in (pos == i).nonzero()[:2, 0].tolist():
            p = float(probs[t, i])
            ex = export_saelens(tmp_path / "run", tmp_path / f"out-{t}", router_weight=p)
            assert ex.router_weights == {1: p, 2: p, 3: p} and ex.folders[i].name == f"blocks.{j}.hook_resid_post"
            sl = SAE.load_from_disk(str(ex.folders[i]), device="cpu")
            x = h[t:t + 1, i]  # the raw layer-j activation
            assert _rel(sl(x), spliced[t:t + 1]) < 1e-4
            z = sl.encode(x)
            assert torch.equal(z[0] > 0, codes[t] > 0)
            torch.testing.assert_close(z[0] * p, codes[t], rtol=1e-4, atol=1e-5)  # codes are routesae's / p
            cfg = json.loads((ex.folders[i] / "cfg.json").read_text())["metadata"]["routesae"]
            assert cfg["router_weight"] == p and "routed to this layer" in cfg["reproduces"]
    # at another router weight the biases differ (b / q for b / p), and so does the output
    t = int((pos == 0).nonzero()[0, 0])
    ex = export_saelens(tmp_path / "run", tmp_path / "other", router_weight=min(1.0, float(probs[t, 0]) + 0.2))
    assert _rel(SAE.load_from_disk(str(ex.folders[0]), device="cpu")(h[t:t + 1, 0]), spliced[t:t + 1]) > 1e-3


@torch.no_grad()
def test_routesae_without_biases_every_routed_token_and_no_store(tmp_path):
    """b_pre = b_enc = 0: TopK is scale-equivariant, so any folded weight reproduces every routed token."""
    layers = [0, 2]
    sae = _trained_like("routesae", layers, biases=False, meta={"store": str(tmp_path / "gone")})
    sae.save_pretrained(tmp_path / "run")
    ex = export_saelens(tmp_path / "run", tmp_path / "out")  # the run's store is not here: q = 1, said so
    assert ex.router_weights == {0: 1.0, 2: 1.0}
    assert "--router-weight" in ex.notes[-1] and "not here" in ex.readme.read_text()
    h = _raw(200, 2)
    spliced, pos = sae.reconstruct(h)
    for i, folder in enumerate(ex.folders):
        sel = pos == i
        assert sel.sum() > 10
        sl = SAE.load_from_disk(str(folder), device="cpu")
        assert _rel(sl(h[sel, i]), spliced[sel]) < 1e-4


@torch.no_grad()
def test_router_weights_measured_on_the_store(tiny_store, tmp_path):
    store = tiny_store(tmp_path / "store", layers="0:2", max_tokens=120, batch_size=4)
    layers = [0, 1, 2]
    sae = _trained_like("routesae", layers, d=store.d_model, meta={"store": str(store.root)})
    with torch.no_grad():
        sae.W_router.mul_(20)  # a confident, uneven router
    sae.save_pretrained(tmp_path / "run")
    ex = export_saelens(tmp_path / "run", tmp_path / "out")
    h = torch.cat([torch.stack([store.load_resid(s["index"], j) for j in layers], 1) for s in store.shards]).float()
    probs, pos = sae.route(h)
    for i, j in enumerate(layers):
        sel = pos == i
        want = float(probs[sel, i].mean()) if sel.any() else float(probs.max(-1).values.mean())
        assert ex.router_weights[j] == pytest.approx(want, rel=1e-5)
    assert f"first {store.n_tokens} tokens of store" in ex.notes[-1]
    assert all(0.34 < q < 1 for q in ex.router_weights.values())


def test_standardisation_fold_and_its_eps_bound():
    """SAELens's layer_norm times r = sqrt(d/(d-1)) is our standardisation up to eps: relative <= 9e-6 / std."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    sl = TopKSAE(TopKSAEConfig(d_in=D, d_sae=32, k=4, normalize_activations="layer_norm"))
    for scale in (3.0, 1e-2):
        h = (torch.randn(64, D) * scale + 0.5).double()
        ours, _, std = standardize(h)
        theirs = sl.run_time_activation_norm_fn_in(h) * fold_ratio(D)
        rel = ((theirs - ours).norm(dim=-1) / ours.norm(dim=-1))[:, None]
        assert (rel <= 9e-6 / std * 1.001).all() and (rel >= 8e-6 / (std + 1e-5)).all()  # the bound, and it is reached
        back = sl.run_time_activation_norm_fn_out(ours / fold_ratio(D))  # SAELens de-normalises without eps
        torch.testing.assert_close(back, h - ours * 1e-6, rtol=0, atol=1e-12)


@torch.no_grad()
def test_soft_routing_and_bad_router_weights(tmp_path):
    soft = _trained_like("routesae", [1, 2], routing="soft")
    soft.save_pretrained(tmp_path / "soft")
    ex = export_saelens(tmp_path / "soft", tmp_path / "out-soft")
    assert ex.router_weights == {1: 1.0, 2: 1.0} and "no folder reproduces a routesae splice" in ex.notes[-1]
    cfg = json.loads((ex.folders[0] / "cfg.json").read_text())["metadata"]["routesae"]
    assert cfg["reproduces"].startswith("no routesae splice")
    with pytest.raises(ValueError, match="hard-routing RouteSAE runs; .* soft-routing"):
        export_saelens(tmp_path / "soft", tmp_path / "x", router_weight=0.5)
    _trained_like("topk", [2]).save_pretrained(tmp_path / "topk")
    with pytest.raises(ValueError, match="is topk, drop the option"):
        export_saelens(tmp_path / "topk", tmp_path / "x", router_weight=0.5)
    _trained_like("routesae", [1, 2]).save_pretrained(tmp_path / "hard")
    with pytest.raises(ValueError, match="not a softmax weight"):
        export_saelens(tmp_path / "hard", tmp_path / "x", router_weight=1.5)
    assert not (tmp_path / "x").exists()


def test_cli_export_says_what_the_folders_reproduce(tmp_path):
    _trained_like("routesae", [1, 2], meta={}).save_pretrained(tmp_path / "run")
    runner = CliRunner()
    res = runner.invoke(app, ["export", "--help"])
    assert res.exit_code == 0 and "layer_norm" in res.output and "--router-weight" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "sl"), "--router-weight", "0.6"])
    assert res.exit_code == 0, res.output
    assert "README.md" in res.output and "note: RouteSAE: SAELens cannot route" in res.output and "0.6" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "sl"), "--router-weight", "0"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "0 < P <= 1" in res.output
