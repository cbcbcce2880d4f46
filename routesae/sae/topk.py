"""TopKSAE: the single-layer baseline (Gao et al. 2024) on one store layer.

``x = standardize(h)``; ``z = ReLU(TopK(W_enc^T (x - b_pre) + b_enc))``; ``x_hat = W_dec^T z + b_pre``.
Everything except the input shape lives in :class:`~routesae.sae.base.SparseAutoencoder`.
"""

from __future__ import annotations

from torch import Tensor

from .base import Prepared, SparseAutoencoder
from .ops import standardize


def check_width(resid: Tensor, d_in: int, what: str) -> None:
    """One-line error if the last dim of ``resid`` is not ``d_in``."""
    if resid.shape[-1] != d_in:
        raise ValueError(f"{what} got rows of width {resid.shape[-1]} but the SAE was built for d_in={d_in}")


class TopKSAE(SparseAutoencoder):
    """TopK SAE on one layer; ``forward`` takes raw rows ``[B, d]`` (or ``[B, 1, d]``)."""

    arch = "topk"

    def _prepare(self, resid: Tensor) -> Prepared:
        if resid.ndim == 3 and resid.shape[1] == 1:
            resid = resid[:, 0]
        if resid.ndim != 2:
            raise ValueError(f"TopKSAE takes rows [B, d] of one layer, got shape {list(resid.shape)}; "
                             f"read the store with layer={self.cfg.layers[0]}")
        check_width(resid, self.cfg.d_in, "TopKSAE")
        if not self.cfg.standardize:
            return Prepared(resid.to(self.W_dec.dtype), None, None)
        x, mean, std = standardize(resid.to(self.W_dec.dtype))
        return Prepared(x, mean, std)
