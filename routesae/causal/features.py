"""Feature steering: clamp, scale or shift SAE latents inside the model's forward, error term kept.

An edit names a latent and what to do with its value ``z`` in the SAE's code (written on the
command line as ``--feature``, parsed by :meth:`FeatureEdit.parse`):

- ``12=5``     clamp: ``z' = 5`` (``12=0`` switches the latent off)
- ``12*3``     scale: ``z' = 3 z`` (``12*1`` changes nothing)
- ``12+2``     shift: ``z' = z + 2`` (``12+-2`` lowers it)

The change is written into the residual stream as the change of the SAE's reconstruction only,
``h' = h + (decode(z') - decode(z))``, so everything the SAE does not reconstruct (the error term)
stays, and an edit that leaves ``z`` unchanged gives exactly the clean forward. ``decode`` is
linear in ``z``, so the change is ``sum_l (z'_l - z_l) W_dec[l]`` in the SAE's input space; back
on the residual scale (what :meth:`~routesae.sae.base.SparseAutoencoder.reconstruct` does):

- TopK: times the token's ``std + 1e-6`` (per-token standardisation), at the SAE's layer;
- MLSAE: the same at every layer of the SAE (every (token, layer) pair is one of its examples);
- RouteSAE (hard routing): at the token's routed layer ``i*``, divided by the router weight
  ``p_i*`` and times that layer's ``std + 1e-6``. The routing (``i*``, ``p_i*``) needs every routed
  layer of the token, so it comes from a first pass without the feature edits (the convention of
  ``evaluate``'s splice); the code ``z`` is read from the residual the edit is written into.
  Soft routing reconstructs no layer and is refused.

Without standardisation the ``std`` factor is 1. ``z`` is the SAE's code (after TopK): a latent
outside a token's top k has ``z = 0`` there, so clamping it to 5 adds ``5 W_dec[l]`` (rescaled).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from routesae.models.load import decoder_layers
from routesae.sae.ops import STD_EPS, standardize

ACCEPTED = "LATENT=V (clamp), LATENT*V (scale) or LATENT+V (shift), e.g. 12=5, 12*0, 12+-2"


class SteeringError(ValueError):
    """A steering request that cannot be applied; the message says what to change."""


@dataclass(frozen=True)
class FeatureEdit:
    """One latent's change: ``op`` is ``set``, ``scale`` or ``add`` with ``value``."""

    latent: int
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> FeatureEdit:
        m = re.fullmatch(r"(\d+)\s*([=*+])\s*([-+]?[0-9.]+(?:e[-+]?\d+)?)", text.strip().lower())
        if not m:
            raise SteeringError(f"cannot read feature edit '{text}'; use {ACCEPTED}")
        try:
            value = float(m.group(3))
        except ValueError:
            raise SteeringError(f"cannot read feature edit '{text}'; use {ACCEPTED}") from None
        return cls(int(m.group(1)), {"=": "set", "*": "scale", "+": "add"}[m.group(2)], value)

    def apply(self, z: Tensor) -> Tensor:
        if self.op == "set":
            return torch.full_like(z, self.value)
        return z * self.value if self.op == "scale" else z + self.value

    def __str__(self) -> str:
        return f"{self.latent}{ {'set': '=', 'scale': '*', 'add': '+'}[self.op]}{self.value:g}"


def parse_edits(texts: list[str] | str | None) -> tuple[FeatureEdit, ...]:
    """Edits from ``["12=5", "40*0"]`` or ``"12=5,40*0"``; one latent at most once."""
    if texts is None:
        return ()
    parts = [p for t in ([texts] if isinstance(texts, str) else texts) for p in re.split(r"[,;]", t) if p.strip()]
    edits = tuple(FeatureEdit.parse(p) for p in parts)
    seen = [e.latent for e in edits]
    dup = sorted({x for x in seen if seen.count(x) > 1})
    if dup:
        raise SteeringError(f"latent(s) {dup} edited twice; give each latent one edit")
    return edits


def check_edits(sae, edits: tuple[FeatureEdit, ...]) -> None:
    """One-line error for a latent the SAE does not have or an SAE that has no layer to write into."""
    m = sae.cfg.n_latents
    bad = [e.latent for e in edits if not 0 <= e.latent < m]
    if bad:
        raise SteeringError(f"unknown latent(s) {bad}: this SAE has {m} latents (0..{m - 1})")
    if sae.cfg.arch == "routesae" and sae.cfg.routing == "soft":
        raise SteeringError("this RouteSAE uses soft routing: its reconstruction belongs to no layer, so there is "
                            "nowhere to write a feature edit; steer with a hard-routing run (--routing hard)")


