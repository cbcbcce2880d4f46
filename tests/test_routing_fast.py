"""analyze-routing's fast path (blocks replayed from an override's first layer, cached expert outputs,
head over analysed tokens only, early stop in the by-layer view) against the reference path
(``fast=False``: one full forward per override): the same tables within ``compare_tables``' tolerances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from routesae.analyze import routing_forward
from routesae.analyze.routing import RoutingAnalysisConfig, analyze_routing
from routesae.analyze.routing_tables import compare_tables

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "granitemoe", "longcat_flash")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _both(model, corpus, tmp_path, **options) -> list[Path]:
    return [analyze_routing(RoutingAnalysisConfig(model=str(model), corpus=str(corpus), out=str(tmp_path / f"f{fast}"),
                                                  device="cpu", progress=False, **options), fast=fast)
            for fast in (False, True)]


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_matches_the_reference(arch, tiny_ckpt, corpus_jsonl, tmp_path):
    """Every view at every layer; 60 tokens in contexts of 24: the last batch has a sequence with no
    analysed token (not run) and one cut short."""
    ref, fast = _both(tiny_ckpt(arch), corpus_jsonl, tmp_path, max_tokens=60, ctx=24, batch_size=2,
                      p_grid=[0.3, 1.0], ablate_experts=[0, 3])
    assert compare_tables(ref, fast) == []


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fast_path_with_padding(batch_size, tiny_ckpt, corpus_jsonl, tmp_path):
    ref, fast = _both(tiny_ckpt("olmoe"), corpus_jsonl, tmp_path, max_tokens=70, ctx=32, batch_size=batch_size,
                      packing="pad", k_grid=[1, 3, 8], p_grid=[0.5, 1.0], eps=[0.002, 0.05], per_layer="1,3",
                      ablate_layers="0,3")
    assert compare_tables(ref, fast) == []


def _batch(ctx=24, rows=3):
    ids = torch.randint(3, 300, (rows, ctx))
    mask = torch.ones_like(ids)
    keep = torch.ones(rows * ctx, dtype=torch.bool)
    keep[-ctx - 5:] = False  # the last sequence holds no analysed token, the one before is cut short
    return ids, mask, keep


def test_fast_forward_replays_the_clean_pass(tiny_ckpt):
    from routesae.models.intervene import LayerPlan, RoutingOverride
    from routesae.models.load import ModelConfig, load_model
    from routesae.models.routers import adapter_for

    model, _ = load_model(ModelConfig(str(tiny_ckpt("olmoe")), "float32", "cpu", None, False))
    adapter = adapter_for(model)
    torch.manual_seed(0)
    ids, mask, keep = _batch()
    ref = routing_forward.Forward(model, adapter, ids, mask, keep)
    fw = routing_forward.FastForward(model, adapter, ids, mask, keep, starts=[0, 2, 3])
    assert fw.ok and len(fw.ids) == 2 and len(fw.ce_own) == int(keep.sum())  # the empty sequence is not run
    assert [fw.entry[i][0] for i in (0, 2, 3)] == ["mid"] * 3 and sorted(fw.cache) == [0, 2, 3]
    np.testing.assert_allclose(fw.ce_own, ref.ce_own, atol=1e-6)
    for start, ov in ((2, RoutingOverride.of("ablate", [1], [2])), (3, RoutingOverride.of("topk", 1, [3])),
                      (0, RoutingOverride.of("topp", 0.6)), (0, RoutingOverride.of("topk", 8))):
        kl, ce, _ = ref.run(ov)
        h, _, same = fw.final(start, ov, same_as=LayerPlan("topp", 1.0))
        kl2, ce2 = fw.head(h)
        np.testing.assert_allclose(kl2, kl, atol=1e-6)
        np.testing.assert_allclose(ce2, ce, atol=1e-5)
        assert same == (str(ov) == "topk:8")  # topk:E routes like topp:1
    rows = torch.zeros(len(fw.ce_own), dtype=torch.bool)
    rows[::3] = True
    kl, ce = fw.head(fw.final(0, RoutingOverride.of("topk", 1))[0], rows=rows, kl=True)
    assert np.isnan(kl[~rows.numpy()]).all() and not np.isnan(kl[rows.numpy()]).any()


def test_fast_path_falls_back_when_the_head_differs(tiny_ckpt, corpus_jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr(routing_forward.FastForward, "_check_head", lambda self, last: False)
    monkeypatch.setattr(routing_forward.FastForward, "final", None)  # never called
    ref, fast = _both(tiny_ckpt("olmoe"), corpus_jsonl, tmp_path, max_tokens=30, ctx=24, batch_size=2,
                      p_grid=[0.5], per_layer="1", ablate_layers="2", ablate_experts=[0])
    assert compare_tables(ref, fast) == []


def test_fast_path_on_the_demo_model(tmp_path):
    """The first two contexts of the demo corpus' validation split, every view of the issue's command."""
    ref, fast = _both(ROOT / "data/demo-moe", ROOT / "data/corpus", tmp_path, split="val", max_tokens=256,
                      ctx=128, batch_size=2, ablate_layers="1,4,7")
    assert compare_tables(ref, fast) == []


def test_compare_tables_flags_differences(tiny_ckpt, corpus_jsonl, tmp_path):
    from routesae.analyze.routing_tables import _tables

    out = analyze_routing(RoutingAnalysisConfig(model=str(tiny_ckpt("olmoe")), corpus=str(corpus_jsonl),
                                                out=str(tmp_path / "r"), max_tokens=48, ctx=24, p_grid=[0.5, 1.0],
                                                ablate_experts=[0], device="cpu", progress=False))
    a = _tables(out)
    assert compare_tables(a, a) == []

    def changed(name, fn):
        b = {k: v.copy() for k, v in a.items()}
        fn(b[name])
        return compare_tables(a, b)

    assert changed("ablation", lambda t: t.__setitem__("ce", t["ce"] + 2e-5))
    assert not changed("ablation", lambda t: t.__setitem__("ce", t["ce"] + 5e-6))
    assert changed("tokens", lambda t: t.__setitem__("needed_k_eps0.01", t["needed_k_eps0.01"].where(
        t.index != 0, t["needed_k_eps0.01"] % 2 + 1)))
    assert changed("experts_per_token", lambda t: t.__setitem__("tokens", t["tokens"] + (t.index == 0)))

    # one token of one domain moves to another needed k' (in its domain's row and in "all"): allowed
    # where the view's token_tol * n reaches 1, pooled over domains, and not below
    import pandas as pd

    t = a["needed_experts"]
    first = t[t.domain != "all"].iloc[0]
    view = (t.scope == first.scope) & (t.layer == first.layer) & (t.eps == first.eps)
    n = int(t[view & (t.domain == "all")].tokens.sum())
    moved = t.copy()
    extra = []
    for dom in (first.domain, "all"):
        row = moved.index[view & (moved.domain == dom) & (moved.needed_k == first.needed_k)][0]
        moved.loc[row, "tokens"] -= 1
        extra.append({**moved.loc[row].to_dict(), "needed_k": 99, "tokens": 1})
    b = {**a, "needed_experts": pd.concat([moved, pd.DataFrame(extra)], ignore_index=True)}
    assert compare_tables(a, b, token_tol=1 / n) == []
    assert compare_tables(a, b, token_tol=0.99 / n) == ["needed_experts: 1 tokens of a view changed needed_k"]
    assert changed("loss_by_k", lambda t: t.__setitem__("tokens", t["tokens"] + 1))


def test_bench_routing_smoke(tiny_ckpt, corpus_jsonl, tmp_path):
    """bench/routing.py runs both paths on a tiny model and finds their tables alike; no assertion on speed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_routing", ROOT / "bench" / "routing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lines: list[str] = []
    r = bench.bench(str(tiny_ckpt("olmoe")), str(corpus_jsonl), tokens=48, batch_size=2, ctx=24, ablate_layers="1",
                    repeats=1, workdir=tmp_path, log=lines.append, split="train")
    assert r["problems"] == [] and r["ratio_cpu"] > 0 and r["fast"]["wall"] > 0 and len(lines) == 2
