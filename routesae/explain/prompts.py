"""The prompts of auto-interpretation, built deterministically from a latent's contexts.

Every prompt is a list of OpenAI chat messages. Corpus text is untrusted: :func:`clean_token` makes
each token printable (newlines and tabs shown as ``\\n`` / ``\\t``, other control characters dropped)
and removes the marker characters, so a context can neither fake a highlight nor close the block
it is quoted in. A context is shown as its tokens joined, the marked tokens as ``<<token>>``::

    render([" the", " cat", " sat"], [0.0, 2.5, 0.0])   # ' the<< cat>> sat'

Prompt versions are stored with every explanation and score (:data:`PROMPT_VERSION`); change the
version when a template changes so that cached answers of the old one are not mixed in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PROMPT_VERSION = "v1"
OPEN, CLOSE = "<<", ">>"
MAX_TOKEN_CHARS = 40
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")

EXPLAIN_SYSTEM = ("You explain features of a neural network. You see text snippets; in each, the tokens where the "
                  "feature is active are marked <<like this>>. Reply with one short phrase (at most 12 words) "
                  "saying what the marked tokens have in common. No preamble.")
DETECT_SYSTEM = ("You check explanations of neural network features. Given the explanation of a feature and a "
                 "text snippet, answer Yes if the feature is likely active somewhere in the snippet, else No. "
                 "Reply with one word: Yes or No.")
FUZZ_SYSTEM = ("You check explanations of neural network features. Given the explanation of a feature and a text "
               "snippet with some tokens marked <<like this>>, answer Yes if the marked tokens are the ones the "
               "explanation describes, else No. Reply with one word: Yes or No.")
EXPERT_SYSTEM = ("You explain the experts of a Mixture-of-Experts language model. You see the explanations of the "
                 "features that best predict that the router sends a token to one expert. Reply with one short "
                 "phrase (at most 12 words) saying which tokens this expert receives. No preamble.")


def clean_token(tok: str) -> str:
    """A corpus token made safe to quote: visible whitespace escapes, no control or marker characters."""
    t = str(tok).replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n").replace("\t", "\\t")
    t = _CONTROL.sub("", t).replace("<<", "‹‹").replace(">>", "››").replace("<", "‹").replace(">", "›")
    return t[:MAX_TOKEN_CHARS]


def render(tokens: Sequence[str], marked: Sequence[float] | Sequence[bool]) -> str:
    """The snippet with the tokens whose ``marked`` value is truthy (> 0) wrapped in ``<<...>>``."""
    out = []
    for tok, m in zip(tokens, marked):
        t = clean_token(tok)
        out.append(f"{OPEN}{t}{CLOSE}" if float(m) > 0 else t)
    return "".join(out)


def explain_messages(snippets: Sequence[str]) -> list[dict[str, str]]:
    """Ask for a latent's explanation from rendered snippets (most activating first)."""
    body = "\n".join(f"Snippet {i + 1}: {s}" for i, s in enumerate(snippets))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": f"{body}\n\nWhat do the marked tokens have in common?"}]


def detect_messages(explanation: str, snippet: str) -> list[dict[str, str]]:
    """Ask whether ``snippet`` (no marks) activates the feature that ``explanation`` describes."""
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": f"Feature explanation: {one_line(explanation)}\nSnippet: {snippet}\n\n"
                                        f"Is the feature active in this snippet? Yes or No."}]


def fuzz_messages(explanation: str, snippet: str) -> list[dict[str, str]]:
    """Ask whether the marked tokens of ``snippet`` are the ones ``explanation`` describes."""
    return [{"role": "system", "content": FUZZ_SYSTEM},
            {"role": "user", "content": f"Feature explanation: {one_line(explanation)}\nSnippet: {snippet}\n\n"
                                        f"Are the marked tokens the ones the explanation describes? Yes or No."}]


def expert_messages(layer: int, expert: int, features: Sequence[str]) -> list[dict[str, str]]:
    """Ask for an expert's explanation from the explanations of its most predictive features."""
    body = "\n".join(f"Feature {i + 1}: {one_line(f)}" for i, f in enumerate(features))
    return [{"role": "system", "content": EXPERT_SYSTEM},
            {"role": "user", "content": f"Expert {expert} of MoE layer {layer}. Its most predictive features:\n"
                                        f"{body}\n\nWhich tokens does this expert receive?"}]


def one_line(text: str, limit: int = 200) -> str:
    """An explanation as one clean line (it may come from an LLM: untrusted too)."""
    t = " ".join(_CONTROL.sub(" ", str(text)).split())
    return t[:limit]


def parse_explanation(answer: str) -> str:
    """The explanation in an LLM's reply: its first line with content (a preamble ending in ``:`` skipped when more
    follows), without a leading label, list marker, bold or quotes."""
    lines = [ln.strip() for ln in str(answer).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    for line in lines[:1]:
        line = re.sub(r"^(\d+[.)]|[-*\u2022])\s+", "", line).replace("**", "")
        line = re.sub(r"^(explanation|answer|the feature|feature)\s*[:\-]\s*", "", line, flags=re.I)
        return one_line(line.strip(" \"'*`"))
    return ""


def parse_yes_no(answer: str) -> bool | None:
    """Yes -> True, No -> False, from the first word of a reply; None when it says neither."""
    m = re.search(r"[A-Za-z]+", str(answer))
    if not m:
        return None
    w = m.group(0).lower()
    return True if w in ("yes", "y", "true") else False if w in ("no", "n", "false") else None
