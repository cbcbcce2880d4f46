"""Train an SAE (TopK, RouteSAE or MLSAE) on a store: schedule, checkpoints, resume, signals, DDP.

``train(TrainConfig(store=..., out=...)) -> RUN``. The run folder::

    config.json, sae.safetensors   the SAE (save_pretrained; at every checkpoint and at the end)
    train_config.json              the TrainConfig, the resolved defaults and a store summary (path,
                                   content identity, model, layers, tokens)
    metrics.jsonl                  one line per log step (see ``_log_record``)
    checkpoint/                    see routesae/checkpoint.py
    eval_store.json                with ``eval_store``: the held-out store evaluate/analyze read by default
                                   (checked before anything is written: same model and layers, and not
                                   the training data; see routesae/heldout.py)

Resolved defaults (written to ``train_config.json["resolved"]``):
- topk ``layer``: block ``round(0.75 * n_layers) - 1`` of the captured model (block 11 of 16, the
  paper's baseline), or the captured layer nearest to it (the deeper one on a tie).
- routesae/mlsae ``layers``: every captured layer. ``latents = expansion * d_model``.
- ``lr = 2e-4 / sqrt(latents / 2**14)`` (REFERENCE §3). ``tokens``: the store's token count, i.e.
  ``steps = tokens // batch_tokens`` (the stream runs on into the next epoch for the rows that
  the shuffle buffers drop).
- ``dead_tokens = max(batch_tokens, min(10M, tokens // 10))`` tokens, times L' for MLSAE (whose
  examples are (token, layer) pairs).
- the store is re-hashed against its manifest before training when its shards total at most
  1 GiB (``verify="auto"``; "always"/"never" force it); rows read as non-finite stop training
  with a one-line StoreError naming the shard.

Resume: ``resume=True`` continues from ``RUN/checkpoint`` (step, optimiser, RNG states, dead-latent
counters, the metrics window); the data cursor is ``start_batch=step`` of the seeded stream, so a
resumed run equals the uninterrupted one bit for bit on CPU (tests/test_train.py), also after a
``kill -9`` (tests/test_bad_inputs_train.py). Before anything is written, routesae/run_guard.py
checks ``--out`` (a file, a store or a non-empty folder without a run is refused, a run needs
``--resume``) and, on resume, the checkpoint (``torch.load(weights_only=True)``, field types, the
original options) and the store: its content identity (:meth:`Store.identity`, recorded in the
checkpoint and in ``train_config.json``) must be the one the run was trained on, so a moved or
renamed copy is accepted and a store with other data is refused.

DDP: under ``torchrun`` (``WORLD_SIZE`` > 1) every rank reads the same global batch of
``batch_tokens`` rows and keeps rows ``rank::world_size``; gradients are averaged by
DistributedDataParallel, the dead-latent counters are all-reduced inside the forward pass (so
AuxK sees the global firing), only rank 0 writes. Gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from .atomic import atomic_write_json
from .checkpoint import StopOnSignal, load_state, restoring, rewind_log, rng_state, save_checkpoint, set_rng_state
from .heldout import check_eval_store, record_eval_store, store_record
from .recipe import B_PRE_INITS, CENTER_INITS, DECODER_NORMS, ENC_INITS, DecoderConstraint
from .run_guard import check_out, check_restart, check_resume
from .sae import SAEConfig, SparseAutoencoder, build_sae
from .sae.config import ARCHS
from .sae.route_stats import margin_sum, routing_summary
from .schedule import lr_at
from .store import Store
from .train_setup import Dist, batches, initial_sae, resolve, seed_everything, sync_firing, verify_store

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss (or a parameter) became nan/inf; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: a checkpoint was written; the message says how to resume."""


