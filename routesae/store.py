"""The activation store: a folder of atomically written shards described by ``manifest.json``.

Layout of a store folder::

    manifest.json                    format version, model, layers, experts, shards (tokens, sha256)
    acts-NNNNN.safetensors           resid   [tokens, n_captured_layers, d_model]
    router-NNNNN.safetensors         indices [tokens, n_moe_layers, k_max] int16 (-1 = unused slot)
                                     weights [tokens, n_moe_layers, k_max] float16 (as the model applied them)
                                     n_active [tokens, n_moe_layers] uint8
                                     logits  [tokens, n_moe_layers, E] float16 (optional)
                                     <extra> [tokens, n_moe_layers] float16 (e.g. shared_gate)
    tokens.parquet/part-NNNNN.parquet  token_id, token, doc_id, position, ctx_pos, context, domain, shard, row
    ranks/rank-RRRRR.json            multi-process captures only: each rank's own progress (routesae/store_ranks.py)

Every file is written to a temporary name (``.NAME.tmp-PID``) and renamed; the manifest is
rewritten (atomically) only after all files of a shard exist, so an interrupted capture leaves a
valid store that resumes after its last complete shard. Rows within a shard keep corpus order,
so the tokens around a row are its neighbours in the context.

A writer opens only a new folder, an empty one, or a store made with the same arguments over the
same corpus (its fingerprint); a store with no tokens yet is replaced. It removes only its own
leftover temporary names, and never rewrites a manifest it cannot read. A missing or garbled
file is a one-line StoreError naming it.

Activations are stored in the manifest's ``store_dtype`` (else its ``dtype``: float32, float16 or
bfloat16); readers hand out float32 one minibatch at a time (:meth:`Store.batches`), never an
upcast copy of the shards.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open

from routesae.atomic import atomic_path, atomic_write_json
from routesae.shard_file import write_chunked_safetensors
from routesae.store_lock import LOCK_NAME

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_DIR = "tokens.parquet"
RANKS_DIR = "ranks"  # per-rank progress files of a multi-process capture (routesae/store_ranks.py)


class StoreError(ValueError):
    """A store that cannot be used as asked; the message says what to change."""


Chunks = torch.Tensor | list[torch.Tensor]


def _chunk_list(x: Chunks) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _shard_name(kind: str, index: int, ext: str = "safetensors") -> str:
    return f"{kind}-{index:05d}.{ext}"


def _part_name(index: int) -> str:
    return f"{TOKENS_DIR}/part-{index:05d}.parquet"


# the temporary names atomic_path gives the writer's own files (a user's .notes.tmp-1 is not one)
_ROOT_TEMP = re.compile(r"\.(?:(?:acts|router)-\d{5}\.safetensors|manifest\.json)\.tmp-\d+")
_TOKENS_TEMP = re.compile(r"\.part-\d{5}\.parquet\.tmp-\d+")
_RANK_FILE = re.compile(r"rank-\d{5}\.json")
_RANK_TEMP = re.compile(r"\.rank-\d{5}\.json\.tmp-\d+")


def _leftovers(root: Path) -> list[Path]:
    """Temporary files an interrupted writer left in ``root`` (exact writer names only)."""
    found = [p for p in root.iterdir() if _ROOT_TEMP.fullmatch(p.name) and p.is_file()]
    for sub, pattern in ((TOKENS_DIR, _TOKENS_TEMP), (RANKS_DIR, _RANK_TEMP)):
        if (root / sub).is_dir():
            found += [p for p in (root / sub).iterdir() if pattern.fullmatch(p.name) and p.is_file()]
    return found


def rank_files(root: str | Path) -> list[Path]:
    """The per-rank progress files of a multi-process capture in ``root`` (none for other stores)."""
    folder = Path(root) / RANKS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _RANK_FILE.fullmatch(p.name) and p.is_file())


def _rank_progress(root: Path) -> bool:
    """Whether a rank of a multi-process capture recorded a shard in ``root`` (an unreadable file counts)."""
    for path in rank_files(root):
        try:
            if json.loads(path.read_bytes()).get("shards"):
                return True
        except (ValueError, OSError, AttributeError):
            return True
    return False


def drop_rank_files(root: str | Path) -> None:
    """Remove the per-rank progress files (a store being replaced, whose ranks wrote no shard)."""
    for path in rank_files(root):
        path.unlink(missing_ok=True)
    try:
        (Path(root) / RANKS_DIR).rmdir()
    except OSError:  # missing, or holds something else: left alone
        pass


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_manifest(root: str | Path) -> dict:
    """``root/manifest.json`` as a dict; a one-line StoreError (the file is left as it is) when garbled."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        why = f"not valid JSON: {exc.msg} at line {exc.lineno}"
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    except OSError as exc:
        why = f"unreadable: {exc.strerror}"
    else:
        if isinstance(manifest, dict):
            return manifest
        why = "not a JSON object"
    raise StoreError(f"{path} is garbled ({why}); it was left as it is: capture the store again into a new --out")


