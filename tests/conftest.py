"""Shared fixtures: tiny random checkpoints saved to disk (built from config classes, never mocked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DOCS = [
    ("code", "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"),
    ("prose", "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and the birds sang."),
    ("math", "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."),
    ("stories", "Once upon a time there was a little girl who loved the sea. Every day she walked to the shore."),
    ("code", "for i in range(10):\n    print(i * i)\nwhile True:\n    break\n"),
    ("prose", "In the beginning of the century the city grew quickly along the river banks."),
]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """``tiny_ckpt(arch)`` -> folder of a saved tiny random model with tokenizer (cached per session)."""
    from routesae.models.tiny import save_tiny

    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = save_tiny(arch, tmp_path_factory.mktemp(f"ckpt-{arch}"))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for i, (domain, text) in enumerate(DOCS * 3):
            f.write(json.dumps({"text": text, "domain": domain, "doc_id": f"d{i}"}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_store(tiny_ckpt, corpus_jsonl):
    """``tiny_store(out, arch="olmoe", **capture_options)`` -> a Store captured from a tiny model on the test corpus.

    Defaults: ctx 24, CPU, no progress bar, seed 1; any CaptureConfig field can be overridden.
    """
    from routesae.capture import CaptureConfig, capture
    from routesae.store import Store

    def make(out, arch: str = "olmoe", **options) -> Store:
        base = {"ctx": 24, "device": "cpu", "progress": False, "seed": 1, **options}
        return Store(capture(CaptureConfig(model=str(tiny_ckpt(arch)), corpus=str(corpus_jsonl), out=str(out), **base)))

    return make


@pytest.fixture
def one_thread(monkeypatch):
    """Bit-exact comparisons between this process and a subprocess: both use one torch thread.

    Float reductions may differ with the thread count, and earlier tests may have changed this
    process's count (``torch.set_num_threads`` is global); subprocesses get ``OMP_NUM_THREADS=1``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    """``models(arch)``: a tiny random model of ``arch`` (routesae.models.tiny), built once per test module."""
    from routesae.models.tiny import build_tiny

    cache: dict = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = build_tiny(arch)
        return cache[arch]

    return get
