"""How large a store will be, and the one-line warning capture gives before it fills a disk.

A store holds, per token::

    residuals  layers x d_model x bytes(dtype)                 (4 bytes in float32, 2 in float16 / bfloat16)
    routing    MoE layers x (k_max x 4 + 1 + E x 2 + 2 x extras)  (int16 index + float16 weight per slot,
                                                                 uint8 n_active, float16 logits if stored,
                                                                 float16 extras such as Qwen2-MoE's shared gate)

plus the token table (Parquet, a few tens of bytes per token). The demo MoE over its whole corpus:
16.9M train tokens x (5 x 192 x 4 + 8 x (4 x 4 + 1 + 32 x 2)) = 16.9M x 4,488 bytes = about 76 GB.

:func:`size_warning` is what capture logs when ``--max-tokens`` is unset: the corpus size is
estimated from what costs nothing to read (a ``manifest.json`` with token totals, as
``routesae data build-corpus`` writes, else the corpus files' sizes at about 4 bytes of text per
token, gzip'd files counted 4x); a hub dataset has no known size and always gets the warning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from routesae.corpus import CorpusConfig, corpus_files

LARGE_STORE_BYTES = 10 * 10**9  # projected stores above this (or above the free disk space) get a warning
TEXT_BYTES_PER_TOKEN = 4.0  # a rough average of BPE tokenizers on English text and code
GZIP_RATIO = 4.0  # text grows about this much when un-gzipped


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def dtype_bytes(dtype: str) -> int:
    """Bytes of one stored activation value in ``dtype`` (float32, float16 or bfloat16)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype} unknown; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def bytes_per_token(header: dict, dtype_bytes: int) -> int:
    """Bytes one token takes in a store with this manifest ``header`` (residuals and router records)."""
    resid = len(header["layers"]) * int(header["d_model"]) * dtype_bytes
    moe = len(header.get("moe_layers") or [])
    if not moe:
        return resid
    k_max, experts = int(header.get("k_max") or 0), int(header.get("n_experts") or 0)
    per_layer = k_max * 4 + 1 + (experts * 2 if header.get("router_logits") else 0)
    per_layer += 2 * len(header.get("router_extras") or ())
    return resid + moe * per_layer


def store_sizes(store) -> dict:
    """Bytes per token of a :class:`~routesae.store.Store`: ``activations`` and ``router`` (the arithmetic of
    :func:`bytes_per_token` over its manifest and stored dtype), their sum ``per_token``, and ``on_disk``
    (every listed shard file and token-table part, measured; None for an empty store)."""
    m = store.manifest
    header = {**m, "layers": store.layers}
    per_token = bytes_per_token(header, dtype_bytes(store.dtype))
    activations = len(store.layers) * store.d_model * dtype_bytes(store.dtype)
    files = [store.root / name for s in store.shards for name in s.get("sha256", {})]
    files += [store.root / "tokens.parquet" / f"part-{int(s['index']):05d}.parquet" for s in store.shards]
    disk = sum(f.stat().st_size for f in files if f.is_file())
    return {"activations": activations, "router": per_token - activations, "per_token": per_token,
            "on_disk": disk / store.n_tokens if store.n_tokens else None}


def gb(n: float) -> str:
    """``n`` bytes in GB (10^9) or TB, the way this project prints store sizes."""
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else _gb(n)


def corpus_tokens_estimate(corpus: CorpusConfig) -> int | None:
    """Tokens the corpus split holds: exact from a build-corpus ``manifest.json``, else estimated from
    file sizes; None for a hub dataset (unknown without downloading it)."""
    root = Path(corpus.path)
    manifest = root / "manifest.json"
    if root.is_dir() and manifest.is_file():
        try:
            totals = json.loads(manifest.read_text()).get("totals") or {}
            if isinstance(totals.get(f"{corpus.split}_tokens"), int):
                return totals[f"{corpus.split}_tokens"]
        except (ValueError, AttributeError, OSError):
            pass
    files = corpus_files(corpus)
    if files is None:
        return None
    size = sum(f.stat().st_size * (GZIP_RATIO if f.suffix == ".gz" else 1.0) for f in files)
    return int(size / TEXT_BYTES_PER_TOKEN)


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n < 1e11 else f"{n / 1e9:,.0f} GB"


def _free_bytes(out: str | Path) -> int | None:
    p = Path(out).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def size_warning(corpus: CorpusConfig, per_token: int, out: str | Path, large: int | None = None) -> str | None:
    """The one-line warning for a capture without ``--max-tokens``: None when the projected store is
    below ``large`` bytes (default :data:`LARGE_STORE_BYTES`) and fits the free space of ``out``'s disk."""
    large = LARGE_STORE_BYTES if large is None else large
    free = _free_bytes(out)
    where = f" ({_gb(free)} free there)" if free is not None else ""
    tokens = corpus_tokens_estimate(corpus)
    if tokens is None:
        return (f"--max-tokens is not set and the size of corpus {corpus.path} is unknown: the store grows by "
                f"{per_token:,} bytes per token ({_gb(per_token * 1e6)} per million tokens){where} until the corpus "
                f"ends; set --max-tokens N to cap it")
    projected = tokens * per_token
    if projected < large and (free is None or projected < free):
        return None
    return (f"--max-tokens is not set: the whole corpus goes into {out}, about {tokens:,} tokens x {per_token:,} "
            f"bytes = {_gb(projected)}{where}; set --max-tokens N to cap it")
