"""Write a safetensors file from row chunks, hashing it on the way, without one big copy.

``safetensors.torch.save`` builds the whole file as one ``bytes`` object, and concatenating a
shard's batches first costs another copy; for a 250 MB activation shard the two copies cost
more CPU than the disk write. Here each tensor is given as a list of chunks that are
concatenated along dim 0 *in the file*: the header is computed from the chunk shapes, then every
chunk's bytes go straight from the tensor's memory to the file and into the sha256.

The file is a standard safetensors file (8-byte little-endian header length, JSON header padded
with spaces to a multiple of 8, then the tensors back to back in header order), readable by
``safetensors.safe_open``. The write is atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from routesae.atomic import atomic_path

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_chunked_safetensors(path: str | Path, tensors: dict[str, Sequence[torch.Tensor]]) -> str:
    """Write ``{name: [chunk, ...]}`` (chunks of one name agree on dtype and trailing shape) to
    ``path`` as one safetensors file where each name holds its chunks concatenated along dim 0.

    Returns the sha256 hex digest of the file's bytes.
    """
    header: dict[str, dict] = {}
    offset = 0
    for name, chunks in tensors.items():
        if not chunks:
            raise ValueError(f"tensor '{name}' has no chunks")
        first = chunks[0]
        if any(c.dtype != first.dtype or c.shape[1:] != first.shape[1:] for c in chunks):
            raise ValueError(f"chunks of tensor '{name}' disagree on dtype or trailing shape")
        rows = sum(int(c.shape[0]) for c in chunks)
        nbytes = sum(c.numel() * c.element_size() for c in chunks)
        header[name] = {"dtype": _DTYPES[first.dtype], "shape": [rows, *first.shape[1:]],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    digest = hashlib.sha256(head)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        for chunks in tensors.values():
            for c in chunks:
                data = _as_bytes(c)
                digest.update(data)
                f.write(data)
    return digest.hexdigest()