@dataclass
class EditRecord:
    """Per flat position: the edited latents' values before (``before`` [n, n_edits]) and after the edit,
    and the layer the edit was written at (``layer`` [n]; -1 where nothing was written)."""

    before: Tensor
    after: Tensor
    layer: Tensor


@dataclass
class _Plan:
    """Where the edits go in one forward: per block ``j``, flat positions and their router weight / centre row."""

    sites: dict[int, tuple[Tensor, Tensor | None, int | None]] = field(default_factory=dict)


def _sae_space(sae, h: Tensor, weight: Tensor | None, centre_row: int | None) -> tuple[Tensor, Tensor]:
    """Raw rows ``h [n, d]`` -> ``(x [n, d] the SAE's input, scale [n, 1] back to the residual)``."""
    c = sae.cfg
    h = h.to(sae.W_dec.dtype)
    centre = None if centre_row is None else sae.layer_center[centre_row]
    if c.standardize:
        x, _, std = standardize(h, shift=centre)
        scale = std + STD_EPS
    else:
        x = h if centre is None else h - centre
        scale = torch.ones_like(h[:, :1])
    if weight is not None:  # RouteSAE hard routing: the SAE reads p_i* x_i*; its change goes back / p_i*
        x = x * weight[:, None]
        scale = scale / weight[:, None].clamp_min(1e-12)
    return x, scale


def _edit_hook(sae, edits: tuple[FeatureEdit, ...], index: Tensor, weight: Tensor | None, centre_row: int | None,
               layer: int, record: EditRecord | None):
    latents = torch.tensor([e.latent for e in edits], device=sae.W_dec.device)
    directions = sae.W_dec[latents]  # [n_edits, d] unit rows

    def hook(module, args, output):
        hs = output[0] if isinstance(output, tuple) else output
        flat = hs.reshape(-1, hs.shape[-1])
        ix = index.to(flat.device)
        with torch.no_grad():
            x, scale = _sae_space(sae, flat[ix].to(sae.W_dec.device), weight, centre_row)
            val, idx = sae.encode(x)
            z = torch.stack([(val * (idx == lat)).sum(-1) for lat in latents.tolist()], -1)  # [n, n_edits]
            new = torch.stack([e.apply(z[:, i]) for i, e in enumerate(edits)], -1)
            delta = ((new - z) @ directions) * scale  # the reconstruction's change on the residual scale
        if record is not None:
            record.before[ix] = z.to(record.before)
            record.after[ix] = new.to(record.after)
            record.layer[ix] = layer
        flat = flat.clone()
        flat[ix] = flat[ix] + delta.to(flat.device, flat.dtype)
        new_hs = flat.view_as(hs)
        return (new_hs, *output[1:]) if isinstance(output, tuple) else new_hs

    return hook


def _plan(sae, resid: dict[int, Tensor], real: Tensor) -> _Plan:
    """The edit sites of one forward: ``resid[j]`` the clean pass's outputs of the SAE's layers (RouteSAE only)."""
    c, flat = sae.cfg, real.flatten().nonzero().squeeze(-1)
    plan = _Plan()
    if c.arch == "topk":
        plan.sites[c.layers[0]] = (flat, None, None)
    elif c.arch == "mlsae":
        for j in c.layers:
            plan.sites[j] = (flat, None, None)
    else:
        stack = torch.stack([resid[j].flatten(0, 1)[flat.to(resid[j].device)].to(sae.W_dec.device) for j in c.layers],
                            1)
        with torch.no_grad():
            probs, pos = sae.route(stack)
        p = probs.gather(1, pos[:, None])[:, 0]
        for i, j in enumerate(c.layers):
            sel = (pos == i).to(flat.device)
            if bool(sel.any()):
                plan.sites[j] = (flat[sel], p[pos == i], i)
    return plan


@contextmanager
def feature_edits(model, sae, edits: tuple[FeatureEdit, ...], resid: dict[int, Tensor] | None, real: Tensor,
                  record: EditRecord | None = None) -> Iterator[None]:
    """Hooks writing ``edits`` into ``model``'s forward for a batch whose real positions are ``real`` [B, T].

    ``resid``: RouteSAE only, the clean pass's outputs of the SAE's layers (``{j: [B, T, d]}``) that
    decide each token's routed layer and router weight; ignored otherwise."""
    blocks = decoder_layers(model)
    handles = []
    for j, (index, weight, centre_row) in _plan(sae, resid or {}, real).sites.items():
        handles.append(blocks[j].register_forward_hook(_edit_hook(sae, edits, index, weight, centre_row, j, record)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def new_record(n: int, n_edits: int) -> EditRecord:
    return EditRecord(torch.zeros(n, n_edits), torch.zeros(n, n_edits), torch.full((n,), -1, dtype=torch.int64))
