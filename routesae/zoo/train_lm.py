"""Train the demo Mixture-of-Experts language model (a standard Hugging Face ``OlmoeForCausalLM``).

``python -m routesae.zoo.train_lm CORPUS --out DIR --preset demo [--resume]`` (the CLI command
``routesae zoo train-lm`` calls :func:`train_lm`).

- Data: documents of ``split="train"`` packed by :class:`routesae.corpus.ContextBuilder` into
  contexts of ``ctx`` tokens (every document starts with BOS); only full contexts are trained
  on; a new epoch reshuffles the documents (seed + epoch). Validation: a fixed slice of up to
  ``val_contexts_per_domain`` contexts per domain from ``split="val"``; each target token's loss
  is attributed to its own document's domain (BOS targets are left out).
- Loss: cross-entropy + ``aux_loss_coef`` x the Switch load-balancing loss
  (:func:`switch_balance_loss`; ``balance="per_layer"``, the default, balances each MoE layer and
  sums over layers as OLMoE and Mixtral training do; ``balance="pooled"`` is transformers'
  ``load_balancing_loss_func``, which pools all layers' router outputs first and so balances
  expert index i across layers, not each layer) + ``z_loss_coef`` x router z-loss (mean over
  layers and tokens of ``logsumexp(router_logits)^2``; transformers' OLMoE has no z-loss).
- AdamW, linear warm-up then cosine decay to ``min_lr_ratio`` x lr, gradient clipping;
  bf16 autocast on GPU.
- ``DIR/train_log.jsonl``: one line per log step (step, tokens, loss, ce, aux, z, lr, tok_s) and per
  evaluation (step, tokens, val: {domain: loss}).
- ``DIR/checkpoint/state.pt`` (written atomically and fsynced by :func:`routesae.checkpoint.save_checkpoint`):
  model, optimizer, scheduler, step, data cursor (epoch, contexts consumed in it), RNG states (as
  tensors), the config; only tensors and plain data, loaded with ``torch.load(weights_only=True)``
  (a crafted file is refused without running code). ``resume=True`` checks the fields' types and
  that the options which change the trajectory are the original ones, then continues bit-exactly.
  Without ``resume``, a DIR holding a checkpoint or a trained model is refused (nothing is
  overwritten); DIR must not be a file. These checks (:mod:`routesae.zoo.lm_resume`) run before
  anything is written.
- At the end: ``save_pretrained(DIR)`` (safetensors) + tokenizer files + ``MODEL_CARD.md`` +
  ``card.json`` (see :mod:`routesae.zoo.model_card`).

Speed on CPU: transformers' eager OLMoE experts loop indexes ``gate_up_proj[e]`` per expert, so
its backward writes a zero-filled full-size gradient per expert; ``grouped_mm`` falls back to a
slow kernel on CPU and ``batched_mm`` gathers a weight matrix per token. The trainer therefore
swaps in :func:`sorted_experts_forward` (tokens sorted by expert, one matmul pair per expert on
views from ``unbind``): the same arithmetic, loss identical to eager, gradients equal up to float
summation order (~1e-11), about 1.3x faster end to end on 2 cores. Saved models carry no trace of
it (it is set on the module instances, not in the config).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from routesae.atomic import atomic_write_json
from routesae.checkpoint import restoring, rewind_log, rng_state, save_checkpoint, set_rng_state
from routesae.corpus import ContextBuilder, CorpusConfig, iter_documents
from routesae.zoo.lm_resume import resume_state
from routesae.zoo.moe_losses import BALANCE_FORMS, router_z_loss, switch_balance_loss

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER = str(Path(__file__).resolve().parents[2] / "data" / "demo-moe")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


@dataclass
class TrainLMConfig:
    corpus: str
    out: str
    preset: str = "demo"
    tokenizer: str | None = None  # folder with tokenizer files; None = data/demo-moe
    # architecture (OlmoeConfig)
    n_layers: int = 8
    d_model: int = 192
    n_heads: int = 6
    n_experts: int = 32
    top_k: int = 4
    intermediate_size: int = 64  # per expert
    tie_embeddings: bool = False
    ctx: int = 256
    # optimisation
    batch_size: int = 16  # contexts per step
    shuffle_contexts: int = 4096  # contexts are shuffled within blocks of this many (see train_batches)
    max_tokens: int = 10_000_000  # training tokens (steps = max_tokens // (batch_size * ctx))
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    balance: str = "per_layer"  # per_layer (sum over layers of each layer's Switch loss) | pooled (transformers')
    z_loss_coef: float = 0.001
    init_std: float = 0.02
    # bookkeeping
    log_every: int = 20
    ckpt_every: int = 200
    eval_every: int = 500  # per-domain validation loss every N steps (and at the end)
    val_contexts_per_domain: int = 64
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # autocast bf16 on GPU (CPU always float32)
    threads: int | None = None  # torch threads on CPU; None = min(2, cpu count)
    experts_impl: str = "auto"  # auto (sorted on CPU, grouped_mm on GPU) | sorted | eager | grouped_mm | batched_mm
    resume: bool = False
    stop_after_steps: int | None = None  # stop early (keeps the schedule), e.g. to test resuming
    card: bool = True  # write MODEL_CARD.md and card.json at the end
    sample_tokens: int = 40  # greedy continuation length in the card

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.ctx

    @property
    def total_steps(self) -> int:
        return max(1, self.max_tokens // self.tokens_per_step)


PRESETS: dict[str, dict] = {
    # CPU demo (the shipped data/demo-moe, v2): 8 layers, d 192, 32 experts top-4 of 64 hidden units
    # each; ~13.8M parameters with vocab 8192 (untied); 14M tokens, per-layer balancing (v1: 10M tokens,
    # lr 1.5e-3, pooled balancing).
    "demo": dict(max_tokens=14_000_000, lr=2e-3),
    # for tests: runs in seconds
    "tiny": dict(n_layers=2, d_model=32, n_heads=2, n_experts=8, top_k=2, intermediate_size=16, ctx=32,
                 batch_size=4, max_tokens=4 * 32 * 16, lr=1e-2, warmup_steps=2, log_every=2, ckpt_every=4,
                 eval_every=8, val_contexts_per_domain=4, sample_tokens=8),
    # collapse demonstration: a small variant trained with the pooled balancing loss (transformers' form);
    # `routesae analyze` / `expert_tables` flag the experts it starves (docs/guide.md). A few minutes on CPU.
    "collapse": dict(n_layers=4, d_model=96, n_heads=4, n_experts=32, top_k=2, intermediate_size=32, ctx=128,
                     max_tokens=2_000_000, lr=3e-3, balance="pooled", warmup_steps=50, eval_every=200,
                     val_contexts_per_domain=16),
    # GPU: d_model 256 with tied embeddings (13.7M parameters, 55 MB in float32: the shipped model stays
    # < 60 MB), 120M tokens, bf16 autocast
    "gpu": dict(d_model=256, n_heads=4, intermediate_size=48, tie_embeddings=True, batch_size=64,
                max_tokens=120_000_000, lr=2e-3, warmup_steps=300, log_every=50, ckpt_every=500, eval_every=1000),
}


def preset_config(preset: str, corpus: str, out: str, **overrides) -> TrainLMConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset '{preset}' unknown; use one of {', '.join(PRESETS)}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainLMConfig(corpus=corpus, out=out, preset=preset, **fields)


# ---------------------------------------------------------------- model


def sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """OLMoE experts: sort (token, slot) pairs by expert, one gate/up and one down matmul per expert."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
    outs = []
    for e, x in enumerate(hidden_states.index_select(0, tok).split(counts)):
        if counts[e]:
            gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(self.act_fn(gate) * up, down[e]))
    y = torch.cat(outs) * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden_states).index_add_(0, tok, y.to(hidden_states.dtype))


