"""The store reader: shuffled, bounded, deterministic, resumable; and the TL backend's store agrees with HF's."""

import pytest
import torch

from routesae.capture import CaptureConfig, capture
from routesae.store import Store, StoreError


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "s", batch_size=3, layers="0,2", shard_mb=0.01, seed=0)


def _all_rows(s: Store) -> torch.Tensor:
    return torch.cat([s.load_resid(sh["index"]) for sh in s.shards])


def test_batches_cover_rows_once_per_epoch(store):
    assert len(store.shards) >= 5
    seen = torch.cat([b.rows for b in store.batches(16, buffer_shards=2, seed=3)])
    keys = seen[:, 0] * 10_000 + seen[:, 1]
    assert keys.unique().numel() == keys.numel()  # no row twice
    assert keys.numel() > 0.7 * store.n_tokens  # only per-group tails are dropped
    # rows point at the right activations
    b = next(store.batches(8, seed=3))
    for (shard, row), x in zip(b.rows.tolist(), b.resid):
        torch.testing.assert_close(x, store.load_resid(shard)[row].float())


def test_batches_are_shuffled_and_deterministic(store):
    a = [b.rows for b in store.batches(16, seed=1)]
    b = [b.rows for b in store.batches(16, seed=1)]
    c = [b.rows for b in store.batches(16, seed=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    first = a[0]
    assert not torch.equal(first[:, 1], first[:, 1].sort().values)  # not in storage order


def test_start_batch_resumes_the_same_stream(store):
    full = [b.rows for b in store.batches(16, seed=5, epochs=2)]
    tail = [b.rows for b in store.batches(16, seed=5, epochs=2, start_batch=7)]
    assert len(tail) == len(full) - 7
    assert all(torch.equal(x, y) for x, y in zip(full[7:], tail))


def test_memory_is_bounded_by_buffer(store, monkeypatch):
    loaded = []
    orig = store.load_resid
    monkeypatch.setattr(store, "load_resid", lambda s, layer=None: loaded.append(s) or orig(s, layer))
    it = store.batches(8, buffer_shards=2, seed=0)
    next(it)
    assert len(loaded) <= 3  # one group of about buffer_shards shards, never the whole store
    assert len(loaded) < len(store.shards)


def test_single_layer_and_errors(store):
    b = next(store.batches(8, layer=2))
    assert b.resid.shape == (8, store.d_model)
    with pytest.raises(StoreError, match=r"layer 1 was not captured.*\[0, 2\]"):
        next(store.batches(8, layer=1))
    with pytest.raises(StoreError, match="fewer than the batch size"):
        next(store.batches(store.n_tokens + 1))


def test_verify_detects_a_changed_shard(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.root, copy)
    Store(copy).verify()
    p = copy / "acts-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="acts-00001.safetensors does not match its sha256"):
        Store(copy).verify()


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a store.*routesae capture"):
        Store(tmp_path)


def test_tl_backend_store_agrees_with_hf(tiny_ckpt, corpus_jsonl, tmp_path):
    common = dict(model=str(tiny_ckpt("olmoe")), corpus=str(corpus_jsonl), ctx=24, batch_size=3, layers="all",
                  device="cpu", progress=False, max_tokens=150)
    hf = Store(capture(CaptureConfig(out=str(tmp_path / "hf"), backend="hf", **common)))
    tl = Store(capture(CaptureConfig(out=str(tmp_path / "tl"), backend="tl", **common)))
    assert hf.n_tokens == tl.n_tokens == 150 and hf.moe_layers == tl.moe_layers
    torch.testing.assert_close(tl.load_resid(0), hf.load_resid(0), rtol=0, atol=1e-4)
    a, b = hf.load_router(0), tl.load_router(0)
    assert torch.equal(a["indices"].long().sort(-1).values, b["indices"].long().sort(-1).values)
    torch.testing.assert_close(a["logits"].float(), b["logits"].float(), rtol=0, atol=2e-3)
    assert hf.tokens().equals(tl.tokens())


def test_bfloat16_store_rows_are_rounded_float32_rows_and_train(tiny_store, tmp_path):
    """--store-dtype bfloat16 under a float32 model: the float32 capture's rows rounded to bfloat16 (half the
    bytes), read back one float32 batch at a time, and a few training steps run on it."""
    from typer.testing import CliRunner

    from routesae.cli import app
    from routesae.train import TrainConfig, train

    common = dict(batch_size=3, layers="0,2", shard_mb=0.005, seed=0)
    f32 = tiny_store(tmp_path / "f32", **common)
    b16 = tiny_store(tmp_path / "b16", store_dtype="bfloat16", **common)
    assert (b16.dtype, b16.manifest["dtype"], f32.dtype) == ("bfloat16", "float32", "float32")
    assert b16.manifest["capture_args"]["store_dtype"] == "bfloat16"
    assert "store_dtype" not in f32.manifest["capture_args"]  # older float32 stores stay resumable
    assert b16.n_tokens == f32.n_tokens and len(b16.shards) >= 3
    rows32, rows16 = _all_rows(f32), _all_rows(b16)
    assert rows16.dtype == torch.bfloat16 and torch.equal(rows16, rows32.to(torch.bfloat16))
    size = [(s.root / "acts-00000.safetensors").stat().st_size for s in (f32, b16)]
    assert size[1] < 0.51 * size[0]

    # the reader keeps a group of shards in bfloat16 and converts each batch only
    resid, _, _ = b16._load_group([0, 1], None, False)
    assert resid.dtype == torch.bfloat16
    b = next(b16.batches(16, seed=0))
    assert b.resid.dtype == torch.float32
    torch.testing.assert_close(b.resid, rows16[_flat(b16, b.rows)].float(), rtol=0, atol=0)

    run = tmp_path / "run"
    train(TrainConfig(store=str(b16.root), out=str(run), arch="routesae", k=4, expansion=2, batch_tokens=64,
                      tokens=64 * 4, progress=False, device="cpu"))
    metrics = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert metrics and (run / "train_config.json").exists()

    res = CliRunner().invoke(app, ["store", "info", str(b16.root)])
    assert res.exit_code == 0, res.output
    # layers 0 and 2 of d 32 in bfloat16 = 128 bytes; 4 MoE layers x (2 x 4 + 1 + 8 x 2) = 100 bytes
    assert "bfloat16 activations (model ran in float32)" in res.output
    assert "per token  228 bytes (activations 128 + router records 100)" in res.output
    assert "projected  10M tokens" in res.output and "100M tokens" in res.output


def _flat(store: Store, rows: torch.Tensor) -> torch.Tensor:
    """Positions of (shard, row) pairs in the concatenation of all shards."""
    starts = torch.tensor([0] + [s["tokens"] for s in store.shards]).cumsum(0)
    return starts[rows[:, 0]] + rows[:, 1]
