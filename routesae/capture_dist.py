"""Multi-process capture under ``torchrun``: each process captures its own blocks of contexts.

::

    torchrun --nproc_per_node 4 -m routesae.cli capture MODEL CORPUS --out STORE --max-tokens 10000000 \\
        --dtype bfloat16 --device cuda

Contexts are numbered as a single process numbers them: every rank reads and tokenises the whole
corpus (cheap next to the forward pass) and runs only its own. They are cut into blocks of ``C``
contexts, one block per shard (``C`` a multiple of ``--batch-size``, about ``--shard-mb`` of
activations), and block ``g`` is rank ``g % world``'s (contiguous blocks dealt round-robin). So every
rank runs exactly the batches a single process would run for those contexts, and ``--max-tokens``
counts tokens in corpus order over all ranks, as one process does: the union of the ranks' rows is a
single process's capture, shard boundaries aside (routesae/store_ranks.py has the layout).

Coordination runs over a gloo group (also when the model runs on CUDA; ``init_process_group`` is
called here unless the caller did it): every rank checks its inputs; rank 0 locks ``--out`` and
writes the manifest's header while the others wait, and a one-line error there is raised by every
rank; each rank writes its shards and its own progress file; when all are done rank 0 merges the
progress files into the manifest. ``--out`` must be a folder every rank sees (one machine, or a
shared file system). A killed capture resumes with the same command and the same number of
processes, each rank from its own last shard. Each rank uses ``cuda:LOCAL_RANK`` for ``--device
cuda`` / ``auto``; ``--device-map`` is refused (one model copy per process).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routesae.capture import (
    CaptureConfig,
    _header,
    _open,
    _progress,
    run_batch,
    shard_tokens,
    token_strings,
)
from routesae.capture_checks import CaptureError, preflight
from routesae.capture_io import ShardBuffer, prefetch
from routesae.corpus import ContextBatch, ContextBuilder, CorpusStats, Document, iter_documents
from routesae.layers import parse_layers
from routesae.models.load import first_device
from routesae.store import StoreWriter
from routesae.store_lock import store_lock
from routesae.store_ranks import RankWriter, merge_ranks, rank_tokens
from routesae.store_size import bytes_per_token, dtype_bytes, size_warning

log = logging.getLogger(__name__)

# ranks that finished wait for the others at the end (after a resume, one rank may have much more left)
WAIT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    """This process's place among the capture's processes (from torchrun's environment)."""

    rank: int
    size: int
    local_rank: int


def world_from_env() -> World | None:
    """The processes torchrun started (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); None for one process."""
    try:
        size = int(os.environ.get("WORLD_SIZE") or 1)
        if size <= 1:
            return None
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK") or rank)
    except (KeyError, ValueError):
        raise CaptureError("WORLD_SIZE is set but RANK / LOCAL_RANK are missing or not numbers; start the "
                           "processes with torchrun (or unset WORLD_SIZE for one process)") from None
    if not 0 <= rank < size:
        raise CaptureError(f"RANK {rank} is outside WORLD_SIZE {size}; start the processes with torchrun")
    return World(rank, size, local)


def rank_device(device: str, local_rank: int) -> str:
    """``cuda:LOCAL_RANK`` for ``cuda`` / ``auto`` when CUDA is there; any other device as given."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{local_rank}"
    return device


def contexts_per_shard(cfg: CaptureConfig, values_per_token: int) -> int:
    """Contexts per shard (block): whole batches, about ``--shard-mb`` of activations."""
    batches = max(1, round(shard_tokens(cfg, values_per_token) / (cfg.ctx * cfg.batch_size)))
    return batches * cfg.batch_size


def rank_batches(builder: ContextBuilder, docs: Iterable[Document], batch_size: int, per_shard: int, world: World,
                 done: set[int], max_tokens: int | None) -> Iterator[tuple[ContextBatch, np.ndarray, int]]:
    """``(batch, keep, shard)`` over this rank's contexts not yet captured, in corpus order.

    ``keep`` [b] is how many tokens of each context count (fewer than its length only for the
    context where ``max_tokens``, counted over the whole corpus, runs out). A batch never spans two
    shards, and its contexts are those of a single process's batch (``per_shard`` whole batches).
    """
    rows: list = []
    keep: list[int] = []
    first, shard, seen = 0, -1, 0
    for ci, row in enumerate(builder.contexts(docs)):
        if max_tokens is not None and seen >= max_tokens:
            break
        n = len(row[0])
        keep_n = n if max_tokens is None else min(n, max_tokens - seen)
        seen += n
        g = ci // per_shard
        if g % world.size != world.rank or g in done:
            continue
        if rows and (g != shard or len(rows) == batch_size):
            yield builder._pack(rows, first), np.asarray(keep), shard
            rows, keep = [], []
        if not rows:
            first, shard = ci, g
        rows.append(row)
        keep.append(keep_n)
    if rows:
        yield builder._pack(rows, first), np.asarray(keep), shard


@contextlib.contextmanager
def _process_group(world: World) -> Iterator[Any]:
    """A gloo group over the capture's processes (the default group, initialised here unless it was).

    On success every rank meets a last barrier before the group is destroyed: the last collective is
    rank 0's one-way broadcast, and no rank should close its connections while another still reads
    from them. After a failure there is none (the peers learn of it from their next collective).
    """
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=WAIT)
    elif dist.get_world_size() != world.size:
        raise CaptureError(f"the process group has {dist.get_world_size()} processes but WORLD_SIZE is {world.size}")
    try:
        group = None if created else dist.new_group(backend="gloo", timeout=WAIT)
        yield group
        dist.barrier(group=group)  # nobody closes its connections while another rank still reads from them
    finally:
        if created:
            dist.destroy_process_group()


def _on_rank0(fn: Callable[[], Any], world: World, group) -> Any:
    """Run ``fn`` on rank 0 while the others wait; every rank returns its result or raises its error."""
    import torch.distributed as dist

    box: list = [None]
    error: BaseException | None = None
    if world.rank == 0:
        try:
            box[0] = ("ok", fn())
        except ValueError as exc:  # a user error: every rank prints the same line
            error, box[0] = exc, ("error", str(exc))
        except BaseException as exc:
            error, box[0] = exc, ("error", f"rank 0 failed: {type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0, group=group)
    if error is not None:
        raise error
    status, value = box[0]
    if status != "ok":
        raise CaptureError(value)
    return value


def capture_ranks(cfg: CaptureConfig, world: World, on_shard: Callable[[dict], None] | None = None, model=None,
                  tokenizer=None) -> Path:
    """This process's part of a multi-process capture (see the module docstring); returns the store folder."""
    import torch.distributed as dist

    if cfg.device_map:
        raise CaptureError(f"--device-map {cfg.device_map} places one model over all GPUs, but under torchrun every "
                           f"process loads its own copy; run one process with --device-map, or drop it (each "
                           f"process then uses cuda:LOCAL_RANK)")
    cfg = replace(cfg, world_size=world.size, device=rank_device(cfg.device, world.local_rank),
                  progress=cfg.progress and world.rank == 0)
    with _process_group(world) as group, contextlib.ExitStack() as stack:
        pre = preflight(cfg)
        model, tok, runner_cls, n_layers, d_model, conf = _open(cfg, model, tokenizer)
        if tok is None:
            raise CaptureError(f"no tokenizer found with model '{cfg.model}'; put tokenizer files in the checkpoint "
                               f"folder")
        layers = parse_layers(cfg.layers, n_layers)
        fingerprint = pre.fingerprint()
        runner = runner_cls(model, layers, cfg.router_logits, pre.override)
        stack.callback(runner.close)
        header, k_max, extras = _header(cfg, model, conf, tok, runner, layers, n_layers, d_model, pre.override)
        header["corpus"]["fingerprint"] = fingerprint
        per_shard = contexts_per_shard(cfg, len(layers) * d_model)
        header.update(world_size=world.size, contexts_per_shard=per_shard)
        dist.barrier(group=group)  # every rank has checked its inputs before rank 0 touches --out

        def start() -> bool:  # rank 0: lock --out (until the end), keep a resumable store or start a new one
            stack.enter_context(store_lock(cfg.out))
            writer = StoreWriter(cfg.out, header, cfg.content_args())
            if writer.manifest.get("contexts_per_shard") != per_shard:  # same arguments, another model
                raise CaptureError(f"store {cfg.out} has {writer.manifest.get('contexts_per_shard')} contexts per "
                                   f"shard, this model and these arguments make {per_shard}; capture into a new --out")
            if not writer.complete and cfg.max_tokens is None:
                per_token = bytes_per_token(header, dtype_bytes(cfg.stored_dtype))
                if warning := size_warning(pre.corpus, per_token, cfg.out):
                    log.warning(warning)
            return writer.complete

        if _on_rank0(start, world, group):
            if world.rank == 0:
                log.info("store %s is complete; nothing to do", cfg.out)
            return Path(cfg.out)
        writer = RankWriter(cfg.out, world.rank, world.size)
        if not writer.complete:
            _fill_rank(cfg, writer, world, runner, tok, int(conf.vocab_size), first_device(model), pre.corpus,
                       per_shard, k_max, extras, on_shard)
        dist.barrier(group=group)

        def finish() -> None:
            if rank_tokens(cfg.out, world.size) == 0:  # left incomplete and empty: a re-run may replace it
                raise CaptureError(f"capture wrote no tokens into {cfg.out}; check --max-tokens and the corpus")
            merge_ranks(cfg.out, world.size)

        _on_rank0(finish, world, group)
    return Path(cfg.out)


def _fill_rank(cfg: CaptureConfig, writer: RankWriter, world: World, runner, tok, vocab_size: int, device, corpus,
               per_shard: int, k_max: int | None, extras: tuple[str, ...],
               on_shard: Callable[[dict], None] | None) -> None:
    """Run this rank's remaining blocks through the model, one shard per block, and mark the rank complete."""
    stats = CorpusStats()
    docs = iter_documents(corpus, stats)
    builder = ContextBuilder(tok, cfg.ctx, cfg.packing)
    token_text = token_strings(tok, vocab_size)
    buf = ShardBuffer(writer.write_shard, on_shard)
    total = None if cfg.max_tokens is None else -(-cfg.max_tokens // world.size)  # about this rank's share
    bar = _progress(cfg, writer.tokens_done, total, desc=f"capture (rank 0 of {world.size})")
    shard, end = -1, 0
    try:
        batches = rank_batches(builder, docs, cfg.batch_size, per_shard, world, writer.done, cfg.max_tokens)
        for batch, keep_n, g in prefetch(batches):
            if g != shard:
                buf.flush(contexts_end=end, index=shard)
            keep = torch.from_numpy(batch.attention_mask.astype(bool))
            keep &= torch.arange(keep.shape[1])[None, :] < torch.from_numpy(keep_n)[:, None]
            buf.add(*run_batch(cfg, runner, batch, keep.reshape(-1), device, builder, token_text, k_max, extras))
            shard, end = g, int(batch.context_index[-1]) + 1
            bar.update(int(keep.sum()))
        buf.flush(contexts_end=end, index=shard)
        buf.settle()
        writer.finish(corpus_stats={"documents_read": stats.documents, "skipped_non_utf8": stats.skipped_lines,
                                    "skipped_empty": stats.skipped_empty})
    finally:
        buf.close()
        bar.close()
