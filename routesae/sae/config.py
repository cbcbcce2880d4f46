"""What an SAE is (:class:`SAEConfig`) and what its forward pass returns (:class:`SAEOutput`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor

ARCHS = ("topk", "routesae", "mlsae")
ROUTINGS = ("hard", "soft")
POOLINGS = ("sum", "mean")
ROUTERS = ("faithful", "ste")
FORMAT = "routesae-sae/1"
_INTS = ("d_in", "n_latents", "k", "aux_k", "dead_tokens")
_STRS = ("arch", "routing", "pooling", "router")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(c: SAEConfig) -> None:
    """One-line ``ValueError`` naming the first field whose value has the wrong type (JSON may hold anything)."""
    def bad(name: str, want: str) -> None:
        value = repr(getattr(c, name))
        raise ValueError(f"field {name!r} is {value[:60]}, not {want}")

    for name in _STRS:
        if not isinstance(getattr(c, name), str):
            bad(name, "a string")
    for name in _INTS:
        if not _is_int(getattr(c, name)):
            bad(name, "an integer")
    if not (isinstance(c.layers, list) and all(_is_int(x) and x >= 0 for x in c.layers)):
        bad("layers", "a list of non-negative integers")
    for name in ("aux_coef", "route_balance"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad(name, "a finite number")
    for name in ("standardize", "bf16"):
        if not isinstance(getattr(c, name), bool):
            bad(name, "true or false")
    if not isinstance(c.meta, dict):
        bad("meta", "a JSON object")


@dataclass
class SAEConfig:
    """Hyper-parameters that define an SAE; saved as ``RUN/config.json``.

    arch: "topk" (one layer), "routesae" (router over layers + one shared TopK SAE) or "mlsae"
      (one TopK SAE over every (token, layer) pair).
    d_in: residual width d. n_latents: dictionary size M. k: active latents per example.
    layers: store layers the model reads, in the order of the ``resid`` rows it is given
      (topk: ``[layer]``).
    routing: "hard" (``x_route = p_i* x_i*``) or "soft" (``sum_i p_i x_i``); RouteSAE only.
    pooling: "sum" or "mean" pooling of the standardised layers fed to the router.
    router: "faithful" (the paper) or "ste" (hard forward, soft backward; see docs/routesae.md).
    aux_k: dead latents used by the AuxK loss (clipped to ``n_latents // 2``; 0 disables it).
    aux_coef: weight of the AuxK loss. dead_tokens: examples without firing before a latent
      counts as dead. standardize: per-token standardisation of the inputs (REFERENCE §1).
    bf16: run the encoder matmul under bf16 autocast when on CUDA.
    route_balance: RouteSAE: weight of the layer-balance loss ``L' sum_i f_i P_i`` added in training
      (0 = the paper's router; see routesae/sae/route.py and docs/routesae.md).
    meta: free-form provenance (model, store, hook names); not used by the model.
    """

    arch: str
    d_in: int
    n_latents: int
    k: int
    layers: list[int]
    routing: str = "hard"
    pooling: str = "sum"
    router: str = "faithful"
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_tokens: int = 10_000_000
    standardize: bool = True
    bf16: bool = True
    route_balance: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        """L', the number of layers in each input row."""
        return len(self.layers)

    @property
    def aux_k_used(self) -> int:
        """``aux_k`` clipped to half the dictionary."""
        return min(self.aux_k, self.n_latents // 2)

    def validate(self) -> SAEConfig:
        """Raise a one-line ``ValueError`` naming the bad setting and the fix; return self.

        Types are checked first (ints are ints and not bools, ``layers`` a list of non-negative
        ints (non-empty: a value check), ``aux_coef`` finite, ``meta`` a dict), then values and ranges.
        """
        _check_types(self)

        def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")

        one_of("arch", self.arch, ARCHS)
        one_of("routing", self.routing, ROUTINGS)
        one_of("pooling", self.pooling, POOLINGS)
        one_of("router", self.router, ROUTERS)
        if self.d_in < 1 or self.n_latents < 1:
            raise ValueError(f"d_in={self.d_in} and n_latents={self.n_latents} must both be positive")
        if not 1 <= self.k <= self.n_latents:
            if self.k < 1:
                raise ValueError(f"k={self.k} must be at least 1; raise --k")
            raise ValueError(f"k={self.k} is larger than the latent count {self.n_latents}; "
                             f"lower --k or raise --latents/--expansion")
        if not self.layers:
            raise ValueError("layers is empty; pass at least one store layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} repeat a layer; list each layer once")
        if self.arch == "topk" and len(self.layers) != 1:
            raise ValueError(f"a topk SAE reads one layer, got layers={self.layers}; pass one --layer")
        if self.arch == "routesae" and len(self.layers) < 2:
            raise ValueError(f"RouteSAE routes between at least 2 layers, got layers={self.layers}")
        if self.router == "ste" and self.routing != "hard":
            raise ValueError("router='ste' changes only hard routing (soft routing already trains the router); "
                             "use --routing hard or --router faithful")
        if self.route_balance < 0 or (self.route_balance > 0 and self.arch != "routesae"):
            raise ValueError(f"route_balance={self.route_balance} must be >= 0, and 0 unless arch is routesae")
        if self.aux_k < 0 or self.aux_coef < 0 or self.dead_tokens < 1:
            raise ValueError(f"aux_k={self.aux_k}, aux_coef={self.aux_coef} must be >= 0 and "
                             f"dead_tokens={self.dead_tokens} >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict, with the file format tag."""
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build (and validate: types, then values) a config from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"the SAE config is a {type(d).__name__}, not a JSON object")
        d = dict(d)
        fmt = d.pop("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"config format {fmt!r} is not {FORMAT!r}; this run was written by another tool")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown SAE config keys {unknown}; the run was written by a newer routesae?")
        missing = sorted(f.name for f in fields(cls) if f.name in ("arch", "d_in", "n_latents", "k", "layers")
                         and f.name not in d)
        if missing:
            raise ValueError(f"SAE config lacks {missing}")
        return cls(**d).validate()


@dataclass
class SAEOutput:
    """What ``forward`` returns (N = examples: B tokens, or B*L' for MLSAE).

    loss: ``recon_loss + aux_coef * aux_loss`` (the quantity to minimise).
    recon_loss: normalised MSE ``mean_n ||x_hat - x||^2 / ||x||^2``.
    aux_loss: AuxK loss on dead latents (0 outside training or when none is dead).
    x: the target the SAE reconstructs [N, d] (standardised; for RouteSAE the routed input).
    x_hat: reconstruction [N, d]. top_idx [N, k] int64 and top_val [N, k] (post-ReLU): the code.
    routed_layer: RouteSAE: [B] position in ``cfg.layers`` of each token's routed layer;
      MLSAE: [N] layer position of each example; TopKSAE: None.
    router_probs: RouteSAE: [B, L'] softmax weights; otherwise None.
    balance_loss: RouteSAE in training: the layer-balance loss (weighted by ``cfg.route_balance``
      in ``loss``; computed, for the logs, even when the weight is 0); otherwise None.
    """

    loss: Tensor
    recon_loss: Tensor
    aux_loss: Tensor
    x: Tensor
    x_hat: Tensor
    top_idx: Tensor
    top_val: Tensor
    routed_layer: Tensor | None = None
    router_probs: Tensor | None = None
    balance_loss: Tensor | None = None
