"""MoEfication: a dense SwiGLU checkpoint (SmolLM2, any Llama) becomes a standard ``MixtralForCausalLM``.

``routesae zoo moefy --from smollm2 --experts 16 --top-k 4 [--out DIR]`` calls :func:`moefy`.
The output folder is an ordinary Hugging Face checkpoint (``AutoModelForCausalLM.from_pretrained``),
so ``routesae capture`` and the Mixtral router adapter read it unchanged. Default folder:
``$XDG_CACHE_HOME/routesae/moefy/<name>`` (``~/.cache/...``), never the repository.

Steps, per decoder block (attention, norms and embeddings are copied as they are):

1. **Partition** the ``I`` FFN neurons into ``E`` equal experts of ``I / E`` neurons by balanced
   k-means (cosine) over the neurons' *co-activation* patterns (default, ``cluster="coact"``):
   neuron ``j``'s vector is its contribution magnitude ``|h_j(x_t)| * ||W_down[:, j]||`` over
   ``cluster_tokens`` training tokens, where ``h = silu(W_gate x) * (W_up x)``; neurons that fire on
   the same tokens land in the same expert, so a few experts carry most of a token's FFN output.
   ``cluster="weights"`` clusters the concatenated unit-norm gate and up rows instead. Balancing:
   each k-means step assigns greedily by decreasing similarity with capacity ``I / E`` per expert.
2. **Router**: ``Linear(d, E)`` without bias (Mixtral's) fitted by ridge regression (closed form,
   streamed normal equations) to predict every expert's output norm ``||W_down,e h_e(x)||`` from
   the FFN input ``x`` (the post-attention RMSNorm output) on ``router_tokens`` training tokens.
   Its top-k recall of the truly largest experts is measured on ``val_tokens`` validation tokens.
3. **Exact construction in a standard Mixtral.** MoEfication sums the selected experts' outputs
   (weight 1 each); Mixtral multiplies each by its softmax weight renormalised over the top-k.
   The saved router of each layer is the fitted one times a power-of-two temperature
   ``router_scale[i]`` that makes its logits tiny: mean per-token std about ``2^-12``, and no
   validation token's spread (max - min over experts) above ``2^-7`` (some layers give the first
   token of a context logits far larger than average). The renormalised weights are then ``1/k``
   up to ``|l_i - mean_topk l|`` of the scaled logits, below 1% for every validation token
   (``moefy.json`` ``weight_error``), while the top-k choice is unchanged (a positive
   scale keeps the order; float32 softmax still separates scaled logits about 6e-8 apart); every
   expert's ``down_proj`` is multiplied by ``k``. With all ``E`` experts active the scale is
   shrunk by a further ``2^-40``: every softmax weight is then exactly ``1/E`` in float32 and the
   model equals the dense one up to float summation order (a test checks logits; SmolLM2: see
   ``docs/RESULTS.md``). The top-k is part of the weights: :func:`set_top_k` rescales
   ``down_proj`` and the router for another ``k`` (exactly, for powers of two) and updates the
   config. ``config.moefy`` records the construction.

Side effect worth knowing: the stored router logits are temperature-scaled (their softmax is
nearly uniform and router entropy is uninformative); divide layer i's by
``config.moefy["router_scale"][i]`` for the fitted scale. With all experts active they underflow
to 0 in a float16 store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from routesae.atomic import atomic_write_json
from routesae.models.load import ModelConfig, ModelLoadError, base_model, decoder_layers, load_model
from routesae.zoo.train_lm import sorted_experts_forward

log = logging.getLogger(__name__)

LOGIT_STD = 2.0**-12  # target mean per-token std of a layer's saved router logits (see the module docstring)
MAX_SPREAD = 2.0**-7  # cap on a layer's largest per-token logit spread (max - min): bounds |k w - 1|
ALL_EXPERTS_SHRINK = 2.0**-40  # extra router scale when every expert is active: weights exactly 1/E
RECALL_KS = (1, 2, 4, 8)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/routesae/moefy`` (default ``~/.cache/routesae/moefy``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "routesae" / "moefy"


@dataclass
class MoefyConfig:
    """What to MoEfy and how; ``out`` None = ``cache_dir() / default_name()``."""

    source: str = "smollm2"  # a model spec (routesae.models.load) of a dense SwiGLU causal LM
    out: str | None = None
    experts: int = 16
    top_k: int = 4
    corpus: str = "data/corpus"
    cluster: str = "coact"  # coact | weights
    cluster_tokens: int = 8192
    router_tokens: int = 65536
    val_tokens: int = 16384
    ctx: int = 256
    batch_size: int = 8
    ridge: float = 1e-4  # x mean diagonal of X^T X
    kmeans_iters: int = 30
    seed: int = 0
    device: str = "cpu"
    force: bool = False

    def default_name(self) -> str:
        stem = Path(self.source).stem if ("/" in self.source or self.source.endswith(".gguf")) else self.source
        return f"{stem.replace(':', '-')}-e{self.experts}-k{self.top_k}"

    def out_dir(self) -> Path:
        return Path(self.out).expanduser() if self.out else cache_dir() / self.default_name()


# ---------------------------------------------------------------- the dense FFN


@dataclass
class DenseFFN:
    """One SwiGLU FFN: ``down(act(gate x) * up x)``; ``gate``/``up`` [I, d], ``down`` [d, I]."""

    gate: Tensor
    up: Tensor
    down: Tensor
    act: Callable[[Tensor], Tensor]

    def hidden(self, x: Tensor) -> Tensor:
        return self.act(x @ self.gate.T) * (x @ self.up.T)

    def expert_norms(self, x: Tensor, perm: Tensor) -> Tensor:
        """``[n, E]``: the norm of every expert's output ``W_down[:, perm[e]] h[perm[e]]``."""
        h = self.hidden(x)[:, perm]  # [n, E, I/E]
        down = self.down[:, perm].permute(1, 0, 2)  # [E, d, I/E]
        return torch.einsum("nei,edi->ned", h, down).norm(dim=-1)


