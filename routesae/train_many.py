"""Many SAEs from one read of the data: ``routesae train --arch routesae,topk --k 16,32 ...``.

Every combination of the swept options (``arch``, ``k``, ``latents``, ``router``) trains on the
same batches: one read of the store (or one forward pass of the model, routesae/online.py) feeds
every SAE through the one training loop (:func:`routesae.train.run_loop`). Each SAE gets its own
ordinary run folder under ``RUN`` (``config.json``, ``sae.safetensors``, ``train_config.json``,
``metrics.jsonl``, ``checkpoint/``) that evaluate, analyze and report accept; ``RUN/runs.json``
lists them (:func:`write_index`)::

    {"format": "routesae-runs/1", "source": {"store": ..., "identity": ..., "order": "shuffle"},
     "sweep": {"arch": [...], "k": [...], "latents": [...], "router": [...]},
     "tokens": ..., "batch_tokens": ..., "sample_store": null,
     "runs": [{"name": "routesae-k16", "path": "routesae-k16", "arch": ..., "k": ..., "latents": ...,
               "router": ..., "status": "training" | "done" | "diverged" | "interrupted", "error": null}]}

Sub-run names are the architecture plus each swept value (``topk-k16-m4096``); the router is
swept for RouteSAE only (TopK and MLSAE have none), and options that belong to one architecture
(``--layer`` to TopK, ``--layers`` to RouteSAE/MLSAE, ``--route-balance`` to RouteSAE) go to the
sub-runs of that architecture only.

From a store, the stream is the one a single run reads (the seeded shuffle of
:meth:`Store.batches`, all captured layers, each SAE taking its own layers), and each SAE is
initialised from the same seeded sample as a single run; so every sub-run equals the run
``routesae train STORE --out SUB`` with its options would give, bit for bit on CPU, and can also be
resumed alone. ``order="sequential"`` (Python API) reads the rows in capture order instead (the
order online training reads them with mixing off; :func:`sequential_batches`).

Resume: ``--resume`` continues every sub-run from its checkpoint; the stream starts at the
smallest step among them and a sub-run checkpointed later skips the batches it trained on. A
sub-run whose loss diverges stops (its last good checkpoint is kept, ``runs.json`` says
``diverged``) and the others go on; TrainingDiverged names it at the end.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_json
from .run_guard import read_json_object
from .sae import SparseAutoencoder
from .store import Store, StoreError
from .train import (
    TrainConfig,
    Trainee,
    TrainingDiverged,
    TrainingInterrupted,
    check_run,
    device_name,
    rank_device,
    ranked,
    run_loop,
    start_run,
)
from .train_setup import Dist, process_group, store_stream, verify_store

log = logging.getLogger(__name__)
INDEX = "runs.json"
INDEX_FORMAT = "routesae-runs/1"
SWEPT = ("arch", "k", "latents", "router")


def parse_list(option: str, text: str | int | None, kind: type) -> list[Any]:
    """``"16,32,64"`` -> ``[16, 32, 64]`` (``kind`` int or str); one-line ValueError naming ``option``."""
    if text is None or isinstance(text, int):
        return [text]
    parts = [p.strip() for p in str(text).split(",")]
    if not all(parts):
        raise ValueError(f"{option} {text!r} has an empty item; give one value or a comma-separated list")
    if kind is int:
        try:
            parts = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{option} {text!r} is not an integer or a comma-separated list of integers "
                             f"(e.g. 16,32,64)") from None
    if len(set(parts)) != len(parts):
        raise ValueError(f"{option} {text!r} lists a value twice; list each value once")
    return parts


def expand_sweep(base: TrainConfig, arch: list[str], k: list[int], latents: list[int | None],
                 router: list[str]) -> list[TrainConfig]:
    """Every combination as a TrainConfig with ``out = base.out/NAME`` (one combination: ``base`` itself
    with those values). Options of one architecture go to its sub-runs only (module docstring)."""
    swept = {"arch": len(arch) > 1, "k": len(k) > 1, "latents": len(latents) > 1, "router": len(router) > 1}
    out, seen = [], set()
    for a, kk, m, rt in itertools.product(arch, k, latents, router):
        rt = rt if a == "routesae" else router[0]  # only RouteSAE has a router
        if (a, kk, m, rt) in seen:
            continue
        seen.add((a, kk, m, rt))
        name = "-".join([a] + ([f"k{kk}"] if swept["k"] else []) + ([f"m{m}"] if swept["latents"] else [])
                        + ([rt] if swept["router"] and a == "routesae" else []))
        cfg = replace(base, arch=a, k=kk, latents=m, router=rt, out=str(Path(base.out) / name))
        if len(arch) > 1:
            cfg = replace(cfg, layer=base.layer if a == "topk" else None, layers=None if a == "topk" else base.layers,
                          route_balance=base.route_balance if a == "routesae" else 0.0)
        out.append(cfg)
    if len(out) == 1:
        out[0].out = base.out
    return [c.validate() for c in out]


def run_name(cfg: TrainConfig) -> str:
    return Path(cfg.out).name


def check_sweep_out(root: Path, cfgs: list[TrainConfig], source: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse a ``--out`` a sweep must not write into (nothing is written); return its ``runs.json`` if any.

    A new or empty folder starts a sweep; a folder with ``runs.json`` continues it only with the same
    sub-runs and data source (each sub-run is then checked as a run: routesae/run_guard.py).
    """
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} is a file, not a folder; choose a folder path for the runs")
    if not root.exists() or not any(root.iterdir()):
        return None
    index = read_json_object(root / INDEX, "the sweep is damaged, start a new --out")
    if index is None:
        raise ValueError(f"--out {root} is not empty and holds no sweep ({INDEX}); choose a new or empty folder "
                         f"for the runs")
    if not isinstance(index, dict) or not isinstance(index.get("runs"), list):
        raise ValueError(f"{root / INDEX} is not a runs index; the sweep is damaged, start a new --out")
    names = [r.get("name") for r in index["runs"] if isinstance(r, dict)]
    want = [run_name(c) for c in cfgs]
    if names != want:
        raise ValueError(f"{root} holds the sweep {', '.join(map(str, names))}; repeat its options (or choose "
                         f"another --out) to train {', '.join(want)}")
    was = {k: v for k, v in (index.get("source") or {}).items() if k in ("store", "identity", "order", "online")}
    now = {k: v for k, v in source.items() if k in was and k != "store"}
    if any(was.get(k) != v for k, v in now.items()):
        raise ValueError(f"{root} was trained from another data source ({INDEX} source); resume with the "
                         f"original store or model and corpus, or choose another --out")
    return index


