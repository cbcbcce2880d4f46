"""Behaviour-linked experts (SteerMoE): per layer and expert, the activation rate on text A and on text B.

Definitions (k = the model's experts per token; BOS tokens left out, as in the expert tables):

- ``rate_a`` = tokens of A whose top-k includes the expert / tokens of A; ``rate_b`` likewise;
- ``risk_diff`` = rate_a - rate_b (SteerMoE's activation-rate difference), ``risk_ratio`` = rate_a / rate_b;
- ``z`` = risk_diff / sqrt(rate_a (1 - rate_a) / n_a + rate_b (1 - rate_b) / n_b): the two-proportion
  z statistic as if tokens were independent. Tokens of one document are not, so read ``z`` as an order
  of magnitude (it overstates the evidence), not as a test.

Sources: two domains of an analysis (``routesae analyze RUN --contrast math:legal`` reads the counts of
``expert_domain.parquet``, nothing is recomputed), or two sets of text run through the model
(``routesae contrast MODEL --a SPEC --b SPEC``: a domain of ``--corpus``, a ``.txt`` file with one
text per line, e.g. paired prompt files, or a corpus path).

:func:`steering_setting` turns the top rows into an expert-steering override (``bias:E=B@layerL``
or ``force:E@layerL``) for ``routesae steer --experts``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from routesae.causal.features import SteeringError
from routesae.corpus import CorpusConfig, iter_documents
from routesae.models.load import first_device
from routesae.models.routers import adapter_for

COLUMNS = ["rank", "layer", "expert", "rate_a", "rate_b", "risk_diff", "risk_ratio", "z", "hits_a", "hits_b",
           "tokens_a", "tokens_b"]


def parse_pair(text: str) -> tuple[str, str]:
    """``"math:legal"`` -> ("math", "legal")."""
    parts = [p.strip() for p in str(text).split(":")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise SteeringError(f"--contrast {text!r}: give two different names as A:B, e.g. math:legal")
    return parts[0], parts[1]


def contrast_table(hits_a: np.ndarray, tokens_a: int, hits_b: np.ndarray, tokens_b: int,
                   layers: list[int]) -> pd.DataFrame:
    """The ranked table (module docstring) from top-k hit counts ``[L, E]`` and token counts of A and B."""
    if tokens_a < 1 or tokens_b < 1:
        raise SteeringError(f"contrast needs tokens on both sides; got {tokens_a} (A) and {tokens_b} (B)")
    L, E = hits_a.shape
    ra, rb = hits_a / tokens_a, hits_b / tokens_b
    se = np.sqrt(ra * (1 - ra) / tokens_a + rb * (1 - rb) / tokens_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(se > 0, (ra - rb) / se, 0.0)
        ratio = np.where(rb > 0, ra / rb, np.inf)
    li, ei = (g.ravel() for g in np.meshgrid(np.arange(L), np.arange(E), indexing="ij"))
    df = pd.DataFrame({"layer": np.asarray(layers, np.int64)[li], "expert": ei, "rate_a": ra.ravel(),
                       "rate_b": rb.ravel(), "risk_diff": (ra - rb).ravel(), "risk_ratio": ratio.ravel(),
                       "z": z.ravel(), "hits_a": hits_a.ravel().astype(np.int64),
                       "hits_b": hits_b.ravel().astype(np.int64), "tokens_a": int(tokens_a), "tokens_b": int(tokens_b)})
    df = df.sort_values(["risk_diff", "layer", "expert"], ascending=[False, True, True], kind="stable")
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df[COLUMNS].reset_index(drop=True)


def contrast_from_expert_domain(expert_domain: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """The table for domains ``a`` and ``b`` from an analysis's ``expert_domain`` counts."""
    have = sorted(expert_domain["domain"].astype(str).unique()) if not expert_domain.empty else []
    missing = [d for d in (a, b) if d not in have]
    if missing:
        raise SteeringError(f"--contrast: domain(s) {missing} not in the analysed tokens; domains: "
                            f"{', '.join(have) or 'none (no expert tables)'}")
    layers = sorted(int(x) for x in expert_domain["layer"].unique())
    E = int(expert_domain["expert"].max()) + 1

    def counts(d: str) -> tuple[np.ndarray, int]:
        part = expert_domain[expert_domain["domain"].astype(str) == d]
        hits = np.zeros((len(layers), E), np.int64)
        hits[[layers.index(int(x)) for x in part["layer"]], part["expert"].to_numpy()] = part["hits_topk"].to_numpy()
        return hits, int(part["tokens"].iloc[0])

    (ha, na), (hb, nb) = counts(a), counts(b)
    return contrast_table(ha, na, hb, nb, layers)


def steering_setting(table: pd.DataFrame, top: int = 4, bias: float = 2.0, mode: str = "bias",
                     toward: str = "a") -> str:
    """An expert-steering override from the ``top`` rows: toward A the largest ``risk_diff`` (boosted by
    ``bias`` or forced), toward B the smallest (most B-linked) first."""
    if top < 1 or mode not in ("bias", "force") or toward not in ("a", "b"):
        raise SteeringError(f"steering setting: top {top} must be >= 1, mode bias or force, toward a or b")
    rows = table.sort_values("risk_diff", ascending=toward == "b", kind="stable").head(top)
    clauses = []
    for layer, part in rows.groupby("layer", sort=True):
        experts = sorted(int(e) for e in part["expert"])
        body = ",".join(f"{e}={bias:g}" for e in experts) if mode == "bias" else ",".join(map(str, experts))
        clauses.append(f"{mode}:{body}@layer{int(layer)}")
    return ";".join(clauses)


