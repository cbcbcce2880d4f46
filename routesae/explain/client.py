"""A client of any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ``routesae llm serve``).

Requests run concurrently up to ``concurrency`` at a time, failures that can pass (connection
errors, timeouts, HTTP 429 and 5xx) are retried with exponential backoff, and every answer goes
through a :class:`~routesae.explain.cache.PromptCache`, so a second run of the same prompts sends
nothing. The API key is read from the environment variable named by ``api_key_env`` at request
time and is never written anywhere. Example::

    c = ChatClient(LLMConfig(url="http://127.0.0.1:8000/v1", model="smollm2"), cache_path="cache.jsonl")
    [a] = c.chat_many([[{"role": "user", "content": "Say yes"}]], max_tokens=3)
    a["text"], c.usage            # 'Yes', {'requests': 1, 'cached': 0, 'prompt_tokens': .., ...}
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from routesae.explain.cache import PromptCache, request_key

DEFAULT_KEY_ENV = "ROUTESAE_LLM_API_KEY"


class LLMError(ValueError):
    """An endpoint that cannot answer; the message names the endpoint and the fix."""


@dataclass
class LLMConfig:
    """Which endpoint and how to call it. ``url``: the API base (``.../v1``); ``api_key_env``: the name of the
    environment variable holding the key (none needed for a local server)."""

    url: str = "http://127.0.0.1:8000/v1"
    model: str = "smollm2"
    api_key_env: str = DEFAULT_KEY_ENV
    concurrency: int = 4
    retries: int = 4
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    timeout: float = 120.0
    temperature: float = 0.0


class ChatClient:
    """Chat completions with a concurrency limit, retries, a prompt cache and token counts (``usage``)."""

    def __init__(self, cfg: LLMConfig, cache_path: str | os.PathLike | None = None):
        if cfg.concurrency < 1 or cfg.retries < 0:
            raise LLMError("--llm-concurrency must be >= 1 and retries >= 0")
        if not cfg.url.startswith(("http://", "https://")):
            raise LLMError(f"--llm-url {cfg.url!r}: give an http(s) URL of an OpenAI-compatible API, e.g. "
                           f"http://127.0.0.1:8000/v1 (start one with `routesae llm serve`)")
        self.cfg = cfg
        self.cache = PromptCache(cache_path)
        self.usage = {"requests": 0, "cached": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()

    def body(self, messages: list[dict[str, str]], max_tokens: int, logprobs: bool = False) -> dict[str, Any]:
        b: dict[str, Any] = {"model": self.cfg.model, "messages": messages, "max_tokens": int(max_tokens),
                             "temperature": self.cfg.temperature}
        if logprobs:
            b.update(logprobs=True, top_logprobs=5)
        return b

    def chat_many(self, prompts: list[list[dict[str, str]]], max_tokens: int = 48,
                  logprobs: bool = False) -> list[dict[str, Any]]:
        """One answer per prompt, in order: ``{"text", "top_logprobs" (first token's, or None), "cached"}``."""
        bodies = [self.body(m, max_tokens, logprobs) for m in prompts]
        if not bodies:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(bodies))) as ex:
            return list(ex.map(self._one, bodies))

    def _one(self, body: dict[str, Any]) -> dict[str, Any]:
        key = request_key(body)
        hit = self.cache.get(key)
        if hit is not None:
            with self._lock:
                self.usage["cached"] += 1
            return {**hit, "cached": True}
        resp = self._post(body)
        choice = (resp.get("choices") or [{}])[0]
        text = str((choice.get("message") or {}).get("content") or "")
        content = ((choice.get("logprobs") or {}).get("content") or [])
        top = content[0].get("top_logprobs") if content else None
        answer = {"text": text, "top_logprobs": top}
        u = resp.get("usage") or {}
        with self._lock:
            self.usage["requests"] += 1
            self.usage["prompt_tokens"] += int(u.get("prompt_tokens") or 0)
            self.usage["completion_tokens"] += int(u.get("completion_tokens") or 0)
        self.cache.put(key, answer)
        return {**answer, "cached": False}

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = self.cfg.url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                with self._lock:
                    self.usage["retries"] += 1
                time.sleep(self.cfg.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as r:
                    return json.loads(r.read().decode())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:200].replace("\n", " ")
                if exc.code in (401, 403):
                    raise LLMError(f"{url} refused the request (HTTP {exc.code}); put the API key in the "
                                   f"environment variable {self.cfg.api_key_env}") from None
                if exc.code != 429 and exc.code < 500:
                    raise LLMError(f"{url} answered HTTP {exc.code}: {detail}; check --llm-model "
                                   f"{self.cfg.model!r} and --llm-url") from None
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
                last = str(getattr(exc, "reason", exc))
        raise LLMError(f"no answer from {url} after {self.cfg.retries + 1} tries ({last}); start a server with "
                       f"`routesae llm serve` or pass --llm-url, or use --explainer tokens --judge proxy (no LLM)")


def p_yes(answer: dict[str, Any]) -> float | None:
    """P(yes) / (P(yes) + P(no)) from the first token's top log-probabilities; None when absent."""
    top = answer.get("top_logprobs") or []
    yes = sum(math.exp(t["logprob"]) for t in top if str(t.get("token", "")).strip().lower() in ("yes", "y"))
    no = sum(math.exp(t["logprob"]) for t in top if str(t.get("token", "")).strip().lower() in ("no", "n"))
    return yes / (yes + no) if yes + no > 0 else None
