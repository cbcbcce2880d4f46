"""Model and hub bad inputs (issue 13): one-line errors, nothing written; device-map capture is exact.

- a checkpoint that is not a decoder-only causal LM (DistilBERT, T5) is named as such;
- a hub model or corpus name while the hub is offline fails in seconds, not after ~30 s of retries;
- ``--device-map`` capture (layers offloaded to CPU RAM and disk, the embedding included) writes
  the same store as a plain capture; the TransformerLens backend refuses a device map.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from routesae import corpus as corpus_module
from routesae.capture import CaptureConfig, capture
from routesae.cli import app
from routesae.hub import _reachable
from routesae.models.tiny import tiny_tokenizer
from routesae.store import Store

runner = CliRunner()
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def _fails_in_one_line(args: list[str], out: Path, *words: str) -> float:
    """Run ``routesae ARGS``: exit 2, one line naming ``words``, ``out`` never created; returns seconds taken."""
    start = time.perf_counter()
    res = runner.invoke(app, args)
    elapsed = time.perf_counter() - start
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()
    return elapsed


# ---------------------------------------------------------------- 10: not a causal LM


def _save_with_tokenizer(model, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory) -> Path:
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    conf = DistilBertConfig(vocab_size=320, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=64)
    return _save_with_tokenizer(DistilBertForMaskedLM(conf), tmp_path_factory.mktemp("distilbert"))


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    conf = T5Config(vocab_size=320, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    return _save_with_tokenizer(T5ForConditionalGeneration(conf), tmp_path_factory.mktemp("t5"))


def test_masked_lm_is_not_a_causal_lm(distilbert, corpus_jsonl, tmp_path):
    out = tmp_path / "store"
    _fails_in_one_line(["capture", str(distilbert), str(corpus_jsonl), "--out", str(out)], out,
                       f"{distilbert} is a DistilBertForMaskedLM / model_type distilbert",
                       "not a decoder-only causal LM", "AutoModelForCausalLM")


def test_encoder_decoder_is_not_a_causal_lm(t5, corpus_jsonl, tmp_path):
    out = tmp_path / "store"
    _fails_in_one_line(["capture", str(t5), str(corpus_jsonl), "--out", str(out)], out,
                       "T5ForConditionalGeneration / model_type t5 (encoder-decoder)", "not a decoder-only causal LM")


# ---------------------------------------------------------------- 11: offline hub names fail at once


@pytest.fixture(params=["HF_HUB_OFFLINE", "unreachable HF_ENDPOINT", "this machine"])
def offline(request, monkeypatch) -> str:
    """The hub offline three ways: offline mode set, an endpoint that refuses connections, or no network here."""
    for name in (*OFFLINE_VARS, *PROXY_VARS):
        monkeypatch.delenv(name, raising=False)
    if request.param == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return "HF_HUB_OFFLINE is set"
    if request.param == "unreachable HF_ENDPOINT":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
        return "no connection to 127.0.0.1:9"
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    if _reachable("huggingface.co", 443):
        pytest.skip("this machine reaches huggingface.co")
    return "no connection to huggingface.co:443"


def test_hub_model_name_offline_fails_fast(offline, corpus_jsonl, tmp_path):
    out = tmp_path / "store"
    elapsed = _fails_in_one_line(["capture", "some-org/some-model", str(corpus_jsonl), "--out", str(out)], out,
                                 "model 'some-org/some-model' is not a local folder",
                                 f"Hugging Face hub is not reachable (offline: {offline})", "pass a local")
    assert elapsed < 10, elapsed  # retrying the hub took ~27 s


@pytest.mark.parametrize("name", ["hf:foo/bar", "foo"])
def test_hub_corpus_name_offline_fails_fast(name, offline, tiny_ckpt, tmp_path):
    from transformers.utils import logging as hf_logging

    out = tmp_path / "store"
    hf_logging.disable_progress_bar()  # the model loads before the corpus opens: its "Loading weights" bar
    try:
        elapsed = _fails_in_one_line(["capture", str(tiny_ckpt("olmoe")), name, "--out", str(out), "-q"],
                                     out, f"corpus '{name.removeprefix('hf:')}' is not a local path",
                                     f"Hugging Face hub is not reachable (offline: {offline})",
                                     "pass a local file or folder")
    finally:
        hf_logging.enable_progress_bar()
    assert elapsed < 10, elapsed  # retrying the hub took ~29 s


def test_hub_corpus_name_offline_fails_fast_when_read(offline):
    """The corpus reader itself (what capture calls) fails at once, before any hub request."""
    start = time.perf_counter()
    with pytest.raises(corpus_module.CorpusError) as err:
        next(corpus_module.iter_documents(corpus_module.CorpusConfig("hf:foo/bar")))
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "\n" not in msg and "corpus 'foo/bar' is not a local path" in msg and offline in msg


# ---------------------------------------------------------------- 15: device maps


def _same_store(a: Store, b: Store) -> None:
    assert a.n_tokens == b.n_tokens == 200 and len(a.shards) == len(b.shards) > 1
    assert a.tokens().equals(b.tokens())
    for s in a.shards:
        assert torch.equal(a.load_resid(s["index"]), b.load_resid(s["index"]))
        ra, rb = a.load_router(s["index"]), b.load_router(s["index"])
        assert ra.keys() == rb.keys() and {"indices", "weights", "logits", "shared_gate"} <= ra.keys()
        for k in ra:
            assert torch.equal(ra[k], rb[k]), k


def test_device_map_capture_with_offloaded_layers_is_exact(tiny_ckpt, corpus_jsonl, tmp_path):
    """Embedding and every other block offloaded to disk, the rest on CPU: the store equals a plain capture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tiny_ckpt("qwen2_moe")  # a shared-expert gate (router extra) and a dense block
    opts = {"model": str(ckpt), "corpus": str(corpus_jsonl), "layers": "all", "ctx": 24, "batch_size": 4,
            "max_tokens": 200, "shard_mb": 0.02, "device": "cpu", "progress": False, "seed": 1}
    plain = Store(capture(CaptureConfig(out=str(tmp_path / "plain"), **opts)))
    device_map = {"model.embed_tokens": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(4)}}
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert {p.device.type for p in model.parameters()} == {"cpu", "meta"}  # offloaded weights stay on disk
    mapped = Store(capture(CaptureConfig(out=str(tmp_path / "mapped"), device_map="custom", **opts), model=model,
                           tokenizer=AutoTokenizer.from_pretrained(ckpt)))
    _same_store(plain, mapped)
    auto = Store(capture(CaptureConfig(out=str(tmp_path / "auto"), device_map="auto", **opts)))  # via load_model
    _same_store(plain, auto)


def test_device_map_with_transformerlens_is_refused(tiny_ckpt, corpus_jsonl, tmp_path):
    out = tmp_path / "store"
    _fails_in_one_line(["capture", str(tiny_ckpt("olmoe")), str(corpus_jsonl), "--out", str(out),
                        "--backend", "tl", "--device-map", "auto"], out,
                       "--device-map auto works with --backend hf only", "drop --device-map or use --backend hf")
