"""Shared versus routed computation: how much of each token's MLP output the always-on path makes.

An MoE block with an always-on path outputs ``y = r + s`` per token, with ``r = sum_e w_e E_e(x)`` the
routed experts' weighted sum and ``s`` the shared path: Qwen2-MoE / Qwen3-Next
``s = sigmoid(g(x)) S(x)`` (``mlp.shared_expert`` scaled by ``mlp.shared_expert_gate``), DeepSeek-V3
``s = S(x)`` (``mlp.shared_experts``, its shared experts merged into one MLP). Both parts are read by
forward hooks on the modules that make them (``r``: the experts module's output; ``s``: the shared
module's output times the gate), so ``r + s`` is the block's output.

Per token and MoE layer:

- ``share_norm`` = ||s|| / (||s|| + ||r||), in [0, 1];
- ``share_proj`` = <s, y> / ||y||^2: the part of y's length along itself that s makes; the routed part's
  is 1 - share_proj (the two sum to 1; either may leave [0, 1] when s and r point apart);
- ``gate`` = sigmoid(g(x)) where the shared path has a gate (NaN otherwise);
- ``cos`` = cosine of s and r; ``norm_shared``, ``norm_routed`` = ||s||, ||r||.

Tables (means over tokens, BOS apart as in the expert tables): ``shared_layer`` (per layer),
``shared_domain`` (per layer and domain), ``shared_position`` (per layer and position bucket
``0`` .. ``7``, ``8+``, ``BOS``: the cold start).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from routesae.atomic import atomic_path, atomic_write_json
from routesae.causal.features import SteeringError
from routesae.corpus import ContextBuilder, CorpusPassConfig, iter_documents
from routesae.models.load import ModelConfig, first_device, load_model
from routesae.models.routers import adapter_for

METRICS = ("share_norm", "share_proj", "gate", "cos", "norm_shared", "norm_routed")
SUPPORTED = "qwen2_moe, qwen3_next and deepseek_v3"


def _out(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def shared_hooks(model) -> Iterator[dict[int, dict[str, Tensor]]]:
    """Hooks filling ``parts[layer]`` with ``shared`` [n, d], ``routed`` [n, d], ``output`` [n, d] and ``gate`` [n]
    (Qwen gate; absent otherwise) at every forward; one-line error for a model without a shared path."""
    adapter = adapter_for(model)
    if adapter is None or adapter.shared_attr is None:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise SteeringError(f"model type {kind} has no shared experts beside its routed ones; the shared/routed "
                            f"split supports {SUPPORTED}")
    parts: dict[int, dict[str, Tensor]] = {}
    handles = []
    for layer in adapter.moe_layers():
        block = adapter.moe_block(layer)
        state = parts.setdefault(layer, {})

        def put(name, state=state):
            def hook(module, args, output):
                out = _out(output).detach()
                state[name] = out.reshape(-1, out.shape[-1]).float()
            return hook

        handles.append(getattr(block, adapter.experts_attr).register_forward_hook(put("routed")))
        handles.append(getattr(block, adapter.shared_attr).register_forward_hook(put("shared_raw")))
        handles.append(block.register_forward_hook(put("output")))
        if adapter.shared_gate_attr:
            handles.append(getattr(block, adapter.shared_gate_attr).register_forward_hook(put("gate_logit")))
    try:
        yield parts
    finally:
        for h in handles:
            h.remove()


def split_parts(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``shared`` (gate applied), ``routed``, ``output`` and ``gate`` of one layer from the hooks' raw values."""
    gate = torch.sigmoid(state["gate_logit"]) if "gate_logit" in state else None
    shared = state["shared_raw"] * gate if gate is not None else state["shared_raw"]
    out = {"shared": shared, "routed": state["routed"], "output": state["output"]}
    if gate is not None:
        out["gate"] = gate[:, 0]
    return out


