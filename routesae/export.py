"""Export an SAE run as SAELens 6.x folders: ``export_saelens(run, out_dir) -> SAELensExport``.

One folder per layer the dictionary reads (topk: its layer; routesae / mlsae: every layer in
``cfg.layers``), named after the TransformerLens hook, plus a ``README.md`` saying what they compute::

    OUT/README.md
    OUT/blocks.{j}.hook_resid_post/cfg.json                  SAELens "topk" config (6.x layout)
    OUT/blocks.{j}.hook_resid_post/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in],
                                                             b_enc [d_sae], b_dec [d_in]

Every folder takes the **raw** ``blocks.{j}.hook_resid_post`` activation ``h`` (what SAELens users
and ``HookedSAETransformer`` feed) and returns routesae's spliced value for it.

Standardisation. routesae encodes ``x = (h - mu) / (s + 1e-6)`` (``s`` the biased std over d) and
splices ``x_hat * (s + 1e-6) + mu``. SAELens's ``normalize_activations="layer_norm"`` computes
``y = (h - mu) / (s_u + 1e-5)`` with the unbiased ``s_u = r s``, ``r = sqrt(d / (d - 1))``, and
de-normalises its output as ``out * s_u + mu`` (no eps). SAELens's TopK SAE computes
``z = ReLU(TopK((y - b_dec) @ W_enc + b_enc))``, ``out = z @ W_dec + b_dec`` (ReLU after top-k, as
routesae), so with ``W_enc' = r W_enc``, ``b_enc' = b_enc``, ``b_dec' = b_pre / r``,
``W_dec' = W_dec / r`` its pre-activations and codes equal routesae's and its output equals the splice,
up to the two eps: SAELens's standardised input is ours times ``(s + 1e-6) / (s + 1e-5 / r)``
(relative difference at most ``9e-6 / s``) and its de-normalisation lacks our ``+1e-6``
(relative ``1e-6 / s``); for residual streams (``s`` >= 0.1) both are below 1e-4 and the top-k
choice can change only at near-ties.

RouteSAE. The router (which layer each token reads, and its weight ``p_i*``) cannot live in a
single-layer SAELens SAE. ``evaluate`` splices ``destandardise(SAE(p x) / p)`` at the routed layer
(``RouteSAE.reconstruct``), which equals the TopK SAE with biases ``b_pre / p`` and ``b_enc / p``
applied to ``x`` (TopK and ReLU commute with a positive scale), and whose codes are routesae's
divided by ``p``. ``p`` differs per token, so folder j folds one router weight ``q_j``: by default the
mean ``p_i*`` of the tokens routed to j on the run's store, else ``--router-weight``. For a token
routed to j, folder j reproduces the splice exactly when ``p_i* = q_j``, and for every token when
``b_pre = b_enc = 0``; otherwise it differs only through the biases (``b / q_j`` for ``b / p_i*``).
Soft routing splices a mixture of layers, not a layer: its folders hold the dictionary with
``q = 1`` and reproduce no routesae splice. MLSAE: every folder reproduces the splice of its layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from routesae.atomic import atomic_write_bytes
from routesae.layers import tl_resid_hook
from routesae.sae import SparseAutoencoder, load_sae
from routesae.store import Store, StoreError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
README = "README.md"
MIN_SAELENS = "6.0.0"  # configs without a >= 6 version are read as pre-6 by SAELens and rewritten
ROUTER_SAMPLE_TOKENS = 16384  # store tokens read to measure each layer's mean router weight


@dataclass
class SAELensExport:
    """What :func:`export_saelens` wrote: the folders, the README, the folded router weight of each
    layer (RouteSAE; 1.0 otherwise) and the notes the command prints."""

    folders: list[Path]
    readme: Path
    router_weights: dict[int, float]
    notes: list[str] = field(default_factory=list)


def _saelens_version() -> str:
    try:
        from importlib.metadata import version

        v = version("sae-lens")
        return v if int(v.split(".")[0]) >= 6 else MIN_SAELENS
    except Exception:  # noqa: BLE001 - not installed, or an odd version string
        return MIN_SAELENS


def fold_ratio(d: int) -> float:
    """``r = sqrt(d / (d - 1))``: SAELens's unbiased std over routesae's biased one."""
    return math.sqrt(d / (d - 1))


def saelens_weights(sae: SparseAutoencoder, router_weight: float = 1.0,
                    center: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SAELens tensors, float32 on the CPU, with the standardisation and ``router_weight`` folded in.

    With standardisation: ``W_enc r``, ``b_enc / q``, ``(b_pre / q + c) / r``, ``W_dec / r`` (``q`` the
    router weight, ``c`` the layer's RouteSAE centre (0 otherwise), ``r`` :func:`fold_ratio`); without:
    the same with ``r = 1`` (then ``normalize_activations`` is "none").
    """
    def t(p: torch.Tensor) -> torch.Tensor:
        return p.detach().to("cpu", torch.float64)

    r = fold_ratio(sae.cfg.d_in) if sae.cfg.standardize else 1.0
    q = float(router_weight)
    out = {"W_enc": t(sae.W_enc) * r, "W_dec": t(sae.W_dec) / r, "b_enc": t(sae.b_enc) / q,
           "b_dec": (t(sae.b_pre) / q + (t(center) if center is not None else 0.0)) / r}
    return {k: v.float().contiguous() for k, v in out.items()}


