"""``routesae analyze RUN``: compute every table of docs/analysis.md once into ``RUN/analysis/``.

Example::

    from routesae.analyze.run import AnalyzeConfig, analyze
    out = analyze(AnalyzeConfig(run="runs/x", tokens=50_000))       # -> Path("runs/x/analysis")
    pd.read_parquet(out / "latents.parquet").query("interpretable").head()

The folder is built as ``RUN/analysis.tmp/`` (every file written atomically) and then swapped in
with two renames, so a reader never sees a half-written folder; the previous one is kept until
the swap. Expert tables come from :func:`routesae.analyze.experts.expert_tables` (MoE stores only).

The logit lens's model (loaded in float32) is first checked against the store by
:mod:`routesae.model_match` (hidden size, blocks, vocabulary; then one whole store context must
reproduce the stored rows of the SAE's layers): a model that is not the store's is refused with
one line before anything is written; the measurement is kept in ``summary.json`` (``model_check``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from routesae.analyze.features import FEATURE_COUNT, feature_tables
from routesae.analyze.specialists import MIN_LOAD_RATIO
from routesae.atomic import atomic_path, atomic_write_json
from routesae.evaluate import checked_model, load_run, store_model
from routesae.heldout import sample_fields
from routesae.models.load import resolve_device
from routesae.store import StoreError

log = logging.getLogger(__name__)
DEFAULT_TOKENS = 200_000
MIN_VOCAB_COUNT = 20
DENSE = 0.1  # a latent active on more than 10% of the tokens counts as dense


@dataclass
class AnalyzeConfig:
    """What to analyse. ``store``: default the run's held-out store (RUN/eval_store.json), else its
    training store (in-sample, with a warning). ``model``: default the
    store's model when that folder exists locally (for the logit lens; ``with_model=False`` skips it).
    ``tokens``: default 200k or the whole store. ``window``: tokens either side of a context's centre.
    ``min_load_ratio``: an expert may own a domain (``domain_layer.owner``) and be ranked as a specialist
    when its load is at least this multiple of the uniform 1/E (:mod:`routesae.analyze.specialists`).
    ``contrast``: ``"A:B"``, two domains of the store: ``contrast.parquet`` ranks every (layer, expert) by
    rate_A - rate_B (:mod:`routesae.causal.contrast`) and ``settings.json`` keeps a steering setting."""

    run: str
    store: str | None = None
    model: str | None = None
    tokens: int | None = None
    batch_tokens: int = 4096
    top_contexts: int = 20
    window: int = 16
    quantile_bins: int = 5
    quantile_samples: int = 5
    hist_bins: int = 20
    fire_fraction: float = 0.5
    device: str = "auto"
    with_model: bool = True
    seed: int = 0
    min_load_ratio: float = MIN_LOAD_RATIO
    contrast: str | None = None  # "A:B": two domains; experts ranked by their activation-rate difference


def _write_parquet(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _check_contrast(spec: str | None, store, n_tokens: int) -> tuple[str, str] | None:
    """The two domains of ``--contrast A:B``, checked against the store before any work (one-line errors)."""
    if not spec:
        return None
    from routesae.analyze.features import store_domains
    from routesae.causal.contrast import parse_pair

    pair = parse_pair(spec)
    if not store.moe_layers or not store.manifest.get("n_experts"):
        raise StoreError(f"--contrast {spec}: store {store.root} has no MoE layers (a dense model), so no experts "
                         f"to contrast")
    have = sorted(set(store_domains(store, n_tokens)))
    missing = [d for d in pair if d not in have]
    if missing:
        raise StoreError(f"--contrast {spec}: domain(s) {missing} not in the analysed tokens; domains: "
                         f"{', '.join(have)}")
    return pair


def analyze(cfg: AnalyzeConfig, model=None, tokenizer=None) -> Path:
    """Analyse ``cfg.run`` and write ``RUN/analysis/``; returns that folder.

    ``model`` / ``tokenizer``: an already loaded Hugging Face causal LM for the logit lens (else
    ``cfg.model`` or the store's model folder is loaded when ``cfg.with_model``)."""
    run, store, sae = load_run(cfg, "analysing")
    device = resolve_device(cfg.device)
    c = sae.cfg
    n_tokens = min(cfg.tokens or DEFAULT_TOKENS, store.n_tokens)
    if n_tokens < 1 or cfg.batch_tokens < 1 or cfg.top_contexts < 1 or cfg.quantile_bins < 1 or cfg.hist_bins < 1:
        raise StoreError("--tokens, --batch-tokens, --top-contexts, --quantile-bins and --hist-bins must be positive")
    if not cfg.min_load_ratio >= 0:
        raise StoreError(f"--min-load-ratio {cfg.min_load_ratio}: give a number >= 0 (e.g. 0.5 = half the uniform "
                         f"load 1/E)")
    pair = _check_contrast(cfg.contrast, store, n_tokens)
    check = None
    if cfg.with_model:  # the logit lens's model, checked against the store on its first context
        model, tok, _, check = checked_model(cfg, store, c.layers, model, dtype="float32", contexts=1)
        tokenizer = tokenizer or tok
    else:
        model = None
    model_path = (cfg.model or store_model(store)) if model is not None else None
    tables = feature_tables(sae, store, model=model, tokenizer=tokenizer, max_tokens=n_tokens,
                            batch_tokens=cfg.batch_tokens, top_contexts=cfg.top_contexts, window=cfg.window,
                            quantile_bins=cfg.quantile_bins, quantile_samples=cfg.quantile_samples,
                            hist_bins=cfg.hist_bins, fire_fraction=cfg.fire_fraction, device=device, seed=cfg.seed)
    if store.moe_layers and store.manifest.get("n_experts"):
        from routesae.analyze.experts import expert_tables

        tables.update(expert_tables(store, max_tokens=n_tokens, min_vocab_count=MIN_VOCAB_COUNT,
                                    min_load_ratio=cfg.min_load_ratio))
    contrast_info = None
    if pair is not None:
        from routesae.causal.contrast import contrast_from_expert_domain, steering_setting

        tables["contrast"] = contrast_from_expert_domain(tables["expert_domain"], *pair)
        contrast_info = {"a": pair[0], "b": pair[1], "steering": steering_setting(tables["contrast"]),
                         "steering_toward_b": steering_setting(tables["contrast"], toward="b")}
    fc_row = tables.pop("feature_count").iloc[0].to_dict()
    fc_settings = {**FEATURE_COUNT, "threshold_value": float(cfg.fire_fraction)}
    lat = tables["latents"]
    manifest = store.manifest
    eval_path = run / "eval.json"
    summary: dict[str, Any] = {
        "run": str(run), "store": str(store.root), **sample_fields(run, store, cfg.store, n_tokens),
        "model": model_path, "model_check": check,
        "arch": c.arch, "layers": c.layers, "moe_layers": store.moe_layers, "n_experts": manifest.get("n_experts"),
        "top_k": manifest.get("top_k"), "tokens": int(fc_row["tokens"]), "n_latents": c.n_latents,
        "dead_latents": int((lat["count"] == 0).sum()), "dense_latents": int((lat["density"] > DENSE).sum()),
        "interpretable": int(fc_row["count"]), "domains": {k: int(v) for k, v in fc_row["domains"].items()},
        "eval": json.loads(eval_path.read_text()) if eval_path.is_file() else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    settings = {"tokens": int(fc_row["tokens"]), "context_window": cfg.window, "top_contexts": cfg.top_contexts,
                "quantile_bins": cfg.quantile_bins, "quantile_samples": cfg.quantile_samples,
                "hist_bins": cfg.hist_bins, "min_vocab_count": MIN_VOCAB_COUNT, "feature_count": fc_settings,
                "dense_threshold": DENSE, "min_load_ratio": cfg.min_load_ratio, "contrast": contrast_info,
                "config": asdict(cfg)}
    final, tmp = run / "analysis", run / "analysis.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, df in tables.items():
        _write_parquet(tmp / f"{name}.parquet", df)
    atomic_write_json(tmp / "feature_count.json", {"count": int(fc_row["count"]), "settings": fc_settings,
                                                   "tokens": int(fc_row["tokens"])})
    atomic_write_json(tmp / "settings.json", settings)
    atomic_write_json(tmp / "summary.json", summary)
    _swap_in(tmp, final)
    log.info("analysis of %s written to %s (%d tokens, %d interpretable latents)", run, final, n_tokens,
             summary["interpretable"])
    return final