# ---------------------------------------------------------------- from text through the model


@dataclass
class TextSide:
    """One side of a contrast: its name and its texts."""

    name: str
    texts: list[str]


def read_side(spec: str, corpus: str | None, split: str, max_docs: int, text_field: str = "text",
              domain_field: str = "domain") -> TextSide:
    """``spec``: a ``.txt`` file (one text per line), a domain of ``corpus``, or a corpus path (all its documents)."""
    p = Path(spec).expanduser()
    if p.suffix == ".txt" and p.is_file():
        texts = [line for line in p.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        return TextSide(p.stem, texts[:max_docs])
    if p.exists():
        docs = iter_documents(CorpusConfig(str(p), text_field, domain_field, split, shuffle=False))
        return TextSide(p.stem, [d.text for _, d in zip(range(max_docs), docs)])
    if corpus is None:
        raise SteeringError(f"'{spec}' is neither a file nor a folder; to name a domain, pass --corpus too")
    docs = iter_documents(CorpusConfig(corpus, text_field, domain_field, split, shuffle=False))
    texts, seen = [], set()
    for d in docs:
        seen.add(d.domain)
        if d.domain == spec:
            texts.append(d.text)
            if len(texts) >= max_docs:
                break
    if not texts:
        raise SteeringError(f"domain '{spec}' has no documents in {corpus} (split {split}); domains seen: "
                            f"{', '.join(sorted(seen))}")
    return TextSide(spec, texts)


def _batches(tokenizer, texts: list[str], ctx: int, batch: int, max_tokens: int) -> Iterator[tuple[torch.Tensor, ...]]:
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, done = [], 0
    for t in texts:
        ids = (([bos] if bos is not None else []) + list(tokenizer(t, add_special_tokens=False)["input_ids"]))[:ctx]
        if len(ids) < 2:
            continue
        rows.append(ids)
        done += len(ids)
        if len(rows) == batch or done >= max_tokens:
            yield _pad(rows, pad, bos is not None)
            rows = []
        if done >= max_tokens:
            return
    if rows:
        yield _pad(rows, pad, bos is not None)


def _pad(rows: list[list[int]], pad: int, has_bos: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    count = mask.bool().clone()
    if has_bos:
        count[:, 0] = False  # BOS: the same token at the start of every text, left out as in the expert tables
    return ids, mask, count


@torch.no_grad()
def routing_counts(model, tokenizer, texts: list[str], ctx: int = 256, batch: int = 8,
                   max_tokens: int = 65536) -> tuple[np.ndarray, int, list[int]]:
    """Top-k hits ``[L, E]`` over the real non-BOS tokens of ``texts``, the token count and the MoE layers."""
    adapter = adapter_for(model)
    if adapter is None:
        raise SteeringError("a contrast of experts needs an MoE model; this one has no router")
    layers, E = adapter.moe_layers(), adapter.num_experts()
    hits = np.zeros((len(layers), E), np.int64)
    tokens = 0
    got: dict = {}
    handles = [h for layer in layers for h in adapter.attach(layer, got.__setitem__, want_logits=False)]
    device = first_device(model)
    try:
        for ids, mask, count in _batches(tokenizer, texts, ctx, batch, max_tokens):
            got.clear()
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            keep = count.flatten()
            tokens += int(keep.sum())
            for li, layer in enumerate(layers):
                idx = got[layer].indices.cpu()[keep]
                idx = idx[(idx >= 0) & (idx < E)]
                hits[li] += np.bincount(idx.numpy(), minlength=E)
    finally:
        for h in handles:
            h.remove()
    return hits, tokens, layers


def contrast_to_folder(model: str, a: str, b: str, out, corpus: str | None = None, split: str = "train",
                       max_docs: int = 2000, max_tokens: int = 65536, ctx: int = 256, batch: int = 8, top: int = 4,
                       bias: float = 2.0, mode: str = "bias", device: str = "auto", lm=None,
                       tokenizer=None) -> tuple[pd.DataFrame, dict]:
    """Run ``model`` over sides ``a`` and ``b`` (:func:`read_side`) and write ``contrast.parquet`` and
    ``contrast.json`` (sides, token counts, the steering setting) into ``out``; returns both."""
    from routesae.atomic import atomic_path, atomic_write_json
    from routesae.models.load import ModelConfig, load_model

    if max_docs < 1 or max_tokens < 1:
        raise SteeringError(f"--max-docs {max_docs} and --max-tokens {max_tokens} must be positive")
    steering_setting(pd.DataFrame(columns=COLUMNS), top, bias, mode)  # check the options before any work
    side_a = read_side(a, corpus, split, max_docs)
    side_b = read_side(b, corpus, split, max_docs)
    if lm is None:
        lm, tokenizer = load_model(ModelConfig(model, "float32", device))
    ha, na, layers = routing_counts(lm, tokenizer, side_a.texts, ctx, batch, max_tokens)
    hb, nb, _ = routing_counts(lm, tokenizer, side_b.texts, ctx, batch, max_tokens)
    table = contrast_table(ha, na, hb, nb, layers)
    info = {"model": model, "a": side_a.name, "b": side_b.name, "a_spec": a, "b_spec": b, "corpus": corpus,
            "split": split, "texts_a": len(side_a.texts), "texts_b": len(side_b.texts), "tokens_a": na,
            "tokens_b": nb, "top": top, "bias": bias, "mode": mode,
            "steering": steering_setting(table, top, bias, mode),
            "steering_toward_b": steering_setting(table, top, bias, mode, toward="b")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "contrast.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    atomic_write_json(out / "contrast.json", info)
    return table, info
