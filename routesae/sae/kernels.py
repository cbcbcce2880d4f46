"""Fast paths of a TopK sparse autoencoder, and the dense reference they must agree with.

A TopK SAE with ``M`` latents keeps only ``k << M`` of them per example, so most of a step need not
touch the other ``M - k``:

* decoding: ``x_hat = sum_j val_j * W_dec[idx_j]`` is an ``embedding_bag`` over the k active
  rows (:func:`sparse_decode`), instead of a dense ``[N, M] @ [M, d]`` product;
* the backward: only the k kept pre-activations receive a gradient. The ``N*k`` active
  (example, latent) pairs are sorted by latent once (:class:`LatentIndex`); the gradients of
  ``W_dec`` and ``W_enc`` are CSR ``[M, N]`` products with that order, the code values' gradient
  a sampled dense-dense product, ``x``'s an ``embedding_bag`` over the k encoder columns, instead
  of scattering into a dense ``[N, M]`` matrix and four dense ``N*d*M`` matmuls;
* top-k: on CPU :func:`select_topk` takes the exact top k in two short passes over group maxima
  and candidates (``torch.topk`` over a 1,536-wide row cost as much as the encoder matmul).

Training runs :class:`TopKEncodeDecode` (encoder and decoder with one fused backward);
:func:`topk_relu` and :func:`sparse_decode` are the same pieces one at a time. The forward
pre-activation ``x @ W_enc`` stays a dense matmul (every latent competes for the top k).
:func:`dense_reference` computes the same thing with plain dense tensors; the tests check
outputs and gradients against it. Where the step's time goes: ``bench/train.py`` (its profile)
and docs/RESULTS.md.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from routesae import onednn

# LatentIndex builds CSR matrices on purpose; torch warns once per process that CSR is "beta"
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)


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
        values, indices = select_topk(encoder_preacts(x, W_enc, b_enc), k)
        val = values.relu()
        ctx.save_for_backward(x, W_enc, indices, val)
        ctx.mark_non_differentiable(indices)
        return val, indices

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_val: Tensor, _g_idx: Tensor | None) -> tuple[Tensor | None, ...]:
        # custom_bwd runs this under the forward's autocast state, in which the sparse products' inner addmm
        # would cast to bf16 (not the float32 ``work`` below, and with no bf16 sparse kernel in some torch
        # builds): the backward's products run with autocast off.
        with torch.autocast(device_type="cuda", enabled=False):
            return TopKReLU._sparse_backward(ctx, g_val)

    @staticmethod
    def _sparse_backward(ctx, g_val: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, idx, val = ctx.saved_tensors
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = (g_val * (val > 0)).to(work)  # ReLU gate; [N, k]
        grad_x, grad_w, grad_b = _encoder_grads(ctx.needs_input_grad[:3], x, W_enc, idx, g,
                                                LatentIndex(idx, W_enc.shape[1]))
        return grad_x, grad_w, grad_b, None


class LatentIndex:
    """The ``N*k`` active (example, latent) pairs of a code sorted by latent, once per backward pass.

    ``grad(values [N, k], dense [N, d])`` is ``sum_{(n, j): idx[n, j] = m} values[n, j] * dense[n]`` for
    every latent m (``[M, d]``): a CSR ``[M, N]`` matrix (rows = latents) times ``dense``, which runs
    several times faster on CPU than the COO product or ``index_add_`` of the ``[N*k, d]`` products.
    """

    def __init__(self, idx: Tensor, n_latents: int):
        n, k = idx.shape
        flat = idx.reshape(-1)
        self.perm = torch.argsort(flat, stable=True)
        self.cols = torch.div(self.perm, k, rounding_mode="floor")  # the example n of each sorted entry
        counts = torch.bincount(flat, minlength=n_latents)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.flat, self.shape = flat, (n_latents, n)

    def grad(self, values: Tensor, dense: Tensor) -> Tensor:
        vals = values.reshape(-1)[self.perm].to(dense.dtype)
        return torch.sparse_csr_tensor(self.crow, self.cols, vals, self.shape, check_invariants=False) @ dense

    def bias_grad(self, values: Tensor) -> Tensor:
        """``sum_{(n, j): idx[n, j] = m} values[n, j]`` ``[M]``."""
        out = torch.zeros(self.shape[0], dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.flat, values.reshape(-1))


def _encoder_grads(needs: tuple[bool, ...], x: Tensor, W_enc: Tensor, idx: Tensor, g: Tensor,
                   index: LatentIndex) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``x``, ``W_enc``, ``b_enc`` from the gated ``[N, k]`` gradient ``g`` of the kept pre-activations."""
    grad_x = grad_w = grad_b = None
    if needs[0]:  # dL/dx[n] = sum_j g[n, j] * W_enc[:, idx[n, j]]
        w_rows = W_enc.detach().t().to(g.dtype).contiguous()
        grad_x = F.embedding_bag(idx, w_rows, per_sample_weights=g, mode="sum").to(x.dtype)
    if needs[1]:  # dL/dW_enc[:, m] = sum_{(n, j): idx = m} g[n, j] * x[n]
        grad_w = index.grad(g, x.detach().to(g.dtype)).t().to(W_enc.dtype)
    if needs[2]:
        grad_b = index.bias_grad(g)
    return grad_x, grad_w, grad_b


