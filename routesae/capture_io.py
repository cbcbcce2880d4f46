"""The capture's two background threads: batches prepared ahead of the model, shards written behind it.

:func:`prefetch` tokenises and packs the next batches while the model runs; :class:`ShardBuffer`
collects the rows of the shard being filled and writes full shards in a writer thread (at most
one in flight, in order), so the disk write overlaps the next forward passes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pandas as pd
import torch


def prefetch(items: Iterator, depth: int = 4) -> Iterator:
    """Produce ``items`` in a background thread, up to ``depth`` ahead (tokenisation overlaps the model).

    Errors in the producer are raised in the consumer; stopping early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, name="routesae-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)



class ShardBuffer:
    """The rows of the shard being filled, and the background thread that writes full shards.

    Shards are written by one thread while the next batches run through the model; at most one
    shard is in flight, and shards land in order. ``write(resid_chunks, router_chunks, tokens,
    **kw)`` writes one shard and returns its manifest entry (then passed to ``on_shard``).
    """

    def __init__(self, write: Callable[..., dict], on_shard: Callable[[dict], None] | None):
        self._write, self._on_shard = write, on_shard
        self.resid: list[torch.Tensor] = []
        self.router: list[dict[str, torch.Tensor]] = []
        self.tokens: list[pd.DataFrame] = []
        self.rows = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routesae-shard-writer")
        self._pending: Future | None = None

    def add(self, resid: torch.Tensor, router: dict[str, torch.Tensor] | None, tokens: pd.DataFrame) -> None:
        self.resid.append(resid)
        if router is not None:
            self.router.append(router)
        self.tokens.append(tokens)
        self.rows += resid.shape[0]

    def settle(self) -> None:
        """Wait for the shard in flight (its errors are raised here)."""
        if self._pending is not None:
            shard, self._pending = self._pending.result(), None
            if self._on_shard:
                self._on_shard(shard)

    def flush(self, **kw) -> None:
        """Hand the buffered rows to the writer thread as one shard (nothing when empty)."""
        if not self.rows:
            return
        # chunks go to the writer as they are: it writes them back to back, with no concatenation
        router = {k: [r[k] for r in self.router] for k in self.router[0]} if self.router else None
        parts = (list(self.resid), router, pd.concat(self.tokens, ignore_index=True))
        self.resid.clear(), self.router.clear(), self.tokens.clear()
        self.rows = 0
        self.settle()
        self._pending = self._pool.submit(self._write, *parts, **kw)

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # a shard already handed to the writer completes (atomically) even on error
