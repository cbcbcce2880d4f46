"""``routesae explain-routing RUN``: the routing probe (:mod:`routesae.explain.probe`) into ``RUN/routing_probe/``.

Writes ``recall.parquet`` (layer, method, recall, ...), ``domain_recall.parquet``,
``expert_features.parquet`` (layer, expert, rank, latent, weight, explanation) and
``expert_explanations.parquet`` (layer, expert, explanation, explainer, latents), and
``summary.json``. An expert's explanation is built from its most predictive latents: by the token
explainer, their explanations (``routesae explain``) or top tokens joined; with an LLM, the
explanations summarised by :func:`routesae.explain.prompts.expert_messages`. Every file is written
atomically; the run folder's other files are never touched. Example::

    probe_run(ProbeRunConfig(run="runs/x", probe=ProbeConfig(tokens=65536)))
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from routesae.atomic import atomic_path, atomic_write_json
from routesae.explain.client import ChatClient, LLMConfig
from routesae.explain.probe import ProbeConfig, probe_routing
from routesae.explain.prompts import clean_token, expert_messages, parse_explanation
from routesae.explain.tables import EXPLAIN_DIR, PROBE_DIR, latest_explanations

log = logging.getLogger(__name__)
EXPERT_FEATURES = 3  # latents an expert's explanation is built from


@dataclass
class ProbeRunConfig:
    """``explainer``: tokens (no LLM) or llm (then ``llm`` says which endpoint). ``needed``: also regress each
    token's needed k' (KL ``eps`` nats, over the first ``needed_tokens`` tokens) on its latents
    (:mod:`routesae.explain.needed`; runs ``model``, default the store's, k times over those tokens)."""

    run: str
    store: str | None = None
    model: str | None = None
    needed: bool = False
    needed_tokens: int = 16384
    eps: float = 0.01
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    explainer: str = "tokens"
    llm: LLMConfig = field(default_factory=LLMConfig)
    device: str = "cpu"


def _feature_names(run: Path, latents: pd.DataFrame) -> dict[int, str]:
    names = {}
    if not latents.empty and "top_token" in latents:
        names = {int(r.latent): f'top token "{clean_token(r.top_token)}"' for r in latents.itertuples()
                 if r.top_token is not None}
    ex = latest_explanations(run)
    names.update({int(r.latent): str(r.explanation) for r in ex.itertuples()} if not ex.empty else {})
    return names


def probe_run(cfg: ProbeRunConfig) -> Path:
    from routesae.evaluate import load_run

    if cfg.explainer not in ("tokens", "llm"):
        raise ValueError(f"--explainer {cfg.explainer!r}: give tokens (no LLM) or llm")
    t0 = time.time()
    run, store, sae = load_run(cfg, "probing routing of")
    res = probe_routing(sae, store, cfg.probe)
    lat_path = run / "analysis" / "latents.parquet"
    latents = pd.read_parquet(lat_path, columns=["latent", "top_token"]) if lat_path.is_file() else pd.DataFrame()
    names = _feature_names(run, latents)
    ef = res.expert_features
    ef["explanation"] = [names.get(int(i)) for i in ef["latent"]]
    groups = [(int(j), int(e), g.sort_values("rank")) for (j, e), g in ef.groupby(["layer", "expert"])]
    feats = [[f"latent {int(r.latent)}: {r.explanation or '?'}" for r in g.head(EXPERT_FEATURES).itertuples()]
             for _, _, g in groups]
    if cfg.explainer == "llm":
        client = ChatClient(cfg.llm, cache_path=run / EXPLAIN_DIR / "cache.jsonl")
        answers = client.chat_many([expert_messages(j, e, f) for (j, e, _), f in zip(groups, feats)], max_tokens=32)
        texts, who = [parse_explanation(a["text"]) for a in answers], f"llm:{cfg.llm.model}"
        usage = client.usage
    else:
        texts, who, usage = ["; ".join(f) for f in feats], "tokens", None
    ee = pd.DataFrame({"layer": [j for j, _, _ in groups], "expert": [e for _, e, _ in groups],
                       "explanation": texts, "explainer": who,
                       "latents": [g["latent"].head(EXPERT_FEATURES).tolist() for _, _, g in groups]})
    tables = {"recall": res.recall, "domain_recall": res.domain_recall, "expert_features": ef,
              "expert_explanations": ee}
    if cfg.needed:
        tables.update(_needed(cfg, store, sae, names))
    out = run / PROBE_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        with atomic_path(out / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
    wide = res.recall.pivot(index="layer", columns="method", values="recall")
    probe = asdict(cfg.probe)
    atomic_write_json(out / "summary.json", {
        "run": str(run), "store": str(store.root), "arch": sae.cfg.arch, "n_latents": sae.cfg.n_latents,
        "k": int(res.recall["k"].iloc[0]), "tokens_train": int(res.recall["tokens_train"].iloc[0]),
        "tokens_test": int(res.recall["tokens_test"].iloc[0]), "split": "by context: context % 10 < 7 train, else test",
        "mean_recall": {m: float(wide[m].mean()) for m in wide.columns}, "expert_explainer": who,
        "usage": usage, "probe": probe, "wall_s": round(time.time() - t0, 2),
        "needed": {"eps": cfg.eps, "tokens": cfg.needed_tokens} if cfg.needed else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log.info("routing probe of %s: mean recall@k %s", run, {m: round(float(wide[m].mean()), 3) for m in wide.columns})
    return out


def _needed(cfg: ProbeRunConfig, store, sae, names: dict[int, str]) -> dict[str, pd.DataFrame]:
    from routesae.evaluate import checked_model
    from routesae.explain.needed import align, needed_k, regress
    from routesae.explain.probe import probe_data

    model = checked_model(cfg, store, sae.cfg.layers, dtype="float32", contexts=1)[0]
    if model is None:
        raise ValueError(f"--needed-k needs the store's model; pass --model (the store {store.root} names none "
                         f"that is local)")
    n = min(cfg.needed_tokens, cfg.probe.tokens)
    d = probe_data(sae, store, cfg.probe.tokens, cfg.probe.device)
    summary, lat = regress(d, align(d, needed_k(model, store, n, cfg.eps)), sae.cfg.n_latents, cfg.probe)
    lat["explanation"] = [names.get(int(i)) for i in lat["latent"]]
    return {"needed_k": summary, "needed_latents": lat}