def dense_ffns(model) -> list[DenseFFN]:
    """The FFN of every block of a dense Llama-style model (else a one-line error)."""
    c = model.config
    if getattr(c, "mlp_bias", False) or getattr(c, "attention_bias", False):
        raise ModelLoadError("MoEfication supports bias-free Llama-style models (mlp_bias/attention_bias False)")
    out = []
    for i, block in enumerate(decoder_layers(model)):
        mlp = getattr(block, "mlp", None)
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            raise ModelLoadError(f"block {i} of {type(model).__name__} has no SwiGLU mlp (gate/up/down_proj); "
                                 f"MoEfication needs a dense Llama-style model")
        out.append(DenseFFN(mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float(),
                            mlp.down_proj.weight.detach().float(), mlp.act_fn))
    return out


def ffn_inputs(model, batches: Iterable[tuple[Tensor, Tensor]], n_tokens: int) -> Iterator[list[Tensor]]:
    """Per batch, every block's FFN input at the real tokens (``[n, d]`` per block), ``n_tokens`` in all."""
    captured: dict[int, Tensor] = {}
    blocks = decoder_layers(model)
    handles = [b.mlp.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0].detach()))
               for i, b in enumerate(blocks)]
    done = 0
    try:
        for ids, mask in batches:
            with torch.inference_mode():
                base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
            keep = mask.reshape(-1).bool()
            keep &= torch.cumsum(keep.long(), 0) <= n_tokens - done
            done += int(keep.sum())
            yield [captured[i].reshape(-1, captured[i].shape[-1])[keep].float() for i in range(len(blocks))]
            if done >= n_tokens:
                return
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- partition


