"""Which store ``evaluate`` and ``analyze`` read, and whether its tokens trained the SAE.

A run records a held-out store with ``routesae train --eval-store STORE`` (or
:func:`record_eval_store`): ``RUN/eval_store.json`` holds its path, content identity, token
count and corpus split. ``evaluate`` / ``analyze`` without ``--store`` read that store; a run
without one falls back to its training store and says so on one warning line.

Every evaluation is labelled honestly by :func:`sample_status` against the run's training store
(``train_config.json["store_summary"]``, else that store's manifest):

- ``in_sample: true`` when the store is the training store (the same content identity,
  :meth:`routesae.store.Store.identity`, so a moved or renamed copy counts), or when it read the
  same corpus documents (the same corpus fingerprint: the same files of the same split, or the
  same hub split), whose tokens then overlap the training tokens;
- ``in_sample: false`` when it holds other data read from other documents;
- ``in_sample: null`` when the run records no training store to compare with.

The token range evaluated is always the first ``tokens`` rows of the store in shard order
(``token_range``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from routesae.atomic import atomic_write_json
from routesae.run_guard import TRAIN_CONFIG, read_json_object
from routesae.store import MANIFEST, Store, StoreError

log = logging.getLogger(__name__)
EVAL_STORE = "eval_store.json"


def _fingerprint(manifest: dict) -> str | None:
    fp = (manifest.get("corpus") or {}).get("fingerprint")
    return fp if isinstance(fp, str) else None


def _split(manifest: dict) -> str | None:
    return (manifest.get("capture_args") or {}).get("split")


def store_record(store: Store) -> dict[str, Any]:
    """What identifies a store's data: path, content identity, tokens, corpus fingerprint and split."""
    m = store.manifest
    return {"path": str(store.root), "identity": store.identity(), "tokens": store.n_tokens,
            "corpus": (m.get("corpus") or {}).get("path"), "corpus_fingerprint": _fingerprint(m), "split": _split(m)}


def _train_config(run: Path) -> dict[str, Any] | None:
    path = run / TRAIN_CONFIG
    if not path.is_file():
        return None
    try:
        tc = json.loads(path.read_text())
    except (OSError, ValueError):
        tc = None
    if not isinstance(tc, dict) or not isinstance(tc.get("store_summary") or {}, dict):
        raise StoreError(f"{path} is not a valid training config; pass the store with --store STORE")
    return tc


def training_store(run: Path) -> dict[str, Any] | None:
    """The run's training store as recorded (``store_record`` keys, some None for older runs), or None."""
    tc = _train_config(run)
    if tc is None or not isinstance(tc.get("store"), str):
        return None
    summary = tc.get("store_summary") or {}
    rec = {"path": summary.get("path") or tc.get("store"), "identity": summary.get("identity"),
           "corpus_fingerprint": summary.get("corpus_fingerprint"), "split": summary.get("split")}
    path = rec["path"]
    if isinstance(path, str) and (Path(path) / MANIFEST).is_file() and None in (rec["identity"],
                                                                                rec["corpus_fingerprint"]):
        now = store_record(Store(path))  # an older run: read what it lacks from the store itself
        if rec["identity"] in (None, now["identity"]):
            rec.update({k: rec[k] if rec[k] is not None else now[k] for k in rec})
    return rec


def sample_status(train: dict[str, Any] | None, store: Store) -> tuple[bool | None, str]:
    """``(in_sample, why)`` of ``store`` against the training store ``train`` (see the module docstring)."""
    if train is None:
        return None, "the run records no training store (no train_config.json) to compare with"
    identity = store.identity()
    if train.get("identity") == identity:
        return True, "this is the run's training store (same content identity)"
    if train.get("identity") is None and train.get("path") and Path(train["path"]).resolve() == store.root.resolve():
        return True, "this is the run's training store (same path; the run predates store identities)"
    fp = _fingerprint(store.manifest)
    if fp is not None and fp == train.get("corpus_fingerprint"):
        return True, (f"read the same corpus documents as the training store (corpus fingerprint {fp[:19]}, split "
                      f"{_split(store.manifest)}): its tokens overlap the training tokens")
    known = "another corpus fingerprint" if fp and train.get("corpus_fingerprint") else "corpus not recorded"
    return False, (f"other data than the training store (split {_split(store.manifest)} vs {train.get('split')}, "
                   f"{known}, another content identity)")


