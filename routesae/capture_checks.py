"""What capture checks before it writes anything: options, the ``--out`` folder, the corpus.

``preflight(cfg)`` runs every check that needs no model, in order of cost, and raises the first
problem as a one-line error (a ``ValueError`` subclass); nothing is created on disk. The corpus
fingerprint (a read of the corpus files) runs in a background thread while the model loads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from routesae.corpus import (
    FINGERPRINT_PREFIX,
    CorpusConfig,
    check_context_options,
    corpus_fingerprint,
    first_document,
    legacy_corpus_fingerprint,
)
from routesae.models.intervene import RoutingOverride
from routesae.models.load import DTYPES
from routesae.store import existing_store, resumable


class CaptureError(ValueError):
    """Capture cannot run as asked; the message says what to change."""


@dataclass
class Preflight:
    """What the checks found: the parsed routing override, the corpus reader's config, the
    existing store's manifest (None for a new folder) and a call that returns the corpus fingerprint."""

    override: RoutingOverride
    corpus: CorpusConfig
    existing: dict | None
    fingerprint: Callable[[], str]


def check_options(cfg) -> RoutingOverride:
    """One-line errors for options no capture can use; returns the parsed ``--routing-override``."""
    if cfg.backend not in ("hf", "tl"):
        raise CaptureError(f"--backend {cfg.backend} unknown; use hf or tl")
    if cfg.dtype not in DTYPES:
        raise CaptureError(f"--dtype {cfg.dtype} unknown; use one of {', '.join(DTYPES)}")
    if cfg.store_dtype is not None and cfg.store_dtype not in DTYPES:
        raise CaptureError(f"--store-dtype {cfg.store_dtype} unknown; use one of {', '.join(DTYPES)} "
                           f"(or leave it out to store in --dtype)")
    check_context_options(cfg.ctx, cfg.packing)
    if cfg.batch_size < 1:
        raise CaptureError(f"--batch-size {cfg.batch_size} must be at least 1")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise CaptureError(f"--max-tokens {cfg.max_tokens} must be at least 1 (or left out for the whole corpus)")
    if not (cfg.shard_mb > 0 and math.isfinite(cfg.shard_mb)):
        raise CaptureError(f"--shard-mb {cfg.shard_mb} must be a positive number of MiB (default 256)")
    if not cfg.text_field:
        raise CaptureError("--text-field is empty; name the JSON field / column with the text")
    try:
        torch.device(cfg.device if cfg.device != "auto" else "cpu")
    except RuntimeError:
        raise CaptureError(f"--device {cfg.device} unknown; use cpu, cuda, cuda:N or auto") from None
    return RoutingOverride.parse(cfg.routing_override)


def preflight(cfg) -> Preflight:
    """Check options, ``--out`` and the corpus (first document, fields) before anything is written."""
    override = check_options(cfg)
    corpus = CorpusConfig(cfg.corpus, cfg.text_field, cfg.domain_field, cfg.split, seed=cfg.seed)
    existing = existing_store(cfg.out)
    if existing is not None:  # a different-arguments resume fails before the model loads
        resumable(cfg.out, existing, cfg.content_args(), None)
    first_document(corpus)
    was = ((existing or {}).get("corpus") or {}).get("fingerprint")
    legacy = bool(was) and not str(was).startswith(FINGERPRINT_PREFIX)  # a store from before content hashing
    return Preflight(override, corpus, existing,
                     _in_background(legacy_corpus_fingerprint if legacy else corpus_fingerprint, corpus))


def _in_background(fn: Callable[[CorpusConfig], str], corpus: CorpusConfig) -> Callable[[], str]:
    """Start ``fn(corpus)`` in a daemon thread (hashing releases the GIL); the call returned waits for it."""
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn(corpus)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=work, name="routesae-fingerprint", daemon=True)
    thread.start()

    def result() -> str:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result
