"""Evaluate an SAE run on a store, and optionally by splicing it into the model: ``RUN/eval.json``.

``evaluate(EvalConfig(run="runs/x")) -> dict``. The store: ``--store``, else the held-out store
recorded with the run (``RUN/eval_store.json``), else the training store with a one-line warning;
``eval.json`` says which (``store_source``), whether its tokens trained the SAE (``in_sample``,
``in_sample_why``) and the ``token_range`` read (routesae/heldout.py). Definitions (REFERENCE §4),
over the first ``tokens`` store tokens in shard order:

- ``sae_space``: metrics on the SAE's own examples ``x`` (standardised; RouteSAE: ``p_i* x_i*``;
  MLSAE: every (token, layer) pair) against ``x_hat = decode(encode(x))``:
  ``l0 = mean_n #{z_n > 0}``, ``nmse = mean_n ||x_n - x_hat_n||^2 / ||x_n||^2`` (RouteSAE's),
  ``explained_variance = 1 - sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean_n x||^2`` (sums over
  all examples, the mean from float64 running moments), dead fraction (latents never active),
  dense fractions (active on > 10% / > 1% of the examples).
- ``raw_space``: the same NMSE / EV of ``reconstruct`` (the residual scale a splice writes)
  against the raw residual it replaces (RouteSAE: each token's routed layer).
- ``per_layer``: RouteSAE: the tokens routed to each layer; MLSAE: each layer's examples.
- ``routed_layers`` (RouteSAE): tokens per routed layer (``counts``, ``fractions``), their normalised
  entropy ``entropy`` and the router's mean ``margin`` p_top1 - p_top2 (routesae/sae/route_stats.py).
- ``splice`` (with a model): whole store contexts, CE of the next token at every real position
  with a real successor, clean / spliced / zero-ablated; ``ce_recovered = (CE_zero - CE_spliced)
  / (CE_zero - CE_clean)``; ``kl`` = KL(clean || spliced) of the next-token distribution averaged
  over every real token. RouteSAE: one pass, block j's output replaced at the tokens routed to j
  (routing from the clean pass); TopK: its layer; MLSAE: one pass per layer (``per_layer``, and
  ``mean`` over layers). Zero-ablation writes zeros at the same tokens and layers.
- RouteSAE with soft routing: the SAE reads the mixture ``sum_i p_i x_i``, no layer's activation, so
  its reconstruction has no layer to be spliced into or compared with: ``splice``, ``raw_space`` and
  the per-layer ``raw_space`` hold ``{"skipped": SOFT_ROUTING}`` instead (the model is not loaded).

Before any metric is computed, the model (when there is one to splice into) is checked against
the store by :mod:`routesae.model_match`: hidden size, block count and vocabulary, then the
store's first whole contexts run under the store's own routing override must reproduce the
stored rows of the SAE's layers (relative row difference, median over rows, max over layers, at
most 0.01 for a float32 store and 0.1 for a float16 / bfloat16 one). A model that fails is
refused with one line and nothing is written (an existing ``eval.json`` is left as it was);
what was measured is recorded as ``splice.model_check``. ``splice.clean_vs_store_max_abs_diff``
is the largest absolute difference of the first splice batch's clean pass (under the evaluation's
own ``routing_override``) from the stored rows.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from routesae.atomic import atomic_write_json
from routesae.heldout import choose_store, sample_fields
from routesae.model_match import CHECK_CONTEXTS, capture_hook, check_model, forward_logits
from routesae.models.intervene import override_routing
from routesae.models.load import ModelConfig, first_device, is_local_spec, load_model, resolve_device
from routesae.sae import SparseAutoencoder, load_sae
from routesae.sae.route_stats import count_layers, margin_sum, routing_summary
from routesae.store import Store, StoreError
from routesae.store_contexts import context_batch, store_contexts, stored_rows

log = logging.getLogger(__name__)
DEFAULT_TOKENS = 100_000
LOGIT_BUDGET = 2**26  # at most this many float32 logits per splice batch (256 MiB)
SOFT_ROUTING = ("soft routing: the SAE reads the mixture sum_i p_i x_i of all routed layers, which is no layer's "
                "activation, so there is nothing to splice it into or compare it with in raw space; train with "
                "--routing hard for CE/KL and raw-space metrics")


@dataclass
class EvalConfig:
    """What to evaluate. ``store``: default the run's held-out store (RUN/eval_store.json), else its
    training store (RUN/train_config.json; in-sample, with a warning). ``model``: default the
    store's model when that folder exists locally (else no splicing). ``tokens``: default 100k (or the
    whole store). ``splice_contexts``: cap on the contexts spliced (default: those within ``tokens``).
    ``splice=False`` skips the model even when one is available. ``routing_override``: every splice
    pass (clean, spliced, zero-ablated) runs under it (see routesae.models.intervene)."""

    run: str
    store: str | None = None
    model: str | None = None
    tokens: int | None = None
    batch_tokens: int = 4096
    splice_contexts: int | None = None
    device: str = "auto"
    splice: bool = True
    routing_override: str | None = None  # splice under changed routing, e.g. "topk:2" (every pass)


class _Moments:
    """Streaming sums for L0, NMSE and explained variance (float64, Chan's merge of moments)."""

    def __init__(self) -> None:
        self.n, self.err, self.ratio, self.l0, self.m2 = 0, 0.0, 0.0, 0.0, 0.0
        self.mean: Tensor | None = None

    def add(self, x: Tensor, x_hat: Tensor, l0: Tensor | None = None) -> None:
        if x.shape[0] == 0:
            return
        x, x_hat = x.double(), x_hat.double()
        sq = (x - x_hat).pow(2).sum(-1)
        self.err += float(sq.sum())
        self.ratio += float((sq / x.pow(2).sum(-1).clamp_min(1e-12)).sum())
        if l0 is not None:
            self.l0 += float(l0.sum())
        nb, mb = x.shape[0], x.mean(0)
        m2b = float((x - mb).pow(2).sum())
        if self.mean is None:
            self.mean, self.m2 = mb, m2b
        else:
            delta = mb - self.mean
            tot = self.n + nb
            self.m2 += m2b + float(delta.pow(2).sum()) * self.n * nb / tot
            self.mean = self.mean + delta * (nb / tot)
        self.n += nb

    def result(self, with_l0: bool = True) -> dict[str, float | int | None]:
        if self.n == 0:
            return {"examples": 0}
        out: dict[str, float | int | None] = {"examples": self.n}
        if with_l0:
            out["l0"] = self.l0 / self.n
        out["nmse"] = self.ratio / self.n
        out["explained_variance"] = 1.0 - self.err / self.m2 if self.m2 > 0 else None
        return out


# ---------------------------------------------------------------- store side


def _resolve(cfg, stage: str = "evaluating") -> tuple[Path, Store]:
    """The run and the store to read: ``cfg.store``, else the run's held-out store, else (with a one-line
    warning) its training store (routesae/heldout.py)."""
    run = Path(cfg.run)
    return run, Store(choose_store(run, cfg.store, stage)[0])


def _rows(store: Store, layers: list[int], single: bool, limit: int, batch: int):
    """Raw rows of ``layers`` in shard order, ``[B, L', d]`` (``[B, d]`` if single), ``limit`` in all."""
    done = 0
    for s in store.shards:
        if done >= limit:
            return
        n = min(int(s["tokens"]), limit - done)
        if single:
            resid = store.load_resid(s["index"], layers[0])[:n]
        else:
            resid = torch.stack([store.load_resid(s["index"], j)[:n] for j in layers], 1)
        for i in range(0, n, batch):
            yield resid[i:i + batch].float()
        done += n


@torch.no_grad()
def _reconstruction_metrics(sae: SparseAutoencoder, store: Store, n_tokens: int, batch: int,
                            device: torch.device) -> dict[str, Any]:
    c, arch = sae.cfg, sae.cfg.arch
    n_pos = c.n_layers
    sae_all, raw_all = _Moments(), _Moments()
    sae_per = [_Moments() for _ in range(n_pos)]
    raw_per = [_Moments() for _ in range(n_pos)]
    fired = torch.zeros(c.n_latents, dtype=torch.float64)
    hist = torch.zeros(n_pos, dtype=torch.int64)
    p_star, margin, tokens = 0.0, 0.0, 0
    for resid in _rows(store, c.layers, arch == "topk", n_tokens, batch):
        resid = resid.to(device)
        out = sae(resid)
        active = out.top_val > 0
        l0 = active.sum(-1)
        fired += torch.bincount(out.top_idx[active], minlength=c.n_latents).double().cpu()
        sae_all.add(out.x, out.x_hat, l0)
        h_hat, pos = sae.reconstruct(resid)
        rows = torch.arange(resid.shape[0], device=device)
        if arch == "topk":
            raw_all.add(resid, h_hat)
        elif arch == "routesae":
            target = resid[rows, pos]
            raw_all.add(target, h_hat)
            hist += count_layers(pos, n_pos).cpu()
            p_star += float(out.router_probs[rows, pos].sum())
            margin += float(margin_sum(out.router_probs))
            for i in range(n_pos):
                sel = pos == i
                sae_per[i].add(out.x[sel], out.x_hat[sel], l0[sel])
                raw_per[i].add(target[sel], h_hat[sel])
        else:  # mlsae: examples are (token, layer) pairs, row b * L' + l
            raw_all.add(resid.flatten(0, 1), h_hat.flatten(0, 1))
            lp = out.routed_layer
            for i in range(n_pos):
                sel = lp == i
                sae_per[i].add(out.x[sel], out.x_hat[sel], l0[sel])
                raw_per[i].add(resid[:, i], h_hat[:, i])
        tokens += resid.shape[0]
    if tokens == 0:
        raise StoreError(f"store {store.root} has no tokens to evaluate")
    freq = fired / sae_all.n
    res: dict[str, Any] = {
        "tokens": tokens,
        "sae_space": {**sae_all.result(), "dead_fraction": float((freq == 0).double().mean()),
                      "dense_fraction_gt_10pct": float((freq > 0.1).double().mean()),
                      "dense_fraction_gt_1pct": float((freq > 0.01).double().mean()),
                      "space": _SAE_SPACE[arch]},
        "raw_space": {**raw_all.result(with_l0=False), "space": _RAW_SPACE[arch]},
    }
    if arch != "topk":
        res["per_layer"] = [{"layer": j, "sae_space": sae_per[i].result(),
                             "raw_space": raw_per[i].result(with_l0=False)} for i, j in enumerate(c.layers)]
    if arch == "routesae":
        summary = routing_summary(hist, margin)
        res["routed_layers"] = {"layers": c.layers, "counts": hist.tolist(), "fractions": summary["fractions"],
                                "entropy": summary["entropy"], "margin": summary["margin"]}
        res["mean_p_star"] = p_star / tokens
    return res


_SAE_SPACE = {"topk": "standardised activation x (per token: (h - mean) / (std + 1e-6))",
              "routesae": "routed SAE input p_i* x_i* (standardised routed layer times its router weight)",
              "mlsae": "standardised (token, layer) pairs, every layer of cfg.layers"}
_RAW_SPACE = {"topk": "raw residual h vs reconstruct() (de-standardised)",
              "routesae": "raw residual of each token's routed layer vs reconstruct() (divided by p_i*, "
                          "de-standardised); mean over tokens of mixed layers",
              "mlsae": "raw residual of every (token, layer) pair vs reconstruct() (de-standardised)"}


# ---------------------------------------------------------------- splicing


def _replace_hook(index: Tensor, values: Tensor):
    """Forward hook writing ``values [n, d]`` at flat positions ``index`` of a block's ``[B, T, d]`` output."""
    def hook(module, args, output):
        hs = output[0] if isinstance(output, tuple) else output
        new = hs.reshape(-1, hs.shape[-1]).clone()
        new[index.to(new.device)] = values.to(new.device, new.dtype)
        new = new.view_as(hs)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


class _SpliceAcc:
    def __init__(self) -> None:
        self.ce, self.kl = 0.0, 0.0

    def add(self, logp_clean: Tensor, logits: Tensor, targets: Tensor, real: Tensor, pred: Tensor) -> None:
        """CE at ``pred`` positions ``[B, T-1]``; KL(clean || this) at every ``real`` position ``[B, T]``."""
        logp = torch.log_softmax(logits, -1)
        self.ce += _ce_sum(logp, targets, pred)
        lc, ls = logp_clean[real], logp[real]
        self.kl += float((lc.exp() * (lc - ls)).sum(-1).double().sum())


def _ce_sum(logp: Tensor, targets: Tensor, pred: Tensor) -> float:
    return float(-logp[:, :-1][pred].gather(-1, targets[pred].unsqueeze(-1)).double().sum())


@torch.no_grad()
def _splice_metrics(sae: SparseAutoencoder, model, store: Store, n_tokens: int, cfg: EvalConfig,
                    device: torch.device) -> dict[str, Any]:
    c, arch = sae.cfg, sae.cfg.arch
    contexts, skipped = store_contexts(store, n_tokens, cfg.splice_contexts)
    if not contexts:
        return {"skipped": "no complete context in the store"}
    ctx = max(len(g) for g in contexts)
    vocab = int(model.config.vocab_size)
    per_batch = max(1, min(cfg.batch_tokens, LOGIT_BUDGET // max(vocab, 1)) // ctx)
    variants = [f"layer_{j}" for j in c.layers] if arch == "mlsae" else ["all"]
    spliced = {v: _SpliceAcc() for v in variants}
    zeroed = {v: _SpliceAcc() for v in variants}
    ce_clean, n_pred, n_real, store_diff = 0.0, 0, 0, 0.0
    for b0 in range(0, len(contexts), per_batch):
        group = contexts[b0:b0 + per_batch]
        ids, mask = context_batch(group, first_device(model))
        real = mask.bool()
        pred = real[:, :-1] & real[:, 1:]
        targets = ids[:, 1:]
        acts: dict[int, Tensor] = {}
        logits = forward_logits(model, ids, mask, {j: capture_hook(acts, j) for j in c.layers})
        logp_clean = torch.log_softmax(logits, -1)
        ce_clean += _ce_sum(logp_clean, targets, pred)
        n_pred += int(pred.sum())
        n_real += int(real.sum())
        flat = real.flatten().nonzero().squeeze(-1)
        resid = torch.stack([acts[j].flatten(0, 1)[flat.to(acts[j].device)].to(device) for j in c.layers],
                            1).float()  # [N, L', d] on the SAE's device
        if b0 == 0:  # under the evaluation's routing override (the model check ran under the store's)
            store_diff = float((stored_rows(store, pd.concat(group), c.layers) - resid.cpu()).abs().max())
        if arch == "topk":
            h_hat, _ = sae.reconstruct(resid[:, 0])
            plans = {"all": {c.layers[0]: (flat, h_hat)}}
        elif arch == "routesae":
            h_hat, pos = sae.reconstruct(resid)
            plans = {"all": {j: (flat[(pos == i).to(flat.device)], h_hat[pos == i]) for i, j in enumerate(c.layers)}}
        else:
            h_hat, _ = sae.reconstruct(resid)
            plans = {f"layer_{j}": {j: (flat, h_hat[:, i])} for i, j in enumerate(c.layers)}
        for v, plan in plans.items():
            hooks = {j: _replace_hook(ix, val) for j, (ix, val) in plan.items() if ix.numel()}
            spliced[v].add(logp_clean, forward_logits(model, ids, mask, hooks), targets, real, pred)
            hooks = {j: _replace_hook(ix, torch.zeros_like(val)) for j, (ix, val) in plan.items() if ix.numel()}
            zeroed[v].add(logp_clean, forward_logits(model, ids, mask, hooks), targets, real, pred)
    if n_pred == 0:
        return {"skipped": "the contexts have no position with a next token"}
    ce_c = ce_clean / n_pred
    results = {}
    for v in variants:
        ce_s, ce_z = spliced[v].ce / n_pred, zeroed[v].ce / n_pred
        den = ce_z - ce_c
        results[v] = {"ce_spliced": ce_s, "ce_zero_ablated": ce_z, "ce_increase": ce_s - ce_c,
                      "ce_recovered": (ce_z - ce_s) / den if abs(den) > 1e-12 else None,
                      "kl": spliced[v].kl / n_real, "kl_zero_ablated": zeroed[v].kl / n_real}
    out: dict[str, Any] = {"ce_clean": ce_c, "tokens_ce": n_pred, "tokens_real": n_real,
                           "contexts": len(contexts), "contexts_skipped_incomplete": skipped,
                           "clean_vs_store_max_abs_diff": store_diff}
    if arch == "mlsae":
        out["per_layer"] = results
        out["mean"] = {k: float(np.mean([r[k] for r in results.values()])) for k in
                       ("ce_spliced", "ce_zero_ablated", "ce_increase", "kl", "kl_zero_ablated")}
        m = out["mean"]
        den = m["ce_zero_ablated"] - ce_c
        m["ce_recovered"] = (m["ce_zero_ablated"] - m["ce_spliced"]) / den if abs(den) > 1e-12 else None
        m["what"] = "mean over layers of one-layer splices (each layer spliced separately)"
    else:
        out.update(results["all"])
    return out


# ---------------------------------------------------------------- entry point


def store_model(store: Store) -> str | None:
    """The store's model spec when it opens on this machine (a folder, a GGUF file, a package shortcut)."""
    name = (store.manifest.get("model") or {}).get("name_or_path")
    return name if is_local_spec(name) else None


def load_run(cfg, stage: str = "evaluating") -> tuple[Path, Store, Any]:
    """The run folder, its store and its SAE (eval mode, on ``cfg.device``), checked against each other.

    ``cfg`` needs ``run``, ``store`` (None = the run's held-out store, else its training store, with a
    warning naming ``stage``) and ``device``.
    """
    SparseAutoencoder.read_config(cfg.run)  # not a run folder: one line, before the store is looked for
    run, store = _resolve(cfg, stage)
    sae = load_sae(run, device=resolve_device(cfg.device)).eval()
    c = sae.cfg
    if store.d_model != c.d_in:
        raise StoreError(f"store {store.root} has d_model={store.d_model} but the SAE in {run} has d_in={c.d_in} "
                         f"(a store of another model?); pass the store it was trained on with --store")
    missing = [j for j in c.layers if j not in store.layers]
    if missing:
        raise StoreError(f"the SAE reads layers {c.layers} but store {store.root} lacks {missing}; pass the "
                         f"store it was trained on with --store")
    return run, store, sae


@contextlib.contextmanager
def _quiet_loading():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def checked_model(cfg, store: Store, layers: list[int], model=None, dtype: str | None = None,
                  contexts: int = CHECK_CONTEXTS):
    """``(model, tokenizer, name, check)``: ``model`` (else ``cfg.model`` or the store's local model, loaded in
    ``dtype``, default the store's) checked against the store on its first ``contexts`` contexts
    (:func:`routesae.model_match.check_model`); all None when there is no model."""
    name, tokenizer = cfg.model or store_model(store), None
    if model is None and name is None:
        return None, None, None, None
    if model is None:
        with _quiet_loading():  # no progress bar: a refusal that follows stays one line
            model, tokenizer = load_model(ModelConfig(name, dtype or store.manifest.get("dtype", "float32"),
                                                      str(resolve_device(cfg.device))))
    model.eval()
    name = name or type(model).__name__
    return model, tokenizer, name, check_model(model, name, store, layers, contexts)


def evaluate(cfg: EvalConfig, model=None) -> dict[str, Any]:
    """Evaluate ``cfg.run``; write ``RUN/eval.json`` atomically and return its content.

    ``model``: an already loaded Hugging Face causal LM to splice into (else ``cfg.model`` or the
    store's model folder is loaded; without either the splice section says why it was skipped).
    The model is checked against the store (:mod:`routesae.model_match`) before any metric is
    computed; a model that is not the store's is refused and nothing is written.
    """
    run, store, sae = load_run(cfg)
    device = resolve_device(cfg.device)
    c = sae.cfg
    n_tokens = min(cfg.tokens or DEFAULT_TOKENS, store.n_tokens)
    if n_tokens < 1 or cfg.batch_tokens < 1:
        raise StoreError(f"--tokens {cfg.tokens} and --batch-tokens {cfg.batch_tokens} must be positive")
    name = check = None
    soft = c.arch == "routesae" and c.routing == "soft"
    if cfg.splice and not soft:
        model, _, name, check = checked_model(cfg, store, c.layers, model)
    result: dict[str, Any] = {
        "run": str(run), "store": str(store.root), **sample_fields(run, store, cfg.store, n_tokens),
        "arch": c.arch, "layers": c.layers, "k": c.k,
        "n_latents": c.n_latents, "routing": c.routing if c.arch == "routesae" else None,
        "config": asdict(cfg),
        **_reconstruction_metrics(sae, store, n_tokens, cfg.batch_tokens, device),
    }
    if soft:  # no layer's reconstruction: no splice and no raw space (SAE space above still stands)
        result["raw_space"] = {"skipped": SOFT_ROUTING}
        for r in result["per_layer"]:
            r["raw_space"] = {"skipped": SOFT_ROUTING}
        result["splice"] = {"skipped": SOFT_ROUTING}
    elif not cfg.splice:
        result["splice"] = {"skipped": "splice=False"}
    elif model is None:
        result["splice"] = {"skipped": f"no model: the store's model "
                                       f"{(store.manifest.get('model') or {}).get('name_or_path')!r} is not a local "
                                       f"folder, GGUF file or package shortcut; pass --model"}
    else:
        with override_routing(model, cfg.routing_override) if cfg.routing_override else contextlib.nullcontext():
            result["splice"] = {"model": name, "routing_override": cfg.routing_override, "model_check": check,
                                **_splice_metrics(sae, model, store, n_tokens, cfg, device)}
    result["definitions"] = DEFINITIONS
    atomic_write_json(run / "eval.json", result)
    return result


DEFINITIONS = {
    "l0": "mean number of non-zero latents per SAE example",
    "nmse": "mean over examples of ||x - x_hat||^2 / ||x||^2 (RouteSAE's normalised MSE)",
    "explained_variance": "1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2, sums over all examples",
    "dead_fraction": "latents never active over the evaluated examples",
    "dense_fraction_gt_10pct / gt_1pct": "latents active on more than 10% / 1% of the examples",
    "ce_*": "mean next-token cross-entropy over real positions with a real next token (tokens_ce)",
    "ce_recovered": "(CE_zero_ablated - CE_spliced) / (CE_zero_ablated - CE_clean)",
    "kl": "KL(clean || spliced) of the next-token distribution, mean over real tokens (tokens_real)",
    "routed_layers.entropy": "-sum_i f_i log f_i / log L' over the routed-layer fractions f_i (1 = every "
                             "layer used equally, 0 = one layer)",
    "routed_layers.margin": "mean over the evaluated tokens of p_top1 - p_top2, the router's two largest "
                            "weights (0 = a coin toss between two layers)",
    "splice": "routesae: one pass, block j's output replaced at the tokens routed to j (routing from the "
              "clean pass, reconstruction divided by p_i* and de-standardised; soft routing: not spliced); "
              "topk: its layer; mlsae: "
              "one pass per layer (per_layer) and their mean; zero-ablation: zeros at the same places",
}
