"""MLSAE (Lawson et al. 2025): one TopK SAE over every (token, layer) pair of the stack.

A batch ``[B, L', d]`` becomes ``B * L'`` independent standardised examples (row ``b * L' + l``
is token b at layer position l); ``routed_layer`` gives each example's layer position.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Prepared, SparseAutoencoder
from .ops import destandardize, standardize
from .topk import check_width


class MLSAE(SparseAutoencoder):
    """One shared TopK SAE for all layers; ``forward`` takes raw rows ``[B, L', d]``."""

    arch = "mlsae"

    def _prepare(self, resid: Tensor) -> Prepared:
        n_layers = self.cfg.n_layers
        if resid.ndim == 2 and n_layers == 1:
            resid = resid[:, None]
        if resid.ndim != 3 or resid.shape[1] != n_layers:
            raise ValueError(f"MLSAE takes rows [B, {n_layers}, d] (layers {self.cfg.layers}), "
                             f"got shape {list(resid.shape)}")
        check_width(resid, self.cfg.d_in, "MLSAE")
        b = resid.shape[0]
        flat = resid.reshape(b * n_layers, -1)
        layer_pos = torch.arange(n_layers, device=resid.device).repeat(b)
        if not self.cfg.standardize:
            return Prepared(flat.to(self.W_dec.dtype), None, None, routed_layer=layer_pos)
        x, mean, std = standardize(flat.to(self.W_dec.dtype))
        return Prepared(x, mean, std, routed_layer=layer_pos)

    def reconstruct(self, resid: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(h_hat [B, L', d], None)``: every layer reconstructed on the raw residual scale."""
        prep = self._prepare(resid)
        x_hat = self.decode(*self.encode(prep.x))
        if prep.mean is not None:
            x_hat = destandardize(x_hat, prep.mean, prep.std)
        return x_hat.reshape(resid.shape[0], self.cfg.n_layers, -1), None