@dataclass
class TrainConfig:
    """Options of ``routesae train STORE --out RUN`` (defaults resolved as the module docstring says)."""

    store: str
    out: str
    arch: str = "routesae"
    k: int = 32
    expansion: int = 8
    latents: int | None = None
    layer: int | None = None
    layers: list[int] | None = None
    routing: str = "hard"
    pooling: str = "sum"
    router: str = "ste"  # the paper's is "faithful" (the reference recipe's); see docs/RESULTS.md, routing study
    tokens: int | None = None
    batch_tokens: int = 4096
    lr: float | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 6.25e-10
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_tokens: int | None = None
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 20
    resume: bool = False
    device: str = "auto"
    wandb: bool = False
    progress: bool = True
    buffer_shards: int = 2
    init_samples: int = 32768
    verify: str = "auto"
    eval_store: str | None = None  # a held-out store recorded in RUN/eval_store.json (routesae/heldout.py)
    b_pre_init: str = "median"  # the recipe options of routesae/recipe.py (default recipe shown)
    enc_init: str = "fit"
    center_init: str = "median"  # RouteSAE only; the other architectures have no layer centres
    decoder_norm: str = "project"
    renorm_every: int = 10
    route_balance: float = 0.0  # RouteSAE: weight of the layer-balance loss (routesae/sae/route.py)

    def validate(self) -> TrainConfig:
        """Raise a one-line ``ValueError`` naming the bad option; return self."""
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if self.arch not in ARCHS:
            bad(f"unknown --arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.k < 1:
            bad(f"--k {self.k} must be at least 1")
        if self.latents is None and self.expansion < 1:
            bad(f"--expansion {self.expansion} must be at least 1")
        if self.latents is not None and self.latents < 1:
            bad(f"--latents {self.latents} must be at least 1")
        if self.layer is not None and self.arch != "topk":
            bad(f"--layer is for --arch topk; {self.arch} reads several layers (use layers=[...])")
        if self.layers is not None and self.arch == "topk":
            bad("--arch topk reads one layer; pass --layer instead of layers")
        if self.batch_tokens < 1 or (self.tokens is not None and self.tokens < self.batch_tokens):
            bad(f"--tokens {self.tokens} must be at least --batch-tokens {self.batch_tokens} (>= 1)")
        if self.lr is not None and not self.lr > 0:
            bad(f"--lr {self.lr} must be positive")
        if not (0 <= self.warmup_frac <= 1 and 0 <= self.decay_frac <= 1 and self.warmup_frac + self.decay_frac <= 1):
            bad(f"warmup_frac={self.warmup_frac} and decay_frac={self.decay_frac} must be in [0, 1] with sum <= 1")
        if self.ckpt_every < 1 or self.log_every < 1 or self.buffer_shards < 1 or self.init_samples < 1:
            bad("ckpt_every, log_every, buffer_shards and init_samples must be at least 1")
        for name, allowed in (("b_pre_init", B_PRE_INITS), ("enc_init", ENC_INITS), ("center_init", CENTER_INITS),
                              ("decoder_norm", DECODER_NORMS)):
            if getattr(self, name) not in allowed:
                bad(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.renorm_every < 1:
            bad(f"--renorm-every {self.renorm_every} must be at least 1")
        if not (math.isfinite(self.route_balance) and self.route_balance >= 0):
            bad(f"--route-balance {self.route_balance} must be a finite number >= 0")
        if self.route_balance > 0 and self.arch != "routesae":
            bad(f"--route-balance balances RouteSAE's layers; --arch {self.arch} has no router (drop it)")
        if self.verify not in ("auto", "always", "never"):
            bad(f"unknown verify {self.verify!r}; choose auto, always or never")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad(f"unknown --device {self.device!r}; use auto, cpu, cuda or cuda:N")
        return self


def _new_window(n_layers: int) -> dict[str, Any]:
    """Sums over the steps since the last log line; ``route``: summed router margin, summed balance loss."""
    return {"steps": 0, "sums": [0.0, 0.0, 0.0, 0.0], "hist": torch.zeros(n_layers, dtype=torch.int64),
            "route": [0.0, 0.0]}


def _log_record(step: int, cfg: TrainConfig, lr: float, win: dict, hist: bool, sae: SparseAutoencoder,
                seconds: float, rows: int) -> dict[str, Any]:
    """One metrics.jsonl line: window means of loss, nmse (recon), aux, l0 (non-zero latents/example);
    RouteSAE also the window's routed-layer counts and fractions, their normalised entropy, the mean
    router margin p_top1 - p_top2 and the mean layer-balance loss (routesae/sae/route_stats.py)."""
    n = max(win["steps"], 1)
    loss, recon, aux, l0 = (s / n for s in win["sums"])
    rec = {"step": step, "tokens": step * cfg.batch_tokens, "lr": lr, "loss": loss, "nmse": recon, "aux": aux,
           "l0": l0, "dead_frac": sae.dead_mask().float().mean().item(),
           "routed_hist": win["hist"].tolist() if hist else None,
           "tokens_per_s": rows / seconds if seconds > 0 else None}
    if hist:
        margin, balance = win.get("route", [0.0, 0.0])
        summary = routing_summary(win["hist"], margin)
        rec.update(routed_frac=summary["fractions"], routed_entropy=summary["entropy"],
                   router_margin=summary["margin"], route_balance_loss=balance / n)
    return rec


def train(cfg: TrainConfig, callback: Callable[[int, SparseAutoencoder, dict], None] | None = None) -> Path:
    """Train, checkpoint and save an SAE; returns the run folder ``cfg.out``.

    ``callback(step, sae, record)`` runs after every step (``record``: this step's means, or the
    metrics line on a log step); tests use it to send signals or damage parameters.
    Raises TrainingDiverged (nan/inf), TrainingInterrupted (SIGINT/SIGTERM, after a checkpoint),
    StoreError/ValueError (bad inputs, one line).
    """
    cfg.validate()
    dev_name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dist = Dist.from_env(cuda=dev_name.startswith("cuda"))
    try:
        return _train(cfg, dist, callback, dev_name)
    finally:
        if dist.owned:
            tdist.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist, callback, dev_name: str) -> Path:
    device = torch.device(f"cuda:{dist.local_rank}" if dev_name == "cuda" and dist.world > 1 else dev_name)
    out, main = Path(cfg.out), dist.rank == 0
    wandb_module = _import_wandb(cfg, main)
    store = Store(cfg.store)
    r = resolve(cfg, store, dist.world)
    ckpt = check_out(out, cfg.resume)
    sae_cfg = SAEConfig(arch=cfg.arch, d_in=store.d_model, n_latents=r["latents"], k=cfg.k, layers=r["layers"],
                        routing=cfg.routing, pooling=cfg.pooling, aux_k=cfg.aux_k,
                        router="faithful" if cfg.routing == "soft" else cfg.router,  # ste = soft's gradient already
                        aux_coef=cfg.aux_coef, dead_tokens=r["dead_tokens"], route_balance=cfg.route_balance,
                        meta={"model": store.manifest.get("model", {}).get("name_or_path"),
                              "store": str(store.root)}).validate()
    identity = store.identity()
    held = check_eval_store(cfg.eval_store, store, r["layers"]) if cfg.eval_store else None
    state: dict[str, Any] | None = None
    if ckpt is not None:
        state = load_state(ckpt)
        saved_sae = check_resume(cfg, state, ckpt, store, sae_cfg)
    else:
        check_restart(cfg, out, store)
    verify_store(cfg, store)
    if state is None:
        sae = initial_sae(cfg, sae_cfg, store, r, device)
    else:
        seed_everything(cfg.seed)
        sae = build_sae(sae_cfg)
        sae.load_state_dict(saved_sae.state_dict())
        sae.to(device).train()
    constraint = DecoderConstraint(cfg.decoder_norm, cfg.renorm_every)
    opt = torch.optim.Adam(sae.parameters(), lr=r["lr"], betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    step, total = 0, r["steps"]
    win = _new_window(len(r["layers"]))
    if state is not None:
        with restoring(ckpt):
            opt.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
        step, win = int(state["step"]), state["window"]
    model: torch.nn.Module = sae
    if dist.world > 1:
        sync_firing(sae, dist)
        ddp = torch.nn.parallel.DistributedDataParallel  # counters are synced by _sync_firing, not by DDP
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else "broadcast_buffers")
        model = ddp(sae, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            summary = {k: store.manifest.get(k) for k in ("model", "layers", "tokens", "d_model", "n_layers")}
            rec = store_record(store)
            atomic_write_json(out / "train_config.json", {**asdict(cfg), "resolved": r, "store_summary": {
                "path": str(store.root), "identity": identity, **summary,
                **{k: rec[k] for k in ("corpus_fingerprint", "split")}}})
        if held is not None:
            record_eval_store(out, held)
        rewind_log(out / "metrics.jsonl", step)
    if step >= total:
        log.info("%s already finished (%d steps)", out, total)
        return out

    def checkpoint() -> None:
        if any(not torch.isfinite(p).all() for p in sae.parameters()):
            raise TrainingDiverged(f"parameters became non-finite at step {step}; {last_good()}; lower --lr")
        if main:
            save_checkpoint(out, sae, {"step": step, "total_steps": total, "optimizer": opt.state_dict(),
                                       "rng": rng_state(), "window": win, "train_config": asdict(cfg),
                                       "store_identity": identity})
            sae.save_pretrained(out)
        if dist.world > 1:
            tdist.barrier()
        saved[0] = step

    def last_good() -> str:
        return (f"the last good checkpoint is {out / 'checkpoint'} (step {saved[0]})" if saved[0] is not None
                else "no checkpoint was written yet")

    saved: list[int | None] = [step if state is not None else None]
    wandb = _wandb(wandb_module, cfg, r, out)
    bar = _progress(cfg, main, total, step)
    stream = batches(store, cfg, r, step)
    t0, rows0 = time.perf_counter(), 0
    hist_on, n_pos = cfg.arch == "routesae", len(r["layers"])
    metrics = open(out / "metrics.jsonl", "a") if main else None
    try:
        with StopOnSignal() as signals:
            while step < total:
                resid = next(stream)
                resid = resid[dist.rank::dist.world] if dist.world > 1 else resid
                resid = resid.to(device, non_blocking=True)
                lr = lr_at(step, total, r["lr"], cfg.warmup_frac, cfg.decay_frac)
                for g in opt.param_groups:
                    g["lr"] = lr
                o = model(resid)
                l0 = (o.top_val > 0).sum(-1).float().mean()
                route = l0.new_zeros(0)
                if hist_on:  # summed margin, balance loss (a mean per rank), routed-layer histogram
                    bal = o.balance_loss.detach() / dist.world
                    route = torch.cat([torch.stack([margin_sum(o.router_probs), bal]),
                                       torch.bincount(o.routed_layer, minlength=n_pos).float()])
                stats = torch.cat([torch.stack([o.loss.detach(), o.recon_loss.detach(), o.aux_loss.detach(), l0,
                                                torch.tensor(float(signals.flag), device=device)]), route])
                vals = dist.all_sum(stats).tolist()  # one collective: summed means, flag, routing sums
                vals[:5] = [v / dist.world for v in vals[:5]]
                if not math.isfinite(vals[0]):
                    raise TrainingDiverged(f"loss became {vals[0]} at step {step + 1}; {last_good()}; lower --lr")
                o.loss.backward()
                constraint.after_backward(sae)
                opt.step()
                constraint.after_step(sae, step + 1)
                opt.zero_grad(set_to_none=True)
                step += 1
                rows0 += cfg.batch_tokens
                win["steps"] += 1
                win["sums"] = [a + b for a, b in zip(win["sums"], vals[:4])]
                if hist_on:
                    win["route"] = [a + b for a, b in zip(win.setdefault("route", [0.0, 0.0]), vals[5:7])]
                    win["hist"] += torch.tensor([round(v) for v in vals[7:]], dtype=torch.int64)
                record = dict(zip(("loss", "nmse", "aux", "l0"), vals[:4]), step=step, lr=lr)
                if step % cfg.log_every == 0 or step == total:
                    record = _log_record(step, cfg, lr, win, hist_on, sae, time.perf_counter() - t0, rows0)
                    win, t0, rows0 = _new_window(n_pos), time.perf_counter(), 0
                    if main:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                        if wandb is not None:
                            wandb.log(record, step=step)
                    if bar is not None:
                        bar.set_postfix(tok_s=f"{record['tokens_per_s'] or 0:.3g}", nmse=f"{record['nmse']:.4f}",
                                        l0=f"{record['l0']:.1f}")
                if bar is not None:
                    bar.update(1)
                if step % cfg.ckpt_every == 0 or step == total:
                    checkpoint()
                if callback is not None:
                    callback(step, sae, record)
                stop = signals.flag if dist.world == 1 else vals[4] > 0
                if stop and step < total:
                    if saved[0] != step:
                        checkpoint()
                    raise TrainingInterrupted(f"stopped at step {step} of {total}; checkpoint in "
                                              f"{out / 'checkpoint'}; continue with --resume")
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
        if wandb is not None:
            wandb.finish()
    return out


def _progress(cfg: TrainConfig, main: bool, total: int, step: int):
    if not (cfg.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, unit="step", desc=f"train {cfg.arch}", dynamic_ncols=True)


def _import_wandb(cfg: TrainConfig, main: bool):
    if not (cfg.wandb and main):
        return None
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package; pip install wandb (or drop --wandb)") from None
    return wandb


def _wandb(wandb, cfg: TrainConfig, r: dict, out: Path):
    if wandb is None:
        return None
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "routesae"), name=out.name, dir=str(out),
                      config={**asdict(cfg), "resolved": r})


__all__ = ["TrainConfig", "TrainingDiverged", "TrainingInterrupted", "train", "lr_at"]
