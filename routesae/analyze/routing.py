"""``routesae analyze-routing``: how many experts does each token need? (dynamic routing)

Runs the model over corpus contexts under routing interventions (routesae.models.intervene) and
compares each forward's next-token distribution with the model's own routing. Definitions
(k = the model's top-k, E = routed experts; KL in nats, natural log):

- ``KL_t(o)`` = KL(own || overridden) of the next-token distribution at real token t under
  override o; ``CE`` = next-token cross-entropy at real positions with a real successor.
- needed experts of token t at epsilon (all layers): the smallest k' of the grid with
  ``KL_t(topk:k' at every MoE layer) <= eps``; k when none below k qualifies (k' = k is the
  model's own routing, KL 0). By layer: the same with the override at that one layer only.
  Default epsilons 0.001, 0.01, 0.1; headline 0.01 nats (``DEFAULT_EPS``).
- compute saved at eps = 1 - mean needed k' / k (expert FFN compute, routed experts only).
- loss by k': CE and KL under ``topk:k'`` at every MoE layer, by domain; ``ce_increase`` = CE - CE_own.
- top-p view: for each p of the grid, ``topp:p`` at every MoE layer: real experts per token and
  layer (the distribution by domain), their mean, CE, KL. Rows with ``override == "model"`` hold the
  model's own experts per token (varies for natively dynamic models such as LongCat-Flash).
- expert ablation: ``ablate:e@layerL`` for every expert e of the chosen layers: CE increase by domain.

Tables (Parquet) and ``summary.json`` go to ``OUT``; see :func:`analyze_routing`. Example::

    from routesae.analyze.routing import RoutingAnalysisConfig, analyze_routing
    out = analyze_routing(RoutingAnalysisConfig(model="data/demo-moe", corpus="data/corpus", out="runs/routing",
                                                split="val", max_tokens=4096))
    pd.read_parquet(out / "compute_saved.parquet")
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from routesae.analyze.routing_tables import DEFINITIONS, routing_tables
from routesae.atomic import atomic_path, atomic_write_json
from routesae.capture import token_rows, token_strings
from routesae.corpus import ContextBuilder, CorpusConfig, iter_documents
from routesae.layers import parse_layers
from routesae.models import intervene
from routesae.models.adapters import _experts_inputs
from routesae.models.cpu_inference import cpu_inference
from routesae.models.intervene import LayerPlan, RoutingOverride, override_routing, scored_experts
from routesae.models.load import ModelConfig, base_model, decoder_layers, first_device, load_model
from routesae.models.routers import adapter_for

log = logging.getLogger(__name__)
DEFAULT_EPS = 0.01
EPS_GRID = (0.001, 0.01, 0.1)
P_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ALL = "all"


class RoutingAnalysisError(ValueError):
    """analyze-routing cannot run as asked; the message says what to change."""


@dataclass
class RoutingAnalysisConfig:
    """``k_grid``: default 1..k then 2k, 4k, ... and E. ``per_layer`` (the one-layer-at-a-time
    needed-experts view) and ``ablate_layers``: "all" MoE layers, "none", or a layer spec (3,5 / 2:4).
    ``ablate_experts``: the experts removed one at a time (default every routed expert)."""

    model: str
    corpus: str
    out: str
    max_tokens: int = 16384
    ctx: int = 256
    batch_size: int = 8
    k_grid: list[int] | None = None
    p_grid: list[float] = field(default_factory=lambda: list(P_GRID))
    eps: list[float] = field(default_factory=lambda: list(EPS_GRID))
    per_layer: str = ALL
    ablate_layers: str = ALL
    ablate_experts: list[int] | None = None
    split: str = "train"
    text_field: str = "text"
    domain_field: str = "domain"
    packing: str = "pack"
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True


def default_k_grid(k: int, total: int) -> list[int]:
    grid, x = list(range(1, min(k, total) + 1)), 2 * k
    while x < total:
        grid.append(x)
        x *= 2
    return sorted(set(grid + [total]))


class _Forward:
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


class _FastForward(_Forward):
    """:class:`_Forward`'s numbers for less compute. The model's own pass also keeps what an override
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
        for c in _chunks(want, step):
            lq = torch.log_softmax(self.lm_head(self.norm(x[c])).float(), -1)
            if kl:
                kls[c] = (self.p0[c] * (self.lp0[c] - lq)).sum(-1).clamp_min(0)
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


