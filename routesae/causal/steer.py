"""Steer a model with SAE features and with experts, and compare steered and clean generations.

    from routesae.causal import Steering, steer_compare, GenerateConfig
    s = Steering.build(sae, features="12=5", experts="bias:3=2@layer2")
    result = steer_compare(model, tokenizer, "The answer is", s, GenerateConfig(max_new_tokens=20))

*Feature steering* (:mod:`routesae.causal.features`): latents clamped / scaled / shifted, the change
of the SAE's reconstruction added to the residual (error term kept). *Expert steering*: a routing
override (:mod:`routesae.models.intervene`) with the clauses ``bias:E=B`` (added to expert E's
router logit), ``force:E`` and ``forbid:E`` (= ``ablate:E``), per layer with ``@layerN``.

One steered forward (:func:`steered_logits`) is: under the routing override, (RouteSAE only) a pass
without feature edits that decides each token's routed layer, then the pass with the edits. Zero
steering (no edit changes a latent, every bias 0) gives exactly the clean logits.

Generation (:func:`generate`) recomputes the whole sequence at every step (no KV cache: the
feature edit of every position depends on the routing of the whole prefix) and samples by the
inverse CDF with one uniform draw per step from ``torch.Generator(seed)``, so the clean and the
steered generation see the same draws and part only where steering changes the distribution.
Temperature 0 is greedy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from routesae.causal.features import (
    EditRecord,
    FeatureEdit,
    SteeringError,
    check_edits,
    feature_edits,
    new_record,
    parse_edits,
)
from routesae.model_match import capture_hook
from routesae.models.intervene import RoutingOverride, RoutingOverrideError, override_routing
from routesae.models.load import decoder_layers, first_device
from routesae.models.routers import RoutingDecision, adapter_for


@dataclass
class Steering:
    """What to change: ``edits`` of ``sae``'s latents and an expert ``override`` (either may be empty)."""

    sae: Any = None
    edits: tuple[FeatureEdit, ...] = ()
    experts: RoutingOverride = field(default_factory=RoutingOverride)

    @classmethod
    def build(cls, sae=None, features: list[str] | str | None = None, experts: str | None = None,
              model=None) -> Steering:
        """Parse and check a request; ``model`` (optional) checks the expert clauses against its layers."""
        edits = parse_edits(features)
        if edits and sae is None:
            raise SteeringError("feature edits need an SAE run; pass --run RUN (or drop --feature)")
        if sae is not None and edits:
            check_edits(sae, edits)
        override = RoutingOverride.parse(experts)
        if override and model is not None:
            adapter = adapter_for(model)
            if adapter is None:
                raise RoutingOverrideError("expert steering needs an MoE model; this one has no router")
            override.check(adapter)
        return cls(sae if edits else None, edits, override)

    def __bool__(self) -> bool:
        return bool(self.edits) or bool(self.experts)

    def describe(self) -> dict[str, Any]:
        return {"features": [str(e) for e in self.edits], "experts": str(self.experts) or None,
                "sae_arch": self.sae.cfg.arch if self.sae is not None else None}


@dataclass
class Forward:
    """One steered forward: ``logits [B, T, V]`` float32, the edit record (flat positions) and, when asked,
    the routing each MoE layer applied."""

    logits: Tensor
    edits: EditRecord | None = None
    routing: dict[int, RoutingDecision] = field(default_factory=dict)


