"""A store's token table read back by shard and as whole contexts, with one-line errors.

:func:`token_part` reads one shard's ``tokens.parquet/part-NNNNN.parquet`` (a missing or unreadable
part is a :class:`~routesae.store.StoreError` naming the file and saying to capture again);
:func:`store_contexts` gathers whole contexts for a model pass (evaluate's splices, the model check
of :mod:`routesae.model_match`); :func:`context_batch` pads them into ``input_ids`` /
``attention_mask``; :func:`stored_rows` fetches their stored residual rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from routesae.store import TOKENS_DIR, Store, StoreError


def token_part(store: Store, index: int, columns: list[str]) -> pd.DataFrame:
    """The token table of shard ``index`` (one-line StoreError when the file is missing or unreadable)."""
    path = store.root / TOKENS_DIR / f"part-{index:05d}.parquet"
    if not path.is_file():
        raise StoreError(f"{path} is missing (store {store.root} is incomplete); capture the store again")
    try:
        return pd.read_parquet(path, columns=columns)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         f"capture the store again") from exc


def store_contexts(store: Store, n_tokens: int, max_contexts: int | None) -> tuple[list[pd.DataFrame], int]:
    """Whole store contexts (rows sorted by ctx_pos) within the token budget; also the number skipped."""
    parts, rows, read_all = [], 0, True
    for s in store.shards:
        parts.append(token_part(store, s["index"], ["token_id", "context", "ctx_pos", "shard", "row"]))
        rows += len(parts[-1])
        if rows >= n_tokens + store.manifest.get("ctx", 0):  # one more context than needed, at most
            read_all = s["index"] == store.shards[-1]["index"]
            break
    if not parts:
        return [], 0
    df = pd.concat(parts, ignore_index=True)
    cap = store.manifest.get("capture_args", {}).get("max_tokens")
    cut_last = read_all and cap is not None and store.n_tokens >= cap  # the capture trimmed its last context
    last = int(df["context"].max())
    out, used, skipped = [], 0, 0
    for ctx_id, g in df.groupby("context", sort=True):
        g = g.sort_values("ctx_pos")
        complete = np.array_equal(g["ctx_pos"].to_numpy(), np.arange(len(g)))
        if not complete or (cut_last and ctx_id == last and len(g) < int(store.manifest.get("ctx", 0))):
            skipped += 1
            continue
        if out and used + len(g) > n_tokens:
            break
        if max_contexts is not None and len(out) >= max_contexts:
            break
        out.append(g)
        used += len(g)
    return out, skipped


def context_batch(group: list[pd.DataFrame], device) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``[B, T]`` of whole contexts, right-padded with id 0 / mask 0."""
    ctx = max(len(g) for g in group)
    ids = torch.zeros(len(group), ctx, dtype=torch.long)
    mask = torch.zeros(len(group), ctx, dtype=torch.long)
    for i, g in enumerate(group):
        ids[i, :len(g)] = torch.from_numpy(g["token_id"].to_numpy().astype(np.int64))
        mask[i, :len(g)] = 1
    return ids.to(device), mask.to(device)


def stored_rows(store: Store, group: pd.DataFrame, layers: list[int]) -> Tensor:
    """The stored rows ``[N, L', d]`` (float32) of the tokens of ``group``, in its row order."""
    out = torch.empty(len(group), len(layers), store.d_model)
    for shard, g in group.groupby("shard", sort=False):
        full = torch.stack([store.load_resid(int(shard), j) for j in layers], 1).float()
        sel = torch.tensor((group["shard"] == shard).to_numpy())
        out[sel] = full[torch.tensor(g["row"].to_numpy())]
    return out
