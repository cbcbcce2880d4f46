"""RouteSAE (Shi et al. 2025): a router picks, per token, the layer one shared TopK SAE reads.

The paper on one screen, for one token with raw residuals ``h_1 .. h_L'`` of the routed layers::

    x_i     = (h_i - mean_d h_i) / (std_d h_i + 1e-6) - c_i  standardise every layer (c_i: its centre, below)
    v       = sum_i x_i            (or mean_i x_i)           pool
    p       = softmax(W_router v)    W_router [L', d]        route (no bias)
    i*      = argmax_i p_i
    x_route = p_i* x_i*            (hard, the default)       or  sum_i p_i x_i  (soft)
    x_hat   = TopKSAE(x_route)     target: x_route itself    loss ||x_hat - x_route||^2 / ||x_route||^2

Layer centres (ours): ``c_i`` is a fixed vector per routed layer (the buffer ``layer_center``),
zero in the paper; ``center_init="median"`` in training sets it to the geometric median of layer
i's standardised residuals, the multi-layer form of TopK's ``b_pre``: a layer whose tokens share a
large common component (a "massive activation") no longer looks easy to the router for it, and
the shared ``b_pre`` no longer has to fit one layer. The reconstruction adds ``c_i*`` back.

Layer balance (ours, off by default; ``cfg.route_balance = lambda``), over a batch of B tokens, in
the form of the Switch Transformer's load-balancing loss with layers in place of experts::

    f_i    = (1/B) sum_t [i*_t = i]       share of tokens routed to layer i (no gradient)
    P_i    = (1/B) sum_t p_t,i            mean router weight of layer i
    L_bal  = L' sum_i f_i P_i             1 when both are uniform; loss += lambda * L_bal

Its gradient lowers ``p_i`` on every token in proportion to ``f_i``, so the tokens nearest a
decision boundary leave over-used layers first.

With ``b_pre = b_enc = 0`` TopK is scale-equivariant and the loss scale-invariant, so the hard
router's gradient is exactly zero; ``router="ste"`` (hard forward, soft backward) adds
``sum_i p_i x_i - stopgrad(sum_i p_i x_i)`` to ``x_route``: the forward value is unchanged and
the router gets ``dL/dp_i = <dL/dx_route, x_i>``, non-zero from step 0. See docs/routesae.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Prepared, SparseAutoencoder
from .config import SAEConfig
from .ops import destandardize, geometric_median, standardize
from .topk import check_width


class RouteSAE(SparseAutoencoder):
    """Router over ``cfg.layers`` + one shared TopK SAE; ``forward`` takes raw rows ``[B, L', d]``."""

    arch = "routesae"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        bound = 1 / math.sqrt(cfg.d_in)  # nn.Linear's default init, as in the reference code
        self.W_router = nn.Parameter(torch.empty(cfg.n_layers, cfg.d_in).uniform_(-bound, bound))
        self.register_buffer("layer_center", torch.zeros(cfg.n_layers, cfg.d_in))  # c_i; zero = the paper

    def _standardized_stack(self, resid: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Raw ``[B, L', d]`` -> ``(x [B, L', d], mean, std)`` (identity if not standardising)."""
        n_layers = self.cfg.n_layers
        if resid.ndim != 3 or resid.shape[1] != n_layers:
            raise ValueError(f"RouteSAE takes rows [B, {n_layers}, d] (layers {self.cfg.layers}), "
                             f"got shape {list(resid.shape)}; read the store with layer=None")
        check_width(resid, self.cfg.d_in, "RouteSAE")
        if not self.cfg.standardize:
            return resid.to(self.W_dec.dtype) - self.layer_center, None, None
        return standardize(resid.to(self.W_dec.dtype), shift=self.layer_center)

    @torch.no_grad()
    def init_layer_centers(self, resid_sample: Tensor, max_samples: int = 32768) -> Tensor:
        """Set each layer's centre ``c_i`` to the geometric median of its standardised rows; return them."""
        self.layer_center.zero_()
        xs = self._standardized_stack(resid_sample[:max_samples])[0]
        self.layer_center.copy_(torch.stack([geometric_median(xs[:, i]) for i in range(xs.shape[1])]))
        return self.layer_center

    def _probs(self, xs: Tensor) -> Tensor:
        """Router weights ``softmax(W_router pool(x))`` ``[B, L']`` of a standardised stack."""
        v = _mix(xs.new_full((1, xs.shape[1]), 1.0 if self.cfg.pooling == "sum" else 1 / xs.shape[1]), xs)
        return torch.softmax(v @ self.W_router.t(), dim=-1)

    def route(self, resid: Tensor) -> tuple[Tensor, Tensor]:
        """Raw rows ``[B, L', d]`` -> ``(probs [B, L'], layer_pos [B])``; ``layer_pos`` indexes cfg.layers."""
        probs = self._probs(self._standardized_stack(resid)[0])
        return probs, probs.argmax(-1)

    def _prepare(self, resid: Tensor) -> Prepared:
        xs, mean, std = self._standardized_stack(resid)
        probs = self._probs(xs)
        pos = probs.argmax(-1)
        rows = torch.arange(xs.shape[0], device=xs.device)
        if self.cfg.routing == "soft":
            x = _mix(probs, xs)
        else:
            x = probs[rows, pos].unsqueeze(-1) * xs[rows, pos]
            if self.cfg.router == "ste":  # same value, gradient of the soft mixture for the router
                soft = _mix(probs, xs)
                x = x + (soft - soft.detach())
        if mean is not None:
            mean, std = mean[rows, pos], std[rows, pos]
        return Prepared(x, mean, std, routed_layer=pos, probs=probs)

    def balance_loss(self, prep: Prepared) -> Tensor:
        """``L' sum_i f_i P_i`` of the batch (see the module docstring)."""
        probs, n_layers = prep.probs, self.cfg.n_layers
        f = torch.bincount(prep.routed_layer, minlength=n_layers).to(probs.dtype) / probs.shape[0]
        return n_layers * (f.detach() * probs.mean(0)).sum()

    def reconstruct(self, resid: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(h_hat [B, d], layer_pos [B])``: each token's routed layer on the raw residual scale.

        Splice convention: the SAE reads ``p_i* x_i*`` exactly as in training; its reconstruction
        is divided by ``p_i*``, given back the layer's centre ``c_i*`` and de-standardised with layer
        i*'s mean and std (the reference
        code fed unscaled ``x_i*`` at splice time). Soft routing has no single source layer: its
        reconstruction is de-standardised with the argmax layer's statistics, without division; it
        reconstructs no layer, so ``evaluate`` neither splices nor scores it in raw space.
        """
        prep = self._prepare(resid)
        x_hat = self.decode(*self.encode(prep.x))
        pos = prep.routed_layer
        if self.cfg.routing == "hard":
            p = prep.probs.gather(1, pos.unsqueeze(-1))
            x_hat = x_hat / p.clamp_min(1e-12) + self.layer_center[pos]
        else:
            x_hat = x_hat + prep.probs @ self.layer_center
        if prep.mean is not None:
            x_hat = destandardize(x_hat, prep.mean, prep.std)
        return x_hat, pos


def _mix(weights: Tensor, xs: Tensor) -> Tensor:
    """``sum_i weights[., i] * xs[:, i]`` ``[B, d]`` for weights ``[B, L']`` (or ``[1, L']``, shared) as one
    batched matmul (several times faster on CPU than the broadcast product and sum over layers)."""
    return torch.matmul(weights.unsqueeze(1), xs).squeeze(1)