@torch.no_grad()
def steered_logits(model, ids: Tensor, steering: Steering | None = None, mask: Tensor | None = None,
                   record: bool = False) -> Forward:
    """The logits of ``ids`` [B, T] under ``steering``; ``record``: keep the edited latents' values and the routing."""
    steering = steering or Steering()
    mask = torch.ones_like(ids) if mask is None else mask
    real = mask.bool()
    blocks = decoder_layers(model)
    routing: dict[int, RoutingDecision] = {}
    with contextlib.ExitStack() as stack:
        if steering.experts:
            stack.enter_context(override_routing(model, steering.experts))
        resid: dict[int, Tensor] = {}
        sae = steering.sae
        if steering.edits and sae.cfg.arch == "routesae":  # the pass that decides every token's routed layer
            handles = [blocks[j].register_forward_hook(capture_hook(resid, j)) for j in sae.cfg.layers]
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
        rec = new_record(ids.numel(), len(steering.edits)) if record and steering.edits else None
        if steering.edits:
            stack.enter_context(feature_edits(model, sae, steering.edits, resid, real, rec))
        if record:
            adapter = adapter_for(model)
            for layer in adapter.moe_layers() if adapter else []:
                for h in adapter.attach(layer, routing.__setitem__, want_logits=False):
                    stack.callback(h.remove)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return Forward(logits, rec, routing)