def _layer_subset(spec: str, moe: list[int], n_blocks: int, option: str) -> list[int]:
    if spec.strip().lower() == "none":
        return []
    if spec.strip().lower() == ALL:
        return moe
    layers = parse_layers(spec, n_blocks)
    bad = [x for x in layers if x not in moe]
    if bad:
        raise RoutingAnalysisError(f"{option} {spec}: layers {bad} are not MoE layers; MoE layers: {moe}")
    return layers


@dataclass
class _Grid:
    """What one analysis runs: the model's k and MoE layers, the k' grid and the layer / expert subsets."""

    k: int
    moe: list[int]
    k_grid: list[int]
    view_layers: list[int]
    abl_layers: list[int]
    experts: list[int]

    @property
    def small(self) -> list[int]:
        return [kk for kk in self.k_grid if kk < self.k]


def _grid(cfg: RoutingAnalysisConfig, model, adapter) -> _Grid:
    """Check the config against the model (one-line errors) and resolve its defaults."""
    if cfg.max_tokens < 1 or cfg.batch_size < 1:
        raise RoutingAnalysisError("--max-tokens and --batch-size must be positive")
    k, n_exp, total, moe = adapter.top_k(), adapter.num_experts(), scored_experts(adapter), adapter.moe_layers()
    k_grid = sorted(set(cfg.k_grid or default_k_grid(k, total)))
    if k_grid[0] < 1 or k_grid[-1] > total:
        raise RoutingAnalysisError(f"--k-grid values must be 1..{total}")
    if any(not 0 < p <= 1 for p in cfg.p_grid) or any(e < 0 for e in cfg.eps) or not cfg.eps:
        raise RoutingAnalysisError("--p-grid values must be in (0, 1] and --eps values >= 0")
    n_blocks = len(decoder_layers(model))
    experts = sorted(set(range(n_exp) if cfg.ablate_experts is None else cfg.ablate_experts))
    if experts and (experts[0] < 0 or experts[-1] >= n_exp):
        raise RoutingAnalysisError(f"--ablate-experts must be 0..{n_exp - 1}")
    return _Grid(k, moe, k_grid, _layer_subset(cfg.per_layer, moe, n_blocks, "--per-layer"),
                 _layer_subset(cfg.ablate_layers, moe, n_blocks, "--ablate-layers"), experts)


