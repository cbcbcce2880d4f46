"""What training needs before its first step: resolved defaults, the store check, the data stream, DDP,
the progress bar and Weights & Biases.

Split from routesae/train.py (the loop). ``resolve`` fills the defaults the module docstring of
routesae/train.py lists; ``batches`` is the training stream (unreadable or non-finite rows become
one-line StoreErrors); ``Dist``, ``process_group`` and ``sync_firing`` are the torch.distributed glue.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as tdist

from .heldout import store_record
from .recipe import fit_encoder_scale, init_encoder_linear
from .sae import SAEConfig, SparseAutoencoder, build_sae
from .store import Store, StoreError

if TYPE_CHECKING:
    from .train import TrainConfig

VERIFY_MAX_BYTES = 2**30


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owned: bool = False

    @classmethod
    def from_env(cls, cuda: bool) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owned = not tdist.is_initialized()
        if owned:
            tdist.init_process_group("nccl" if cuda else "gloo")
        return cls(tdist.get_world_size(), tdist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), owned)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tdist.all_reduce(t)
        return t


@contextlib.contextmanager
def process_group(cuda: bool) -> Iterator[Dist]:
    """This process's :class:`Dist`; a group it started is destroyed on exit.

    No closing barrier (unlike capture's group, routesae/capture_dist.py): after the last step rank 0
    alone may still work for long (online training's ``--sample-store`` capture), longer than the
    group's timeout, while the other ranks are done; torchrun waits for every process anyway.
    """
    dist = Dist.from_env(cuda)
    try:
        yield dist
    finally:
        if dist.owned:
            tdist.destroy_process_group()


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve(cfg: TrainConfig, store: Store, world: int) -> dict[str, Any]:
    """Defaults and checks that need the store (one-line StoreError/ValueError)."""
    captured = store.layers
    if cfg.arch == "topk":
        if cfg.layer is None:
            n = int(store.manifest.get("n_layers") or max(captured) + 1)
            want = max(round(0.75 * n) - 1, 0)
            layers = [min(captured, key=lambda c: (abs(c - want), -c))]
        else:
            layers = [cfg.layer]
    else:
        layers = list(cfg.layers) if cfg.layers is not None else captured
    missing = [lay for lay in layers if lay not in captured]
    if missing:
        raise StoreError(f"layer {missing[0]} was not captured in {store.root}; captured layers: {captured}")
    d = store.d_model
    latents = cfg.latents if cfg.latents is not None else cfg.expansion * d
    if cfg.k > latents:
        raise ValueError(f"--k {cfg.k} is larger than the latent count {latents}; lower --k or raise "
                         f"--latents/--expansion")
    tokens = cfg.tokens if cfg.tokens is not None else store.n_tokens
    if store.n_tokens < cfg.batch_tokens:
        raise StoreError(f"store {store.root} has {store.n_tokens} tokens, fewer than --batch-tokens "
                         f"{cfg.batch_tokens}; lower --batch-tokens or capture more")
    if cfg.batch_tokens % world:
        raise ValueError(f"--batch-tokens {cfg.batch_tokens} must be divisible by the {world} processes")
    steps = max(tokens // cfg.batch_tokens, 1)
    dead = cfg.dead_tokens or max(cfg.batch_tokens, min(10_000_000, tokens // 10))
    if cfg.dead_tokens is None and cfg.arch == "mlsae":
        dead *= len(layers)
    positions = [captured.index(lay) for lay in layers]
    if cfg.arch == "topk" or positions == list(range(len(captured))):
        positions = None  # topk reads its one layer from the store; the others keep the whole stack
    return {"layers": layers, "positions": positions,
            "latents": latents, "lr": cfg.lr or 2e-4 / math.sqrt(latents / 2**14), "tokens": steps * cfg.batch_tokens,
            "steps": steps, "dead_tokens": dead, "world_size": world}


def verify_store(cfg: TrainConfig, store: Store) -> None:
    if cfg.verify == "never":
        return
    size = sum((store.root / n).stat().st_size for s in store.shards for n in s["sha256"]
               if (store.root / n).exists())
    if cfg.verify == "always" or size <= VERIFY_MAX_BYTES:
        try:
            store.verify()
        except FileNotFoundError as e:
            raise StoreError(f"store {store.root} lacks a shard file ({e.filename}); capture it again") from None


def sync_firing(sae: SparseAutoencoder, dist: Dist) -> None:
    """Make the dead-latent counter count the global batch: union of firing, sum of examples."""
    def count(val: torch.Tensor, idx: torch.Tensor) -> None:
        fired = torch.zeros(sae.cfg.n_latents, dtype=torch.int32, device=val.device)
        fired[idx[val > 0]] = 1
        n = torch.tensor([val.shape[0]], dtype=torch.int64, device=val.device)
        dist.all_sum(fired)
        dist.all_sum(n)
        sae.tokens_since_fired += n
        sae.tokens_since_fired[fired > 0] = 0

    sae._count_firing = count  # instance override; state_dict and saving are unaffected


def batches(store: Store, cfg: TrainConfig, r: dict, start: int):
    """The training stream; unreadable shards become one-line StoreErrors."""
    layer = r["layers"][0] if cfg.arch == "topk" else None
    return store_stream(store, cfg.batch_tokens, cfg.seed, cfg.buffer_shards, start, layer, r["positions"])


def store_stream(store: Store, batch_tokens: int, seed: int, buffer_shards: int, start: int, layer: int | None = None,
                 positions: list[int] | None = None):
    """Seeded shuffled batches of ``layer`` (None: the captured layers, or those at ``positions``), from
    batch ``start`` on; unreadable shards and non-finite rows become one-line StoreErrors."""
    it = store.batches(batch_tokens, layer=layer, seed=seed, buffer_shards=buffer_shards, epochs=None,
                       start_batch=start)
    while True:
        try:
            batch = next(it)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors/OS errors from a damaged shard
            raise StoreError(f"cannot read store {store.root} ({one_line(e)}); a shard is damaged, capture "
                             f"it again") from None
        resid = batch.resid if positions is None else batch.resid[:, positions]
        if not torch.isfinite(resid.sum()) and not torch.isfinite(resid).all():  # cheap test first
            shard = int(batch.rows[~torch.isfinite(resid).flatten(1).all(1), 0][0])
            raise StoreError(f"store {store.root} shard {shard} holds non-finite activations; capture it again")
        yield resid


def ranked(stream: Iterator[torch.Tensor], dist: Dist) -> Iterator[torch.Tensor]:
    """This process's rows of each global batch: ``rank::world_size`` (all of it without DDP)."""
    for resid in stream:
        yield resid[dist.rank::dist.world] if dist.world > 1 else resid


def store_summary(store: Store, identity: str) -> dict[str, Any]:
    """``train_config.json["store_summary"]`` of a store-trained run."""
    summary = {k: store.manifest.get(k) for k in ("model", "layers", "tokens", "d_model", "n_layers")}
    rec = store_record(store)
    return {"path": str(store.root), "identity": identity, **summary,
            **{k: rec[k] for k in ("corpus_fingerprint", "split")}}


def seed_everything(seed: int) -> None:
    """Seed torch, random and numpy (the SAE's initialisation and anything else drawn before step 0)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def initial_sae(cfg: TrainConfig, sae_cfg: SAEConfig, store: Store, r: dict, device: torch.device | str,
                sample: Callable[[int], torch.Tensor] | None = None) -> SparseAutoencoder:
    """A new SAE on ``device`` in training mode, initialised as the recipe says (routesae/recipe.py).

    ``enc_init="linear"`` redraws the encoder as nn.Linear does (decoder = its normalised transpose).
    From a separate seeded sample of the store (the training stream is untouched; ``sample(n)``, when
    given, returns the ``n`` rows to use instead, e.g. the first rows of an online stream), in this order:
    ``center_init="median"`` sets RouteSAE's layer centres (other architectures have none),
    ``b_pre_init="median"`` sets ``b_pre`` to the geometric median of the SAE's inputs (``"zero"``
    leaves it at 0), ``enc_init="fit"`` scales the encoder (routesae/recipe.py). ``b_enc`` starts at 0 in every recipe.
    """
    seed_everything(cfg.seed)
    sae = build_sae(sae_cfg).to(device).train()
    if cfg.enc_init == "linear":
        init_encoder_linear(sae)
    centres = cfg.center_init == "median" and cfg.arch == "routesae"
    if cfg.b_pre_init == "median" or centres or cfg.enc_init == "fit":
        per_row = len(r["layers"]) if cfg.arch == "mlsae" else 1
        n = min(max(cfg.init_samples // per_row, 1), store.n_tokens)
        if sample is None:
            rows = next(batches(store, replace(cfg, seed=cfg.seed + 7919, batch_tokens=n), r, 0))
        else:
            rows = sample(n)
        sample = rows.to(device)
        if centres:
            sae.init_layer_centers(sample, max_samples=cfg.init_samples)
        if cfg.b_pre_init == "median":
            sae.init_from_sample(sample, max_samples=cfg.init_samples)
        if cfg.enc_init == "fit":
            fit_encoder_scale(sae, sample[:cfg.init_samples])
    return sae


def progress_bar(cfg: TrainConfig, main: bool, total: int, step: int, n_saes: int = 1):
    if not (cfg.progress and main):
        return None
    from tqdm.auto import tqdm

    desc = f"train {cfg.arch}" if n_saes == 1 else f"train {n_saes} SAEs"
    return tqdm(total=total, initial=step, unit="step", desc=desc, dynamic_ncols=True)


def import_wandb(cfg: TrainConfig, main: bool):
    if not (cfg.wandb and main):
        return None
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package; pip install wandb (or drop --wandb)") from None
    return wandb


def wandb_run(wandb, cfg: TrainConfig, r: dict, out: Path):
    if wandb is None:
        return None
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "routesae"), name=out.name, dir=str(out),
                      config={**asdict(cfg), "resolved": r})
