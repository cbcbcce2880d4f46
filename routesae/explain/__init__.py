"""Auto-interpretation: explanations of latents and experts, their scores, and routing explained by features.

``run`` (``routesae explain``) explains and scores latents of an analysed run; ``probe``
(``routesae explain-routing``) predicts each token's routed experts from its latents; ``serve``
(``routesae llm serve``) is a local OpenAI-compatible endpoint; ``client`` talks to any such endpoint.
"""
