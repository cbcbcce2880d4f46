"""The forwards behind ``analyze-routing``: the model's own pass, then each routing override against it.

:class:`Forward` runs every override as a full forward (the reference path). :class:`FastForward`
computes the same numbers for less: the model's own pass keeps what an override starting at a given
block replays (that block's call arguments, the residual after attention, the MoE input, the outputs
of each token's k+1 best experts), so an override recomputes only its first MoE layer and the blocks
after it, and the vocabulary head runs over analysed tokens only. See routesae.analyze.routing.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from routesae.models import intervene
from routesae.models.adapters import _experts_inputs
from routesae.models.intervene import LayerPlan, RoutingOverride, override_routing, scored_experts
from routesae.models.load import base_model, decoder_layers


class Forward:
    """One batch: the model's own pass, then any override against it (per-token KL and CE)."""

    def __init__(self, model, adapter, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor):
        self.model, self.ids, self.mask = model, ids, mask
        self.keep = keep                                         # [B*T] real tokens analysed
        real = mask.bool()
        self.pred = torch.zeros_like(real)
        self.pred[:, :-1] = real[:, :-1] & real[:, 1:]          # positions with a real next token
        # the model's own pass, with the adapter's hooks recording its real experts per token
        got: dict[int, torch.Tensor] = {}
        handles = [h for layer in adapter.moe_layers()
                   for h in adapter.attach(layer, lambda i, d: got.__setitem__(i, d.n_active), want_logits=False)]
        try:
            self.logp = self._logp()
        finally:
            for h in handles:
                h.remove()
        keep_np = keep.cpu().numpy()
        self.own_counts = {layer: got[layer].cpu().numpy()[keep_np] for layer in adapter.moe_layers()}
        self.ce_own = self._ce(self.logp)

    @torch.inference_mode()
    def _logp(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
        return torch.log_softmax(out.float(), -1)

    def _ce(self, logp: torch.Tensor) -> np.ndarray:
        ce = torch.zeros(self.ids.shape, device=logp.device)
        ce[:, :-1] = -logp[:, :-1].gather(-1, self.ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        ce = ce.masked_fill(~self.pred, float("nan"))
        return ce.flatten()[self.keep].cpu().numpy()

    def run(self, override: RoutingOverride, record: bool = False):
        """``(kl [n], ce [n] (NaN without a next token), counts {layer: [n]} or None)``."""
        with override_routing(self.model, override, record=record) as active:
            logp = self._logp()
        kl = (self.logp.exp() * (self.logp - logp)).sum(-1).clamp_min(0).flatten()[self.keep].cpu().numpy()
        counts = ({layer: c.cpu().numpy()[self.keep.cpu().numpy()] for layer, c in active.counts.items()}
                  if record else None)
        return kl, self._ce(logp), counts


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class FastForward(Forward):
    """:class:`Forward`'s numbers for less compute. The model's own pass also keeps what an override
    starting at a block of ``starts`` replays: the blocks' call arguments, the residual after attention
    and the MoE input (where the block checks out as ``h + attn + moe``), and the outputs of each token's
    k+1 best experts (where their weighted sum checks out as the experts' output). An override at layer
    L then recomputes that MoE (from the cached outputs when they hold every chosen expert) and the
    blocks after it; the head (final norm, LM head, log-softmax) runs over analysed tokens, in row
    chunks. ``ok`` False (head or call arguments not as expected): use the full forwards of ``run``."""

    def __init__(self, model, adapter, ids, mask, keep, starts=()):
        rows = keep.view(ids.shape).any(1)  # sequences holding no analysed token are not run
        ids, mask, keep = ids[rows], mask[rows], keep.view(ids.shape)[rows].flatten()
        self.adapter, self.layers = adapter, decoder_layers(model)
        self.calls, self.entry, self.cache = {}, {}, {}
        cap: dict[str, dict] = {key: {} for key in ("attn", "out", "block", "moe", "xin", "xout", "logits")}
        handles = self._capture(cap, starts if adapter.experts_get_decision else ())
        try:
            super().__init__(model, adapter, ids, mask, keep)
        finally:
            for h in handles:
                h.remove()
        self.ok = self._check_head(cap["out"][len(self.layers) - 1]) and all(self.calls[i][0] for i in self.calls)
        for i in range(len(self.layers) if self.ok else 0):
            self._entry(i, cap, i in starts)
        for layer in starts if self.ok else ():
            self._cache(layer, cap)
        kept = keep.nonzero().squeeze(1)
        self.lp0 = self.logp.reshape(-1, self.logp.shape[-1])[kept]
        self.p0 = self.lp0.exp()
        tgt = torch.zeros_like(ids)
        tgt[:, :-1] = ids[:, 1:]
        self.tgt, self.has_tgt = tgt.flatten()[kept], self.pred.flatten()[kept]

    def _capture(self, cap, cache_layers) -> list:
        def out_to(store, key):
            return lambda module, args, out: store.__setitem__(key, _first(out))

        def args_to(store, key):
            return lambda module, args, kwargs: store.__setitem__(key, (args, kwargs))

        hooks = []  # (module, pre-hook keeping its call arguments or None, hook keeping its output)
        for i, layer in enumerate(self.layers):
            hooks.append((layer, args_to(self.calls, i), out_to(cap["out"], i)))
            if isinstance(getattr(layer, "self_attn", None), nn.Module):
                hooks.append((layer.self_attn, None, out_to(cap["attn"], i)))
        for i in self.adapter.moe_layers():
            hooks.append((self.adapter.moe_block(i), args_to(cap["block"], i), out_to(cap["moe"], i)))
        for i in cache_layers:
            block = self.adapter.moe_block(i)
            hooks += [(getattr(block, self.adapter.experts_attr), args_to(cap["xin"], i), out_to(cap["xout"], i)),
                      (getattr(block, self.adapter.router_attr), None, out_to(cap["logits"], i))]
        handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m, pre, _ in hooks if pre]
        return handles + [m.register_forward_hook(post) for m, _, post in hooks]

    def _check_head(self, last: torch.Tensor) -> bool:
        """Whether final norm + LM head on the last block's output give the model's logits."""
        norm, head = getattr(base_model(self.model), "norm", None), self.model.get_output_embeddings()
        if not isinstance(norm, nn.Module) or head is None:
            return False
        self.norm, self.lm_head = norm, head
        with torch.inference_mode():
            rows = last.reshape(-1, last.shape[-1])[:64]
            lp = torch.log_softmax(head(norm(rows)).float(), -1)
        return torch.allclose(lp, self.logp.reshape(-1, lp.shape[-1])[:len(rows)], rtol=1e-4, atol=1e-4)

    def _entry(self, i: int, cap, start: bool) -> None:
        """How an override starting at block i restarts: after attention (MoE only) or the whole block."""
        args, kwargs = self.calls[i]
        self.calls[i] = (args[1:], kwargs)
        if not start:
            return
        if i in cap["attn"] and i in cap["moe"]:
            mid = args[0] + cap["attn"][i]
            if mid.shape == cap["moe"][i].shape and torch.equal(mid + cap["moe"][i], cap["out"][i]):
                self.entry[i] = ("mid", mid, cap["block"][i])
                return
        self.entry[i] = ("block", args[0])

    def _cache(self, layer: int, cap) -> None:
        """The outputs of every token's k+1 best experts at ``layer`` (ascending expert ids)."""
        if layer not in cap["xin"] or self.entry[layer][0] != "mid" or not cap["xin"][layer][0]:
            return
        args, kwargs = cap["xin"][layer]
        x, (idx, w) = args[0], _experts_inputs(args, kwargs)
        block = self.adapter.moe_block(layer)
        experts = getattr(block, self.adapter.experts_attr)
        width = min(self.adapter.top_k() + 1, scored_experts(self.adapter))
        with torch.inference_mode():
            ids = intervene.reroute(self.adapter, block, cap["logits"][layer], LayerPlan("topk", width))[0]
            ids = ids.sort(-1).values.to(idx.device, idx.dtype)
            ones = torch.ones(len(ids), 1, dtype=w.dtype, device=w.device)
            ys = torch.stack([type(experts).forward(experts, x, ids[:, j:j + 1], ones) for j in range(width)], 1)
            got = _combine(ids, ys, idx, w)
        ref = cap["xout"][layer]
        if got is not None and torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())):
            self.cache[layer] = (ids, ys)

    @torch.inference_mode()
    def final(self, start: int, override: RoutingOverride, record: bool = False, same_as: LayerPlan | None = None):
        """``(the last block's output, counts or None, same)`` under ``override`` (which touches no layer
        before ``start``); ``same``: whether ``same_as`` at every MoE layer would have routed every token
        alike (same experts, same weights), so that its forward would be this one."""
        entry, logits, moe = self.entry[start], {}, self.adapter.moe_layers()
        with override_routing(self.model, override, record=record) as active, contextlib.ExitStack() as hooks:
            for i in moe if same_as else ():
                router = getattr(self.adapter.moe_block(i), self.adapter.router_attr)
                hooks.callback(router.register_forward_hook(lambda m, a, o, i=i: logits.__setitem__(i, o[0])).remove)
            if entry[0] == "mid":
                h = entry[1] + _first(self._moe(start, *entry[2]))
                start += 1
            else:
                h = entry[1]
            for i in range(start, len(self.layers)):
                args, kwargs = self.calls[i]
                h = _first(self.layers[i](h, *args, **kwargs))
        counts = ({layer: c.cpu().numpy()[self.keep.cpu().numpy()] for layer, c in active.counts.items()}
                  if record else None)
        same = same_as is not None and len(logits) == len(moe) and all(
            intervene.same_routing(self.adapter, self.adapter.moe_block(i), x, active.plans[i], same_as)
            for i, x in logits.items())
        return h, counts, same

    def _moe(self, layer: int, args, kwargs):
        block = self.adapter.moe_block(layer)
        if layer not in self.cache:
            return block(*args, **kwargs)
        experts, (ids, ys) = getattr(block, self.adapter.experts_attr), self.cache[layer]
        full = experts.forward

        def cached(hidden, *a, **kw):
            out = _combine(ids, ys, *_experts_inputs((hidden, *a), kw))
            return full(hidden, *a, **kw) if out is None else out

        experts.forward = cached
        try:
            return block(*args, **kwargs)
        finally:
            del experts.forward

    @torch.inference_mode()
    def head(self, h: torch.Tensor, rows: torch.Tensor | None = None, kl: bool = True):
        """``(kl [n], ce [n])`` of the analysed tokens (NaN outside ``rows`` and, for CE, without a next token)."""
        x = h.reshape(-1, h.shape[-1])[self.keep]
        n = len(x)
        want = torch.ones(n, dtype=torch.bool, device=x.device) if rows is None else rows.to(x.device)
        kls = torch.full((n,), float("nan"), device=x.device)
        ces = torch.full((n,), float("nan"), device=x.device)
        step = max(1, (2 ** 22 if x.device.type == "cpu" else 2 ** 25) // self.lp0.shape[-1])
        buf = torch.empty(min(step, n), self.lp0.shape[-1], device=x.device) if kl else None
        for c in _chunks(want, step):
            lq = torch.log_softmax(self.lm_head(self.norm(x[c])).float(), -1)
            if kl:  # sum p0 (lp0 - lq) in one reused buffer: fresh [rows, V] temporaries cost page faults
                d = torch.sub(self.lp0[c], lq, out=buf[:len(lq)])
                kls[c] = d.mul_(self.p0[c]).sum(-1).clamp_min(0)
            ces[c] = -lq.gather(-1, self.tgt[c, None]).squeeze(-1)
        ces[~self.has_tgt] = float("nan")
        return kls.cpu().numpy(), ces.cpu().numpy()


def _chunks(mask: torch.Tensor, step: int):
    """Row selectors of the True rows of ``mask``, ``step`` at a time (slices when every row is True)."""
    if bool(mask.all()):
        yield from (slice(i, i + step) for i in range(0, len(mask), step))
    else:
        yield from mask.nonzero().squeeze(1).split(step)


def _combine(ids, ys, idx, w):
    """Experts' output from cached per-expert outputs ``ys`` [n, K, d] of experts ``ids`` [n, K]
    (ascending, as the experts loop adds them) for routing ``(idx, w)``; None if one is not cached."""
    match = idx.unsqueeze(-1) == ids.unsqueeze(1)
    if not bool((match.any(-1) | (w == 0)).all()):
        return None
    coef = (w.unsqueeze(-1).to(ys.dtype) * match).sum(1)
    out = torch.zeros_like(ys[:, 0])
    for j in range(ids.shape[1]):
        out = out + coef[:, j:j + 1] * ys[:, j]
    return out
