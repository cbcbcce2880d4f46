"""Checks of a ``routesae zoo train-lm`` output folder, made before training writes into it.

:func:`resume_state` refuses a ``--out`` that is a file, or that holds a checkpoint or a trained
model when ``resume`` is off; with ``resume`` it loads ``DIR/checkpoint/state.pt`` with
``torch.load(weights_only=True)`` (:func:`routesae.checkpoint.load_state`: a pickled object is
refused without being run), checks the types of its fields and of its saved config, and that
the options which change the trajectory are the original ones. One-line ``ValueError`` each.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from routesae.checkpoint import STATE_FILE, check_state, find_checkpoint, load_state
from routesae.run_guard import check_option_types

# TrainLMConfig fields that do not change the trajectory (paths, speed, bookkeeping): free on resume
FREE_ON_RESUME = {"corpus", "out", "tokenizer", "device", "threads", "experts_impl", "resume", "stop_after_steps",
                  "card", "sample_tokens", "log_every", "ckpt_every", "eval_every"}
STATE_FIELDS = {"model": dict, "optimizer": dict, "scheduler": dict, "rng": dict, "step": int, "epoch": int,
                "consumed": int, "elapsed": float, "total_steps": int, "tokens_per_step": int, "config": dict}


def resume_state(cfg: Any, out: Path) -> tuple[dict, Path] | None:
    """Check ``out`` before anything is written; with ``resume``, the checked checkpoint (state, folder)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder for the model")
    ckpt = find_checkpoint(out, files=(STATE_FILE,)) if out.is_dir() else None
    if not cfg.resume:
        if ckpt is not None or (out / "model.safetensors").exists():
            raise ValueError(f"{out} holds a checkpoint or a trained model; pass --resume to continue it or choose "
                             f"another --out")
        return None
    if ckpt is None:
        return None
    st = load_state(ckpt)
    check_state(st, ckpt, STATE_FIELDS)
    old = check_option_types(type(cfg), st["config"], f"{ckpt / STATE_FILE} config")
    now = dataclasses.asdict(cfg)
    diff = [k for k in now if k not in FREE_ON_RESUME and k in old and _plain(old[k]) != _plain(now[k])]
    if diff:
        was = ", ".join(f"{k}={old[k]!r}" for k in diff)
        raise ValueError(f"the checkpoint in {ckpt} was made with {was}; resume with the original preset and options")
    if st["total_steps"] != cfg.total_steps or st["tokens_per_step"] != cfg.tokens_per_step:
        raise ValueError(f"checkpoint in {ckpt} was made with {st['total_steps']} steps of "
                         f"{st['tokens_per_step']} tokens; resume with the same preset and --max-tokens")
    if not 0 <= st["step"] <= st["total_steps"] or st["epoch"] < 0 or st["consumed"] < 0:
        raise ValueError(f"{ckpt / STATE_FILE}: step, epoch or consumed is out of range; the checkpoint is damaged, "
                         f"start a new --out")
    return st, ckpt


def _plain(v):
    return list(v) if isinstance(v, tuple) else v