def analyze_routing(cfg: RoutingAnalysisConfig, model=None, tokenizer=None, fast: bool = True) -> Path:
    """Write the dynamic-routing tables and ``summary.json`` into ``cfg.out``; returns that folder.

    ``model`` / ``tokenizer``: an already loaded Hugging Face MoE causal LM (else ``cfg.model`` is loaded).
    ``fast=False`` runs every override as a full forward with the stock kernels (the reference the fast
    path is tested against); the fast path runs on CPU with :func:`~routesae.models.cpu_inference.cpu_inference`."""
    t0 = time.time()
    if model is None:
        model, tokenizer = load_model(ModelConfig(cfg.model, cfg.dtype, cfg.device, None, cfg.trust_remote_code))
    if tokenizer is None:
        raise RoutingAnalysisError(f"no tokenizer found with model '{cfg.model}'")
    adapter = adapter_for(model)
    if adapter is None:
        raise RoutingAnalysisError(f"analyze-routing needs an MoE model; '{cfg.model}' has no router")
    grid = _grid(cfg, model, adapter)
    # on CPU the eager experts loop is far faster than grouped_mm for small batches (same routing)
    previous = getattr(model.config, "_experts_implementation", None)
    if first_device(model).type == "cpu" and previous not in (None, "eager") and hasattr(
            model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    try:  # the fast path also takes the faster CPU kernels (routesae.models.cpu_inference)
        with cpu_inference(model) if fast else contextlib.nullcontext():
            acc, done = _collect(cfg, model, tokenizer, adapter, grid, fast)
    finally:
        if previous not in (None, "eager") and model.config._experts_implementation != previous:
            model.set_experts_implementation(previous)
    tables, headline = routing_tables(acc, k=grid.k, k_grid=grid.k_grid, eps=cfg.eps, moe=grid.moe,
                                      view_layers=grid.view_layers,
                                      default_eps=DEFAULT_EPS if DEFAULT_EPS in cfg.eps else cfg.eps[0])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        with atomic_path(out / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
    seconds = time.time() - t0
    summary = {
        "model": cfg.model, "model_type": model.config.model_type, "corpus": cfg.corpus, "split": cfg.split,
        "tokens": done, "top_k": grid.k, "n_experts": adapter.num_experts(), "scored_experts": scored_experts(adapter),
        "moe_layers": grid.moe, "k_grid": grid.k_grid, "p_grid": list(cfg.p_grid), "eps": list(cfg.eps), **headline,
        "ablate_layers": grid.abl_layers, "ablate_experts": grid.experts, "per_layer_layers": grid.view_layers,
        "seconds": round(seconds, 1), "tokens_per_second": round(done / max(seconds, 1e-9), 1),
        "config": asdict(cfg), "definitions": DEFINITIONS, "tables": sorted(f"{name}.parquet" for name in tables),
    }
    atomic_write_json(out / "summary.json", summary)
    log.info("analyze-routing: %d tokens in %.0fs, tables in %s", done, seconds, out)
    return out


def _collect(cfg: RoutingAnalysisConfig, model, tokenizer, adapter, grid: _Grid,
             fast: bool = True) -> tuple[dict[str, list], int]:
    """Per-batch arrays of every view (see routing_tables for their layout) and the tokens read."""
    from tqdm.auto import tqdm

    docs = iter_documents(CorpusConfig(cfg.corpus, cfg.text_field, cfg.domain_field, cfg.split, seed=cfg.seed))
    builder = ContextBuilder(tokenizer, cfg.ctx, cfg.packing)
    token_text = token_strings(tokenizer, int(model.config.vocab_size))
    device = first_device(model)
    acc: dict[str, list] = {key: [] for key in ("tokens", "ce_own", "own", "topk_kl", "topk_ce", "layer_kl",
                                                 "topp_kl", "topp_ce", "topp_n", "abl_ce")}
    starts = sorted({grid.moe[0], *grid.view_layers, *grid.abl_layers})
    done = 0
    bar = tqdm(total=cfg.max_tokens, unit="tok", unit_scale=True, desc="analyze-routing", disable=not cfg.progress,
               dynamic_ncols=True)
    try:
        for batch in builder.batches(docs, cfg.batch_size):
            if done >= cfg.max_tokens:
                break
            keep = torch.from_numpy(batch.attention_mask.reshape(-1).astype(bool))
            keep &= torch.cumsum(keep.long(), 0) <= cfg.max_tokens - done
            args = (model, adapter, torch.from_numpy(batch.input_ids).to(device),
                    torch.from_numpy(batch.attention_mask).to(device), keep.to(device))
            fw = _FastForward(*args, starts=starts) if fast else _Forward(*args)
            acc["tokens"].append(token_rows(batch, builder, token_text, keep.numpy()))
            acc["ce_own"].append(fw.ce_own)
            acc["own"].append(fw.own_counts)
            views = _fast_views(fw, grid, cfg) if fast and fw.ok else _views(fw, grid, cfg)
            for key, value in views.items():
                acc[key].append(value)
            n = int(keep.sum())
            done += n
            bar.update(n)
    finally:
        bar.close()
    if done == 0:
        raise RoutingAnalysisError(f"no tokens read from corpus '{cfg.corpus}' (split {cfg.split})")
    return acc, done


def _views(fw: _Forward, grid: _Grid, cfg: RoutingAnalysisConfig) -> dict[str, dict]:
    """One batch's views, one full forward per override (the reference)."""
    out: dict[str, dict] = {}
    runs = {kk: fw.run(RoutingOverride.of("topk", kk)) for kk in grid.k_grid}
    out["topk_kl"], out["topk_ce"] = {kk: r[0] for kk, r in runs.items()}, {kk: r[1] for kk, r in runs.items()}
    out["layer_kl"] = {(layer, kk): fw.run(RoutingOverride.of("topk", kk, [layer]))[0]
                       for layer in grid.view_layers for kk in grid.small}
    runs = {p: fw.run(RoutingOverride.of("topp", p), record=True) for p in cfg.p_grid}
    out["topp_kl"], out["topp_ce"] = {p: r[0] for p, r in runs.items()}, {p: r[1] for p, r in runs.items()}
    out["topp_n"] = {p: r[2] for p, r in runs.items()}
    out["abl_ce"] = {(layer, e): fw.run(RoutingOverride.of("ablate", [e], [layer]))[1]
                     for layer in grid.abl_layers for e in grid.experts}
    return out


def _fast_views(fw: _FastForward, grid: _Grid, cfg: RoutingAnalysisConfig) -> dict[str, dict]:
    """:func:`_views` from :class:`_FastForward`: ``topk:k`` is the model itself (KL 0, its own CE); the
    by-layer view stops per token once its KL fits the smallest eps (larger k' cannot lower its needed
    k'), leaving NaN, and skips a k' once every token is decided; ablation computes CE only."""
    first, n = grid.moe[0], len(fw.ce_own)
    out: dict[str, dict] = {"topk_kl": {}, "topk_ce": {}, "layer_kl": {}, "topp_kl": {}, "topp_ce": {},
                            "topp_n": {}, "abl_ce": {}}
    full, reuse = LayerPlan("topp", 1.0) if 1.0 in cfg.p_grid else None, None
    for kk in grid.k_grid:
        if kk == grid.k:
            out["topk_kl"][kk], out["topk_ce"][kk] = np.zeros(n, np.float32), fw.ce_own.copy()
            continue
        check = full if kk == scored_experts(fw.adapter) else None
        h, counts, same = fw.final(first, RoutingOverride.of("topk", kk), record=bool(check), same_as=check)
        out["topk_kl"][kk], out["topk_ce"][kk] = fw.head(h)
        if same:  # topp:1 routes like topk:E (every expert, the same weights): the same forward
            reuse = (out["topk_kl"][kk], out["topk_ce"][kk], counts)
    for layer in grid.view_layers:
        undecided = np.ones(n, bool)
        for kk in grid.small:
            kl = np.full(n, np.nan, np.float32)
            if undecided.any():
                h = fw.final(layer, RoutingOverride.of("topk", kk, [layer]))[0]
                kl = fw.head(h, rows=torch.from_numpy(undecided))[0]
                undecided &= ~(kl <= min(cfg.eps))
            out["layer_kl"][(layer, kk)] = kl
    for p in cfg.p_grid:
        if p == 1 and reuse is not None:
            out["topp_kl"][p], out["topp_ce"][p], out["topp_n"][p] = reuse
            continue
        h, counts, _ = fw.final(first, RoutingOverride.of("topp", p), record=True)
        (out["topp_kl"][p], out["topp_ce"][p]), out["topp_n"][p] = fw.head(h), counts
    for layer in grid.abl_layers:
        for e in grid.experts:
            out["abl_ce"][(layer, e)] = fw.head(fw.final(layer, RoutingOverride.of("ablate", [e], [layer]))[0],
                                                kl=False)[1]
    return out

