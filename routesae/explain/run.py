"""``routesae explain RUN``: explanations of latents and their detection / fuzzing scores, beside the analysis.

Reads ``RUN/analysis/`` (``latents`` and ``contexts``), writes ``RUN/explanations/``:

- ``explanations.parquet``: latent, explanation, explainer (``tokens`` or ``llm:MODEL``),
  prompt_version, key_tokens, n_contexts, prompt (JSON of the messages; empty for tokens), answer, created;
- ``scores.parquet``: latent, explainer, scorer (detection / fuzzing), judge (``llm:MODEL`` or
  ``proxy:token-match``), accuracy, precision, recall, f1, auc, n_pos, n_neg, unparsed;
- ``answers.parquet``: every scorer question: latent, explainer, scorer, judge, label, text, prompt,
  answer, yes, score;
- ``summary.json``: the settings, the analysis it read (its ``created`` stamp), requests and tokens,
  wall time; ``cache.jsonl``: the prompt cache (:mod:`routesae.explain.cache`).

A new run replaces only the rows with its own keys (same latent, explainer, scorer and judge);
everything else already written is kept. The analysis folder is never written (``routesae analyze``
swaps it whole), so explanations survive a new analysis; summary.json says which one they read.
Example::

    explain(ExplainConfig(run="runs/x", top=20, explainer="tokens", judge="proxy"))
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from routesae.atomic import atomic_path, atomic_write_json
from routesae.explain import explainers as X
from routesae.explain import scorers as S
from routesae.explain.client import ChatClient, LLMConfig
from routesae.explain.examples import latent_snippets, negative_windows
from routesae.explain.prompts import PROMPT_VERSION

log = logging.getLogger(__name__)
DIR = "explanations"
KEYS = {"explanations": ["latent", "explainer"], "scores": ["latent", "explainer", "scorer", "judge"],
        "answers": ["latent", "explainer", "scorer", "judge"]}
ORDERS = ("count", "interpretable", "density")


@dataclass
class ExplainConfig:
    """What to explain and how. ``latents``: explicit ids (else the ``top`` latents ``by`` activation count,
    interpretable-first or density; ``top=None``: all live latents). ``explainer``: llm | tokens;
    ``judge``: llm | proxy | none. ``n_explain`` top contexts go to the explainer, ``n_score`` held-out
    activating and as many non-activating snippets to each scorer, all cut to ``±window`` tokens."""

    run: str
    latents: list[int] | None = None
    top: int | None = 50
    by: str = "count"
    explainer: str = "llm"
    judge: str = "llm"
    llm: LLMConfig = field(default_factory=LLMConfig)
    n_explain: int = 10
    n_score: int = 5
    window: int = 8
    negatives: int = 400
    store: str | None = None
    device: str = "cpu"
    seed: int = 0
    max_tokens: int = 32


def _read_analysis(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    ana = run / "analysis"
    if not (ana / "latents.parquet").is_file() or not (ana / "contexts.parquet").is_file():
        raise FileNotFoundError(f"{ana} has no latents/contexts tables; run `routesae analyze {run}` first")
    summary = json.loads((ana / "summary.json").read_text()) if (ana / "summary.json").is_file() else {}
    return pd.read_parquet(ana / "latents.parquet"), pd.read_parquet(ana / "contexts.parquet"), summary


def select_latents(lat: pd.DataFrame, ctx: pd.DataFrame, latents: list[int] | None, top: int | None,
                   by: str = "count") -> list[int]:
    """The latents to explain: ``latents`` as given (checked), else the ``top`` live latents with contexts."""
    have = set(ctx["latent"].unique().tolist())
    if latents:
        bad = [i for i in latents if i not in have]
        if bad:
            raise ValueError(f"--latents: {bad[:5]} have no contexts in the analysis (dead or out of range 0.."
                             f"{len(lat) - 1}); pick live latents (see latents.parquet)")
        return list(dict.fromkeys(int(i) for i in latents))
    if by not in ORDERS:
        raise ValueError(f"--by {by!r}: give one of {', '.join(ORDERS)}")
    if top is not None and top < 1:
        raise ValueError("--top must be >= 1 (or --all)")
    live = lat[(lat["count"] > 0) & lat["latent"].isin(have)].copy()
    live["_i"] = live["interpretable"].astype(bool) if by == "interpretable" else False
    key = "density" if by == "density" else "count"
    live = live.sort_values(["_i", key, "latent"], ascending=[False, False, True])
    ids = [int(i) for i in live["latent"]]
    return ids if top is None else ids[:top]


def _merge_write(path: Path, new: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if path.is_file() and len(new):
        old = pd.read_parquet(path)
        k_new = set(map(tuple, new[keys].astype(str).to_numpy()))
        old = old[[tuple(r) not in k_new for r in old[keys].astype(str).to_numpy()]]
        new = pd.concat([old, new], ignore_index=True)
    elif path.is_file():
        return pd.read_parquet(path)
    with atomic_path(path) as tmp:
        new.to_parquet(tmp, index=False)
    return new


def _check(cfg: ExplainConfig) -> None:
    if cfg.explainer not in ("llm", X.TOKENS):
        raise ValueError(f"--explainer {cfg.explainer!r}: give llm or tokens (tokens needs no LLM)")
    if cfg.judge not in ("llm", "proxy", "none"):
        raise ValueError(f"--judge {cfg.judge!r}: give llm, proxy (no LLM, a token-overlap proxy) or none")
    if cfg.n_explain < 1 or cfg.n_score < 1 or cfg.window < 1 or cfg.negatives < 1:
        raise ValueError("--n-explain, --n-score, --window and --negatives must be >= 1")


def explain(cfg: ExplainConfig) -> Path:
    """Explain and score; returns ``RUN/explanations``. Logs the requests and tokens spent."""
    _check(cfg)
    t0 = time.time()
    run = Path(cfg.run).expanduser()
    lat, ctx, ana_summary = _read_analysis(run)
    ids = select_latents(lat, ctx, cfg.latents, cfg.top, cfg.by)
    out = run / DIR
    needs_llm = cfg.explainer == "llm" or cfg.judge == "llm"
    client = ChatClient(cfg.llm, cache_path=out / "cache.jsonl") if needs_llm else None
    llm_id = f"llm:{cfg.llm.model}"
    explainer_id = llm_id if cfg.explainer == "llm" else X.TOKENS
    rows = lat.set_index("latent")
    by_latent = {i: g for i, g in ctx[ctx["latent"].isin(ids)].groupby("latent")}
    snips = {i: latent_snippets(by_latent[i], cfg.n_explain, cfg.n_score, cfg.window) for i in ids}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    # ---- explanations
    expl, keys, prompts, raws = {}, {}, {}, {}
    if cfg.explainer == X.TOKENS:
        for i in ids:
            r = rows.loc[i]
            expl[i], keys[i] = X.token_explanation(snips[i][0], r.get("top_domain"), r.get("top_domain_lift"))
            prompts[i], raws[i] = "", ""
    else:
        ps = [X.explain_prompt(snips[i][0]) for i in ids]
        for i, p, (e, raw) in zip(ids, ps, X.llm_explanations(client, ps, cfg.max_tokens)):
            expl[i], keys[i], prompts[i], raws[i] = e, X.key_tokens(e), json.dumps(p, ensure_ascii=False), raw
    ex_df = pd.DataFrame({"latent": ids, "explanation": [expl[i] for i in ids], "explainer": explainer_id,
                          "prompt_version": PROMPT_VERSION, "key_tokens": [keys[i] for i in ids],
                          "n_contexts": [len(snips[i][0]) for i in ids], "prompt": [prompts[i] for i in ids],
                          "answer": [raws[i] for i in ids], "created": created})

    # ---- scores
    sc_rows, ans_rows = [], []
    if cfg.judge != "none" and ids:
        from routesae.evaluate import load_run

        _, store, sae = load_run(cfg, "explaining")
        pool = negative_windows(sae, store, cfg.negatives, cfg.window, cfg.seed, device=cfg.device)
        judge_id = llm_id if cfg.judge == "llm" else S.PROXY
        qs = {i: S.examples(snips[i][1], pool.for_latent(i, len(snips[i][1]), cfg.seed), cfg.seed, i) for i in ids}
        flat = [(i, q) for i in ids for q in qs[i]]
        if cfg.judge == "llm":
            answers = client.chat_many([S.prompt(q, expl[i]) for i, q in flat], max_tokens=2, logprobs=True)
            judged = [(*S.llm_answer(a), a["text"], json.dumps(S.prompt(q, expl[i]), ensure_ascii=False))
                      for (i, q), a in zip(flat, answers)]
        else:
            judged = [(*S.proxy_answer(q, keys[i]), "", "") for i, q in flat]
        for (i, q), (yes, score, text, prompt) in zip(flat, judged):
            ans_rows.append({"latent": i, "explainer": explainer_id, "scorer": q.scorer, "judge": judge_id,
                             "label": q.label, "text": q.text, "prompt": prompt, "answer": text,
                             "yes": bool(yes) if yes is not None else None, "score": float(score)})
        ans = pd.DataFrame(ans_rows)
        for (i, scorer), g in ans.groupby(["latent", "scorer"]) if len(ans) else []:
            m = S.metrics(g["label"].tolist(), g["yes"].fillna(False).astype(bool).tolist(), g["score"].tolist())
            sc_rows.append({"latent": int(i), "explainer": explainer_id, "scorer": scorer, "judge": judge_id, **m,
                            "unparsed": int(g["yes"].isna().sum())})

    out.mkdir(parents=True, exist_ok=True)
    _merge_write(out / "explanations.parquet", ex_df, KEYS["explanations"])
    scores = _merge_write(out / "scores.parquet", pd.DataFrame(sc_rows), KEYS["scores"])
    _merge_write(out / "answers.parquet", pd.DataFrame(ans_rows), KEYS["answers"])
    usage = dict(client.usage) if client else {"requests": 0, "cached": 0, "retries": 0, "prompt_tokens": 0,
                                               "completion_tokens": 0}
    this = scores[(scores["explainer"] == explainer_id) & scores["latent"].isin(ids)] if len(scores) else scores
    means = {f"{s}_{k}": float(np.nanmean(this.loc[this["scorer"] == s, k])) if (this["scorer"] == s).any() else None
             for s in S.SCORERS for k in ("accuracy", "f1", "auc")} if len(this) else {}
    llm = asdict(cfg.llm)
    llm.pop("api_key_env", None)
    atomic_write_json(out / "summary.json", {
        "run": str(run), "analysis_created": ana_summary.get("created"), "analysis_store": ana_summary.get("store"),
        "analysis_in_sample": ana_summary.get("in_sample"), "latents": ids, "explainer": explainer_id,
        "judge": None if cfg.judge == "none" else (llm_id if cfg.judge == "llm" else S.PROXY),
        "prompt_version": PROMPT_VERSION, "usage": usage, "wall_s": round(time.time() - t0, 2),
        "means": means, "created": created,
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "llm"}, "llm": llm if needs_llm else None}})
    log.info("explained %d latents of %s with %s; %d requests (%d cached), %d prompt + %d completion tokens",
             len(ids), run, explainer_id, usage["requests"], usage["cached"], usage["prompt_tokens"],
             usage["completion_tokens"])
    return out
