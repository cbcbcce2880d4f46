"""The RouteSAE reference code's training step, rewritten here (in our words) so bench/train.py can time it.

What the public reference implementation does per batch (REFERENCE §1, "the reference trainer as
its code runs"), on rows ``h [B, L', d]`` of the routed layers:

    x       = (h - mean_d h) / (std_d h + 1e-6)          per-token standardisation (unbiased std, as there)
    p       = softmax(router(sum_i x_i))                 nn.Linear(d, L', bias=False)
    p*, i*  = max_i p_i
    x_r     = p* x_i*                                    gathered from the [B, L', d] stack
    pre     = encoder(x_r - b_pre) + b_enc               nn.Linear(d, M, bias=False): dense [B, M]
    z       = scatter(zeros [B, M], topk(pre, k))         sorted top-k, no ReLU, a dense [B, M] code
    x_hat   = decoder(z) + b_pre                         nn.Linear(M, d, bias=False): dense [B, M] @ [M, d]
    loss    = mean_B( mean_d (x_hat - x_r)^2 / mean_d x_r^2 )
    Adam(5e-4 here: the lr given); decoder columns renormalised every 10 steps

Everything is dense: the backward runs the two [B, M] x [M, d] products of the decoder and the two of
the encoder, and the top-k's gradient is scattered into a dense [B, M] matrix. The bench feeds it the
same batches as ours, already in memory (it pays no store reads: a bias in its favour).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ReferenceRouteSAE(nn.Module):
    """The reference's RouteSAE (router + dense TopK SAE), hard routing, sum pooling."""

    def __init__(self, d: int, n_layers: int, latents: int, k: int):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, n_layers, bias=False)
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.latent_bias = nn.Parameter(torch.zeros(latents))
        self.encoder = nn.Linear(d, latents, bias=False)
        self.decoder = nn.Linear(latents, d, bias=False)
        self.decoder.weight.data = self.encoder.weight.data.t().clone()  # "tied" init
        self.unit_norm_decoder()

    @torch.no_grad()
    def unit_norm_decoder(self) -> None:
        self.decoder.weight /= self.decoder.weight.norm(dim=0, keepdim=True)

    def forward(self, h: Tensor) -> Tensor:
        """Raw rows ``[B, L', d]`` -> the normalised-MSE loss of the batch."""
        x = (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-6)
        p = torch.softmax(self.router(x.sum(1)), dim=-1)
        p_max, layer = p.max(dim=-1)
        x_r = torch.gather(x, 1, layer.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1) * p_max.unsqueeze(-1)
        pre = self.encoder(x_r - self.pre_bias) + self.latent_bias
        top = torch.topk(pre, self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        x_hat = self.decoder(z) + self.pre_bias
        return ((x_hat - x_r).pow(2).mean(-1) / x_r.pow(2).mean(-1)).mean()


def reference_step(model: ReferenceRouteSAE, opt: torch.optim.Optimizer, h: Tensor, step: int) -> float:
    """One training step as the reference runs it; returns the loss."""
    loss = model(h)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (step + 1) % 10 == 0:
        model.unit_norm_decoder()
    return loss.item()
