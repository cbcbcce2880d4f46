"""A small real pipeline on the shipped demo MoE for the explanation tests: capture -> train -> analyze.

8,192 val tokens of data/corpus through data/demo-moe (ctx 128), a RouteSAE of 256 latents (k 8) trained on
them for one pass, and its analysis (no logit lens). Built once per test module (about 20 s on one core).
"""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO, CORPUS = ROOT / "data" / "demo-moe", ROOT / "data" / "corpus"


def build_demo_run(tmp: Path, arch: str = "routesae", tokens: int = 8192) -> Path:
    from routesae.analyze import AnalyzeConfig, analyze
    from routesae.capture import CaptureConfig, capture
    from routesae.train import TrainConfig, train

    torch.set_num_threads(1)
    store = tmp / "store"
    if not (store / "manifest.json").is_file():
        capture(CaptureConfig(model=str(DEMO), corpus=str(CORPUS), out=str(store), split="val", ctx=128,
                              max_tokens=tokens, device="cpu", progress=False))
    run = train(TrainConfig(store=str(store), out=str(tmp / arch), arch=arch, latents=512, k=16, batch_tokens=256,
                            tokens=4 * tokens,
                            device="cpu", progress=False))
    analyze(AnalyzeConfig(run=str(run), store=str(store), tokens=tokens, device="cpu", with_model=False,
                          top_contexts=10, batch_tokens=2048))
    return Path(run)