def write_index(root: Path, cfgs: list[TrainConfig], trainees: list[Trainee] | None, source: dict[str, Any],
                status: dict[str, str] | None = None, sample_store: str | None = None) -> None:
    """``RUN/runs.json`` (atomically): the data source, the sweep and each sub-run's options and status."""
    status = status or {}
    runs = []
    for i, c in enumerate(cfgs):
        t = trainees[i] if trainees else None
        name = run_name(c)
        runs.append({"name": name, "path": name, "arch": c.arch, "k": c.k,
                     "latents": t.r["latents"] if t else c.latents, "router": c.router,
                     "layers": t.r["layers"] if t else c.layers, "status": status.get(name, "training"),
                     "error": t.failed if t else None})
    sweep = {k: sorted({getattr(c, k) for c in cfgs}, key=str) for k in SWEPT}
    atomic_write_json(root / INDEX, {"format": INDEX_FORMAT, "source": source, "sweep": sweep,
                                     "tokens": trainees[0].total * cfgs[0].batch_tokens if trainees else cfgs[0].tokens,
                                     "batch_tokens": cfgs[0].batch_tokens, "sample_store": sample_store,
                                     "runs": runs})


def check_shared(cfgs: list[TrainConfig]) -> None:
    """The options every SAE of one stream must share (one-line ValueError)."""
    for name in ("tokens", "batch_tokens", "seed", "buffer_shards", "device", "resume", "verify"):
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise ValueError(f"every SAE of one sweep shares --{name.replace('_', '-')} (internal error)")
    if len(cfgs) > 1 and any(c.wandb for c in cfgs):
        raise ValueError("--wandb logs one run; with several SAEs, drop --wandb (each sub-run has metrics.jsonl)")


