"""Whether the Hugging Face hub can be used now, decided in about a second.

Offline, ``from_pretrained`` and ``datasets.load_dataset`` retry an unreachable hub for about
30 s before they fail; model loading asks :func:`hub_offline` and corpus loading
:func:`dataset_unavailable` first, and they fail at once with one line. A model already in the hub
cache then loads with ``local_files_only``; a cached dataset loads when offline mode is set.

The hub counts as offline when the user said so (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``
for models, ``HF_DATASETS_OFFLINE`` for datasets, which overrides ``HF_HUB_OFFLINE`` as in
``datasets``), or when a TCP connection to the host of ``HF_ENDPOINT`` (default
``https://huggingface.co``; the HTTPS proxy instead, when one applies) cannot be opened within
:data:`PROBE_TIMEOUT_S` seconds, name lookup included. The probe runs once per process and host.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 1.5
_TRUE = {"1", "ON", "YES", "TRUE"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE


def _offline_env(datasets: bool) -> str | None:
    """The environment variable that puts the hub offline for models / datasets, or None."""
    if datasets and os.environ.get("HF_DATASETS_OFFLINE") is not None:
        return "HF_DATASETS_OFFLINE" if _env_true("HF_DATASETS_OFFLINE") else None
    names = ("HF_HUB_OFFLINE",) if datasets else ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return next((n for n in names if _env_true(n)), None)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _probe_target(url: str) -> tuple[str, int]:
    """(host, port) a request to ``url`` connects to first: the proxy's when one applies."""
    parts = urlsplit(url)
    host = parts.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get(parts.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or host, p.port or 3128
    return host, parts.port or (80 if parts.scheme == "http" else 443)


@functools.lru_cache(maxsize=8)
def _reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` s (a slow resolver counts as no)."""
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=connect, name="routesae-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])


def hub_offline(datasets: bool = False) -> str | None:
    """Why the hub cannot be used now (``"HF_HUB_OFFLINE is set"``, ``"no connection to ..."``), or None."""
    env = _offline_env(datasets)
    if env:
        return f"{env} is set"
    host, port = _probe_target(endpoint())
    return None if _reachable(host, port) else f"no connection to {host}:{port}"


def dataset_unavailable(name: str) -> str | None:
    """None when hub dataset ``name`` can be loaded now, else the rest of a one-line error (why, and the fix).

    In offline mode (set by the user) ``datasets`` reads a cached copy, so a cached dataset passes.
    """
    cached = dataset_cached(name)
    if cached and _offline_env(datasets=True):
        return None
    why = hub_offline(datasets=True)
    if why is None:
        return None
    fix = "a cached copy exists: set HF_HUB_OFFLINE=1 to use it" if cached else "pass a local file or folder"
    return f"the Hugging Face hub is not reachable (offline: {why}); {fix}"


def model_cached(repo_id: str) -> bool:
    """Whether the hub cache holds ``config.json`` of model ``repo_id`` (loadable with local_files_only)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def dataset_cached(name: str) -> bool:
    """Whether ``datasets`` or the hub cache holds a copy of dataset ``name`` (usable with HF_HUB_OFFLINE=1)."""
    from datasets import config
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants

    parts = name.split("/")
    prepared = Path(config.HF_DATASETS_CACHE) / "___".join(parts[:-1] + [camelcase_to_snakecase(parts[-1])])
    raw = Path(constants.HF_HUB_CACHE) / ("datasets--" + name.replace("/", "--"))
    return prepared.is_dir() or raw.is_dir()
