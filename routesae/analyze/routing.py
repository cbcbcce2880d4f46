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

from routesae.analyze.routing_forward import FastForward, Forward
from routesae.analyze.routing_tables import DEFINITIONS, routing_tables
from routesae.atomic import atomic_path, atomic_write_json
from routesae.capture import token_rows, token_strings
from routesae.corpus import ContextBuilder, CorpusPassConfig, iter_documents
from routesae.layers import parse_layers
from routesae.models.cpu_inference import cpu_inference
from routesae.models.intervene import LayerPlan, RoutingOverride, scored_experts
from routesae.models.load import ModelConfig, decoder_layers, first_device, load_model
from routesae.models.routers import adapter_for

log = logging.getLogger(__name__)
DEFAULT_EPS = 0.01
EPS_GRID = (0.001, 0.01, 0.1)
P_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ALL = "all"


class RoutingAnalysisError(ValueError):
    """analyze-routing cannot run as asked; the message says what to change."""


@dataclass
class RoutingAnalysisConfig(CorpusPassConfig):
    """``k_grid``: default 1..k then 2k, 4k, ... and E. ``per_layer`` (the one-layer-at-a-time
    needed-experts view) and ``ablate_layers``: "all" MoE layers, "none", or a layer spec (3,5 / 2:4).
    ``ablate_experts``: the experts removed one at a time (default every routed expert)."""

    k_grid: list[int] | None = None
    p_grid: list[float] = field(default_factory=lambda: list(P_GRID))
    eps: list[float] = field(default_factory=lambda: list(EPS_GRID))
    per_layer: str = ALL
    ablate_layers: str = ALL
    ablate_experts: list[int] | None = None
    packing: str = "pack"
    progress: bool = True


def default_k_grid(k: int, total: int) -> list[int]:
    grid, x = list(range(1, min(k, total) + 1)), 2 * k
    while x < total:
        grid.append(x)
        x *= 2
    return sorted(set(grid + [total]))


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

    docs = iter_documents(cfg.corpus_config())
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
            fw = FastForward(*args, starts=starts) if fast else Forward(*args)
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


def _views(fw: Forward, grid: _Grid, cfg: RoutingAnalysisConfig) -> dict[str, dict]:
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


def _fast_views(fw: FastForward, grid: _Grid, cfg: RoutingAnalysisConfig) -> dict[str, dict]:
    """:func:`_views` from :class:`FastForward`: ``topk:k`` is the model itself (KL 0, its own CE); the
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