def token_metrics(parts: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """The per-token metrics of the module docstring from one layer's ``split_parts``."""
    s, r, y = parts["shared"].double(), parts["routed"].double(), parts["output"].double()
    ns, nr = s.norm(dim=-1), r.norm(dim=-1)
    yy = (y * y).sum(-1).clamp_min(1e-30)
    cos = (s * r).sum(-1) / (ns * nr).clamp_min(1e-30)
    gate = parts.get("gate")
    m = {"share_norm": ns / (ns + nr).clamp_min(1e-30), "share_proj": (s * y).sum(-1) / yy,
         "gate": gate.double() if gate is not None else torch.full_like(ns, float("nan")), "cos": cos,
         "norm_shared": ns, "norm_routed": nr}
    return {k: v.cpu().numpy() for k, v in m.items()}


@dataclass
class SharedConfig(CorpusPassConfig):
    """What to measure: ``model`` over ``corpus`` (``split``), ``max_tokens`` real tokens; tables into ``out``."""


BUCKETS = [str(i) for i in range(8)] + ["8+"]


@torch.no_grad()
def shared_rows(model, tokenizer, cfg: SharedConfig) -> pd.DataFrame:
    """One row per (token, MoE layer): layer, domain, bucket and the metrics."""
    if cfg.max_tokens < 1:
        raise SteeringError(f"--max-tokens {cfg.max_tokens} must be positive")
    docs = iter_documents(cfg.corpus_config())
    builder = ContextBuilder(tokenizer, cfg.ctx, "pack")
    device, bos = first_device(model), getattr(tokenizer, "bos_token_id", None)
    frames, done = [], 0
    with shared_hooks(model) as parts:
        for batch in builder.batches(docs, cfg.batch_size):
            if done >= cfg.max_tokens:
                break
            keep = batch.attention_mask.reshape(-1).astype(bool)
            keep &= np.cumsum(keep) <= cfg.max_tokens - done
            model(input_ids=torch.from_numpy(batch.input_ids).to(device),
                  attention_mask=torch.from_numpy(batch.attention_mask).to(device), use_cache=False)
            pos = batch.position.reshape(-1)[keep]
            ids = batch.input_ids.reshape(-1)[keep]
            bucket = np.where((pos == 0) & (ids == bos) if bos is not None else np.zeros(len(pos), bool), "BOS",
                              np.array(BUCKETS, dtype=object)[np.minimum(pos, 8)])
            domain = np.array(builder.doc_domains, dtype=object)[batch.doc_index.reshape(-1)[keep]]
            for layer, state in parts.items():
                m = token_metrics({k: v[torch.from_numpy(keep).to(v.device)] for k, v in split_parts(state).items()})
                frames.append(pd.DataFrame({"layer": layer, "domain": domain, "bucket": bucket, **m}))
            done += int(keep.sum())
    if not frames:
        raise SteeringError(f"no tokens read from corpus '{cfg.corpus}' (split {cfg.split})")
    return pd.concat(frames, ignore_index=True)


def shared_tables(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Means of the metrics per layer, per (layer, domain) and per (layer, position bucket)."""
    def agg(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        g = df.groupby(keys, sort=True)
        out = g[list(METRICS)].mean().reset_index()
        out.insert(len(keys), "tokens", g.size().to_numpy())
        return out

    body = rows[rows["bucket"] != "BOS"]
    position = agg(rows, ["layer", "bucket"])
    order = {b: i for i, b in enumerate(BUCKETS + ["BOS"])}
    position = position.sort_values(["layer", "bucket"], key=lambda c: c.map(order) if c.name == "bucket" else c)
    return {"shared_layer": agg(body, ["layer"]), "shared_domain": agg(body, ["layer", "domain"]),
            "shared_position": position.reset_index(drop=True)}


DEFINITIONS = {
    "share_norm": "||s|| / (||s|| + ||r||): s = the shared path's output (gate applied), r = the routed experts' sum",
    "share_proj": "<s, y> / ||y||^2 with y = s + r the block's output; the routed part's is 1 - share_proj",
    "gate": "sigmoid(shared_expert_gate(x)), the factor of the shared expert (Qwen2-MoE / Qwen3-Next); NaN without",
    "cos": "cosine of s and r", "norm_shared": "||s||", "norm_routed": "||r||",
    "tokens": "tokens averaged (BOS left out of shared_layer and shared_domain; its own bucket in shared_position)",
}


def analyze_shared(cfg: SharedConfig, model=None, tokenizer=None) -> Path:
    """Write ``shared_layer / shared_domain / shared_position.parquet`` and ``summary.json`` into ``cfg.out``."""
    t0 = time.time()
    if model is None:
        model, tokenizer = load_model(ModelConfig(cfg.model, cfg.dtype, cfg.device, None, cfg.trust_remote_code))
    if tokenizer is None:
        raise SteeringError(f"no tokenizer found with model '{cfg.model}'")
    rows = shared_rows(model, tokenizer, cfg)
    tables = shared_tables(rows)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        with atomic_path(out / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
    body = rows[rows["bucket"] != "BOS"]
    atomic_write_json(out / "summary.json", {
        "model": cfg.model, "model_type": model.config.model_type, "corpus": cfg.corpus, "split": cfg.split,
        "tokens": int(len(rows) // max(rows["layer"].nunique(), 1)), "moe_layers": sorted(int(x) for x in
                                                                                           rows["layer"].unique()),
        "mean_share_norm": float(body["share_norm"].mean()), "mean_share_proj": float(body["share_proj"].mean()),
        "mean_gate": None if body["gate"].isna().all() else float(body["gate"].mean()),
        "seconds": round(time.time() - t0, 1), "config": asdict(cfg), "definitions": DEFINITIONS})
    return out
