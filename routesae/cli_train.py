"""``routesae train``: options, recipes (routesae/recipe.py) and the call to routesae.train."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from .cli_errors import USER_ERRORS
from .cli_errors import fail as _fail


def train(
    store: Path | None = typer.Argument(None, help="Store folder made by `routesae capture` (leave out and pass "
                                                   "--model and --corpus to train online)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create (new or empty), or to continue "
                                                   "with --resume; with several SAEs, the folder of their runs "
                                                   "(one sub-folder each, listed in runs.json)."),
    arch: str = typer.Option("routesae", help="routesae, topk (one layer) or mlsae (every token-layer pair); a "
                                              "comma-separated list trains each on the same tokens."),
    k: str = typer.Option("32", help="Active latents per token (TopK); a list such as 16,32,64 sweeps it."),
    expansion: int = typer.Option(8, help="Latents = expansion x d_model (ignored with --latents)."),
    latents: str | None = typer.Option(None, help="Dictionary size; a list such as 4096,8192 sweeps it."),
    layer: int | None = typer.Option(None, help="topk: the layer (default: the captured layer nearest 3/4 depth)."),
    layers: str | None = typer.Option(None, help="routesae/mlsae: a subset of captured layers, e.g. 2:5 "
                                                 "(default: all captured layers). Online: the blocks hooked "
                                                 "(auto, all, A:B or i,j,k; default auto), all read by "
                                                 "routesae/mlsae."),
    routing: str = typer.Option("hard", help="routesae: hard (x = p_i* x_i*, the paper) or soft (sum_i p_i x_i)."),
    pooling: str = typer.Option("sum", help="routesae: sum or mean pooling of the layer stack for the router."),
    router: str | None = typer.Option(None, help="routesae: ste (straight-through: hard forward, soft backward; "
                                                 "learns which layer fits from step 0) or faithful (the paper's "
                                                 "router); default: from --recipe (default ste, reference "
                                                 "faithful); a list such as faithful,ste trains both. See "
                                                 "docs/routesae.md."),
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
    model: str | None = typer.Option(None, help="Online: the model to run over --corpus instead of reading a "
                                                "store (a checkpoint folder or hub name, as for capture)."),
    corpus: str | None = typer.Option(None, help="Online: JSONL[.gz] file, folder of shards or <domain>/*.txt, "
                                                 "or HF dataset (needs --model and --tokens)."),
    backend: str | None = typer.Option(None, help="Online: hf (Hugging Face hooks) or tl (TransformerLens) "
                                                  "(default hf)."),
    ctx: int | None = typer.Option(None, help="Online: context length in tokens (default 256)."),
    batch_size: int | None = typer.Option(None, help="Online: contexts per forward pass (default 8)."),
    dtype: str | None = typer.Option(None, help="Online: float32, float16 or bfloat16 (the model and the "
                                                "mixing buffer; default float32)."),
    device_map: str | None = typer.Option(None, help="Online: passed to Hugging Face, e.g. auto for a model "
                                                     "larger than one GPU (one process)."),
    text_field: str | None = typer.Option(None, help="Online: JSON field / column with the text (default text)."),
    domain_field: str | None = typer.Option(None, help="Online: JSON field / column with the domain (default domain)."),
    split: str | None = typer.Option(None, help="Online: corpus split (shard prefix or HF split; default train)."),
    packing: str | None = typer.Option(None, help="Online: pack documents into contexts, or pad each (default pack)."),
    trust_remote_code: bool = typer.Option(False, help="Online: allow custom model code from the checkpoint."),
    mix_tokens: int | None = typer.Option(None, help="Online: rows of the mixing buffer per process (shuffled; "
                                                     "half goes out at a time); memory about mix-tokens x hooked "
                                                     "layers x d_model x dtype bytes; 0 = no mixing "
                                                     "(default 16 x --batch-tokens)."),
    sample_store: int | None = typer.Option(None, help="Online: also write the first N tokens (with router "
                                                       "records) as an ordinary store RUN/sample_store, which "
                                                       "evaluate and analyze then read (default 0: none)."),
) -> None:
    """Train RouteSAE (or a TopK / MLSAE baseline) on a store, or online from a model and a corpus
    (--model, --corpus). Comma-separated --arch, --k, --latents or --router train every combination on the
    same tokens into RUN/<name>. Multi-GPU: `torchrun --nproc_per_node N -m routesae.cli train ...`."""
    from routesae.layers import parse_layers
    from routesae.recipe import recipe_options
    from routesae.store import Store
    from routesae.train import TrainConfig, TrainingDiverged, TrainingInterrupted
    from routesae.train import train as run_train
    from routesae.train_many import expand_sweep, parse_list, train_many

    online_given = {"--backend": backend, "--ctx": ctx, "--batch-size": batch_size, "--dtype": dtype,
                    "--device-map": device_map, "--text-field": text_field, "--domain-field": domain_field,
                    "--split": split, "--packing": packing, "--mix-tokens": mix_tokens,
                    "--sample-store": sample_store, "--trust-remote-code": trust_remote_code or None}
    try:
        online = model is not None or corpus is not None
        if online and store is not None:
            raise ValueError(f"give a STORE ({store}) or --model and --corpus (online), not both")
        if online and (model is None or corpus is None):
            raise ValueError("online training needs both --model and --corpus")
        if not online and store is None:
            raise ValueError("give a STORE made by `routesae capture`, or --model MODEL --corpus CORPUS to train "
                             "online")
        if not online and (given := [k for k, v in online_given.items() if v is not None]):
            raise ValueError(f"{given[0]} is for online training (--model and --corpus); a store already fixes it")
        layer_list = None
        if layers is not None and not online:
            s = Store(store)
            layer_list = parse_layers(layers, s.manifest["n_layers"])
        opts = recipe_options(recipe)
        schedules = {"warmup-decay": (0.05, 0.2), "constant": (0.0, 0.0)}
        if lr_schedule is not None:
            if lr_schedule not in schedules:
                raise ValueError(f"unknown --lr-schedule {lr_schedule!r}; choose warmup-decay or constant")
            opts["warmup_frac"], opts["decay_frac"] = schedules[lr_schedule]
        given = {"lr": lr, "b_pre_init": b_pre_init, "enc_init": enc_init, "center_init": center_init,
                 "decoder_norm": decoder_norm,
                 "renorm_every": renorm_every, "aux_k": aux_k}
        opts.update({name: v for name, v in given.items() if v is not None})
        routers = parse_list("--router", router, str) if router else [opts.get("router", TrainConfig.router)]
        opts.pop("router", None)
        archs, ks = parse_list("--arch", arch, str), parse_list("--k", k, int)
        latent_list = parse_list("--latents", latents, int) if latents else [None]
        base = TrainConfig(store=str(store or ""), out=str(out), arch=archs[0], k=ks[0], expansion=expansion,
                           latents=latent_list[0], layer=layer, layers=layer_list, routing=routing, pooling=pooling,
                           router=routers[0], tokens=tokens, batch_tokens=batch_tokens, seed=seed, resume=resume,
                           ckpt_every=ckpt_every, device=device, wandb=wandb, progress=not quiet,
                           eval_store=str(eval_store) if eval_store else None, route_balance=route_balance, **opts)
        cfgs = expand_sweep(base, archs, ks, latent_list, routers)
        if tokens is not None and tokens > batch_tokens > 0 and tokens % batch_tokens:
            typer.echo(f"note: --tokens {tokens:,} rounded down to {tokens // batch_tokens * batch_tokens:,} "
                       f"({tokens // batch_tokens:,} whole batches of --batch-tokens {batch_tokens:,})")
        if online:
            from routesae.online import OnlineConfig, train_online

            defaults = OnlineConfig(model=model, corpus=corpus)
            picked = {"layers": layers, "backend": backend, "ctx": ctx, "batch_size": batch_size, "dtype": dtype,
                      "device_map": device_map, "text_field": text_field, "domain_field": domain_field,
                      "split": split, "packing": packing, "mix_tokens": mix_tokens, "sample_store": sample_store,
                      "trust_remote_code": trust_remote_code}
            ocfg = replace(defaults, **{name: v for name, v in picked.items() if v is not None})
            paths = train_online(cfgs, ocfg, root=out)
        elif len(cfgs) > 1:
            paths = train_many(cfgs, root=out)
        else:
            paths = [run_train(cfgs[0])]
    except TrainingInterrupted as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130) from None
    except (TrainingDiverged, *USER_ERRORS) as exc:
        _fail(exc)
    if len(paths) == 1:
        typer.echo(f"run {paths[0]}: sae.safetensors, metrics.jsonl; next: routesae evaluate {paths[0]}")
    else:
        typer.echo(f"{len(paths)} runs in {out} (listed in runs.json): {', '.join(p.name for p in paths)}; next: "
                   f"routesae evaluate {paths[0]}")
