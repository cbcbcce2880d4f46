"""Online training: ``routesae train --model MODEL --corpus CORPUS --out RUN ...``, no store on disk.

The model runs over the corpus as capture runs it (the same hooks, layer numbering, backends,
``--dtype``, ``--device`` and ``--device-map``: routesae/capture.py) and its residuals feed one
training loop (:func:`routesae.train.run_loop`) through a mixing buffer; every SAE of a sweep
(routesae/train_many.py) trains on the same rows of the same forward pass.

Mixing buffer (SAELens' idea). Each process holds up to ``mix_tokens`` rows (default 16 x the
batch; 0 switches mixing off). When it is full it is shuffled, its first half goes out as training
batches and the second half stays to be mixed with the next forward passes. Memory: about
``mix_tokens x n_hooked_layers x d_model`` values in the model's ``--dtype`` on the SAE's device
(+ one forward batch), e.g. 65,536 tokens x 9 layers x 2,048 x 2 bytes (bf16) = 2.4 GB; batches
are cast to float32 as they leave it. With mixing off, batches are the rows in forward order
(padding dropped, as in a store), ``batch_tokens`` at a time.

Documents are read (and shuffled with ``--seed``) as capture reads them; the contexts are cut
into forward batches of ``--batch-size`` contexts, numbered from 0 in each pass over the corpus.
A run needs ``--tokens`` (the stream has no length); when the corpus runs out it is read again
from the start (the same document order).
Under ``torchrun`` each process runs the model on its own forward batches (``j % world == rank``)
and takes ``batch_tokens / world`` rows per step from its own buffer; DDP averages the SAE
gradients and the dead-latent counters are summed, as for store training. Each process holds a
whole model (``--device-map`` is for one process with a model larger than one GPU).

Initialisation: the first rows of the stream (in forward order, before mixing) are the sample the
recipe reads (routesae/train_setup.py ``initial_sae``); they are then trained on like any other.
Under DDP every process takes rank 0's initial SAE.

Checkpoints record the corpus cursor of every process (``corpus_cursor``: the pass and the next
forward batch) and the online options. ``--resume`` restores the SAE, optimiser, step, schedule,
dead-latent counters and RNG exactly and reads the corpus on from the cursor (re-reading and
re-tokenising the documents before it, as capture's resume does, without the model); what is *not*
restored is the buffer: the rows it held at the checkpoint (forwarded but not yet trained on, at
most ``mix_tokens`` + one forward batch per process) are dropped, and the mixing order after the
resume is drawn afresh from the cursor. A resumed run is therefore bit-equal to the uninterrupted
one exactly when the buffer was empty at the checkpoint: mixing off and ``batch_tokens`` a multiple
of the tokens of a forward batch with no padding (tests/test_online.py); otherwise it trains on
the same corpus stream minus those rows. A resume needs the same number of processes.

Sample store: ``sample_store=N`` writes the first N tokens of the stream, with router records and
token table, into ``RUN/sample_store`` with the store writer, during training (no extra forward):
the store ``routesae capture MODEL CORPUS --layers <hooked> --max-tokens N`` (same ctx, batch
size, dtype, seed) would write. Where the stream cannot provide them (under DDP, after a resume
that found it incomplete, or a run shorter than N tokens) it is captured (or completed) after
training by :func:`routesae.capture.capture`. Every run records it as its store, so ``evaluate``
and ``analyze`` read it by default (in-sample: the SAE trained on these tokens).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from .capture import CaptureConfig, _header, _open, capture
from .capture_checks import CaptureError, check_options, preflight
from .capture_io import prefetch
from .corpus import ContextBuilder, CorpusConfig, CorpusStats, corpus_fingerprint, first_document, iter_documents
from .layers import parse_layers
from .models.load import config_hash, first_device, recorded_spec
from .online_sample import SampleWriter
from .run_guard import check_out
from .sae import SparseAutoencoder
from .store import MANIFEST, Store
from .train import TrainConfig, check_run, device_name, rank_device, run_loop, start_run
from .train_many import check_shared, check_sweep_out, run_many, selector, write_index
from .train_setup import Dist, import_wandb, process_group

log = logging.getLogger(__name__)
SAMPLE_DIR = "sample_store"
# OnlineConfig fields that do not change what the SAEs see: they may differ on --resume
FREE = {"device_map", "trust_remote_code"}


@dataclass
class OnlineConfig:
    """Where online activations come from: the capture options, the mixing buffer and the sample store."""

    model: str
    corpus: str
    layers: str = "auto"  # blocks hooked (capture's spec); RouteSAE/MLSAE read them all, TopK one (--layer)
    backend: str = "hf"
    ctx: int = 256
    batch_size: int = 8  # contexts per forward pass
    dtype: str = "float32"
    device_map: str | None = None
    text_field: str = "text"
    domain_field: str = "domain"
    split: str = "train"
    packing: str = "pack"
    trust_remote_code: bool = False
    mix_tokens: int | None = None  # rows of the mixing buffer per process; None: 16 x batch, 0: off
    sample_store: int = 0  # tokens written to RUN/sample_store (0: none)
    router_logits: bool = True
    shard_mb: float = 256.0  # shards of the sample store

    def content(self) -> dict[str, Any]:
        """The options a resume must repeat."""
        return {k: v for k, v in asdict(self).items() if k not in FREE}


def mix_rows(ocfg: OnlineConfig, batch_tokens: int, world: int) -> int:
    """The mixing buffer's rows per process (0: off); one-line ValueError when too small."""
    local = batch_tokens // world
    mix = 16 * local if ocfg.mix_tokens is None else ocfg.mix_tokens
    if mix < 0:
        raise ValueError(f"--mix-tokens {mix} must be >= 0 (0 switches mixing off)")
    if 0 < mix < 2 * local:
        raise ValueError(f"--mix-tokens {mix} must be at least twice the rows of one step per process ({local}), "
                         f"since half of the buffer goes out at a time; raise it or pass 0 (no mixing)")
    return mix


