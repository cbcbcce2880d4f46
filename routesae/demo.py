"""The main job on the embedded default: ``routesae demo`` (what ``make demo`` runs).

Today it captures residual streams and routing of the shipped demo MoE (``data/demo-moe``) over
the validation split of the shipped corpus (``data/corpus``) into ``runs/demo/store``. When the
demo model's weights are not there yet it uses a tiny random OLMoE instead and says so. Re-running
reuses a finished store; later stages (training, analysis, report) join this pipeline as they land.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from routesae.capture import CaptureConfig, capture
from routesae.store import Store

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    model: Path = ROOT / "data" / "demo-moe"
    corpus: Path = ROOT / "data" / "corpus"
    max_tokens: int = 32_768
    quick: bool = False
    device: str = "auto"


def demo_model(cfg: DemoConfig, log=print) -> Path:
    if (cfg.model / "model.safetensors").exists():
        return cfg.model
    from routesae.models.tiny import save_tiny

    tiny = cfg.out / "tiny-olmoe"
    if not (tiny / "config.json").exists():
        save_tiny("olmoe", tiny)
    log(f"note: {cfg.model} holds no trained weights yet; using a tiny random OLMoE ({tiny})")
    return tiny


def run_demo(cfg: DemoConfig, log=print) -> Path:
    cfg.out.mkdir(parents=True, exist_ok=True)
    model = demo_model(cfg, log)
    tokens = cfg.max_tokens // 4 if cfg.quick else cfg.max_tokens
    store_dir = cfg.out / ("store-quick" if cfg.quick else "store")
    log(f"capture: {model.name} over {cfg.corpus.name} (validation split), {tokens:,} tokens -> {store_dir}")
    capture(CaptureConfig(model=str(model), corpus=str(cfg.corpus), out=str(store_dir), split="val",
                          max_tokens=tokens, device=cfg.device, layers="auto"))
    s = Store(store_dir)
    log(f"store {store_dir}: {s.n_tokens:,} tokens, layers {s.layers}, MoE layers {s.moe_layers}, "
        f"{s.manifest.get('n_experts')} experts top-{s.manifest.get('top_k')}")
    log(f"inspect it with: routesae store info {store_dir}")
    return store_dir
