"""Where one training step of ours spends its time: a phase-by-phase profile (issue 18 §4).

``profile_step(cfg, steps)`` builds the SAE exactly as ``routesae train`` does (same store stream,
initialisation, optimiser, decoder constraint) and runs the step of ``routesae.train._step`` with a
wall-clock timer at every phase boundary; on CPU every op is synchronous, on CUDA each boundary
synchronises. The backward pass is one autograd call: it is split by tensor hooks that fire when the
gradient of the reconstruction (loss backward done) and of the SAE input (the fused sparse SAE's
backward done) are ready; the rest is the router and standardisation's backward.

The SAE body (encoder matmul, top-k, sparse decoder: :class:`routesae.sae.kernels.TopKEncodeDecode`) is
one phase forward and one backward; after each step its three forward parts are timed again alone on
the same input (outside the step's total) to split it.

Phases, in step order: data (store read + shuffle), forward: standardise + route, sparse SAE, loss +
statistics (NMSE, firing counts, AuxK, the one host sync), backward: loss, sparse SAE, router +
standardisation; decoder-gradient projection, Adam, decoder renormalisation.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from routesae.recipe import DecoderConstraint
from routesae.sae.kernels import encoder_preacts, select_topk, sparse_decode
from routesae.sae.ops import nmse
from routesae.store import Store
from routesae.train import TrainConfig, check_run, device_name
from routesae.train_setup import batches, initial_sae

PHASES = ["data: store read + shuffle", "fwd: standardise + route", "fwd: sparse SAE", "fwd: loss + statistics",
          "bwd: loss", "bwd: sparse SAE", "bwd: router + standardise", "decoder-gradient projection",
          "optimizer (Adam)", "decoder renormalisation"]
SAE_PARTS = ("matmul", "top-k", "decoder")


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t = self.now()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        t, self.t = self.t, self.now()
        return self.t - t


def profile_step(cfg: TrainConfig, steps: int = 20, warmup: int = 3) -> dict:
    """Median milliseconds per phase over ``steps`` steps (after ``warmup``), and the split of the encoder."""
    store = Store(cfg.store)
    cfg = replace(cfg, progress=False).validate()
    plan = check_run(cfg, store, 1)  # the resolved defaults and SAE config of `routesae train` (writes nothing)
    r = plan.r
    device = torch.device(device_name(cfg.device))
    sae = initial_sae(cfg, plan.sae_cfg, store, r, device)
    opt = torch.optim.Adam(sae.parameters(), lr=r["lr"], betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    constraint = DecoderConstraint(cfg.decoder_norm, cfg.renorm_every)
    stream = batches(store, cfg, r, 0)
    rows: dict[str, list[float]] = {p: [] for p in PHASES}
    split: dict[str, list[float]] = {p: [] for p in SAE_PARTS}
    for step in range(warmup + steps):
        ms = _one_step(sae, opt, constraint, stream, step, device)
        if step >= warmup:
            for p, v in zip(PHASES, ms):
                rows[p].append(v)
            for name, v in _encoder_split(sae, stream_x=sae._prepare(next(stream).to(device)).x, device=device).items():
                split[name].append(v)
    med = {p: statistics.median(v) for p, v in rows.items()}
    return {"ms": med, "total_ms": sum(med.values()), "encoder_split_ms": {k: statistics.median(v)
                                                                            for k, v in split.items()},
            "tokens_per_s": cfg.batch_tokens / (sum(med.values()) / 1000), "latents": r["latents"],
            "layers": r["layers"]}


def _one_step(sae, opt, constraint, stream, step: int, device: torch.device) -> list[float]:
    clock = _Clock(device)
    out: list[float] = []
    resid = next(stream).to(device)
    out.append(clock.lap())
    prep = sae._prepare(resid)
    out.append(clock.lap())
    val, idx, x_hat = sae.encode_decode(prep.x)
    out.append(clock.lap())
    loss = nmse(x_hat, prep.x)
    sae._count_firing(val, idx)
    aux = sae.aux_loss(prep.x, x_hat)
    loss = loss + sae.cfg.aux_coef * aux
    if prep.probs is not None:
        torch.bincount(prep.routed_layer, minlength=sae.cfg.n_layers).tolist()
    loss.item()
    out.append(clock.lap())
    marks: list[float] = []
    for tensor in (x_hat, prep.x):
        if tensor.requires_grad:
            tensor.register_hook(lambda g: marks.append(clock.now()))
    t_start = clock.t
    loss.backward()
    t_end = clock.now()
    marks = (marks + [t_end] * 2)[:2]
    bounds = [t_start, *marks, t_end]
    out.extend(b - a for a, b in zip(bounds, bounds[1:]))
    clock.t = t_end
    constraint.after_backward(sae)
    out.append(clock.lap())
    opt.step()
    opt.zero_grad(set_to_none=True)
    out.append(clock.lap())
    constraint.after_step(sae, step + 1)
    out.append(clock.lap())
    return [1000 * v for v in out]


@torch.no_grad()
def _encoder_split(sae, stream_x: torch.Tensor, device: torch.device) -> dict[str, float]:
    clock = _Clock(device)
    pre = encoder_preacts(stream_x - sae.b_pre, sae.W_enc, sae.b_enc)
    t_mm = clock.lap()
    val, idx = select_topk(pre, sae.cfg.k)
    t_top = clock.lap()
    sparse_decode(val.relu(), idx, sae.W_dec)
    return {"matmul": 1000 * t_mm, "top-k": 1000 * t_top, "decoder": 1000 * clock.lap()}


def format_profile(res: dict, title: str) -> str:
    """The profile as printed by bench/train.py: one line per phase, ms and share of the step."""
    lines = [f"profile of one {title} step ({len(res['layers'])} layers, {res['latents']} latents), "
             f"median ms per step:"]
    total = res["total_ms"]
    for p, v in res["ms"].items():
        lines.append(f"  {p:32s} {v:7.2f} ms  {100 * v / total:5.1f}%")
        if p == "fwd: sparse SAE":
            s = res["encoder_split_ms"]
            lines.append(f"  {'   alone: matmul / top-k / decoder':32s} {s['matmul']:7.2f} / {s['top-k']:.2f} / "
                         f"{s['decoder']:.2f} ms")
    lines.append(f"  {'total':32s} {total:7.2f} ms  = {res['tokens_per_s']:,.0f} tok/s")
    return "\n".join(lines)
