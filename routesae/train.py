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

The loop (:func:`run_loop`) takes a list of SAEs (:class:`Trainee`: :func:`check_run` checks a run
before anything is written, :func:`start_run` builds or restores it) and an iterator of batches:
one SAE on a store here, the SAEs of a sweep on one read of a store in routesae/train_many.py,
and online from a model's forward pass in routesae/online.py.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from .atomic import atomic_write_json
from .checkpoint import StopOnSignal, load_state, restoring, rewind_log, rng_state, save_checkpoint, set_rng_state
from .heldout import check_eval_store, record_eval_store
from .recipe import B_PRE_INITS, CENTER_INITS, DECODER_NORMS, ENC_INITS, DecoderConstraint
from .run_guard import check_out, check_restart, check_resume, read_train_config
from .sae import SAEConfig, SparseAutoencoder, build_sae
from .sae.config import ARCHS
from .sae.route_stats import margin_sum, routing_summary
from .schedule import lr_at
from .store import Store
from .train_setup import (
    Dist,
    batches,
    import_wandb,
    initial_sae,
    process_group,
    progress_bar,
    ranked,
    resolve,
    seed_everything,
    store_summary,
    sync_firing,
    verify_store,
    wandb_run,
)

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
    dev_name = device_name(cfg.device)
    with process_group(cuda=dev_name.startswith("cuda")) as dist:
        return _train(cfg, dist, callback, dev_name)


def device_name(device: str) -> str:
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def rank_device(dev_name: str, dist: Dist) -> torch.device:
    """The SAE's device in this process (``cuda:LOCAL_RANK`` under torchrun)."""
    return torch.device(f"cuda:{dist.local_rank}" if dev_name == "cuda" and dist.world > 1 else dev_name)


def _train(cfg: TrainConfig, dist: Dist, callback, dev_name: str) -> Path:
    device = rank_device(dev_name, dist)
    wandb_module = import_wandb(cfg, dist.rank == 0)
    store = Store(cfg.store)
    plan = check_run(cfg, store, dist.world)
    verify_store(cfg, store)
    t = start_run(plan, store, dist, device, extra=lambda: {"store_identity": plan.identity})
    if t.step >= t.total:
        log.info("%s already finished (%d steps)", t.out, t.total)
        return t.out
    run_loop([t], ranked(batches(store, cfg, plan.r, t.step), dist), dist, device, callback, wandb_module)
    return t.out


@dataclass
class RunPlan:
    """What the checks of one run found, before anything is written (:func:`check_run`)."""

    cfg: TrainConfig
    r: dict[str, Any]
    sae_cfg: SAEConfig
    identity: str
    held: dict[str, Any] | None
    ckpt: Path | None
    state: dict[str, Any] | None
    saved_sae: SparseAutoencoder | None


def check_run(cfg: TrainConfig, store: Any, world: int, meta: dict[str, Any] | None = None,
              check_source: Callable[[dict[str, Any], str], None] | None = None) -> RunPlan:
    """Every check of one run that writes nothing: defaults against the store, ``--out``, the checkpoint.

    ``store``: a :class:`Store`, or a view with the same description (routesae/online.py).
    ``check_source(saved, where)``: extra checks of what a checkpoint (or an early ``train_config.json``)
    recorded, for online runs.
    """
    r = resolve(cfg, store, world)
    out = Path(cfg.out)
    ckpt = check_out(out, cfg.resume)
    meta = meta if meta is not None else {"model": store.manifest.get("model", {}).get("name_or_path"),
                                          "store": str(store.root)}
    sae_cfg = SAEConfig(arch=cfg.arch, d_in=store.d_model, n_latents=r["latents"], k=cfg.k, layers=r["layers"],
                        routing=cfg.routing, pooling=cfg.pooling, aux_k=cfg.aux_k,
                        router="faithful" if cfg.routing == "soft" else cfg.router,  # ste = soft's gradient already
                        aux_coef=cfg.aux_coef, dead_tokens=r["dead_tokens"], route_balance=cfg.route_balance,
                        meta=meta).validate()
    identity = store.identity()
    held = check_eval_store(cfg.eval_store, store, r["layers"]) if cfg.eval_store else None
    state = load_state(ckpt) if ckpt is not None else None
    saved = state if state is not None else read_train_config(out)
    if saved is not None and check_source is not None:
        check_source(saved, str(ckpt / "state.pt" if ckpt else out / "train_config.json"))
    elif saved is not None and saved.get("online"):
        raise ValueError(f"{out} was trained online; resume it with routesae train --model MODEL --corpus CORPUS "
                         f"(and its other options) --resume")
    saved_sae = None
    if state is not None:
        saved_sae = check_resume(cfg, state, ckpt, store, sae_cfg)
    else:
        check_restart(cfg, out, store)
    return RunPlan(cfg, r, sae_cfg, identity, held, ckpt, state, saved_sae)


