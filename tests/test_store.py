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