def capture_config(ocfg: OnlineConfig, cfg: TrainConfig, out: Path, device: str, layers: str | None = None,
                   max_tokens: int | None = None) -> CaptureConfig:
    """The capture that reads what online training reads (and writes the sample store ``out``)."""
    return CaptureConfig(model=ocfg.model, corpus=ocfg.corpus, out=str(out), layers=layers or ocfg.layers,
                         backend=ocfg.backend, max_tokens=max_tokens, ctx=ocfg.ctx, batch_size=ocfg.batch_size,
                         dtype=ocfg.dtype, router_logits=ocfg.router_logits, device=device,
                         device_map=ocfg.device_map, text_field=ocfg.text_field, domain_field=ocfg.domain_field,
                         split=ocfg.split, packing=ocfg.packing, seed=cfg.seed, shard_mb=ocfg.shard_mb,
                         trust_remote_code=ocfg.trust_remote_code, progress=False)


class OnlineView:
    """What training needs to know of the online data, with a store's attribute names (``resolve``,
    ``check_run`` and ``check_eval_store`` take it where they take a :class:`Store`)."""

    def __init__(self, ocfg: OnlineConfig, cfg: TrainConfig, model: Any, n_layers: int, d_model: int,
                 layers: list[int], fingerprint: str):
        self.root = Path(ocfg.model)
        self.layers, self.d_model, self.n_tokens = layers, d_model, int(cfg.tokens or 0)
        self.manifest = {
            "model": {"name_or_path": recorded_spec(ocfg.model),
                      "config_hash": config_hash(model) if ocfg.backend == "hf" else None},
            "n_layers": n_layers, "layers": layers, "d_model": d_model, "tokens": self.n_tokens,
            "corpus": {"path": ocfg.corpus, "fingerprint": fingerprint}, "capture_args": {"split": ocfg.split}}
        spec = {**self.manifest["model"], "corpus": fingerprint, "split": ocfg.split, "layers": layers,
                **{k: getattr(ocfg, k) for k in ("ctx", "packing", "batch_size", "dtype", "text_field",
                                                  "domain_field")}, "seed": cfg.seed}
        self._identity = "online:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def identity(self) -> str:
        """A content hash of the activation stream's source (model, corpus, layers, contexts, seed)."""
        return self._identity


