"""Capture: residual streams of chosen layers and every MoE layer's routing, into a store.

Residual streams are read with forward hooks on the selected decoder blocks only (all hidden
states are never materialised); routing comes from the router adapter's hooks (Hugging Face
backend) or from TransformerLens hooks (``backend="tl"``). Padding positions are dropped before
anything is written. The run resumes after the last complete shard of an interrupted capture.

Before anything is written, options, ``--out``, the corpus (its first document), the model and the
layers are checked (routesae/capture_checks.py): a failed start leaves no folder, and a store with no
tokens yet may be replaced by a corrected re-run. A resume recomputes the corpus fingerprint and
refuses a changed corpus; ``OUT/.capture.lock`` (routesae/store_lock.py) keeps a second capture out.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process captures its own blocks of contexts into the
same store (routesae/capture_dist.py). ``store_dtype`` stores the activations in another dtype than
the model runs in (``dtype``): a float32 model with bfloat16 rows halves the store.

Python API::

    from routesae.capture import CaptureConfig, capture
    store = capture(CaptureConfig(model="data/demo-moe", corpus="data/corpus", out="stores/demo",
                                  max_tokens=200_000))  # the whole demo corpus would be a ~76 GB store
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from routesae.capture_checks import CaptureError, preflight
from routesae.capture_io import ShardBuffer, prefetch  # noqa: F401  (prefetch: part of this module's API)
from routesae.corpus import ContextBatch, ContextBuilder, CorpusConfig, CorpusStats, iter_documents
from routesae.layers import parse_layers
from routesae.models.intervene import RoutingOverride, override_routing, routing_rule
from routesae.models.load import (
    ModelConfig,
    base_model,
    config_hash,
    decoder_layers,
    first_device,
    load_model,
    model_spec,
    recorded_spec,
    resolve_dtype,
    resolve_source,
)
from routesae.models.routers import RoutingDecision, adapter_for
from routesae.store import StoreWriter, resumable
from routesae.store_lock import store_lock
from routesae.store_size import bytes_per_token, dtype_bytes, size_warning

log = logging.getLogger(__name__)


@dataclass
class CaptureConfig:
    """Everything that decides what a capture writes (plus where and how fast)."""

    model: str
    corpus: str
    out: str
    layers: str = "auto"
    backend: str = "hf"  # hf | tl
    max_tokens: int | None = None
    ctx: int = 256
    batch_size: int = 8
    dtype: str = "float32"
    router_logits: bool = True
    device: str = "auto"
    device_map: str | None = None
    text_field: str = "text"
    domain_field: str = "domain"
    split: str = "train"
    packing: str = "pack"
    seed: int = 0
    shard_mb: float = 256.0
    trust_remote_code: bool = False
    progress: bool = True
    routing_override: str | None = None  # e.g. "topk:2", "topp:0.5", "ablate:3,7@layer5" (hf backend)
    gguf_file: str | None = None  # a GGUF file in the folder ``model``; folded into ``model`` as folder/NAME
    store_dtype: str | None = None  # dtype of the stored activations (None: ``dtype``, the model's)
    world_size: int = 1  # processes writing the store; capture() sets it from torchrun's WORLD_SIZE

    def __post_init__(self) -> None:
        # one model spec reopens the model later (evaluate, analyze, dashboard): record folder/NAME.gguf
        self.model, self.gguf_file = model_spec(self.model, self.gguf_file), None

    @property
    def stored_dtype(self) -> str:
        return self.store_dtype or self.dtype

    def content_args(self) -> dict:
        """The arguments that decide the store's content (a re-run must repeat them)."""
        keep = ("model", "corpus", "layers", "backend", "max_tokens", "ctx", "batch_size", "dtype", "router_logits",
                "text_field", "domain_field", "split", "packing", "seed", "shard_mb", "routing_override")
        d = asdict(self)
        args = {k: d[k] for k in keep if k != "routing_override" or d[k]}  # older stores stay resumable
        if self.stored_dtype != self.dtype:  # likewise: recorded only when it differs from the default
            args["store_dtype"] = self.stored_dtype
        if self.world_size > 1:
            args["world_size"] = self.world_size
        return args


# ---------------------------------------------------------------- forward runners