@dataclass
class Trainee:
    """One SAE in training: its options, run folder, optimiser, step and metrics window (:func:`start_run`)."""

    cfg: TrainConfig
    r: dict[str, Any]
    out: Path
    sae: SparseAutoencoder
    model: torch.nn.Module  # the SAE, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    constraint: DecoderConstraint
    step: int
    total: int
    win: dict[str, Any]
    saved: int | None  # the step of the last checkpoint written (or resumed from)
    extra: Callable[[], dict[str, Any]]  # the data cursor's fields of each checkpoint (called on every rank)
    select: Callable[[torch.Tensor], torch.Tensor] | None = None  # this SAE's input from a shared batch
    failed: str | None = None
    metrics: Any = None
    wandb: Any = None
    t0: float = 0.0
    rows: int = 0

    def last_good(self) -> str:
        return (f"the last good checkpoint is {self.out / 'checkpoint'} (step {self.saved})" if self.saved is not None
                else "no checkpoint was written yet")

    def checkpoint(self, dist: Dist) -> None:
        if any(not torch.isfinite(p).all() for p in self.sae.parameters()):
            raise TrainingDiverged(f"parameters became non-finite at step {self.step}; {self.last_good()}; "
                                   f"lower --lr")
        extra = self.extra()
        if dist.rank == 0:
            save_checkpoint(self.out, self.sae, {"step": self.step, "total_steps": self.total,
                                                 "optimizer": self.opt.state_dict(), "rng": rng_state(),
                                                 "window": self.win, "train_config": asdict(self.cfg), **extra})
            self.sae.save_pretrained(self.out)
        if dist.world > 1:
            tdist.barrier()
        self.saved = self.step


