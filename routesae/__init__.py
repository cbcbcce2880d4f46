"""routesae: interpret Mixture-of-Experts language models.

Pipeline (data flows one way): capture -> store -> sae/train -> evaluate -> analyze -> report.

Layer numbering used everywhere: *layer i* is the residual stream after decoder block i
(0-indexed), i.e. Hugging Face ``hidden_states[i + 1]`` and TransformerLens
``blocks.{i}.hook_resid_post``. See :mod:`routesae.layers`.
"""

__version__ = "0.1.0"
