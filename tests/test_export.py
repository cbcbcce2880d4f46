"""SAELens export: SAELens itself loads the folders and encodes/decodes exactly like routesae."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

from routesae.export import export_saelens
from routesae.sae import SAEConfig, build_sae, standardize

torch.set_num_threads(1)


def _trained_like(arch, layers, seed=0):
    """A random SAE with non-zero biases and a few latents that would go negative (ReLU matters)."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch=arch, d_in=16, n_latents=64, k=6, layers=layers, aux_k=0, bf16=False,
                              meta={"model": "tiny-olmoe", "store": "stores/x"}))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_enc -= 2.0  # many pre-activations negative: top-k then ReLU zeroes some of the k
        sae.b_pre.normal_(0, 0.3)
        sae.W_enc.mul_(torch.rand(64) + 0.5)
    return sae


def _dense(sae, x):
    val, idx = sae.encode(x)
    return torch.zeros(x.shape[0], sae.cfg.n_latents).scatter(-1, idx, val), sae.decode(val, idx)


@torch.no_grad()
@pytest.mark.parametrize("arch,layers", [("topk", [2]), ("routesae", [1, 2, 3]), ("mlsae", [0, 1])])
def test_saelens_loads_and_matches(arch, layers, tmp_path):
    sae = _trained_like(arch, layers)
    sae.save_pretrained(tmp_path / "run")
    folders = export_saelens(tmp_path / "run", tmp_path / "out")
    assert [f.name for f in folders] == [f"blocks.{j}.hook_resid_post" for j in layers]
    h = torch.randn(200, len(layers), 16) * 3 + 1
    if arch == "routesae":  # the routed input p_i* x_i*, as in training
        inputs = [sae.sae_input(h)]
    else:  # standardised activations of each layer
        inputs = [standardize(h[:, i])[0] for i in range(len(layers))]
    for folder, j in zip(folders, layers):
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["normalize_activations"] == "none" and cfg["metadata"]["hook_name"] == folder.name
        assert cfg["metadata"]["routesae"]["arch"] == arch and cfg["metadata"]["routesae"]["layer"] == j
        sl = SAE.load_from_disk(str(folder), device="cpu")
        assert type(sl).__name__ == "TopKSAE" and sl.cfg.k == 6 and sl.cfg.d_sae == 64
        for x in inputs:
            z, x_hat = _dense(sae, x)
            z_sl = sl.encode(x)
            assert (z == 0).sum(-1).max() > 64 - 6 and (z > 0).any()  # some of the k kept values ReLU'd to 0
            torch.testing.assert_close(z_sl, z, rtol=0, atol=1e-5)
            torch.testing.assert_close(sl.decode(z_sl), x_hat, rtol=0, atol=1e-5)
            torch.testing.assert_close(sl(x), x_hat, rtol=0, atol=1e-5)


def test_saelens_layer_norm_is_not_our_standardisation():
    """Why the export says normalize_activations='none': SAELens's layer_norm differs from ours."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    sl = TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4, normalize_activations="layer_norm"))
    h = torch.randn(8, 16) * 2 + 0.5
    ours = standardize(h)[0]
    theirs = sl.run_time_activation_norm_fn_in(h)
    assert not torch.allclose(theirs, ours, atol=1e-3)  # unbiased std and eps 1e-5 there
    torch.testing.assert_close(theirs * (16 / 15) ** 0.5, ours, rtol=1e-4, atol=1e-4)
