"""The main job on the embedded default: ``routesae demo`` (what ``make demo`` runs).

capture (``data/demo-moe`` over ``data/corpus``: the train split into ``store``, the validation
split into ``store-val``) -> train RouteSAE and a single-layer TopK baseline on the training store,
each recording ``store-val`` as its held-out store -> evaluate both (with splicing) on held-out
tokens -> analyse the RouteSAE run on them -> write the report; then print where the report is and
the dashboard command. Re-running reuses every finished stage (the stores, trained runs,
evaluations and the analysis made on held-out tokens) unless ``force``; an interrupted SAE run
(a checkpoint but no final SAE) resumes from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    model: Path = ROOT / "data" / "demo-moe"
    corpus: Path = ROOT / "data" / "corpus"
    quick: bool = False
    force: bool = False
    device: str = "auto"
    sizes_override: dict[str, int] | None = None  # for tests: smaller stages than --quick

    @property
    def root(self) -> Path:
        return self.out / ("quick" if self.quick else "full")

    @property
    def sizes(self) -> dict[str, int]:
        if self.quick:
            n = {"capture": 32_768, "train": 65_536, "latents": 768, "analyze": 32_768, "eval": 16_384}
        else:
            n = {"capture": 262_144, "train": 524_288, "latents": 1536, "analyze": 131_072, "eval": 65_536}
        n.update(self.sizes_override or {})
        n["heldout"] = max(n["eval"], n["analyze"])  # the validation store holds both
        return n


def demo_model(cfg: DemoConfig, log=print) -> Path:
    """The shipped demo MoE; a tiny random OLMoE (with a note) if its weights are missing."""
    if (cfg.model / "model.safetensors").exists():
        return cfg.model
    from routesae.models.tiny import save_tiny

    tiny = cfg.out / "tiny-olmoe"
    if not (tiny / "config.json").exists():
        save_tiny("olmoe", tiny)
    log(f"note: {cfg.model} holds no trained weights; using a tiny random OLMoE ({tiny})")
    return tiny


def run_demo(cfg: DemoConfig, log=print) -> Path:
    """Run every stage (reusing finished ones) and return the report folder."""
    from routesae.analyze import AnalyzeConfig, analyze
    from routesae.capture import CaptureConfig, capture
    from routesae.checkpoint import find_checkpoint
    from routesae.evaluate import EvalConfig, evaluate
    from routesae.heldout import EVAL_STORE, check_eval_store, record_eval_store
    from routesae.report import ReportConfig, build_comparison, build_report
    from routesae.sae import SparseAutoencoder
    from routesae.store import Store
    from routesae.train import train

    t0 = time.perf_counter()
    root = cfg.root
    if cfg.force and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    n = cfg.sizes
    model = demo_model(cfg, log)
    store, store_val = root / "store", root / "store-val"

    def stage(name: str) -> None:
        log(f"[{time.perf_counter() - t0:6.0f}s] {name}")

    stage(f"capture {n['capture']:,} tokens of {cfg.corpus.name} through {model.name} -> {store}")
    capture(CaptureConfig(model=str(model), corpus=str(cfg.corpus), out=str(store), max_tokens=n["capture"],
                          device=cfg.device, progress=False))
    stage(f"capture {n['heldout']:,} held-out tokens (validation split) -> {store_val}")
    capture(CaptureConfig(model=str(model), corpus=str(cfg.corpus), out=str(store_val), max_tokens=n["heldout"],
                          split="val", device=cfg.device, progress=False))
    runs = {"routesae": root / "routesae", "topk": root / "topk"}
    for arch, run in runs.items():
        trained = not _finished(run)
        if trained:
            resume = find_checkpoint(run) is not None  # an interrupted run continues where it stopped
            stage(f"{'resume' if resume else 'train'} {arch} ({n['latents']} latents, k=32, {n['train']:,} tokens) "
                  f"-> {run}")
            train(train_config(cfg, arch, resume))
        if not (run / EVAL_STORE).is_file():  # a run trained before held-out stores were recorded
            record_eval_store(run, check_eval_store(store_val, Store(store), SparseAutoencoder.read_config(run).layers))
        if trained or not _held_out(run / "eval.json"):
            stage(f"evaluate {arch} on {n['eval']:,} held-out tokens (reconstruction and CE/KL spliced into the model)")
            evaluate(EvalConfig(run=str(run), tokens=n["eval"], device=cfg.device))
    run = runs["routesae"]
    summary = run / "analysis" / "summary.json"  # it embeds eval.json: redone when that is newer
    if not _held_out(summary) or (run / "eval.json").stat().st_mtime > summary.stat().st_mtime:
        stage(f"analyze {run} ({n['analyze']:,} held-out tokens)")
        analyze(AnalyzeConfig(run=str(run), tokens=n["analyze"], device=cfg.device))
    stage("report")
    build_report(ReportConfig(run=str(run)))
    comparison = build_comparison([runs["routesae"], runs["topk"]], out=root / "comparison")["report.html"]
    _summary(runs, log)
    report = run / "report"
    log(f"[{time.perf_counter() - t0:6.0f}s] done")
    log(f"report:     {report / 'report.html'}  (also report.md, tables/, summary.json, neuronpedia/)")
    log(f"comparison: {comparison}  (RouteSAE vs TopK on the same held-out tokens; also report.md)")
    log(f"dashboard:  routesae dashboard {run}")
    return report


def train_config(cfg: DemoConfig, arch: str, resume: bool = False):
    """The demo's TrainConfig of ``arch`` (routesae or topk) on its training store, recording the held-out one."""
    from routesae.train import TrainConfig

    n, root = cfg.sizes, cfg.root
    return TrainConfig(store=str(root / "store"), out=str(root / arch), arch=arch, latents=n["latents"], k=32,
                       tokens=n["train"], device=cfg.device, progress=False, resume=resume,
                       eval_store=str(root / "store-val"))


