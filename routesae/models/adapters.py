"""Router adapters for the Hugging Face (transformers v5) MoE families.

In transformers v5 all supported families share one shape of MoE block::

    logits, weights, indices = block.<router>(x)     # weights: after renormalisation and scaling
    y = block.experts(x, indices, weights)           # what the model actually applies

so :class:`HFMoEAdapter` hooks three modules per MoE layer:

- a forward pre-hook on ``block.experts``: its inputs are the indices and weights exactly as the
  model applied them (falls back to the router's outputs if a fused kernel skips the module);
- a forward hook on the router (``block.gate`` / ``block.router``): the raw router logits
  (output 0, the same tensor HF's ``output_router_logits`` records);
- a forward hook on the block itself, which emits one :class:`RoutingDecision` per forward.

Adding a family whose block looks like this is one small class: set ``model_types`` and, where
they differ, ``block_attr``, ``router_attr``, ``experts_key`` and :meth:`HFMoEAdapter.is_moe_layer`,
then decorate it with ``@register``. Families with another block shape override :meth:`attach`.

Routing interventions (:mod:`routesae.models.intervene`) recompute a layer's routing from its
router logits with the family's own rule, split into three small methods a family overrides
where it differs from the softmax default: :meth:`HFMoEAdapter.choice_scores` (what top-k ranks),
:meth:`HFMoEAdapter.route_probs` (a distribution over experts for top-p / threshold) and
:meth:`HFMoEAdapter.weights_for` (the weights the model would give a chosen set).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from routesae.models.load import decoder_layers
from routesae.models.routers import RouterAdapter, RoutingDecision, register

Emit = Callable[[int, RoutingDecision], None]

# names the experts' forward uses for (indices, weights) across families
_INDEX_KW = ("top_k_index", "router_indices", "selected_experts", "topk_indices")
_WEIGHT_KW = ("top_k_weights", "routing_weights", "topk_weights", "router_scores")


def _experts_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) from the call ``experts(hidden, indices, weights)``, positional or named."""
    def pick(pos: int, names: tuple[str, ...]) -> torch.Tensor:
        if len(args) > pos:
            return args[pos]
        for name in names:
            if name in kwargs:
                return kwargs[name]
        raise KeyError(f"experts call has none of {names}")

    return pick(1, _INDEX_KW), pick(2, _WEIGHT_KW)


def _repeats(idx: torch.Tensor) -> torch.Tensor:
    """[n, W] bool: the slot holds an expert that an earlier slot of its row already holds."""
    if idx.shape[1] < 2:
        return torch.zeros_like(idx, dtype=torch.bool)
    order = torch.sort(idx, dim=-1, stable=True)
    dup_sorted = torch.zeros_like(idx, dtype=torch.bool)
    dup_sorted[:, 1:] = order.values[:, 1:] == order.values[:, :-1]
    return torch.zeros_like(dup_sorted).scatter_(1, order.indices, dup_sorted)