def _reproduces(sae: SparseAutoencoder, q: str) -> str:
    """What a folder folded with router weight ``q`` reproduces (one line, for cfg.json and the README)."""
    c = sae.cfg
    if c.arch == "topk":
        return "routesae's splice reconstruct(h) for every token"
    if c.arch == "mlsae":
        return "routesae's splice of this layer, reconstruct(h)[:, layer], for every token"
    if c.routing == "soft":
        return ("no routesae splice: soft routing encodes the mixture sum_i p_i x_i of all layers; this folder "
                "applies the dictionary to this layer alone (router weight 1)")
    return (f"routesae's splice (reconstruct: SAE(p x) / p, de-standardised) for tokens routed to this layer "
            f"whose router weight p_i* equals {q}; other routed tokens differ through the biases only "
            f"(b / {q} for b / p_i*), and not at all when b_pre = b_enc = 0; SAELens's codes are routesae's "
            f"divided by p_i*. SAELens cannot route: which tokens are routed here needs routesae's router")


def _store_ctx(store: str | None) -> int | None:
    """The context length of the store the run was trained on, when that store is still there."""
    try:
        return int(json.loads((Path(store) / "manifest.json").read_text())["ctx"]) if store else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saelens_config(sae: SparseAutoencoder, layer: int, router_weight: float = 1.0,
                   router_weight_source: str | None = None) -> dict:
    """The SAELens 6.x ``cfg.json`` of ``sae`` at block ``layer`` (a TopK SAE on raw activations)."""
    c = sae.cfg
    version = _saelens_version()
    meta = c.meta or {}
    routed = c.arch == "routesae"
    return {
        "architecture": "topk",
        "d_in": c.d_in,
        "d_sae": c.n_latents,
        "k": c.k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if c.standardize else "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": version,
            "sae_lens_training_version": version,
            "model_name": meta.get("model") or "unknown",
            "hook_name": tl_resid_hook(layer),
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": _store_ctx(meta.get("store")),
            "dataset_path": meta.get("store"),
            "routesae": {
                "arch": c.arch,
                "layer": layer,
                "layers": c.layers,
                "layer_numbering": "layer j = output of decoder block j = TransformerLens blocks.j.hook_resid_post",
                "input": "raw hook_resid_post activations",
                "standardize": c.standardize,
                "standardization_fold": (f"routesae (h - mean) / (biased std + 1e-6) folded into SAELens layer_norm: "
                                         f"W_enc * r, b_dec = b_pre / (q r), W_dec / r, r = sqrt(d/(d-1)) = "
                                         f"{fold_ratio(c.d_in):.9g}; eps differences below 9e-6/std relative"
                                         if c.standardize else None),
                "router_weight": router_weight if routed else None,
                "router_weight_source": router_weight_source if routed else None,
                "reproduces": _reproduces(sae, f"{router_weight:.9g}"),
                "activation": "ReLU(TopK(pre)) in both routesae and SAELens 6.x TopK (ReLU after top-k)",
                "routing": c.routing if routed else None,
                "pooling": c.pooling if routed else None,
                "shared_dictionary": c.arch != "topk",
            },
        },
    }


