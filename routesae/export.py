"""Export an SAE run as SAELens 6.x folders: ``export_saelens(run, out_dir) -> [folders]``.

One folder per layer the dictionary reads (topk: its layer; routesae / mlsae: every layer in
``cfg.layers``, the same shared dictionary in each), named after the TransformerLens hook::

    OUT/blocks.{j}.hook_resid_post/cfg.json                  SAELens "topk" config (6.x layout)
    OUT/blocks.{j}.hook_resid_post/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in],
                                                             b_enc [d_sae], b_dec [d_in]

SAELens's TopK SAE computes ``ReLU(TopK((x - b_dec) @ W_enc + b_enc)) @ W_dec + b_dec`` with
``apply_b_dec_to_input=True`` and ``rescale_acts_by_decoder_norm=False``: the same function as
routesae's ``encode``/``decode`` (ReLU after top-k in both), with ``b_dec = b_pre``.

What SAELens cannot do, recorded in ``metadata.routesae``:

- per-token standardisation ``(h - mean) / (std + 1e-6)`` with the biased std is not one of its
  normalisations (its ``layer_norm`` uses the unbiased std and eps 1e-5 and de-normalises the
  output), so the export says ``normalize_activations: "none"``: standardise inputs yourself
  (``routesae.sae.standardize``) and de-standardise outputs;
- RouteSAE's router: SAELens has none. The dictionary was trained on ``p_i* x_i*`` (the
  standardised routed layer scaled by its router weight); with non-zero biases the code depends on
  that scale, so feed ``p_i* x_i*`` (``RouteSAE.sae_input``) to reproduce training-time codes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from routesae.atomic import atomic_write_bytes
from routesae.layers import tl_resid_hook
from routesae.sae import SparseAutoencoder, load_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
MIN_SAELENS = "6.0.0"  # configs without a >= 6 version are read as pre-6 by SAELens and rewritten


def _saelens_version() -> str:
    try:
        from importlib.metadata import version

        v = version("sae-lens")
        return v if int(v.split(".")[0]) >= 6 else MIN_SAELENS
    except Exception:  # noqa: BLE001 - not installed, or an odd version string
        return MIN_SAELENS


def _input_note(sae: SparseAutoencoder) -> str:
    c = sae.cfg
    std = ("x = (h - mean_d h) / (std_d h + 1e-6), std biased (population), per token; "
           "decode(...) returns x_hat on that scale: h_hat = x_hat * (std + 1e-6) + mean"
           if c.standardize else "raw residual h (the run was trained without standardisation)")
    if c.arch == "routesae":
        return (f"{std}; RouteSAE: training inputs were p_i* x_i*, the routed layer's standardised activation "
                f"scaled by its router weight (routing={c.routing}); SAELens cannot route, so this folder holds "
                f"the shared dictionary at one of the routed layers: scale by p_i* to match training codes")
    if c.arch == "mlsae":
        return f"{std}; MLSAE: one dictionary shared by layers {c.layers}, every layer's tokens encoded alike"
    return std


def _store_ctx(store: str | None) -> int | None:
    """The context length of the store the run was trained on, when that store is still there."""
    try:
        return int(json.loads((Path(store) / "manifest.json").read_text())["ctx"]) if store else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saelens_config(sae: SparseAutoencoder, layer: int) -> dict:
    """The SAELens 6.x ``cfg.json`` of ``sae`` at block ``layer`` (a TopK SAE, no normalisation)."""
    c = sae.cfg
    version = _saelens_version()
    meta = c.meta or {}
    return {
        "architecture": "topk",
        "d_in": c.d_in,
        "d_sae": c.n_latents,
        "k": c.k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
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
                "standardize": c.standardize,
                "input": _input_note(sae),
                "activation": "ReLU(TopK(pre)) in both routesae and SAELens 6.x TopK (ReLU after top-k)",
                "routing": c.routing if c.arch == "routesae" else None,
                "pooling": c.pooling if c.arch == "routesae" else None,
                "shared_dictionary": c.arch != "topk",
            },
        },
    }


def saelens_weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """SAELens tensor names and shapes, float32 on the CPU."""
    def t(p: torch.Tensor) -> torch.Tensor:
        return p.detach().to("cpu", torch.float32).contiguous()

    return {"W_enc": t(sae.W_enc), "W_dec": t(sae.W_dec), "b_enc": t(sae.b_enc), "b_dec": t(sae.b_pre)}


def export_saelens(run: str | Path, out_dir: str | Path) -> list[Path]:
    """Write one SAELens folder per layer of the run into ``out_dir``; return the folders.

    The run's config.json is type- and range-checked on loading (layers are non-negative ints),
    each folder name is built from ``int(layer)`` and must resolve inside ``out_dir``; nothing is
    written before every check passed. Each file is written atomically; existing folders of the
    same names are overwritten.
    """
    sae = load_sae(run, device="cpu")
    c = sae.cfg
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
    weights = st_save(saelens_weights(sae), metadata={"format": "pt"})
    for layer, folder in zip(c.layers, folders):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / WEIGHTS_FILE, weights)
        atomic_write_bytes(folder / CFG_FILE, (json.dumps(saelens_config(sae, layer), indent=2) + "\n").encode())
    return folders
