"""Helpers shared by the scripts of ``analyses/``: stores, runs and evaluations that are reused when
already finished, one metrics row per evaluation, Markdown tables and RESULTS.md sections.

Every step is idempotent: a capture with the same arguments resumes/reuses its store (see
routesae/capture.py), a finished run is not retrained (an unfinished one resumes from its
checkpoint), an ``eval.json`` made on the same store with the same token budget is read back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "data" / "demo-moe"
DEMO_CORPUS = ROOT / "data" / "corpus"


def capture_stores(model: str, corpus: str, out: Path, tokens: int, eval_tokens: int, store: str | None = None,
                   layers: str = "auto") -> tuple[str, str]:
    """The training store (``store``, or a capture of ``tokens`` training-split tokens into
    ``out/store``) and a validation-split store of ``eval_tokens`` tokens (``out/store-val``)
    with the same layers. Returns both folders."""
    from routesae.capture import CaptureConfig, capture
    from routesae.store import Store

    store_dir = store or str(out / "store")
    eval_dir = str(out / "store-val")
    if store is None:
        capture(CaptureConfig(model=model, corpus=corpus, out=store_dir, layers=layers, max_tokens=tokens,
                              device="cpu", progress=False))
    manifest = Store(store_dir).manifest
    capture(CaptureConfig(model=manifest["model"]["name_or_path"], corpus=corpus, out=eval_dir, split="val",
                          layers=",".join(map(str, manifest["layers"])), max_tokens=eval_tokens,
                          device="cpu", progress=False))
    return store_dir, eval_dir


def train_once(run: Path, log=print, **kwargs: Any) -> Path:
    """``train(TrainConfig(out=run, **kwargs))`` unless ``run`` already finished; an interrupted run resumes."""
    from routesae.train import TrainConfig, train

    if _finished(run):
        _same_options(run, TrainConfig(out=str(run), device="cpu", progress=False, **kwargs))
        return run
    log(f"train {run.name}")
    return train(TrainConfig(out=str(run), device="cpu", progress=False, resume=run.exists(), **kwargs))


# what training did before an option existed (runs older than the option lack its key)
LEGACY = {"b_pre_init": "median", "enc_init": "transpose", "center_init": "zero", "decoder_norm": "project",
          "renorm_every": 10, "route_balance": 0.0}


def _same_options(run: Path, cfg: Any) -> None:
    """A finished run is reused only when it was trained with the options asked for now (defaults included:
    a run trained before a default changed is not silently reused)."""
    from dataclasses import asdict

    old = json.loads((run / "train_config.json").read_text())
    free = {"out", "store", "device", "progress", "resume", "eval_store", "ckpt_every", "log_every", "verify"}
    diff = {k: (old.get(k, LEGACY.get(k, v)), v) for k, v in asdict(cfg).items()
            if k not in free and old.get(k, LEGACY.get(k, v)) != v}
    if diff:
        was = ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
        raise SystemExit(f"{run} was trained with {was}; move it away or choose another --out")


def _finished(run: Path) -> bool:
    """The run wrote its last metrics line (step == the resolved number of steps) and its SAE."""
    metrics, cfg = run / "metrics.jsonl", run / "train_config.json"
    if not ((run / "sae.safetensors").exists() and metrics.exists() and cfg.exists()):
        return False
    lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
    return bool(lines) and json.loads(lines[-1])["step"] == json.loads(cfg.read_text())["resolved"]["steps"]


def evaluate_once(run: Path, store: str, tokens: int, splice_contexts: int | None = None) -> dict:
    """``RUN/eval.json`` for ``store`` and ``tokens``, evaluated (with splicing) only when missing or stale."""
    from routesae.evaluate import EvalConfig, evaluate

    path = run / "eval.json"
    if path.exists():
        ev = json.loads(path.read_text())
        c = ev.get("config", {})
        if (Path(c.get("store") or "") == Path(store) and c.get("tokens") == tokens
                and c.get("splice_contexts") == splice_contexts):
            return ev
    return evaluate(EvalConfig(run=str(run), store=store, tokens=tokens, splice_contexts=splice_contexts,
                               device="cpu"))


def feature_count_once(run: Path, store: str, tokens: int, fire_fraction: float) -> dict:
    """The interpretable-feature count of ``run`` on ``store`` (cached in ``RUN/feature_count_val_TOKENS.json``)."""
    path = run / f"feature_count_val_{tokens}{'' if fire_fraction == 0.5 else f'_f{fire_fraction:g}'}.json"
    want = {"store": str(store), "tokens": tokens, "fire_fraction": fire_fraction}
    if path.exists():
        got = json.loads(path.read_text())
        if all(got.get(k) == v for k, v in want.items()):
            return got
    from routesae.analyze.features import feature_tables
    from routesae.sae import load_sae
    from routesae.store import Store

    sae = load_sae(run).eval()
    t = feature_tables(sae, Store(store), model=None, max_tokens=tokens, fire_fraction=fire_fraction)
    lat = t["latents"]
    fc = t["feature_count"].iloc[0]
    keep = lat[lat["interpretable"]]
    per_layer = {int(j): int((keep["top_routed_layer"] == j).sum()) for j in sae.cfg.layers}
    res = {**want, "count": int(fc["count"]), "tokens_counted": int(fc["tokens"]),
           "alive": int((lat["count"] > 0).sum()), "per_routed_layer": per_layer,
           "settings": {k: (v.item() if hasattr(v, "item") else v) for k, v in fc.items()
                        if k not in ("count", "tokens", "domains")}}
    path.write_text(json.dumps(res, indent=2) + "\n")
    return res


def metrics_row(ev: dict) -> dict[str, Any]:
    """The headline numbers of one ``eval.json``: NMSE, explained variance, L0, dead fraction, CE
    recovered, KL per token (MLSAE: the mean over its one-layer splices) and routed-layer fractions."""
    s = ev["sae_space"]
    sp = ev.get("splice") or {}
    if ev["arch"] == "mlsae":
        sp = sp.get("mean") or {}
    return {"nmse": s["nmse"], "nmse_raw": (ev.get("raw_space") or {}).get("nmse"),
            "ev": s["explained_variance"], "l0": s["l0"], "dead": s["dead_fraction"],
            "ce_rec": sp.get("ce_recovered"), "kl": sp.get("kl"), "ce_increase": sp.get("ce_increase"),
            "hist": (ev.get("routed_layers") or {}).get("fractions")}


def pm(s: dict, key: str, spec: str = ".3f") -> str:
    """``mean ± sd`` of ``s[key]`` and ``s[key + "_sd"]`` (just the mean without an sd; ``n/a`` without a mean)."""
    m, sd = s.get(key), s.get(key + "_sd")
    if m is None:
        return "n/a"
    return f"{m:{spec}} ± {sd:{spec}}" if sd is not None else f"{m:{spec}}"


def fmt(x: Any, spec: str = ".4f") -> str:
    """A number for a table (``n/a`` for None)."""
    return "n/a" if x is None else format(x, spec)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` (appended
    when the markers are missing); everything else in the file is kept."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    new = pat.sub(lambda _: block, old) if pat.search(old) else old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def savefig(fig, path: Path) -> Path:
    """Save a matplotlib figure as a small PNG and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (``pip install -e .[dev]`` brings it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
