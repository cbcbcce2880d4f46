"""Fast paths of a TopK sparse autoencoder, and the dense reference they must agree with.

A TopK SAE with ``M`` latents keeps only ``k << M`` of them per example, so two steps need not
touch the other ``M - k``:

* decoding: ``x_hat = sum_j val_j * W_dec[idx_j]`` is an ``embedding_bag`` over the k active
  rows (:func:`sparse_decode`), instead of a dense ``[N, M] @ [M, d]`` product;
* the encoder backward: only the k kept pre-activations receive a gradient, so
  :class:`TopKReLU` computes the gradients of ``x`` (``embedding_bag`` over the k encoder columns),
  ``W_enc`` (a sparse ``[M, N]`` COO matrix with ``N*k`` entries times ``x``) and ``b_enc``
  (``index_add_``) from the sparse ``[N, k]`` gradient, instead of scattering it into a dense
  ``[N, M]`` matrix and running two dense ``N*d*M`` matmuls.

The forward pre-activation ``x @ W_enc`` stays a dense matmul (every latent competes for the top
k). :func:`dense_reference` computes the same thing with plain dense tensors; the tests check
that both give the same outputs and gradients.

Measured on CPU, 1 thread, d=192, M=3072, N=4096, k=32 (``bench_backward``; backward pieces):
dense scatter + two matmuls ~98 ms; sparse: grad x 2 ms (embedding_bag), grad W_enc 6 ms (COO
``sparse.mm``; ``index_add_`` of the ``[N*k, d]`` products took 59 ms, CSR 10-16 ms). The forward
(matmul ~49 ms + topk ~51 ms) is the same for both, so :class:`TopKReLU` uses the sparse backward.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor


class TopKReLU(torch.autograd.Function):
    """``(val, idx) = ReLU(TopK(x @ W_enc + b_enc))`` with a backward that touches only k entries.

    Inputs: ``x [N, d]`` (already centred by ``b_pre``), ``W_enc [d, M]``, ``b_enc [M]``, ``k``.
    Outputs: ``val [N, k]`` (post-ReLU, so negatives among the top k are 0), ``idx [N, k]`` int64.
    Under CUDA autocast the forward matmul runs in the autocast dtype and the backward in float32
    (float64 for float64 inputs) with autocast off; gradients come back in the dtype of each input.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
        pre = torch.addmm(b_enc, x, W_enc)  # x @ W_enc + b_enc in one pass
        top = pre.topk(k, dim=-1, sorted=False)
        val = top.values.relu()
        ctx.save_for_backward(x, W_enc, top.indices, val)
        ctx.mark_non_differentiable(top.indices)
        return val, top.indices

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_val: Tensor, _g_idx: Tensor | None) -> tuple[Tensor | None, ...]:
        # custom_bwd runs this under the forward's autocast state, in which sparse.mm's inner addmm would
        # cast the COO matrix to bf16 (not the float32 ``work`` below, and with no bf16 sparse kernel in
        # some torch builds): the backward's products run with autocast off.
        with torch.autocast(device_type="cuda", enabled=False):
            return TopKReLU._sparse_backward(ctx, g_val)

    @staticmethod
    def _sparse_backward(ctx, g_val: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, idx, val = ctx.saved_tensors
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = (g_val * (val > 0)).to(work)  # ReLU gate; [N, k]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dL/dx[n] = sum_j g[n, j] * W_enc[:, idx[n, j]]
            w_rows = W_enc.detach().t().to(work).contiguous()
            grad_x = F.embedding_bag(idx, w_rows, per_sample_weights=g, mode="sum").to(x.dtype)
        flat_idx = idx.reshape(-1)
        if ctx.needs_input_grad[1]:  # dL/dW_enc[:, m] = sum_{(n, j): idx = m} g[n, j] * x[n]
            n, k = idx.shape
            rows = torch.arange(n, device=x.device).repeat_interleave(k)
            g_sparse = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), g.reshape(-1),
                                               (W_enc.shape[1], n), check_invariants=False)  # [M, N], N*k entries
            grad_w = torch.sparse.mm(g_sparse, x.detach().to(work)).t().to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=work, device=x.device)
            grad_b.index_add_(0, flat_idx, g.reshape(-1))
        return grad_x, grad_w, grad_b, None


def topk_relu(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Sparse encoder: ``ReLU(TopK(x @ W_enc + b_enc))`` as ``(val [N, k], idx [N, k])``."""
    return TopKReLU.apply(x, W_enc, b_enc, k)


def sparse_decode(val: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """``sum_j val[n, j] * W_dec[idx[n, j]]`` for each row n, touching only the k active rows."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=val.to(W_dec.dtype), mode="sum")


def dense_reference(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                    k: int) -> tuple[Tensor, Tensor]:
    """Dense TopK SAE body (no ``b_pre``): ``z = ReLU(TopK(x W_enc + b_enc))``, ``z @ W_dec``.

    Returns ``(z [N, M] dense, z @ W_dec [N, d])``; used by the tests as ground truth.
    """
    pre = x @ W_enc + b_enc
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return z, z @ W_dec


class _DenseScatterTopKReLU(torch.autograd.Function):
    """TopK + ReLU on given pre-activations; backward scatters the k gradients into ``[N, M]``."""

    @staticmethod
    def forward(ctx, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        top = pre.topk(k, dim=-1, sorted=False)
        val = top.values.relu()
        ctx.save_for_backward(top.indices, val)
        ctx.shape = pre.shape
        ctx.mark_non_differentiable(top.indices)
        return val, top.indices

    @staticmethod
    def backward(ctx, g_val: Tensor, _g_idx: Tensor | None) -> tuple[Tensor, None]:
        idx, val = ctx.saved_tensors
        g = torch.zeros(ctx.shape, dtype=g_val.dtype, device=g_val.device)
        return g.scatter_(-1, idx, g_val * (val > 0)), None


def bench_backward(n: int = 4096, d: int = 192, m: int = 3072, k: int = 32, reps: int = 5) -> dict[str, float]:
    """Milliseconds per encoder forward+backward: sparse (:class:`TopKReLU`) vs dense scatter."""
    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(d, m, requires_grad=True)
    b = torch.zeros(m, requires_grad=True)
    out: dict[str, float] = {}
    for name in ("sparse", "dense_scatter"):
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            if name == "sparse":
                val, _ = topk_relu(x, w, b, k)
            else:
                val, _ = _DenseScatterTopKReLU.apply(x @ w + b, k)
            val.sum().backward()
            times.append(time.perf_counter() - t0)
        out[name] = 1000 * sorted(times[1:])[len(times[1:]) // 2]
    return out
