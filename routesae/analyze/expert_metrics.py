"""Pure expert-routing metrics on small arrays (REFERENCE §7); no store, no state.

All functions take NumPy arrays (or anything ``np.asarray`` accepts) and return floats or arrays.
Conventions: ``indices`` is ``[n, k_max]`` with ``-1`` (or any id outside ``0..E-1``, e.g. the
zero-computation experts of LongCat-Flash) marking slots that are not real experts; ``load`` is
a per-expert vector of counts or fractions (the balance metrics are scale invariant).

Example::

    >>> import numpy as np
    >>> load = np.array([4, 2, 1, 1])
    >>> round(load_cv(load), 4), round(max_vio(load), 4)
    (0.6124, 1.0)
    >>> hits = multi_hot(np.array([[0, 1], [0, 2], [1, -1]]), 4)
    >>> coactivation(hits)[0].tolist()   # N(E_0 and E_j); the diagonal is N(E_0)
    [2, 1, 1, 0]
"""

from __future__ import annotations

import numpy as np


def multi_hot(indices: np.ndarray, n_experts: int) -> np.ndarray:
    """``[n, E]`` bool: token t's chosen experts (slots outside ``0..E-1`` are ignored)."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim == 1:
        idx = idx[:, None]
    out = np.zeros((idx.shape[0], n_experts), dtype=bool)
    rows, slots = np.nonzero((idx >= 0) & (idx < n_experts))
    out[rows, idx[rows, slots]] = True
    return out


def first_choice(indices: np.ndarray, weights: np.ndarray | None = None, n_experts: int | None = None) -> np.ndarray:
    """``[n]`` the first-choice expert of each token, ``-1`` when it used no real expert.

    The first choice is the valid slot with the largest routing weight (ties: the earlier slot);
    without weights, the first valid slot (routers emit their top-k in descending order).
    """
    idx = np.asarray(indices, dtype=np.int64)
    valid = idx >= 0
    if n_experts is not None:
        valid &= idx < n_experts
    if weights is None:
        score = np.where(valid, -np.arange(idx.shape[1])[None, :], -np.inf)
    else:
        score = np.where(valid, np.asarray(weights, dtype=np.float64), -np.inf)
    slot = score.argmax(1)  # argmax keeps the first of equal maxima
    out = idx[np.arange(idx.shape[0]), slot]
    return np.where(valid.any(1), out, -1)


def load_cv(load: np.ndarray) -> float:
    """Coefficient of variation of the expert load: ``std(load) / mean(load)`` (population std).

    0 for a perfectly balanced layer; ``sqrt(E - 1)`` when one expert takes everything.
    """
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean()
    return float(load.std() / mean) if mean > 0 else float("nan")


def normalised_entropy(load: np.ndarray) -> float:
    """Entropy of the load distribution divided by ``log E``: 1 balanced, 0 fully collapsed.

    ``p_i = load_i / sum load``; ``H = -sum_i p_i log p_i`` (``0 log 0 = 0``); result ``H / log E``.
    """
    load = np.asarray(load, dtype=np.float64)
    total = load.sum()
    if total <= 0 or load.size < 2:
        return float("nan")
    p = load[load > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(load.size))


def max_vio(load: np.ndarray) -> float:
    """MaxVio: ``(max_i load_i - mean load) / mean load``; 0 balanced, ``E - 1`` fully collapsed."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else float("nan")


def switch_aux(f: np.ndarray, P: np.ndarray) -> float:
    """Switch-Transformer auxiliary balance value ``E * sum_i f_i P_i`` (the loss before its coefficient).

    ``f_i``: fraction of tokens whose top-k includes expert i (so ``sum_i f_i`` = mean experts
    per token, ``k`` for a fixed top-k router); ``P_i``: mean router probability of expert i
    (softmax over all E logits, averaged over tokens; ``sum_i P_i = 1``). This equals Hugging
    Face's ``load_balancing_loss_func`` without its coefficient. Balanced routing gives
    ``E * E * (k/E) * (1/E) = k``; full collapse onto one expert with probability 1 gives ``E``.
    """
    f = np.asarray(f, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    return float(f.size * (f * P).sum())


def repetition_pairs(first: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks over the ``n - 1`` consecutive pairs ``(t-1, t)``: ``(counted, repeated)``.

    A pair is counted when both tokens belong to the same context and both have a first choice
    (``>= 0``); it is repeated when the two first choices are equal.
    """
    first = np.asarray(first)
    context = np.asarray(context)
    counted = (context[1:] == context[:-1]) & (first[1:] >= 0) & (first[:-1] >= 0)
    repeated = counted & (first[1:] == first[:-1])
    return counted, repeated


def repetition_rate(first_choice: np.ndarray, context_ids: np.ndarray) -> float:
    """Fraction of consecutive token pairs of a context whose first-choice experts are equal (Mixtral).

    ``first_choice``: ``[n]`` expert ids in corpus order (``-1`` = none); ``context_ids``: ``[n]``
    the context of each token. Pairs that straddle two contexts are not counted. Random routing
    gives about ``1/E``.
    """
    counted, repeated = repetition_pairs(first_choice, context_ids)
    n = counted.sum()
    return float(repeated.sum() / n) if n else float("nan")


def coactivation(indices_or_hits: np.ndarray, n_experts: int | None = None) -> np.ndarray:
    """``[E, E]`` int64 counts ``N(E_i and E_j)``: tokens whose top-k holds both i and j.

    Takes ``[n, k]`` indices (with ``n_experts``, or E = max id + 1) or a ``[n, E]`` bool
    multi-hot matrix. The diagonal is ``N(E_i)``. See :func:`coactivation_rate`.
    """
    a = np.asarray(indices_or_hits)
    if a.dtype != bool:
        a = multi_hot(a, n_experts if n_experts is not None else int(a.max()) + 1)
    out = np.zeros((a.shape[1], a.shape[1]), dtype=np.int64)
    step = 1 << 20  # float32 sums stay exact below 2**24
    for s in range(0, a.shape[0], step):
        m = a[s:s + step].astype(np.float32)
        out += np.rint(m.T @ m).astype(np.int64)
    return out


def coactivation_rate(counts: np.ndarray) -> np.ndarray:
    """``rate[i, j] = N(E_i and E_j) / N(E_i)`` from :func:`coactivation` counts (NaN where N(E_i) = 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    diag = np.diag(counts)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(diag > 0, counts / np.where(diag > 0, diag, 1), np.nan)


def lift(share: np.ndarray, base: np.ndarray | float) -> np.ndarray:
    """``share / base`` elementwise (NaN where base is 0), e.g. share_topk / (k/E)."""
    share = np.asarray(share, dtype=np.float64)
    base = np.broadcast_to(np.asarray(base, dtype=np.float64), share.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(base > 0, share / np.where(base > 0, base, 1), np.nan)


def router_entropy(logits: np.ndarray) -> np.ndarray:
    """``[n]`` per-token entropy (nats) of ``softmax(logits)`` over all E experts.

    Whatever the model's own scoring (softmax over the top-k only in GPT-OSS / Granite, sigmoid in
    DeepSeek-V3), this is the entropy of the softmax over all E stored logits.
    """
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