class OnlineSource:
    """The model over the corpus: forward batches -> rows -> mixing buffer -> batches of this process.

    ``cursor``: ``(pass, next forward batch)`` to start from (None: the start of the corpus)."""

    def __init__(self, runner: Any, tok: Any, device: torch.device, model_device: torch.device, ocfg: OnlineConfig,
                 corpus: CorpusConfig, batch_tokens: int, mix: int, dist: Dist, seed: int,
                 cursor: tuple[int, int] | None, writer: SampleWriter | None = None):
        self.runner, self.tok, self.device, self.model_device = runner, tok, device, model_device
        self.ocfg, self.corpus, self.dist, self.seed, self.mix = ocfg, corpus, dist, seed, mix
        self.local = batch_tokens // dist.world
        self.epoch, self.next_batch = cursor or (0, 0)
        self.gen = torch.Generator().manual_seed((seed * 1_000_003 + dist.rank) * 1_000_003
                                                 + self.epoch * 7_919 + self.next_batch)
        self.pending: list[torch.Tensor] = []
        self.have = 0
        self.stats = CorpusStats()
        self.writer = writer
        self._forwards = self._forward_batches()

    # -- forward passes
    def _forward_batches(self) -> Iterator[tuple[Any, ContextBuilder]]:
        bs, world, rank = self.ocfg.batch_size, self.dist.world, self.dist.rank
        while True:
            builder = ContextBuilder(self.tok, self.ocfg.ctx, self.ocfg.packing)
            docs = iter_documents(self.corpus, self.stats)
            mine = 0
            for j, batch in enumerate(prefetch(builder.batches(docs, bs, skip_contexts=self.next_batch * bs)),
                                      start=self.next_batch):
                if j % world != rank:
                    continue
                mine += 1
                self.next_batch = j + 1
                yield batch, builder
            if mine == 0 and self.next_batch == 0:
                raise ValueError(f"corpus {self.corpus.path} has fewer forward batches of --batch-size {bs} contexts "
                                 f"than the {world} processes; lower --batch-size or use a larger corpus")
            self.epoch, self.next_batch = self.epoch + 1, 0

    def _forward(self) -> None:
        batch, builder = next(self._forwards)
        ids = torch.from_numpy(batch.input_ids).to(self.model_device)
        mask = torch.from_numpy(batch.attention_mask).to(self.model_device)
        resid, route = self.runner(ids, mask)
        keep = torch.from_numpy(batch.attention_mask.reshape(-1).astype(bool)).to(resid.device)
        if self.writer is not None and not self.writer.done:
            self.writer.add(batch, builder, resid, route, keep, {
                "documents_read": self.stats.documents, "skipped_non_utf8": self.stats.skipped_lines,
                "skipped_empty": self.stats.skipped_empty})
        rows = resid if bool(keep.all()) else resid.index_select(0, keep.nonzero().squeeze(1))
        if not torch.isfinite(rows.sum()) and not torch.isfinite(rows).all():
            raise ValueError(f"the model produced non-finite activations in forward batch {self.next_batch - 1} "
                             f"(--dtype {self.ocfg.dtype}); use --dtype float32 or bfloat16")
        self.pending.append(rows.to(self.device))
        self.have += rows.shape[0]

    def _take(self, n: int) -> torch.Tensor:
        while self.have < n:
            self._forward()
        return torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]

    # -- what training reads
    def sample(self, n: int) -> torch.Tensor:
        """The first ``n`` rows (forward order) of the stream from where it starts; they stay in it."""
        rows = self._take(n)
        self.pending = [rows]
        return rows[:n].to(torch.float32, copy=True)

    def batches(self) -> Iterator[torch.Tensor]:
        """This process's batches (``batch_tokens / world`` rows, float32), forever."""
        b = self.local
        while True:
            rows = self._take(self.mix if self.mix else b)
            if self.mix:
                rows = rows[torch.randperm(rows.shape[0], generator=self.gen).to(rows.device)]
                n = rows.shape[0] // 2 // b
            else:
                n = rows.shape[0] // b
            self.pending = [rows[n * b:]]
            for i in range(n):
                self.have -= b
                yield rows[i * b:(i + 1) * b].to(torch.float32, copy=True)

    def close(self) -> None:
        """Stop reading the corpus (ends the tokenising thread)."""
        self._forwards.close()

    def cursor_state(self) -> dict[str, Any]:
        """``corpus_cursor`` of a checkpoint: every process's (pass, next forward batch); a collective under DDP."""
        mine = torch.zeros(self.dist.world, 3, dtype=torch.int64)
        mine[self.dist.rank] = torch.tensor([self.epoch, self.next_batch, self.have])
        ranks = _all_reduce_cpu(mine, self.dist).tolist()
        return {"corpus_cursor": {"world": self.dist.world, "ranks": [r[:2] for r in ranks],
                                  "buffered_rows": sum(r[2] for r in ranks)}, "online": self.ocfg.content()}