def set_experts_impl(model, impl: str) -> str:
    """Use ``impl`` for every OLMoE experts block; ``sorted`` patches the instances (config untouched)."""
    for layer in model.model.layers:
        experts = layer.mlp.experts
        if impl == "sorted":
            experts.forward = types.MethodType(sorted_experts_forward, experts)
        elif "forward" in vars(experts):
            del experts.forward
    if impl != "sorted":
        model.set_experts_implementation(impl)
    return impl


def build_model(cfg: TrainLMConfig, tokenizer):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    mc = OlmoeConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=False,
        max_position_embeddings=cfg.ctx * 16, tie_word_embeddings=cfg.tie_embeddings,
        router_aux_loss_coef=cfg.aux_loss_coef, output_router_logits=False, initializer_range=cfg.init_std,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        architectures=["OlmoeForCausalLM"],
    )
    torch.manual_seed(cfg.seed)
    return OlmoeForCausalLM(mc)


def count_params(model) -> dict[str, int]:
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.model.embed_tokens.weight.numel()
    active = total - experts + experts * c.num_experts_per_tok // c.num_experts
    return {"total": total, "experts": experts, "embedding": embed, "active_per_token": active,
            "non_embedding": total - embed * (1 if c.tie_word_embeddings else 2)}


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or DEFAULT_TOKENIZER)
    if tok.bos_token_id is None:
        raise ValueError(f"tokenizer at {path or DEFAULT_TOKENIZER} has no BOS token; documents must start with one")
    return tok