@dataclass
class GenerateConfig:
    """Sampling settings shared by the clean and the steered generation."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # sample among the top_k tokens only
    seed: int = 0
    stop_at_eos: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or (self.top_k is not None and self.top_k < 1):
            raise SteeringError(f"--max-new-tokens {self.max_new_tokens} must be >= 1, --temperature "
                                f"{self.temperature} >= 0 and --top-k {self.top_k} >= 1")


def _sample(logits: Tensor, cfg: GenerateConfig, u: float) -> int:
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.numel():
        cut = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < cut, float("-inf"))
    cdf = torch.cumsum(torch.softmax(logits.double(), -1), -1)
    return int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype)).clamp_max(cdf.numel() - 1))


def generate(model, prompt_ids: list[int], steering: Steering | None, cfg: GenerateConfig,
             eos_id: int | None = None) -> list[int]:
    """``prompt_ids`` followed by up to ``cfg.max_new_tokens`` sampled ids (see the module docstring)."""
    cfg.check()
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = list(prompt_ids)
    device = first_device(model)
    for _ in range(cfg.max_new_tokens):
        u = float(torch.rand((), generator=gen))
        logits = steered_logits(model, torch.tensor([ids], device=device), steering).logits[0, -1].cpu()
        nxt = _sample(logits, cfg, u)
        ids.append(nxt)
        if cfg.stop_at_eos and eos_id is not None and nxt == eos_id:
            break
    return ids


def distribution_change(clean: Tensor, steered: Tensor, token_text, top: int = 10) -> dict[str, Any]:
    """KL(clean || steered) per position of ``[T, V]`` logits, and the tokens whose probability at the last
    position rose / fell most."""
    lc, ls = torch.log_softmax(clean.double(), -1), torch.log_softmax(steered.double(), -1)
    kl = (lc.exp() * (lc - ls)).sum(-1)
    diff = ls[-1].exp() - lc[-1].exp()

    def rows(order: Tensor) -> list[dict[str, Any]]:
        return [{"token_id": int(t), "token": str(token_text(int(t))), "p_clean": float(lc[-1, t].exp()),
                 "p_steered": float(ls[-1, t].exp()), "change": float(diff[t])} for t in order.tolist()]

    return {"kl_last": float(kl[-1]), "kl_mean": float(kl.mean()), "kl_per_position": [float(x) for x in kl],
            "top_up": rows(torch.topk(diff, top).indices), "top_down": rows(torch.topk(-diff, top).indices)}


def _side(model, ids: list[int], steering: Steering, token_text) -> dict[str, Any]:
    """One generation's tokens, per-token routing and the steered latents' values."""
    fw = steered_logits(model, torch.tensor([ids], device=first_device(model)), steering, record=True)
    out: dict[str, Any] = {"ids": ids, "tokens": [str(token_text(i)) for i in ids]}
    out["routing"] = {str(layer): {"experts": d.indices.tolist(), "weights": [[round(float(w), 4) for w in r]
                                                                             for r in d.weights.tolist()]}
                      for layer, d in sorted(fw.routing.items())}
    if fw.edits is not None:
        rec = fw.edits
        out["latents"] = {str(e.latent): {"before": rec.before[:, i].tolist(), "after": rec.after[:, i].tolist()}
                          for i, e in enumerate(steering.edits)}
        out["edit_layer"] = fw.edits.layer.tolist()
    return out


def steer_compare(model, tokenizer, prompt: str, steering: Steering, cfg: GenerateConfig | None = None,
                  top: int = 10) -> dict[str, Any]:
    """The clean and the steered generation from ``prompt`` (same seed), their per-token routing and latent
    values, and the change of the next-token distribution on the prompt (JSON-ready)."""
    cfg = cfg or GenerateConfig()
    cfg.check()
    if not steering:
        raise SteeringError("nothing to steer: give --feature LATENT=V (with --run) and/or --experts CLAUSES")
    bos = getattr(tokenizer, "bos_token_id", None)
    prompt_ids = ([bos] if bos is not None else []) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not prompt_ids:
        raise SteeringError("the prompt is empty; give some text with --prompt")
    eos = getattr(tokenizer, "eos_token_id", None)

    def token_text(i: int) -> str:
        return tokenizer.decode([i])

    # the latents' values in the clean runs: the same latents, each edit multiplied by 1 (no change)
    identity = Steering(steering.sae, tuple(FeatureEdit(e.latent, "scale", 1.0) for e in steering.edits))
    clean_ids = generate(model, prompt_ids, None, cfg, eos)
    steered_ids = generate(model, prompt_ids, steering, cfg, eos)
    ids = torch.tensor([prompt_ids], device=first_device(model))
    change = distribution_change(steered_logits(model, ids).logits[0].cpu(),
                                 steered_logits(model, ids, steering).logits[0].cpu(), token_text, top)
    n = len(prompt_ids)
    return {"prompt": prompt, "prompt_tokens": n, "steering": steering.describe(), "generation": vars(cfg).copy(),
            "clean": {"text": tokenizer.decode(clean_ids[n:]), **_side(model, clean_ids, identity, token_text)},
            "steered": {"text": tokenizer.decode(steered_ids[n:]), **_side(model, steered_ids, steering, token_text)},
            "next_token": change}


def run_model(run: str) -> str | None:
    """The model an SAE run was trained on: ``config.json`` meta.model, else the training store's model."""
    from pathlib import Path

    from routesae.sae import SparseAutoencoder

    meta = (SparseAutoencoder.read_config(run).meta or {}).get("model")
    if meta:
        return str(meta)
    tc = Path(run) / "train_config.json"
    if tc.is_file():
        import json

        m = (json.loads(tc.read_text()).get("store_summary") or {}).get("model")
        name = m.get("name_or_path") if isinstance(m, dict) else m
        return str(name) if name else None
    return None


def load_for_steering(run: str | None, model: str | None, device: str = "auto"):
    """``(model, tokenizer, sae or None, model name)`` for a steering request, checked against each other."""
    from routesae.models.load import ModelConfig, load_model, resolve_device
    from routesae.sae import load_sae

    sae = load_sae(run, device="cpu").eval() if run else None
    name = model or (run_model(run) if run else None)
    if name is None:
        raise SteeringError("no model: pass --model (or --run RUN, whose model is recorded)" if run is None else
                            f"the run {run} records no model; pass --model")
    lm, tok = load_model(ModelConfig(name, "float32", str(resolve_device(device))))
    if tok is None:
        raise SteeringError(f"no tokenizer found with model '{name}'; steering needs one to read the prompt")
    if sae is not None:
        hidden = int(lm.config.hidden_size)
        if sae.cfg.d_in != hidden:
            raise SteeringError(f"the SAE in {run} reads width {sae.cfg.d_in} but model '{name}' has hidden size "
                                f"{hidden}; pass the run's model with --model")
        sae = sae.to(first_device(lm))
    return lm, tok, sae, name