def _all_reduce_cpu(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world > 1:
        dev = torch.device("cuda", dist.local_rank) if tdist.get_backend() == "nccl" else t.device
        moved = t.to(dev)
        tdist.all_reduce(moved)
        return moved.cpu()
    return t


def check_saved(ocfg: OnlineConfig, world: int, out: Path) -> Callable[[dict[str, Any], str], None]:
    """``check_source`` of :func:`routesae.train.check_run`: the online options (and process count) a run
    was started with must be repeated."""
    def check(saved: dict[str, Any], where: str) -> None:
        was = saved.get("online")
        if not isinstance(was, dict):
            raise ValueError(f"{where} records no online options: {out} was trained on a store; resume it with "
                             f"routesae train STORE --out {out} --resume")
        now = ocfg.content()
        diff = [k for k in now if k in was and was[k] != now[k]]
        if diff:
            raise ValueError(f"{out} was trained online with {', '.join(f'{k}={was[k]!r}' for k in diff)}; repeat "
                             f"the original options with --resume")
        cur = saved.get("corpus_cursor", {"world": world, "ranks": [[0, 0]] * world})
        ok = (isinstance(cur, dict) and isinstance(cur.get("ranks"), list) and cur.get("world") == len(cur["ranks"])
              and all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and x >= 0 for x in r)
                      for r in cur["ranks"]))
        if not ok:
            raise ValueError(f"{where}: corpus_cursor is malformed; the checkpoint is damaged, start a new --out")
        if cur["world"] != world:
            raise ValueError(f"{out} was trained online by {cur['world']} processes; resume with the same number "
                             f"(torchrun --nproc_per_node {cur['world']}), not {world}")
    return check


def online_configs(cfgs: list[TrainConfig], ocfg: OnlineConfig, n_layers: int) -> tuple[list[int], list[TrainConfig]]:
    """The hooked layers (``ocfg.layers`` plus every TopK ``--layer``) and the configs reading them."""
    spec = parse_layers(ocfg.layers, n_layers)
    extra = {c.layer for c in cfgs if c.arch == "topk" and c.layer is not None}
    bad = [lay for lay in extra if not 0 <= lay < n_layers]
    if bad:
        raise ValueError(f"--layer {bad[0]} is out of range: this model has {n_layers} blocks, so use "
                         f"0..{n_layers - 1}")
    captured = sorted(set(spec) | extra)
    if any(c.layers is not None for c in cfgs):
        raise ValueError("online, --layers names the hooked blocks (every one read by RouteSAE/MLSAE); pass no "
                         "layer list in the TrainConfig (internal error)")
    return captured, [replace(c, layers=None if c.arch == "topk" or spec == captured else spec) for c in cfgs]


def train_online(cfgs: list[TrainConfig], ocfg: OnlineConfig,
                 callback: Callable[[int, SparseAutoencoder, dict], None] | None = None,
                 root: str | Path | None = None) -> list[Path]:
    """Train every SAE of ``cfgs`` online (see the module docstring); returns their run folders.

    One config: ``cfg.out`` is the run (``root`` defaults to it). Several (routesae/train_many.py):
    ``root`` (default: the parent of the first) holds ``runs.json`` and the sub-runs.
    """
    for c in cfgs:
        c.validate()
    check_shared(cfgs)
    if cfgs[0].tokens is None:
        raise ValueError("online training needs --tokens (the corpus is read as a stream of unknown length)")
    if ocfg.sample_store < 0:
        raise ValueError(f"--sample-store {ocfg.sample_store} must be >= 0 tokens (0: no sample store)")
    dev_name = device_name(cfgs[0].device)
    with process_group(cuda=dev_name.startswith("cuda")) as dist:
        multi = len(cfgs) > 1
        root = Path(root) if root else Path(cfgs[0].out).parent if multi else Path(cfgs[0].out)
        return _train_online(cfgs, ocfg, dist, callback, dev_name, root, multi)