# ---------------------------------------------------------------- RouteSAE router weights


def _run_store(run: Path, sae: SparseAutoencoder) -> str | None:
    try:
        recorded = json.loads((run / "train_config.json").read_text()).get("store")
    except (OSError, ValueError, AttributeError):
        recorded = None
    return recorded or (sae.cfg.meta or {}).get("store")


@torch.no_grad()
def measured_router_weights(sae, store: Store, tokens: int = ROUTER_SAMPLE_TOKENS) -> tuple[dict[int, float], int]:
    """Mean ``p_i*`` of the tokens routed to each layer over the first ``tokens`` store tokens, and the
    number of tokens read; a layer no token was routed to gets the mean over all tokens."""
    c = sae.cfg
    if store.d_model != c.d_in or any(j not in store.layers for j in c.layers):
        raise StoreError(f"store {store.root} (d_model {store.d_model}, layers {store.layers}) does not fit the SAE "
                         f"(d_in {c.d_in}, layers {c.layers}); pass its training store with --store or "
                         f"--router-weight P")
    sums, counts = torch.zeros(c.n_layers, dtype=torch.float64), torch.zeros(c.n_layers, dtype=torch.float64)
    done = 0
    for s in store.shards:
        if done >= tokens:
            break
        n = min(int(s["tokens"]), tokens - done)
        resid = torch.stack([store.load_resid(s["index"], j)[:n] for j in c.layers], 1).float()
        probs, pos = sae.route(resid)
        p = probs.gather(1, pos[:, None])[:, 0].double()
        sums += torch.bincount(pos, weights=p, minlength=c.n_layers)
        counts += torch.bincount(pos, minlength=c.n_layers).double()
        done += n
    if done == 0:
        raise StoreError(f"store {store.root} has no tokens to measure router weights on; pass --router-weight P")
    overall = float(sums.sum() / counts.sum())
    return {j: float(sums[i] / counts[i]) if counts[i] else overall for i, j in enumerate(c.layers)}, done


def _router_weights(sae, run: Path, router_weight: float | None, store: str | None) -> tuple[dict[int, float], str]:
    c = sae.cfg
    if c.arch != "routesae" or c.routing == "soft":
        if router_weight is not None:
            kind = "soft-routing RouteSAE" if c.arch == "routesae" else c.arch
            raise ValueError(f"--router-weight applies to hard-routing RouteSAE runs; {run} is {kind}, drop the option")
        return {j: 1.0 for j in c.layers}, "1 (no hard router)"
    if router_weight is not None:
        if not 0 < router_weight <= 1:
            raise ValueError(f"--router-weight {router_weight} is not a softmax weight; pass 0 < P <= 1")
        return {j: float(router_weight) for j in c.layers}, "--router-weight"
    path = store or _run_store(run, sae)
    if path is None or not (Path(path) / "manifest.json").is_file():
        if store is not None:
            raise StoreError(f"--store {store} is not a store (no manifest.json); pass a store folder")
        return {j: 1.0 for j in c.layers}, (f"1 (the run's store {path} is not here to measure the router on; "
                                            f"pass --store STORE or --router-weight P)")
    weights, n = measured_router_weights(sae, Store(path))
    return weights, f"mean p_i* of the tokens routed to the layer, first {n} tokens of store {path}"


