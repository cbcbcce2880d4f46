"""Causal tools: steer with SAE features and experts, find behaviour-linked experts, split shared from routed.

- :mod:`routesae.causal.features`: latent edits written into the residual (error term kept)
- :mod:`routesae.causal.steer`: steered forwards, generation, clean-versus-steered comparison
- :mod:`routesae.causal.contrast`: experts whose activation rate differs between two sets of text
- :mod:`routesae.causal.shared`: how much of each token's MLP output comes from shared versus routed experts
"""

from routesae.causal.features import FeatureEdit, SteeringError, parse_edits
from routesae.causal.steer import GenerateConfig, Steering, generate, steer_compare, steered_logits

__all__ = ["FeatureEdit", "GenerateConfig", "Steering", "SteeringError", "generate", "parse_edits",
           "steer_compare", "steered_logits"]