def check_eval_store(path: str | Path, train_store: Store, layers: list[int]) -> dict[str, Any]:
    """Open ``path`` as a held-out store for a run trained on ``train_store`` reading ``layers``; its record.

    Refused (one line) when it is not a store, holds another model's rows or lacks a layer, or when its
    tokens are the training store's (see :func:`sample_status`)."""
    if not (Path(path) / MANIFEST).is_file():
        raise StoreError(f"--eval-store {path} is not a store (no {MANIFEST}); capture the validation split "
                         f"first: routesae capture MODEL CORPUS --split val --out {path}")
    store = Store(path)
    hashes = [(s.manifest.get("model") or {}).get("config_hash") for s in (store, train_store)]
    if store.d_model != train_store.d_model or (None not in hashes and hashes[0] != hashes[1]):
        raise StoreError(f"--eval-store {path} holds another model's rows than the training store "
                         f"{train_store.root}; capture the held-out split with the same model")
    missing = [j for j in layers if j not in store.layers]
    if missing:
        raise StoreError(f"--eval-store {path} lacks layers {missing} that the SAE reads; capture it with the "
                         f"training store's layers ({train_store.layers})")
    inside, why = sample_status(store_record(train_store), store)
    if inside:
        raise StoreError(f"--eval-store {path} is not held out: it {why.removeprefix('this ')}; capture "
                         f"another split (e.g. --split val)")
    return store_record(store)


def record_eval_store(run: str | Path, record: dict[str, Any]) -> Path:
    """Write ``RUN/eval_store.json`` (atomically) from a :func:`check_eval_store` record."""
    path = Path(run) / EVAL_STORE
    atomic_write_json(path, record)
    return path


def recorded_eval_store(run: Path) -> str | None:
    """The held-out store path recorded with the run (None if none); one-line error if the file is damaged."""
    path = run / EVAL_STORE
    data = read_json_object(path, "delete it or pass --store STORE", StoreError)
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("path"), str):
        raise StoreError(f"{path} names no store path; delete it or pass --store STORE")
    return data["path"]


def choose_store(run: Path, store: str | None, stage: str = "evaluating") -> tuple[str, str]:
    """``(store path, source)``: ``store`` if given, else the run's recorded held-out store, else its
    training store (with a one-line warning). ``source`` is "--store", "eval_store.json" or "training store"."""
    if store is not None:
        return store, "--store"
    held = recorded_eval_store(run)
    if held is not None:
        if not (Path(held) / MANIFEST).is_file():
            raise StoreError(f"run {run} records held-out store {held} ({EVAL_STORE}), which is missing (no "
                             f"{MANIFEST}); pass the store with --store STORE")
        return held, EVAL_STORE
    train = (_train_config(run) or {}).get("store")
    if train == "":
        raise StoreError(f"{run} was trained online without --sample-store, so it records no store; pass --store "
                         f"STORE (e.g. a capture of the validation split)")
    if not isinstance(train, str):
        raise StoreError(f"{run} records no store (no train_config.json); pass --store STORE")
    if not (Path(train) / MANIFEST).is_file():
        raise StoreError(f"run {run} was trained on store {train}, which is missing (no {MANIFEST} there); "
                         f"pass the store with --store STORE")
    log.warning("%s on the training store %s: in-sample figures (the SAE trained on these tokens); pass --store "
                "for held-out tokens, or record one with routesae train --eval-store", stage, train)
    return train, "training store"


def sample_fields(run: Path, store: Store, given: str | None, n_tokens: int) -> dict[str, Any]:
    """The fields ``eval.json`` / ``summary.json`` record about the tokens they measured (``given``: the
    ``--store`` option, None when :func:`choose_store` picked the store)."""
    inside, why = sample_status(training_store(run), store)
    source = "--store" if given is not None else EVAL_STORE if (run / EVAL_STORE).is_file() else "training store"
    return {"in_sample": inside, "in_sample_why": why, "store_source": source, "store_identity": store.identity(),
            "store_split": _split(store.manifest),
            "token_range": {"start": 0, "stop": int(n_tokens), "store_tokens": store.n_tokens,
                            "order": "the store's first rows in shard order"}}
