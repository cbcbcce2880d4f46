"""routesae.models.cpu_inference and routesae.onednn: the faster CPU kernels compute what the stock ones
compute (oracle: the same model without them, and the transformers eager experts loop), and every swap
is undone on exit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from routesae import onednn
from routesae.models import cpu_inference as ci
from routesae.models.load import ModelConfig, load_model

ARCHS = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "granitemoe")


def test_onednn_linear_equals_f_linear(monkeypatch):
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 17, 24), torch.randn(40, 24), torch.randn(40)
    torch.testing.assert_close(onednn.linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(onednn.linear(x[0], w), F.linear(x[0], w), atol=1e-5, rtol=1e-5)
    # gradients: oneDNN's op has no autograd formula, so F.linear runs and the gradient flows
    wg = w.clone().requires_grad_()
    assert not onednn.usable(x, wg)
    onednn.linear(x, wg).sum().backward()
    torch.testing.assert_close(wg.grad, x.reshape(-1, 24).sum(0).expand(40, -1))
    assert not onednn.usable(x.double(), w.double())
    monkeypatch.setitem(onednn.ONEDNN, "enabled", False)
    assert not onednn.usable(x, w) and torch.equal(onednn.linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_inference_gives_the_models_logits_and_undoes_itself(arch, tiny_ckpt):
    model, _ = load_model(ModelConfig(str(tiny_ckpt(arch)), "float32", "cpu", None, False))
    impl = model.config._experts_implementation
    ids = torch.randint(3, 300, (2, 20))
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits
        with ci.cpu_inference(model) as swapped:
            got = model(input_ids=ids, use_cache=False).logits
            linears = [m for m in model.modules() if type(m) is nn.Linear]
            assert swapped and all("forward" in m.__dict__ for m in linears)
            sorted_ok = [m for m in model.modules() if ci._sorted_ok(m)]
            if sorted_ok:  # the layout the sorted pass takes: in use, and it passed its first-batch check
                assert model.config._experts_implementation == ci.SORTED_EXPERTS
                assert all(m.__dict__.get("_routesae_sorted") is True for m in sorted_ok)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is nn.Linear)
    assert model.config._experts_implementation == impl
    assert not any("_routesae_sorted" in m.__dict__ for m in model.modules())
    if arch in ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"):
        assert sorted_ok  # these families' experts have the ExpertsInterface layout


def _experts(tiny_ckpt):
    model, _ = load_model(ModelConfig(str(tiny_ckpt("olmoe")), "float32", "cpu", None, False))
    return next(m for m in model.modules() if ci._sorted_ok(m))


def test_sorted_pass_equals_the_eager_loop_bit_for_bit(tiny_ckpt):
    """Random routing with repeated slots at weight 0 (overrides' padding), an expert no token uses and
    the expert-parallel sentinel index (= number of experts, skipped by the eager loop)."""
    experts = _experts(tiny_ckpt)
    n_exp = experts.gate_up_proj.shape[0]
    torch.manual_seed(1)
    x = torch.randn(50, experts.gate_up_proj.shape[-1])
    idx = torch.randint(0, n_exp - 1, (50, 3))  # expert n_exp - 1 unused
    idx[:5, 2] = idx[:5, 0]
    w = torch.rand(50, 3)
    w[:5, 2] = 0.0
    idx[7, 1] = n_exp
    eager = type(experts).forward.__wrapped__
    with torch.inference_mode():
        assert torch.equal(ci._sorted_pass(experts, x, idx, w), eager(experts, x, idx, w))
        assert torch.equal(ci.sorted_experts_forward(experts, x, idx, w), eager(experts, x, idx, w))
    assert experts.__dict__["_routesae_sorted"] is True


def test_sorted_pass_keeps_the_eager_loop_where_they_differ(tiny_ckpt, monkeypatch):
    experts = _experts(tiny_ckpt)
    x = torch.randn(12, experts.gate_up_proj.shape[-1])
    idx, w = torch.randint(0, 4, (12, 2)), torch.rand(12, 2)
    eager = type(experts).forward.__wrapped__
    monkeypatch.setattr(ci, "_sorted_pass", lambda self, h, i, ww: eager(self, h, i, ww) + 1.0)
    with torch.inference_mode():
        assert torch.equal(ci.sorted_experts_forward(experts, x, idx, w), eager(experts, x, idx, w))
        assert experts.__dict__["_routesae_sorted"] is False
        assert torch.equal(ci.sorted_experts_forward(experts, x, idx, w), eager(experts, x, idx, w))


def test_cpu_inference_leaves_float64_linears_alone(tiny_ckpt):
    """float64: no linear is swapped; the sorted experts pass (BLAS there) gives the stock logits exactly."""
    model, _ = load_model(ModelConfig(str(tiny_ckpt("olmoe")), "float32", "cpu", None, False))
    model.double()
    model.set_experts_implementation("eager")  # grouped_mm takes no float64
    ids = torch.randint(3, 300, (2, 16))
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits
        with ci.cpu_inference(model):
            assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is nn.Linear)
            got = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, ref)