def existing_store(root: str | Path) -> dict | None:
    """The manifest of the store that writing into ``root`` would continue, or None when ``root`` is
    missing, empty or holds only a capture's own leftovers (lock file, temporary names). A file, a
    garbled manifest or a folder of other files is a StoreError; nothing is touched."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StoreError(f"--out {root} is a file, not a folder; pass a new folder, an empty one or a store")
    if not root.exists():
        return None
    if (root / MANIFEST).exists():
        return read_manifest(root)
    ours = set(_leftovers(root)) | {root / LOCK_NAME}
    others = sorted(p.name for p in root.iterdir() if p not in ours and not (
        p.name == TOKENS_DIR and p.is_dir() and all(q in ours for q in p.iterdir())))
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise StoreError(f"--out {root} is a folder that is not a store (it holds {others[0]}{more}); "
                         f"choose a new or empty folder")
    return None


def resumable(root: str | Path, old: dict, capture_args: dict, fingerprint: str | None) -> bool:
    """Whether writing with ``capture_args`` over a corpus with ``fingerprint`` continues the store whose
    manifest is ``old`` (True), or replaces it because it holds nothing yet (False); a StoreError
    when continuing would mix two different captures."""
    if not old.get("shards") and not old.get("tokens") and not _rank_progress(Path(root)):
        return False
    if old.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"store {root} has format {old.get('format_version')}, this routesae writes "
                         f"{FORMAT_VERSION}; capture into a new --out")
    was_args = old.get("capture_args") or {}
    if was_args != capture_args:
        diff = sorted(k for k in set(was_args) | set(capture_args) if was_args.get(k) != capture_args.get(k))
        if diff == ["world_size"]:
            was, now = was_args.get("world_size", 1), capture_args.get("world_size", 1)
            how = "without torchrun" if was == 1 else f"under torchrun --nproc_per_node {was}"
            raise StoreError(f"store {root} was captured by {was} process(es), this capture runs {now}; "
                             f"resume it {how}, or capture into a new --out")
        raise StoreError(f"store {root} was made with different arguments ({', '.join(diff)}); "
                         f"use a new --out folder, or delete this one to start again")
    corpus = old.get("corpus") or {}
    was = corpus.get("fingerprint")
    if fingerprint and was and was != fingerprint:
        raise StoreError(f"corpus {corpus.get('path')} changed since this store was captured "
                         f"(fingerprint {was} -> {fingerprint}); capture into a new --out")
    return True


# ---------------------------------------------------------------- writing


def write_shard_files(root: Path, index: int, resid: Chunks, router: dict[str, Chunks] | None,
                      tokens: pd.DataFrame) -> tuple[int, dict[str, str]]:
    """Write shard ``index``'s files (activations, router records, token part), each atomically;
    return its number of rows and ``{file name: sha256}`` of the safetensors files. Nothing is recorded."""
    resid = _chunk_list(resid)
    router = {k: _chunk_list(v) for k, v in router.items()} if router else None
    n = sum(c.shape[0] for c in resid)
    if len(tokens) != n or (router and any(sum(c.shape[0] for c in v) != n for v in router.values())):
        raise StoreError("shard parts disagree on the number of tokens (internal error)")
    files: dict[str, str] = {}
    name = _shard_name("acts", index)
    files[name] = write_chunked_safetensors(root / name, {"resid": resid})
    if router:
        name = _shard_name("router", index)
        files[name] = write_chunked_safetensors(root / name, router)
    tokens = tokens.assign(shard=np.int32(index), row=np.arange(n, dtype=np.int64))
    with atomic_path(root / _part_name(index)) as tmp:
        tokens.to_parquet(tmp, index=False)
    return n, files



class StoreWriter:
    """Writes shards into a store folder and keeps the manifest in step.

    ``header`` describes model and layers; ``capture_args`` are the arguments that decide the
    store's content. Opening a folder that holds a store made with other arguments or over a
    changed corpus (``header["corpus"]["fingerprint"]``) is refused, and so is a folder that is
    not a store (:func:`existing_store`). Writers that may run at the same time hold
    ``store_lock(root)`` around the writer (capture does).
    """

    def __init__(self, root: str | Path, header: dict, capture_args: dict):
        self.root = Path(root)
        old = existing_store(self.root)
        fingerprint = (header.get("corpus") or {}).get("fingerprint")
        if old is not None and resumable(self.root, old, capture_args, fingerprint):
            self.manifest = old
        else:  # a new folder, or a store without tokens (a failed start) made with any arguments
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format_version": FORMAT_VERSION, **header, "capture_args": capture_args,
                             "tokens": 0, "contexts": 0, "complete": False, "shards": []}
            atomic_write_json(self.root / MANIFEST, self.manifest)
            drop_rank_files(self.root)  # a multi-process start that wrote nothing
        (self.root / TOKENS_DIR).mkdir(exist_ok=True)
        for stale in _leftovers(self.root):  # no other writer runs (capture holds store_lock)
            stale.unlink(missing_ok=True)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def contexts_done(self) -> int:
        return int(self.manifest["contexts"])

    @property
    def tokens_done(self) -> int:
        return int(self.manifest["tokens"])

    def write_shard(self, resid: Chunks, router: dict[str, Chunks] | None,
                    tokens: pd.DataFrame, contexts_end: int) -> dict:
        """Write one shard (all rows of complete contexts) and then record it in the manifest.

        ``resid`` and each router array are a tensor or a list of row chunks (one per batch),
        written back to back without concatenating them in memory first.
        """
        index = len(self.manifest["shards"])
        n, files = write_shard_files(self.root, index, resid, router, tokens)
        shard = {"index": index, "tokens": n, "contexts_end": contexts_end, "sha256": files}
        self.manifest["shards"].append(shard)
        self.manifest["tokens"] += n
        self.manifest["contexts"] = contexts_end
        atomic_write_json(self.root / MANIFEST, self.manifest)
        return shard

    def finish(self, **extra: Any) -> None:
        self.manifest.update(extra)
        self.manifest["complete"] = True
        atomic_write_json(self.root / MANIFEST, self.manifest)


# ---------------------------------------------------------------- reading


@dataclass
class Batch:
    """One minibatch of token rows.

    resid: [B, L', d] (all captured layers) or [B, d] (one layer), float32 (converted per batch from the
           store's dtype)
    router: dict of router arrays for these rows (indices, weights, n_active, ...), or None
    rows: [B, 2] int64, (shard, row) of each token, to find it in ``tokens.parquet``
    """

    resid: torch.Tensor
    router: dict[str, torch.Tensor] | None
    rows: torch.Tensor


class Store:
    """Read access to a store folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is a file, not a store folder; pass the folder that "
                             f"`routesae capture --out` made")
        if not (self.root / MANIFEST).exists():
            raise StoreError(f"{self.root} is not a store (no manifest.json); create one with `routesae capture`")
        self.manifest = read_manifest(self.root)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store {self.root} has format {self.manifest.get('format_version')}, "
                             f"this routesae reads {FORMAT_VERSION}; capture it again")
        lacking = [k for k in ("layers", "d_model", "tokens", "shards") if k not in self.manifest]
        if lacking:
            raise StoreError(f"{self.root / MANIFEST} lacks {', '.join(lacking)}; capture the store again")

    # -- description
    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def moe_layers(self) -> list[int]:
        return list(self.manifest.get("moe_layers", []))

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def shards(self) -> list[dict]:
        return list(self.manifest["shards"])

    @property
    def dtype(self) -> str:
        """The dtype the activations are stored in (float32, float16 or bfloat16)."""
        return str(self.manifest.get("store_dtype") or self.manifest.get("dtype") or "float32")

    def layer_position(self, layer: int) -> int:
        """Position of block ``layer`` in the stored layer axis."""
        if layer not in self.layers:
            raise StoreError(f"layer {layer} was not captured in {self.root}; captured layers: {self.layers}")
        return self.layers.index(layer)

    # -- whole shards
    def _file(self, name: str) -> Path:
        path = self.root / name
        if not path.is_file():
            raise StoreError(f"store {self.root} lacks {name} (listed in its manifest); capture the store again")
        return path

    @contextmanager
    def _safetensors(self, name: str):
        path = self._file(name)
        try:
            with safe_open(path, framework="pt") as f:
                yield f
        except SafetensorError as exc:
            raise self._damaged(name, exc) from None

    def _damaged(self, name: str, exc: Exception) -> StoreError:
        return StoreError(f"cannot read store {self.root}: {name} is damaged ({_first_line(exc)}); "
                          f"capture the store again")

    def load_resid(self, shard: int, layer: int | None = None) -> torch.Tensor:
        pos = None if layer is None else self.layer_position(layer)
        with self._safetensors(_shard_name("acts", shard)) as f:
            return f.get_tensor("resid") if pos is None else f.get_slice("resid")[:, pos]

    def load_router(self, shard: int) -> dict[str, torch.Tensor]:
        name = _shard_name("router", shard)
        listed = shard < len(self.shards) and name in self.shards[shard].get("sha256", {})
        if not listed and not (self.root / name).exists():
            raise StoreError(f"store {self.root} has no router records (a dense model, or captured without them)")
        with self._safetensors(name) as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def tokens(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The token table of the whole store, in shard/row order."""
        frames = []
        for i in range(len(self.shards)):
            path = self._file(_part_name(i))
            try:
                frames.append(pd.read_parquet(path, columns=columns))
            except (OSError, ValueError) as exc:
                raise self._damaged(_part_name(i), exc) from None
        return pd.concat(frames, ignore_index=True)

    def verify(self) -> None:
        """Re-hash every shard file against the manifest; raise StoreError on the first mismatch or missing file."""
        for shard in self.shards:
            for name, digest in shard["sha256"].items():
                h = hashlib.sha256()
                with open(self._file(name), "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                if h.hexdigest() != digest:
                    raise StoreError(f"{self.root / name} does not match its sha256 in the manifest; "
                                     f"capture the store again")
            self._file(_part_name(shard["index"]))

    # -- shuffled minibatches
    def _groups(self, order: list[int], batch_size: int, buffer_shards: int) -> list[list[int]]:
        """Consecutive shards of ``order`` in groups of >= buffer_shards shards and >= batch_size rows."""
        sizes = [s["tokens"] for s in self.shards]
        groups: list[list[int]] = []
        cur: list[int] = []
        for s in order:
            cur.append(s)
            if len(cur) >= buffer_shards and sum(sizes[i] for i in cur) >= batch_size:
                groups.append(cur)
                cur = []
        if cur:
            if groups and sum(sizes[i] for i in cur) < batch_size:
                groups[-1].extend(cur)
            else:
                groups.append(cur)
        return groups

    def batches(self, batch_size: int, layer: int | None = None, seed: int = 0, shuffle: bool = True,
                buffer_shards: int = 2, with_router: bool = False, epochs: int | None = 1,
                start_batch: int = 0) -> Iterator[Batch]:
        """Shuffled minibatches with memory bounded by about ``buffer_shards`` shards.

        Each epoch visits the shards in a seeded random order, a group of ``buffer_shards``
        shards at a time, and yields the group's rows in random order; the rows left over after
        the last full batch of a group are dropped for this epoch (other epochs drop others).
        The stream is a pure function of ``seed``, so training resumes at any batch with
        ``start_batch``: groups before it are skipped without being read.
        """
        if not self.shards:
            raise StoreError(f"store {self.root} has no shards yet")
        if self.n_tokens < batch_size:
            raise StoreError(f"store {self.root} has {self.n_tokens} tokens, fewer than the batch size "
                             f"{batch_size}; capture more tokens or lower the batch size")
        sizes = [s["tokens"] for s in self.shards]
        epoch, emitted = 0, 0
        while epochs is None or epoch < epochs:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(sizes), generator=gen).tolist() if shuffle else list(range(len(sizes)))
            for group in self._groups(order, batch_size, buffer_shards):
                group_n = sum(sizes[s] for s in group)
                perm = torch.randperm(group_n, generator=gen) if shuffle else torch.arange(group_n)
                n_batches = group_n // batch_size
                if emitted + n_batches <= start_batch:  # resume: skip without reading
                    emitted += n_batches
                    continue
                resid, router, rows = self._load_group(group, layer, with_router)
                for b in range(n_batches):
                    if emitted >= start_batch:
                        idx = perm[b * batch_size:(b + 1) * batch_size]  # index_select: ~3x faster than resid[idx]
                        yield Batch(resid.index_select(0, idx).float(),
                                    {k: v.index_select(0, idx) for k, v in router.items()} if router else None,
                                    rows.index_select(0, idx))
                    emitted += 1
            epoch += 1

    def _load_group(self, group: list[int], layer: int | None, with_router: bool):
        resids, routers, rows = [], [], []
        for s in group:
            r = self.load_resid(s, layer)
            resids.append(r)
            if with_router:
                routers.append(self.load_router(s))
            rows.append(torch.stack([torch.full((r.shape[0],), s, dtype=torch.int64),
                                     torch.arange(r.shape[0], dtype=torch.int64)], 1))
        router = {k: torch.cat([x[k] for x in routers]) for k in routers[0]} if with_router else None
        return torch.cat(resids), router, torch.cat(rows)

    def identity(self) -> str:
        """A content hash of the store: sha256 of its token count, layers and every shard file's sha256.

        It is computed from the manifest only (no shard is read). Being content-based, a store that
        was moved, renamed or re-captured into the same shards keeps its identity; a store holding
        other data (other shards, more or fewer tokens, other layers) gets another. Training records
        it so that ``--resume`` on another store is refused.
        """
        spec = {"tokens": self.n_tokens, "layers": self.layers,
                "shards": [sorted(dict(s["sha256"]).items()) for s in self.shards]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
