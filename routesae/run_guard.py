"""Checks on a training run folder, all made before training writes anything into it.

- :func:`check_out`: what ``--out`` may be. A new or empty folder starts a run; a folder holding a
  run (an SAE or a checkpoint) needs ``--resume``; a folder with only what a run writes before its
  first checkpoint (``train_config.json``, ``metrics.jsonl``) starts over if the options match;
  a file, a store, or any other non-empty folder is refused.
- :func:`check_resume`: the checkpoint's fields have the right types, the options that change the
  trajectory are the ones it was started with, and the store is the one it was trained on
  (:meth:`routesae.store.Store.identity`, content-based: a moved or renamed copy is accepted).
- :func:`check_restart`: the same checks against ``train_config.json`` for a run that stopped
  before its first checkpoint.
- :func:`check_option_types`: the values of a config dict read back from disk (JSON or
  ``state.pt``) have the types of the dataclass fields they fill.

Every refusal is a one-line ``ValueError`` (``StoreError`` for the store) naming the file and
what to do.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from .checkpoint import STATE_FILE, check_state, find_checkpoint
from .sae import SAEConfig, SparseAutoencoder, load_sae
from .store import MANIFEST, Store, StoreError

# TrainConfig fields that do not change the trajectory: they may differ between a run and its resume
FREE_ON_RESUME = {"store", "out", "resume", "device", "wandb", "progress", "ckpt_every", "log_every", "verify",
                  "eval_store"}
TRAIN_CONFIG = "train_config.json"
WEIGHT_FILES = ("config.json", "sae.safetensors", "checkpoint", "checkpoint.old")
START_FILES = (TRAIN_CONFIG, "metrics.jsonl", "checkpoint.tmp", "eval_store.json")
_KINDS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float), "bool": bool}


def _fits(annotation: str, value: Any) -> bool:
    """Whether ``value`` has the type a dataclass annotation (a string such as ``int | None``) names."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None":
            if value is None:
                return True
        elif part.startswith(("list[", "tuple[")):
            inner = part[part.index("[") + 1:-1].split(",")[0].strip()
            if isinstance(value, (list, tuple)) and all(_fits(inner, x) for x in value):
                return True
        elif part in _KINDS and isinstance(value, bool) == (part == "bool") and isinstance(value, _KINDS[part]):
            if part != "float" or math.isfinite(value):
                return True
    return False


def check_option_types(cls: type, options: Any, where: str) -> dict[str, Any]:
    """``options`` (read from ``where``) as a dict whose values fit the fields of dataclass ``cls``."""
    if not isinstance(options, dict):
        raise ValueError(f"{where} holds a {type(options).__name__}, not a dict of options; the run is damaged, "
                         f"start a new --out")
    for f in fields(cls):
        if f.name in options and not _fits(str(f.type), options[f.name]):
            raise ValueError(f"{where}: option {f.name!r} is {repr(options[f.name])[:60]}, not {f.type}; the file "
                             f"was changed or damaged, start a new --out")
    return options