class HFMoEAdapter(RouterAdapter):
    """Common base: ``layers[i].<block_attr>`` holds ``<router_attr>`` and ``experts``."""

    block_attr: ClassVar[str] = "mlp"
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    experts_key: ClassVar[str] = "num_experts"  # config field holding E
    # whether ``experts(x, indices, weights)`` receives the decision itself; False where the block
    # rewrites it first (LongCat-Flash since transformers 5.25: identity experts become weight-0
    # dummy slots), so the router's output is the decision and overrides replace that output
    experts_get_decision: ClassVar[bool] = True
    # the always-on path beside the routed experts (routesae.causal.shared): the module whose output is
    # added to the routed experts' sum, and the linear whose sigmoid scales it (None: no such module)
    shared_attr: ClassVar[str | None] = None
    shared_gate_attr: ClassVar[str | None] = None

    # ---- layout -------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        """Config rule for whether block ``i`` is a routed MoE (default: every block)."""
        return True

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.config.num_hidden_layers) if self.is_moe_layer(i)]

    def num_experts(self) -> int:
        return int(getattr(self.config, self.experts_key))

    def top_k(self) -> int:
        return int(self.config.num_experts_per_tok)

    def moe_block(self, layer: int) -> nn.Module:
        block = getattr(decoder_layers(self.model)[layer], self.block_attr)
        if not hasattr(block, self.router_attr):
            raise ValueError(f"layer {layer} of this {self.name} model is not an MoE layer; "
                             f"MoE layers: {self.moe_layers()}")
        return block

    # ---- hooks --------------------------------------------------------------------------
    def attach(self, layer: int, emit: Emit, want_logits: bool = True) -> list[RemovableHandle]:
        block = self.moe_block(layer)
        router = getattr(block, self.router_attr)
        experts = getattr(block, self.experts_attr)
        state: dict[str, torch.Tensor] = {}

        def on_block_start(module, args):
            state.clear()

        def on_router(module, args, out):
            logits, weights, indices = out[0], out[1], out[2]
            state.setdefault("indices", indices)  # replaced by the experts' inputs below
            state.setdefault("weights", weights)
            if want_logits:
                state["logits"] = logits

        def on_experts(module, args, kwargs):
            state["indices"], state["weights"] = _experts_inputs(args, kwargs)

        def on_block_end(module, args, out):
            if "indices" not in state:
                raise RuntimeError(f"{self.name} layer {layer}: the router hook did not fire")
            extra = {k: state[k] for k in self.extra_fields()}
            emit(layer, self.decision(state["indices"], state["weights"], state.get("logits"), extra))
            state.clear()

        handles = [block.register_forward_pre_hook(on_block_start), router.register_forward_hook(on_router)]
        if self.experts_get_decision:
            handles.append(experts.register_forward_pre_hook(on_experts, with_kwargs=True))
        handles += self.attach_extra(block, state)
        handles.append(block.register_forward_hook(on_block_end))
        return handles

    # ---- the routing rule, for interventions -----------------------------------------------
    topk_sorted: ClassVar[bool] = True  # whether the family's torch.topk returns sorted slots
    min_slots: ClassVar[int] = 1  # interventions pad narrower sets (weight-0 repeats) to this width

    def normalise_topk(self) -> bool:
        """Softmax families: whether the chosen probabilities are renormalised to sum to 1."""
        return bool(getattr(self.config, "norm_topk_prob", False))

    def choice_scores(self, logits: torch.Tensor, block: nn.Module) -> torch.Tensor:
        """[n, E] scores whose top-k is the family's choice (softmax families: the probabilities)."""
        return torch.softmax(logits.float(), dim=-1)

    def route_probs(self, logits: torch.Tensor, block: nn.Module) -> torch.Tensor:
        """[n, E] a probability distribution over the experts (ranked by top-p and threshold)."""
        return torch.softmax(logits.float(), dim=-1)

    def weights_for(self, logits: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                    block: nn.Module) -> torch.Tensor:
        """[n, W] the weights the family gives experts ``idx`` (``valid`` marks real slots; 0 elsewhere)."""
        w = torch.softmax(logits.float(), dim=-1).gather(1, idx) * valid
        if self.normalise_topk():
            w = w / w.sum(-1, keepdim=True)
        return w

    def attach_extra(self, block: nn.Module, state: dict) -> list[RemovableHandle]:
        """Hooks filling ``state[name]`` for each name in :meth:`extra_fields` ([n] per token)."""
        return []

    def decision(self, indices: torch.Tensor, weights: torch.Tensor,
                 logits: torch.Tensor | None, extra: dict[str, torch.Tensor]) -> RoutingDecision:
        """Normalise dtypes and shapes: [n, k_max] int64 / float32, -1 and 0 in unused slots.

        An index < 0 marks an unused slot; an index >= E (a "zero-computation" expert) is kept
        with its weight but not counted in ``n_active``. A slot repeating an earlier slot's expert
        with weight 0 is padding too: routing interventions pad variable-size expert sets that way,
        since the grouped / batched experts kernels accept no sentinel index.
        """
        n_experts, k_max = self.num_experts(), self.top_k()
        idx = indices.detach().reshape(-1, indices.shape[-1]).to(torch.int64)
        w = weights.detach().reshape(idx.shape).to(torch.float32)
        if idx.shape[1] < k_max:  # a router that returned fewer slots: pad
            pad = k_max - idx.shape[1]
            idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
            w = torch.nn.functional.pad(w, (0, pad), value=0.0)
        unused = idx < 0
        zero = w == 0
        if bool(zero.any()):  # only interventions pad with weight-0 repeats; skip the sort otherwise
            unused |= zero & _repeats(idx)
        idx = idx.masked_fill(unused, -1)
        w = w.masked_fill(unused, 0.0)
        n_active = ((idx >= 0) & (idx < n_experts)).sum(-1)
        if logits is not None:
            logits = logits.detach().reshape(idx.shape[0], -1).to(torch.float32)
        extra = {k: v.detach().reshape(idx.shape[0]).to(torch.float32) for k, v in extra.items()}
        return RoutingDecision(idx, w, n_active, logits, extra)