# ---------------------------------------------------------------- data


def train_batches(cfg: TrainLMConfig, tokenizer, epoch: int, skip: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, contexts consumed after this batch, ids[b, ctx]) forever; full contexts and batches only.

    Consecutive contexts of a long document are spread out: the packed stream is cut into blocks of
    ``shuffle_contexts`` contexts and each block is permuted (seeded by seed, epoch, block), so a
    batch mixes documents. ``skip`` counts contexts in this emitted order (the resume cursor).
    """
    while True:
        docs = iter_documents(CorpusConfig(path=cfg.corpus, split="train", seed=cfg.seed + epoch))
        builder = ContextBuilder(tokenizer, cfg.ctx, packing="pack")
        full = (ids for ids, _, _ in builder.contexts(docs) if len(ids) == cfg.ctx)
        rows, done, block_i = [], 0, 0
        while True:
            block = [ids for _, ids in zip(range(cfg.shuffle_contexts), full)]
            if not block:
                break
            perm = np.random.default_rng([cfg.seed, epoch, block_i]).permutation(len(block))
            block_i += 1
            for j in perm:
                done += 1
                if done <= skip:
                    continue
                rows.append(block[j])
                if len(rows) == cfg.batch_size:
                    yield epoch, done, np.stack(rows)
                    rows = []
        if done < cfg.batch_size and skip == 0:
            raise ValueError(f"the train split of {cfg.corpus} gives {done} full contexts of {cfg.ctx} tokens; "
                             f"need at least batch_size={cfg.batch_size}")
        epoch, skip = epoch + 1, 0


@dataclass
class ValSlice:
    """Fixed validation contexts: ids/mask [n, ctx], per-token domain index (-1 = pad), domain names."""

    ids: np.ndarray
    mask: np.ndarray
    dom: np.ndarray
    pos: np.ndarray
    domains: list[str]
    first_docs: dict[str, list[str]]  # per domain, texts of its first validation documents (prompts)


def val_slice(cfg: TrainLMConfig, tokenizer) -> ValSlice:
    docs = list(iter_documents(CorpusConfig(path=cfg.corpus, split="val", seed=cfg.seed)))
    builder = ContextBuilder(tokenizer, cfg.ctx, packing="pack")
    first_docs: dict[str, list[str]] = {}
    for d in docs:
        if len(first_docs.setdefault(d.domain, [])) < 2:
            first_docs[d.domain].append(d.text)
    domains = sorted(first_docs)
    di = {d: i for i, d in enumerate(domains)}
    have = dict.fromkeys(domains, 0)
    rows = []
    for ids, doc, pos in builder.contexts(docs):
        doms = np.array([di[builder.doc_domains[j]] for j in doc], np.int64)
        major = domains[np.bincount(doms).argmax()]
        if have[major] < cfg.val_contexts_per_domain:
            have[major] += 1
            rows.append((ids, doms, pos))
        if all(v >= cfg.val_contexts_per_domain for v in have.values()):
            break
    n = len(rows)
    ids = np.full((n, cfg.ctx), tokenizer.pad_token_id or 0, np.int64)
    mask, posa = np.zeros((n, cfg.ctx), np.int64), np.zeros((n, cfg.ctx), np.int64)
    dom = np.full((n, cfg.ctx), -1, np.int64)
    for i, (a, b, c) in enumerate(rows):
        ids[i, :len(a)], mask[i, :len(a)], dom[i, :len(a)], posa[i, :len(a)] = a, 1, b, c
    return ValSlice(ids, mask, dom, posa, domains, first_docs)


@torch.no_grad()
def val_losses(model, vs: ValSlice, device, batch: int = 8, autocast=None) -> dict[str, dict]:
    """Per-domain mean next-token cross-entropy (nats) over non-BOS target tokens of the slice."""
    was = model.training
    model.eval()
    sums = np.zeros(len(vs.domains))
    counts = np.zeros(len(vs.domains), np.int64)
    for s in range(0, len(vs.ids), batch):
        ids = torch.from_numpy(vs.ids[s:s + batch]).to(device)
        mask = torch.from_numpy(vs.mask[s:s + batch]).to(device)
        with autocast() if autocast else torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none").cpu().numpy()
        dom, pos = vs.dom[s:s + batch, 1:], vs.pos[s:s + batch, 1:]
        keep = (dom >= 0) & (pos > 0)
        np.add.at(sums, dom[keep], ce[keep])
        np.add.at(counts, dom[keep], 1)
    model.train(was)
    return {d: {"loss": float(sums[i] / max(counts[i], 1)), "tokens": int(counts[i])} for i, d in enumerate(vs.domains)}


# ---------------------------------------------------------------- training


def _lr_lambda(cfg: TrainLMConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _optimizer(cfg: TrainLMConfig, model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


def _append_log(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def train_lm(cfg: TrainLMConfig) -> Path:
    """Train (or resume) and save the model folder; returns ``Path(cfg.out)``."""
    out = Path(cfg.out)
    resumed = resume_state(cfg, out)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or min(2, os.cpu_count() or 1))
    use_bf16 = cfg.bf16 and device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    tokenizer = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, tokenizer).to(device)
    impl = cfg.experts_impl if cfg.experts_impl != "auto" else ("sorted" if device.type == "cpu" else "grouped_mm")
    set_experts_impl(model, impl)
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    params = count_params(model)
    log_path = out / "train_log.jsonl"

    step, epoch, consumed, elapsed = 0, 0, 0, 0.0
    if resumed is not None:
        st, ckpt_dir = resumed
        with restoring(ckpt_dir):
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            set_rng_state(st["rng"])
        step, epoch, consumed, elapsed = st["step"], st["epoch"], st["consumed"], float(st["elapsed"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "train_config.json", dataclasses.asdict(cfg))
    if resumed is not None:
        rewind_log(log_path, step)
        log.info("resumed from %s at step %d (epoch %d, %d contexts in it)", ckpt_dir, step, epoch, consumed)
    elif log_path.exists():
        log_path.unlink()
    print(f"[train-lm] OlmoeForCausalLM {params['total'] / 1e6:.2f}M params ({params['active_per_token'] / 1e6:.2f}M "
          f"active/token), {cfg.total_steps} steps x {cfg.tokens_per_step} tokens, experts={impl}, device={device}",
          flush=True)

    vs = val_slice(cfg, tokenizer)
    model.train()
    data = train_batches(cfg, tokenizer, epoch, consumed)
    win = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0, "n": 0}
    t_win, tok_win, paused = time.time(), 0, 0.0
    while step < cfg.total_steps:
        if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
            break
        epoch, consumed, batch = next(data)
        ids = torch.from_numpy(batch).to(device)
        with autocast():
            o = model(input_ids=ids, output_router_logits=True)
            ce_t = F.cross_entropy(o.logits[:, :-1].float().reshape(-1, o.logits.shape[-1]), ids[:, 1:].reshape(-1))
            aux_t = switch_balance_loss(o.router_logits, cfg.top_k, cfg.balance)
            z = router_z_loss(o.router_logits)
            loss = ce_t + cfg.aux_loss_coef * aux_t + cfg.z_loss_coef * z
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        tok_win += ids.numel()
        ce = ce_t.item()
        aux = aux_t.item() / (cfg.n_layers if cfg.balance == "per_layer" else 1)  # logged per layer: top_k = balanced
        for k, v in (("loss", loss.item()), ("ce", ce), ("aux", aux), ("z", z.item())):
            win[k] += v
        win["n"] += 1
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            dt = time.time() - t_win - paused
            elapsed += dt
            rec = {"step": step, "tokens": step * cfg.tokens_per_step, "epoch": epoch,
                   **{k: round(win[k] / win["n"], 5) for k in ("loss", "ce", "aux", "z")},
                   "lr": sched.get_last_lr()[0], "tok_s": round(tok_win / max(dt, 1e-9), 1),
                   "elapsed_s": round(elapsed, 1)}
            _append_log(log_path, rec)
            print(json.dumps(rec), flush=True)
            win = dict.fromkeys(win, 0.0) | {"n": 0}
            t_win, tok_win, paused = time.time(), 0, 0.0
        t_pause = time.time()  # evaluation and checkpoint time is not training throughput
        if step % cfg.eval_every == 0 or step == cfg.total_steps:
            rec = {"step": step, "tokens": step * cfg.tokens_per_step,
                   "val": {d: round(v["loss"], 5) for d, v in val_losses(model, vs, device, autocast=autocast).items()}}
            _append_log(log_path, rec)
            print(json.dumps(rec), flush=True)
        if step % cfg.ckpt_every == 0 or step == cfg.total_steps:
            save_checkpoint(out, None, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "epoch": epoch, "consumed": consumed, "elapsed": elapsed, "rng": rng_state(),
                "total_steps": cfg.total_steps, "tokens_per_step": cfg.tokens_per_step,
                "config": dataclasses.asdict(cfg)})
        paused += time.time() - t_pause
    if step < cfg.total_steps:
        print(f"[train-lm] stopped at step {step}/{cfg.total_steps}; continue with --resume", flush=True)
        return out

    model.config.output_router_logits = False
    model.save_pretrained(out, safe_serialization=True)
    src = Path(cfg.tokenizer or DEFAULT_TOKENIZER)
    if src.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, out / name)
    if cfg.card:
        from routesae.zoo.model_card import write_model_card

        write_model_card(model, tokenizer, cfg, vs, out, params=params, device=device)
    print(f"[train-lm] saved {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m routesae.zoo.train_lm", description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--intermediate-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--balance", default=None, choices=BALANCE_FORMS)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--experts-impl", default=None)
    ap.add_argument("--stop-after-steps", type=int, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = preset_config(a.preset, a.corpus, a.out, resume=a.resume, tokenizer=a.tokenizer, max_tokens=a.max_tokens,
                        batch_size=a.batch_size, d_model=a.d_model, intermediate_size=a.intermediate_size, lr=a.lr,
                        balance=a.balance,
                        device=a.device, threads=a.threads, experts_impl=a.experts_impl,
                        stop_after_steps=a.stop_after_steps)
    train_lm(cfg)


if __name__ == "__main__":
    main()