def check_out(out: Path, resume: bool) -> Path | None:
    """Refuse an ``--out`` that training must not write into; return the checkpoint to resume from (or None)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder path for the run")
    names = {p.name for p in out.iterdir()} if out.exists() else set()
    if names and not names & {*WEIGHT_FILES, *START_FILES}:
        what = "a store" if MANIFEST in names else "not empty and holds no routesae run"
        raise ValueError(f"--out {out} is {what}; choose a new or empty folder for the run")
    if not names & set(WEIGHT_FILES):
        return None  # new, empty, or stopped before its first checkpoint (see check_restart)
    if not resume:
        raise ValueError(f"{out} exists; pass --resume to continue or choose another --out")
    ckpt = find_checkpoint(out)
    if ckpt is None:
        raise ValueError(f"{out} holds an SAE but no checkpoint/ to resume from; choose another --out")
    return ckpt


def _same_options(cfg: Any, old: dict[str, Any]) -> None:
    """Options a run was started with must be repeated; an option newer than the checkpoint counts as its default."""
    now = asdict(cfg)
    default = {f.name: f.default for f in fields(type(cfg))}
    diff = [k for k in now if k not in FREE_ON_RESUME and old.get(k, default.get(k)) != now[k]]
    if diff:
        was = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
        raise ValueError(f"{cfg.out} was started with {was}; repeat the original options with --resume")


def _same_store(cfg: Any, identity: Any, old_path: Any, store: Store) -> None:
    if identity is None:
        return  # a run from before store identities were recorded
    if identity != store.identity():
        old = identity[:12] if isinstance(identity, str) else repr(identity)[:20]
        raise StoreError(f"{cfg.out} was trained on store {old_path} (identity {old}), but {store.root} holds other "
                         f"data (identity {store.identity()[:12]}); resume with the store it was trained on")


def _check_window(state: dict[str, Any], ckpt: Path, n_layers: int) -> None:
    win = state["window"]
    ok = (isinstance(win.get("steps"), int) and isinstance(win.get("sums"), list) and len(win["sums"]) == 4
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in win["sums"])
          and isinstance(win.get("hist"), torch.Tensor) and win["hist"].dtype == torch.int64
          and win["hist"].shape == (n_layers,)
          and (win.get("route") is None or (isinstance(win["route"], list) and len(win["route"]) == 2
                                            and all(isinstance(x, float) for x in win["route"]))))
    if not ok or not 0 <= state["step"] <= state["total_steps"]:
        raise ValueError(f"{ckpt / STATE_FILE}: the metrics window or step is malformed; the checkpoint is damaged, "
                         f"start a new --out")


def check_resume(cfg: Any, state: dict, ckpt: Path, store: Store, sae_cfg: SAEConfig) -> SparseAutoencoder:
    """Check a loaded checkpoint against this run and store; return the SAE saved in it."""
    check_state(state, ckpt, {"step": int, "total_steps": int, "optimizer": dict, "rng": dict, "window": dict,
                              "train_config": dict})
    old = check_option_types(type(cfg), state["train_config"], f"{ckpt / STATE_FILE} train_config")
    _check_window(state, ckpt, len(sae_cfg.layers))
    _same_options(cfg, old)
    saved = SparseAutoencoder.read_config(ckpt)
    if saved.d_in != store.d_model:
        raise StoreError(f"the checkpoint in {cfg.out} holds an SAE of width d_in={saved.d_in} but store "
                         f"{store.root} has d_model={store.d_model}; resume with the store it was trained on")
    if saved.layers != sae_cfg.layers or saved.n_latents != sae_cfg.n_latents:
        raise StoreError(f"the checkpoint in {cfg.out} reads layers {saved.layers} with {saved.n_latents} "
                         f"latents, this store gives {sae_cfg.layers} / {sae_cfg.n_latents}; use the original store")
    _same_store(cfg, state.get("store_identity"), old.get("store"), store)
    return load_sae(ckpt)


def read_json_object(path: Path, fix: str, error: type[Exception] = ValueError) -> dict[str, Any] | None:
    """A run file holding one JSON object (None if absent); ``error("cannot read PATH (why); FIX")`` if unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path} ({e}); {fix}") from None


def read_train_config(run: Path) -> dict[str, Any] | None:
    """``RUN/train_config.json`` as a dict (None if absent); one-line error if it is not a JSON object."""
    path = run / TRAIN_CONFIG
    data = read_json_object(path, "the run is damaged, start a new --out")
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("store_summary", {}), dict):
        raise ValueError(f"{path} is not a train_config object; the run is damaged, start a new --out")
    return data


def check_restart(cfg: Any, out: Path, store: Store) -> None:
    """A run that stopped before its first checkpoint starts over only with its options and store."""
    old = read_train_config(out)
    if old is None:
        return
    check_option_types(type(cfg), old, str(out / TRAIN_CONFIG))
    _same_options(cfg, old)
    summary = old.get("store_summary", {})
    _same_store(cfg, summary.get("identity"), summary.get("path", old.get("store")), store)
