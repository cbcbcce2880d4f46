"""Detection and fuzzing scores of an explanation (REFERENCE §9), with an LLM judge or a proxy judge.

- *detection*: held-out activating snippets (label 1) and as many non-activating ones (label 0),
  shown without marks; the judge says whether the latent is active in each;
- *fuzzing*: the held-out activating snippets twice, once with the activating tokens marked
  (label 1) and once with as many other tokens marked (label 0); the judge says whether the marks
  are the ones the explanation describes.

Both are balanced. Per latent: accuracy, precision, recall, F1 (positive = label 1) and AUC
(Mann-Whitney, ties count one half) of the judge's score: P(yes) from the first answer token's
log-probabilities when the endpoint gives them, else 1/0 from the answer.

The *proxy judge* (no LLM; :data:`PROXY`) answers from the explanation's key tokens
(:func:`routesae.explain.explainers.key_tokens`): detection scores a snippet by its best-ranked key
token present (1, 1/2, 1/3, ... for key 1, 2, 3; yes when any is present), fuzzing by the fraction
of marked tokens that are key tokens (yes at >= 1/2). It measures token overlap, not meaning: a proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from routesae.explain.client import p_yes
from routesae.explain.examples import Snippet
from routesae.explain.prompts import detect_messages, fuzz_messages, parse_yes_no, render

PROXY = "proxy:token-match"
SCORERS = ("detection", "fuzzing")


@dataclass
class Example:
    """One question of a scorer: the snippet as shown (rendered), its label, and the marks it carries."""

    scorer: str
    label: int
    text: str
    tokens: list[str]
    marked: list[bool]


def examples(held: Sequence[Snippet], negatives: Sequence[Snippet], seed: int, latent: int) -> list[Example]:
    """The balanced detection and fuzzing questions of one latent."""
    out = []
    n = min(len(held), len(negatives))
    for s in list(held[:n]) + list(negatives[:n]):
        lab = int(s.kind != "neg")
        out.append(Example("detection", lab, render(s.tokens, [0] * len(s.tokens)), s.tokens, [False] * len(s.tokens)))
    rng = np.random.default_rng([seed, latent, 1])
    for s in held:
        right = [a > 0 for a in s.acts]
        free = [i for i, m in enumerate(right) if not m]
        if not free:
            continue
        pick = set(rng.choice(free, size=min(sum(right), len(free)), replace=False).tolist())
        wrong = [i in pick for i in range(len(right))]
        out.append(Example("fuzzing", 1, render(s.tokens, right), s.tokens, right))
        out.append(Example("fuzzing", 0, render(s.tokens, wrong), s.tokens, wrong))
    return out


def prompt(ex: Example, explanation: str) -> list[dict[str, str]]:
    return (detect_messages if ex.scorer == "detection" else fuzz_messages)(explanation, ex.text)


def _norm(t: str) -> str:
    return str(t).strip().lower()


def proxy_answer(ex: Example, keys: Sequence[str]) -> tuple[bool, float]:
    """``(yes, score)`` of the proxy judge for one question, from the explanation's key tokens."""
    rank = {}
    for i, k in enumerate(keys):
        rank.setdefault(_norm(k), i)
    if ex.scorer == "detection":
        hits = [1.0 / (1 + rank[_norm(t)]) for t in ex.tokens if _norm(t) in rank]
        score = max(hits, default=0.0)
        return score > 0, score
    marked = [t for t, m in zip(ex.tokens, ex.marked) if m]
    score = sum(_norm(t) in rank for t in marked) / max(len(marked), 1)
    return score >= 0.5, score


def llm_answer(answer: dict) -> tuple[bool | None, float]:
    """``(yes or None when unparsable, score)`` from a chat answer (score = P(yes), else 1/0)."""
    yes = parse_yes_no(answer.get("text", ""))
    p = p_yes(answer)
    return yes, (p if p is not None else (1.0 if yes else 0.0))


def auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve by Mann-Whitney (ties count 1/2); NaN without both classes."""
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    if not pos.size or not neg.size:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def metrics(labels: Sequence[int], preds: Sequence[bool], scores: Sequence[float]) -> dict[str, float]:
    """accuracy, precision, recall, f1 (positive = label 1) and auc; n_pos and n_neg."""
    y, p = np.asarray(labels, dtype=int), np.asarray(preds, dtype=bool)
    tp, fp, fn = int((p & (y == 1)).sum()), int((p & (y == 0)).sum()), int((~p & (y == 1)).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": float((p == (y == 1)).mean()) if y.size else float("nan"), "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "auc": auc(y, scores),
            "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum())}