def _readme(run: Path, sae, weights: dict[int, float], source: str, folders: list[Path]) -> str:
    c = sae.cfg
    lines = [f"# SAELens export of `{run}` ({c.arch}, layers {c.layers}, k={c.k}, {c.n_latents} latents)", "",
             "Load a folder with `sae_lens.SAE.load_from_disk(\"<folder>\")` and feed it the raw "
             "`blocks.<j>.hook_resid_post` activations of the model (`HookedSAETransformer` does).", ""]
    if c.standardize:
        lines += ["routesae standardises each token, `(h - mean) / (std + 1e-6)` with the biased std. That is "
                  "folded into SAELens's `normalize_activations: layer_norm` (unbiased std, eps 1e-5, output "
                  f"de-normalised): `W_enc * r`, `b_dec = b_pre / r`, `W_dec / r`, r = sqrt(d/(d-1)) = "
                  f"{fold_ratio(c.d_in):.9g}. Codes and outputs equal routesae's up to the eps difference "
                  "(relative at most 9e-6/std on the input scale and 1e-6/std on the output scale).", ""]
    if c.arch == "routesae" and c.routing == "hard":
        lines += ["| folder | folded router weight q |", "|---|---|"]
        lines += [f"| `{f.name}` | {weights[j]:.6g} |" for f, j in zip(folders, c.layers)]
        lines += ["", f"Router weights: {source}.", ""]
    lines += [f"Each folder reproduces {_reproduces(sae, 'q')}.", ""]
    if c.arch == "routesae":
        lines += ["RouteSAE's router cannot live in a single-layer SAELens SAE: it picks, per token, the layer "
                  "the dictionary reads and scales it by its softmax weight p_i*. routesae's splice at the routed "
                  "layer is `SAE(p x) / p`, de-standardised, i.e. the dictionary with biases `b_pre / p`, "
                  "`b_enc / p`; p differs per token, so a folder can fold only one. A folder run on every token "
                  "also encodes the tokens the router sent to other layers.", ""]
    return "\n".join(lines)


def export_saelens(run: str | Path, out_dir: str | Path, router_weight: float | None = None,
                   store: str | None = None) -> SAELensExport:
    """Write one SAELens folder per layer of the run and ``README.md`` into ``out_dir``.

    RouteSAE (hard routing): each folder folds one router weight, ``router_weight`` if given, else the
    mean ``p_i*`` of each layer's routed tokens measured on ``store`` (default the run's training
    store; 1.0 with a note when it is not there). The run's config.json is type- and range-checked on
    loading, each folder name is built from ``int(layer)`` and must resolve inside ``out_dir``;
    nothing is written before every check passed. Each file is written atomically; existing
    folders of the same names are overwritten.
    """
    run = Path(run)
    sae = load_sae(run, device="cpu").eval()
    c = sae.cfg
    if c.standardize and c.d_in < 2:
        raise ValueError(f"{run}: d_in={c.d_in} cannot be standardised; the run's config.json is damaged")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder for the export")
    root = out.resolve()
    folders = []
    for layer in c.layers:
        folder = out / tl_resid_hook(int(layer))
        if not folder.resolve().is_relative_to(root):
            raise ValueError(f"layer {layer!r} of {run} would be exported outside {out}; the run's config.json "
                             f"is damaged")
        folders.append(folder)
    weights, source = _router_weights(sae, run, router_weight, store)
    centers = getattr(sae, "layer_center", None)
    for i, (layer, folder) in enumerate(zip(c.layers, folders)):
        folder.mkdir(parents=True, exist_ok=True)
        q = weights[layer]
        tensors = saelens_weights(sae, q, centers[i] if centers is not None else None)
        atomic_write_bytes(folder / WEIGHTS_FILE, st_save(tensors, metadata={"format": "pt"}))
        cfg = saelens_config(sae, layer, q, source)
        atomic_write_bytes(folder / CFG_FILE, (json.dumps(cfg, indent=2) + "\n").encode())
    readme = out / README
    atomic_write_bytes(readme, _readme(run, sae, weights, source, folders).encode())
    notes = ["folders take raw hook_resid_post activations"
             + (" (routesae's standardisation folded into SAELens layer_norm)" if c.standardize else "")]
    if c.arch == "routesae" and c.routing == "soft":
        notes.append("soft routing: the SAE read a mixture of layers, so no folder reproduces a routesae splice")
    elif c.arch == "routesae":
        notes.append("RouteSAE: SAELens cannot route; folder j reproduces the splice of tokens routed to j whose "
                     "router weight p_i* equals its folded weight (" + ", ".join(
                         f"layer {j}: {weights[j]:.4g}" for j in c.layers) + f"; {source}); see {readme}")
    return SAELensExport(folders, readme, weights, notes)
