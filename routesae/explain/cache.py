"""A prompt cache: one JSON line per answered request, keyed by the request's content.

The key is the sha256 of the request body that matters for the answer (model, messages, max
tokens, temperature, logprobs), so an interrupted run that is started again pays only for the
prompts it had not sent. Lines are appended and flushed one at a time under a lock; a line cut by
a crash is skipped on reading (that request is simply sent again). Nothing is ever rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def request_key(body: dict[str, Any]) -> str:
    """The cache key of a chat-completions request body."""
    keep = {k: body.get(k) for k in ("model", "messages", "max_tokens", "temperature", "logprobs", "top_logprobs")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class PromptCache:
    """``get(key)`` / ``put(key, answer)`` over a JSONL file (``None`` path: in memory only)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        item = json.loads(line)
                        self._items[item["key"]] = item["answer"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut by a crash: that request is sent again

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._items.get(key)

    def put(self, key: str, answer: dict[str, Any]) -> None:
        with self._lock:
            self._items[key] = answer
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n"
            with open(self.path, "a", encoding="utf-8") as f:
                if f.tell() > 0 and not _ends_with_newline(self.path):
                    f.write("\n")  # after a cut line, start a fresh one
                f.write(line)
                f.flush()
                os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
