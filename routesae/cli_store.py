"""``routesae store info`` / ``store verify``: what a store holds, its size per token and projected, its hashes."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_errors import USER_ERRORS
from .cli_errors import fail as _fail


def store_info(store: Path = typer.Argument(..., help="Store folder.")) -> None:
    """Print what a store holds: model, tokens, layers, stored dtype, bytes per token (arithmetic and on disk)
    and the size of 10M / 100M tokens; for a running multi-process capture, the ranks' progress."""
    from routesae.store import Store
    from routesae.store_size import gb, store_sizes

    try:
        s = Store(store)
    except USER_ERRORS as exc:
        _fail(exc)
    m = s.manifest
    model = m.get("model") or {}
    typer.echo(f"model      {model.get('name_or_path')} ({model.get('architecture')})")
    typer.echo(f"tokens     {s.n_tokens:,} in {len(s.shards)} shard(s); complete: {m.get('complete')}")
    typer.echo(f"layers     {s.layers} of {m.get('n_layers')} (d_model {s.d_model})")
    typer.echo(f"moe layers {s.moe_layers} ({m.get('n_experts')} experts, top-{m.get('top_k')})")
    size = store_sizes(s)
    typer.echo(f"dtype      {s.dtype} activations (model ran in {m.get('dtype', 'float32')})")
    disk = "" if size["on_disk"] is None else f"; on disk {size['on_disk']:,.0f} with the token table"
    typer.echo(f"per token  {size['per_token']:,} bytes (activations {size['activations']:,} + router records "
               f"{size['router']:,}){disk}")
    per, rate = (size["on_disk"], "on-disk") if size["on_disk"] else (size["per_token"], "arithmetic")
    typer.echo(f"projected  10M tokens {gb(per * 1e7)}, 100M tokens {gb(per * 1e8)} (at the {rate} bytes per token)")
    if m.get("world_size"):
        typer.echo(f"processes  {m['world_size']} (torchrun; {m.get('contexts_per_shard')} contexts per shard, "
                   f"shard g written by rank g % {m['world_size']})")
        if not m.get("complete"):
            from routesae.store_ranks import rank_tokens

            try:
                done = f"{rank_tokens(store, int(m['world_size'])):,} tokens"
            except USER_ERRORS as exc:
                done = f"unknown ({exc})"
            typer.echo(f"running    the ranks have written {done} so far; the manifest lists them when all finish")


def store_verify(store: Path = typer.Argument(..., help="Store folder.")) -> None:
    """Re-hash every shard against the manifest."""
    from routesae.store import Store

    try:
        Store(store).verify()
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"{store}: all shards match their sha256")
