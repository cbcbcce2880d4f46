"""Faster float32 inference on CPU for analyses that run many forwards of one model.

:func:`cpu_inference` swaps two kernels for the duration of a ``with`` block and undoes both on exit:

- every float32 ``nn.Linear`` runs oneDNN's fused linear (:mod:`routesae.onednn`) instead of the
  BLAS call behind ``F.linear``;
- the experts of Hugging Face MoE blocks (the ``ExpertsInterface`` layout of OLMoE, Qwen-MoE,
  Mixtral, DeepSeek-V3, ...: 3-D ``gate_up_proj`` and ``down_proj``, no bias) run one sorted pass
  (tokens grouped by expert with one argsort; each expert's two products on a contiguous slice, in
  the eager loop's expert order) instead of the eager loop's per-expert masks and gathers.

Both compute the same float32 arithmetic as the stock kernels; results may differ from them by float
rounding. Each experts module is checked once against the eager loop on its first batch (a mismatch
beyond rounding, e.g. a family whose eager forward does something the sorted pass does not, keeps the
eager loop for that module). Routing decisions are the model's own, so a near tie between two
experts' router logits may resolve differently than under the stock kernels.

    with cpu_inference(model):
        logits = model(input_ids).logits
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from routesae import onednn

SORTED_EXPERTS = "routesae_sorted"


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return onednn.linear(x, self.weight, self.bias)


def _sorted_ok(self: nn.Module) -> bool:
    """Whether this experts module has the layout the sorted pass computes."""
    gate_up, down = getattr(self, "gate_up_proj", None), getattr(self, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3
            and getattr(self, "has_gate", False) and getattr(self, "is_concatenated", False)
            and not getattr(self, "is_transposed", True) and not getattr(self, "has_bias", True)
            and not getattr(self, "has_post_expert_norm", True) and not getattr(self, "_is_expert_parallel", True))


def _sorted_pass(self: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    n_exp, k = self.gate_up_proj.shape[0], index.shape[-1]
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots by expert, ascending (indices >= n_exp last, dropped)
    counts = torch.bincount(flat, minlength=n_exp + 1)[:n_exp].tolist()
    used = sum(counts)
    token = order[:used] // k
    x = hidden[token]
    outs, start = [], 0
    for e, count in enumerate(counts):
        if count:
            h = self._apply_gate(onednn.linear(x[start:start + count], self.gate_up_proj[e]))
            outs.append(onednn.linear(h, self.down_proj[e]))
        start += count
    out = torch.zeros_like(hidden)
    if outs:
        y = torch.cat(outs) * weights.reshape(-1)[order[:used], None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def sorted_experts_forward(self: nn.Module, hidden: torch.Tensor, index: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """The experts' output by the sorted pass; the eager loop where the layout differs or the
    first-batch check found a difference."""
    eager = type(self).forward.__wrapped__
    verdict = self.__dict__.get("_routesae_sorted")
    if verdict is False or not _sorted_ok(self):
        return eager(self, hidden, index, weights)
    out = _sorted_pass(self, hidden, index, weights)
    if verdict is None:
        ref = eager(self, hidden, index, weights)
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        self.__dict__["_routesae_sorted"] = bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * scale + 1e-12))
        return out if self.__dict__["_routesae_sorted"] else ref
    return out


def _register_experts() -> bool:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    except ImportError:
        return False
    if SORTED_EXPERTS not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(SORTED_EXPERTS, sorted_experts_forward)
    return True


@contextlib.contextmanager
def cpu_inference(model: nn.Module) -> Iterator[bool]:
    """Run ``model`` (on CPU) with the kernels of this module inside the block; yields whether any was
    swapped (False on other devices, dtypes or torch builds without oneDNN)."""
    params = next(model.parameters(), None)
    if params is None or params.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        yield False
        return
    linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__
               and m.weight.dtype == torch.float32]
    previous = getattr(getattr(model, "config", None), "_experts_implementation", None)
    experts = [m for m in model.modules() if _sorted_ok(m)]
    switch = (bool(experts) and previous is not None and hasattr(model, "set_experts_implementation")
              and _register_experts())
    if switch:
        try:
            model.set_experts_implementation(SORTED_EXPERTS)
        except (ValueError, RuntimeError, KeyError):  # a model that refuses the switch keeps its experts
            switch = False
    for m in linears:
        m.forward = types.MethodType(_linear_forward, m)
    try:
        yield bool(linears) or switch
    finally:
        for m in linears:
            del m.forward
        for m in experts:
            m.__dict__.pop("_routesae_sorted", None)
        if switch:
            model.set_experts_implementation(previous)