class TopKEncodeDecode(torch.autograd.Function):
    """Encoder and decoder in one: ``(val, idx, sum_j val_j W_dec[idx_j])``, the training forward's body.

    The same values as :class:`TopKReLU` followed by :func:`sparse_decode`; its backward sorts the
    active pairs once (:class:`LatentIndex`) for the gradients of both ``W_dec`` and ``W_enc``, and
    computes the code values' gradient with :func:`code_grad` (one dot product per active pair).
    Inputs as :class:`TopKReLU` plus ``W_dec [M, d]``.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, k: int) -> tuple[Tensor, ...]:
        values, idx = select_topk(encoder_preacts(x, W_enc, b_enc), k)
        val = values.relu().to(W_dec.dtype)
        body = F.embedding_bag(idx, W_dec, per_sample_weights=val, mode="sum")
        ctx.save_for_backward(x, W_enc, W_dec, idx, val)
        ctx.mark_non_differentiable(idx)
        return val, idx, body

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_val: Tensor | None, _g_idx, g_body: Tensor | None) -> tuple[Tensor | None, ...]:
        with torch.autocast(device_type="cuda", enabled=False):  # see TopKReLU.backward
            x, W_enc, W_dec, idx, val = ctx.saved_tensors
            work = torch.float64 if x.dtype == torch.float64 else torch.float32
            index = LatentIndex(idx, W_enc.shape[1])
            g = torch.zeros_like(val, dtype=work) if g_val is None else g_val.to(work)
            grad_dec = None
            if g_body is not None:
                g_body = g_body.to(work)
                g = g + code_grad(idx, W_dec.detach().to(work), g_body)
                if ctx.needs_input_grad[3]:  # dL/dW_dec[m] = sum_{(n, j): idx = m} val[n, j] * g_body[n]
                    grad_dec = index.grad(val.to(work), g_body).to(W_dec.dtype)
            g = g * (val > 0)  # ReLU gate
            grad_x, grad_w, grad_b = _encoder_grads(ctx.needs_input_grad[:3], x, W_enc, idx, g, index)
        return grad_x, grad_w, grad_b, grad_dec, None


def code_grad(idx: Tensor, W_dec: Tensor, g_body: Tensor, sampled: bool | None = None) -> Tensor:
    """``dL/dval[n, j] = <g_body[n], W_dec[idx[n, j]]>`` ``[N, k]``, the decoder's gradient for the code values.

    On CPU a sampled dense-dense product (``torch.sparse.sampled_addmm`` at the ``N*k`` active
    entries: one dot product each, no ``[N, k, d]`` gather); elsewhere ``embedding_bag``'s own
    per-sample-weight backward (its dense weight gradient is not asked for). ``sampled`` forces one way.
    """
    n, k = idx.shape
    if sampled if sampled is not None else not g_body.is_cuda:
        crow = torch.arange(0, n * k + 1, k, device=idx.device)
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), g_body.new_zeros(n * k), (n, W_dec.shape[0]),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, g_body, W_dec.t(), beta=0.0).values().view(n, k)
    with torch.enable_grad():
        w = g_body.new_zeros(n, k, requires_grad=True)
        out = F.embedding_bag(idx, W_dec, per_sample_weights=w, mode="sum")
        return torch.autograd.grad(out, w, g_body)[0]


def topk_encode_decode(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                       k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(val [N, k], idx [N, k], sum_j val_j W_dec[idx_j] [N, d])`` with the fused sparse backward."""
    return TopKEncodeDecode.apply(x, W_enc, b_enc, W_dec, k)


def encoder_preacts(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """``x @ W_enc + b_enc`` ``[N, M]`` in one pass (the dense half of the encoder): oneDNN's fused
    linear on CPU in float32 (:mod:`routesae.onednn`), else ``F.linear`` (``torch.addmm``)."""
    return onednn.linear(x, W_enc.t(), b_enc)


def group_size(n_latents: int, k: int) -> int:
    """Group size of :func:`select_topk`'s CPU path: the power of two nearest ``sqrt(M / k)``, so that
    the two top-k passes run over rows of about equal length (``M / g`` group maxima, ``k * g``
    candidates); 1 (plain ``topk``) when that saves nothing or ``g`` does not divide ``M``."""
    g = 2 ** round(math.log2(max(n_latents / max(k, 1), 1)) / 2)
    if g < 2 or n_latents % g or k * g >= n_latents // 2:
        return 1
    return g


def select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``pre [N, M]``: ``(values [N, k], indices [N, k])``, unsorted.

    On CPU, where ``torch.topk`` costs about as much as the encoder matmul, it runs in two short
    passes. Latent ``m`` belongs to group ``m mod G`` (``G = M / g`` groups of ``g`` latents, strided,
    so the group maxima are ``g - 1`` element-wise maxima of contiguous slices). Each of the k largest
    entries lies in a group whose maximum is at least the k-th largest entry, and there are at most k
    such groups (their maxima are distinct entries among the k largest); so the top k of the ``k * g``
    entries of the k groups with the largest maxima are exactly the top k of the row (the same values;
    among exactly equal values another index may be chosen). On CUDA, ``torch.topk`` as is.
    """
    n, m = pre.shape
    g = 1 if pre.is_cuda else group_size(m, k)
    if g == 1:
        top = pre.topk(k, dim=-1, sorted=False)
        return top.values, top.indices
    n_groups = m // g
    members = pre.reshape(n, g, n_groups)  # members[n, t, j] = pre[n, j + t * G]: the g members of group j
    groups = members.amax(1).topk(k, dim=-1, sorted=False).indices  # [N, k]
    # entry t * k + i of cand: member t of group groups[:, i]
    cand = members.gather(2, groups.unsqueeze(1).expand(n, g, k)).view(n, g * k)
    top = cand.topk(k, dim=-1, sorted=False)
    t, i = torch.div(top.indices, k, rounding_mode="floor"), top.indices % k
    return top.values, groups.gather(1, i) + t * n_groups


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
