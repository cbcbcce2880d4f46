"""Which contexts an explainer sees and which ones the scorers hold out.

From the analysis's ``contexts`` table (docs/analysis.md): the explainer sees a latent's top
contexts of rank < ``n_explain``; the scorers use *other* contexts: activating ones drawn in turn
from the quantile bins ``q0, q1, ...`` (then the top contexts the explainer did not see), and as
many non-activating windows from the store, on which the latent is zero at every token (the SAE
is run on them: :func:`negative_windows`). Every context is cut to ``±half`` tokens around its
centre. A snippet the explainer saw is never scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from routesae.store import Store


@dataclass
class Snippet:
    """One context cut around its centre: tokens and the latent's activation at each (zeros: non-activating)."""

    tokens: list[str]
    acts: list[float]
    kind: str  # top | q<b> | neg
    domain: str | None = None


def cut(tokens, acts, center: int, half: int) -> tuple[list[str], list[float]]:
    lo, hi = max(0, int(center) - half), int(center) + half + 1
    return [str(t) for t in list(tokens)[lo:hi]], [float(a) for a in list(acts)[lo:hi]]


def latent_snippets(ctx: pd.DataFrame, n_explain: int, n_score: int, half: int) -> tuple[list[Snippet], list[Snippet]]:
    """``(explain, held_out)`` snippets of one latent's rows of the contexts table."""
    def snip(r) -> Snippet:
        t, a = cut(r.tokens, r.acts, r.center, half)
        return Snippet(t, a, str(r.kind), None if r.domain is None else str(r.domain))

    top = ctx[ctx["kind"] == "top"].sort_values("rank")
    explain = [snip(r) for r in top.head(n_explain).itertuples()]
    seen = {tuple(s.tokens) for s in explain}
    bins = sorted(k for k in ctx["kind"].unique() if str(k).startswith("q"))
    queues = [list(ctx[ctx["kind"] == b].sort_values("rank").itertuples()) for b in bins]
    queues.append(list(top.iloc[n_explain:].itertuples()))
    held: list[Snippet] = []
    while len(held) < n_score and any(queues):
        for q in queues:
            if q and len(held) < n_score:
                s = snip(q.pop(0))
                if tuple(s.tokens) not in seen and max(s.acts, default=0) > 0:
                    seen.add(tuple(s.tokens))
                    held.append(s)
    return explain, held


@dataclass
class NegativePool:
    """Windows of store text and which latents are active anywhere in each (``active [W, M]``)."""

    tokens: list[list[str]]
    active: np.ndarray

    def for_latent(self, latent: int, n: int, seed: int) -> list[Snippet]:
        free = np.flatnonzero(~self.active[:, latent])
        rng = np.random.default_rng([seed, latent])
        pick = rng.choice(free, size=min(n, free.size), replace=False) if free.size else []
        return [Snippet(self.tokens[i], [0.0] * len(self.tokens[i]), "neg") for i in sorted(pick)]


@torch.no_grad()
def negative_windows(sae, store: Store, n_windows: int, half: int, seed: int = 0, max_tokens: int = 16384,
                     device: str = "cpu") -> NegativePool:
    """``n_windows`` random windows of ``2*half+1`` tokens inside one store context each (from the store's
    first ``max_tokens`` tokens), and the latents the SAE activates anywhere in them."""
    from routesae.analyze.features import iter_chunks

    m = sae.cfg.n_latents
    rng = np.random.default_rng(seed)
    toks, act = [], []
    for ch in iter_chunks(sae, store, min(max_tokens, store.n_tokens), [], device=device):
        ctx = ch.context.numpy()
        n = ctx.size
        centers = np.arange(half, n - half)
        ok = centers[(ctx[centers - half] == ctx[centers]) & (ctx[centers + half] == ctx[centers])]
        want = max(1, int(round(n_windows * n / max(min(max_tokens, store.n_tokens), 1))))
        centers = np.sort(rng.choice(ok, size=min(want, ok.size), replace=False)) if ok.size else ok
        on = np.zeros((n, m), dtype=bool)
        on[ch.row.numpy(), ch.latent.numpy()] = True
        for c in centers:
            toks.append([str(t) for t in ch.token[c - half:c + half + 1]])
            act.append(on[c - half:c + half + 1].any(0))
    if not toks:
        raise ValueError(f"store {store.root} has no context of {2 * half + 1} tokens for non-activating examples; "
                         f"use a smaller --window")
    return NegativePool(toks[:n_windows], np.stack(act)[:n_windows])
