"""CUDA-only code paths: the bf16 autocast encoder, a TopK SAE training step on the GPU, NCCL.

Each test runs where CUDA exists and is skipped, with its reason, elsewhere (no GPU has been lent
to this project's sessions so far, so these have not run yet; bench/gpu.py is the GPU run).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from routesae.recipe import DecoderConstraint
from routesae.sae import SAEConfig, build_sae
from routesae.sae.ops import standardize
from tests.ranks import free_port

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: bf16 autocast, SAE steps and NCCL run on a GPU only")


def _sae(bf16: bool, d: int = 256, m: int = 2048, k: int = 32):
    torch.manual_seed(0)
    cfg = SAEConfig(arch="topk", d_in=d, n_latents=m, k=k, layers=[0], bf16=bf16, dead_tokens=10**9)
    return build_sae(cfg).cuda().train()


def _grads(sae, resid):
    sae.zero_grad(set_to_none=True)
    out = sae(resid)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in sae.named_parameters()}


@needs_cuda
def test_bf16_autocast_encode_matches_fp32():
    resid = torch.randn(1024, 256, device="cuda") + 0.5 * torch.randn(256, device="cuda")
    fp32, bf16 = _sae(False), _sae(True)
    bf16.load_state_dict(fp32.state_dict())
    x = standardize(resid)[0]
    val32, idx32 = fp32.encode(x)
    val16, idx16 = bf16.encode(x)
    assert val16.dtype == torch.float32 and idx16.dtype == torch.int64
    same = [len(set(a.tolist()) & set(b.tolist())) / a.numel() for a, b in zip(idx32, idx16)]
    assert sum(same) / len(same) > 0.9  # bf16 rounding may swap the last few of the top k
    out32, g32 = _grads(fp32, resid)
    out16, g16 = _grads(bf16, resid)  # the sparse backward under autocast (routesae/sae/kernels.py)
    assert abs(out16.recon_loss.item() - out32.recon_loss.item()) < 0.02 * out32.recon_loss.item() + 1e-4
    rel = (out16.x_hat - out32.x_hat).norm() / out32.x_hat.norm()
    assert rel < 0.05
    for name, g in g16.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), g32[name].flatten(), dim=0)
        assert cos > 0.9, (name, cos.item())


@needs_cuda
def test_topk_sae_step_on_cuda():
    sae = _sae(True)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    constraint = DecoderConstraint("project", 10)
    resid = torch.randn(2048, 256, device="cuda")
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    losses = []
    for step in range(1, 6):
        out = sae(resid)
        out.loss.backward()
        constraint.after_backward(sae)
        opt.step()
        constraint.after_step(sae, step)
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.is_cuda and p.dtype == torch.float32 for p in sae.parameters())
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(2048, device="cuda"), atol=1e-5)
    assert all(not torch.equal(before[n], p) for n, p in sae.named_parameters())
    assert int(sae.tokens_since_fired.max()) <= 5 * 2048


@needs_cuda
def test_train_on_cuda_from_a_store(tiny_store, tmp_path):
    from routesae.train import TrainConfig, train

    store = tiny_store(tmp_path / "store", layers="all")
    run = train(TrainConfig(store=str(store.root), out=str(tmp_path / "run"), arch="routesae", k=4, latents=64,
                            batch_tokens=32, tokens=32 * 12, device="cuda", progress=False, log_every=4))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(torch.isfinite(torch.tensor([r["loss"], r["nmse"]])).all() for r in lines)
    assert lines[-1]["step"] == 12


@needs_cuda
def test_bench_gpu_sae_part_on_cuda(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu
    spec.loader.exec_module(gpu)
    res = gpu.bench_sae("topk", gpu.SMOKE, 4, 2, torch.device("cuda", 0), tmp_path, lambda msg: None)
    assert res["tokens_per_s"] > 0 and res["peak_mem_gib"] > 0 and res["peak_mem_window_gib"] > 0


@pytest.mark.skipif(not (torch.cuda.is_available() and tdist.is_available() and tdist.is_nccl_available()),
                    reason="needs CUDA: a GPU and a torch built with NCCL")
def test_nccl_one_process():
    port = free_port()
    tdist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert tdist.get_backend() == "nccl" and tdist.get_world_size() == 1
        t = torch.arange(4.0, device="cuda")
        tdist.all_reduce(t)
        assert torch.equal(t.cpu(), torch.arange(4.0))
        tdist.barrier()
    finally:
        tdist.destroy_process_group()
