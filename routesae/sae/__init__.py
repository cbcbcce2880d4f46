"""Sparse autoencoders over store rows: TopKSAE (one layer), RouteSAE (routed layers), MLSAE (all).

All take RAW store rows, standardise per token inside, and share one TopK body
(:class:`SparseAutoencoder`): ``encode``/``decode`` on examples, ``forward`` -> :class:`SAEOutput`,
``reconstruct`` back to the residual scale, ``save_pretrained``/``from_pretrained``/:func:`load_sae`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import SparseAutoencoder
from .config import SAEConfig, SAEOutput
from .mlsae import MLSAE
from .ops import destandardize, geometric_median, nmse, standardize
from .route import RouteSAE
from .topk import TopKSAE

CLASSES: dict[str, type[SparseAutoencoder]] = {"topk": TopKSAE, "routesae": RouteSAE, "mlsae": MLSAE}


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of the class named by ``cfg.arch``."""
    cfg.validate()
    return CLASSES[cfg.arch](cfg)


def load_sae(run_dir: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load any SAE run folder, dispatching on ``arch`` in its ``config.json``."""
    cfg = SparseAutoencoder.read_config(run_dir)
    return CLASSES[cfg.arch].from_pretrained(run_dir, device=device)


__all__ = ["SAEConfig", "SAEOutput", "SparseAutoencoder", "TopKSAE", "RouteSAE", "MLSAE", "build_sae",
           "load_sae", "standardize", "destandardize", "nmse", "geometric_median"]
