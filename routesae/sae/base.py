"""The TopK sparse autoencoder body shared by every architecture, with AuxK, init and save/load.

``z = ReLU(TopK(W_enc^T (x - b_pre) + b_enc))``, ``x_hat = W_dec^T z + b_pre`` (Gao et al. 2024),
stored as ``W_enc [d, M]``, ``W_dec [M, d]`` (one unit-norm row per latent), ``b_enc [M]``,
``b_pre [d]`` (saved as ``b_dec``). Subclasses only say how raw store rows become the examples
``x`` (:meth:`SparseAutoencoder._prepare`) and how a reconstruction goes back to the residual
scale (:meth:`SparseAutoencoder.reconstruct`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from routesae.atomic import atomic_path, atomic_write_json

from .config import SAEConfig, SAEOutput
from .kernels import sparse_decode, topk_encode_decode, topk_relu
from .ops import destandardize, geometric_median, nmse

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
_FILE_NAMES = {"b_pre": "b_dec"}  # module name -> name in sae.safetensors
T = TypeVar("T", bound="SparseAutoencoder")
OPTIONAL_TENSORS = {"layer_center"}  # may be missing from older files; loaded as the fresh module's zeros


@dataclass
class Prepared:
    """Raw rows turned into SAE examples: ``x [N, d]`` plus what is needed to undo the change.

    mean, std: standardisation statistics ``[..., 1]`` of the raw rows (None if not standardised).
    routed_layer, probs: see :class:`SAEOutput`.
    """

    x: Tensor
    mean: Tensor | None
    std: Tensor | None
    routed_layer: Tensor | None = None
    probs: Tensor | None = None


class SparseAutoencoder(nn.Module):
    """Base class: TopK SAE parameters, encode/decode, losses, dead latents, init and save/load."""

    arch: str = ""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        if cfg.arch != self.arch:
            raise ValueError(f"config arch {cfg.arch!r} does not fit {type(self).__name__}; use load_sae()")
        self.cfg = cfg
        d, m = cfg.d_in, cfg.n_latents
        w_dec = torch.randn(m, d)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())  # encoder initialised as the decoder transpose
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.int64))

    # ------------------------------------------------------------ the SAE on prepared examples

    def _prepare(self, resid: Tensor) -> Prepared:
        """Raw store rows -> examples; implemented by each architecture."""
        raise NotImplementedError

    def sae_input(self, resid: Tensor) -> Tensor:
        """The examples ``x [N, d]`` this SAE encodes for raw store rows ``resid``."""
        return self._prepare(resid).x

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Examples ``x [N, d]`` -> ``(top_val [N, k] post-ReLU, top_idx [N, k] int64)``."""
        use_bf16 = self.cfg.bf16 and x.is_cuda
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            val, idx = topk_relu(x - self.b_pre, self.W_enc, self.b_enc, self.cfg.k)
        return val.to(self.W_dec.dtype), idx

    def encode_decode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(top_val, top_idx, x_hat)`` of :meth:`encode` then :meth:`decode`, with one fused sparse backward."""
        use_bf16 = self.cfg.bf16 and x.is_cuda
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            val, idx, body = topk_encode_decode(x - self.b_pre, self.W_enc, self.b_enc, self.W_dec, self.cfg.k)
        return val, idx, body + self.b_pre

    def decode(self, top_val: Tensor, top_idx: Tensor) -> Tensor:
        """Sparse code -> reconstruction ``[N, d]`` (``sum_j val_j W_dec[idx_j] + b_pre``)."""
        return sparse_decode(top_val, top_idx, self.W_dec) + self.b_pre

    def forward(self, resid: Tensor) -> SAEOutput:
        """Raw store rows -> :class:`SAEOutput`; in training mode also updates dead-latent counts."""
        prep = self._prepare(resid)
        x = prep.x
        val, idx, x_hat = self.encode_decode(x)
        recon = nmse(x_hat, x)
        aux, balance = x.new_zeros(()), None
        if self.training:
            self._count_firing(val, idx)
            aux = self.aux_loss(x, x_hat)
            balance = self.balance_loss(prep)
        loss = recon + self.cfg.aux_coef * aux
        if balance is not None and self.cfg.route_balance > 0:
            loss = loss + self.cfg.route_balance * balance
        return SAEOutput(loss=loss, recon_loss=recon, aux_loss=aux, x=x, x_hat=x_hat, top_idx=idx,
                         top_val=val, routed_layer=prep.routed_layer, router_probs=prep.probs,
                         balance_loss=balance)

    def balance_loss(self, prep: Prepared) -> Tensor | None:
        """A loss that spreads examples over layers (RouteSAE overrides it); None without a router."""
        return None

    def reconstruct(self, resid: Tensor) -> tuple[Tensor, Tensor | None]:
        """Reconstruction on the raw residual scale, to splice into the model.

        Returns ``(h_hat, routed_layer)``: TopKSAE ``([B, d], None)``; subclasses document theirs.
        """
        prep = self._prepare(resid)
        x_hat = self.decode(*self.encode(prep.x))
        if prep.mean is None:
            return x_hat, prep.routed_layer
        return destandardize(x_hat, prep.mean, prep.std), prep.routed_layer

    # ------------------------------------------------------------ dead latents and AuxK

    def _count_firing(self, val: Tensor, idx: Tensor) -> None:
        n_fired = torch.bincount(idx.reshape(-1), weights=(val.reshape(-1) > 0).float(),
                                 minlength=self.tokens_since_fired.shape[0])  # no boolean-mask gather
        self.tokens_since_fired.add_(val.shape[0]).masked_fill_(n_fired > 0, 0)

    def dead_mask(self) -> Tensor:
        """``[M]`` bool: latents that have not fired for ``cfg.dead_tokens`` examples."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def aux_loss(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """AuxK: the top ``aux_k`` dead latents reconstruct the residual ``e = x - x_hat``.

        ``e_hat = sum_j ReLU(pre_j) W_dec[j]`` over dead latents only, with NO ``b_pre`` added
        (``e`` is a difference of two points, so ``b_pre`` cancels); loss
        ``mean_n ||e - e_hat||^2 / ||e||^2`` with ``e`` detached. 0 when no latent is dead.
        The input ``x`` is detached too, so the aux loss never moves a router.
        """
        dead = self.dead_mask().nonzero().squeeze(-1)
        k_aux = min(self.cfg.aux_k_used, dead.numel())
        if k_aux == 0:
            return x.new_zeros(())
        e = (x - x_hat).detach()
        pre = (x.detach() - self.b_pre) @ self.W_enc[:, dead] + self.b_enc[dead]
        top = pre.topk(k_aux, dim=-1)
        e_hat = sparse_decode(top.values.relu(), dead[top.indices], self.W_dec)
        return nmse(e_hat, e)

    # ------------------------------------------------------------ init and decoder constraint

    @torch.no_grad()
    def init_from_sample(self, resid_sample: Tensor, max_samples: int = 32768) -> Tensor:
        """Set ``b_pre`` to the geometric median of up to ``max_samples`` SAE examples; return it.

        The median is taken of the examples the SAE sees at this moment (``sae_input``): for
        RouteSAE that is the routed input ``p_i* x_i*`` under the initial router.
        """
        x = self.sae_input(resid_sample[:max_samples])
        med = geometric_median(x[:max_samples])
        self.b_pre.copy_(med.to(self.b_pre))
        return med

    @torch.no_grad()
    def after_backward(self) -> None:
        """Remove from each decoder row's gradient its component parallel to the row."""
        g, w = self.W_dec.grad, self.W_dec
        if g is not None:
            g -= (g * w).sum(-1, keepdim=True) / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-12) * w

    @torch.no_grad()
    def after_step(self) -> None:
        """Renormalise decoder rows to unit norm (call after each optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------ save / load

    def save_pretrained(self, run_dir: str | Path) -> None:
        """Write ``config.json`` and ``sae.safetensors`` into ``run_dir`` (each atomically)."""
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        tensors = {_FILE_NAMES.get(n, n): t.detach().cpu().contiguous()
                   for n, t in self.state_dict().items()}
        with atomic_path(run / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "routesae-sae/1", "arch": self.cfg.arch})
        atomic_write_json(run / CONFIG_FILE, self.cfg.to_dict())

    @staticmethod
    def read_config(run_dir: str | Path) -> SAEConfig:
        """The :class:`SAEConfig` of a run folder, type- and range-checked.

        Raises a one-line ``ValueError`` naming the file (and the field) if it is missing, not
        JSON, or holds a value of the wrong type or range.
        """
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"{path} not found; is {run_dir} an SAE run folder (save_pretrained output)?")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path} ({e}); the run is damaged, train it again") from None
        try:
            return SAEConfig.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}; the file was edited or damaged, train the run again") from None

    @classmethod
    def from_pretrained(cls: type[T], run_dir: str | Path, device: str | torch.device = "cpu") -> T:
        """Load a run written by :meth:`save_pretrained`; shapes are checked against the config."""
        cfg = cls.read_config(run_dir)
        if cls.arch != cfg.arch:
            raise ValueError(f"{run_dir} holds a {cfg.arch!r} SAE, not {cls.arch!r}; use load_sae()")
        path = Path(run_dir) / WEIGHTS_FILE
        if not path.is_file():
            raise ValueError(f"{path} not found; the run has a config but no weights")
        model = cls(cfg)
        expected = {_FILE_NAMES.get(n, n): (n, t) for n, t in model.state_dict().items()}
        state = {}
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for name in OPTIONAL_TENSORS & (set(expected) - names):  # a file written before the tensor existed
                module_name, fresh = expected.pop(name)
                state[module_name] = fresh.clone()
            if names != set(expected):
                raise ValueError(f"{path} holds tensors {sorted(names)}, expected {sorted(expected)}")
            for fname, (name, ref) in expected.items():
                t = f.get_tensor(fname)
                if t.shape != ref.shape:
                    raise ValueError(f"{path}: {fname} has shape {list(t.shape)} but the config needs "
                                     f"{list(ref.shape)}; config.json and sae.safetensors disagree")
                state[name] = t
        model.load_state_dict(state)
        return model.to(device)
