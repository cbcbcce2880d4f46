"""Router adapters: where each MoE family keeps its router, and how it picks and weighs experts.

One small class per architecture. An adapter hooks the modules of one MoE layer and turns what
the hooks see into a :class:`RoutingDecision` that holds the routing *exactly as the model
applied it* (after its own renormalisation and scaling). Capture uses adapters only through
:func:`adapter_for` and the :class:`RouterAdapter` interface.

Adding an architecture (see docs/guide.md): subclass :class:`RouterAdapter`, set
``model_types`` to the Hugging Face ``config.model_type`` values it serves, implement
``moe_layers``, ``num_experts``, ``top_k`` and ``attach``, and decorate it with
``@register``. A test in tests/test_routers.py compares it with the model's own
``output_router_logits``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class RoutingDecision:
    """Routing of one MoE layer for a flat batch of ``n`` token positions.

    indices:  [n, k_max] int64, the experts used; -1 pads unused slots (variable-k routers)
    weights:  [n, k_max] float32, the weights the model multiplied expert outputs by; 0 where unused
    n_active: [n] int64, how many real experts the token used
    logits:   [n, E] float32 pre-activation router scores, or None
    extra:    per-token extras, e.g. ``shared_gate`` [n] for Qwen2-MoE's shared-expert gate
    """

    indices: torch.Tensor
    weights: torch.Tensor
    n_active: torch.Tensor
    logits: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class UnsupportedArchitecture(ValueError):
    """An MoE model for which no router adapter exists."""


_REGISTRY: list[type[RouterAdapter]] = []


def register(cls: type[RouterAdapter]) -> type[RouterAdapter]:
    _REGISTRY.append(cls)
    return cls


def supported_model_types() -> list[str]:
    return sorted({t for cls in _REGISTRY for t in cls.model_types})


class RouterAdapter(ABC):
    """Interface between one MoE family and capture."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @property
    def name(self) -> str:
        return self.model_types[0]

    @abstractmethod
    def moe_layers(self) -> list[int]:
        """Block indices whose FFN is a routed MoE (dense blocks excluded)."""

    @abstractmethod
    def num_experts(self) -> int:
        """Number of routed experts E per MoE layer."""

    @abstractmethod
    def top_k(self) -> int:
        """k_max: the most experts a token can use (width of ``indices``)."""

    @abstractmethod
    def attach(self, layer: int, emit: Callable[[int, RoutingDecision], None],
               want_logits: bool = True) -> list[RemovableHandle]:
        """Register forward hooks on this MoE layer's modules.

        Each forward pass must call ``emit(layer, decision)`` exactly once for this layer, with the
        decision of every token position in the batch, flattened row-major as ``[batch * seq]``.
        Returns the hook handles so capture can remove them.
        """

    def extra_fields(self) -> tuple[str, ...]:
        """Names of the per-token extras this adapter fills (stored beside the router record)."""
        return ()


def _moe_hint(config) -> bool:
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return any(getattr(config, k, None) for k in keys)


def adapter_for(model: nn.Module) -> RouterAdapter | None:
    """The adapter for ``model``, or None for a dense model.

    Raises UnsupportedArchitecture, listing the supported ones, for an MoE model we cannot read.
    """
    from routesae.models import adapters  # noqa: F401  (registers the adapters)

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for cls in _REGISTRY:
        if model_type in cls.model_types:
            return cls(model)
    if config is not None and _moe_hint(config):
        raise UnsupportedArchitecture(
            f"no router adapter for MoE architecture '{model_type}'; supported: "
            f"{', '.join(supported_model_types())} (add one: see docs/guide.md, 'Adding a router adapter')"
        )
    return None
