"""The sample store of online training: the first N rows of the stream written as an ordinary store.

routesae/online.py feeds :class:`SampleWriter` every forward batch (``--sample-store N``); what it
writes is the store ``routesae capture`` would write for the same tokens (see online.py's docstring).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pandas as pd
import torch

from .capture import CaptureConfig, _router_arrays, shard_tokens, token_rows, token_strings
from .corpus import ContextBuilder
from .models.load import resolve_dtype
from .store import StoreWriter
from .store_lock import store_lock


class SampleWriter:
    """The first ``max_tokens`` rows of the stream into a store, cut into shards as capture's loop cuts them.

    Nothing is written before :meth:`arm` (the run's own files come first: shards wait in memory);
    the store folder is locked against a capture while it is written."""

    def __init__(self, ccfg: CaptureConfig, header: dict, tok: Any, vocab_size: int, moe_layers: list[int],
                 k_max: int | None, extras: tuple[str, ...], values_per_token: int):
        self.ccfg, self.header, self.moe_layers, self.k_max, self.extras = ccfg, header, moe_layers, k_max, extras
        self.shard_tokens = shard_tokens(ccfg, values_per_token)
        self.store_dtype = resolve_dtype(ccfg.stored_dtype)
        self.token_text = token_strings(tok, vocab_size)
        self.parts: tuple[list, list, list] = ([], [], [])  # resid, router arrays, token rows of this shard
        self.ready: list[tuple] = []  # sealed shards not yet written
        self.buffered = self.total = 0
        self.armed = self.done = False
        self.stats: dict[str, int] = {}
        self.writer: StoreWriter | None = None
        self._lock = contextlib.ExitStack()

    def add(self, batch, builder: ContextBuilder, resid: torch.Tensor, route: dict, keep: torch.Tensor,
            stats: dict[str, int]) -> None:
        """One forward batch (all rows; ``keep`` marks the real ones), as capture's ``_fill`` takes it."""
        if self.done:
            return
        keep = keep & (torch.cumsum(keep.long(), 0) <= self.ccfg.max_tokens - self.total)  # trim to max_tokens
        n = int(keep.sum())
        rows = None if n == keep.numel() else keep.nonzero().squeeze(1)
        resid_part, router_part, token_part = self.parts
        resid_part.append((resid if rows is None else resid.index_select(0, rows)).to(self.store_dtype).cpu())
        if self.moe_layers:
            router_part.append(_router_arrays(route, self.moe_layers, rows, self.k_max, self.extras,
                                              self.ccfg.router_logits))
        token_part.append(token_rows(batch, builder, self.token_text, keep.cpu().numpy()))
        self.buffered += n
        self.total += n
        self.done = self.total >= self.ccfg.max_tokens
        self.stats = stats
        if self.buffered >= self.shard_tokens or self.done:
            self.ready.append((*self.parts, int(batch.context_index[-1]) + 1))
            self.parts, self.buffered = ([], [], []), 0
        self._drain()

    def arm(self) -> None:
        self.armed = True
        self._drain()

    def _drain(self) -> None:
        if not self.armed:
            return
        while self.ready:
            resid, router, tokens, contexts_end = self.ready.pop(0)
            if self.writer is None:
                self._lock.enter_context(store_lock(self.ccfg.out))
                self.writer = StoreWriter(self.ccfg.out, self.header, self.ccfg.content_args())
            arrays = {k: [r[k] for r in router] for k in router[0]} if router else None
            self.writer.write_shard(resid, arrays, pd.concat(tokens, ignore_index=True), contexts_end)
        if self.done and self.writer is not None and not self.writer.complete:
            self.writer.finish(corpus_stats=self.stats)
            self.close()

    def close(self) -> None:
        self._lock.close()
