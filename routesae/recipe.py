"""Training recipes: routesae's default and the RouteSAE reference code's (REFERENCE §1), option by option.

Each recipe is a set of :class:`~routesae.train.TrainConfig` options, so the two can be compared
one change at a time (``analyses/recipe_ablation.py``)::

    option         default                                   reference (the public RouteSAE code)
    router         "ste": learns from step 0 (RouteSAE only)  "faithful": the paper's
    b_pre_init     "median": geometric median of a sample     "zero"
    enc_init       "fit": W_enc = c W_dec^T, unit-norm rows,  "linear": nn.Linear's U(+-1/sqrt(d)); W_dec = its
                   c fitted (below); "transpose": c = 1        transpose with unit rows
    center_init    "median": RouteSAE's layer centres c_i     "zero"
                   (below; other architectures have none)
    decoder_norm   "project": remove the gradient's radial    "renorm": no projection; rows renormalised
                   part, renormalise after every step          every ``renorm_every`` (10) steps
    warmup_frac /  0.05 / 0.2: linear warm-up, constant,      0 / 0: constant
    decay_frac     linear decay to 0
    aux_k          256 (AuxK on dead latents)                 0 (no AuxK)
    lr             2e-4 / sqrt(M / 2^14)                      5e-4

Both keep ``b_enc = 0`` at the start, per-token standardisation, the normalised-MSE loss, Adam
(0.9, 0.999) and uniformly shuffled minibatches. One difference stays: our TopK keeps a ReLU
after the top-k (the reference code keeps negative pre-activations; with standardised inputs the
k largest of M pre-activations are almost always positive, so the two rarely differ).

Two options of ours joined the default after the recipe study (docs/RESULTS.md, "Recipe
ablation"; before it the default had ``enc_init="transpose"`` and no centres):
``enc_init="fit"`` (W_enc = c W_dec^T with the one scalar c that makes the first reconstruction
the least-squares best on the init sample; the top-k set does not depend on c while b_enc = 0) and
``center_init="median"`` (RouteSAE: each layer's centre is the geometric median of its
standardised rows; see routesae/sae/route.py). On the demo MoE at k = 32 the first brings the
held-out NMSE from 0.37 to 0.28 and the second keeps the faithful router from collapsing onto one
layer (routed-layer entropy 0.15 -> 0.97).

``TrainConfig(store=..., out=..., **recipe_options("reference"))`` trains with the reference
recipe; ``routesae train --recipe reference`` does the same, and any option given explicitly
overrides the recipe's value.
"""

from __future__ import annotations

import math
from typing import Any

import torch

RECIPES: dict[str, dict[str, Any]] = {
    "default": {"router": "ste", "b_pre_init": "median", "enc_init": "fit", "center_init": "median",
                "decoder_norm": "project", "renorm_every": 10, "warmup_frac": 0.05, "decay_frac": 0.2, "aux_k": 256,
                "lr": None},
    "reference": {"router": "faithful", "b_pre_init": "zero", "enc_init": "linear", "center_init": "zero",
                  "decoder_norm": "renorm", "renorm_every": 10, "warmup_frac": 0.0, "decay_frac": 0.0, "aux_k": 0,
                  "lr": 5e-4},
}
B_PRE_INITS = ("median", "zero")
ENC_INITS = ("transpose", "linear", "fit")
CENTER_INITS = ("zero", "median")
DECODER_NORMS = ("project", "renorm")


def recipe_options(name: str) -> dict[str, Any]:
    """The TrainConfig options of recipe ``name`` (a copy); one-line ValueError for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def recipe_name(options: dict[str, Any]) -> str:
    """"default" or "reference" when ``options`` (e.g. ``asdict(cfg)``) match that recipe, else "custom"."""
    for name, want in RECIPES.items():
        if all(options.get(k) == v for k, v in want.items()):
            return name
    return "custom"


@torch.no_grad()
def init_encoder_linear(sae: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """The reference code's initialisation: ``nn.Linear(d, M)``'s default weight for the encoder, the
    decoder its transpose with unit-norm rows, ``b_enc = 0`` (``b_pre`` is set separately)."""
    m, d = sae.W_dec.shape
    bound = 1 / math.sqrt(d)  # kaiming_uniform_(a=sqrt(5)) on a [M, d] weight = U(-1/sqrt(d), 1/sqrt(d))
    w = torch.rand(m, d, generator=generator, dtype=sae.W_dec.dtype) * (2 * bound) - bound
    sae.W_enc.copy_(w.t().to(sae.W_enc))
    sae.W_dec.copy_((w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(sae.W_dec))
    sae.b_enc.zero_()


class DecoderConstraint:
    """Keeps decoder rows at unit norm, the default way (``project``) or the reference way (``renorm``)."""

    def __init__(self, how: str, every: int):
        if how not in DECODER_NORMS:
            raise ValueError(f"unknown decoder_norm {how!r}; choose one of {', '.join(DECODER_NORMS)}")
        if every < 1:
            raise ValueError(f"renorm_every={every} must be at least 1")
        self.how, self.every = how, every

    def after_backward(self, sae) -> None:
        """Project the decoder gradient onto the rows' tangent space (``project`` only)."""
        if self.how == "project":
            sae.after_backward()

    def after_step(self, sae, step: int) -> None:
        """Renormalise rows after optimiser step ``step`` (1-based): every step, or every ``every``-th."""
        if self.how == "project" or step % self.every == 0:
            sae.after_step()


@torch.no_grad()
def fit_encoder_scale(sae: torch.nn.Module, sample: torch.Tensor) -> float:
    """Scale ``W_enc`` by the ``c > 0`` minimising ``sum ||x - b_pre - c W_dec^T z||^2`` over ``sample``
    (raw store rows), ``z`` the code at scale 1; return ``c``. With ``b_enc = 0`` the top-k set does not
    depend on ``c`` and the code scales with it, so this is the least-squares best first reconstruction
    (a transposed unit-norm encoder over-shoots: the k chosen directions all lean towards ``x``)."""
    from .sae.kernels import sparse_decode

    x = sae.sae_input(sample)
    rec = sparse_decode(*sae.encode(x), sae.W_dec)
    c = float((x - sae.b_pre).mul(rec).sum() / rec.pow(2).sum().clamp_min(1e-12))
    c = max(c, 1e-3)
    sae.W_enc.mul_(c)
    return c
