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

Every file is written to a temporary name and renamed; the manifest is rewritten (atomically)
only after all files of a shard exist, so an interrupted capture leaves a valid store that
resumes after its last complete shard. Rows within a shard keep corpus order, so the tokens
around a row are its neighbours in the context.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from routesae.atomic import atomic_path, atomic_write_json
from routesae.shard_file import write_chunked_safetensors

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_DIR = "tokens.parquet"


class StoreError(ValueError):
    """A store that cannot be used as asked; the message says what to change."""


Chunks = torch.Tensor | list[torch.Tensor]


def _chunk_list(x: Chunks) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _shard_name(kind: str, index: int, ext: str = "safetensors") -> str:
    return f"{kind}-{index:05d}.{ext}"


# ---------------------------------------------------------------- writing


class StoreWriter:
    """Writes shards into a store folder and keeps the manifest in step.

    ``header`` describes model and layers; ``capture_args`` are the arguments that decide the
    store's content. Opening a folder that holds a store made with other arguments is refused.
    """

    def __init__(self, root: str | Path, header: dict, capture_args: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / TOKENS_DIR).mkdir(exist_ok=True)
        for stale in list(self.root.glob(".*.tmp-*")) + list((self.root / TOKENS_DIR).glob(".*.tmp-*")):
            stale.unlink()
        path = self.root / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("capture_args") != capture_args:
                diff = sorted(k for k in set(old.get("capture_args", {})) | set(capture_args)
                              if old.get("capture_args", {}).get(k) != capture_args.get(k))
                raise StoreError(
                    f"store {self.root} was made with different arguments ({', '.join(diff)}); "
                    f"use a new --out folder, or delete this one to start again"
                )
            self.manifest = old
        else:
            if any(self.root.glob("acts-*.safetensors")):
                raise StoreError(f"{self.root} holds shards but no manifest.json; use an empty --out folder")
            self.manifest = {"format_version": FORMAT_VERSION, **header, "capture_args": capture_args,
                             "tokens": 0, "contexts": 0, "complete": False, "shards": []}
            atomic_write_json(path, self.manifest)

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
        resid = _chunk_list(resid)
        router = {k: _chunk_list(v) for k, v in router.items()} if router else None
        n = sum(c.shape[0] for c in resid)
        if len(tokens) != n or (router and any(sum(c.shape[0] for c in v) != n for v in router.values())):
            raise StoreError("shard parts disagree on the number of tokens (internal error)")
        files: dict[str, str] = {}
        name = _shard_name("acts", index)
        files[name] = write_chunked_safetensors(self.root / name, {"resid": resid})
        if router:
            name = _shard_name("router", index)
            files[name] = write_chunked_safetensors(self.root / name, router)
        tokens = tokens.assign(shard=np.int32(index), row=np.arange(n, dtype=np.int64))
        with atomic_path(self.root / TOKENS_DIR / f"part-{index:05d}.parquet") as tmp:
            tokens.to_parquet(tmp, index=False)
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

    resid: [B, L', d] (all captured layers) or [B, d] (one layer), float32
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
        path = self.root / MANIFEST
        if not path.exists():
            raise StoreError(f"{self.root} is not a store (no manifest.json); create one with `routesae capture`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store {self.root} has format {self.manifest.get('format_version')}, "
                             f"this routesae reads {FORMAT_VERSION}; capture it again")

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

    def layer_position(self, layer: int) -> int:
        """Position of block ``layer`` in the stored layer axis."""
        if layer not in self.layers:
            raise StoreError(f"layer {layer} was not captured in {self.root}; captured layers: {self.layers}")
        return self.layers.index(layer)

    # -- whole shards
    def load_resid(self, shard: int, layer: int | None = None) -> torch.Tensor:
        with safe_open(self.root / _shard_name("acts", shard), framework="pt") as f:
            if layer is None:
                return f.get_tensor("resid")
            return f.get_slice("resid")[:, self.layer_position(layer)]

    def load_router(self, shard: int) -> dict[str, torch.Tensor]:
        path = self.root / _shard_name("router", shard)
        if not path.exists():
            raise StoreError(f"store {self.root} has no router records (a dense model, or captured without them)")
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def tokens(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The token table of the whole store, in shard/row order."""
        parts = sorted((self.root / TOKENS_DIR).glob("part-*.parquet"))
        parts = parts[: len(self.shards)]
        return pd.concat([pd.read_parquet(p, columns=columns) for p in parts], ignore_index=True)

    def verify(self) -> None:
        """Re-hash every shard file against the manifest; raise StoreError on the first mismatch."""
        for shard in self.shards:
            for name, digest in shard["sha256"].items():
                data = (self.root / name).read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise StoreError(f"{self.root / name} does not match its sha256 in the manifest; "
                                     f"capture the store again")

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
                        idx = perm[b * batch_size:(b + 1) * batch_size]
                        yield Batch(resid[idx].float(),
                                    {k: v[idx] for k, v in router.items()} if router else None, rows[idx])
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
