"""Layer numbering and layer-selection specs, defined once for the whole project.

*Layer i* is the residual stream after decoder block ``i`` (0-indexed). In Hugging Face
terms it is ``hidden_states[i + 1]`` (index 0 there is the embedding output); in
TransformerLens terms it is ``blocks.{i}.hook_resid_post``. One exception on the Hugging Face
side: its last entry ``hidden_states[L]`` has the model's final norm applied, while our layer
``L - 1`` is the raw output of the last block (the same as TransformerLens).

A layer spec is one of:

- ``auto``: the RouteSAE range of the paper, blocks ``L//4 - 1 .. 3L//4 - 1`` inclusive
  (for L = 16: blocks 3..11, nine layers);
- ``A:B``: blocks A..B inclusive (``A:`` or ``:B`` leave one end open);
- ``i,j,k``: an explicit list;
- ``all``: every block.
"""

from __future__ import annotations


class LayerSpecError(ValueError):
    """A layer spec that cannot be parsed or is out of range."""


def routesae_layers(n_layers: int) -> list[int]:
    """The paper's routed range for a model of ``n_layers`` blocks (REFERENCE §1)."""
    lo = max(n_layers // 4 - 1, 0)
    hi = max(3 * n_layers // 4 - 1, lo)
    return list(range(lo, hi + 1))


def parse_layers(spec: str | list[int] | None, n_layers: int) -> list[int]:
    """Turn a layer spec into a sorted list of distinct block indices, validated."""
    if spec is None:
        spec = "auto"
    if isinstance(spec, (list, tuple)):
        layers = [int(x) for x in spec]
    else:
        text = str(spec).strip().lower()
        if text == "auto":
            return routesae_layers(n_layers)
        if text == "all":
            return list(range(n_layers))
        try:
            if ":" in text:
                a, b = text.split(":", 1)
                lo = int(a) if a.strip() else 0
                hi = int(b) if b.strip() else n_layers - 1
                if lo > hi:
                    raise LayerSpecError(f"layer range '{spec}' is empty (start > end); write it as A:B with A <= B")
                layers = list(range(lo, hi + 1))
            else:
                layers = [int(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise LayerSpecError(
                f"cannot read layer spec '{spec}': use auto, all, A:B or a list like 3,5,7"
            ) from exc
    if not layers:
        raise LayerSpecError(f"layer spec '{spec}' selects no layer: use auto, all, A:B or i,j,k")
    bad = [i for i in layers if i < 0 or i >= n_layers]
    if bad:
        raise LayerSpecError(
            f"layers {bad} out of range: this model has {n_layers} blocks, so use 0..{n_layers - 1}"
        )
    return sorted(set(layers))


def hf_hidden_state_index(layer: int) -> int:
    """Index into Hugging Face ``output_hidden_states`` for layer ``layer``."""
    return layer + 1


def tl_resid_hook(layer: int) -> str:
    """TransformerLens hook name of layer ``layer``."""
    return f"blocks.{layer}.hook_resid_post"
