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
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from .atomic import atomic_write_json
from .checkpoint import StopOnSignal, load_state, restoring, rewind_log, rng_state, save_checkpoint, set_rng_state
from .heldout import check_eval_store, record_eval_store, store_record
from .run_guard import check_out, check_restart, check_resume
from .sae import SAEConfig, SparseAutoencoder, build_sae
from .sae.config import ARCHS
from .schedule import lr_at
from .store import Store, StoreError

log = logging.getLogger(__name__)
VERIFY_MAX_BYTES = 2**30


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
    router: str = "faithful"
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
        if self.verify not in ("auto", "always", "never"):
            bad(f"unknown verify {self.verify!r}; choose auto, always or never")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad(f"unknown --device {self.device!r}; use auto, cpu, cuda or cuda:N")
        return self


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owned: bool = False

    @classmethod
    def from_env(cls, cuda: bool) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owned = not tdist.is_initialized()
        if owned:
            tdist.init_process_group("nccl" if cuda else "gloo")
        return cls(tdist.get_world_size(), tdist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), owned)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tdist.all_reduce(t)
        return t


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _resolve(cfg: TrainConfig, store: Store, world: int) -> dict[str, Any]:
    """Defaults and checks that need the store (one-line StoreError/ValueError)."""
    captured = store.layers
    if cfg.arch == "topk":
        if cfg.layer is None:
            n = int(store.manifest.get("n_layers") or max(captured) + 1)
            want = max(round(0.75 * n) - 1, 0)
            layers = [min(captured, key=lambda c: (abs(c - want), -c))]
        else:
            layers = [cfg.layer]
    else:
        layers = list(cfg.layers) if cfg.layers is not None else captured
    missing = [lay for lay in layers if lay not in captured]
    if missing:
        raise StoreError(f"layer {missing[0]} was not captured in {store.root}; captured layers: {captured}")
    d = store.d_model
    latents = cfg.latents if cfg.latents is not None else cfg.expansion * d
    if cfg.k > latents:
        raise ValueError(f"--k {cfg.k} is larger than the latent count {latents}; lower --k or raise "
                         f"--latents/--expansion")
    tokens = cfg.tokens if cfg.tokens is not None else store.n_tokens
    if store.n_tokens < cfg.batch_tokens:
        raise StoreError(f"store {store.root} has {store.n_tokens} tokens, fewer than --batch-tokens "
                         f"{cfg.batch_tokens}; lower --batch-tokens or capture more")
    if cfg.batch_tokens % world:
        raise ValueError(f"--batch-tokens {cfg.batch_tokens} must be divisible by the {world} processes")
    steps = max(tokens // cfg.batch_tokens, 1)
    dead = cfg.dead_tokens or max(cfg.batch_tokens, min(10_000_000, tokens // 10))
    if cfg.dead_tokens is None and cfg.arch == "mlsae":
        dead *= len(layers)
    positions = [captured.index(lay) for lay in layers]
    if cfg.arch == "topk" or positions == list(range(len(captured))):
        positions = None  # topk reads its one layer from the store; the others keep the whole stack
    return {"layers": layers, "positions": positions,
            "latents": latents, "lr": cfg.lr or 2e-4 / math.sqrt(latents / 2**14), "tokens": steps * cfg.batch_tokens,
            "steps": steps, "dead_tokens": dead, "world_size": world}


def _verify(cfg: TrainConfig, store: Store) -> None:
    if cfg.verify == "never":
        return
    size = sum((store.root / n).stat().st_size for s in store.shards for n in s["sha256"]
               if (store.root / n).exists())
    if cfg.verify == "always" or size <= VERIFY_MAX_BYTES:
        try:
            store.verify()
        except FileNotFoundError as e:
            raise StoreError(f"store {store.root} lacks a shard file ({e.filename}); capture it again") from None


def _sync_firing(sae: SparseAutoencoder, dist: _Dist) -> None:
    """Make the dead-latent counter count the global batch: union of firing, sum of examples."""
    def count(val: torch.Tensor, idx: torch.Tensor) -> None:
        fired = torch.zeros(sae.cfg.n_latents, dtype=torch.int32, device=val.device)
        fired[idx[val > 0]] = 1
        n = torch.tensor([val.shape[0]], dtype=torch.int64, device=val.device)
        dist.all_sum(fired)
        dist.all_sum(n)
        sae.tokens_since_fired += n
        sae.tokens_since_fired[fired > 0] = 0

    sae._count_firing = count  # instance override; state_dict and saving are unaffected


def _new_window(n_layers: int) -> dict[str, Any]:
    return {"steps": 0, "sums": [0.0, 0.0, 0.0, 0.0], "hist": torch.zeros(n_layers, dtype=torch.int64)}


def _log_record(step: int, cfg: TrainConfig, lr: float, win: dict, hist: bool, sae: SparseAutoencoder,
                seconds: float, rows: int) -> dict[str, Any]:
    """One metrics.jsonl line: window means of loss, nmse (recon), aux, l0 (non-zero latents/example)."""
    n = max(win["steps"], 1)
    loss, recon, aux, l0 = (s / n for s in win["sums"])
    return {"step": step, "tokens": step * cfg.batch_tokens, "lr": lr, "loss": loss, "nmse": recon, "aux": aux,
            "l0": l0, "dead_frac": sae.dead_mask().float().mean().item(),
            "routed_hist": win["hist"].tolist() if hist else None,
            "tokens_per_s": rows / seconds if seconds > 0 else None}


def _batches(store: Store, cfg: TrainConfig, r: dict, start: int):
    """The training stream; unreadable shards become one-line StoreErrors."""
    layer = r["layers"][0] if cfg.arch == "topk" else None
    it = store.batches(cfg.batch_tokens, layer=layer, seed=cfg.seed, buffer_shards=cfg.buffer_shards,
                       epochs=None, start_batch=start)
    while True:
        try:
            batch = next(it)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors/OS errors from a damaged shard
            raise StoreError(f"cannot read store {store.root} ({_one_line(e)}); a shard is damaged, capture "
                             f"it again") from None
        resid = batch.resid if r["positions"] is None else batch.resid[:, r["positions"]]
        if not torch.isfinite(resid.sum()) and not torch.isfinite(resid).all():  # cheap test first
            shard = int(batch.rows[~torch.isfinite(resid).flatten(1).all(1), 0][0])
            raise StoreError(f"store {store.root} shard {shard} holds non-finite activations; capture it again")
        yield resid


def train(cfg: TrainConfig, callback: Callable[[int, SparseAutoencoder, dict], None] | None = None) -> Path:
    """Train, checkpoint and save an SAE; returns the run folder ``cfg.out``.

    ``callback(step, sae, record)`` runs after every step (``record``: this step's means, or the
    metrics line on a log step); tests use it to send signals or damage parameters.
    Raises TrainingDiverged (nan/inf), TrainingInterrupted (SIGINT/SIGTERM, after a checkpoint),
    StoreError/ValueError (bad inputs, one line).
    """
    cfg.validate()
    dev_name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dist = _Dist.from_env(cuda=dev_name.startswith("cuda"))
    try:
        return _train(cfg, dist, callback, dev_name)
    finally:
        if dist.owned:
            tdist.destroy_process_group()


def _train(cfg: TrainConfig, dist: _Dist, callback, dev_name: str) -> Path:
    device = torch.device(f"cuda:{dist.local_rank}" if dev_name == "cuda" and dist.world > 1 else dev_name)
    out, main = Path(cfg.out), dist.rank == 0
    wandb_module = _import_wandb(cfg, main)
    store = Store(cfg.store)
    r = _resolve(cfg, store, dist.world)
    ckpt = check_out(out, cfg.resume)
    sae_cfg = SAEConfig(arch=cfg.arch, d_in=store.d_model, n_latents=r["latents"], k=cfg.k, layers=r["layers"],
                        routing=cfg.routing, pooling=cfg.pooling, router=cfg.router, aux_k=cfg.aux_k,
                        aux_coef=cfg.aux_coef, dead_tokens=r["dead_tokens"],
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
    _verify(cfg, store)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    sae = build_sae(sae_cfg)
    if state is not None:
        sae.load_state_dict(saved_sae.state_dict())
    sae.to(device).train()
    if state is None:  # b_pre: geometric median of a separate seeded sample (the training stream is untouched)
        per_row = len(r["layers"]) if cfg.arch == "mlsae" else 1
        n = min(max(cfg.init_samples // per_row, 1), store.n_tokens)
        sample = next(_batches(store, TrainConfig(**{**asdict(cfg), "seed": cfg.seed + 7919, "batch_tokens": n}),
                               r, 0))
        sae.init_from_sample(sample.to(device), max_samples=cfg.init_samples)
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
        _sync_firing(sae, dist)
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
    stream = _batches(store, cfg, r, step)
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
                hist = torch.bincount(o.routed_layer, minlength=n_pos) if hist_on else l0.new_zeros(0)
                stats = torch.cat([torch.stack([o.loss.detach(), o.recon_loss.detach(), o.aux_loss.detach(), l0,
                                                torch.tensor(float(signals.flag), device=device)]), hist.float()])
                vals = dist.all_sum(stats).tolist()  # one collective: summed means, flag, global histogram
                vals[:5] = [v / dist.world for v in vals[:5]]
                if not math.isfinite(vals[0]):
                    raise TrainingDiverged(f"loss became {vals[0]} at step {step + 1}; {last_good()}; lower --lr")
                o.loss.backward()
                sae.after_backward()
                opt.step()
                sae.after_step()
                opt.zero_grad(set_to_none=True)
                step += 1
                rows0 += cfg.batch_tokens
                win["steps"] += 1
                win["sums"] = [a + b for a, b in zip(win["sums"], vals[:4])]
                if hist_on:
                    win["hist"] += torch.tensor([round(v) for v in vals[5:]], dtype=torch.int64)
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
