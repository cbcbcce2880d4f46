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

    store_identity   :meth:`routesae.store.Store.identity` of the training store (checked on resume)

A checkpoint is written into ``RUN/checkpoint.tmp/``, fsynced, and swapped in with two renames
(``checkpoint`` -> ``checkpoint.old``, ``checkpoint.tmp`` -> ``checkpoint``); a crash between them
leaves ``checkpoint.old``, which :func:`find_checkpoint` then uses. A half-written
``checkpoint.tmp`` is never read (the next save replaces it). The demo LM trainer
(:mod:`routesae.zoo.train_lm`) writes its checkpoints the same way, with ``sae=None`` (its model
lives inside ``state.pt``).

:func:`load_state` never unpickles objects: ``torch.load(weights_only=True)``, so a crafted
``state.pt`` is refused with one line instead of running code; :func:`check_state` checks the
types of the fields a trainer reads. :class:`StopOnSignal` turns SIGINT/SIGTERM into a flag that
the training loop checks after each step (checkpoint, then stop).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_text

log = logging.getLogger(__name__)
CKPT_DIR = "checkpoint"
STATE_FILE = "state.pt"
SAE_FILE = "sae.safetensors"


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


def save_checkpoint(run: str | Path, sae: torch.nn.Module | None, state: dict[str, Any]) -> Path:
    """Write ``RUN/checkpoint`` atomically (see the module docstring); returns its path.

    ``sae``: saved beside ``state.pt`` with ``save_pretrained``; None writes ``state.pt`` only.
    """
    run = Path(run)
    tmp, final, old = run / f"{CKPT_DIR}.tmp", run / CKPT_DIR, run / f"{CKPT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if sae is not None:
        sae.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run: str | Path, files: tuple[str, ...] = (STATE_FILE, SAE_FILE)) -> Path | None:
    """The newest complete checkpoint folder of ``run`` (one holding every name in ``files``), or None.

    Only looks: a half-written ``checkpoint.tmp`` is left for the next save to replace.
    """
    run = Path(run)
    for name in (CKPT_DIR, f"{CKPT_DIR}.old"):
        folder = run / name
        if all((folder / f).is_file() for f in files):
            return folder
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_state(folder: str | Path) -> dict[str, Any]:
    """``state.pt`` of a checkpoint folder, loaded with ``weights_only=True`` on the CPU.

    A file that holds anything but tensors and plain data (a pickled object, which could run
    code when unpickled) is refused without being run, as is one that is not a dict.
    """
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"refused to load {path}: it holds pickled Python objects, not only tensors and plain "
                         f"data (a foreign or old checkpoint; unpickling could run code); start a new --out") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line advice
        raise ValueError(f"cannot read {path} ({_first_line(e)}); the checkpoint is damaged, "
                         f"start a new --out") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint dict; start a new --out")
    return state


def check_state(state: dict[str, Any], folder: str | Path, fields: dict[str, type | tuple[type, ...]]) -> None:
    """One-line ``ValueError`` naming ``state.pt`` and the first of ``fields`` that is missing or mistyped.

    ``int`` fields refuse bools; ``float`` fields also take ints.
    """
    path = Path(folder) / STATE_FILE
    for name, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        kinds = (*kinds, int) if float in kinds else kinds
        value = state.get(name)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            want = " or ".join(k.__name__ for k in kinds)
            raise ValueError(f"{path}: field {name!r} is {type(value).__name__}, not {want}; the checkpoint is "
                             f"damaged, start a new --out")


@contextmanager
def restoring(folder: str | Path) -> Iterator[None]:
    """Turn errors while restoring a checkpoint's states (optimiser, RNG, ...) into one line naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise ValueError(f"cannot restore {Path(folder) / STATE_FILE} ({_first_line(e)}); the checkpoint is "
                         f"damaged or from another run, start a new --out") from None


def rewind_log(path: str | Path, step: int) -> None:
    """Keep the JSON lines of ``path`` whose ``step`` is at most ``step`` (on resume: the rest is written again).

    A line that is not a JSON object with an integer ``step`` (e.g. cut short by a kill) is dropped.
    """
    def step_of(line: str) -> float:
        try:
            rec = json.loads(line)
        except ValueError:
            return math.inf
        ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool)
        return rec["step"] if ok else math.inf

    path = Path(path)
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and step_of(ln) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


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