def _finished(run: Path) -> bool:
    """A run whose training finished: its SAE and config exist and its checkpoint (if any) is at the last step.

    A stopped run also holds ``sae.safetensors`` (saved with every checkpoint), so the SAE alone does not
    mean finished."""
    from routesae.checkpoint import find_checkpoint, load_state

    if not ((run / "sae.safetensors").is_file() and (run / "train_config.json").is_file()):
        return False
    ckpt = find_checkpoint(run)
    if ckpt is None:
        return True
    state = load_state(ckpt)
    return state.get("step") == state.get("total_steps")


def _held_out(path: Path) -> bool:
    """Whether ``path`` (eval.json or an analysis summary.json) exists and measured held-out tokens."""
    try:
        return json.loads(path.read_text()).get("in_sample") is False
    except (OSError, ValueError, AttributeError):
        return False


def _summary(runs: dict[str, Path], log) -> None:
    log("")
    log(f"{'':10s} {'NMSE':>8s} {'expl.var':>9s} {'L0':>6s} {'CE rec.':>8s} {'KL/token':>9s}   "
        f"(NMSE, explained variance: the raw residual of the spliced layer vs its reconstruction)")
    for arch, run in runs.items():
        ev = json.loads((run / "eval.json").read_text())
        sp = ev.get("splice") or {}
        ce = f"{sp['ce_recovered']:8.3f}" if "ce_recovered" in sp else f"{'n/a':>8s}"
        kl = f"{sp['kl']:9.4f}" if "kl" in sp else f"{'n/a':>9s}"
        s, raw = ev["sae_space"], ev.get("raw_space") or ev["sae_space"]
        log(f"{arch:10s} {raw['nmse']:8.4f} {raw['explained_variance']:9.4f} {s['l0']:6.1f} {ce} {kl}")
    r = ev.get("token_range") or {}
    log(f"(held-out: tokens {r.get('start')}..{r.get('stop')} of {ev['store']}, split {ev.get('store_split')}, "
        f"in_sample={ev.get('in_sample')})")
    log("")
