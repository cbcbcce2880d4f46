"""The chunked safetensors writer against the safetensors library and hashlib."""

import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from routesae.shard_file import write_chunked_safetensors


def test_chunks_read_back_as_one_tensor_each(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "resid": [torch.randn(n, 3, 5, generator=g) for n in (4, 1, 7)],
        "indices": [torch.randint(-1, 30, (n, 2, 4), generator=g).to(torch.int16) for n in (4, 1, 7)],
        "weights": [torch.rand(n, 2, 4, generator=g).to(torch.float16) for n in (4, 1, 7)],
        "n_active": [torch.randint(0, 5, (n, 2), generator=g).to(torch.uint8) for n in (4, 1, 7)],
        "bf": [torch.randn(n, 6, generator=g).to(torch.bfloat16) for n in (4, 1, 7)],
    }
    path = tmp_path / "x.safetensors"
    digest = write_chunked_safetensors(path, tensors)
    data = path.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, chunks in tensors.items():
            assert torch.equal(f.get_tensor(name), torch.cat(chunks))
    # the same content as the library's own writer produces, tensor by tensor
    ref = st_load(st_save({k: torch.cat(v) for k, v in tensors.items()}))
    got = st_load(data)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


def test_mismatched_chunks_are_refused_and_nothing_written(tmp_path):
    with pytest.raises(ValueError, match="disagree"):
        write_chunked_safetensors(tmp_path / "y.safetensors", {"a": [torch.zeros(2, 3), torch.zeros(2, 4)]})
    assert not list(tmp_path.iterdir())
