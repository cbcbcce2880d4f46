"""Atomic training checkpoints of an SAE run.

``RUN/checkpoint/`` holds ``config.json`` + ``sae.safetensors`` (``save_pretrained``: weights and
the dead-latent counter ``tokens_since_fired``) and ``state.pt``: a plain dict of tensors, ints,
floats, strings, lists and dicts (loadable with ``torch.load(weights_only=True)``)::

    step             completed optimiser steps (= batches consumed: the data cursor)
    total_steps      steps of the whole run
    optimizer        torch.optim.Adam.state_dict()
    rng              torch / python ``random`` / numpy / cuda generator states, as tensors
    window           the metrics accumulated since the last log line
    train_config     the TrainConfig the run was started with (checked on resume)

A checkpoint is written into ``RUN/checkpoint.tmp/``, fsynced, and swapped in with two renames
(``checkpoint`` -> ``checkpoint.old``, ``checkpoint.tmp`` -> ``checkpoint``); a crash between them
leaves ``checkpoint.old``, which :func:`find_checkpoint` then uses. A half-written
``checkpoint.tmp`` is never read. :class:`StopOnSignal` turns SIGINT/SIGTERM into a flag that the
training loop checks after each step (checkpoint, then stop).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
CKPT_DIR = "checkpoint"
STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    """Every random generator state of this process, as tensors and numbers."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(internal, dtype=torch.int64), "python_version": int(version),
        "python_gauss": [] if gauss is None else [float(gauss)],
        "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    gauss = state["python_gauss"][0] if state["python_gauss"] else None
    random.setstate((state["python_version"], tuple(state["python"].tolist()), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run: str | Path, sae: torch.nn.Module, state: dict[str, Any]) -> Path:
    """Write ``RUN/checkpoint`` atomically (see the module docstring); returns its path."""
    run = Path(run)
    tmp, final, old = run / f"{CKPT_DIR}.tmp", run / CKPT_DIR, run / f"{CKPT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sae.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run: str | Path) -> Path | None:
    """The newest complete checkpoint folder of ``run`` (or None); drops a half-written one."""
    run = Path(run)
    shutil.rmtree(run / f"{CKPT_DIR}.tmp", ignore_errors=True)
    for name in (CKPT_DIR, f"{CKPT_DIR}.old"):
        folder = run / name
        if (folder / STATE_FILE).is_file() and (folder / "sae.safetensors").is_file():
            return folder
    return None


def load_state(folder: str | Path) -> dict[str, Any]:
    """``state.pt`` of a checkpoint folder, loaded with ``weights_only=True`` on the CPU."""
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {path} ({first}); the checkpoint is damaged, start a new --out") from None


class StopOnSignal:
    """SIGINT/SIGTERM set a flag (a second one interrupts at once); previous handlers restored on exit."""

    def __init__(self) -> None:
        self.flag = False
        self.prev: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.prev[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.flag:
            raise KeyboardInterrupt(f"signal {signum} received twice; stopping without a checkpoint")
        self.flag = True
        log.warning("signal %d: finishing this step, then checkpointing and stopping", signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self.prev.items():
            signal.signal(sig, prev)
