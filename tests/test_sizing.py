"""analyses/sizing.py: parameter formulas against transformers' own models (meta device), bytes per token
against a real capture of tiny models."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from routesae.models.tiny import tiny_config
from tests.analyses_scripts import script_fixture

sizing = script_fixture("sizing")


def _meta_params(conf) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["OLMoE-1B-7B", "Mixtral-8x7B", "Qwen3-30B-A3B", "DeepSeek-V3"])
def test_parameter_formula_equals_the_built_model(sizing, name):
    conf = sizing.build_config(name)
    assert sizing.param_counts(conf)["total"] == _meta_params(conf)


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_parameter_formula_on_tiny_configs(sizing, arch):
    conf = tiny_config(arch)
    p = sizing.param_counts(conf)
    assert p["total"] == _meta_params(conf)
    assert p["embedding"] < p["active"] < p["total"]


def test_published_counts(sizing):
    """The arithmetic reproduces the published totals and active counts (to the published precision)."""
    want = {"OLMoE-1B-7B": (6.9, 1.3), "Mixtral-8x7B": (46.7, 12.9), "Qwen3-30B-A3B": (30.5, 3.3),
            "DeepSeek-V3": (671, 37)}
    for name, (total, active) in want.items():
        p = sizing.param_counts(sizing.build_config(name))
        assert p["total"] / 1e9 == pytest.approx(total, rel=0.01), name
        assert p["active"] / 1e9 == pytest.approx(active, rel=0.05), name


def _payload_bytes(path: Path) -> int:
    """Bytes of a safetensors file's tensors (the file less its header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


@pytest.mark.parametrize("arch, dtype", [("olmoe", "float32"), ("deepseek_v3", "bfloat16")])
def test_bytes_per_token_equal_a_real_capture(sizing, tiny_store, tmp_path, arch, dtype):
    store = tiny_store(tmp_path / "s", arch=arch, store_dtype=dtype, max_tokens=120)
    conf = tiny_config(arch)
    header = sizing.store_header(conf)
    assert header["layers"] == store.layers and header["moe_layers"] == store.moe_layers
    payload = sum(_payload_bytes(store.root / name) for s in store.shards for name in s["sha256"])
    measured = payload / store.n_tokens
    assert measured == sizing.bytes_per_token(header, 4 if dtype == "float32" else 2)


def test_tables_and_write(sizing, tmp_path):
    text = sizing.tables()
    assert "| DeepSeek-V3 | 61 | 14..44 (31) | 7,168 |" in text and "Basis: arithmetic" in text
    doc = tmp_path / "guide.md"
    doc.write_text("# guide\n\n<!-- sizing:begin -->\nold\n<!-- sizing:end -->\n\nafter\n")
    sizing.write(doc, text)
    out = doc.read_text()
    assert "old" not in out and text.strip() in out and out.endswith("after\n")
