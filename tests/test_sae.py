"""SAE models: hand-computed TopK, AuxK, router math, geometric median; fast path; save/load; errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from routesae.sae import (
    MLSAE,
    RouteSAE,
    SAEConfig,
    TopKSAE,
    build_sae,
    destandardize,
    geometric_median,
    load_sae,
    nmse,
    standardize,
)
from routesae.sae.kernels import (
    code_grad,
    dense_reference,
    group_size,
    select_topk,
    sparse_decode,
    topk_encode_decode,
    topk_relu,
)

torch.set_num_threads(1)


def _cfg(arch: str = "topk", **kw) -> SAEConfig:
    base = {"d_in": 8, "n_latents": 32, "k": 4, "layers": [3] if arch == "topk" else [1, 2, 3]}
    return SAEConfig(arch=arch, **{**base, **kw})


# ---------------------------------------------------------------- TopK, fast path


def test_topk_relu_by_hand():
    x = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-1.0, -2.0, -3.0, -4.0]])
    val, idx = topk_relu(x, torch.eye(4), torch.zeros(4), 2)
    order = idx.argsort(-1)
    assert idx.gather(1, order).tolist() == [[0, 2], [0, 1]]
    assert val.gather(1, order).tolist() == [[3.0, 2.0], [0.0, 0.0]]  # negatives in the top k -> 0


def test_fast_path_equals_dense_values_and_grads():
    torch.manual_seed(0)
    n, d, m, k = 64, 12, 48, 5
    leaves = [torch.randn(n, d), torch.randn(d, m), torch.randn(m) * 0.1, torch.randn(m, d)]
    fast = [t.clone().requires_grad_() for t in leaves]
    dense = [t.clone().requires_grad_() for t in leaves]
    val, idx = topk_relu(fast[0], fast[1], fast[2], k)
    out_fast = sparse_decode(val, idx, fast[3])
    _, out_dense = dense_reference(dense[0], dense[1], dense[2], dense[3], k)
    torch.testing.assert_close(out_fast, out_dense, atol=1e-5, rtol=1e-5)
    w = torch.randn(n, d)
    (out_fast * w).sum().backward()
    (out_dense * w).sum().backward()
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_encode_decode_equals_dense_values_and_grads(dtype):
    """The training forward's fused kernel against plain dense autograd, with gradients reaching both
    the reconstruction and the code values (as an extra loss on them would)."""
    torch.manual_seed(1)
    n, d, m, k = 96, 16, 64, 6
    leaves = [torch.randn(n, d), torch.randn(d, m), torch.randn(m) * 0.1, torch.randn(m, d)]
    fast = [t.to(dtype).requires_grad_() for t in leaves]
    dense = [t.to(dtype).requires_grad_() for t in leaves]
    val, idx, body = topk_encode_decode(*fast, k)
    z, body_dense = dense_reference(*dense, k)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(body, body_dense, **tol)
    torch.testing.assert_close(z.gather(1, idx), val, **tol)
    w, u = torch.randn(n, d, dtype=dtype), torch.randn(n, m, dtype=dtype)
    ((body * w).sum() + (val * u.gather(1, idx)).sum()).backward()
    ((body_dense * w).sum() + (z * u).sum()).backward()
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_encoder_preacts_onednn_equals_addmm(monkeypatch):
    """The CPU oneDNN linear and torch.addmm compute the same float32 product (and float64 falls back)."""
    from routesae import onednn
    from routesae.sae import kernels

    torch.manual_seed(4)
    x, w, b = torch.randn(257, 24), torch.randn(24, 96), torch.randn(96)
    fast = kernels.encoder_preacts(x, w, b)
    assert onednn.usable(x, w, b) == torch.backends.mkldnn.is_available()
    monkeypatch.setitem(onednn.ONEDNN, "enabled", False)
    torch.testing.assert_close(fast, torch.addmm(b, x, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.encoder_preacts(x, w, b), torch.addmm(b, x, w), atol=0, rtol=0)
    torch.testing.assert_close(kernels.encoder_preacts(x.double(), w.double(), b.double()),
                               x.double() @ w.double() + b.double())


def test_code_grad_both_ways_by_hand():
    """dL/dval[n, j] = <g[n], W_dec[idx[n, j]]>: the CPU sampled product and the CUDA embedding_bag way."""
    torch.manual_seed(3)
    idx, w_dec, g = torch.randint(0, 40, (30, 5)), torch.randn(40, 8), torch.randn(30, 8)
    by_hand = (w_dec[idx] * g.unsqueeze(1)).sum(-1)
    for sampled in (True, False):
        torch.testing.assert_close(code_grad(idx, w_dec, g, sampled=sampled), by_hand)


def test_grouped_topk_is_exact_including_ties():
    """select_topk's two-pass CPU path returns torch.topk's values (a hand-checked tie-free row too)."""
    assert group_size(1536, 32) == 8 and group_size(64, 32) == 1  # the path is taken / skipped
    torch.manual_seed(2)
    for pre in (torch.randn(300, 1536), torch.randint(0, 4, (300, 1536)).float()):  # many exact ties
        val, idx = select_topk(pre, 32)
        ref = pre.topk(32, dim=-1).values
        torch.testing.assert_close(val.sort(-1).values, ref.sort(-1).values, rtol=0, atol=0)
        assert torch.equal(pre.gather(1, idx), val)
        assert all(len(set(row.tolist())) == 32 for row in idx)  # distinct latents
    row = torch.zeros(1, 64)
    row[0, [3, 17, 40, 63]] = torch.tensor([5.0, 7.0, 6.0, 4.0])  # latent m is in group m mod 16 (g = 4)
    assert group_size(64, 3) == 4
    val, idx = select_topk(row, 3)
    assert sorted(idx[0].tolist()) == [3, 17, 40] and sorted(val[0].tolist()) == [5.0, 6.0, 7.0]


# ---------------------------------------------------------------- AuxK, dead latents


def _aux_model() -> TopKSAE:
    sae = TopKSAE(SAEConfig("topk", d_in=2, n_latents=4, k=1, layers=[0], standardize=False, dead_tokens=50))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.6, 0.8]]))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_pre.copy_(torch.tensor([10.0, 10.0]))
        sae.tokens_since_fired.copy_(torch.tensor([0, 0, 100, 100]))
    return sae


def test_auxk_target_by_hand():
    sae = _aux_model().train()
    out = sae(torch.tensor([[13.0, 11.0]]))
    # x - b_pre = (3, 1); pre = (3, 1, 2.6, -1.0); top-1 = latent 0 -> x_hat = (13, 10), e = (0, 1)
    assert out.x_hat.tolist() == [[13.0, 10.0]]
    # dead {2, 3}: ReLU(2.6, -1.0) -> e_hat = 2.6 * (0.6, 0.8) = (1.56, 2.08), no b_pre
    assert out.aux_loss.item() == pytest.approx(1.56**2 + 1.08**2, abs=1e-5)
    assert out.recon_loss.item() == pytest.approx(1 / 290, abs=1e-7)
    assert out.loss.item() == pytest.approx(1 / 290 + 3.6 / 32, abs=1e-5)
    assert sae.tokens_since_fired.tolist() == [0, 1, 101, 101]
    assert sae.dead_mask().tolist() == [False, False, True, True]


def test_auxk_zero_without_dead_latents_and_in_eval():
    sae = _aux_model()
    sae.tokens_since_fired.zero_()
    assert sae.train()(torch.tensor([[13.0, 11.0]])).aux_loss.item() == 0.0
    sae = _aux_model().eval()
    assert sae(torch.tensor([[13.0, 11.0]])).aux_loss.item() == 0.0
    assert sae.tokens_since_fired.tolist() == [0, 0, 100, 100]  # no counting in eval


# ---------------------------------------------------------------- geometric median, standardisation


def test_geometric_median_by_hand():
    collinear = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    torch.testing.assert_close(geometric_median(collinear), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) + torch.tensor([2.0, 3.0])
    torch.testing.assert_close(geometric_median(square), torch.tensor([2.0, 3.0]), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    cloud = torch.cat([torch.randn(99, 3) * 0.1, torch.full((1, 3), 1000.0)])
    assert geometric_median(cloud).norm() < 0.2 < cloud.mean(0).norm()


def test_standardize_and_inverse():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    x, mean, std = standardize(h)
    s = math.sqrt(1.25)  # biased (population) std
    torch.testing.assert_close(x, torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / (s + 1e-6))
    assert mean.item() == 2.5 and std.item() == pytest.approx(s)
    torch.testing.assert_close(destandardize(x, mean, std), h)
    assert nmse(torch.zeros(1, 4), h).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- router


def _router(pooling: str = "sum", routing: str = "hard") -> RouteSAE:
    sae = RouteSAE(SAEConfig("routesae", d_in=2, n_latents=4, k=1, layers=[5, 6], standardize=False,
                             pooling=pooling, routing=routing))
    with torch.no_grad():
        sae.W_router.copy_(torch.eye(2))
    return sae


def test_router_math_by_hand():
    resid = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # layer 5 -> (1, 0), layer 6 -> (0, 2)
    probs, pos = _router().route(resid)  # v = (1, 2), alpha = (1, 2)
    p2 = math.e / (1 + math.e)
    torch.testing.assert_close(probs, torch.tensor([[1 - p2, p2]]))
    assert pos.tolist() == [1]
    torch.testing.assert_close(_router().sae_input(resid), torch.tensor([[0.0, 2 * p2]]))
    pm = math.exp(0.5) / (1 + math.exp(0.5))  # mean pooling: v = (0.5, 1)
    torch.testing.assert_close(_router("mean").route(resid)[0], torch.tensor([[1 - pm, pm]]))
    torch.testing.assert_close(_router(routing="soft").sae_input(resid), torch.tensor([[1 - p2, 2 * p2]]))


def _router_grad(router: str) -> tuple[float, float]:
    torch.manual_seed(0)
    sae = build_sae(_cfg("routesae", d_in=16, n_latents=64, k=4, router=router)).double()
    resid = torch.randn(128, 3, 16, dtype=torch.float64) * 2 + torch.randn(3, 16, dtype=torch.float64)
    out = sae(resid)  # b_pre = b_enc = 0 at construction
    out.loss.backward()
    return sae.W_router.grad.abs().max().item(), out.loss.item()


def test_faithful_router_gradient_zero_at_init_ste_not():
    g_faithful, loss_faithful = _router_grad("faithful")
    g_ste, loss_ste = _router_grad("ste")
    assert g_faithful < 1e-12  # analytically 0; float64 round-off only
    assert g_ste > 1e-4
    assert loss_ste == loss_faithful  # same forward


def test_routesae_splice_convention_recovers_raw_layer():
    d = 4  # a perfect SAE: W_dec = [I; -I], k = d picks |x_j| on the right sign
    sae = RouteSAE(SAEConfig("routesae", d_in=d, n_latents=2 * d, k=d, layers=[0, 1, 2]))
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
        sae.W_enc.copy_(sae.W_dec.t())
    torch.manual_seed(0)
    resid = torch.randn(16, 3, d) * 5 + 3
    h_hat, pos = sae.reconstruct(resid)
    torch.testing.assert_close(h_hat, resid[torch.arange(16), pos], atol=1e-4, rtol=1e-4)


def test_mlsae_examples_and_reconstruct_shape():
    sae = MLSAE(_cfg("mlsae"))
    out = sae(torch.randn(5, 3, 8))
    assert out.x.shape == (15, 8) and out.routed_layer.tolist() == [0, 1, 2] * 5
    assert sae.reconstruct(torch.randn(5, 3, 8))[0].shape == (5, 3, 8)


# ---------------------------------------------------------------- decoder constraint


def test_decoder_grad_projection_and_renorm():
    sae = TopKSAE(_cfg())
    sae.train()(torch.randn(64, 8)).loss.backward()
    sae.after_backward()
    dots = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert dots.abs().max() < 1e-6 and sae.W_dec.grad.abs().max() > 0
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) + 0.5)
    sae.after_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))


def test_init_from_sample_sets_b_pre_to_median():
    sae = TopKSAE(_cfg())
    resid = torch.randn(200, 8)
    med = sae.init_from_sample(resid)
    torch.testing.assert_close(sae.b_pre.data, geometric_median(standardize(resid)[0]))
    assert med.shape == (8,)


# ---------------------------------------------------------------- save / load, errors


@pytest.mark.parametrize("arch", ["topk", "routesae", "mlsae"])
def test_save_load_round_trip(tmp_path, arch):
    sae = build_sae(_cfg(arch))
    sae.tokens_since_fired.fill_(7)
    sae.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "routesae-sae/1"
    back = load_sae(tmp_path)
    assert type(back) is type(sae) and back.tokens_since_fired.tolist() == [7] * 32
    resid = torch.randn(6, 8) if arch == "topk" else torch.randn(6, 3, 8)
    torch.testing.assert_close(back(resid).x_hat, sae(resid).x_hat)
    assert type(sae).from_pretrained(tmp_path).cfg == sae.cfg


def test_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="k=80 is larger than the latent count 64; lower --k"):
        _cfg(k=80, n_latents=64).validate()
    with pytest.raises(ValueError, match="unknown routing 'hardest'; choose one of hard, soft"):
        _cfg("routesae", routing="hardest").validate()
    with pytest.raises(ValueError, match="unknown router 'x'; choose one of faithful, ste"):
        _cfg("routesae", router="x").validate()
    with pytest.raises(ValueError, match="unknown pooling"):
        _cfg("routesae", pooling="max").validate()
    with pytest.raises(ValueError, match="reads one layer"):
        _cfg("topk", layers=[1, 2]).validate()
    with pytest.raises(ValueError, match=r"RouteSAE takes rows \[B, 3, d\]"):
        RouteSAE(_cfg("routesae"))(torch.randn(4, 8))
    with pytest.raises(ValueError, match="d_in=8"):
        TopKSAE(_cfg())(torch.randn(4, 9))
    with pytest.raises(ValueError, match="config.json not found"):
        load_sae(tmp_path)
    TopKSAE(_cfg()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_latents": 16}))
    with pytest.raises(ValueError, match=r"W_dec has shape \[32, 8\] but the config needs \[16, 8\]") as err:
        load_sae(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="use load_sae"):
        RouteSAE.from_pretrained(tmp_path)