def selector(captured: list[int], stream_layer: int | None, r: dict[str, Any]
             ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """This SAE's input from a batch of every layer in ``captured`` (or of the one ``stream_layer``)."""
    if stream_layer is not None:
        return None
    if len(r["layers"]) == 1 and r["positions"] is None:  # topk: one layer of the stack
        pos = captured.index(r["layers"][0])
        return lambda b: b[:, pos].contiguous()
    if r["positions"] is None:
        return None
    positions = r["positions"]
    return lambda b: b[:, positions]


def sequential_batches(store: Store, batch_tokens: int, start: int, layer: int | None = None
                       ) -> Iterator[torch.Tensor]:
    """The rows of ``store`` in capture order (shard by shard), ``batch_tokens`` at a time, from batch
    ``start``; each pass ends with the last whole batch (the rest is dropped) and the next begins again."""
    per_pass = store.n_tokens // batch_tokens
    if per_pass < 1:
        raise StoreError(f"store {store.root} has {store.n_tokens} tokens, fewer than --batch-tokens "
                         f"{batch_tokens}; lower --batch-tokens or capture more")
    offset = start % per_pass  # batches of the first pass already trained on
    while True:
        skip, emitted = offset * batch_tokens, offset
        pending: list[torch.Tensor] = []
        for s in store.shards:
            if emitted >= per_pass:
                break
            if skip >= s["tokens"]:
                skip -= s["tokens"]
                continue
            rows = store.load_resid(s["index"], layer)[skip:].float()
            skip = 0
            if not torch.isfinite(rows.sum()) and not torch.isfinite(rows).all():
                raise StoreError(f"store {store.root} shard {s['index']} holds non-finite activations; capture it "
                                 f"again")
            cat = torch.cat([*pending, rows])
            n = min(cat.shape[0] // batch_tokens, per_pass - emitted)
            for i in range(n):
                yield cat[i * batch_tokens:(i + 1) * batch_tokens].clone()
            pending, emitted = [cat[n * batch_tokens:]], emitted + n
        offset = 0


def train_many(cfgs: list[TrainConfig], callback: Callable[[int, SparseAutoencoder, dict], None] | None = None,
               root: str | Path | None = None, order: str = "shuffle") -> list[Path]:
    """Train every SAE of ``cfgs`` (from :func:`expand_sweep`) on one read of their store; returns the sub-runs.

    ``root``: the sweep folder holding ``runs.json`` (default: the parent of the first sub-run).
    ``order``: "shuffle" (the single-run stream) or "sequential" (capture order).
    """
    for c in cfgs:
        c.validate()
    check_shared(cfgs)
    if order not in ("shuffle", "sequential"):
        raise ValueError(f"unknown order {order!r}; choose shuffle or sequential")
    if len({c.store for c in cfgs}) > 1:
        raise ValueError("every SAE of one sweep reads the same store (internal error)")
    dev_name = device_name(cfgs[0].device)
    with process_group(cuda=dev_name.startswith("cuda")) as dist:
        return _train_many(cfgs, dist, callback, dev_name, Path(root) if root else Path(cfgs[0].out).parent, order)


def _train_many(cfgs, dist: Dist, callback, dev_name: str, root: Path, order: str) -> list[Path]:
    device = rank_device(dev_name, dist)
    store = Store(cfgs[0].store)
    source = {"store": str(store.root), "identity": store.identity(), "order": order}
    check_sweep_out(root, cfgs, source)
    plans = [check_run(c, store, dist.world) for c in cfgs]
    verify_store(cfgs[0], store)
    topk_layers = {p.r["layers"][0] for p in plans if p.cfg.arch == "topk"}
    layer = topk_layers.pop() if len(topk_layers) == 1 and all(p.cfg.arch == "topk" for p in plans) else None
    main = dist.rank == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        write_index(root, cfgs, None, source)
    first_rows = None
    if order == "sequential":
        first_rows = _first_rows(store, layer, max(c.init_samples for c in cfgs))
    trainees = []
    for plan in plans:
        sel = selector(store.layers, layer, plan.r)
        sample = None if first_rows is None else _first_n(first_rows, sel)
        t = start_run(plan, store, dist, device, extra=lambda plan=plan: {"store_identity": plan.identity},
                      sample=sample)
        t.select = sel
        trainees.append(t)
    start = min(t.step for t in trainees)
    if order == "shuffle":
        stream = store_stream(store, cfgs[0].batch_tokens, cfgs[0].seed, cfgs[0].buffer_shards, start, layer)
    else:
        stream = sequential_batches(store, cfgs[0].batch_tokens, start, layer)
    run_many(trainees, cfgs, ranked(stream, dist), dist, device, callback, root, source)
    return [t.out for t in trainees]


def _first_n(rows: torch.Tensor, sel: Callable[[torch.Tensor], torch.Tensor] | None
             ) -> Callable[[int], torch.Tensor]:
    return lambda n: (rows if sel is None else sel(rows))[:n]


def _first_rows(store: Store, layer: int | None, n: int) -> torch.Tensor:
    return next(sequential_batches(store, min(n, store.n_tokens), 0, layer))


def run_many(trainees: list[Trainee], cfgs: list[TrainConfig], stream: Iterator[torch.Tensor], dist: Dist,
             device: torch.device, callback, root: Path, source: dict[str, Any], sample_store: str | None = None,
             after: Callable[[], None] | None = None) -> None:
    """:func:`run_loop` over the sub-runs, then ``runs.json`` with each one's status (rank 0).

    ``after()`` runs once the loop ends normally (before ``runs.json`` is finalised)."""
    status: dict[str, str] = {}
    ended = False
    try:
        if min(t.step for t in trainees) < trainees[0].total:
            run_loop(trainees, stream, dist, device, callback, keep_going=True, where=f"{root}/*/checkpoint")
        if after is not None:
            after()
        ended = True
    except TrainingInterrupted:
        status = {run_name(t.cfg): "interrupted" for t in trainees if t.failed is None}
        raise
    finally:
        for t in trainees:
            status.setdefault(run_name(t.cfg), "diverged" if t.failed else "done" if ended else "stopped")
        if dist.rank == 0:
            write_index(root, cfgs, trainees, source, status, sample_store)
    failed = [t for t in trainees if t.failed]
    if failed:
        names = ", ".join(run_name(t.cfg) for t in failed)
        raise TrainingDiverged(f"{len(failed)} of {len(trainees)} SAEs diverged ({names}; see {root / INDEX}); the "
                               f"others finished: {failed[0].failed}")


__all__ = ["INDEX", "check_sweep_out", "expand_sweep", "parse_list", "run_many", "selector", "sequential_batches",
           "train_many", "write_index"]