@register
class OlmoeAdapter(HFMoEAdapter):
    """OLMoE: softmax over all experts, top-k, renormalised only if ``norm_topk_prob``."""

    model_types = ("olmoe",)


@register
class MixtralAdapter(HFMoEAdapter):
    """Mixtral: softmax, top-k, always renormalised."""

    model_types = ("mixtral",)
    experts_key = "num_local_experts"

    def normalise_topk(self) -> bool:
        return True


class _QwenMoeAdapter(HFMoEAdapter):
    """Qwen MoE layout: ``mlp_only_layers`` and ``decoder_sparse_step`` pick the MoE blocks."""

    def is_moe_layer(self, i: int) -> bool:
        c = self.config
        only_mlp = c.mlp_only_layers or []
        return i not in only_mlp and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0


@register
class Qwen2MoeAdapter(_QwenMoeAdapter):
    """Qwen2-MoE: softmax, top-k, ``norm_topk_prob``; plus a sigmoid-gated shared expert.

    Extra ``shared_gate`` [n]: ``sigmoid(mlp.shared_expert_gate(x))``, the factor the shared
    expert's output is multiplied by.
    """

    model_types = ("qwen2_moe",)
    shared_attr = "shared_expert"
    shared_gate_attr = "shared_expert_gate"

    def extra_fields(self) -> tuple[str, ...]:
        return ("shared_gate",)

    def attach_extra(self, block, state):
        def on_shared_gate(module, args, out):
            state["shared_gate"] = torch.sigmoid(out.detach()).reshape(-1)

        return [block.shared_expert_gate.register_forward_hook(on_shared_gate)]


@register
class Qwen3NextAdapter(Qwen2MoeAdapter):
    """Qwen3-Next: the Qwen2-MoE block (softmax, top-k, ``norm_topk_prob``, sigmoid-gated shared expert)
    beside linear- and full-attention token mixers."""

    model_types = ("qwen3_next",)


@register
class Qwen3MoeAdapter(_QwenMoeAdapter):
    """Qwen3-MoE: softmax, top-k, ``norm_topk_prob``; no shared expert."""

    model_types = ("qwen3_moe",)


