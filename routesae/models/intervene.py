"""Routing interventions: change which experts a token uses during a forward pass, weights untouched.

An override is a list of clauses, written as text on the command line
(``--routing-override``) and parsed by :meth:`RoutingOverride.parse`:

- ``topk:K``       the K best experts by the family's own choice rule (K from 1 to E)
- ``topp:P``       the smallest set of experts whose probabilities sum to >= P (0 < P <= 1)
- ``threshold:T``  every expert with probability >= T (the best expert is always kept)
- ``ablate:3,7``   experts 3 and 7 removed: their router logits set to -inf before the family's
                   rule runs, so the probabilities renormalise over the others and top-k picks
                   the next best expert (``forbid:3,7`` is the same clause)
- ``bias:3=2,7=-1`` steering (SteerMoE): 2 added to expert 3's router logit and -1 to expert 7's
                   before the family's rule runs, so both the choice and the weights change
- ``force:3``      expert 3 is in every token's set: with top-k it takes the place of the token's
                   weakest choice (weights from the family's rule over the new set); with top-p /
                   threshold it is added to the set

Each clause may end in ``@layer5``, ``@layers3,5``, ``@layers2:4`` (inclusive) or ``@all`` (the
default: every MoE layer), and clauses are joined by ``;``, e.g. ``topp:0.5;ablate:3@layer5``.
At most one of topk / topp / threshold per layer; ablation, bias and force alone keep the model's
top-k. A bias of 0 everywhere reproduces the model's logits exactly (it is ``topk`` at the model's k).

Routing is recomputed from the router logits with the architecture's rule (adapter methods
``choice_scores``, ``route_probs``, ``weights_for``): softmax families take the softmax over all
experts and renormalise the chosen set where the model does (Mixtral always, OLMoE / Qwen per
``norm_topk_prob``); GPT-OSS / Granite take a softmax over the chosen logits; DeepSeek-V3 chooses
by sigmoid + correction bias within the best groups and weights by the normalised, scaled
sigmoid; LongCat-Flash chooses by softmax + bias among real and zero-computation experts. The
probabilities ranked by top-p and threshold are the softmax (DeepSeek-V3: the sigmoid scores
normalised to sum to 1). ``topk:k`` at the model's own k reproduces its logits exactly.

TransformerLens backend (``MoE`` blocks: OLMoE, Mixtral): the MoE forward of each overridden
block is replaced for the duration (same softmax rule, same ``hook_expert_weights`` /
``hook_expert_indices`` hooks; the applied routing is left on ``mlp.routesae_routing`` for capture).

Mechanics (Hugging Face): a forward hook on each router keeps its logits; a forward pre-hook on the block's
``experts`` module, registered first (``prepend=True``), replaces the ``(indices, weights)`` the
experts receive, so capture's own hook on ``experts`` records the overridden routing (families whose
block rewrites the decision before its experts, LongCat-Flash, get a forward hook on the router,
registered first, that replaces the router's output instead). Sets of
different sizes are padded with a repeat of the token's first expert at weight 0 (the grouped /
batched experts kernels accept no sentinel index); capture reads such slots as unused.

    with override_routing(model, "topp:0.5") as ov:
        logits = model(input_ids).logits
    ov.counts[3]   # real experts per token at layer 3 in that forward
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from routesae.models.adapters import _INDEX_KW, _WEIGHT_KW, HFMoEAdapter
from routesae.models.routers import adapter_for

RULES = ("topk", "topp", "threshold")
ACCEPTED = ("topk:K, topp:P, threshold:T, ablate:E1,E2 (or forbid:E1,E2), bias:E1=B1,E2=B2 or force:E1,E2, each "
            "optionally followed by @layerN, @layersA,B, @layersA:B or @all, several joined by ';' (e.g. topk:2, "
            "topp:0.5, ablate:3,7@layer5, bias:3=2.5@layer2)")


class RoutingOverrideError(ValueError):
    """An override string that cannot be read, or one that does not fit the model."""


@dataclass(frozen=True)
class Clause:
    kind: str                               # topk | topp | threshold | ablate | bias | force
    value: float | int | tuple              # ablate / force: experts; bias: ((expert, value), ...)
    layers: tuple[int, ...] | None = None   # None: every MoE layer

    def __str__(self) -> str:
        if self.kind == "bias":
            v = ",".join(f"{e}={b:g}" for e, b in self.value)
        else:
            v = ",".join(map(str, self.value)) if isinstance(self.value, tuple) else f"{self.value:g}"
        at = "" if self.layers is None else "@layers" + ",".join(map(str, self.layers))
        return f"{self.kind}:{v}{at}"


@dataclass(frozen=True)
class LayerPlan:
    """What one MoE layer does: a selection rule (None = the model's top-k), removed experts, router-logit
    biases ``((expert, value), ...)`` and forced experts."""

    rule: str = "topk"
    value: float | None = None
    ablate: tuple[int, ...] = ()
    bias: tuple[tuple[int, float], ...] = ()
    force: tuple[int, ...] = ()


@dataclass(frozen=True)
class RoutingOverride:
    clauses: tuple[Clause, ...] = ()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | RoutingOverride | None) -> RoutingOverride:
        if isinstance(text, RoutingOverride):
            return text
        if text is None or not str(text).strip():
            return cls()
        clauses = tuple(_parse_clause(part.strip()) for part in str(text).split(";") if part.strip())
        out = cls(clauses)
        out.plans(sorted({x for c in clauses for x in c.layers or ()} | {-1}))  # conflicting clauses
        return out

    @classmethod
    def of(cls, kind: str, value, layers=None) -> RoutingOverride:
        if kind in ("ablate", "force"):
            value = tuple(value)
        elif kind == "bias":
            value = tuple((int(e), float(b)) for e, b in dict(value).items())
        return cls((Clause(kind, value, None if layers is None else tuple(layers)),))

    def __add__(self, other: RoutingOverride) -> RoutingOverride:
        return RoutingOverride(self.clauses + other.clauses)

    def __str__(self) -> str:
        return ";".join(map(str, self.clauses))

    def __bool__(self) -> bool:
        return bool(self.clauses)

    # ---- meaning --------------------------------------------------------------------------
    def plans(self, moe_layers) -> dict[int, LayerPlan]:
        """The plan of every MoE layer some clause touches."""
        moe_layers = list(moe_layers)
        out: dict[int, LayerPlan] = {}
        for c in self.clauses:
            for layer in (moe_layers if c.layers is None else c.layers):
                p = out.get(layer, LayerPlan())
                if c.kind == "ablate":
                    p = replace(p, ablate=tuple(sorted(set(p.ablate) | set(c.value))))
                elif c.kind == "force":
                    p = replace(p, force=tuple(sorted(set(p.force) | set(c.value))))
                elif c.kind == "bias":
                    total = dict(p.bias)
                    for e, b in c.value:
                        total[e] = total.get(e, 0.0) + b
                    p = replace(p, bias=tuple(sorted(total.items())))
                elif p.value is not None:
                    raise RoutingOverrideError(f"routing override '{self}': two selection rules for layer {layer}")
                else:
                    p = replace(p, rule=c.kind, value=c.value)
                out[layer] = p
        return out

    def max_width(self, adapter) -> int:
        """The most expert slots a token can get under this override (store width)."""
        k, total = adapter.top_k(), scored_experts(adapter)
        width = k
        for p in self.plans(adapter.moe_layers()).values():
            width = max(width, total if p.rule in ("topp", "threshold") else int(p.value or k))
        return width

    def check(self, adapter) -> None:
        """Raise RoutingOverrideError if a clause names a non-MoE layer, an unknown expert or k > E."""
        moe, total = adapter.moe_layers(), scored_experts(adapter)
        for c in self.clauses:
            bad = [x for x in (c.layers or ()) if x not in moe]
            if bad:
                raise RoutingOverrideError(f"routing override '{c}': layers {bad} are not MoE layers; "
                                           f"MoE layers: {moe}")
            experts = [e for e, _ in c.value] if c.kind == "bias" else c.value if c.kind in ("ablate", "force") else []
            if any(e < 0 or e >= total for e in experts):
                raise RoutingOverrideError(f"routing override '{c}': expert out of range; experts are 0..{total - 1}")
            if c.kind == "topk" and not 1 <= c.value <= total:
                raise RoutingOverrideError(f"routing override '{c}': k must be 1..{total}")
        for layer, p in self.plans(moe).items():
            both = sorted(set(p.force) & set(p.ablate))
            if both:
                raise RoutingOverrideError(f"routing override '{self}': experts {both} of layer {layer} are both "
                                           f"forced and ablated; drop one of the two clauses")
            k = int(p.value or adapter.top_k()) if p.rule == "topk" else total
            if len(p.force) > k:
                raise RoutingOverrideError(f"routing override '{self}': {len(p.force)} experts forced at layer {layer} "
                                           f"but tokens use {k}; force at most {k} (or raise topk)")


def _parse_clause(text: str) -> Clause:
    m = re.fullmatch(r"(topk|topp|threshold|ablate|forbid|force|bias):([^@]+)(?:@(.+))?", text.replace(" ", "").lower())
    if not m:
        raise RoutingOverrideError(f"cannot read routing override '{text}'; use {ACCEPTED}")
    kind, raw, at = m.groups()
    kind = "ablate" if kind == "forbid" else kind
    try:  # ValueError: a number that does not parse; bias pairs without '=' too
        if kind in ("ablate", "force"):
            value: float | int | tuple = tuple(sorted({int(x) for x in raw.split(",") if x}))
            ok = bool(value)
        elif kind == "bias":
            pairs = [x.split("=") for x in raw.split(",") if x]
            value = tuple((int(e), float(b)) for e, b in pairs)
            ok = bool(value) and all(math.isfinite(b) for _, b in value) and len({e for e, _ in value}) == len(value)
        elif kind == "topk":
            value = int(raw)
            ok = value >= 1
        else:
            value = float(raw)
            ok = 0 < value <= 1
        layers = _parse_layers(at)
    except ValueError:
        ok = False
    if not ok:
        raise RoutingOverrideError(f"cannot read routing override '{text}' (topk needs K >= 1, topp and "
                                   f"threshold a value in (0, 1], bias expert=value pairs with finite values); "
                                   f"use {ACCEPTED}")
    return Clause(kind, value, layers)


def _parse_layers(at: str | None) -> tuple[int, ...] | None:
    if at is None or at == "all":
        return None
    spec = re.sub(r"^layers?", "", at)
    if ":" in spec:
        a, b = spec.split(":", 1)
        return tuple(range(int(a), int(b) + 1))
    return tuple(sorted({int(x) for x in spec.split(",") if x}))


def scored_experts(adapter) -> int:
    """Routed experts plus zero-computation experts (what the router scores)."""
    return adapter.num_experts() + int(getattr(adapter.config, "zero_expert_num", 0) or 0)


# ---------------------------------------------------------------- recomputing a layer's routing


def reroute(adapter, block: nn.Module, logits: torch.Tensor, plan: LayerPlan,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices [n, W], weights [n, W] float32, valid [n, W])`` for ``plan`` from router ``logits``."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    n, total = logits.shape
    removed = torch.zeros(total, dtype=torch.bool, device=logits.device)
    removed[list(plan.ablate)] = True
    if plan.bias:
        shift = torch.zeros(total, dtype=logits.dtype, device=logits.device)
        shift[[e for e, _ in plan.bias]] = torch.tensor([b for _, b in plan.bias], dtype=logits.dtype,
                                                        device=logits.device)
        logits = logits + shift
    logits = logits.masked_fill(removed, float("-inf"))
    forced = torch.zeros_like(removed)
    forced[list(plan.force)] = True
    if plan.rule == "topk":
        k = min(int(plan.value or adapter.top_k()), total - len(plan.ablate))
        scores = adapter.choice_scores(logits, block).masked_fill(removed, float("-inf"))
        if k > int(torch.isfinite(scores).sum(-1).min()):  # DeepSeek-V3: k beyond the allowed groups
            fallback = adapter.route_probs(logits, block) - 1e4
            scores = torch.where(torch.isinf(scores) & ~removed, fallback, scores)
        if plan.force:  # forced experts rank first; the rest keep the family's order
            scores = scores.masked_fill(forced, float("inf"))
        idx = torch.topk(scores, k, dim=-1, sorted=adapter.topk_sorted).indices
        valid = torch.ones_like(idx, dtype=torch.bool)
    else:
        probs = adapter.route_probs(logits, block).masked_fill(removed, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        if plan.rule == "topp":
            keep = sorted_p > 0
            if plan.value < 1:
                keep &= (torch.cumsum(sorted_p, -1) - sorted_p) < plan.value
        else:  # threshold; the best expert always stays
            keep = sorted_p >= plan.value
            keep[:, 0] = True
        if plan.force:  # the chosen set plus the forced experts, forced first, then by probability
            chosen = torch.zeros_like(keep).scatter_(1, order, keep) | forced
            key = torch.where(forced, 2.0, torch.where(chosen, 1.0, 0.0)).expand(n, -1)
            sorted_k, order = torch.sort(key + probs * 0.5, dim=-1, descending=True)
            keep = sorted_k >= 1.0
        width = int(keep.sum(-1).max())
        idx, valid = order[:, :width], keep[:, :width]
    if idx.shape[1] < adapter.min_slots:
        pad = adapter.min_slots - idx.shape[1]
        idx = torch.cat([idx, idx[:, :1].expand(-1, pad)], 1)
        valid = torch.cat([valid, torch.zeros_like(valid[:, :1]).expand(-1, pad)], 1)
    idx = torch.where(valid, idx, idx[:, :1])  # pad with the first expert at weight 0
    w = adapter.weights_for(logits, idx, valid, block).masked_fill(~valid, 0.0)
    return idx, w, valid


def same_routing(adapter, block: nn.Module, logits: torch.Tensor, a: LayerPlan, b: LayerPlan) -> bool:
    """Whether plans ``a`` and ``b`` give every token the same experts with the same weights
    (bit for bit, in any slot order) from router ``logits``, every slot real."""
    (ia, wa, va), (ib, wb, vb) = (reroute(adapter, block, logits, plan) for plan in (a, b))
    if ia.shape != ib.shape or not (bool(va.all()) and bool(vb.all())):
        return False
    oa, ob = ia.sort(-1), ib.sort(-1)
    return torch.equal(oa.values, ob.values) and torch.equal(wa.gather(1, oa.indices), wb.gather(1, ob.indices))


def _replace_inputs(args: tuple, kwargs: dict, idx: torch.Tensor, w: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    for pos, names, value in ((1, _INDEX_KW, idx), (2, _WEIGHT_KW, w)):
        if len(args) > pos:
            old = args[pos]
            args[pos] = value.to(old.device, old.dtype)
        else:
            name = next(n for n in names if n in kwargs)
            kwargs[name] = value.to(kwargs[name].device, kwargs[name].dtype)
    return tuple(args), kwargs


@dataclass
class ActiveOverride:
    """What :func:`override_routing` yields: the override and, per layer, the real experts each
    token used in the last forward (``counts[layer]`` [n] int64, when ``record``)."""

    override: RoutingOverride
    plans: dict[int, LayerPlan]
    counts: dict[int, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def override_routing(model: nn.Module, override: str | RoutingOverride | None,
                     record: bool = False) -> Iterator[ActiveOverride]:
    """Apply ``override`` to every forward of ``model`` (a Hugging Face MoE causal LM) inside the block."""
    ov = RoutingOverride.parse(override)
    if hasattr(model, "cfg") and not hasattr(model, "config"):  # a TransformerLens HookedTransformer
        with _override_tl(model, ov, record) as active:
            yield active
        return
    adapter = adapter_for(model)
    if adapter is None:
        raise RoutingOverrideError("routing overrides need an MoE model; this one has no router")
    ov.check(adapter)
    active = ActiveOverride(ov, ov.plans(adapter.moe_layers()))
    handles = []
    n_real = adapter.num_experts()
    for layer, plan in active.plans.items():
        block = adapter.moe_block(layer)
        state: dict[str, torch.Tensor] = {}

        def on_router(module, args, out, state=state):
            state["logits"] = out[0]

        def on_experts(module, args, kwargs, state=state, plan=plan, block=block, layer=layer):
            with torch.no_grad():
                idx, w, valid = reroute(adapter, block, state.pop("logits"), plan)
            if record:
                active.counts[layer] = (valid & (idx < n_real)).sum(-1)
            return _replace_inputs(args, kwargs, idx, w)

        def on_router_replace(module, args, out, plan=plan, block=block, layer=layer):
            with torch.no_grad():
                idx, w, valid = reroute(adapter, block, out[0], plan)
            if record:
                active.counts[layer] = (valid & (idx < n_real)).sum(-1)
            return (out[0], w.to(out[1].device, out[1].dtype), idx.to(out[2].device, out[2].dtype), *out[3:])

        router = getattr(block, adapter.router_attr)
        if not adapter.experts_get_decision:  # the block rewrites the decision before its experts see it
            handles.append(router.register_forward_hook(on_router_replace, prepend=True))
            continue
        handles.append(router.register_forward_hook(on_router))
        handles.append(getattr(block, adapter.experts_attr).register_forward_pre_hook(
            on_experts, with_kwargs=True, prepend=True))
    try:
        yield active
    finally:
        for h in handles:
            h.remove()


def routing_rule(model: nn.Module):
    """The object holding ``model``'s routing rule (its router adapter, or the TransformerLens rule)."""
    if hasattr(model, "cfg") and not hasattr(model, "config"):  # a TransformerLens HookedTransformer
        return _TLRule(model)
    return adapter_for(model)


# ---------------------------------------------------------------- TransformerLens


class _TLRule:
    """TransformerLens ``MoE`` (OLMoE, Mixtral): softmax over all experts, top-k, ``cfg.norm_topk_prob``."""

    topk_sorted = True
    min_slots = 1

    def __init__(self, model):
        from transformer_lens.components.mlps.moe import MoE

        self.model, self.config = model, model.cfg
        self.layers = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)]

    def moe_layers(self) -> list[int]:
        return self.layers

    def num_experts(self) -> int:
        return int(self.model.cfg.num_experts)

    def top_k(self) -> int:
        return int(self.model.cfg.experts_per_token)

    def normalise_topk(self) -> bool:
        return bool(self.model.cfg.norm_topk_prob)

    choice_scores = HFMoEAdapter.choice_scores
    route_probs = HFMoEAdapter.route_probs
    weights_for = HFMoEAdapter.weights_for


