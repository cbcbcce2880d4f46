"""``routesae steer``, ``routesae contrast`` and ``routesae analyze-shared``: thin over routesae.causal."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .cli_errors import USER_ERRORS
from .cli_errors import fail as _fail

EXPERTS_HELP = ("Expert steering, clauses joined by ';': bias:E=B (B added to expert E's router logit), force:E, "
                "forbid:E, each optionally @layerN / @layersA:B, e.g. 'bias:3=2,7=2@layer2;forbid:5@layer4'. Any "
                "routing override (topk:K, topp:P, ...) may be mixed in.")


def steer(
    prompt: str = typer.Option(..., help="The text to continue."),
    run: Path | None = typer.Option(None, help="SAE run folder (needed for --feature); its model is the default "
                                               "--model."),
    model: str | None = typer.Option(None, help="Model folder (default: the run's model)."),
    feature: list[str] = typer.Option([], help="Latent edit, repeatable: LATENT=V clamps, LATENT*V scales, "
                                               "LATENT+V shifts (e.g. 12=5, 40*0, 7+-2)."),
    experts: str | None = typer.Option(None, help=EXPERTS_HELP),
    max_new_tokens: int = typer.Option(32, help="Tokens generated after the prompt."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    top_k: int | None = typer.Option(None, help="Sample among the top-k tokens only."),
    seed: int = typer.Option(0, help="Sampling seed (the clean and the steered generation share it)."),
    top: int = typer.Option(10, help="Tokens listed whose next-token probability rose / fell most."),
    out: Path | None = typer.Option(None, "--out", "-o", help="JSON file to write (default RUN/steer.json, or "
                                                              "./steer.json without --run)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
) -> None:
    """Steer with SAE latents and/or experts: print the clean and the steered generation from the same prompt and
    seed, and how the next-token distribution on the prompt changes; write everything (per-token routing, the
    steered latents' values) as JSON."""
    from routesae.atomic import atomic_write_json
    from routesae.causal import GenerateConfig, Steering, steer_compare
    from routesae.causal.steer import load_for_steering

    try:
        lm, tok, sae, name = load_for_steering(str(run) if run else None, model, device)
        steering = Steering.build(sae, feature, experts, model=lm)
        res = steer_compare(lm, tok, prompt, steering, GenerateConfig(max_new_tokens, temperature, top_k, seed), top)
        res["model"] = name
        path = out or ((run / "steer.json") if run else Path("steer.json"))
        atomic_write_json(path, res)
    except USER_ERRORS as exc:
        _fail(exc)
    nt = res["next_token"]
    typer.echo(f"steering: {', '.join(res['steering']['features']) or '-'} | experts: "
               f"{res['steering']['experts'] or '-'}")
    typer.echo(f"prompt : {prompt!r}")
    typer.echo(f"clean  : {res['clean']['text']!r}")
    typer.echo(f"steered: {res['steered']['text']!r}")
    typer.echo(f"next token on the prompt: KL(clean || steered) {nt['kl_last']:.4f} at the last position, "
               f"{nt['kl_mean']:.4f} mean over the prompt")
    for label, rows in (("up  ", nt["top_up"]), ("down", nt["top_down"])):
        typer.echo(f"  {label}: " + ", ".join(f"{r['token']!r} {r['p_clean']:.3f}->{r['p_steered']:.3f}"
                                              for r in rows[:5]))
    typer.echo(f"wrote {path}")


def contrast(
    model: str = typer.Argument(..., help="MoE model folder."),
    a: str = typer.Option(..., "--a", help="Side A: a domain of --corpus, a .txt file (one text per line) or a "
                                           "corpus path."),
    b: str = typer.Option(..., "--b", help="Side B, as --a."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for contrast.parquet and contrast.json."),
    corpus: str | None = typer.Option(None, help="Corpus whose domains --a and --b may name."),
    split: str = typer.Option("train", help="Corpus split (shard prefix or HF split), e.g. val."),
    max_docs: int = typer.Option(2000, help="Texts read per side at most."),
    max_tokens: int = typer.Option(65536, help="Tokens counted per side at most."),
    ctx: int = typer.Option(256, help="Tokens kept of each text."),
    batch_size: int = typer.Option(8, help="Texts per forward pass."),
    top: int = typer.Option(4, help="Experts turned into the printed steering setting."),
    bias: float = typer.Option(2.0, help="Router-logit bias of the steering setting."),
    mode: str = typer.Option("bias", help="bias (add --bias to the experts' router logits) or force."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
) -> None:
    """Behaviour-linked experts (SteerMoE): per layer and expert the activation rate on A and on B and their
    difference, ranked; prints the top experts as an expert-steering setting for `routesae steer --experts`."""
    from routesae.causal.contrast import contrast_to_folder

    try:
        table, info = contrast_to_folder(model, a, b, out, corpus=corpus, split=split, max_docs=max_docs,
                                         max_tokens=max_tokens, ctx=ctx, batch=batch_size, top=top, bias=bias,
                                         mode=mode, device=device)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"{info['a']}: {info['tokens_a']:,} tokens, {info['b']}: {info['tokens_b']:,} tokens")
    typer.echo(table.head(10).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    typer.echo(f"steer toward {info['a']}: routesae steer --model {model} --experts '{info['steering']}' "
               f"--prompt ...")
    typer.echo(f"wrote {out / 'contrast.parquet'} and {out / 'contrast.json'}")


def analyze_shared(
    model: str = typer.Argument(..., help="MoE model with shared experts (Qwen2-MoE, Qwen3-Next, DeepSeek-V3)."),
    corpus: str = typer.Option(..., help="Corpus (as for capture); its domains split the tables."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the tables, e.g. RUN/shared (read by the report "
                                                     "and the dashboard)."),
    max_tokens: int = typer.Option(16384, help="Tokens analysed."),
    ctx: int = typer.Option(256, help="Context length in tokens."),
    batch_size: int = typer.Option(8, help="Contexts per forward pass."),
    split: str = typer.Option("train", help="Corpus split (shard prefix or HF split), e.g. val."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the checkpoint."),
) -> None:
    """Shared versus routed computation: per token and MoE layer the share of the MLP output from the always-on
    shared experts and from the routed experts, and the shared-expert gate, by domain and by position."""
    from routesae.causal.shared import SharedConfig
    from routesae.causal.shared import analyze_shared as run

    try:
        path = run(SharedConfig(model=model, corpus=corpus, out=str(out), max_tokens=max_tokens, ctx=ctx,
                                batch_size=batch_size, split=split, dtype=dtype, device=device,
                                trust_remote_code=trust_remote_code))
    except USER_ERRORS as exc:
        _fail(exc)
    s = json.loads((path / "summary.json").read_text())
    gate = "" if s["mean_gate"] is None else f", mean shared gate {s['mean_gate']:.3f}"
    typer.echo(f"{s['tokens']:,} tokens, {len(s['moe_layers'])} MoE layers: shared path {s['mean_share_norm']:.1%} "
               f"of the MLP output norm (projection share {s['mean_share_proj']:.1%}){gate}; tables in {path}")
