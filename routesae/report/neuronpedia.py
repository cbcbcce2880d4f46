"""Neuronpedia-style feature batch export (REFERENCE §8), in the layout SAEDashboard's
``NeuronpediaRunner`` writes (``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``).

``neuronpedia/batch-N.json`` = one JSON object per batch of ``batch_size`` latents (by index)::

    {"model_id": str, "layer": int, "sae_set": str, "features": [FEATURE, ...]}

FEATURE (all keys always present; what routesae does not compute is an empty list or 0)::

    feature_index                      latent index
    pos_str / pos_values               logit lens: top tokens of W_dec[i] @ W_U and their values
    neg_str / neg_values               the most negative ones ([] without a model)
    frac_nonzero                       density: fraction of analysed tokens where the latent fires
    freq_hist_data_bar_values          activation histogram: bin centres (20 bins, 0 .. max act)
    freq_hist_data_bar_heights         ... and active-token counts per bin
    logits_hist_data_bar_values/_heights, neuron_alignment_*, correlated_neurons_*,
    correlated_features_*, decoder_weights_dist        [] (not computed)
    n_prompts_total                    0 (not recorded by the analysis)
    n_tokens_in_prompt                 tokens per exported context window (2 * context_window + 1)
    dataset                            the store the analysis read
    activations                        [ACTIVATION, ...]: top contexts first, then the quantile samples
    explanations                       [] or, after `routesae explain`, one EXPLANATION (Neuronpedia's
                                       explanation upload fields)

EXPLANATION::

    description                        the explanation text
    explanationModelName               the LLM (``smollm2``) or ``routesae-tokens`` (token explainer, no LLM)
    typeName                           ``routesae-llm-v1`` / ``routesae-tokens-v1`` (explainer and prompt version)
    scores                             {"detection_auc", "fuzzing_auc", "judge"} (null when not scored)

ACTIVATION::

    tokens, values                     the context's tokens and the latent's activation at each
    bin_min, bin_max, bin_contains     top contexts: -1, the latent's max activation, -1 (SAEDashboard's
                                       "TOP ACTIVATIONS" marker); quantile sample q of Q: its bin's
                                       activation bounds (quantiles q/Q, (q+1)/Q of the nonzero activations,
                                       read off the histogram and widened to the samples) and 1/Q

``layer`` is the SAE's layer (topk) or its first layer (routesae / mlsae: a token's layer is in
the analysis tables, not here). Token strings are exported as they are: consumers must escape them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from routesae.report.load import Analysis, as_list, scalar
from routesae.report.tables import write_json

FEATURE_KEYS = (
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str", "neg_values",
    "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt",
    "dataset", "decoder_weights_dist", "activations", "explanations")
ACTIVATION_KEYS = ("bin_min", "bin_max", "bin_contains", "tokens", "values")


def _floats(v: Any) -> list[float | None]:
    return [None if scalar(x) is None else float(x) for x in as_list(v)]


def hist_quantile(edges: list[float], counts: list[float], q: float) -> float:
    """The ``q`` quantile of a histogram, linear inside the bin."""
    c = np.asarray(counts, dtype=float)
    if len(edges) < 2 or c.sum() <= 0:
        return 0.0
    cdf = np.concatenate([[0.0], np.cumsum(c) / c.sum()])
    return float(np.interp(q, cdf, edges))


def _quantile_bins(row: dict, ctx: list[dict], n_bins: int) -> dict[str, tuple[float, float, float]]:
    """{kind: (bin_min, bin_max, bin_contains)} of the latent's quantile-bin samples."""
    edges, counts = _floats(row.get("hist_edges")), _floats(row.get("hist_counts"))
    acts: dict[str, list[float]] = {}
    for c in ctx:
        kind = str(c["kind"])
        if kind.startswith("q") and kind[1:].isdigit():
            acts.setdefault(kind, []).append(float(c["act"]))
    out = {}
    for kind, vals in acts.items():
        q = int(kind[1:])
        lo, hi = hist_quantile(edges, counts, q / n_bins), hist_quantile(edges, counts, (q + 1) / n_bins)
        out[kind] = (min(lo, *vals), max(hi, *vals), 1.0 / n_bins)
    return out