def _tl_moe_forward(mlp, x: torch.Tensor, rule: _TLRule, plan: LayerPlan) -> torch.Tensor:
    """TransformerLens ``MoE.forward`` with the routing of ``plan``; leaves it on ``mlp.routesae_routing``."""
    batch, pos, d_model = x.shape
    x = x.view(-1, d_model)
    gate_logits = mlp.W_gate(x)
    mlp.hook_expert_weights(torch.softmax(gate_logits, dim=1, dtype=torch.float))  # same hook content as TL
    idx, w, valid = reroute(rule, mlp, gate_logits, plan)
    idx = mlp.hook_expert_indices(idx)
    mlp.routesae_routing = (idx, w, valid)
    w = w.to(x.dtype)
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(idx, num_classes=mlp.num_experts).permute(2, 1, 0)
    for e in range(mlp.num_experts):
        slot, tok = torch.where(mask[e])
        if tok.numel():
            out.index_add_(0, tok, (mlp.experts[e](x[tok]) * w[tok, slot, None]).to(x.dtype))
    return out.reshape(batch, pos, d_model)


@contextlib.contextmanager
def _override_tl(model, ov: RoutingOverride, record: bool) -> Iterator[ActiveOverride]:
    rule = _TLRule(model)
    if not rule.layers:
        raise RoutingOverrideError("routing overrides need an MoE model; this one has no router")
    ov.check(rule)
    active = ActiveOverride(ov, ov.plans(rule.layers))
    patched = []
    for layer, plan in active.plans.items():
        mlp = model.blocks[layer].mlp

        def forward(x, mlp=mlp, plan=plan, layer=layer):
            y = _tl_moe_forward(mlp, x, rule, plan)
            if record:
                idx, _, valid = mlp.routesae_routing
                active.counts[layer] = valid.sum(-1)
            return y

        mlp.forward = forward
        patched.append(mlp)
    try:
        yield active
    finally:
        for mlp in patched:
            del mlp.forward
            mlp.__dict__.pop("routesae_routing", None)