def start_run(plan: RunPlan, store: Any, dist: Dist, device: torch.device, extra: Callable[[], dict[str, Any]],
              summary: dict[str, Any] | None = None, sample: Callable[[int], torch.Tensor] | None = None,
              config_extra: dict[str, Any] | None = None) -> Trainee:
    """Build (or restore) the SAE and its optimiser and write the run's first files (rank 0).

    ``sample(n)``: the first ``n`` input rows for the initialisation (default: a seeded sample of
    ``store``); with it, DDP ranks take rank 0's initial SAE. ``summary``: the store summary of
    ``train_config.json`` (default: ``store``'s); ``config_extra``: more top-level keys there.
    """
    cfg, r, state = plan.cfg, plan.r, plan.state
    out, main = Path(cfg.out), dist.rank == 0
    if state is None:
        sae = initial_sae(cfg, plan.sae_cfg, store, r, device, sample)
        if sample is not None and dist.world > 1:  # each rank sampled its own rows: take rank 0's SAE
            for tensor in sae.state_dict().values():
                tdist.broadcast(tensor, 0)
    else:
        seed_everything(cfg.seed)
        sae = build_sae(plan.sae_cfg)
        sae.load_state_dict(plan.saved_sae.state_dict())
        sae.to(device).train()
    constraint = DecoderConstraint(cfg.decoder_norm, cfg.renorm_every)
    opt = torch.optim.Adam(sae.parameters(), lr=r["lr"], betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    step, win = 0, _new_window(len(r["layers"]))
    if state is not None:
        with restoring(plan.ckpt):
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
            atomic_write_json(out / "train_config.json", {
                **asdict(cfg), "resolved": r, **(config_extra or {}),
                "store_summary": summary if summary is not None else store_summary(store, plan.identity)})
        if plan.held is not None:
            record_eval_store(out, plan.held)
        rewind_log(out / "metrics.jsonl", step)
    return Trainee(cfg, r, out, sae, model, opt, constraint, step, r["steps"], win,
                   step if state is not None else None, extra)


def run_loop(trainees: list[Trainee], stream: Iterator[torch.Tensor], dist: Dist, device: torch.device,
             callback: Callable[[int, SparseAutoencoder, dict], None] | None = None, wandb_module: Any = None,
             keep_going: bool = False, where: str | None = None) -> None:
    """Train every SAE of ``trainees`` on the batches of ``stream`` (this process's rows) until the last step.

    All trainees share the step count and the stream, which starts at the smallest step among them;
    a trainee resumed from a later checkpoint skips the batches it already trained on. With
    ``keep_going``, a trainee whose loss diverges stops (``trainee.failed``) and the others go on;
    otherwise TrainingDiverged is raised at once. ``where`` names the checkpoints in the message of
    TrainingInterrupted (default: the one trainee's).
    """
    main, first = dist.rank == 0, trainees[0]
    total = first.total
    step = min(t.step for t in trainees)
    for t in trainees:
        t.wandb = wandb_run(wandb_module, t.cfg, t.r, t.out)
        t.metrics = open(t.out / "metrics.jsonl", "a") if main else None
    bar = progress_bar(first.cfg, main, total, step, len(trainees))
    for t in trainees:
        t.t0, t.rows = time.perf_counter(), 0
    try:
        with StopOnSignal() as signals:
            while step < total and any(t.failed is None for t in trainees):
                batch = next(stream).to(device, non_blocking=True)
                flags = []
                for t in trainees:
                    if t.failed is not None or t.step != step:
                        continue  # stopped, or resumed from a later checkpoint: skips the batches it trained on
                    try:
                        flags.append(_step(t, batch, dist, device, signals, bar if t is first else None, callback))
                    except TrainingDiverged as e:
                        if not keep_going:
                            raise
                        t.failed = str(e)
                        log.error("%s: %s", t.out, e)
                step += 1
                if bar is not None:
                    bar.update(1)
                stop = signals.flag if dist.world == 1 else any(flags)
                if stop and step < total:
                    for t in trainees:
                        if t.failed is None and t.saved != t.step:
                            t.checkpoint(dist)
                    raise TrainingInterrupted(f"stopped at step {step} of {total}; checkpoint in "
                                              f"{where or first.out / 'checkpoint'}; continue with --resume")
    finally:
        for t in trainees:
            if t.metrics is not None:
                t.metrics.close()
            if t.wandb is not None:
                t.wandb.finish()
        if bar is not None:
            bar.close()


def _step(t: Trainee, batch: torch.Tensor, dist: Dist, device: torch.device, signals: StopOnSignal, bar,
          callback) -> bool:
    """One optimiser step of one trainee; True when some process asked to stop (SIGINT/SIGTERM)."""
    cfg, sae, win = t.cfg, t.sae, t.win
    resid = batch if t.select is None else t.select(batch)
    hist_on, n_pos = cfg.arch == "routesae", len(t.r["layers"])
    lr = lr_at(t.step, t.total, t.r["lr"], cfg.warmup_frac, cfg.decay_frac)
    for g in t.opt.param_groups:
        g["lr"] = lr
    o = t.model(resid)
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
        raise TrainingDiverged(f"loss became {vals[0]} at step {t.step + 1}; {t.last_good()}; lower --lr")
    o.loss.backward()
    t.constraint.after_backward(sae)
    t.opt.step()
    t.constraint.after_step(sae, t.step + 1)
    t.opt.zero_grad(set_to_none=True)
    t.step += 1
    step = t.step
    t.rows += cfg.batch_tokens
    win["steps"] += 1
    win["sums"] = [a + b for a, b in zip(win["sums"], vals[:4])]
    if hist_on:
        win["route"] = [a + b for a, b in zip(win.setdefault("route", [0.0, 0.0]), vals[5:7])]
        win["hist"] += torch.tensor([round(v) for v in vals[7:]], dtype=torch.int64)
    record = dict(zip(("loss", "nmse", "aux", "l0"), vals[:4]), step=step, lr=lr)
    if step % cfg.log_every == 0 or step == t.total:
        record = _log_record(step, cfg, lr, win, hist_on, sae, time.perf_counter() - t.t0, t.rows)
        t.win, t.t0, t.rows = _new_window(n_pos), time.perf_counter(), 0
        if t.metrics is not None:
            t.metrics.write(json.dumps(record) + "\n")
            t.metrics.flush()
            if t.wandb is not None:
                t.wandb.log(record, step=step)
        if bar is not None:
            bar.set_postfix(tok_s=f"{record['tokens_per_s'] or 0:.3g}", nmse=f"{record['nmse']:.4f}",
                            l0=f"{record['l0']:.1f}")
    if step % cfg.ckpt_every == 0 or step == t.total:
        t.checkpoint(dist)
    if callback is not None:
        callback(step, sae, record)
    return vals[4] > 0


__all__ = ["RunPlan", "TrainConfig", "Trainee", "TrainingDiverged", "TrainingInterrupted", "check_run", "lr_at",
           "run_loop", "start_run", "train"]
