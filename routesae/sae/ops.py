"""Small tensor functions shared by the SAE models: standardisation, the loss, the geometric median."""

from __future__ import annotations

import torch
from torch import Tensor

STD_EPS = 1e-6


def _work(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it already is (so tests can check identities in float64)."""
    return t if t.dtype == torch.float64 else t.float()


def standardize(h: Tensor, eps: float = STD_EPS, shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token standardisation over the last dim: ``x = (h - mean_d h) / (std_d h + eps)``.

    ``std`` is the *biased* (population) standard deviation, as in LayerNorm, so a standardised
    token has ``||x||^2 = d`` (up to eps). Returns ``(x, mean, std)`` with ``mean, std`` of shape
    ``h.shape[:-1] + (1,)``; :func:`destandardize` inverts it exactly. Computed in float32 (float64 kept).
    ``shift`` (broadcast against ``x``) is subtracted from ``x`` in place: ``x - shift``.
    """
    h = _work(h)
    mean = h.mean(dim=-1, keepdim=True)
    c = h - mean
    # biased std from the norm: one pass and no temporary (several times faster than h.std on CPU)
    std = torch.linalg.vector_norm(c, dim=-1, keepdim=True).div_(h.shape[-1] ** 0.5)
    x = c.div_(std + eps)
    return (x if shift is None else x.sub_(shift.to(x.dtype))), mean, std


def destandardize(x: Tensor, mean: Tensor, std: Tensor, eps: float = STD_EPS) -> Tensor:
    """Inverse of :func:`standardize`: ``x * (std + eps) + mean`` (the raw residual scale)."""
    return x * (std + eps) + mean


def nmse(x_hat: Tensor, x: Tensor) -> Tensor:
    """RouteSAE's normalised MSE, the training loss: ``mean_n ||x_hat_n - x_n||^2 / ||x_n||^2``."""
    x_hat, x = _work(x_hat), _work(x)
    return ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)).mean()


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-5, eps: float = 1e-8) -> Tensor:
    """Geometric median of ``points [N, d]`` (the point minimising the sum of Euclidean distances).

    Weiszfeld iterations from the mean: ``y <- sum_i w_i p_i / sum_i w_i`` with
    ``w_i = 1 / max(||p_i - y||, eps)``, stopping when the step is below ``tol * (1 + ||y||)``
    or after ``max_iter`` steps. Float32 (float64 kept), so 32k x d=2048 fits; returns float32 ``[d]``.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, d] tensor, got shape {tuple(points.shape)}")
    p = _work(points)
    y = p.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (p - y).norm(dim=-1).clamp_min(eps)
        y_new = (w[:, None] * p).sum(0) / w.sum()
        step = (y_new - y).norm()
        y = y_new
        if step <= tol * (1.0 + y.norm()):
            break
    return y.float()
