"""``routesae train``: options, recipes (routesae/recipe.py) and the call to routesae.train."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_errors import USER_ERRORS
from .cli_errors import fail as _fail


def train(
    store: Path = typer.Argument(..., help="Store folder made by `routesae capture`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create (new or empty), or to continue "
                                                   "with --resume."),
    arch: str = typer.Option("routesae", help="routesae, topk (one layer) or mlsae (every token-layer pair)."),
    k: int = typer.Option(32, help="Active latents per token (TopK)."),
    expansion: int = typer.Option(8, help="Latents = expansion x d_model (ignored with --latents)."),
    latents: int | None = typer.Option(None, help="Dictionary size."),
    layer: int | None = typer.Option(None, help="topk: the layer (default: the captured layer nearest 3/4 depth)."),
    layers: str | None = typer.Option(None, help="routesae/mlsae: a subset of captured layers, e.g. 2:5 "
                                                 "(default: all captured layers)."),
    routing: str = typer.Option("hard", help="routesae: hard (x = p_i* x_i*, the paper) or soft (sum_i p_i x_i)."),
    pooling: str = typer.Option("sum", help="routesae: sum or mean pooling of the layer stack for the router."),
    router: str | None = typer.Option(None, help="routesae: ste (straight-through: hard forward, soft backward; "
                                                 "learns which layer fits from step 0) or faithful (the paper's "
                                                 "router); default: from --recipe (default ste, reference "
                                                 "faithful). See docs/routesae.md."),
    tokens: int | None = typer.Option(None, help="Training tokens (default: one pass over the store)."),
    batch_tokens: int = typer.Option(4096, help="Tokens per step."),
    lr: float | None = typer.Option(None, help="Adam learning rate (default recipe: 2e-4 / sqrt(latents / 2^14); "
                                               "reference: 5e-4)."),
    recipe: str = typer.Option("default", help="default, or reference: the RouteSAE reference code's training "
                                              "(zero b_pre, nn.Linear encoder init, constant lr 5e-4, no AuxK, "
                                              "decoder renormalised every 10 steps). Options given explicitly win; "
                                              "see docs/routesae.md."),
    b_pre_init: str | None = typer.Option(None, help="median (geometric median of a sample) or zero; "
                                                     "default: from --recipe."),
    enc_init: str | None = typer.Option(None, help="transpose (W_enc = W_dec^T), linear (nn.Linear's "
                                                   "default) or fit (transpose, scaled for the least-squares "
                                                   "best first reconstruction); default: from --recipe."),
    center_init: str | None = typer.Option(None, help="routesae: zero (the paper) or median (each layer's "
                                                      "centre = the geometric median of its rows); default: "
                                                      "from --recipe."),
    decoder_norm: str | None = typer.Option(None, help="project (gradient projection + renormalise every "
                                                       "step) or renorm (every --renorm-every steps); default: "
                                                       "from --recipe."),
    renorm_every: int | None = typer.Option(None, help="Steps between decoder renormalisations with "
                                                       "--decoder-norm renorm; default: 10."),
    lr_schedule: str | None = typer.Option(None, help="warmup-decay (5% warm-up, linear decay over the last "
                                                      "20%) or constant; default: from --recipe."),
    aux_k: int | None = typer.Option(None, help="Dead latents in the AuxK loss, 0 = none; default: 256 "
                                                "(reference recipe: 0)."),
    route_balance: float = typer.Option(0.0, help="routesae: weight of the layer-balance loss L' sum_i f_i P_i "
                                                  "(0 = the paper's router; see docs/routesae.md)."),
    seed: int = typer.Option(0, help="Seed of initialisation and data order."),
    resume: bool = typer.Option(False, help="Continue RUN from its checkpoint, exactly."),
    eval_store: Path | None = typer.Option(None, help="A held-out store (e.g. captured with --split val) that "
                                                      "evaluate/analyze then read by default."),
    ckpt_every: int = typer.Option(500, help="Checkpoint every N steps (and on Ctrl-C / SIGTERM)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    wandb: bool = typer.Option(False, help="Also log to Weights & Biases (needs `pip install wandb`)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train RouteSAE (or a TopK / MLSAE baseline) on a store. Multi-GPU: `torchrun --nproc_per_node N -m
    routesae.cli train ...`."""
    from routesae.layers import parse_layers
    from routesae.recipe import recipe_options
    from routesae.store import Store
    from routesae.train import TrainConfig, TrainingDiverged, TrainingInterrupted
    from routesae.train import train as run_train

    try:
        layer_list = None
        if layers is not None:
            s = Store(store)
            layer_list = parse_layers(layers, s.manifest["n_layers"])
        opts = recipe_options(recipe)
        schedules = {"warmup-decay": (0.05, 0.2), "constant": (0.0, 0.0)}
        if lr_schedule is not None:
            if lr_schedule not in schedules:
                raise ValueError(f"unknown --lr-schedule {lr_schedule!r}; choose warmup-decay or constant")
            opts["warmup_frac"], opts["decay_frac"] = schedules[lr_schedule]
        given = {"lr": lr, "router": router, "b_pre_init": b_pre_init, "enc_init": enc_init, "center_init": center_init,
                 "decoder_norm": decoder_norm,
                 "renorm_every": renorm_every, "aux_k": aux_k}
        opts.update({name: v for name, v in given.items() if v is not None})
        cfg = TrainConfig(store=str(store), out=str(out), arch=arch, k=k, expansion=expansion, latents=latents,
                          layer=layer, layers=layer_list, routing=routing, pooling=pooling,
                          tokens=tokens, batch_tokens=batch_tokens, seed=seed, resume=resume,
                          ckpt_every=ckpt_every, device=device, wandb=wandb, progress=not quiet,
                          eval_store=str(eval_store) if eval_store else None, route_balance=route_balance, **opts)
        if tokens is not None and tokens > batch_tokens > 0 and tokens % batch_tokens:
            typer.echo(f"note: --tokens {tokens:,} rounded down to {tokens // batch_tokens * batch_tokens:,} "
                       f"({tokens // batch_tokens:,} whole batches of --batch-tokens {batch_tokens:,})")
        path = run_train(cfg)
    except TrainingInterrupted as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130) from None
    except (TrainingDiverged, *USER_ERRORS) as exc:
        _fail(exc)
    typer.echo(f"run {path}: sae.safetensors, metrics.jsonl; next: routesae evaluate {path}")