def _train_online(cfgs, ocfg: OnlineConfig, dist: Dist, callback, dev_name: str, root: Path, multi: bool
                  ) -> list[Path]:
    device = rank_device(dev_name, dist)
    main = dist.rank == 0
    mix = mix_rows(ocfg, cfgs[0].batch_tokens, dist.world)
    if ocfg.device_map and dist.world > 1:
        raise ValueError(f"--device-map {ocfg.device_map} spreads one model over the GPUs of one process; under "
                         f"torchrun every process holds a whole model: drop --device-map")
    sample_path = root / SAMPLE_DIR if ocfg.sample_store else None
    ccfg = capture_config(ocfg, cfgs[0], sample_path or root / SAMPLE_DIR, str(device))
    corpus = CorpusConfig(ocfg.corpus, ocfg.text_field, ocfg.domain_field, ocfg.split, seed=cfgs[0].seed)
    override = check_options(ccfg)  # no --routing-override online: the parsed empty one
    first_document(corpus)
    fingerprint = corpus_fingerprint(corpus)
    source_desc = {"online": {**ocfg.content(), "corpus_fingerprint": fingerprint, "seed": cfgs[0].seed}}
    if multi:
        check_sweep_out(root, cfgs, source_desc)
    else:
        check_out(root, cfgs[0].resume)  # again in check_run; here before the model loads
    wandb_module = import_wandb(cfgs[0], main)
    model, tok, runner_cls, n_layers, d_model, conf = _open(ccfg)
    if tok is None:
        raise CaptureError(f"no tokenizer found with model '{ocfg.model}'; put tokenizer files in the checkpoint "
                           f"folder")
    captured, cfgs = online_configs(cfgs, ocfg, n_layers)
    layer_spec = ",".join(map(str, captured))
    ccfg = capture_config(ocfg, cfgs[0], sample_path or root / SAMPLE_DIR, str(device), layer_spec,
                          ocfg.sample_store or None)
    if sample_path is not None:
        preflight(ccfg)  # the sample store folder: new, or this sample (a resume)
    cfgs = [replace(c, store=str(sample_path) if sample_path else "") for c in cfgs]
    view = OnlineView(ocfg, cfgs[0], model, n_layers, d_model, captured, fingerprint)
    meta = {"model": view.manifest["model"]["name_or_path"], "store": str(sample_path) if sample_path else None,
            "online": True}
    plans = [check_run(c, view, dist.world, meta, check_saved(ocfg, dist.world, Path(c.out))) for c in cfgs]
    first = min(plans, key=lambda p: p.state["step"] if p.state else 0)
    cursor = None
    if first.state is not None:
        cursor = tuple(first.state["corpus_cursor"]["ranks"][dist.rank])
    runner = runner_cls(model, captured, ocfg.router_logits, override)
    writer = source = None
    try:
        fresh_sample = sample_path is not None and not (sample_path / MANIFEST).exists()
        if fresh_sample and dist.world == 1 and cursor is None:
            header, k_max, extras = _header(ccfg, model, conf, tok, runner, captured, n_layers, d_model, override)
            header["corpus"]["fingerprint"] = fingerprint
            writer = SampleWriter(ccfg, header, tok, int(conf.vocab_size), runner.moe_layers, k_max, extras,
                                  len(captured) * d_model)
        model_device = first_device(model) if ocfg.backend == "hf" else device
        source = OnlineSource(runner, tok, device, model_device, ocfg, corpus, cfgs[0].batch_tokens, mix, dist,
                              cfgs[0].seed, cursor, writer)
        summary = {"path": str(sample_path) if sample_path else None, "identity": view.identity(),
                   "model": view.manifest["model"], "layers": captured, "tokens": None, "d_model": d_model,
                   "n_layers": n_layers, "corpus_fingerprint": fingerprint, "split": ocfg.split, "online": True}
        if multi and main:
            root.mkdir(parents=True, exist_ok=True)
            write_index(root, cfgs, None, source_desc, sample_store=SAMPLE_DIR if sample_path else None)
        trainees = []
        for plan in plans:
            sel = selector(captured, None, plan.r)
            t = start_run(plan, view, dist, device, extra=source.cursor_state,
                          summary={**summary, "tokens": plan.r["tokens"]}, sample=_sampler(source, sel),
                          config_extra={"online": ocfg.content()})
            t.select = sel
            trainees.append(t)
        if writer is not None:
            writer.arm()

        def finish_sample() -> None:
            if sample_path is None or not main or _complete(sample_path):
                return
            if writer is not None:
                writer.close()
            runner.close()
            log.info("capturing the sample store %s (%d tokens)", sample_path, ocfg.sample_store)
            hf = ocfg.backend == "hf"
            with _one_process():  # rank 0 alone: not capture's multi-process path under torchrun
                capture(ccfg, model=model if hf else None, tokenizer=tok if hf else None)

        if multi:
            run_many(trainees, cfgs, source.batches(), dist, device, callback, root, source_desc,
                     SAMPLE_DIR if sample_path else None, after=finish_sample)
        else:
            t = trainees[0]
            if t.step < t.total:
                run_loop([t], source.batches(), dist, device, callback, wandb_module)
            finish_sample()
        return [t.out for t in trainees]
    finally:
        if source is not None:
            source.close()
        if writer is not None:
            writer.close()
        runner.close()


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """Hide torchrun's ``WORLD_SIZE`` for a call (capture then runs in this process only)."""
    was = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if was is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = was


def _complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() and bool(Store(path).manifest.get("complete"))


def _sampler(source: OnlineSource, sel: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[int], torch.Tensor]:
    return lambda n: source.sample(n) if sel is None else sel(source.sample(n))


__all__ = ["OnlineConfig", "OnlineSource", "SAMPLE_DIR", "train_online"]
