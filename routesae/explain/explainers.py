"""Explanations of latents: by an LLM from rendered snippets, or deterministic from tokens (no LLM).

The token explainer names the activating tokens (weighted by activation), the token that most
often precedes the strongest one (when it does in at least a third of the snippets) and the
latent's domain when its lift is at least 1.5::

    token_explanation(snippets, "math", 2.4)
    # ('tokens " the", " a"; after "of"; domain math (lift 2.4)', [' the', ' a'])

Its *key tokens* (the second value) are what the proxy judge (:mod:`routesae.explain.scorers`)
looks for. For an LLM explanation the key tokens are its quoted strings, else its words.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from routesae.explain.examples import Snippet
from routesae.explain.prompts import clean_token, explain_messages, parse_explanation, render

TOKENS = "tokens"  # the explainer id of the token explainer
N_TOKENS = 3


def token_explanation(snippets: Sequence[Snippet], domain: str | None = None,
                      lift: float | None = None) -> tuple[str, list[str]]:
    """``(explanation, key_tokens)`` from the marked tokens of ``snippets``."""
    weight: Counter[str] = Counter()
    before: Counter[str] = Counter()
    for s in snippets:
        for t, a in zip(s.tokens, s.acts):
            if a > 0:
                weight[t] += a
        if s.acts and max(s.acts) > 0:
            i = max(range(len(s.acts)), key=lambda j: s.acts[j])
            if i > 0:
                before[s.tokens[i - 1]] += 1
    keys = [t for t, _ in sorted(weight.items(), key=lambda kv: (-kv[1], kv[0]))[:N_TOKENS]]
    parts = ["tokens " + ", ".join(f'"{clean_token(t)}"' for t in keys)] if keys else ["no activating tokens"]
    if before:
        prev, n = sorted(before.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        if n * 3 >= len(snippets) and n > 1:
            parts.append(f'after "{clean_token(prev)}"')
    if domain and lift is not None and lift == lift and lift >= 1.5:
        parts.append(f"domain {clean_token(domain)} (lift {lift:.1f})")
    return "; ".join(parts), keys


def key_tokens(explanation: str) -> list[str]:
    """The strings a proxy judge looks for in an LLM explanation: quoted strings, else words of 2+ letters."""
    quoted = re.findall(r'"([^"]+)"|\u201c([^\u201d]+)\u201d', explanation)
    found = [a or b for a, b in quoted]
    if found:
        return found
    stop = {"the", "and", "for", "with", "that", "this", "are", "words", "word", "tokens", "token", "text", "of",
            "in", "on", "to", "a", "an", "or", "is", "feature", "marked", "related", "such", "as"}
    return [w for w in re.findall(r"[\w']{2,}", explanation.lower()) if w not in stop]


def explain_prompt(snippets: Sequence[Snippet]) -> list[dict[str, str]]:
    """The explainer's prompt for one latent (snapshot-tested)."""
    return explain_messages([render(s.tokens, s.acts) for s in snippets])


def llm_explanations(client, prompts: list[list[dict[str, str]]], max_tokens: int = 32) -> list[tuple[str, str]]:
    """``(explanation, raw answer)`` per prompt, through ``client`` (a :class:`~routesae.explain.client.ChatClient`)."""
    answers = client.chat_many(prompts, max_tokens=max_tokens)
    return [(parse_explanation(a["text"]), a["text"]) for a in answers]