@register
class DeepseekV3Adapter(HFMoEAdapter):
    """DeepSeek-V3: sigmoid scores; experts chosen by score + ``e_score_correction_bias`` within
    the ``topk_group`` best of ``n_group`` groups; weights from the unbiased scores, normalised
    (``norm_topk_prob``) and multiplied by ``routed_scaling_factor``. The first
    ``first_k_dense_replace`` blocks are dense. Logits are the raw scores before the sigmoid.
    """

    model_types = ("deepseek_v3",)
    experts_key = "n_routed_experts"
    shared_attr = "shared_experts"

    topk_sorted = False

    def is_moe_layer(self, i: int) -> bool:
        return i >= (self.config.first_k_dense_replace or 0)

    def choice_scores(self, logits, block):
        """sigmoid + correction bias; experts outside the ``topk_group`` best groups rank last."""
        gate, c = block.gate, self.config
        choice = torch.sigmoid(logits.float()) + gate.e_score_correction_bias.float()
        n, e = choice.shape
        groups = choice.view(n, c.n_group, e // c.n_group).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, c.topk_group, dim=-1, sorted=False)[1], 1)
        allowed = keep.unsqueeze(-1).expand(-1, c.n_group, e // c.n_group).reshape(n, e).bool()
        return choice.masked_fill(~allowed, float("-inf"))

    def route_probs(self, logits, block):
        """The sigmoid scores normalised to sum to 1 (no bias, no group limit)."""
        s = torch.sigmoid(logits.float())
        return s / s.sum(-1, keepdim=True)

    def weights_for(self, logits, idx, valid, block):
        w = torch.sigmoid(logits.float()).gather(1, idx) * valid
        if self.normalise_topk():
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.config.routed_scaling_factor


class _LogitTopK:
    """GPT-OSS / Granite rule: top-k on the logits, softmax over the chosen experts' logits."""

    def choice_scores(self, logits, block):
        return logits.float()

    def weights_for(self, logits, idx, valid, block):
        return torch.softmax(logits.float().gather(1, idx).masked_fill(~valid, float("-inf")), dim=-1)


@register
class GptOssAdapter(_LogitTopK, HFMoEAdapter):
    """GPT-OSS: ``mlp.router`` (with bias); top-k on the logits, softmax over the k."""

    model_types = ("gpt_oss",)
    router_attr = "router"
    experts_key = "num_local_experts"


@register
class GraniteMoeAdapter(_LogitTopK, HFMoEAdapter):
    """Granite-MoE: ``block_sparse_moe.router``; top-k on the logits, softmax over the k."""

    model_types = ("granitemoe",)
    block_attr = "block_sparse_moe"
    router_attr = "router"
    experts_key = "num_local_experts"


@register
class LongcatFlashAdapter(HFMoEAdapter):
    """LongCat-Flash: ``mlp.router`` (a ``classifier`` linear) scores ``n_routed_experts`` real
    experts plus ``zero_expert_num`` zero-computation (identity) experts; softmax over all of them,
    choice by probability + ``e_score_correction_bias``, weights = probabilities times
    ``routed_scaling_factor``. Indices >= ``n_routed_experts`` are identity experts, so a token's
    real experts (``n_active``) vary between 0 and ``moe_topk``.

    Layout: ``config.num_hidden_layers`` is ``2 * num_layers`` (two attention sublayers per block),
    but there are ``num_layers`` decoder blocks, each with one shortcut MoE (``mlp``) beside two
    dense MLPs (``mlps``). Layer i is, as everywhere, the output of decoder block i; the MoE of
    block i reads the residual after that block's first attention sublayer. Router logits have
    ``n_routed_experts + zero_expert_num`` columns.

    The decision is read from (and overridden at) the router's output: since transformers 5.25 the
    block turns identity-expert slots into weight-0 slots of real experts before calling
    ``experts``, so the experts' inputs no longer say which slots were identity experts.
    """

    model_types = ("longcat_flash",)
    experts_get_decision = False
    router_attr = "router"
    experts_key = "n_routed_experts"
    topk_sorted = False
    min_slots = 2  # its experts forward squeezes the slot dimension away when there is one slot

    def moe_layers(self) -> list[int]:
        return list(range(len(decoder_layers(self.model))))

    def choice_scores(self, logits, block):
        return torch.softmax(logits.float(), dim=-1) + block.router.e_score_correction_bias.float()

    def weights_for(self, logits, idx, valid, block):
        w = torch.softmax(logits.float(), dim=-1).gather(1, idx) * valid
        return w * self.config.routed_scaling_factor