def balanced_assign(sim: Tensor, capacity: int) -> Tensor:
    """Labels ``[n]``: pairs (item, cluster) taken by decreasing similarity while the cluster has room."""
    n, k = sim.shape
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} clusters < {n} items")
    order = np.argsort(-sim.numpy().reshape(-1), kind="stable").tolist()  # Python ints: a fast plain loop
    labels = [-1] * n
    room = [capacity] * k
    left = n
    for flat in order:
        i, c = divmod(flat, k)
        if labels[i] < 0 and room[c] > 0:
            labels[i] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(vectors: Tensor, k: int, iters: int = 30, seed: int = 0) -> Tensor:
    """Spherical k-means with equal cluster sizes ``n / k`` (greedy balanced assignment); labels ``[n]``."""
    n = vectors.shape[0]
    if n % k:
        raise ValueError(f"{n} neurons cannot be split into {k} equal experts; choose a divisor of {n}")
    f = F.normalize(vectors.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centers = f[torch.randperm(n, generator=g)[:k]].clone()
    labels = None
    for _ in range(iters):
        new = balanced_assign(f @ centers.T, n // k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = F.normalize(torch.stack([f[labels == c].mean(0) for c in range(k)]), dim=1)
    return labels


def neuron_vectors(ffn: DenseFFN, x: Tensor | None, method: str) -> Tensor:
    """What k-means clusters: co-activation patterns ``[I, n]`` or weight rows ``[I, 2d]``."""
    if method == "weights":
        return torch.cat([F.normalize(ffn.gate, dim=1), F.normalize(ffn.up, dim=1)], 1)
    if method == "coact":
        return (ffn.hidden(x).abs() * ffn.down.norm(dim=0)).T
    raise ValueError(f"--cluster {method} unknown; use coact or weights")


def partition(ffn: DenseFFN, x: Tensor | None, experts: int, method: str = "coact", iters: int = 30,
              seed: int = 0) -> Tensor:
    """``perm [E, I/E]``: the sorted neuron indices of every expert."""
    labels = balanced_kmeans(neuron_vectors(ffn, x, method), experts, iters, seed)
    return torch.stack([torch.nonzero(labels == e).squeeze(1) for e in range(experts)])


# ---------------------------------------------------------------- router


class RidgeRouter:
    """Streamed normal equations of ``Y ~ X W^T`` (no bias), solved with a relative ridge."""

    def __init__(self, d: int, experts: int):
        self.xtx = torch.zeros(d, d, dtype=torch.float64)
        self.xty = torch.zeros(d, experts, dtype=torch.float64)
        self.n = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        x, y = x.double(), y.double()
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.n += x.shape[0]

    def solve(self, ridge: float) -> Tensor:
        lam = ridge * float(self.xtx.diagonal().mean())
        eye = torch.eye(self.xtx.shape[0], dtype=torch.float64)
        return torch.linalg.solve(self.xtx + lam * eye, self.xty).T.float()  # [E, d]


def topk_recall(pred: Tensor, true: Tensor, k: int) -> float:
    """Mean over tokens of ``|TopK(pred) ∩ TopK(true)| / k``."""
    p = F.one_hot(pred.topk(k, -1).indices, pred.shape[-1]).sum(1)
    t = F.one_hot(true.topk(k, -1).indices, true.shape[-1]).sum(1)
    return float((p * t).sum(-1).double().mean() / k)


def topk_weight_error(logits: list[Tensor], scales: list[float], k: int) -> dict[str, float]:
    """``|k w - 1|`` of Mixtral's renormalised top-k weights at the saved temperature, on validation logits.

    The construction's only deviation from the plain MoEfication sum (weight 1 per selected expert)."""
    dev = []
    for lg, scale in zip(logits, scales):
        p = torch.softmax(lg.float() * scale, -1)
        w = p.topk(k, -1).values
        dev.append((w / w.sum(-1, keepdim=True) * k - 1).abs())
    d = torch.cat(dev)
    return {"max": float(d.max()), "mean": float(d.mean()), "top_k": k}


def router_scale(logits: Tensor) -> float:
    """A layer's temperature: the power of two that brings the mean per-token std of its fitted logits
    ``[n, E]`` to about ``LOGIT_STD``, lowered when needed so no token's spread exceeds ``MAX_SPREAD``."""
    std = float(logits.std(-1).mean())
    spread = float((logits.max(-1).values - logits.min(-1).values).max())
    return 2.0 ** math.floor(math.log2(min(LOGIT_STD / max(std, 1e-30), MAX_SPREAD / max(spread, 1e-30))))


# ---------------------------------------------------------------- Mixtral checkpoint


def mixtral_config(dense_config, experts: int, top_k: int):
    """A ``MixtralConfig`` with the dense model's attention, norms, RoPE and vocabulary; FFN split in E."""
    from transformers import MixtralConfig

    d = dense_config
    inter = int(d.intermediate_size)
    if inter % experts:
        raise ValueError(f"intermediate size {inter} is not divisible by --experts {experts}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"--top-k {top_k} must be between 1 and --experts {experts}")
    heads = int(d.num_attention_heads)
    cfg = MixtralConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=inter // experts,
        num_hidden_layers=d.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=getattr(d, "num_key_value_heads", None) or heads,
        head_dim=getattr(d, "head_dim", None) or d.hidden_size // heads, hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters), tie_word_embeddings=bool(d.tie_word_embeddings),
        sliding_window=None, attention_dropout=0.0, num_local_experts=experts, num_experts_per_tok=top_k,
        router_jitter_noise=0.0, output_router_logits=False, bos_token_id=d.bos_token_id,
        eos_token_id=d.eos_token_id, pad_token_id=d.pad_token_id,
    )
    cfg.architectures = ["MixtralForCausalLM"]
    return cfg


def build_moe(dense, perms: list[Tensor], routers: list[Tensor], top_k: int, info: dict):
    """The ``MixtralForCausalLM`` of the construction (see the module docstring), float32, eval mode."""
    from transformers import MixtralForCausalLM

    experts = perms[0].shape[0]
    cfg = mixtral_config(dense.config, experts, top_k)
    shrink = ALL_EXPERTS_SHRINK if top_k == experts else 1.0
    scales = [s * shrink for s in info["router_scale"]]
    cfg.moefy = {**info, "top_k": top_k, "router_scale_now": scales}
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for i, (ffn, perm, router) in enumerate(zip(dense_ffns(dense), perms, routers)):
        p = f"model.layers.{i}.mlp."
        state[p + "gate.weight"] = router * scales[i]
        state[p + "experts.gate_up_proj"] = torch.cat([ffn.gate[perm], ffn.up[perm]], 1)  # [E, 2I/E, d]
        state[p + "experts.down_proj"] = ffn.down[:, perm].permute(1, 0, 2) * top_k  # [E, d, I/E]
    torch.manual_seed(0)
    moe = MixtralForCausalLM(cfg).float()
    moe.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True)
    return moe.eval()


@torch.no_grad()
def set_top_k(model, k: int):
    """Make a MoEfied Mixtral use ``k`` experts per token: ``down_proj`` x ``k / k_old``, router temperature
    (all experts active: x ``2^-40``, weights exactly ``1/E``), config. Returns the model."""
    c = model.config
    info = getattr(c, "moefy", None)
    if not info:
        raise ValueError("set_top_k works on MoEfied models only (config.moefy missing)")
    experts, old = int(c.num_local_experts), int(c.num_experts_per_tok)
    if not 1 <= k <= experts:
        raise ValueError(f"top-k {k} must be between 1 and {experts}")
    shrink = ALL_EXPERTS_SHRINK if k == experts else 1.0
    scales = [s * shrink for s in info["router_scale"]]
    for block, new, now in zip(decoder_layers(model), scales, info["router_scale_now"]):
        moe = block.mlp
        moe.experts.down_proj.mul_(k / old)
        moe.gate.weight.mul_(new / now)
        moe.top_k = moe.gate.top_k = k
    c.num_experts_per_tok = k
    c.moefy = {**info, "top_k": k, "router_scale_now": scales}
    return model


# ---------------------------------------------------------------- data


def corpus_batches(tokenizer, corpus: str, split: str, ctx: int, batch_size: int, seed: int,
                   device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Packed contexts of a corpus split as ``(input_ids, attention_mask)`` tensors."""
    from routesae.corpus import ContextBuilder, CorpusConfig, iter_documents

    builder = ContextBuilder(tokenizer, ctx, "pack")
    for b in builder.batches(iter_documents(CorpusConfig(corpus, split=split, seed=seed)), batch_size):
        yield torch.from_numpy(b.input_ids).to(device), torch.from_numpy(b.attention_mask).to(device)


def moefy_model(dense, train_batches: Iterator[tuple[Tensor, Tensor]], val_batches: Iterable[tuple[Tensor, Tensor]],
                experts: int, top_k: int, cluster: str = "coact", cluster_tokens: int = 8192,
                router_tokens: int = 65536, val_tokens: int = 16384, ridge: float = 1e-4, kmeans_iters: int = 30,
                seed: int = 0, log_fn: Callable[[str], None] = log.info):
    """MoEfy a loaded dense model on token batches; returns ``(MixtralForCausalLM, report dict)``."""
    t0 = time.time()
    ffns = dense_ffns(dense)
    n_layers = len(ffns)
    # 1. partition (co-activation on the first cluster_tokens training tokens)
    perms = []
    if cluster == "coact":
        parts = list(ffn_inputs(dense, train_batches, cluster_tokens))
        if not parts:
            raise ValueError("no training tokens for clustering; check the corpus")
        xs = [torch.cat([p[i] for p in parts]) for i in range(n_layers)]
        del parts
    for i, ffn in enumerate(ffns):
        perms.append(partition(ffn, xs[i] if cluster == "coact" else None, experts, cluster, kmeans_iters, seed + i))
    if cluster == "coact":
        del xs
    t_cluster = time.time() - t0
    log_fn(f"partitioned {n_layers} layers into {experts} experts ({cluster}) in {t_cluster:.0f}s")
    # 2. routers: ridge regression of expert output norms on the following training tokens
    fits = [RidgeRouter(ffns[0].gate.shape[1], experts) for _ in ffns]
    for xs_b in ffn_inputs(dense, train_batches, router_tokens):
        for i, x in enumerate(xs_b):
            fits[i].add(x, ffns[i].expert_norms(x, perms[i]))
    if fits[0].n == 0:
        raise ValueError("no training tokens left for the routers; check the corpus or lower --cluster-tokens")
    routers = [f.solve(ridge) for f in fits]
    t_router = time.time() - t0 - t_cluster
    log_fn(f"fitted {n_layers} routers on {fits[0].n:,} tokens in {t_router:.0f}s")
    # 3. held-out recall of the true top-k experts, and the logit scale
    preds: list[list[Tensor]] = [[] for _ in ffns]
    trues: list[list[Tensor]] = [[] for _ in ffns]
    for xs_b in ffn_inputs(dense, val_batches, val_tokens):
        for i, x in enumerate(xs_b):
            preds[i].append(x @ routers[i].T)
            trues[i].append(ffns[i].expert_norms(x, perms[i]))
    pred = [torch.cat(p) for p in preds]
    true = [torch.cat(t) for t in trues]
    ks = [k for k in sorted({*RECALL_KS, top_k}) if k < experts]
    per_layer = []
    for i in range(n_layers):
        share = true[i].topk(top_k, -1).values.sum(-1) / true[i].sum(-1).clamp_min(1e-12)
        per_layer.append({"layer": i, **{f"recall@{k}": topk_recall(pred[i], true[i], k) for k in ks},
                          f"true_top{top_k}_norm_share": float(share.mean())})
    scales = [router_scale(p) for p in pred]
    info = {
        "source_architecture": type(dense).__name__, "experts": experts, "cluster": cluster,
        "cluster_tokens": cluster_tokens, "router_tokens": fits[0].n, "val_tokens": int(pred[0].shape[0]),
        "ridge": ridge, "router_target": "per-expert output norm ||W_down,e h_e(x)||, ridge regression",
        "router_scale": scales, "fitted_logit_std": [float(p.std(-1).mean()) for p in pred],
        "construction": "router of layer i x router_scale[i] (power of two; x 2^-40 more with all experts), "
                        "down_proj x top_k",
    }
    report = {
        **info, "recall": {f"recall@{k}": float(np.mean([r[f"recall@{k}"] for r in per_layer])) for k in ks},
        "random_recall": {f"recall@{k}": k / experts for k in ks}, "per_layer": per_layer,
        "weight_error": topk_weight_error(pred, scales, top_k),
        "seconds": {"cluster": t_cluster, "router": t_router, "total": time.time() - t0},
    }
    return build_moe(dense, perms, routers, top_k, info), report


# ---------------------------------------------------------------- entry point


def moefy(cfg: MoefyConfig, log_fn: Callable[[str], None] = log.info) -> Path:
    """MoEfy ``cfg.source`` into ``cfg.out_dir()`` (skipped when a finished one is there, unless ``force``)."""
    from routesae.models.load import resolve_device

    out = cfg.out_dir()
    if (out / "moefy.json").is_file() and (out / "config.json").is_file() and not cfg.force:
        log_fn(f"{out} already holds a MoEfied model (moefy.json); use --force to rebuild")
        return out
    device = resolve_device(cfg.device)
    dense, tok = load_model(ModelConfig(cfg.source, "float32", str(device)))
    if tok is None:
        raise ModelLoadError(f"model '{cfg.source}' has no tokenizer; MoEfication reads the corpus with it")
    train = corpus_batches(tok, cfg.corpus, "train", cfg.ctx, cfg.batch_size, cfg.seed, device)
    val = corpus_batches(tok, cfg.corpus, "val", cfg.ctx, cfg.batch_size, cfg.seed, device)
    moe, report = moefy_model(dense, train, val, cfg.experts, cfg.top_k, cfg.cluster, cfg.cluster_tokens,
                              cfg.router_tokens, cfg.val_tokens, cfg.ridge, cfg.kmeans_iters, cfg.seed, log_fn)
    moe.config.moefy["source"] = cfg.source
    report["config"] = asdict(cfg) | {"out": None}  # no machine paths in the record
    _save_folder(out, moe, tok, report)
    log_fn(f"MoEfied model saved in {out}: recall {json.dumps(report['recall'])} "
           f"(random {json.dumps(report['random_recall'])})")
    return out


def _save_folder(out: Path, moe, tok, report: dict) -> None:
    """Write the checkpoint into a temporary sibling folder, then rename it over ``out``: an
    interrupted save (or a ``--force`` rebuild) never leaves a half-written model behind."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        moe.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "moefy.json", report)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plain_sum_forward(moe) -> None:
    """Swap every experts block's forward for the exact MoEfication sum (weight 1 per selected expert).

    For measurements only: the top-k choice stays Mixtral's; ``down_proj`` carries the factor ``k``,
    removed here. Reverse with :func:`mixtral_forward`."""
    def forward(self, hidden_states, top_k_index, top_k_weights):
        k = top_k_index.shape[-1]
        return sorted_experts_forward(self, hidden_states, top_k_index, torch.full_like(top_k_weights, 1.0 / k))

    for block in decoder_layers(moe):
        block.mlp.experts.forward = types.MethodType(forward, block.mlp.experts)


def mixtral_forward(moe) -> None:
    """Undo :func:`plain_sum_forward`."""
    for block in decoder_layers(moe):
        vars(block.mlp.experts).pop("forward", None)