def _order(c: dict) -> tuple:
    """Top contexts by rank, then the quantile samples from the highest bin down."""
    kind = str(c["kind"])
    return (0, 0, c["rank"]) if kind == "top" else (1, -int(kind[1:]) if kind[1:].isdigit() else 0, c["rank"])


def feature_json(a: Analysis, row: dict, ctx: list[dict], n_bins: int) -> dict[str, Any]:
    """One latent (its ``latents`` row and ``contexts`` rows as dicts) in Neuronpedia's feature layout."""
    edges, counts = _floats(row.get("hist_edges")), as_list(row.get("hist_counts"))
    mids = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
    max_act = float(scalar(row.get("max_act")) or 0.0)
    bins = _quantile_bins(row, ctx, n_bins)
    acts = []
    for c in sorted(ctx, key=_order):
        if c["kind"] == "top":
            lo, hi, contains = -1.0, max_act, -1.0
        elif c["kind"] in bins:
            lo, hi, contains = bins[c["kind"]]
        else:
            continue
        acts.append({"bin_min": lo, "bin_max": hi, "bin_contains": contains,
                     "tokens": [str(t) for t in as_list(c["tokens"])], "values": _floats(c["acts"])})
    window = a.settings.get("context_window")
    feat: dict[str, Any] = {k: [] for k in FEATURE_KEYS}
    feat.update({
        "feature_index": int(row["latent"]),
        "pos_str": [str(s) for s in as_list(row.get("logit_pos"))], "pos_values": _floats(row.get("logit_pos_values")),
        "neg_str": [str(s) for s in as_list(row.get("logit_neg"))], "neg_values": _floats(row.get("logit_neg_values")),
        "frac_nonzero": float(scalar(row.get("density")) or 0.0),
        "freq_hist_data_bar_values": mids, "freq_hist_data_bar_heights": [int(x) for x in counts],
        "n_prompts_total": 0, "n_tokens_in_prompt": 2 * int(window) + 1 if window else 0,
        "dataset": str(a.summary.get("store") or a.eval.get("store") or ""),
        "activations": acts,
        "explanations": _explanations(row),
    })
    return feat


def _explanations(row: dict) -> list[dict[str, Any]]:
    text, who = scalar(row.get("explanation")), scalar(row.get("explainer"))
    if not text:
        return []
    llm = isinstance(who, str) and who.startswith("llm:")
    model = who[4:] if llm else "routesae-tokens"
    return [{"description": str(text), "explanationModelName": model,
             "typeName": f"routesae-{'llm' if llm else 'tokens'}-v1",
             "scores": {"detection_auc": scalar(row.get("detection_auc")),
                        "fuzzing_auc": scalar(row.get("fuzzing_auc")), "judge": scalar(row.get("judge"))}}]


def batch_header(a: Analysis) -> dict[str, Any]:
    layers = a.config.get("layers") or a.summary.get("layers") or [0]
    model = a.model_name.rstrip("/").split("/")[-1] or "model"
    arch = a.config.get("arch") or a.summary.get("arch") or "sae"
    return {"model_id": model, "layer": int(layers[0]), "sae_set": f"{arch}-{a.run.name}"}


def write_neuronpedia(a: Analysis, out: Path, batch_size: int = 128) -> dict[str, Path]:
    """Write ``out/batch-N.json`` for every latent of the analysis; return the paths."""
    lat = a.latents
    if lat.empty:
        return {}
    n_bins = int(a.settings.get("quantile_bins") or 0)
    if not n_bins and not a.contexts.empty:
        n_bins = sum(1 for k in a.contexts["kind"].unique() if str(k).startswith("q")) or 1
    n_bins = max(n_bins, 1)
    by_latent: dict[int, list[dict]] = {}
    if not a.contexts.empty:
        for c in a.contexts.to_dict("records"):
            by_latent.setdefault(int(c["latent"]), []).append(c)
    header = batch_header(a)
    rows = lat.sort_values("latent").to_dict("records")
    paths = {}
    for b, start in enumerate(range(0, len(rows), batch_size)):
        feats = [feature_json(a, r, by_latent.get(int(r["latent"]), []), n_bins)
                 for r in rows[start:start + batch_size]]
        p = out / f"batch-{b}.json"
        write_json(p, {**header, "features": feats})
        paths[f"neuronpedia/batch-{b}.json"] = p
    return paths
