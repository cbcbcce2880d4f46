"""The store of a multi-process capture: every rank writes its own shards and progress file, rank 0 merges.

Under ``torchrun`` (routesae/capture_dist.py) the contexts are cut into blocks of ``C`` contexts
(``contexts_per_shard`` in the manifest); block ``g`` becomes shard ``g`` and belongs to rank
``g % world_size``. Every file name and every ``shard`` value of the token table is therefore the
global shard index from the start, and no two processes ever write the same file::

    manifest.json            rank 0: the header when the capture starts, the merged shard list at the end
    acts-GGGGG.safetensors   rank g % world_size (likewise router-GGGGG, tokens.parquet/part-GGGGG)
    ranks/rank-RRRRR.json    rank R only: its shards (index, tokens, contexts_end, sha256), complete

While the ranks run, the manifest lists no shard (a reader sees an empty store). When every rank has
finished, rank 0 merges the progress files into it, shards in index order (which is corpus order), and
marks it complete: from then on it is an ordinary store, read by :class:`routesae.store.Store`
unchanged. The progress files stay as a record of which rank wrote what. A killed rank resumes from
its own progress file (the shards it recorded are kept; files it wrote after its last record are
written again).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from routesae.atomic import atomic_write_json
from routesae.store import MANIFEST, RANKS_DIR, Chunks, StoreError, read_manifest, write_shard_files


def rank_path(root: str | Path, rank: int) -> Path:
    return Path(root) / RANKS_DIR / f"rank-{rank:05d}.json"


def _read_progress(path: Path) -> dict:
    try:
        progress = json.loads(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise StoreError(f"{path} is garbled ({type(exc).__name__}); it was left as it is: capture the store "
                         f"again into a new --out") from None
    if not isinstance(progress, dict) or not isinstance(progress.get("shards"), list):
        raise StoreError(f"{path} is not a rank progress file; capture the store again into a new --out")
    return progress


class RankWriter:
    """One rank's writer: shards under their global index, recorded in the rank's own progress file."""

    def __init__(self, root: str | Path, rank: int, world_size: int):
        self.root = Path(root)
        self.rank = rank
        self.path = rank_path(root, rank)
        if self.path.exists():
            self.progress = _read_progress(self.path)
            if self.progress.get("world_size") != world_size:
                raise StoreError(f"{self.path} belongs to a capture by {self.progress.get('world_size')} processes, "
                                 f"this one runs {world_size}; resume with the same --nproc_per_node")
        else:
            self.progress = {"rank": rank, "world_size": world_size, "tokens": 0, "complete": False, "shards": []}

    @property
    def done(self) -> set[int]:
        """Global indices of the shards this rank has written and recorded."""
        return {int(s["index"]) for s in self.progress["shards"]}

    @property
    def complete(self) -> bool:
        return bool(self.progress.get("complete"))

    @property
    def tokens_done(self) -> int:
        return int(self.progress["tokens"])

    def write_shard(self, resid: Chunks, router: dict[str, Chunks] | None, tokens, contexts_end: int,
                    index: int) -> dict:
        """Write shard ``index`` (one block of contexts) and record it in this rank's progress file."""
        n, files = write_shard_files(self.root, index, resid, router, tokens)
        shard = {"index": index, "tokens": n, "contexts_end": contexts_end, "sha256": files}
        self.progress["shards"].append(shard)
        self.progress["tokens"] += n
        atomic_write_json(self.path, self.progress)
        return shard

    def finish(self, **extra: Any) -> None:
        self.progress.update(extra)
        self.progress["complete"] = True
        atomic_write_json(self.path, self.progress)


def rank_tokens(root: str | Path, world_size: int) -> int:
    """Tokens the ranks' progress files record in all."""
    return sum(int(_read_progress(p)["tokens"]) for r in range(world_size) if (p := rank_path(root, r)).exists())


def merge_ranks(root: str | Path, world_size: int) -> dict:
    """Rank 0, after every rank finished: list all ranks' shards in the manifest and mark it complete.

    Refused (one-line StoreError, the manifest left as it is) when a rank did not finish or the shard
    indices have a gap; re-running the same command then resumes.
    """
    root = Path(root)
    manifest = read_manifest(root)
    shards: list[dict] = []
    ranks = []
    stats: dict = {}
    for r in range(world_size):
        path = rank_path(root, r)
        if not path.exists():
            raise StoreError(f"rank {r} of the capture into {root} left no {path.name}; run the same torchrun "
                             f"command again to resume")
        progress = _read_progress(path)
        if not progress.get("complete"):
            raise StoreError(f"rank {r} of the capture into {root} did not finish; run the same torchrun command "
                             f"again to resume")
        shards += progress["shards"]
        ranks.append({"rank": r, "shards": [int(s["index"]) for s in progress["shards"]],
                      "tokens": int(progress["tokens"])})
        stats = stats or progress.get("corpus_stats") or {}  # every rank reads the whole corpus: rank 0's
    shards.sort(key=lambda s: int(s["index"]))
    indices = [int(s["index"]) for s in shards]
    if indices != list(range(len(shards))):
        missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        raise StoreError(f"the ranks of the capture into {root} recorded shards {indices} (missing {missing}); "
                         f"capture the store again into a new --out")
    manifest.update(shards=shards, tokens=sum(int(s["tokens"]) for s in shards),
                    contexts=max((int(s["contexts_end"]) for s in shards), default=0), complete=True,
                    ranks=ranks, corpus_stats=stats)
    atomic_write_json(root / MANIFEST, manifest)
    return manifest