class HFRunner:
    """Hooks on a Hugging Face model: chosen blocks' outputs and the router adapter's decisions.

    Under a ``device_map`` the blocks sit on several devices: each hooked residual and each
    decision's tensors move to the device the inputs go to (:func:`first_device`) as the hook
    sees them (one move per tensor and batch, none where it is there already), so they stack.
    """

    def __init__(self, model, layers: list[int], want_logits: bool, override: RoutingOverride | None = None):
        self.model = model
        self.layers = layers
        self.device = first_device(model)
        self.adapter = adapter_for(model)
        self._override = contextlib.ExitStack()
        if override:  # entered for the runner's lifetime; its experts pre-hooks run before capture's
            self._override.enter_context(override_routing(model, override))
        self.moe_layers = self.adapter.moe_layers() if self.adapter else []
        self._resid: dict[int, torch.Tensor] = {}
        self._route: dict[int, RoutingDecision] = {}
        self.handles = []
        blocks = decoder_layers(model)
        for layer in layers:
            self.handles.append(blocks[layer].register_forward_hook(self._resid_hook(layer)))
        for layer in self.moe_layers:
            self.handles += self.adapter.attach(layer, self._emit, want_logits)

    def _resid_hook(self, layer: int):
        def hook(module, args, output):
            self._resid[layer] = (output[0] if isinstance(output, tuple) else output).detach().to(self.device)
        return hook

    def _emit(self, layer: int, decision: RoutingDecision) -> None:
        d = self.device
        self._route[layer] = RoutingDecision(
            decision.indices.to(d), decision.weights.to(d), decision.n_active.to(d),
            None if decision.logits is None else decision.logits.to(d),
            {k: v.to(d) for k, v in decision.extra.items()})

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self._resid.clear()
        self._route.clear()
        base_model(self.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        resid = torch.stack([self._resid[i] for i in self.layers], dim=2)  # [B, T, L', d]
        return resid.flatten(0, 1), dict(self._route)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._override.close()


class TLRunner:
    """The same through a TransformerLens ``HookedTransformer`` (``run_with_cache``)."""

    def __init__(self, model, layers: list[int], want_logits: bool, override: RoutingOverride | None = None):
        from routesae.models import tl

        self._override = contextlib.ExitStack()
        if override:
            self._override.enter_context(override_routing(model, override))
        self.model = model
        self.layers = layers
        self.want_logits = want_logits
        self.moe_layers = tl.tl_moe_layers(model)
        self._tl = tl

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        resid, route = self._tl.tl_capture_batch(self.model, input_ids, attention_mask, self.layers,
                                                 self.moe_layers, self.want_logits)
        return resid.flatten(0, 1), route

    def close(self) -> None:
        self._override.close()


# ---------------------------------------------------------------- helpers


def token_strings(tokenizer, vocab_size: int) -> np.ndarray:
    """Decoded text of every token id (one decode per vocabulary entry, not per token)."""
    n = max(vocab_size, len(tokenizer))
    return np.array([tokenizer.decode([i]) for i in range(n)], dtype=object)


def _router_arrays(route: dict[int, RoutingDecision], moe_layers: list[int], rows: torch.Tensor | None,
                   k_max: int, extras: tuple[str, ...], want_logits: bool) -> dict[str, torch.Tensor]:
    """Stack the MoE layers' decisions into the store's arrays, keeping ``rows`` (None: all rows)."""
    def stack(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        t = torch.stack(parts, 1)
        return (t if rows is None else t.index_select(0, rows)).to(dtype).cpu()

    decisions = [route[layer] for layer in moe_layers]
    idx, wts = [], []
    for d in decisions:
        i, w = d.indices, d.weights
        if i.shape[1] < k_max:  # variable-k: pad unused slots
            pad = k_max - i.shape[1]
            i = torch.nn.functional.pad(i, (0, pad), value=-1)
            w = torch.nn.functional.pad(w, (0, pad), value=0.0)
        idx.append(i)
        wts.append(w)
    out = {"indices": stack(idx, torch.int16), "weights": stack(wts, torch.float16),
           "n_active": stack([d.n_active for d in decisions], torch.uint8)}
    if want_logits and all(d.logits is not None for d in decisions):
        out["logits"] = stack([d.logits for d in decisions], torch.float16)
    for e in extras:
        out[e] = stack([d.extra[e] for d in decisions], torch.float16)
    return out


def _open(cfg: CaptureConfig, model=None, tokenizer=None):
    """Load the model for the chosen backend (unless given); return model, tokenizer, runner, sizes, config."""
    mcfg = ModelConfig(cfg.model, cfg.dtype, cfg.device, cfg.device_map, cfg.trust_remote_code)
    if cfg.backend == "hf":
        model, tok = (model, tokenizer) if model is not None else load_model(mcfg)
        conf = model.config  # blocks, not conf.num_hidden_layers: LongCat-Flash counts two per block
        return model, tok, HFRunner, len(decoder_layers(model)), conf.hidden_size, conf
    if cfg.backend == "tl":
        if resolve_source(cfg.model)[1]:
            raise CaptureError("--backend tl cannot open GGUF checkpoints; use --backend hf")
        if cfg.device_map:
            raise CaptureError(f"--device-map {cfg.device_map} works with --backend hf only (TransformerLens puts the "
                               f"whole model on one --device); drop --device-map or use --backend hf")
        from routesae.models.load import resolve_device
        from routesae.models.tl import load_hooked_transformer

        model = load_hooked_transformer(cfg.model, device=str(resolve_device(cfg.device)),
                                        dtype=resolve_dtype(cfg.dtype))
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(cfg.model)
        return model, model.tokenizer, TLRunner, model.cfg.n_layers, model.cfg.d_model, conf
    raise CaptureError(f"--backend {cfg.backend} unknown; use hf or tl")


# ---------------------------------------------------------------- the capture loop


def capture(cfg: CaptureConfig, on_shard: Callable[[dict], None] | None = None, model=None,
            tokenizer=None) -> Path:
    """Run a capture (or resume one) and return the store folder.

    ``model`` / ``tokenizer``: an already loaded Hugging Face model (``cfg.model`` then only names
    it in the manifest), for notebooks and benchmarks. ``on_shard`` is called after each shard.
    Options, ``--out``, the corpus, the model and the layers are all checked before anything is
    written; the folder is locked against a second capture for the whole run.
    """
    if model is not None and cfg.backend != "hf":
        raise CaptureError("passing a loaded model works with backend hf only")
    from routesae.capture_dist import capture_ranks, world_from_env

    if (world := world_from_env()) is not None:
        return capture_ranks(cfg, world, on_shard, model, tokenizer)
    pre = preflight(cfg)
    model, tok, runner_cls, n_layers, d_model, conf = _open(cfg, model, tokenizer)
    if tok is None:
        raise CaptureError(f"no tokenizer found with model '{cfg.model}'; put tokenizer files in the checkpoint folder")
    layers = parse_layers(cfg.layers, n_layers)
    fingerprint = pre.fingerprint()
    if pre.existing is not None:  # a changed corpus is refused here, before the lock file is made
        resumable(cfg.out, pre.existing, cfg.content_args(), fingerprint)
    with store_lock(cfg.out):
        runner = runner_cls(model, layers, cfg.router_logits, pre.override)
        try:
            header, k_max, extras = _header(cfg, model, conf, tok, runner, layers, n_layers, d_model, pre.override)
            header["corpus"]["fingerprint"] = fingerprint
            writer = StoreWriter(cfg.out, header, cfg.content_args())
            if writer.complete:
                log.info("store %s is complete (%d tokens); nothing to do", cfg.out, writer.tokens_done)
            else:
                if cfg.max_tokens is None:  # one line before a capture that could fill the disk
                    per_token = bytes_per_token(header, dtype_bytes(cfg.stored_dtype))
                    if warning := size_warning(pre.corpus, per_token, cfg.out):
                        log.warning(warning)
                _fill(cfg, writer, runner, tok, int(conf.vocab_size), first_device(model), pre.corpus,
                      len(layers) * d_model, k_max, extras, on_shard)
        finally:
            runner.close()
    return Path(cfg.out)


def _header(cfg: CaptureConfig, model, conf, tok, runner, layers: list[int], n_layers: int, d_model: int,
            override: RoutingOverride) -> tuple[dict, int | None, tuple[str, ...]]:
    """The manifest's description of model, layers and routing; also k_max and the router extras."""
    adapter = getattr(runner, "adapter", None)
    tl = cfg.backend == "tl"
    n_experts = adapter.num_experts() if adapter else (getattr(model.cfg, "num_experts", None) if tl else None)
    k_max = adapter.top_k() if adapter else (getattr(model.cfg, "experts_per_token", None) if tl else None)
    top_k = k_max
    if override and runner.moe_layers:  # wider sets under top-p / threshold / top-k' > k
        k_max = override.max_width(routing_rule(model))
    extras = adapter.extra_fields() if adapter else ()
    header = {
        "model": {"name_or_path": recorded_spec(cfg.model),  # local folders absolute: reopened from anywhere
                  "config_hash": config_hash(model) if cfg.backend == "hf" else None,
                  "architecture": (getattr(conf, "architectures", None) or [type(model).__name__])[0],
                  "model_type": getattr(conf, "model_type", None), "vocab_size": int(conf.vocab_size)},
        "d_model": int(d_model), "n_layers": int(n_layers), "layers": layers, "moe_layers": runner.moe_layers,
        "n_experts": n_experts, "top_k": top_k, "k_max": k_max,
        "routing_override": str(override) or None,
        "router_extras": list(extras), "router_logits": cfg.router_logits,
        "dtype": cfg.dtype, "store_dtype": cfg.stored_dtype, "ctx": cfg.ctx,
        "bos_token_id": getattr(tok, "bos_token_id", None),
        "corpus": {"path": cfg.corpus},
        "layer_numbering": "layer i = output of decoder block i = HF hidden_states[i+1]",
    }
    return header, k_max, extras


def shard_tokens(cfg: CaptureConfig, values_per_token: int) -> int:
    """Rows per shard: ``--shard-mb`` worth of activations, at least one context."""
    return max(int(cfg.shard_mb * 2**20 / (values_per_token * dtype_bytes(cfg.stored_dtype))), cfg.ctx)


def run_batch(cfg: CaptureConfig, runner, batch: ContextBatch, keep: torch.Tensor, device, builder: ContextBuilder,
              token_text: np.ndarray, k_max: int | None, extras: tuple[str, ...]):
    """One forward pass: the kept rows' residuals (in the store dtype, on CPU), router arrays and token rows."""
    resid, route = runner(torch.from_numpy(batch.input_ids).to(device),
                          torch.from_numpy(batch.attention_mask).to(device))
    keep = keep.to(resid.device)
    rows = None if bool(keep.all()) else keep.nonzero().squeeze(1)  # None: every row is real
    resid = (resid if rows is None else resid.index_select(0, rows)).to(resolve_dtype(cfg.stored_dtype)).cpu()
    router = (_router_arrays(route, runner.moe_layers, rows, k_max, extras, cfg.router_logits)
              if runner.moe_layers else None)
    return resid, router, token_rows(batch, builder, token_text, keep.cpu().numpy())


def _fill(cfg: CaptureConfig, writer: StoreWriter, runner, tok, vocab_size: int, device, corpus: CorpusConfig,
          values_per_token: int, k_max: int | None, extras: tuple[str, ...],
          on_shard: Callable[[dict], None] | None) -> None:
    """Run the corpus through the model from where ``writer``'s store stops, shard by shard, and finish it."""
    per_shard = shard_tokens(cfg, values_per_token)
    stats = CorpusStats()
    docs = iter_documents(corpus, stats)
    builder = ContextBuilder(tok, cfg.ctx, cfg.packing)
    token_text = token_strings(tok, vocab_size)
    total = writer.tokens_done
    buf = ShardBuffer(writer.write_shard, on_shard)
    bar = _progress(cfg, total)
    try:
        last_end = writer.contexts_done
        for batch in prefetch(builder.batches(docs, cfg.batch_size, skip_contexts=writer.contexts_done)):
            if cfg.max_tokens is not None and total >= cfg.max_tokens:
                break
            keep = torch.from_numpy(batch.attention_mask.reshape(-1).astype(bool))
            if cfg.max_tokens is not None:  # trim the last batch to exactly max_tokens
                keep &= torch.cumsum(keep.long(), 0) <= cfg.max_tokens - total
            buf.add(*run_batch(cfg, runner, batch, keep, device, builder, token_text, k_max, extras))
            n = int(keep.sum())
            total += n
            last_end = int(batch.context_index[-1]) + 1
            bar.update(n)
            if buf.rows >= per_shard:
                buf.flush(contexts_end=last_end)
        buf.flush(contexts_end=last_end)
        buf.settle()
        if writer.tokens_done == 0:  # left incomplete and empty: a re-run with other arguments may replace it
            raise CaptureError(f"capture wrote no tokens into {cfg.out}; check --max-tokens and the corpus")
        writer.finish(corpus_stats={"documents_read": stats.documents, "skipped_non_utf8": stats.skipped_lines,
                                    "skipped_empty": stats.skipped_empty})
    finally:
        buf.close()
        bar.close()


def token_rows(batch: ContextBatch, builder: ContextBuilder, token_text: np.ndarray, keep: np.ndarray) -> pd.DataFrame:
    ids = batch.input_ids.reshape(-1)[keep]
    doc_index = batch.doc_index.reshape(-1)[keep]
    b, t = batch.input_ids.shape
    ctx_pos = np.tile(np.arange(t, dtype=np.int32), b)[keep]
    context = np.repeat(batch.context_index, t)[keep]
    docs, inverse = np.unique(doc_index, return_inverse=True)  # a batch spans few documents
    doc_ids = np.array([builder.doc_ids[i] for i in docs], dtype=object)
    domains = np.array([builder.doc_domains[i] for i in docs], dtype=object)
    return pd.DataFrame({
        "token_id": ids.astype(np.int32),
        "token": token_text[ids],
        "doc_id": doc_ids[inverse],
        "position": batch.position.reshape(-1)[keep],
        "ctx_pos": ctx_pos,
        "context": context,
        "domain": domains[inverse],
    })


def _progress(cfg: CaptureConfig, initial: int, total: int | None = -1, desc: str = "capture"):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_tokens if total == -1 else total, initial=initial, unit="tok", unit_scale=True,
                desc=desc, disable=not cfg.progress, dynamic_ncols=True)
